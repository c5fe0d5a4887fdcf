"""The Triton FlashAttention (forward and backward) against float64 PyTorch.

Expected values come from an explicit softmax in float64 computed from the same (rounded) inputs;
``attention_reference`` (F.scaled_dot_product_attention) is checked against it and against the
op through autograd. Launchers write into NaN-poisoned buffers, so an element a kernel skips fails.
Tolerances are compare.RTOL per dtype (stated once there).

The issue's grid (B, H, T, D, causal, dtype) is too slow as a cross product in Triton's
interpreter: on the CPU a greedy all-pairs subset covers every pair of values of any two factors
(so every T with every D, every T causal and not, every D in fp16 ...); on a GPU the full cross
product runs, plus long sequences (up to 4096) and bf16.
"""

import dataclasses
import itertools
import importlib
import math
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from conftest import DEVICE
from hopper import Build, compile_for_hopper
from gpt.model import GPT
from gpt_kernels import registry
from gpt_kernels.attention import (
    HOPPER_CONFIGS,
    SUPPORTED_HEAD_DIMS,
    AttentionConfig,
    Tile,
    head_block,
    attention,
    attention_backward,
    attention_forward,
    attention_qkv,
    attention_qkv_reference,
    attention_reference,
)
from model_parity import TINY, assert_model_parity
from compare import FLOAT_DTYPES, RTOL, assert_close, fresh_buffers_poisoned, poisoned_like

# The module, not the function of the same name that gpt_kernels/__init__ exports (which
# `import gpt_kernels.attention as ...` would give).
attention_module = importlib.import_module("gpt_kernels.attention")

# Triton's interpreter warns on every loop with a runtime bound (numpy deprecates int() of its
# one-element scalar arrays): thousands of lines of noise, nothing about this code.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")


def explicit_attention(q, k, v, causal, scale=None):
    """softmax(scale · q kᵀ + mask) v and the natural-log log-sum-exp, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        T = q.shape[-2]
        above = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def make_inputs(B, H, T, D, dtype):
    q, k, v, do = (torch.randn(B, H, T, D, device=DEVICE).to(dtype) for _ in range(4))
    return q, k, v, do


def expected(q, k, v, do, causal, scale=None):
    """(o, lse, dq, dk, dv) in float64, by autograd through the explicit softmax."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o, lse = explicit_attention(*leaves, causal, scale)
    o.backward(do.double())
    return (o.detach(), lse.detach(), *(t.grad for t in leaves))


def assert_grads_close(grads, expected_grads, dtype, floor):
    """assert_close per gradient, except an expected all-zero one (dq and dk at T = 1, where the
    only key gets all the weight whatever the scores): it must be zero to RTOL of ``floor``."""
    for name, grad, grad_ref in zip(("dq", "dk", "dv"), grads, expected_grads):
        if grad_ref.abs().max() == 0:
            assert grad.abs().max().item() <= RTOL[dtype] * floor, name
        else:
            assert_close(grad, grad_ref, dtype, name)


def pairwise(factors: dict, cost) -> list[dict]:
    """A greedy all-pairs design: cases that together hold every pair of values of any two factors,
    each step taking the case that covers the most new pairs (the cheapest among equals)."""
    names = list(factors)
    candidates = [dict(zip(names, values)) for values in itertools.product(*factors.values())]

    def pairs(case):
        return {(a, case[a], b, case[b]) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(case) for case in candidates))
    chosen = []
    while uncovered:
        best = max(candidates, key=lambda case: (len(pairs(case) & uncovered), -cost(case)))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


