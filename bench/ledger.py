"""The step ledger: every operation of one GPT-2 training micro-step, with the bytes it moves and the
FLOPs it does, counted on the CPU without allocating a tensor.

    python -m bench ledger                              # GPT-2 124M, B=16, T=1024, bf16: every configuration
    python -m bench ledger --configs none,all --out /tmp/ledger
    python -m bench ledger --preset tiny --batch-size 2 --seq-len 64

How it counts. The model runs under torch's ``FakeTensorMode`` (tensors with shapes, dtypes and
strides but no memory) while a ``TorchDispatchMode`` records every aten op and every custom op
``torch.ops.gpt_triton.*`` that reaches the dispatcher, forward and backward:

* bytes read: each tensor argument once (its distinct elements: a broadcast bias counts its own
  size); bytes written: each output that is new memory, and each argument the op mutates, once
  (``copy_``, ``fill_``, ``out=`` arguments are written, not read). Views, ``detach``, reshapes
  that alias, and allocations (``empty``) are free. Gathers read what they gather (``embedding``,
  ``index``, ``nll_loss``).
* FLOPs: matmuls (2·M·N·K) and attention (2 GEMMs forward, 5 backward, halved when causal).
* our custom ops are opaque kernels: each reads its inputs and writes its outputs once, unless its
  module registered a cost function (``registry.register_cost``) for what its kernels really move.
* roofline time of an op: ``max(bytes / copy bandwidth, FLOPs / matmul rate)``; the step's time is
  their sum, so its tokens/s is an upper bound for the device.

The dtype flow is CUDA's. A CPU-only torch can make fake CUDA tensors but not run autograd on them,
and CPU autocast casts by other lists, so the fakes are CPU tensors and CUDA autocast's policy is
reproduced explicitly (:class:`CudaAutocast`: its lower-precision ops cast floating inputs to bf16,
with leaf weights cast once per forward as CUDA's cast cache does; its fp32 ops cast to fp32).
``tests/test_ledger.py`` compares the casts with a real CUDA run when a GPU is present.

The micro-step is a steady-state one of gradient accumulation (every ``.grad`` already holds the
earlier micro-steps' sum, so autograd accumulates into it), with ``model(..., loss_scale=1/grad_accum)``
and ``loss.backward()`` as ``train_gpt2.py`` does; the fused loss's backward, whose GPU kernel exits
on an upstream gradient of exactly 1, is told so (fake tensors hold no value to test). The
optimizer step (``clip_grad_norm_``, ``step``, ``zero_grad``) is counted separately by formula: the
fused AdamW kernels cannot run on fake tensors. ``--host-overhead`` also times the host's side.

The **ideal** (:func:`ideal_ops`) is what the step must move at least with this model's numerics
(fp32 residual stream and master weights, bf16 activations under autocast): every fused op reads its
inputs once and writes its outputs once, each weight is cast to bf16 once per micro-step (autocast's
one cast), each weight gradient is accumulated into its fp32 ``.grad`` by its GEMM, and activations
saved for the backward are written once and read once there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from gpt.config import GPTConfig, preset
from gpt.model import GPT
from gpt.training import fused_loss_on
from gpt_kernels import registry
from gpt_kernels.attention import attention_flops

# The module (gpt_kernels exports the op itself under the same name): its variant switch.
lce = importlib.import_module("gpt_kernels.linear_cross_entropy")

H100_SXM = {"name": "H100 SXM datasheet figures (no GPU run under bench/results)", "copy_gbps": 3000.0,
            "matmul_tflops": 800.0}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ledger"
GB = 1e9

# ----------------------------------------------------------------------------------- CUDA autocast


def _functions(*names: str) -> set:
    """The Python callables behind each name, wherever torch exposes it (torch.X, F.X, Tensor.X)."""
    found = set()
    for name in names:
        for namespace in (torch, F, torch.Tensor, torch.linalg, torch._C._nn):
            function = getattr(namespace, name, None)
            if callable(function):
                found.add(function)
    return found


# CUDA autocast's lists (aten/src/ATen/autocast_mode.cpp, mirrored by torch.testing's
# autocast_test_lists), at the level where Python calls them.
LOWER_PRECISION = _functions(
    "linear", "matmul", "__matmul__", "__rmatmul__", "mm", "mv", "bmm", "addmm", "addmv", "addr", "baddbmm",
    "addbmm", "einsum", "chain_matmul", "multi_dot", "vecdot", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu", "scaled_dot_product_attention",
)
FP32 = _functions(
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow", "__pow__", "softplus", "layer_norm", "rms_norm", "group_norm", "norm", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist",
    "renorm", "logsumexp", "cross_entropy",
)
# Run in fp32 by passing dtype=torch.float32 (no separate cast for the reductions; softmax's own
# implementation converts its input first, as on CUDA for bf16).
FP32_BY_DTYPE = _functions("softmax", "log_softmax", "cumsum", "cumprod", "prod", "sum")
PROMOTE = _functions("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "tensordot", "cat", "stack",
                     "index_put", "scatter_add")
FP32 -= FP32_BY_DTYPE


class CudaAutocast(TorchFunctionMode):
    """CUDA autocast's cast policy for tensors on any device (the ledger's CPU fakes).

    :func:`cuda_autocast` also makes code that asks whether autocast is on hear yes."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # CUDA's cast cache, for leaf weights

    def _cast(self, t, dtype: torch.dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype in (dtype, torch.float64):
            return t
        cacheable = t.is_leaf and t.requires_grad
        if cacheable and id(t) in self.cache:
            return self.cache[id(t)][1]
        cast = t.to(dtype)
        if cacheable:
            self.cache[id(t)] = (t, cast)
        return cast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in LOWER_PRECISION:
            args, kwargs = tree_map(lambda t: self._cast(t, self.dtype), (args, kwargs))
        elif func in FP32:
            args, kwargs = tree_map(lambda t: self._cast(t, torch.float32), (args, kwargs))
        elif func in FP32_BY_DTYPE:
            first = args[0] if args else kwargs.get("input")
            if isinstance(first, torch.Tensor) and first.dtype in (torch.float16, torch.bfloat16) \
                    and kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": torch.float32}
        elif func in PROMOTE:
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if tensors:
                widest = tensors[0].dtype
                for t in tensors[1:]:
                    widest = torch.promote_types(widest, t.dtype)
                args, kwargs = tree_map(lambda t: self._cast(t, widest), (args, kwargs))
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype = torch.bfloat16):
    """CUDA's bf16/fp16 autocast on CPU tensors: CUDA's policy casts, and code that asks whether
    autocast is on (``torch.is_autocast_enabled(device)``, ``torch.get_autocast_dtype(device)``, as
    our ops' wrappers do) hears yes and ``dtype`` for every device. CPU autocast itself stays off:
    its lists differ from CUDA's."""
    saved = torch.is_autocast_enabled, torch.get_autocast_dtype
    torch.is_autocast_enabled = lambda device_type=None: True
    torch.get_autocast_dtype = lambda device_type=None: dtype
    try:
        with CudaAutocast(dtype):
            yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = saved


