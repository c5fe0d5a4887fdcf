"""What every op promises, checked over one table: a row per registered op.

Each row says, for its op, how to call its custom ops (``opcheck``), a loss built on it that
torch.compile must trace as one graph (``compile_cases``), whether a tiny GPT must give the same
logits, loss and gradients with it on Triton as on the references (``model_parity``), the bad inputs
it must reject with one clear ValueError (``bad_inputs``), and what its quick benchmark rows hold.
An op's own test file keeps only what is particular to it (its numerics, layouts, edge cases, its
sm_90 build checks through ``hopper.compile_for_hopper``).

Adding an op is one ``Contract`` row here (``test_every_registered_op_has_a_row`` fails until it exists).
"""

from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend

from bench.common import BenchContext
from compare import assert_close
from conftest import DEVICE
import gpt_kernels
from gpt_kernels import registry
from gpt.config import GPTConfig
from model_parity import assert_model_parity

EPS = 1e-5
# A tiny llama for the llama ops' model parity: grouped-query heads, SwiGLU hidden width not a power of two.
LLAMA_TINY = GPTConfig(arch="llama", block_size=32, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                       mlp_hidden=48)


@dataclass
class CompileCase:
    """``loss(op_fn)(*inputs)`` is a scalar built on the op (``op_fn`` its Triton version or its
    reference); compiled with fullgraph it must be one graph calling ``custom_ops``, with the
    reference's gradients within ``dtype``'s tolerance times ``factor``."""

    loss: Callable[[Callable], Callable[..., torch.Tensor]]
    inputs: list[torch.Tensor]
    custom_ops: set[str]
    dtype: torch.dtype = torch.float32
    factor: float = 10.0


@dataclass
class Contract:
    """One op's row. Only ``op`` is required: an op with no Triton kernel yet (its reference alone) is
    ``Contract("<op>", model_parity=False)``, with no custom op to check, no compile case and no
    benchmark (``bench_baseline=None``)."""

    op: str
    bad_inputs: Callable[[], list[tuple[Callable[[], object], str]]] = list  # (call, a substring of its message)
    opcheck: Callable[[], list[tuple]] = list  # (torch.ops.gpt_triton.<name>.default, sample args) pairs
    compile_cases: Callable[[], list[CompileCase]] = list
    model_parity: bool = True  # the GPT model calls it (checked on Triton vs on every reference)
    bench_baseline: str | None = None  # an implementation every quick run of bench/bench_<op>.py times
    bench_passes: set[str] = field(default_factory=lambda: {"forward", "backward", "forward+backward"})
    bench_rate: str | None = None  # the column every bench row fills: gb_per_s or tflop_per_s
    parity_config: GPTConfig | None = None  # the tiny model of the parity check (default: model_parity's GPT-2)


def randn(*shape, dtype=torch.float32, device=DEVICE, scale=1.0, shift=0.0):
    return (torch.randn(shape, device=device) * scale + shift).to(dtype)


def targets_with_ignored(n_rows: int, n_classes: int) -> torch.Tensor:
    targets = torch.randint(0, n_classes, (n_rows,), device=DEVICE)
    targets[1] = -100
    return targets


# ----------------------------------------------------------------------------- layernorm


def _layernorm_opcheck():
    from gpt_kernels.layernorm import layernorm_forward

    ops = torch.ops.gpt_triton
    cases = []
    for residual_on, weight_on, bias_on in ((True, True, True), (True, True, False), (False, True, True),
                                            (False, False, False), (False, False, True)):
        x = randn(6, 40, scale=2.0, shift=0.5).requires_grad_()
        residual = randn(6, 40, scale=3.0, shift=-1.0).requires_grad_() if residual_on else None
        weight = randn(40, shift=1.0).requires_grad_() if weight_on else None
        bias = randn(40).requires_grad_() if bias_on else None
        dy, ds = randn(6, 40), randn(6, 40)
        detach = (lambda t: t.detach() if t is not None else None)
        if residual_on:
            cases.append((ops.layer_norm_residual.default, (x, residual, weight, bias, EPS)))
            _, stream, mean, rstd = layernorm_forward(x.detach(), detach(weight), detach(bias), EPS, residual.detach())
            backward = (dy, ds, stream, weight, bias, mean, rstd, torch.float16, torch.float32)
        else:
            cases.append((ops.layer_norm.default, (x, weight, bias, EPS)))
            _, _, mean, rstd = layernorm_forward(x.detach(), detach(weight), detach(bias), EPS)
            backward = (dy, None, x, weight, bias, mean, rstd, torch.float32, None)
        # The backward op has no autograd of its own (no double backward), so its inputs are detached.
        cases.append((ops.layer_norm_backward.default, tuple(detach(a) if isinstance(a, torch.Tensor) else a
                                                             for a in backward)))
    return cases