GRID = dict(
    B=[1, 2], H=[1, 3], T=[1, 17, 64, 128, 200], D=[16, 32, 64, 128],
    causal=[True, False], dtype=[torch.float32, torch.float16],
)
if DEVICE == "cuda":
    GRID["dtype"] = FLOAT_DTYPES
    CASES = [dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    CASES += [
        dict(B=2, H=3, T=T, D=D, causal=causal, dtype=dtype)
        for T in (1000, 1024, 2048, 4096) for D in (64, 128) for causal in (True, False)
        for dtype in (torch.float16, torch.bfloat16)
    ]
else:
    CASES = pairwise(GRID, cost=lambda case: case["B"] * case["H"] * case["T"] ** 2)


def _case_id(case):
    dtype = str(case["dtype"]).replace("torch.", "")
    return f"B{case['B']}-H{case['H']}-T{case['T']}-D{case['D']}-{'causal' if case['causal'] else 'full'}-{dtype}"


def test_grid_covers_every_pair():
    # Every T meets every D, both masks and both dtypes; every pair of any other two factors too.
    for a, b in itertools.combinations(GRID, 2):
        seen = {(case[a], case[b]) for case in CASES}
        assert seen >= set(itertools.product(GRID[a], GRID[b])), (a, b)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forward_and_backward_match_float64(case):
    B, H, T, D, causal, dtype = (case[name] for name in ("B", "H", "T", "D", "causal", "dtype"))
    q, k, v, do = make_inputs(B, H, T, D, dtype)
    with fresh_buffers_poisoned():  # lse, and every other buffer the launchers allocate
        o, lse = attention_forward(q, k, v, causal, out=poisoned_like(q))
    grads = attention_backward(
        do, q, k, v, o, lse, causal, dq=poisoned_like(q), dk=poisoned_like(q), dv=poisoned_like(q)
    )
    o_ref, lse_ref, *grads_ref = expected(q, k, v, do, causal)

    assert_close(o, o_ref, dtype, "o")
    # lse (kept in base 2 by the kernel) is a log: its absolute error is the relative error of the
    # softmax normalizer exp(lse), so that ratio is what must be 1 to the dtype's tolerance.
    normalizer_ratio = torch.exp(lse.double() * math.log(2.0) - lse_ref)
    assert_close(normalizer_ratio, torch.ones_like(lse_ref), dtype, "exp(lse)")
    assert_grads_close(grads, grads_ref, dtype, floor=grads_ref[2].abs().max().item())


def test_reference_is_the_explicit_softmax():
    for causal in (True, False):
        q, k, v, _ = make_inputs(2, 3, 37, 16, torch.float64)
        assert_close(attention_reference(q, k, v, causal), explicit_attention(q, k, v, causal)[0], torch.float64)
        assert_close(
            attention_reference(q, k, v, causal, scale=0.3), explicit_attention(q, k, v, causal, 0.3)[0], torch.float64
        )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_autograd_matches_sdpa(causal, dtype):
    """The differentiable op against F.scaled_dot_product_attention (attention_reference), both run
    on the same inputs and compared with the float64 expectation; also with a non-default scale."""
    q, k, v, do = make_inputs(2, 3, 45, 32, dtype)
    for scale in (None, 0.3):
        o_ref, _, *grads_ref = expected(q, k, v, do, causal, scale)
        for fn in (attention, attention_reference):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            o = fn(*leaves, causal=causal, scale=scale)
            o.backward(do)
            assert o.dtype == dtype and all(t.grad.dtype == dtype for t in leaves)
            assert_close(o, o_ref, dtype, f"{fn.__name__} o")
            for name, leaf, grad_ref in zip("qkv", leaves, grads_ref):
                assert_close(leaf.grad, grad_ref, dtype, f"{fn.__name__} d{name}")


@pytest.mark.gpu_smoke
def test_model_layout_strided_views(monkeypatch):
    """The model's call: q, k, v are (B, T, H, D) views of one (B, T, 3C) tensor, read in place, and
    the output's transpose back to (B, T, C) is a free view."""
    B, T, H, D = 2, 33, 2, 32
    C = H * D
    qkv = torch.randn(B, T, 3 * C, device=DEVICE, requires_grad=True)
    dy = torch.randn(B, T, C, device=DEVICE)

    def block(fn, qkv):
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(C, dim=2))
        assert q.stride() == (T * 3 * C, D, 3 * C, 1)
        y = fn(q, k, v, causal=True)
        return y, y.transpose(1, 2).reshape(B, T, C)

    copied = []
    readable = attention_module.last_dim_contiguous

    def spy(t):
        result = readable(t)
        copied.append(result is not t)
        return result

    monkeypatch.setattr(attention_module, "last_dim_contiguous", spy)
    o, y = block(attention, qkv)
    assert o.transpose(1, 2).is_contiguous()  # so the reshape above copied nothing
    y.backward(dy)
    assert copied and not any(copied)  # q, k, v, o and dO were all read in place
    qkv64 = qkv.detach().double().requires_grad_()
    _, y_ref = block(lambda q, k, v, causal: explicit_attention(q, k, v, causal)[0], qkv64)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(qkv.grad, qkv64.grad, torch.float32, "dqkv")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_packed_qkv_one_gradient_buffer(dtype, monkeypatch):
    """attention_qkv takes c_attn's (B, T, 3C) output whole and returns (B, T, C); its backward writes
    dq, dk and dv into one contiguous (B, T, 3C) gradient (no cat), reading every input in place."""
    B, T, H, D = 2, 37, 2, 16
    C = H * D
    qkv = torch.randn(B, T, 3 * C, device=DEVICE).to(dtype).requires_grad_()
    dy = torch.randn(B, T, C, device=DEVICE).to(dtype)
    copied = []
    readable = attention_module.last_dim_contiguous
    monkeypatch.setattr(attention_module, "last_dim_contiguous", lambda t: copied.append(readable(t) is not t) or readable(t))
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append("cat") or real_cat(*a, **k))
    y = attention_qkv(qkv, H)
    assert y.shape == (B, T, C) and y.dtype == dtype and y.is_contiguous()
    y.backward(dy)
    assert copied and not any(copied) and not calls
    assert qkv.grad.shape == qkv.shape and qkv.grad.is_contiguous()
    qkv64 = qkv.detach().double().requires_grad_()
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv64.split(C, dim=2))
    y_ref = explicit_attention(q, k, v, True)[0].transpose(1, 2).reshape(B, T, C)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, "y")
    assert_close(qkv.grad, qkv64.grad, dtype, "dqkv")
    reference = attention_qkv_reference(qkv64.detach(), H)
    assert_close(reference, y_ref, torch.float64, "reference")
    with pytest.raises(ValueError, match="n_heads"):
        attention_qkv(qkv, 5)