# ------------------------------------------------------------------------------------ the recorder

# Ops that move no data: aliasing views are found from the schema, these by name.
FREE_OPS = {
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::empty", "aten::empty_like", "aten::empty_strided",
    "aten::new_empty", "aten::new_empty_strided", "aten::_local_scalar_dense", "aten::_unsafe_view",
    "aten::resize_", "aten::set_", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type",
}
# Ops that take a tensor only for its shape and dtype.
SHAPE_ONLY = {"aten::ones_like", "aten::zeros_like", "aten::full_like", "aten::rand_like", "aten::randn_like",
              "aten::new_zeros", "aten::new_ones", "aten::new_full"}
# Mutating ops that do not read what they overwrite.
WRITE_ONLY = {"aten::copy_", "aten::fill_", "aten::zero_", "aten::normal_", "aten::uniform_", "aten::bernoulli_",
              "aten::random_", "aten::exponential_"}
ATTENTION_FORWARD = "_scaled_dot_product"


def distinct_bytes(t: torch.Tensor) -> int:
    return registry.tensor_bytes(t)


def _key(t: torch.Tensor):
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _describe(t: torch.Tensor) -> dict:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "stride": list(t.stride())}


def _matmul_flops(name: str, tensors: list[torch.Tensor], out) -> int:
    if name in ("aten::mm", "aten::addmm", "aten::_addmm_activation"):
        a, b = tensors[-2], tensors[-1]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("aten::bmm", "aten::baddbmm"):
        a, b = tensors[-2], tensors[-1]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 0


def _argument(func, args, kwargs, name, default=None):
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[index] if index < len(args) else default
    return default