def _layernorm_compile():
    ramp = torch.linspace(-1, 1, 24, device=DEVICE)

    def loss(norm):
        def block_tail(x, residual, weight, bias):
            y, stream = norm(x, weight, bias, EPS, residual=residual)  # the pre-norm block's add-then-norm
            return y.square().sum() + (norm(stream, weight, bias, EPS) * ramp).sum()
        return block_tail

    return [CompileCase(loss, [randn(2, 5, 24), randn(2, 5, 24), randn(24, shift=1.0), randn(24)],
                        {"gpt_triton.layer_norm_residual", "gpt_triton.layer_norm"})]


def _layernorm_bad_inputs():
    from gpt_kernels.layernorm import layernorm, layernorm_backward, layernorm_forward

    x, w = randn(4, 8), randn(8)
    y, _, mean, rstd = layernorm_forward(x, w, w)
    return [
        (lambda: layernorm(x, randn(7), None), "weight must be 1-D with x's last dimension, i.e. shape (8,)"),
        (lambda: layernorm(x, w, randn(9)), "bias must be 1-D with x's last dimension"),
        (lambda: layernorm(x, randn(1, 8), None), "weight must be 1-D"),
        (lambda: layernorm(randn(4, 0), None, None), "last dimension (the one normalized) of 1 to"),
        (lambda: layernorm(randn(), None, None), "last dimension"),
        (lambda: layernorm(randn(2, 65537), None, None), "of 1 to 65536 elements"),
        (lambda: layernorm(x.double(), None, None), "x must be a float32, float16 or bfloat16 tensor, got torch.float64"),
        (lambda: layernorm(torch.ones(4, 8, dtype=torch.int32, device=DEVICE), None, None), "x must be a float32"),
        (lambda: layernorm(x, w.half(), None), "weight must be torch.float32 (the normalized stream's dtype"),
        (lambda: layernorm(x.half(), w.bfloat16(), None), "weight must be torch.float16 or torch.float32"),
        (lambda: layernorm(x, w, w.long()), "bias must be torch.float32"),
        (lambda: layernorm(x, randn(8, device="meta"), None), "weight is on meta but x is on"),
        (lambda: layernorm(x, w, randn(8, device="meta")), "same device"),
        (lambda: layernorm(x, [1.0] * 8, None), "weight must be a tensor or None"),
        (lambda: layernorm(x, w, w, residual=randn(4, 8, device="meta")), "residual is on meta"),
        (lambda: layernorm(x, w, w, residual=randn(8)), "residual must have x's shape (4, 8)"),
        (lambda: layernorm(x, w, w, residual=x.long()), "residual must be a float32, float16 or bfloat16 tensor"),
        (lambda: layernorm(x.half(), w.half(), None, residual=x), "weight must be torch.float32"),
        (lambda: layernorm(x, w, w, eps=-1.0), "eps must be a non-negative number"),
        (lambda: layernorm_backward(randn(4, 9), x, w, w, mean, rstd),
         "dy must be a float tensor shaped like the stream (4, 8)"),
        (lambda: layernorm_backward(y, x, w, w, mean, rstd, dstream=y[:2]), "dstream must be a float tensor"),
        (lambda: layernorm_backward(y, x, w, w, mean.double(), rstd),
         "mean must be a contiguous float32 tensor of shape (4,)"),
        (lambda: layernorm_backward(y, x, w, w, mean, rstd[:2]), "rstd must be"),
        (lambda: layernorm_backward(y, x, w, w, mean, rstd, x_dtype=torch.int8), "x_dtype must be float32"),
    ]


# ----------------------------------------------------------------------------- attention


def _attention_opcheck():
    from gpt_kernels.attention import attention_forward

    q, k, v = (randn(1, 2, 19, 16).requires_grad_() for _ in range(3))
    o, lse = attention_forward(q.detach(), k.detach(), v.detach(), True, 0.25)
    # The backward op has no autograd of its own (no double backward), so its inputs are detached.
    # Grouped-query: two query heads share one k/v head, and dk, dv come back with one head.
    k1, v1 = k[:, :1].detach().clone().requires_grad_(), v[:, :1].detach().clone().requires_grad_()
    o1, lse1 = attention_forward(q.detach(), k1.detach(), v1.detach(), False, 0.25)
    return [(torch.ops.gpt_triton.attention.default, (q, k, v, True, 0.25)),
            (torch.ops.gpt_triton.attention_backward.default,
             (torch.randn_like(q), q.detach(), k.detach(), v.detach(), o, lse, True, 0.25)),
            (torch.ops.gpt_triton.attention.default, (q, k1, v1, False, 0.25)),
            (torch.ops.gpt_triton.attention_backward.default,
             (torch.randn_like(q), q.detach(), k1.detach(), v1.detach(), o1, lse1, False, 0.25))]