def test_packed_qkv_opcheck():
    qkv = torch.randn(1, 19, 3 * 32, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.gpt_triton.attention_qkv.default, (qkv, 2, True, 0.25))
    o, lse = torch.ops.gpt_triton.attention_qkv(qkv.detach(), 2, True, 0.25)
    torch.library.opcheck(torch.ops.gpt_triton.attention_qkv_backward.default,
                          (torch.randn_like(o), qkv.detach(), o, lse, 2, True, 0.25))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [1, 12, 24, 80, 96])
def test_any_head_dim_masked_to_its_block(head_dim, dtype):
    """Head dims between the kernels' blocks run on the next block, masked along D: the padding columns
    are never read from the inputs nor written to the outputs (poisoned outputs stay NaN-free)."""
    q, k, v, do = make_inputs(1, 2, 19, head_dim, dtype)
    o_ref, lse_ref, *grads_ref = expected(q, k, v, do, True)
    o, lse = attention_forward(q, k, v, True, out=poisoned_like(q))
    assert_close(o, o_ref, dtype, "o")
    grads = attention_backward(do, q, k, v, o, lse, True, dq=poisoned_like(q), dk=poisoned_like(q), dv=poisoned_like(q))
    assert_grads_close(grads, grads_ref, dtype, floor=1.0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("head_dim", [16, 24])
def test_atomic_dq_backward(head_dim, causal, dtype):
    """The opt-in backward (dQ added with fp32 atomics in the dK/dV pass) matches float64 as the
    deterministic one does, whatever the mask, at a masked head dim too."""
    q, k, v, do = make_inputs(2, 2, 37, head_dim, dtype)
    o_ref, lse_ref, *grads_ref = expected(q, k, v, do, causal)
    o, lse = attention_forward(q, k, v, causal)
    grads = attention_backward(do, q, k, v, o, lse, causal, dq=poisoned_like(q), backward="atomic")
    assert_grads_close(grads, grads_ref, dtype, floor=1.0)
    with pytest.raises(ValueError, match="backward must be one of"):
        attention_backward(do, q, k, v, o, lse, causal, backward="fast")


# Grouped-query attention: (Hq, Hkv, T, D, causal, dtype, backward), every head ratio with both masks,
# both dtypes and both backwards between them; odd T, head dims masked to their block.
GQA_CASES = [
    (4, 1, 29, 24, True, torch.float32, "deterministic"),
    (4, 1, 21, 12, False, torch.float16, "atomic"),
    (4, 2, 33, 12, True, torch.float16, "deterministic"),
    (4, 2, 19, 16, False, torch.float32, "atomic"),
    (6, 3, 23, 16, False, torch.float16, "deterministic"),
    (6, 3, 27, 24, True, torch.float32, "atomic"),
    (4, 4, 17, 12, True, torch.float16, "atomic"),
]


def grouped_expected(q, k, v, do, causal):
    """(o, dq, dk, dv) in float64: k and v repeated to the query heads (in the reference only), so
    autograd sums each shared head's gradient over its group."""
    group = q.shape[1] // k.shape[1]
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o, _ = explicit_attention(leaves[0], *(t.repeat_interleave(group, dim=1) for t in leaves[1:]), causal)
    o.backward(do.double())
    return (o.detach(), *(t.grad for t in leaves))


@pytest.mark.parametrize("case", GQA_CASES, ids=lambda c: f"{c[0]}-{c[1]}-T{c[2]}-D{c[3]}-{'causal' if c[4] else 'full'}-"
                         f"{str(c[5]).replace('torch.', '')}-{c[6]}")
def test_grouped_query_heads(case):
    """k and v with Hkv heads dividing Hq: each query head reads its group's K/V head, and dK/dV of a
    shared head sum its group's shares, against float64, into poisoned buffers of the k/v shape."""
    Hq, Hkv, T, D, causal, dtype, backward = case
    q, do = (torch.randn(2, Hq, T, D, device=DEVICE).to(dtype) for _ in range(2))
    k, v = (torch.randn(2, Hkv, T, D, device=DEVICE).to(dtype) for _ in range(2))
    o_ref, *grads_ref = grouped_expected(q, k, v, do, causal)
    with fresh_buffers_poisoned():
        o, lse = attention_forward(q, k, v, causal, out=poisoned_like(q))
        grads = attention_backward(do, q, k, v, o, lse, causal, dq=poisoned_like(q), dk=poisoned_like(k),
                                   dv=poisoned_like(v), backward=backward)
    assert_close(o, o_ref, dtype, "o")
    assert_grads_close(grads, grads_ref, dtype, floor=1.0)
    assert_close(attention_reference(q.double(), k.double(), v.double(), causal), o_ref, torch.float64, "reference")


def test_grouped_query_autograd_on_model_views():
    """The Llama layout: q, k and v as (B, H, T, D) views of one (B, T, (Hq + 2·Hkv)·D) projection,
    read in place; gradients of the K/V heads come back with Hkv heads, deterministic run to run."""
    B, T, Hq, Hkv, D = 2, 25, 4, 2, 16
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEVICE, requires_grad=True)

    def split(x):
        q, k, v = x.split([Hq * D, Hkv * D, Hkv * D], dim=2)
        return (q.view(B, T, Hq, D).transpose(1, 2), k.view(B, T, Hkv, D).transpose(1, 2),
                v.view(B, T, Hkv, D).transpose(1, 2))

    do = torch.randn(B, Hq, T, D, device=DEVICE)
    attention(*split(qkv), causal=True).backward(do)
    first = qkv.grad.clone()
    qkv.grad = None
    attention(*split(qkv), causal=True).backward(do)
    assert torch.equal(first, qkv.grad)
    o_ref, *grads_ref = grouped_expected(*split(qkv.detach()), do, True)
    for name, grad, grad_ref in zip("qkv", split(first), grads_ref):
        assert_close(grad, grad_ref, torch.float32, f"d{name}")