@dataclass
class Op:
    index: int
    phase: str
    name: str
    bytes_read: int
    bytes_written: int
    flops: int
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def op_cost(func, args, kwargs, out) -> tuple[int, int, int] | None:
    """(bytes read, bytes written, FLOPs) of one aten or custom op call; None when it moves nothing."""
    name = func._schema.name
    if name.startswith("gpt_triton::"):
        cost = registry.op_costs().get(name, registry.default_cost)
        schema_args = list(args) + [kwargs[a.name] for a in func._schema.arguments[len(args):] if a.name in kwargs]
        return cost(tuple(schema_args), out)
    if name in FREE_OPS:
        return None
    schema = func._schema
    mutated, written_only = [], set()
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            value = kwargs.get(argument.name) if argument.name in kwargs else (args[index] if index < len(args) else None)
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor):
                    mutated.append(t)
                    if argument.kwarg_only or name in WRITE_ONLY:
                        written_only.add(_key(t))
    returns_alias = all(r.alias_info is not None for r in schema.returns) and schema.returns
    if returns_alias and not mutated:
        return None  # a view
    if not mutated and not any(isinstance(t, torch.Tensor) for t in tree_flatten(out)[0]):
        return None  # metadata: prim::device, sizes, strides
    tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    reads = {_key(t): t for t in tensors if _key(t) not in written_only}
    writes = {_key(t): t for t in mutated}
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor) and not any(t.untyped_storage()._cdata == m.untyped_storage()._cdata
                                                   for m in mutated):
            writes.setdefault(_key(t), t)
    bytes_read = 0 if name in SHAPE_ONLY else sum(map(distinct_bytes, reads.values()))
    if name in ("aten::embedding", "aten::index.Tensor", "aten::index"):
        # A gather reads the rows it gathers (the output's size) and its indices, not the whole table.
        bytes_read = sum(distinct_bytes(t) for t in tensors if not t.is_floating_point()) + \
            sum(distinct_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
    elif name == "aten::nll_loss_forward":
        target = _argument(func, args, kwargs, "target")
        bytes_read = distinct_bytes(target) + target.numel() * args[0].element_size()
    flops = _matmul_flops(name, tensors, out)
    if ATTENTION_FORWARD in name:
        q, k = tensors[:2] if "backward" not in name else tensors[1:3]
        flops = attention_flops(math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2], q.shape[-1],
                                bool(_argument(func, args, kwargs, "is_causal", False)), "backward" in name)
    return bytes_read, sum(map(distinct_bytes, writes.values())), flops


class Recorder(TorchDispatchMode):
    """Records each op that reaches the dispatcher, with its cost, into ``ops`` under ``phase``."""

    def __init__(self):
        super().__init__()
        self.ops: list[Op] = []
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        cost = op_cost(func, args, kwargs, out)
        if cost is not None:
            name = func._schema.name.replace("::", ".")
            self.ops.append(Op(
                index=len(self.ops), phase=self.phase, name=name, bytes_read=cost[0], bytes_written=cost[1],
                flops=cost[2],
                inputs=[_describe(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)],
                outputs=[_describe(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)],
            ))
        return out


# ------------------------------------------------------------------------------------- the step


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=False)