def _attention_compile():
    def loss(attention):
        return lambda q, k, v: attention(q, k, v, causal=True).square().sum()

    return [CompileCase(loss, [randn(1, 2, 24, 16) for _ in range(3)], {"gpt_triton.attention"}, factor=1.0)]


def _attention_bad_inputs():
    from gpt_kernels.attention import attention, attention_backward, attention_forward

    return [
        (lambda: attention(randn(1, 2, 8, 16), randn(1, 2, 9, 16), randn(1, 2, 8, 16)), "same (B, H, T, D) shape"),
        (lambda: attention(randn(1, 4, 8, 16), randn(1, 3, 8, 16), randn(1, 3, 8, 16)),
         "k/v heads (3) must divide the query heads (4)"),
        (lambda: attention(randn(1, 4, 8, 16), randn(1, 2, 8, 16), randn(1, 1, 8, 16)),
         "got q (1, 4, 8, 16), k (1, 2, 8, 16), v (1, 1, 8, 16)"),
        (lambda: attention(*(randn(2, 8, 16),) * 3), "q must be a 4-D (B, H, T, D) tensor"),
        (lambda: attention(randn(1, 2, 8, 16), [0.0], randn(1, 2, 8, 16)), "k must be a 4-D"),
        (lambda: attention(*(randn(1, 1, 4, 257),) * 3), "D = 257 is not supported; head dims run from 1 to 256"),
        (lambda: attention(*(randn(1, 1, 4, 0),) * 3), "D = 0 is not supported"),
        (lambda: attention(randn(1, 2, 8, 16), randn(1, 2, 8, 16, dtype=torch.float16), randn(1, 2, 8, 16)),
         "share one dtype, got q torch.float32, k torch.float16"),
        (lambda: attention(*(randn(1, 2, 8, 16, dtype=torch.float64),) * 3), "float16, bfloat16 or float32"),
        (lambda: attention(randn(1, 2, 8, 16), randn(1, 2, 8, 16), randn(1, 2, 8, 16, device="meta")),
         "must be on one device"),
        (lambda: attention(*(randn(1, 2, 8, 16),) * 3, scale=float("nan")), "scale must be None"),
        (lambda: attention_forward(*(randn(1, 2, 8, 16),) * 3, out=randn(1, 2, 8, 16, dtype=torch.float16)),
         "out must be"),
        (lambda: attention_backward(randn(1, 2, 8, 8), *(randn(1, 2, 8, 16),) * 4, randn(1, 2, 8)),
         "dO (the output gradient) must be a torch.float32 tensor of shape (1, 2, 8, 16)"),
    ]


# ----------------------------------------------------------------------------- gelu


def _gelu_opcheck():
    cases = []
    for with_bias in (False, True):
        x = randn(6, 40).requires_grad_()
        bias = randn(40).requires_grad_() if with_bias else None
        cases.append((torch.ops.gpt_triton.gelu.default, (x, bias)))
        # The backward op has no autograd of its own (no double backward), so its inputs are detached.
        cases.append((torch.ops.gpt_triton.gelu_backward.default,
                      (randn(6, 40), x.detach(), bias.detach() if with_bias else None)))
    return cases


def _gelu_compile():
    def loss(gelu):  # GPT-2's MLP: the first linear without its bias, fused into the GELU
        return lambda x, weight, bias, proj: (gelu(F.linear(x, weight), bias) @ proj).square().sum()

    return [CompileCase(loss, [randn(2, 5, 16), randn(64, 16) / 4, randn(64), randn(64, 16) / 8], {"gpt_triton.gelu"})]


def _gelu_bad_inputs():
    from gpt_kernels.gelu import gelu, gelu_backward

    x = randn(4, 8)
    return [
        (lambda: gelu(x, randn(7)), "bias must be 1-D with x's last dimension"),
        (lambda: gelu(x, randn(1, 8)), "bias must be 1-D"),
        (lambda: gelu(randn(), randn(1)), "bias must be 1-D"),
        (lambda: gelu(x.double()), "x must be a float32, float16 or bfloat16 tensor, got torch.float64"),
        (lambda: gelu(torch.ones(4, 8, dtype=torch.int32, device=DEVICE)), "x must be a float32"),
        (lambda: gelu(x, torch.ones(8, dtype=torch.int64, device=DEVICE)), "bias must be a float32"),
        (lambda: gelu(x, randn(8, device="meta")), "same device"),
        (lambda: gelu(x, [0.0] * 8), "bias must be a float32, float16 or bfloat16 tensor or None, got list"),
        (lambda: gelu_backward(randn(4, 9), x), "dy must be a float tensor shaped like x"),
    ]