def test_report_names_the_backward():
    line = next(line for line in registry.report(DEVICE).splitlines() if line.startswith("attention"))
    if registry.is_triton("attention", DEVICE):
        assert "backward: deterministic" in line, line


def test_non_unit_last_stride_and_broadcast_gradient():
    # Every other element of the last dim (copied before launch), and .sum()'s stride-0 gradient.
    bases = [torch.randn(1, 2, 40, 64, device=DEVICE, requires_grad=True) for _ in range(3)]
    q, k, v = (base[..., ::2] for base in bases)
    o = attention(q, k, v, causal=False)
    o.sum().backward()
    o_ref, _, *grads_ref = expected(q, k, v, torch.ones_like(q), causal=False)
    assert_close(o, o_ref, torch.float32, "o")
    for name, base, grad_ref in zip("qkv", bases, grads_ref):
        assert_close(base.grad[..., ::2], grad_ref, torch.float32, f"d{name}")
        assert torch.equal(base.grad[..., 1::2], torch.zeros_like(grad_ref))


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_is_deterministic(dtype):
    # No atomics: each gradient element is summed by one program in a fixed order.
    q, k, v, do = make_inputs(2, 3, 77, 32, dtype)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        attention(*leaves, causal=True).backward(do)
        runs.append([t.grad for t in leaves])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_empty_batch():
    q = torch.randn(0, 2, 5, 16, device=DEVICE, requires_grad=True)
    o = attention(q, q, q)
    o.sum().backward()
    assert o.shape == q.shape and torch.equal(q.grad, torch.zeros_like(q))


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a device where Triton cannot run beside one where it can")
def test_cpu_tensors_rejected_on_gpu_build():
    x = torch.randn(1, 2, 8, 16)
    if registry.triton_runs_on("cpu"):
        pytest.skip("TRITON_INTERPRET=1 makes the CPU a Triton device")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention(x, x, x)


