"""Fuzzing each op's Triton version against its reference with hypothesis: random shapes within the
supported range, random memory layouts (permuted storage, padding, every other element), random
options and every dtype the device supports (fp32 and fp16 in the interpreter; bf16 too on a GPU).

The reference runs in float64 on the same values; errors are relative (``compare.RTOL``). Each op
gets 20 examples: on the CPU the same ones every run (derandomized, so CI is reproducible), as the
interpreter is slow; on a GPU fresh ones every run, but no more, because there almost every example
is a new specialization of the kernels (its strides and alignments) that Triton compiles first
(seconds for attention's four kernels), which keeps the file to a few minutes on a cold cache.
GPT_FUZZ_EXAMPLES=N overrides the count (a long soak on a GPU), GPT_FUZZ_RANDOM=1 draws fresh
examples on the CPU too.
An op whose Triton version does not exist yet is skipped, saying so.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import DEVICE
from gpt_kernels import registry
from compare import FLOAT_DTYPES, RTOL

ON_GPU = DEVICE == "cuda"
FUZZ = settings(
    max_examples=int(os.environ.get("GPT_FUZZ_EXAMPLES", 20)),
    deadline=None,
    derandomize=not ON_GPU and os.environ.get("GPT_FUZZ_RANDOM") != "1",
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
# Upper bounds on sizes: small in the interpreter, GPT-2-like on a GPU.
MAX_COLS = 1024 if ON_GPU else 160
MAX_SEQ = 256 if ON_GPU else 24
MAX_VOCAB = 4096 if ON_GPU else 300
HEAD_DIMS = (16, 32, 64, 96, 128) if ON_GPU else (5, 16, 24, 32)  # 5, 24, 96: masked up to their block


def triton_version(op: str):
    impl = registry._entries[op].triton
    if impl is None:
        pytest.skip(f"not fuzzed: {op} has no Triton version yet")
    return impl


def reference(op: str):
    return registry._entries[op].reference


@st.composite
def layouts(draw, ndim: int):
    """How a tensor lies in memory: the order of its dims in storage, padding after each dim, and
    possibly one dim read with a step of 2. Every layout gives the same logical tensor."""
    order = draw(st.permutations(range(ndim))) if ndim else []
    pads = draw(st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim))
    step_dim = draw(st.sampled_from([None, *range(ndim)]))
    return list(order), pads, step_dim


def make(shape, dtype, layout, generator, scale=1.0, shift=0.0):
    """A tensor of ``shape`` with random N(shift, scale²) values laid out as ``layout`` says, on DEVICE."""
    order, pads, step_dim = layout
    steps = [2 if d == step_dim else 1 for d in range(len(shape))]
    storage_shape = [(shape[d] + pads[d]) * steps[d] for d in order]
    storage = (torch.randn(storage_shape, generator=generator, dtype=torch.float64) * scale + shift).to(DEVICE, dtype)
    view = storage.permute(*[order.index(d) for d in range(len(shape))])
    tensor = view[tuple(slice(0, shape[d] * steps[d], steps[d]) for d in range(len(shape)))]
    assert tensor.shape == tuple(shape)
    return tensor


def randn_like(t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, 1) values shaped like ``t``, from the example's own generator: an upstream gradient drawn
    from the global RNG would differ when hypothesis replays a failing example, which it then
    reports as flaky instead of shrinking it."""
    return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """``t``, in its layout, as an input that gradients are taken with respect to."""
    return t.detach().requires_grad_()


def as_float64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().double().requires_grad_(t.requires_grad)


def gradients(outputs, inputs, upstream):
    return torch.autograd.grad(outputs, [t for t in inputs if t is not None and t.requires_grad], upstream,
                               allow_unused=True)


# Inputs and upstream gradients are O(1). A result that is exactly 0 in exact arithmetic (dq of a
# single key, dweight of a one-column LayerNorm) comes out as rounding noise, so errors are taken
# relative to at least this scale, never to a vanishing one.
SCALE_FLOOR = 1e-2