# ----------------------------------------------------------------------------- cross_entropy


def _cross_entropy_opcheck():
    x, targets = randn(6, 37, scale=4.0).requires_grad_(), targets_with_ignored(6, 37)
    op = torch.ops.gpt_triton.cross_entropy.default
    return [(op, (x, targets, -100, reduction, 0.1, 1e-3, 4.0, True)) for reduction in ("mean", "none")] + [
        (op, (x.detach(), targets, -100, reduction, 0.0, 0.0, None, False)) for reduction in ("mean", "none")]


def _cross_entropy_compile():
    targets = targets_with_ignored(6, 300)

    def loss(cross_entropy):
        return lambda x: cross_entropy(x * 2, targets, reduction="none", label_smoothing=0.1).square().sum()

    return [CompileCase(loss, [randn(6, 300, scale=4.0)], {"gpt_triton.cross_entropy"})]


def _cross_entropy_bad_inputs():
    from gpt_kernels.cross_entropy import cross_entropy, cross_entropy_forward, cross_entropy_reference

    logits, targets = randn(4, 10), torch.tensor([0, 9, -100, 3], device=DEVICE)
    return [
        (lambda: cross_entropy(logits, torch.tensor([0, 10, 1, 2], device=DEVICE)),
         "target 10 is outside [0, 10) and is not ignore_index (-100)"),
        (lambda: cross_entropy(logits, torch.tensor([0, -1, 1, 2], device=DEVICE)), "target -1 is outside [0, 10)"),
        (lambda: cross_entropy_reference(logits, torch.tensor([0, 10, 1, 2], device=DEVICE)), "target 10 is outside"),
        (lambda: cross_entropy(logits, targets[:3]), "targets must have shape (4,)"),
        (lambda: cross_entropy(logits, targets.view(2, 2)), "targets must have shape (4,)"),
        (lambda: cross_entropy(logits.view(2, 2, 10), targets), "logits must be a 2-D (N, V) tensor"),
        (lambda: cross_entropy(logits.double(), targets), "logits must be float32, float16 or bfloat16, got torch.float64"),
        (lambda: cross_entropy(logits, targets.float()), "targets must be an int64 or int32 tensor"),
        (lambda: cross_entropy(logits, targets.to("meta")), "targets are on meta"),
        (lambda: cross_entropy(randn(4, 0), targets), "at least one class"),
        (lambda: cross_entropy(logits, targets, reduction="avg"), "reduction must be one of 'mean', 'sum', 'none'"),
        (lambda: cross_entropy(logits, targets, label_smoothing=1.5), "label_smoothing must be a float in [0, 1]"),
        (lambda: cross_entropy(logits, targets, lse_square_scale=-1.0), "lse_square_scale (the z-loss weight)"),
        (lambda: cross_entropy(logits, targets, softcap=0.0), "softcap must be None or a finite float > 0"),
        (lambda: cross_entropy(logits, targets, ignore_index=1.5), "ignore_index must be an int"),
        (lambda: cross_entropy_forward(logits, targets, grad_scale=torch.ones(1, device=DEVICE), grad=randn(4, 11)),
         "grad must be a float tensor of shape (4, 10)"),
        (lambda: cross_entropy_forward(logits, targets, loss_rows=torch.empty(5, device=DEVICE)),
         "loss_rows must be a contiguous torch.float32 tensor of shape (4,)"),
    ]


# ----------------------------------------------------------------------------- linear_cross_entropy


def _linear_cross_entropy_opcheck():
    h, w = randn(6, 8).requires_grad_(), (randn(37, 8) / 8**0.5 * 3).requires_grad_()
    targets = targets_with_ignored(6, 37)
    op = torch.ops.gpt_triton.linear_cross_entropy.default
    cases = [(op, (h, w, targets, -100, reduction, 0.1, 1e-3, 4.0, torch.float32, True, True, 4))
             for reduction in ("mean", "none")]
    cases.append((op, (h.detach(), w, targets, -100, "sum", 0.0, 0.0, None, torch.float32, False, True, 0)))
    cases.append((torch.ops.gpt_triton.linear_cross_entropy_backward.default,
                   (torch.rand(6, device=DEVICE), h.detach(), w.detach(), targets, -100, 0.0, 0.0, None, torch.float32,
                    True, True, 4)))
    return cases