def test_config_rules():
    for config in HOPPER_CONFIGS.values():  # __post_init__ has checked nesting; the table is complete
        assert isinstance(config, AttentionConfig)
    assert len(HOPPER_CONFIGS) == len(SUPPORTED_HEAD_DIMS) * 3 * 2
    for (_, dtype, _), config in HOPPER_CONFIGS.items():
        # The Triton tutorial's `keep` rule for Hopper: no 8-warp forward tile under 128×128 scores.
        tile = config.forward
        if dtype != torch.float32:
            assert not (tile.block_m * tile.block_n < 128 * 128 and tile.num_warps == 8), (dtype, config)
    with pytest.raises(ValueError, match="nest"):
        AttentionConfig(forward=Tile(32, 64), dkdv=Tile(16, 32), dq=Tile(32, 16))
    with pytest.raises(ValueError, match="nest"):
        AttentionConfig(forward=Tile(32, 16), dkdv=Tile(32, 16), dq=Tile(32, 16))


# Every Hopper table entry, run with its own head dim, dtype and mask (bf16 on the GPU only), at
# lengths that put its large tiles' edges everywhere: less than one block, a multiple of the smaller
# blocks but not of the larger ones (192 = 3·64), and a multiple of none (200), so the masked and
# unmasked loops and the diagonal spanning several inner blocks all run without a GPU. (T = 1 is
# one partial block whatever the tiles: the grid above runs it for every head dim and dtype.)
TABLE_LENGTHS = (17, 192, 200)
TABLE_KEYS = [key for key in HOPPER_CONFIGS if key[1] != torch.bfloat16 or DEVICE == "cuda"]


