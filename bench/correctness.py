"""Native correctness of every op at GPT-2 124M's shapes: the GPU check's most valuable rows.

Each check runs one op in one dtype, forward and backward, with every buffer the op allocates
NaN-poisoned first (``fresh_buffers_poisoned``: an element a kernel forgets to write fails), then
runs the op's ``<op>_reference`` on the same values in float64, and compares every output and every
gradient by relative error (``gpt_kernels.tolerances``: the tolerances the tests use). One row per
compared tensor: its error, its tolerance, and whether it passed.

Shapes are GPT-2 124M's (B·T = 8·1024 rows, width 768, 12 heads of 64, MLP 3072, vocabulary 50257;
attention also at head dim 128), in bf16 and fp32. ``--quick`` runs the same checks at toy sizes in
fp32 (Triton's interpreter cannot run bf16 matmuls) to test the plumbing.

:func:`run_kernel` is the checks' kernel half alone: the GPU check's precompile step runs it in a
process pool, so every Triton variant the checks need is compiled before they are timed.
"""

from __future__ import annotations

import importlib
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch

from gpt_kernels import (
    adamw,
    adamw_reference,
    attention,
    attention_reference,
    cross_entropy,
    cross_entropy_reference,
    decode_attention,
    decode_attention_reference,
    gelu,
    gelu_reference,
    layernorm,
    layernorm_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from gpt_kernels.layernorm import stream_dtype
from gpt_kernels.tolerances import (
    ADAMW_STEP_RTOL,
    DECODE_GRAD_FACTOR,
    LONG_SUM_FACTOR,
    LOSS_FACTOR,
    RTOL,
    fresh_buffers_poisoned,
    relative_error,
)

# The module, for the fused loss's variant switch (gpt_kernels exports the op under the same name).
lce_module = importlib.import_module("gpt_kernels.linear_cross_entropy")


@dataclass(frozen=True)
class Shapes:
    batch: int
    seq_len: int
    width: int
    heads: int
    mlp: int
    vocab: int


GPT2 = Shapes(batch=8, seq_len=1024, width=768, heads=12, mlp=3072, vocab=50257)
QUICK = Shapes(batch=1, seq_len=32, width=64, heads=2, mlp=128, vocab=300)


@dataclass(frozen=True)
class Check:
    """One op in one dtype (and, for attention, one head dim)."""

    op: str
    dtype: torch.dtype
    head_dim: int | None = None

    @property
    def name(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return f"{self.op} {dtype}" + (f" D{self.head_dim}" if self.head_dim else "")


def checks(quick: bool) -> list[Check]:
    """Every check, in the registry's op order: each op in bf16 and fp32, attention at D 64 and 128."""
    dtypes = [torch.float32] if quick else [torch.bfloat16, torch.float32]
    head_dims = [16, 32] if quick else [64, 128]
    out = []
    for op in ("layernorm", "attention", "gelu", "cross_entropy", "linear_cross_entropy", "adamw", "decode_attention"):
        for dtype in dtypes:
            for head_dim in head_dims if op == "attention" else [None]:
                out.append(Check(op, dtype, head_dim))
    return out


def find_check(name: str, quick: bool) -> Check:
    for check in checks(quick):
        if check.name == name:
            return check
    raise ValueError(f"unknown correctness check {name!r}")


# ------------------------------------------------------------------------------- each op's check
# Each builder returns (inputs, kernel, reference, tolerances): ``kernel(inputs)`` and
# ``reference(inputs64)`` return {name: tensor} of outputs and gradients; ``tolerances`` maps each
# name to (dtype whose RTOL applies, factor).


def _randn(*shape, device, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, device=device) * scale + shift).to(dtype)


def _grads(leaves: dict, names) -> dict:
    return {f"d{name}": leaves[name].grad for name in names}


def _leaves(inputs: dict, names, double: bool = False) -> dict:
    """Fresh leaves (float64 copies with ``double``) that require grad, beside the other inputs."""
    out = dict(inputs)
    for name in names:
        t = inputs[name].detach()
        out[name] = (t.double() if double else t.clone()).requires_grad_()
    return out


def _layernorm(s: Shapes, dtype, device, _):
    n, c = s.batch * s.seq_len, s.width
    inputs = dict(x=_randn(n, c, device=device, dtype=dtype, scale=2.0, shift=0.5),
                  residual=_randn(n, c, device=device, dtype=dtype, scale=3.0, shift=-1.0),
                  weight=_randn(c, device=device, dtype=dtype, shift=1.0),
                  bias=_randn(c, device=device, dtype=dtype, scale=0.5))
    inputs["dy"] = _randn(n, c, device=device, dtype=dtype)
    inputs["ds"] = _randn(n, c, device=device, dtype=dtype, scale=0.5)
    names = ("x", "residual", "weight", "bias")

    def kernel(t):
        t = _leaves(t, names)
        y, stream = layernorm(t["x"], t["weight"], t["bias"], residual=t["residual"])
        torch.autograd.backward([y, stream], [t["dy"], t["ds"]])
        return {"y": y, "stream": stream, **_grads(t, names)}

    def reference(t):
        t = _leaves(t, names, double=True)
        # The op stores the stream in its dtype before normalizing it: so does the reference.
        stream = (t["x"] + t["residual"]).to(stream_dtype(inputs["x"], inputs["residual"])).double()
        y = layernorm_reference(stream, t["weight"], t["bias"])
        torch.autograd.backward([y, stream], [t["dy"].double(), t["ds"].double()])
        return {"y": y, "stream": stream, **_grads(t, names)}

    return inputs, kernel, reference, {}


def _attention(s: Shapes, dtype, device, head_dim):
    heads = s.width // head_dim
    shape = (s.batch, heads, s.seq_len, head_dim)
    inputs = {name: _randn(*shape, device=device, dtype=dtype) for name in ("q", "k", "v", "do")}
    names = ("q", "k", "v")

    def kernel(t):
        t = _leaves(t, names)
        o = attention(t["q"], t["k"], t["v"], causal=True)
        o.backward(t["do"])
        return {"o": o, **_grads(t, names)}

    def reference(t):
        t = _leaves(t, names, double=True)
        o = attention_reference(t["q"], t["k"], t["v"], causal=True)
        o.backward(t["do"].double())
        return {"o": o, **_grads(t, names)}

    return inputs, kernel, reference, {}


def _gelu(s: Shapes, dtype, device, _):
    n = s.batch * s.seq_len
    inputs = dict(x=_randn(n, s.mlp, device=device, dtype=dtype, scale=2.0), bias=_randn(s.mlp, device=device,
                                                                                          dtype=dtype, scale=0.5),
                  dy=_randn(n, s.mlp, device=device, dtype=dtype))
    names = ("x", "bias")

    def kernel(t):
        t = _leaves(t, names)
        y = gelu(t["x"], t["bias"])
        y.backward(t["dy"])
        return {"y": y, **_grads(t, names)}

    def reference(t):
        t = _leaves(t, names, double=True)
        y = gelu_reference(t["x"], t["bias"])
        y.backward(t["dy"].double())
        return {"y": y, **_grads(t, names)}

    return inputs, kernel, reference, {}


def _targets(n: int, classes: int, device) -> torch.Tensor:
    """Class indices with a few rows ignored (-100), as padding makes them."""
    targets = torch.randint(0, classes, (n,), device=device)
    targets[torch.randperm(n, device=device)[: max(1, n // 64)]] = -100
    return targets


def _cross_entropy(s: Shapes, dtype, device, _):
    n = s.batch * s.seq_len
    inputs = dict(logits=_randn(n, s.vocab, device=device, dtype=dtype, scale=4.0),
                  targets=_targets(n, s.vocab, device))

    def kernel(t):
        t = _leaves(t, ("logits",))
        loss = cross_entropy(t["logits"], t["targets"])
        loss.backward()
        return {"loss": loss, "dlogits": t["logits"].grad}

    def reference(t):
        t = _leaves(t, ("logits",), double=True)
        loss = cross_entropy_reference(t["logits"], t["targets"])
        loss.backward()
        return {"loss": loss, "dlogits": t["logits"].grad}

    # The loss is fp32 math on the logits as given, whatever their dtype.
    return inputs, kernel, reference, {"loss": (torch.float32, LOSS_FACTOR)}


def _linear_cross_entropy(s: Shapes, dtype, device, _):
    n = s.batch * s.seq_len
    inputs = dict(hidden=_randn(n, s.width, device=device, dtype=dtype),
                  weight=_randn(s.vocab, s.width, device=device, dtype=dtype, scale=3.0 / math.sqrt(s.width)),
                  targets=_targets(n, s.vocab, device))
    names = ("hidden", "weight")
    # Both variants (the logits stored once; recomputed with atomics), the second's rows suffixed.
    suffixes = {variant: "" if variant == "stored" else f" ({variant})" for variant in lce_module.VARIANTS}

    def kernel(t):
        out = {}
        for variant, suffix in suffixes.items():
            with lce_module.use_variant(variant):
                leaves = _leaves(t, names)
                loss = linear_cross_entropy(leaves["hidden"], leaves["weight"], leaves["targets"])
                loss.backward()
            out.update({f"{name}{suffix}": value for name, value in {"loss": loss, **_grads(leaves, names)}.items()})
        return out

    def reference(t):
        t = _leaves(t, names, double=True)
        loss = linear_cross_entropy_reference(t["hidden"], t["weight"], t["targets"])
        loss.backward()
        expected = {"loss": loss, **_grads(t, names)}
        return {f"{name}{suffix}": value for suffix in suffixes.values() for name, value in expected.items()}

    tolerances = {"loss": (dtype, LOSS_FACTOR), "dhidden": (dtype, LONG_SUM_FACTOR), "dweight": (dtype, LONG_SUM_FACTOR)}
    return inputs, kernel, reference, {f"{name}{suffix}": tolerance for suffix in suffixes.values()
                                       for name, tolerance in tolerances.items()}


def _adamw(s: Shapes, dtype, device, _):
    # GPT-2's two largest tensors (c_attn's weight, the padded embedding) and a bias.
    shapes = [(s.width, 3 * s.width), (s.vocab + (-s.vocab) % 64, s.width), (s.width,)]
    inputs = {}
    for i, shape in enumerate(shapes):
        inputs[f"p{i}"] = _randn(*shape, device=device, dtype=dtype, scale=0.5)
        inputs[f"g{i}"] = _randn(*shape, device=device, dtype=dtype, scale=0.1 + i)

    def step(t, optimizer_class, double=False, **options):
        cast = (lambda x: x.double()) if double else (lambda x: x.clone())
        params = [torch.nn.Parameter(cast(t[f"p{i}"].detach())) for i in range(len(shapes))]
        for i, p in enumerate(params):
            p.grad = cast(t[f"g{i}"].detach())
        optimizer = optimizer_class(params, lr=6e-4, weight_decay=0.1, **options)
        norm = optimizer.clip_grad_norm_(1.0)
        optimizer.step()
        out = {"grad norm": torch.as_tensor(norm).reshape(1)}
        for i, p in enumerate(params):
            out[f"p{i}"] = p.detach()
            out[f"exp_avg{i}"] = optimizer.state[p]["exp_avg"]
            out[f"exp_avg_sq{i}"] = optimizer.state[p]["exp_avg_sq"]
        return out

    def kernel(t):
        return step(t, adamw)

    def reference(t):
        return step(t, adamw_reference, double=True, foreach=False, fused=False)

    # Moments are fp32 whatever the parameters' dtype; a low-precision parameter is one rounding of it.
    tolerances = {"grad norm": (None, ADAMW_STEP_RTOL)}
    for i in range(len(shapes)):
        tolerances[f"exp_avg{i}"] = tolerances[f"exp_avg_sq{i}"] = (None, ADAMW_STEP_RTOL)
        tolerances[f"p{i}"] = (None, ADAMW_STEP_RTOL) if dtype == torch.float32 else (dtype, 1.0)
    return inputs, kernel, reference, tolerances


def _decode_attention(s: Shapes, dtype, device, _):
    head_dim = s.width // s.heads
    b, t_max = s.batch, s.seq_len
    q = _randn(b, s.heads, 1, head_dim, device=device, dtype=dtype)
    k = _randn(b, s.heads, t_max, head_dim, device=device, dtype=dtype)
    v = _randn(b, s.heads, t_max, head_dim, device=device, dtype=dtype)
    # Rows of every length: a full cache, one token, and lengths in between.
    lengths = torch.linspace(t_max, 1, b, device=device).round().to(torch.int64)
    past = (torch.arange(t_max, device=device)[None, :] >= lengths[:, None])[:, None, :, None]
    inputs = dict(q=q, k=k.masked_fill(past, 0.0), v=v.masked_fill(past, 0.0), lengths=lengths,
                  do=_randn(b, s.heads, 1, head_dim, device=device, dtype=dtype))
    names = ("q", "k", "v")

    def kernel(t):
        # The forward never reads past a row's length: NaN there must not reach the output.
        poisoned = {name: t[name].masked_fill(past, float("nan")) for name in ("k", "v")}
        forward = decode_attention(t["q"], poisoned["k"], poisoned["v"], t["lengths"])
        t = _leaves(t, names)
        out = decode_attention(t["q"], t["k"], t["v"], t["lengths"])
        out.backward(t["do"])
        return {"out": forward, **_grads(t, names)}

    def reference(t):
        t = _leaves(t, names, double=True)
        out = decode_attention_reference(t["q"], t["k"], t["v"], t["lengths"])
        out.backward(t["do"].double())
        return {"out": out, **_grads(t, names)}

    grads = {f"d{name}": (dtype, DECODE_GRAD_FACTOR) for name in names}
    return inputs, kernel, reference, grads


BUILDERS: dict[str, Callable] = {
    "layernorm": _layernorm, "attention": _attention, "gelu": _gelu, "cross_entropy": _cross_entropy,
    "linear_cross_entropy": _linear_cross_entropy, "adamw": _adamw, "decode_attention": _decode_attention,
}


# ------------------------------------------------------------------------------------ running them


def _build(check: Check, quick: bool, device: str):
    torch.manual_seed(0)
    return BUILDERS[check.op](QUICK if quick else GPT2, check.dtype, device, check.head_dim)


def run_kernel(check: Check, quick: bool, device: str) -> None:
    """The check's kernel half alone (forward and backward): compiles every Triton variant it uses."""
    inputs, kernel, _, _ = _build(check, quick, device)
    kernel(inputs)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> dict:
    """One row's figures: NaN/inf where the reference is finite (e.g. an unwritten, poisoned element)
    fails whatever the error elsewhere."""
    row = {"quantity": name, "tolerance": rtol}
    if actual is None or tuple(actual.shape) != tuple(expected.shape):
        shape = None if actual is None else tuple(actual.shape)
        return {**row, "relative_error": None, "passed": False,
                "error": f"shape {shape}, expected {tuple(expected.shape)}"}
    finite = torch.isfinite(expected)
    bad = int((~torch.isfinite(actual) & finite).sum().item())
    error = relative_error(actual[finite], expected[finite]) if finite.any() else 0.0
    row.update(relative_error=error, non_finite=bad, passed=bad == 0 and error <= rtol)
    return row


def run_check(check: Check, quick: bool, device: str) -> list[dict]:
    """The check's rows: one per output and gradient, or one error row when the op raised."""
    base = {"op": check.op, "dtype": str(check.dtype).replace("torch.", ""), "case": check.name,
            "shape": "toy (--quick)" if quick else "GPT-2 124M"}
    start = time.perf_counter()
    try:
        inputs, kernel, reference, tolerances = _build(check, quick, device)
        with fresh_buffers_poisoned():
            actual = kernel(inputs)
        expected = reference(inputs)
        rows = []
        for name, want in expected.items():
            tol_dtype, factor = tolerances.get(name, (check.dtype, 1.0))
            rtol = RTOL[tol_dtype] * factor if tol_dtype is not None else factor
            rows.append({**base, **compare(name, actual.get(name), want.detach(), rtol)})
    except Exception as exc:  # noqa: BLE001 - a failing op is this check's finding, not the run's end
        rows = [{**base, "quantity": "-", "relative_error": None, "tolerance": None, "passed": False,
                 "error": f"{type(exc).__name__}: {exc}"}]
    seconds = time.perf_counter() - start
    for row in rows:
        row["seconds"] = seconds
    return rows