def _linear_cross_entropy_compile():
    targets = targets_with_ignored(6, 200)

    def case(reduction):
        def loss(linear_cross_entropy):
            def f(h, w):  # autocast is read inside the graph
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    return (linear_cross_entropy(h * 2, w, targets, reduction=reduction) * 3).sum()
            return f
        return CompileCase(loss, [randn(6, 16), randn(200, 16) / 4 * 3], {"gpt_triton.linear_cross_entropy"},
                           dtype=torch.bfloat16, factor=1.0)

    return [case("mean"), case("none")]


def _linear_cross_entropy_bad_inputs():
    from gpt_kernels.linear_cross_entropy import linear_cross_entropy

    hidden, weight, targets = randn(4, 8), randn(10, 8), torch.tensor([0, 9, -100, 3], device=DEVICE)
    return [
        (lambda: linear_cross_entropy(hidden, weight, torch.tensor([0, 10, 1, 2], device=DEVICE)),
         "target 10 is outside [0, 10) and is not ignore_index (-100)"),
        (lambda: linear_cross_entropy(hidden, weight[:, :7], targets), "hidden (N, C) and weight (V, C) must share C"),
        (lambda: linear_cross_entropy(hidden, weight, targets[:3]), "targets must have shape (4,)"),
        (lambda: linear_cross_entropy(hidden[0], weight, targets),
         "hidden must be a 2-D (N, C) float32, float16 or bfloat16 tensor"),
        (lambda: linear_cross_entropy(hidden, weight.half(), targets), "must have one dtype outside autocast"),
        (lambda: linear_cross_entropy(hidden.double(), weight.double(), targets),
         "hidden must be a 2-D (N, C) float32, float16"),
        (lambda: linear_cross_entropy(hidden, weight.to("meta"), targets), "weight is on meta"),
        (lambda: linear_cross_entropy(hidden, weight, targets.float()), "targets must be an int64 or int32 tensor"),
        (lambda: linear_cross_entropy(hidden, weight[:0], targets), "at least one class"),
        (lambda: linear_cross_entropy(hidden, weight, targets, reduction="avg"), "reduction must be one of"),
        (lambda: linear_cross_entropy(hidden, weight, targets, chunk_size=0), "chunk_size must be None"),
        (lambda: linear_cross_entropy(hidden, weight, targets, softcap=-1.0), "softcap must be None or a finite float > 0"),
    ]


# ----------------------------------------------------------------------------- adamw


def _adamw_bad_inputs():
    from gpt_kernels.adamw import AdamW

    params = [torch.nn.Parameter(randn(4)), torch.nn.Parameter(randn(3))]
    sparse = torch.nn.Parameter(randn(5, 3))
    sparse.grad = randn(5, 3).to_sparse()
    return [
        (lambda: AdamW(params, lr=-1.0), "invalid learning rate"),
        (lambda: AdamW(params, betas=(1.0, 0.9)), "invalid beta parameter at index 0"),
        (lambda: AdamW(params, eps=0.0), "invalid epsilon value"),
        (lambda: AdamW(params, weight_decay=-0.1), "invalid weight_decay value"),
        (lambda: AdamW([torch.nn.Parameter(randn(3, dtype=torch.float64))]), "float32, bfloat16 or float16"),
        (lambda: AdamW([torch.nn.Parameter(randn(4, 6).t())]), "contiguous"),
        (lambda: AdamW([]), "empty parameter list"),
        (lambda: AdamW([sparse]).step(), "sparse gradients"),
    ]


# ----------------------------------------------------------------------------- decode_attention


def _decode_inputs():
    q, k, v = randn(2, 2, 1, 16), randn(2, 2, 24, 16), randn(2, 2, 24, 16)
    return q, k, v, torch.tensor([24, 9], device=DEVICE)


def _decode_attention_opcheck():
    q, k, v, lengths = _decode_inputs()
    return [(torch.ops.gpt_triton.decode_attention.default,
             (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), lengths, 0.25))]