def record_micro_step(step: Callable[[], torch.Tensor], params: list[torch.Tensor], dtype: torch.dtype,
                      grad_accum: int, loss_scaled: bool = False) -> list[Op]:
    """The ops of ``(step() / grad_accum).backward()`` (``step().backward()`` when ``loss_scaled``:
    the step returns its loss already scaled by 1/grad_accum) with ``step`` run under CUDA's autocast,
    on fake tensors, after every ``.grad`` already holds a sum (a steady-state accumulation micro-step)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    recorder = Recorder()
    with recorder:
        if dtype == torch.float32:
            loss = step()
        else:
            with cuda_autocast(dtype):
                loss = step()
        recorder.phase = "backward"
        (loss if loss_scaled else loss / grad_accum).backward()
    return recorder.ops


def optimizer_ops(params: list[torch.Tensor], fused: bool) -> list[Op]:
    """The optimizer step by formula: clip_grad_norm_, AdamW's step, zero_grad (set_to_none: free).

    Fused (our AdamW, or torch's fused AdamW with torch's clip): the norm reads every gradient once,
    the step reads parameter, gradient and both moments and writes parameter and moments. torch's
    ``clip_grad_norm_`` also multiplies every gradient by the clip coefficient (a read and a write)."""
    n = sum(p.numel() for p in params)
    ops = [Op(0, "optimizer", "grad_norm (read every grad)", 4 * n, 0, 0)]
    if not fused:
        ops.append(Op(len(ops), "optimizer", "aten._foreach_mul_ (clip: grad *= coef)", 4 * n, 4 * n, 0))
    ops.append(Op(len(ops), "optimizer", "adamw step (read p, g, m, v; write p, m, v)", 16 * n, 12 * n, 0))
    return ops


def ideal_ops(config: GPTConfig, batch_size: int, seq_len: int, dtype: torch.dtype = torch.bfloat16) -> list[Op]:
    """The least traffic of one micro-step with this model's numerics (see the module doc), op by op."""
    n, c, t, h, v = batch_size * seq_len, config.n_embd, seq_len, config.n_head, config.padded_vocab_size
    act, f32, idx = dtype.itemsize, 4, 8
    ops: list[Op] = []

    def add(phase: str, name: str, read: int, written: int, flops: int = 0) -> None:
        ops.append(Op(len(ops), phase, name, read, written, flops))

    def cast(name: str, rows: int, cols: int) -> None:
        if act != f32:
            add("forward", f"cast {name} to {dtype}", rows * cols * f32, rows * cols * act)

    def linear(name: str, k: int, m: int, bias: bool = True) -> None:  # (n, k) @ (k, m)
        cast(name, m, k)
        add("forward", name, n * k * act + m * k * act + bias * m * f32, n * m * act, 2 * n * k * m)

    def linear_backward(name: str, k: int, m: int, bias: bool = True) -> None:
        add("backward", f"{name} dX", n * m * act + m * k * act, n * k * act, 2 * n * k * m)
        # dW (and db) accumulated into the fp32 .grad by the GEMM: dY and X read, .grad read and written.
        add("backward", f"{name} dW", n * m * act + n * k * act + (m * k + bias * m) * f32,
            (m * k + bias * m) * f32, 2 * n * k * m)

    # GPT-2: LayerNorm (mean and rstd, weight and bias), learned positions, a GELU MLP with biases.
    # Llama: RMSNorm (rstd, a weight), RoPE on q and k, grouped K/V heads, a SwiGLU MLP, no biases.
    llama = config.arch == "llama"
    kv, hidden, bias = config.kv_heads * config.head_dim, config.mlp_width, not llama
    qkv = c + 2 * kv
    norm_params = (1 if llama else 2) * c * f32
    stats = (1 if llama else 2) * n * f32
    norm_name = "rmsnorm" if llama else "ln"
    positions = 0 if llama else t * c * f32
    add("forward", "embedding (wte rows)" if llama else "embedding (wte rows + wpe)",
        n * idx + n * c * f32 + positions, n * c * f32)
    for layer in range(config.n_layer):
        residual = layer > 0  # layer 0's ln_1 normalizes the embedding, with no branch to add
        add("forward", f"{norm_name}_1", n * c * f32 + residual * n * c * act + norm_params,
            residual * n * c * f32 + n * c * act + stats)
        linear("c_attn", c, qkv, bias)
        if llama:
            add("forward", "rope", (c + kv) * n * act, (c + kv) * n * act)
        add("forward", "attention", qkv * n * act, n * c * act + n * h * f32,
            attention_flops(batch_size * h, t, t, c // h, causal=True))
        linear("attn.c_proj", c, c, bias)
        add("forward", f"{norm_name}_2", n * c * f32 + n * c * act + norm_params, n * c * f32 + n * c * act + stats)
        if llama:
            linear("c_fc", c, 2 * hidden, bias=False)
            add("forward", "swiglu", 2 * hidden * n * act, hidden * n * act)
        else:
            linear("c_fc", c, hidden, bias=False)
            add("forward", "gelu (bias fused)", hidden * n * act + hidden * f32, hidden * n * act)
        linear("mlp.c_proj", hidden, c, bias)
    add("forward", f"{norm_name}_f", n * c * f32 + n * c * act + norm_params, n * c * f32 + n * c * act + stats)
    cast("lm_head", v, c)
    # The fused lm_head + loss: gradients of hidden and weight in the forward, weight gradient into .grad.
    add("forward", "lm_head + loss (fused)", n * c * act + v * c * act + n * idx + v * c * f32,
        n * c * act + v * c * f32, 3 * 2 * n * c * v)
    ln_backward_written = n * c * f32 + n * c * act + norm_params  # dstream (fp32), dbranch (bf16), dw(, db)
    ln_backward_read = n * c * act + n * c * f32 * 2 + stats + norm_params * 2
    add("backward", f"{norm_name}_f backward", n * c * act + n * c * f32 + stats + norm_params * 2,
        ln_backward_written)
    for layer in reversed(range(config.n_layer)):
        linear_backward("mlp.c_proj", hidden, c, bias)
        if llama:
            add("backward", "swiglu backward", 3 * hidden * n * act, 2 * hidden * n * act)
            linear_backward("c_fc", c, 2 * hidden, bias=False)
        else:
            add("backward", "gelu backward", hidden * n * act * 2 + hidden * f32 * 2, hidden * n * act + hidden * f32)
            linear_backward("c_fc", c, hidden, bias=False)
        add("backward", f"{norm_name}_2 backward", ln_backward_read, ln_backward_written)
        linear_backward("attn.c_proj", c, c, bias)
        add("backward", "attention backward", qkv * n * act + 2 * n * c * act + n * h * f32, qkv * n * act,
            attention_flops(batch_size * h, t, t, c // h, causal=True, backward=True))
        if llama:
            add("backward", "rope backward", (c + kv) * n * act, (c + kv) * n * act)
        linear_backward("c_attn", c, qkv, bias)
        if layer > 0:
            add("backward", f"{norm_name}_1 backward", ln_backward_read, ln_backward_written)
        else:  # no branch: the embedding's gradient only, in fp32
            add("backward", f"{norm_name}_1 backward", ln_backward_read, n * c * f32 + norm_params)
    # Each token's row of wte.grad (and wpe.grad) read and written once (accumulation), dx read once.
    rows = min(n, v) + (0 if llama else t)
    add("backward", "embedding backward", n * c * f32 + n * idx + rows * c * f32, rows * c * f32)
    return ops


# ------------------------------------------------------------------------------------ the ledger


def configurations(spec: str) -> list[tuple[str, str]]:
    """(label, kernel spec) pairs: 'all' (the default) is all off, all on (with the fused loss's
    default variant, then its recompute one: 'all:recompute'), and each op on alone."""
    model_ops = [op for op in registry.OPS if op not in ("adamw", "decode_attention") and registry.has_triton(op)]
    every = [("all off", "none"), ("all on", "all"), ("all on, loss recomputed", "all:recompute")]
    every += [(f"{op} only", op) for op in model_ops]
    if spec in ("", "all"):
        return every
    chosen = []
    for name in spec.split(","):
        name = name.strip()
        kernels, _, variant = name.partition(":")
        label = {"none": "all off", "all": "all on"}.get(kernels, f"{kernels} only")
        registry.parse_kernels(kernels)  # a ValueError for an unknown op
        if variant:
            with lce.use_variant(variant):  # a ValueError for an unknown variant
                label += {"recompute": ", loss recomputed"}.get(variant, f", loss {variant}")
        chosen.append((label, name))
    return chosen


def find_ceilings(results_dir: Path) -> dict:
    """The latest GPU run's ceilings under ``results_dir``, or H100 SXM datasheet figures."""
    from bench import report

    try:
        file = report.find_results(results_dir)
        ceilings = report.read_results(file).get("ceilings") or {}
        rate = (ceilings.get("matmul_tflops") or {}).get("bfloat16")
        if ceilings.get("copy_gbps") and rate:
            device = report.read_results(file).get("environment", {}).get("device_name", "GPU")
            return {"name": f"measured on {device} ({file.parent.name})", "copy_gbps": ceilings["copy_gbps"],
                    "matmul_tflops": rate}
    except (FileNotFoundError, OSError, ValueError):
        pass
    return dict(H100_SXM)


def roofline_ms(op: Op, ceilings: dict) -> float:
    return 1e3 * max(op.bytes / (ceilings["copy_gbps"] * GB), op.flops / (ceilings["matmul_tflops"] * 1e12))


def summarize(ops: list[Op], ceilings: dict) -> dict:
    by_name: dict[str, dict] = defaultdict(lambda: {"calls": 0, "bytes_read": 0, "bytes_written": 0, "flops": 0,
                                                    "roofline_ms": 0.0})
    for op in ops:
        row = by_name[op.name]
        row["calls"] += 1
        row["bytes_read"] += op.bytes_read
        row["bytes_written"] += op.bytes_written
        row["flops"] += op.flops
        row["roofline_ms"] += roofline_ms(op, ceilings)
    return {
        "bytes_read": sum(op.bytes_read for op in ops),
        "bytes_written": sum(op.bytes_written for op in ops),
        "bytes": sum(op.bytes for op in ops),
        "flops": sum(op.flops for op in ops),
        "roofline_ms": sum(roofline_ms(op, ceilings) for op in ops),
        "ops": len(ops),
        "by_name": dict(sorted(by_name.items(), key=lambda item: -(item[1]["bytes_read"] + item[1]["bytes_written"]))),
    }


def build_model(config: GPTConfig) -> tuple[GPT, list[torch.Tensor]]:
    model = GPT(config)
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad]


def run_ledger(config: GPTConfig, batch_size: int, seq_len: int, grad_accum: int = 32,
               dtype: torch.dtype = torch.bfloat16, configs: list[tuple[str, str]] | None = None,
               ceilings: dict | None = None) -> dict:
    """The ledger of every configuration as one JSON-ready dict (see the module doc)."""
    if not 1 <= seq_len <= config.block_size or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch size and grad_accum must be >= 1 and seq_len in [1, {config.block_size}], "
                         f"got batch_size={batch_size} seq_len={seq_len} grad_accum={grad_accum}")
    configs = configs or configurations("all")
    ceilings = ceilings or dict(H100_SXM)
    tokens = batch_size * seq_len
    ideal = summarize(ideal_ops(config, batch_size, seq_len, dtype), ceilings)
    results = {"preset": config.to_dict(), "batch_size": batch_size, "seq_len": seq_len, "grad_accum": grad_accum,
               "dtype": str(dtype).removeprefix("torch."), "ceilings": ceilings, "ideal": ideal, "configs": []}
    started = time.perf_counter()
    with fake_mode(), registry.assume_triton_runs(unit_loss_gradient=True), torch.device("cpu"):
        model, params = build_model(config)
        idx = torch.zeros((batch_size, seq_len), dtype=torch.long)
        targets = torch.zeros((batch_size, seq_len), dtype=torch.long)
        for label, spec in configs:
            kernels, _, variant = spec.partition(":")
            with registry.use_kernels(kernels), lce.use_variant(variant or lce.VARIANT):
                # As the training step: the loss comes back scaled by 1/grad_accum and loss.backward() is called.
                fused_loss = fused_loss_on("cpu")  # the fake tensors' device, where Triton is assumed to run
                ops = record_micro_step(lambda: model(idx, targets, check_inputs=False, loss_scale=1 / grad_accum,
                                                      fused_loss=fused_loss)[1],
                                        params, dtype, grad_accum, loss_scaled=True)
                fused_optimizer = "adamw" in registry.requested_kernels()
            step = summarize(ops, ceilings)
            optimizer = summarize(optimizer_ops(params, fused=True), ceilings)
            if not fused_optimizer:
                optimizer = summarize(optimizer_ops(params, fused=False), ceilings)
            step_ms = grad_accum * step["roofline_ms"] + optimizer["roofline_ms"]
            results["configs"].append({
                "label": label, "kernels": spec, "micro_step": step, "optimizer": optimizer,
                "ratio_to_ideal": step["bytes"] / ideal["bytes"],
                "predicted_step_ms": step_ms,
                "predicted_tokens_per_s_upper_bound": tokens * grad_accum / (step_ms / 1e3),
                "ops": [asdict(op) for op in ops],
            })
    results["seconds"] = time.perf_counter() - started
    return results


# ----------------------------------------------------------------------------------- host overhead


@contextlib.contextmanager
def _launches_stubbed():
    """Every Triton launch returns at once and is counted: what is left is the host's own work
    (validation, registry, custom-op dispatch, autograd, allocation, aten's dispatch)."""
    from triton.runtime import interpreter, jit

    counter = {"launches": 0}

    def stub(self, *args, **kwargs):
        counter["launches"] += 1

    saved = jit.JITFunction.run, interpreter.InterpretedFunction.run
    jit.JITFunction.run = interpreter.InterpretedFunction.run = stub
    try:
        yield counter
    finally:
        jit.JITFunction.run, interpreter.InterpretedFunction.run = saved


def _microseconds(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1e6


def host_overhead(config: GPTConfig, repeat: int = 20) -> dict:
    """Host time, in µs on this CPU, of one call of each op and of one all-on micro-step (forward and
    backward, in fp32: autocast adds one cast per weight, ~150 aten calls), with every Triton launch
    stubbed out (counted, not run).

    The tensors are real CPU tensors of a tiny size (one sequence of 16 tokens, width 64, a 512-token
    vocabulary, the preset's depth): the host's work per op does not depend on sizes, and the aten ops'
    own CPU work stays in the noise. Not counted: Triton's launcher and CUDA's launch calls, which need
    a GPU (a few µs per launch; the launch count is given)."""
    import dataclasses

    small = dataclasses.replace(config, n_embd=64, n_head=4, vocab_size=512, block_size=16, dropout=0.0)
    results = {"config": small.to_dict(), "per_call_us": {}}
    # The stubbed kernels leave their outputs uninitialized; denormals there would make the aten
    # matmuls that read them take milliseconds. One thread: worker threads would not flush them.
    torch.set_flush_denormal(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with registry.assume_triton_runs(unit_loss_gradient=True), registry.use_kernels("all"), \
            _launches_stubbed() as launches:
        ops = registry.ops
        x, residual = torch.randn(1, 16, 64), torch.randn(1, 16, 64)
        weight, bias = torch.ones(64), torch.zeros(64)
        calls = {
            "aten add (for scale)": lambda: x + residual,
            "layernorm (+ residual)": lambda: ops.layernorm(x, weight, bias, 1e-5, residual=residual),
            "attention_qkv": lambda: ops.attention_qkv(torch.randn(1, 16, 192), 4),
            "gelu": lambda: ops.gelu(torch.randn(1, 16, 256), torch.zeros(256)),
            "linear_cross_entropy": lambda: ops.linear_cross_entropy(x.view(16, 64), torch.randn(512, 64),
                                                                     torch.zeros(16, dtype=torch.long)),
        }
        for name, call in calls.items():
            results["per_call_us"][name] = _microseconds(call, 200)
        torch.manual_seed(0)
        model = GPT(small)
        idx = torch.zeros((1, 16), dtype=torch.long)

        def micro_step():  # fp32: bf16 matmuls on a CPU cost milliseconds even this small
            loss = model(idx, idx, check_inputs=False, loss_scale=0.5)[1]
            loss.backward()

        micro_step()
        launches["launches"] = 0
        results["micro_step_us"] = _microseconds(micro_step, repeat)
        results["launches_per_micro_step"] = launches["launches"] // repeat
    torch.set_flush_denormal(False)  # the default
    torch.set_num_threads(threads)
    return results


# ---------------------------------------------------------------------------------------- output


def render_markdown(results: dict, top: int = 12) -> str:
    ideal = results["ideal"]
    c = results["ceilings"]
    lines = [
        f"# Step ledger: {results['batch_size']}x{results['seq_len']} tokens per micro-step, {results['dtype']} "
        f"autocast, {results['grad_accum']} micro-steps per optimizer step",
        "",
        f"Roofline ceilings: {c['name']}: {c['copy_gbps']:,.0f} GB/s copy, {c['matmul_tflops']:,.0f} TFLOP/s matmul. "
        "Times and tokens/s are **predictions** from counted bytes and FLOPs (an upper bound on speed), not measurements.",
        "",
        "| configuration | GB per micro-step | ideal GB | ratio | TFLOP | predicted ms per micro-step | "
        "optimizer GB | predicted tokens/s (upper bound) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["configs"]:
        step = row["micro_step"]
        lines.append(f"| {row['label']} | {step['bytes'] / GB:.2f} | {ideal['bytes'] / GB:.2f} | "
                     f"{row['ratio_to_ideal']:.2f} | {step['flops'] / 1e12:.2f} | {step['roofline_ms']:.2f} | "
                     f"{row['optimizer']['bytes'] / GB:.2f} | {row['predicted_tokens_per_s_upper_bound']:,.0f} |")
    host = results.get("host_overhead")
    if host:
        lines += ["", "## Host overhead (measured on this CPU, Triton launches stubbed)", "",
                  "| call | µs |", "| --- | ---: |"]
        lines += [f"| {name} | {us:.1f} |" for name, us in host["per_call_us"].items()]
        lines.append(f"| all-on micro-step ({host['launches_per_micro_step']} Triton launches not included) | "
                     f"{host['micro_step_us']:,.0f} |")
    for row in results["configs"]:
        lines += ["", f"## {row['label']} (`--kernels {row['kernels']}`): top ops by bytes", "",
                  "| op | calls | GB read | GB written | TFLOP | predicted ms |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for name, op in list(row["micro_step"]["by_name"].items())[:top]:
            lines.append(f"| {name} | {op['calls']} | {op['bytes_read'] / GB:.3f} | {op['bytes_written'] / GB:.3f} | "
                         f"{op['flops'] / 1e12:.2f} | {op['roofline_ms']:.3f} |")
        step = row["micro_step"]
        lines.append(f"| **total** ({step['ops']} ops) | | {step['bytes_read'] / GB:.3f} | "
                     f"{step['bytes_written'] / GB:.3f} | {step['flops'] / 1e12:.2f} | {step['roofline_ms']:.3f} |")
        lines.append(f"| *ideal* | | {ideal['bytes_read'] / GB:.3f} | {ideal['bytes_written'] / GB:.3f} | "
                     f"{ideal['flops'] / 1e12:.2f} | {ideal['roofline_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, directory: Path, top: int = 10) -> list[str]:
    """One stacked bar per configuration: the micro-step's bytes by op (the top ones, the rest as 'other'),
    beside the ideal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for row in results["configs"]:
        items = list(row["micro_step"]["by_name"].items())
        parts = [(name, (op["bytes_read"] + op["bytes_written"]) / GB) for name, op in items[:top]]
        parts.append(("other", sum(op["bytes_read"] + op["bytes_written"] for _, op in items[top:]) / GB))
        figure, axes = plt.subplots(figsize=(7, 6))
        bottom = 0.0
        for name, value in parts:
            axes.bar(["micro-step"], [value], bottom=bottom, label=f"{name} ({value:.2f} GB)")
            bottom += value
        axes.bar(["ideal"], [results["ideal"]["bytes"] / GB], color="lightgray", label="ideal")
        axes.set_ylabel("GB per micro-step")
        axes.set_title(f"{row['label']}: {row['micro_step']['bytes'] / GB:.1f} GB, "
                       f"{row['ratio_to_ideal']:.2f}x ideal")
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        figure.tight_layout()
        name = "ledger-" + re.sub(r"[^a-z0-9_]+", "-", row["label"].lower()) + ".png"  # a safe file name
        _atomic(directory / name, lambda path: figure.savefig(path, dpi=90))
        plt.close(figure)
        files.append(name)
    return files


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    temporary = path.with_name(path.name + ".tmp" + path.suffix)
    write(temporary)
    with open(temporary, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def write_outputs(results: dict, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(results, directory)
    from bench.report import jsonable

    _atomic(directory / "ledger.json",
            lambda path: path.write_text(json.dumps(jsonable(results), indent=1, allow_nan=False) + "\n"))
    _atomic(directory / "ledger.md", lambda path: path.write_text(render_markdown(results)))


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench ledger", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2", help="model preset (default gpt2, 124M)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-step (default 16)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default 1024)")
    p.add_argument("--grad-accum", type=int, default=32,
                   help="micro-steps per optimizer step (default 32: train_gpt2.py's 0.5M tokens at 16x1024 on one GPU)")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                   help="autocast dtype (float32: no autocast)")
    p.add_argument("--configs", default="all",
                   help="'all' (all off, all on, each op on alone) or a comma list of registry specs: none,all,layernorm")
    p.add_argument("--ceilings", type=Path, default=None,
                   help="a results.json or folder of runs whose ceilings to use (default: the latest GPU run "
                        "under bench/results, else H100 SXM datasheet figures)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder for ledger.json/.md/.png (default {DEFAULT_OUT})")
    p.add_argument("--host-overhead", action="store_true",
                   help="also time the host's work per op call and per all-on micro-step on this CPU (Triton launches "
                        "stubbed), beside the predicted GPU time")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from bench.report import RESULTS_DIR

    config = preset(args.preset)
    ceilings = find_ceilings(args.ceilings or RESULTS_DIR)
    results = run_ledger(config, args.batch_size, args.seq_len, args.grad_accum, getattr(torch, args.dtype),
                         configurations(args.configs), ceilings)
    if args.host_overhead:
        results["host_overhead"] = host_overhead(config)
    write_outputs(results, args.out)
    ideal = results["ideal"]["bytes"] / GB
    for row in results["configs"]:
        print(f"  {row['label']:28s} {row['micro_step']['bytes'] / GB:7.2f} GB/micro-step ({row['ratio_to_ideal']:.2f}x "
              f"ideal {ideal:.2f})  predicted {row['micro_step']['roofline_ms']:6.2f} ms, "
              f"{row['predicted_tokens_per_s_upper_bound']:>10,.0f} tokens/s at most")
    host = results.get("host_overhead")
    if host:
        calls = ", ".join(f"{name} {us:.0f} µs" for name, us in host["per_call_us"].items())
        print(f"host (this CPU, launches stubbed): {calls}; all-on micro-step {host['micro_step_us'] / 1e3:.1f} ms "
              f"with {host['launches_per_micro_step']} Triton launches")
    print(f"ledger: {len(results['configs'])} configurations in {results['seconds']:.1f} s; "
          f"ceilings: {ceilings['name']}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