@pytest.mark.parametrize(
    "D, dtype, causal", TABLE_KEYS,
    ids=[f"D{D}-{str(dtype).replace('torch.', '')}-{'causal' if causal else 'full'}" for D, dtype, causal in TABLE_KEYS],
)
def test_hopper_tiles(D, dtype, causal):
    config = HOPPER_CONFIGS[(D, dtype, causal)]
    for T in TABLE_LENGTHS:
        q, k, v, do = make_inputs(1, 1, T, D, dtype)
        o, lse = attention_forward(q, k, v, causal, out=poisoned_like(q), config=config)
        grads = attention_backward(do, q, k, v, o, lse, causal, dq=poisoned_like(q), dk=poisoned_like(q),
                                   dv=poisoned_like(q), config=config)
        o_ref, _, *grads_ref = expected(q, k, v, do, causal)
        assert_close(o, o_ref, dtype, f"T={T} o")
        assert_grads_close(grads, grads_ref, dtype, floor=1.0)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_table_compiles_for_hopper_without_spills():
    """Table entries build for an H100 (sm_90a) without spilling registers: the interpreter accepts
    code the compiler rejects, and the table's comment claims no spills."""
    kernels = {"forward": "_attention_forward_kernel", "dkdv": "_attention_backward_dkdv_kernel",
               "dq": "_attention_backward_dq_kernel"}
    types = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
    # Head dim 128 comes closest to the register limit (dK/dV ~250 of 255): every kernel of its causal
    # bf16 entry (tensor cores), and the dK/dV kernel of its other bf16 entry and of fp32 (FMA units).
    cases = [(name, 128, torch.bfloat16, True) for name in kernels]
    cases += [("dkdv", 128, torch.bfloat16, False), ("dkdv", 128, torch.float32, True)]
    # Head dim 256's half-height tiles, and head dims masked up to their block (96 on the 128 kernels).
    cases += [(name, 256, torch.bfloat16, True) for name in kernels] + [("dkdv", 256, torch.float32, True)]
    cases += [("forward", 64, torch.bfloat16, True), ("dkdv", 64, torch.bfloat16, True), ("dkdv", 64, torch.bfloat16, False)]
    cases += [(name, 96, torch.bfloat16, True) for name in kernels]
    # The opt-in atomic-dQ backward's dK/dV kernel (one more GEMM and the atomics), on the same tiles.
    cases += [("dkdv", head_dim, torch.bfloat16, True, True) for head_dim in (64, 128)]
    # Grouped-query dK/dV (a K/V head's query heads in one flat loop): llama-124m's 12/4 heads at D64, and D128.
    cases += [("dkdv", head_dim, torch.bfloat16, True, False, 3) for head_dim in (64, 128)]
    builds = {}
    for name, head_dim, dtype, causal, atomic, group in [(*case, False, 1)[:6] for case in cases]:
        tile = getattr(HOPPER_CONFIGS[(head_block(head_dim), dtype, causal)], name)
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_block(head_dim), CAUSAL=causal,
                          DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
                          BLOCK_M=tile.block_m, BLOCK_N=tile.block_n)
        if name == "dkdv":
            constexprs.update(ATOMIC_DQ=atomic, GROUP=group)
        # As the model's views are specialized at launch: 16-byte-aligned pointers and strides (without
        # that, addressing alone makes dK/dV at head dim 128 spill), T no multiple of 16.
        label = f"{'atomic ' if atomic else ''}{name} D{head_dim} {dtype} causal={causal} group={group} {tile}"
        builds[label] = Build(
            "gpt_kernels.attention", kernels[name], constexprs,
            {"LSE|DELTA|DQ_ACC": "*fp32", "T_BUCKET": "i32", "[A-Z][A-Z_]*": types[dtype], ".*scale": "fp32"},
            ["(?!T_BUCKET)[A-Z][A-Z_]*", "stride.*"], dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
    for kernel, result in compile_for_hopper(builds).items():
        assert result["stack_frame"] == result["spill_stores"] == 0, (kernel, result["registers"])


def test_gpt_model_compiles_in_one_graph():
    """What the custom op is for: the whole model, with attention on Triton, traces with fullgraph=True
    (aot_eager: tracing, fake tensors and autograd are what is checked, not inductor's code)."""
    torch.manual_seed(0)
    model = GPT(TINY).to(DEVICE)
    idx, targets = (torch.randint(0, TINY.vocab_size, (2, 24), device=DEVICE) for _ in range(2))
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    with registry.use_kernels("attention"):
        _, loss = torch.compile(model, fullgraph=True, backend=counter)(idx, targets)
        loss.backward()
    called = [str(node.target) for node in counter.graphs[0].graph.nodes if node.op == "call_function"]
    assert counter.frame_count == 1 and called.count("gpt_triton.attention_qkv") == TINY.n_layer, called
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_registered_as_the_triton_attention():
    assert registry.resolve("attention", DEVICE) is attention
    with registry.use_kernels("none"):
        assert registry.resolve("attention", DEVICE) is attention_reference


def test_gpt_model_parity_head_dim_12():
    """A GPT-2-layout model with 4 heads of width 12 (once a ValueError): head dim 12 runs on the
    16-wide kernels, masked."""
    assert_model_parity("attention", dataclasses.replace(TINY, n_head=4, n_embd=48))


@pytest.mark.skipif(DEVICE != "cuda", reason="autotuning times kernels on a GPU")
def test_autotuned_path(monkeypatch):
    monkeypatch.setattr(attention_module, "AUTOTUNE", True)
    q, k, v, do = make_inputs(2, 3, 300, 64, torch.bfloat16)
    # fp32 keeps the table: the candidates are tensor-core tiles, far too large for its FMA matmuls.
    assert attention_module._resolve(q.float(), True, None) == HOPPER_CONFIGS[(64, torch.float32, True)]
    o, lse = attention_forward(q, k, v, True, out=poisoned_like(q))
    grads = attention_backward(do, q, k, v, o, lse, True)
    o_ref, _, *grads_ref = expected(q, k, v, do, True)
    assert_close(o, o_ref, torch.bfloat16, "o")
    assert_grads_close(grads, grads_ref, torch.bfloat16, floor=1.0)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="autocast bf16 matmuls need CUDA")
def test_under_bf16_autocast():
    x = torch.randn(2, 64, 128, device=DEVICE)
    c_attn = torch.nn.Linear(128, 3 * 128).to(DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        q, k, v = (t.view(2, 64, 2, 64).transpose(1, 2) for t in c_attn(x).split(128, dim=2))
        y = attention(q, k, v)
    assert y.dtype == torch.bfloat16
    assert_close(y, explicit_attention(q, k, v, True)[0], torch.bfloat16, "y")