def _decode_attention_bad_inputs():
    from gpt_kernels.decode_attention import decode_attention, decode_attention_forward

    q, k, v, lengths = _decode_inputs()
    return [
        (lambda: decode_attention(q.squeeze(2), k, v, lengths), "(B, H, 1, D)"),
        (lambda: decode_attention(q, k[:1], v, lengths), "matching q"),
        (lambda: decode_attention(q, k, v[:, :, :4], lengths), "differ"),
        (lambda: decode_attention(q, k[:, :1], v, lengths), "differ"),
        (lambda: decode_attention(randn(2, 3, 1, 16), k, v, lengths), "cache heads (2) must divide the query heads (3)"),
        (lambda: decode_attention(q, k.half(), v, lengths), "one dtype"),
        (lambda: decode_attention(q.double(), k.double(), v.double(), lengths), "float16, bfloat16 or float32"),
        (lambda: decode_attention(q, k, v, lengths.float()), "int32/int64"),
        (lambda: decode_attention(q, k, v, lengths[:1]), "(2,)"),
        (lambda: decode_attention(q, k[:, :, :0], v[:, :, :0], lengths), "T = 0"),
        (lambda: decode_attention(q, k, v, lengths, scale=float("inf")), "scale must be None"),
        (lambda: decode_attention_forward(q, k, v, lengths, num_splits=0), "num_splits"),
    ]


# ----------------------------------------------------------------------------- rmsnorm


def _rmsnorm_opcheck():
    from gpt_kernels.rmsnorm import rmsnorm_forward

    ops = torch.ops.gpt_triton
    cases = []
    for residual_on, weight_on in ((True, True), (False, False)):
        x = randn(6, 40, scale=2.0, shift=0.5).requires_grad_()
        residual = randn(6, 40, scale=3.0, shift=-1.0).requires_grad_() if residual_on else None
        weight = randn(40, shift=1.0).requires_grad_() if weight_on else None
        dy, ds = randn(6, 40), randn(6, 40)
        plain_weight = weight.detach() if weight_on else None
        if residual_on:
            cases.append((ops.rms_norm_residual.default, (x, residual, weight, EPS)))
            _, stream, rstd = rmsnorm_forward(x.detach(), plain_weight, EPS, residual.detach())
            backward = (dy, ds, stream, plain_weight, rstd, torch.float16, torch.float32)
        else:
            cases.append((ops.rms_norm.default, (x, weight, EPS)))
            _, _, rstd = rmsnorm_forward(x.detach(), plain_weight, EPS)
            backward = (dy, None, x.detach(), plain_weight, rstd, torch.float32, None)
        cases.append((ops.rms_norm_backward.default, backward))  # detached: no double backward
    return cases


def _rmsnorm_compile():
    ramp = torch.linspace(-1, 1, 24, device=DEVICE)

    def loss(norm):
        def block_tail(x, residual, weight):
            y, stream = norm(x, weight, EPS, residual=residual)  # the pre-norm block's add-then-norm
            return y.square().sum() + (norm(stream, weight, EPS) * ramp).sum()
        return block_tail

    return [CompileCase(loss, [randn(2, 5, 24), randn(2, 5, 24), randn(24, shift=1.0)],
                        {"gpt_triton.rms_norm_residual", "gpt_triton.rms_norm"})]


def _rmsnorm_bad_inputs():
    from gpt_kernels.rmsnorm import rmsnorm, rmsnorm_backward, rmsnorm_forward

    x, w = randn(4, 8), randn(8)
    y, _, rstd = rmsnorm_forward(x, w)
    return [
        (lambda: rmsnorm(x, randn(7)), "weight must be 1-D with x's last dimension, i.e. shape (8,)"),
        (lambda: rmsnorm(randn(4, 0), None), "last dimension (the one normalized) of 1 to"),
        (lambda: rmsnorm(x.double(), None), "x must be a float32, float16 or bfloat16 tensor, got torch.float64"),
        (lambda: rmsnorm(x.half(), w.bfloat16()), "weight must be torch.float16 or torch.float32"),
        (lambda: rmsnorm(x, [1.0] * 8), "weight must be a tensor or None"),
        (lambda: rmsnorm(x, randn(8, device="meta")), "weight is on meta but x is on"),
        (lambda: rmsnorm(x, w, residual=randn(8)), "residual must have x's shape (4, 8)"),
        (lambda: rmsnorm(x, w, residual=x.long()), "residual must be a float32, float16 or bfloat16 tensor"),
        (lambda: rmsnorm(x, w, eps=-1.0), "eps must be a non-negative number"),
        (lambda: rmsnorm_backward(randn(4, 9), x, w, rstd), "dy must be a float tensor shaped like the stream (4, 8)"),
        (lambda: rmsnorm_backward(y, x, w, rstd[:2]), "rstd must be a contiguous float32 tensor of shape (4,)"),
    ]


# ----------------------------------------------------------------------------- rope


def _rope_inputs(T=3):
    from gpt_kernels.rope import rope_table

    qkv = randn(2, T, (4 + 2 * 2) * 8)
    q, k, _ = qkv.split([32, 16, 16], dim=2)  # strided views, as the model has them
    cos, sin = rope_table(16, 8, 500.0, DEVICE)
    return q.view(2, T, 4, 8), k.view(2, T, 2, 8), cos, sin, torch.arange(3, 3 + T, device=DEVICE)