def check(actual, expected, dtype, name, factor, scale=0.0):
    """``actual`` (computed in ``dtype``) against the float64 ``expected``, within RTOL[dtype]·factor,
    relative to the largest of ``expected``, SCALE_FLOOR and ``scale`` (the size of the terms that
    cancel into a small ``expected``, where there are such)."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), f"{name}: non-finite values"
    if not expected.numel():
        return
    scale = max(expected.abs().max().item(), SCALE_FLOOR, scale)
    err = (actual.double() - expected.double()).abs().max().item() / scale
    assert err <= RTOL[dtype] * factor, f"{name}: relative error {err:.3e} > {RTOL[dtype] * factor:.1e} ({dtype})"


# ---------------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def _fuzz_layernorm(f, data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    batch = data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=2), "batch dims")
    cols = data.draw(st.integers(1, MAX_COLS), "C")
    shape = [*batch, cols]
    with_residual, with_bias = data.draw(st.booleans(), "residual"), data.draw(st.booleans(), "bias")
    param_dtype = data.draw(st.sampled_from([dtype, torch.float32]), "parameter dtype")
    eps = data.draw(st.sampled_from([1e-5, 1e-3]), "eps")
    # Rows with a large mean and a small spread (the variance must not be E[x²] - mean²), or a spread
    # far below eps, besides ordinary ones.
    shift, spread = data.draw(st.sampled_from([(0.0, 3.0), (1000.0, 1.0), (0.0, 1e-4)]), "row mean and spread")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))

    x = leaf(make(shape, dtype, data.draw(layouts(len(shape))), g, scale=spread, shift=shift))
    residual = leaf(make(shape, dtype, data.draw(layouts(len(shape))), g, scale=min(spread, 1.0))) if with_residual else None
    weight = leaf(make([cols], param_dtype, data.draw(layouts(1)), g))
    bias = leaf(make([cols], param_dtype, data.draw(layouts(1)), g)) if with_bias else None

    # Centring in fp32 costs |x|·2^-24 per value, which normalizing divides by the spread: the
    # tolerance grows with that condition number (fp32 LayerNorms, torch's included, do no better).
    stream = x.double() + (residual.double() if with_residual else 0)
    condition = (stream.abs().amax(dim=-1) / (stream.var(dim=-1, unbiased=False) + eps).sqrt()).max().item()
    conditioning = max(1.0, 8 * condition * 2**-24 / RTOL[dtype])
    out = f(x, weight, bias, eps, residual=residual)
    ref_inputs = [as_float64(t) if t is not None else None for t in (x, weight, bias, residual)]
    x_ref = ref_inputs[0]
    if with_residual:
        # The op normalizes the stream it stores, x + residual rounded to its dtype, as eager PyTorch's
        # `x + residual` then LayerNorm does: at a mean of 1000 in fp16 that rounding (up to 0.25) is a
        # quarter of the spread. The reference rounds the same way, gradients passing through unchanged.
        exact = (ref_inputs[0] + ref_inputs[3]).detach()
        x_ref = ref_inputs[0] + (exact.to(dtype).double() - exact)
    expected = reference("layernorm")(x_ref, ref_inputs[1], ref_inputs[2], eps, residual=ref_inputs[3])
    outs, refs = (out, expected) if with_residual else ((out,), (expected,))
    for o, e, name in zip(outs, refs, ("y", "x + residual")):
        check(o, e, dtype, name, factor=2 * conditioning)
    upstream = [randn_like(o, g) for o in outs]
    grads = gradients(outs, [x, weight, bias, residual], upstream)
    ref_grads = gradients(refs, ref_inputs, [u.double() for u in upstream])
    names = [n for n, t in zip(("dx", "dweight", "dbias", "dresidual"), (x, weight, bias, residual)) if t is not None]
    # dx = rstd·(g - mean(g) - x̂·mean(g·x̂)) with g = dy·weight: its terms are rstd·|g| large and can
    # cancel to almost nothing (two columns, x̂ = ±1: only eps is left), which leaves their rounding.
    # torch's own fp32 LayerNorm is off by up to 100% of the result there; errors count against the terms.
    stream64 = (x_ref + ref_inputs[3]) if with_residual else x_ref
    rstd = (stream64.detach().var(dim=-1, unbiased=False, keepdim=True) + eps).rsqrt()
    terms = (rstd * upstream[0].double() * weight.detach().double()).abs().max().item()
    for grad, ref_grad, name in zip(grads, ref_grads, names):
        # dweight and dbias sum over every row: allow for the longer sums.
        check(grad, ref_grad, dtype, name, factor=(4 if name in ("dx", "dresidual") else 8) * conditioning,
              scale=terms if name in ("dx", "dresidual") else 0.0)


@FUZZ
@given(data=st.data())
def _fuzz_attention(f, data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    shape = [data.draw(st.integers(1, 2), "B"), data.draw(st.integers(1, 3), "H"),
             data.draw(st.integers(1, MAX_SEQ), "T"), data.draw(st.sampled_from(HEAD_DIMS), "D")]
    kv_heads = data.draw(st.sampled_from([n for n in (1, 2, 3) if shape[1] % n == 0]), "KV heads")  # grouped-query
    causal = data.draw(st.booleans(), "causal")
    scale = data.draw(st.sampled_from([None, 0.05, 0.3]), "scale")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    kv_shape = [shape[0], kv_heads, *shape[2:]]
    q, k, v = (leaf(make(s, dtype, data.draw(layouts(4)), g)) for s in (shape, kv_shape, kv_shape))

    out = f(q, k, v, causal=causal, scale=scale)
    q64, k64, v64 = (as_float64(t) for t in (q, k, v))
    expected = reference("attention")(q64, k64, v64, causal=causal, scale=scale)
    check(out, expected, dtype, "o", factor=4)
    upstream = randn_like(out, g)
    for grad, ref_grad, name in zip(gradients(out, [q, k, v], upstream),
                                    gradients(expected, [q64, k64, v64], upstream.double()), ("dq", "dk", "dv")):
        check(grad, ref_grad, dtype, name, factor=8)


@FUZZ
@given(data=st.data())
def _fuzz_gelu(f, data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    shape = [*data.draw(st.lists(st.integers(1, 6), min_size=0, max_size=2), "leading dims"),
             data.draw(st.integers(1, MAX_COLS), "last dim")]
    with_bias = data.draw(st.booleans(), "bias")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    x = leaf(make(shape, dtype, data.draw(layouts(len(shape))), g, scale=3.0))
    bias = leaf(make([shape[-1]], dtype, data.draw(layouts(1)), g)) if with_bias else None

    out = f(x, bias)
    x64, bias64 = as_float64(x), as_float64(bias) if with_bias else None
    expected = reference("gelu")(x64, bias64)
    check(out, expected, dtype, "y", factor=2)
    upstream = randn_like(out, g)
    grads = gradients(out, [x, bias], upstream)
    ref_grads = gradients(expected, [x64, bias64], upstream.double())
    for grad, ref_grad, name in zip(grads, ref_grads, ("dx", "dbias")):
        check(grad, ref_grad, dtype, name, factor=4 if name == "dx" else 8)


def _draw_loss_options(data, n_rows, n_classes, g):
    ignore_index = data.draw(st.sampled_from([-100, 0, n_classes + 3]), "ignore_index")
    targets = torch.randint(0, n_classes, (n_rows,), generator=g)
    ignored = torch.rand(n_rows, generator=g) < data.draw(st.sampled_from([0.0, 0.3, 1.0]), "ignored share")
    targets = torch.where(ignored, ignore_index, targets)
    targets = targets.to(DEVICE, data.draw(st.sampled_from([torch.int64, torch.int32]), "targets dtype"))
    options = dict(
        ignore_index=ignore_index,
        reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), "reduction"),
        label_smoothing=data.draw(st.sampled_from([0.0, 0.1]), "label_smoothing"),
        lse_square_scale=data.draw(st.sampled_from([0.0, 1e-3]), "z-loss"),
        softcap=data.draw(st.sampled_from([None, 5.0]), "softcap"),
    )
    return targets, options


@FUZZ
@given(data=st.data())
def _fuzz_cross_entropy(f, data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    n_rows, n_classes = data.draw(st.integers(1, 48), "N"), data.draw(st.integers(1, MAX_VOCAB), "V")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    logits = leaf(make([n_rows, n_classes], dtype, data.draw(layouts(2)), g, scale=4.0))
    targets, options = _draw_loss_options(data, n_rows, n_classes, g)

    loss = f(logits, targets, **options)
    logits64 = as_float64(logits)
    expected = reference("cross_entropy")(logits64, targets, **options)
    check(loss, expected, torch.float32, "loss", factor=10)  # fp32 whatever the logits' dtype
    upstream = randn_like(loss, g)
    (grad,) = gradients(loss, [logits], upstream)
    (ref_grad,) = gradients(expected, [logits64], upstream.double())
    check(grad, ref_grad, dtype, "dlogits", factor=4)


@FUZZ
@given(data=st.data())
def _fuzz_linear_cross_entropy(f, data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    n_rows, width = data.draw(st.integers(1, 40), "N"), data.draw(st.integers(1, 64), "C")
    n_classes = data.draw(st.integers(1, MAX_VOCAB), "V")
    chunk_size = data.draw(st.sampled_from([None, 1, 7, 16]), "chunk_size")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    hidden = leaf(make([n_rows, width], dtype, data.draw(layouts(2)), g))
    weight = leaf(make([n_classes, width], dtype, data.draw(layouts(2)), g, scale=1 / math.sqrt(width)))
    targets, options = _draw_loss_options(data, n_rows, n_classes, g)

    loss = f(hidden, weight, targets, chunk_size=chunk_size, **options)
    hidden64, weight64 = as_float64(hidden), as_float64(weight)
    expected = reference("linear_cross_entropy")(hidden64, weight64, targets, **options)
    # The logits are rounded to the input dtype before the loss (as hidden @ weight.T would be).
    check(loss, expected, dtype, "loss", factor=4)
    upstream = randn_like(loss, g)
    grads = gradients(loss, [hidden, weight], upstream)
    ref_grads = gradients(expected, [hidden64, weight64], upstream.double())
    for grad, ref_grad, name in zip(grads, ref_grads, ("dhidden", "dweight")):
        check(grad, ref_grad, dtype, name, factor=10)


class _AdamWFloat64:
    """AdamW with clipping written out in float64 from its definition (Loshchilov & Hutter's decoupled
    weight decay, Adam's bias corrections, clip_grad_norm_'s scale), independent of torch.optim."""

    def __init__(self, params, lr, betas, eps, weight_decay):
        self.params = [p.detach().double() for p in params]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.lr, (self.beta1, self.beta2), self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0

    def step(self, grads, max_norm):
        grads = [g.double() for g in grads]
        norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        scale = min(1.0, max_norm / (norm + 1e-6)) if max_norm else 1.0
        self.t += 1
        correction1, correction2 = 1 - self.beta1**self.t, 1 - self.beta2**self.t
        for p, m, v, g in zip(self.params, self.m, self.v, grads):
            g = g * scale
            p.mul_(1 - self.lr * self.weight_decay)
            m.mul_(self.beta1).add_((1 - self.beta1) * g)
            v.mul_(self.beta2).add_((1 - self.beta2) * g * g)
            p.sub_(self.lr * (m / correction1) / ((v / correction2).sqrt() + self.eps))
        return norm


@FUZZ
@given(data=st.data())
def _fuzz_adamw(f, data):
    # fp32 parameters (bf16/fp16 ones are checked against a float64 emulation in test_adamw.py).
    shapes = data.draw(st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=2), min_size=1, max_size=3), "shapes")
    hyper = dict(
        lr=data.draw(st.sampled_from([1e-3, 3e-2]), "lr"),
        betas=data.draw(st.sampled_from([(0.9, 0.95), (0.8, 0.999)]), "betas"),
        eps=data.draw(st.sampled_from([1e-8, 1e-5]), "eps"),
        weight_decay=data.draw(st.sampled_from([0.0, 0.1]), "weight_decay"),
    )
    max_norm = data.draw(st.sampled_from([None, 0.0, 0.5, 100.0]), "max_norm")
    steps = data.draw(st.integers(1, 3), "steps")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    ours = [torch.nn.Parameter(make(s, torch.float32, ([*range(len(s))], [0] * len(s), None), g)) for s in shapes]
    optimizer, exact = f(ours, **hyper), _AdamWFloat64(ours, **hyper)
    for _ in range(steps):
        grads = [make(s, torch.float32, data.draw(layouts(len(s))), g) for s in shapes]
        for p, grad in zip(ours, grads):
            p.grad = grad.clone()
        norm = optimizer.clip_grad_norm_(max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        check(norm.double().cpu(), torch.tensor(exact.step(grads, max_norm), dtype=torch.float64), torch.float32,
              "gradient norm", factor=4)
    for i, (p, expected) in enumerate(zip(ours, exact.params)):
        check(p.detach(), expected, torch.float32, f"parameter {i}", factor=10)


@FUZZ
@given(data=st.data())
def _fuzz_decode_attention(f, data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    batch, heads = data.draw(st.integers(1, 3), "B"), data.draw(st.integers(1, 3), "H")
    cache_len, head_dim = data.draw(st.integers(1, MAX_SEQ * 2), "T"), data.draw(st.integers(1, 64), "D")
    scale = data.draw(st.sampled_from([None, 0.2]), "scale")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    lengths = torch.tensor(data.draw(st.lists(st.integers(0, cache_len), min_size=batch, max_size=batch), "lengths"),
                           device=DEVICE)
    q = make([batch, heads, 1, head_dim], dtype, data.draw(layouts(4)), g)
    kv_heads = data.draw(st.sampled_from([n for n in (1, 2, 3) if heads % n == 0]), "cache heads")  # grouped-query
    k_cache, v_cache = (make([batch, kv_heads, cache_len, head_dim], dtype, data.draw(layouts(4)), g)
                        for _ in range(2))

    out = f(q, k_cache, v_cache, lengths, scale=scale)
    expected = reference("decode_attention")(q.double(), k_cache.double(), v_cache.double(), lengths, scale=scale)
    check(out, expected, dtype, "o", factor=4)


@FUZZ
@given(data=st.data())
def _fuzz_rmsnorm(f, data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    batch = data.draw(st.lists(st.integers(1, 5), min_size=0, max_size=2), "batch dims")
    cols = data.draw(st.integers(2, MAX_COLS), "C")
    shape = [*batch, cols]
    with_residual, with_weight = data.draw(st.booleans(), "residual"), data.draw(st.booleans(), "weight")
    weight_dtype = data.draw(st.sampled_from([dtype, torch.float32]), "weight dtype")
    eps = data.draw(st.sampled_from([1e-6, 1e-5]), "eps")
    # No centring, so a large mean is an ordinary row; a spread near eps is the hard case.
    shift, spread = data.draw(st.sampled_from([(0.0, 3.0), (1000.0, 1.0), (0.0, 1e-2)]), "row mean and spread")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))

    x = leaf(make(shape, dtype, data.draw(layouts(len(shape))), g, scale=spread, shift=shift))
    residual = leaf(make(shape, dtype, data.draw(layouts(len(shape))), g, scale=spread)) if with_residual else None
    weight = leaf(make([cols], weight_dtype, data.draw(layouts(1)), g)) if with_weight else None

    out = f(x, weight, eps, residual=residual)
    ref_inputs = [as_float64(t) if t is not None else None for t in (x, weight, residual)]
    expected = reference("rmsnorm")(ref_inputs[0], ref_inputs[1], eps, residual=ref_inputs[2])
    outs, refs = (out, expected) if with_residual else ((out,), (expected,))
    for o, e, name in zip(outs, refs, ("y", "x + residual")):
        check(o, e, dtype, name, factor=2)
    upstream = [randn_like(o, g) for o in outs]
    grads = gradients(outs, [x, weight, residual], upstream)
    ref_grads = gradients(refs, ref_inputs, [u.double() for u in upstream])
    names = [n for n, t in zip(("dx", "dweight", "dresidual"), (x, weight, residual)) if t is not None]
    for grad, ref_grad, name in zip(grads, ref_grads, names):
        check(grad, ref_grad, dtype, name, factor=8 if name == "dweight" else 4)


@FUZZ
@given(data=st.data())
def _fuzz_rope(f, data):
    from gpt_kernels.rope import rope_table

    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    B, T = data.draw(st.integers(1, 2), "B"), data.draw(st.integers(1, MAX_SEQ // 4), "T")  # a program per token
    q_heads, kv_heads = data.draw(st.sampled_from([(1, 1), (4, 2), (6, 6), (18, 3)]), "heads")
    D = data.draw(st.sampled_from([2, 6, 16, 64]), "D")
    per_row = data.draw(st.booleans(), "positions (B, T)")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    q = leaf(make([B, T, q_heads, D], dtype, data.draw(layouts(4)), g))
    k = leaf(make([B, T, kv_heads, D], dtype, data.draw(layouts(4)), g))
    table_len = T + data.draw(st.integers(0, 40), "table slack")
    cos, sin = rope_table(table_len, D, data.draw(st.sampled_from([10000.0, 500000.0]), "theta"), DEVICE)
    positions = torch.randint(0, table_len, (B, T) if per_row else (T,), generator=g).to(DEVICE)

    outs = f(q, k, cos, sin, positions)
    q64, k64 = as_float64(q), as_float64(k)
    refs = reference("rope")(q64, k64, cos.double(), sin.double(), positions)
    for o, e, name in zip(outs, refs, ("q_rot", "k_rot")):
        check(o, e, dtype, name, factor=2)
    upstream = [randn_like(o, g) for o in outs]
    for grad, ref_grad, name in zip(gradients(outs, [q, k], upstream),
                                    gradients(refs, [q64, k64], [u.double() for u in upstream]), ("dq", "dk")):
        check(grad, ref_grad, dtype, name, factor=2)


@FUZZ
@given(data=st.data())
def _fuzz_swiglu(f, data):
    dtype = data.draw(st.sampled_from(FLOAT_DTYPES), "dtype")
    shape = [*data.draw(st.lists(st.integers(1, 6), min_size=0, max_size=2), "leading dims"),
             2 * data.draw(st.integers(1, MAX_COLS // 2), "hidden")]
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    gate_up = leaf(make(shape, dtype, data.draw(layouts(len(shape))), g, scale=data.draw(st.sampled_from([1.0, 8.0]))))

    out = f(gate_up)
    gate_up64 = as_float64(gate_up)
    expected = reference("swiglu")(gate_up64)
    check(out, expected, dtype, "y", factor=2)
    upstream = randn_like(out, g)
    grad, = gradients(out, [gate_up], upstream)
    ref_grad, = gradients(expected, [gate_up64], upstream.double())
    check(grad, ref_grad, dtype, "d(gate_up)", factor=4)


FUZZERS = {
    "layernorm": _fuzz_layernorm,
    "attention": _fuzz_attention,
    "gelu": _fuzz_gelu,
    "cross_entropy": _fuzz_cross_entropy,
    "linear_cross_entropy": _fuzz_linear_cross_entropy,
    "adamw": _fuzz_adamw,
    "decode_attention": _fuzz_decode_attention,
    "rmsnorm": _fuzz_rmsnorm,
    "rope": _fuzz_rope,
    "swiglu": _fuzz_swiglu,
}


@pytest.mark.parametrize("op", [op for op in registry.OPS if registry.has_triton(op)])
def test_fuzz_against_reference(op):
    assert op in FUZZERS, f"no fuzz test for {op}"
    FUZZERS[op](triton_version(op))