def _rope_opcheck():
    q, k, cos, sin, positions = _rope_inputs()
    ops = torch.ops.gpt_triton
    return [(ops.rope.default, (q.clone().requires_grad_(), k.clone().requires_grad_(), cos, sin, positions)),
            (ops.rope.default, (q.contiguous(), k.contiguous(), cos, sin, positions.expand(2, -1).contiguous())),
            (ops.rope_backward.default, (randn(*q.shape), randn(*k.shape), cos, sin, positions))]


def _rope_compile():
    q, k, cos, sin, positions = _rope_inputs()

    def loss(rope):  # the rotated q and k meet in attention scores
        def scores(q, k):
            q_rot, k_rot = rope(q, k, cos, sin, positions)
            return (q_rot[:, :, ::2] @ k_rot.transpose(-1, -2)).square().sum()
        return scores

    return [CompileCase(loss, [q.contiguous(), k.contiguous()], {"gpt_triton.rope"})]


def _rope_bad_inputs():
    from gpt_kernels.rope import rope

    q, k, cos, sin, positions = _rope_inputs()
    return [
        (lambda: rope(q[..., :7], k[..., :7], cos, sin, positions), "q must be a (B, T, H, D) tensor with D even"),
        (lambda: rope(q, k[:, :2], cos, sin, positions), "must share B, T and D"),
        (lambda: rope(q.double(), k.double(), cos, sin, positions), "q must be a float32, float16 or bfloat16"),
        (lambda: rope(q, k, cos[:, :3], sin[:, :3], positions), "cos and sin must be (L, D/2 = 4) tables"),
        (lambda: rope(q, k, cos.half(), sin.half(), positions), "cos must be a float32 (L, 4) table from rope_table"),
        (lambda: rope(q, k, cos, sin, positions.float()), "positions must be (3,) or (2, 3) int64/int32"),
        (lambda: rope(q, k, cos, sin, positions[:2]), "positions must be (3,) or (2, 3)"),
        (lambda: rope(q, k, cos, sin, positions.to("meta")), "positions is on meta but q is on"),
    ]


# ----------------------------------------------------------------------------- swiglu


def _swiglu_opcheck():
    gate_up = randn(6, 2 * 20, scale=3.0)
    return [(torch.ops.gpt_triton.swiglu.default, (gate_up.clone().requires_grad_(),)),
            (torch.ops.gpt_triton.swiglu.default, (gate_up[:, :-2].T.contiguous().T,)),
            (torch.ops.gpt_triton.swiglu_backward.default, (randn(6, 20), gate_up))]


def _swiglu_compile():
    def loss(swiglu):  # the Llama MLP: one fused gate/up linear, the activation, the down projection
        return lambda x, weight, proj: (swiglu(F.linear(x, weight)) @ proj).square().sum()

    return [CompileCase(loss, [randn(2, 5, 16), randn(2 * 24, 16) / 4, randn(24, 16) / 8], {"gpt_triton.swiglu"})]


def _swiglu_bad_inputs():
    from gpt_kernels.swiglu import swiglu, swiglu_backward

    gate_up = randn(4, 10)
    return [
        (lambda: swiglu(randn(4, 9)), "the last dimension holds [gate | up] and must be even, got (4, 9)"),
        (lambda: swiglu(randn()), "must be even, got ()"),
        (lambda: swiglu(gate_up.double()), "gate_up must be a float32, float16 or bfloat16 tensor, got torch.float64"),
        (lambda: swiglu([0.0] * 4), "gate_up must be a float32, float16 or bfloat16 tensor, got list"),
        (lambda: swiglu_backward(randn(4, 10), gate_up), "dy must be a float tensor of shape (4, 5)"),
    ]


# ----------------------------------------------------------------------------- the table

LOSS_PASSES = {"forward", "forward+backward"}  # a loss is timed forward, and forward with backward
CONTRACTS = [
    Contract("layernorm", _layernorm_bad_inputs, _layernorm_opcheck, _layernorm_compile,
             bench_baseline="eager", bench_rate="gb_per_s"),
    Contract("attention", _attention_bad_inputs, _attention_opcheck, _attention_compile,
             bench_baseline="sdpa", bench_rate="tflop_per_s"),
    Contract("gelu", _gelu_bad_inputs, _gelu_opcheck, _gelu_compile, bench_baseline="eager", bench_rate="gb_per_s"),
    Contract("cross_entropy", _cross_entropy_bad_inputs, _cross_entropy_opcheck, _cross_entropy_compile,
             bench_baseline="eager", bench_passes=LOSS_PASSES, bench_rate="gb_per_s"),
    Contract("linear_cross_entropy", _linear_cross_entropy_bad_inputs, _linear_cross_entropy_opcheck,
             _linear_cross_entropy_compile, bench_baseline="eager", bench_passes=LOSS_PASSES, bench_rate="tflop_per_s"),
    # The optimizer has no custom op and no graph of its own: test_adamw checks its steps against torch's.
    Contract("adamw", _adamw_bad_inputs, model_parity=False, bench_baseline="torch fused",
             bench_passes={"step", "clip+step"}, bench_rate="gb_per_s"),
    # Generation only (test_generate checks the model's decoding with it); the backward is plain PyTorch.
    Contract("decode_attention", _decode_attention_bad_inputs, _decode_attention_opcheck, model_parity=False,
             bench_baseline="sdpa", bench_passes={"forward", "generate"}),
    # The llama ops: their model parity runs on a tiny llama (LLAMA_TINY) instead of GPT-2's.
    Contract("rmsnorm", _rmsnorm_bad_inputs, _rmsnorm_opcheck, _rmsnorm_compile, bench_baseline="eager",
             bench_rate="gb_per_s", parity_config=LLAMA_TINY),
    Contract("rope", _rope_bad_inputs, _rope_opcheck, _rope_compile, bench_baseline="eager", bench_rate="gb_per_s",
             parity_config=LLAMA_TINY),
    Contract("swiglu", _swiglu_bad_inputs, _swiglu_opcheck, _swiglu_compile, bench_baseline="eager",
             bench_rate="gb_per_s", parity_config=LLAMA_TINY),
]


def contracts(where: Callable[[Contract], bool] = lambda contract: True):
    return [pytest.param(contract, id=contract.op) for contract in CONTRACTS if where(contract)]


def test_every_registered_op_has_a_row():
    assert [contract.op for contract in CONTRACTS] == list(registry.OPS)


@pytest.mark.parametrize("contract", contracts(lambda c: c.opcheck is not list))
def test_opcheck(contract):
    for custom_op, args in contract.opcheck():
        torch.library.opcheck(custom_op, args)


@pytest.mark.parametrize("contract", contracts(lambda c: c.compile_cases is not list))
def test_torch_compile_fullgraph(contract):
    """One graph holding the op (its fake and autograd registrations work), gradients as the
    reference's. The CPU uses aot_eager (what matters for the op, in about a second, where inductor
    spends many seconds compiling C++ on a 2-core machine); the GPU compiles with inductor."""
    op_fn, reference = getattr(gpt_kernels, contract.op), getattr(gpt_kernels, f"{contract.op}_reference")
    for case in contract.compile_cases():
        counter = CompileCounterWithBackend("inductor" if DEVICE == "cuda" else "aot_eager")
        torch._dynamo.reset()
        leaves = [t.clone().requires_grad_() for t in case.inputs]
        torch.compile(case.loss(op_fn), fullgraph=True, backend=counter)(*leaves).backward()
        called = {str(node.target) for node in counter.graphs[0].graph.nodes if node.op == "call_function"}
        assert counter.frame_count == 1 and case.custom_ops <= called, called
        reference_leaves = [t.clone().requires_grad_() for t in case.inputs]
        case.loss(reference)(*reference_leaves).backward()
        for i, (leaf, reference_leaf) in enumerate(zip(leaves, reference_leaves)):
            assert_close(leaf.grad, reference_leaf.grad, case.dtype, f"compiled grad {i}", case.factor)


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("contract", contracts(lambda c: c.model_parity))
def test_gpt_model_parity(contract):
    if contract.parity_config is None:
        assert_model_parity(contract.op)
    else:
        assert_model_parity(contract.op, contract.parity_config)


@pytest.mark.parametrize("contract", contracts())
def test_bad_inputs_raise_one_value_error(contract):
    for call, message in contract.bad_inputs():
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


@pytest.mark.parametrize("contract", contracts(lambda c: c.bench_baseline is not None))
def test_bench_quick_rows(contract):
    rows = importlib.import_module(f"bench.bench_{contract.op}").run(BenchContext(device="cpu", quick=True))
    impls = {row["impl"] for row in rows}
    assert contract.bench_baseline in impls and ("triton" in impls) == registry.triton_runs_on("cpu"), impls
    assert {row["pass"] for row in rows} == contract.bench_passes
    for row in rows:
        assert row["op"] == contract.op and row["median_ms"] > 0, row
        if contract.bench_rate:
            assert row[contract.bench_rate] > 0 and math.isfinite(row[contract.bench_rate]), row
