"""The Triton LayerNorm (optional fused residual add) against float64 PyTorch.

Every buffer the launchers allocate (outputs, statistics, partial sums, parameter gradients) comes
NaN-filled, so an element a kernel skips fails; the custom ops are tested through autograd, opcheck and torch.compile. bf16 runs in the
interpreter too (only ``tl.dot`` on bf16 is broken there, and these kernels have none), on a
smaller grid. On the CPU the kernels are also compiled for sm_90, to check what the interpreter
cannot: that they compile, and fit in registers.

The CPU grid takes every width of the issue with two row counts (the interpreter is too slow for
the full cross product); the GPU runs the full cross product of rows, widths and dtypes.
"""

import importlib
import re

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE
from hopper import ASYNC_COPY, ASYNC_VECTOR_COPY, VECTOR_LOAD, Build, compile_for_hopper, count
from gpt_kernels.layernorm import layernorm, layernorm_backward, layernorm_forward, layernorm_reference
from compare import NON_CONTIGUOUS, RTOL, assert_close, fresh_buffers_poisoned, needs_cuda_autocast

layernorm_module = importlib.import_module("gpt_kernels.layernorm")  # the module, not the function

ROWS = [1, 3, 257, 1000]
WIDTHS = [7, 64, 768, 771, 1024, 1280, 1600, 4096]
if DEVICE == "cuda":
    SHAPES = [(rows, width) for rows in ROWS for width in WIDTHS]
    GRID_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
else:
    # Every width twice and every row count at least twice; the many rows go to the narrow and the
    # GPT-2 small widths, as the interpreter's time grows with rows × width.
    SHAPES = [(1000, 7), (3, 7), (1000, 64), (1, 64), (257, 768), (1, 768), (257, 771), (3, 771),
              (3, 1024), (1, 1024), (1, 1280), (3, 1280), (3, 1600), (1, 1600), (1, 4096), (3, 4096)]
    GRID_DTYPES = [torch.float32, torch.float16]
# (residual, weight, bias): the model's path, no bias (GPT's bias=False), no parameters at all, and
# a bias alone (its partial sums then take the first row).
VARIANTS = {"residual": (True, True, True), "residual_no_bias": (True, True, False),
            "plain": (False, True, True), "plain_no_params": (False, False, False),
            "plain_bias_only": (False, False, True)}
EPS = 1e-5


def make_inputs(shape, dtype, with_residual, with_weight, with_bias, residual_dtype=None, param_dtype=None):
    """x, residual, weight, bias and the upstream gradients dy (of y) and ds (of the stream), on a
    few different scales so that the normalization has something to do."""
    def randn(*size, scale=1.0, shift=0.0, dtype=dtype):
        return (torch.randn(size, device=DEVICE) * scale + shift).to(dtype)

    x = randn(*shape, scale=2.0, shift=0.5)
    residual = randn(*shape, scale=3.0, shift=-1.0, dtype=residual_dtype or dtype) if with_residual else None
    weight = randn(shape[-1], shift=1.0, dtype=param_dtype or dtype) if with_weight else None
    bias = randn(shape[-1], scale=0.5, dtype=param_dtype or dtype) if with_bias else None
    stream_dtype = layernorm_module.stream_dtype(x, residual)
    dy = randn(*shape, dtype=stream_dtype)
    ds = randn(*shape, scale=0.5, dtype=stream_dtype) if with_residual else None
    return x, residual, weight, bias, dy, ds


def expected(x, residual, weight, bias, dy, ds):
    """y, stream and the gradients of x, residual, weight and bias, in float64. The
    stream is rounded to its stored dtype, as the op stores it, before it is normalized."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
    x64, residual64, weight64, bias64 = leaves
    stream = x64
    if residual is not None:
        stream = (x64 + residual64).to(layernorm_module.stream_dtype(x, residual)).double()
    y = layernorm_reference(stream, weight64, bias64, EPS)
    outputs, grads = [y], [dy.double()]
    if ds is not None:
        outputs.append(stream)
        grads.append(ds.double())
    torch.autograd.backward(outputs, grads)
    grads = [t.grad if t is not None else None for t in leaves]
    return y.detach(), (stream.detach() if residual is not None else None), grads


def check_launchers(x, residual, weight, bias, dy, ds, tolerance_dtype, factor=1.0):
    """Forward and backward launchers, every buffer they allocate poisoned, against float64."""
    y_ref, stream_ref, (dx_ref, dres_ref, dw_ref, db_ref) = expected(x, residual, weight, bias, dy, ds)
    with fresh_buffers_poisoned():
        y, stream, mean, rstd = layernorm_forward(x, weight, bias, EPS, residual, out_dtype=dy.dtype)
    assert y.dtype == dy.dtype
    assert_close(y, y_ref, tolerance_dtype, "y", factor)
    if residual is not None:
        assert stream.dtype == dy.dtype
        assert_close(stream, stream_ref, tolerance_dtype, "stream")
    # The statistics of the stream as stored (the interpreter rounds fp32 -> bf16 toward zero, a GPU
    # to nearest: the stored bf16 stream differs from the float64 one by a rounding).
    normalized = (stream if residual is not None else x).double()
    var_ref, mean_ref = torch.var_mean(normalized, dim=-1, unbiased=False)
    # The mean's rounding error scales with the row's values, not with the mean, which may lie near 0
    # (one row of width 7 or 64 does now and then): it is measured on the scale of the values.
    mean_error = ((mean.double() - mean_ref).abs().max() / normalized.abs().max()).item()
    assert mean_error <= RTOL[torch.float32] * factor, f"mean: error {mean_error:.3e} on the values' scale"
    assert_close(rstd, (var_ref + EPS).rsqrt(), torch.float32, "rstd", factor)

    residual_dtype = residual.dtype if residual is not None else None
    with fresh_buffers_poisoned():
        dx, dres, dw, db = layernorm_backward(
            dy, stream if residual is not None else x, weight, bias, mean, rstd, ds, x.dtype, residual_dtype,
        )
    assert_close(dx, dx_ref, tolerance_dtype, "dx", factor)
    if residual is not None:
        assert_close(dres, dres_ref, tolerance_dtype, "dresidual", factor)
    for name, grad, grad_ref, param in (("dweight", dw, dw_ref, weight), ("dbias", db, db_ref, bias)):
        if param is None:
            assert grad is None, name
        else:
            assert grad.dtype == param.dtype, name
            assert_close(grad, grad_ref, tolerance_dtype, name, factor)


@pytest.mark.parametrize("dtype", GRID_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_model_path_matches_float64(shape, dtype):
    """The model's call: fused residual, weight and bias, upstream gradients into both outputs."""
    check_launchers(*make_inputs(shape, dtype, True, True, True), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_variants_match_float64(variant, dtype):
    check_launchers(*make_inputs((67, 771), dtype, *VARIANTS[variant]), dtype)


# Rows whose statistics are hard on the variance: a large mean with a small spread (x² ≈ 1e6 in fp32
# leaves E[x²] - mean² with almost no correct digits; the kernel centres the row first), and a spread
# far below eps. Each case alone, and mixed row by row in one tensor.
ROW_STATISTICS = {"1000 + N(0, 1)": (1000.0, 1.0), "N(0, 1e-4)": (0.0, 1e-4), "-30 + N(0, 0.1)": (-30.0, 0.1)}


def rows_with_statistics(shape, cases, dtype):
    rows = torch.randn(shape, device=DEVICE, dtype=torch.float64)
    for i, case in enumerate(cases * shape[0]):
        if i == shape[0]:
            break
        shift, scale = ROW_STATISTICS[case]
        rows[i] = rows[i] * scale + shift
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("cases", [[c] for c in ROW_STATISTICS] + [list(ROW_STATISTICS)], ids=" | ".join)
@pytest.mark.parametrize("variant", ["residual", "plain"])
def test_rows_with_a_large_mean_or_a_tiny_spread(cases, variant, dtype):
    with_residual, with_weight, with_bias = VARIANTS[variant]
    x, residual, weight, bias, dy, ds = make_inputs((7, 771), dtype, with_residual, with_weight, with_bias)
    x = rows_with_statistics(x.shape, cases, dtype)
    if residual is not None:  # small next to the rows, so the stream keeps their statistics
        residual = (residual.double() * ROW_STATISTICS[cases[0]][1] * 0.1).to(residual.dtype)
    # Centring in fp32 loses |x|·2^-24 of each value, and normalizing divides that by the spread:
    # no fp32 LayerNorm (torch's included) does better than the rows' condition number max|x| / std
    # times fp32's rounding, so the tolerance grows with it. E[x²] - mean² misses it by orders of
    # magnitude (and goes negative, then NaN, on the tiny spreads).
    stream = (x.double() + residual.double()) if residual is not None else x.double()
    var = stream.var(dim=-1, unbiased=False)
    condition = (stream.abs().amax(dim=-1) / (var + EPS).sqrt()).max().item()
    factor = max(1.0, 8 * condition * 2**-24 / RTOL[dtype])
    check_launchers(x, residual, weight, bias, dy, ds, dtype, factor)


WIDE_SHAPES = [(3, 8192), (1, 8192)] + ([(1000, 8192), (64, 65536)] if DEVICE == "cuda" else [])


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("shape", WIDE_SHAPES, ids=str)
def test_wide_rows(shape):
    check_launchers(*make_inputs(shape, torch.float32, True, True, True), torch.float32)


def test_backward_loops_over_many_tiles(monkeypatch):
    # Three programs (on a GPU too, which would otherwise start one per tile here) for 301 rows of
    # 10 in tiles of 4 rows: each program loops over 25 or 26 tiles, the last tile is ragged, and
    # dweight/dbias add three partial rows.
    monkeypatch.setattr(layernorm_module, "BACKWARD_TILE_ELEMENTS", 64)
    monkeypatch.setattr(layernorm_module, "_max_backward_programs", lambda device: 3)
    check_launchers(*make_inputs((301, 10), torch.float32, True, True, True), torch.float32)


@pytest.mark.parametrize(
    "x_dtype, residual_dtype, param_dtype",
    [(torch.float32, torch.float32, torch.float32), (torch.float16, torch.float16, torch.float16),
     (torch.float16, torch.float16, torch.float32), (torch.bfloat16, torch.float32, torch.float32),
     (torch.float16, None, torch.float32), (torch.bfloat16, None, torch.bfloat16)],
    ids=["fp32", "fp16", "fp16+fp32params", "bf16+fp32stream (the model under autocast)", "fp16 plain+fp32params",
         "bf16 plain"],
)
def test_autograd_dtypes_match_reference(x_dtype, residual_dtype, param_dtype):
    """Outputs in the stream's dtype, every gradient in its input's dtype, in the op and in the
    reference alike; both match float64."""
    with_residual = residual_dtype is not None
    inputs = make_inputs((5, 7, 96), x_dtype, with_residual, True, True, residual_dtype, param_dtype)
    x, residual, weight, bias, dy, ds = inputs
    stream_dtype = dy.dtype
    tolerance_dtype = x_dtype  # the least precise input bounds the error
    y_ref, stream_ref, grads_ref = expected(*inputs)
    for name, fn in (("triton", layernorm), ("reference", layernorm_reference)):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
        xg, rg, wg, bg = leaves
        out = fn(xg, wg, bg, EPS, residual=rg)
        if with_residual:
            y, stream = out
            assert stream.dtype == stream_dtype, name
            torch.autograd.backward([y, stream], [dy, ds])
            assert_close(stream, stream_ref, tolerance_dtype, f"{name} stream")
        else:
            y = out
            y.backward(dy)
        assert y.dtype == stream_dtype, name
        assert_close(y, y_ref, tolerance_dtype, f"{name} y")
        for leaf, grad_ref, label in zip(leaves, grads_ref, ("dx", "dresidual", "dweight", "dbias")):
            if leaf is None:
                continue
            assert leaf.grad.dtype == leaf.dtype, f"{name} {label}"
            assert_close(leaf.grad, grad_ref, tolerance_dtype, f"{name} {label}")


HALF = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # the interpreter runs fp16, not bf16


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_autocast_writes_y_in_the_autocast_dtype_and_takes_a_half_dy(with_residual):
    """Under autocast y comes out in the autocast dtype (the next linear's input, with no cast between)
    and the backward takes that dtype's dy as it is; the stream and every gradient keep their dtypes.
    The model's pattern: a half branch, an fp32 stream and fp32 parameters."""
    x, residual, weight, bias, _, ds = make_inputs((3, 5, 96), HALF if with_residual else torch.float32,
                                                   with_residual, True, True, torch.float32, torch.float32)
    dy = (torch.randn(x.shape, device=DEVICE)).to(HALF)
    y_ref, stream_ref, grads_ref = expected(x, residual, weight, bias, dy, ds)
    for name, fn in (("triton", layernorm), ("reference", layernorm_reference)):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, residual, weight, bias)]
        with torch.autocast(DEVICE, dtype=HALF):
            out = fn(leaves[0], leaves[2], leaves[3], EPS, residual=leaves[1])
        y, stream = out if with_residual else (out, None)
        assert y.dtype == HALF, name
        assert_close(y, y_ref, HALF, f"{name} y")
        if with_residual:
            assert stream.dtype == torch.float32, name
            torch.autograd.backward([y, stream], [dy, ds])
        else:
            y.backward(dy)
        for leaf, grad_ref, label in zip(leaves, grads_ref, ("dx", "dresidual", "dweight", "dbias")):
            if leaf is not None:
                assert leaf.grad.dtype == leaf.dtype, f"{name} {label}"
                assert_close(leaf.grad, grad_ref, HALF, f"{name} {label}")


def test_only_one_output_used():
    # ln_f's stream output is dropped (its gradient is None, not a zero tensor), and a caller may
    # use the stream alone (then y's gradient is None and the stream's passes straight through).
    x, residual, weight, bias, dy, ds = make_inputs((9, 33), torch.float32, True, True, True)
    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    y, _ = layernorm(leaves[0], leaves[2], leaves[3], EPS, residual=leaves[1])
    y.backward(dy)
    _, _, grads_ref = expected(x, residual, weight, bias, dy, None)
    for leaf, grad_ref, label in zip(leaves, grads_ref, ("dx", "dresidual", "dweight", "dbias")):
        assert_close(leaf.grad, grad_ref, torch.float32, label)

    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    _, stream = layernorm(leaves[0], leaves[2], leaves[3], EPS, residual=leaves[1])
    stream.backward(ds)
    assert torch.equal(leaves[0].grad, ds) and torch.equal(leaves[1].grad, ds)
    assert leaves[2].grad is None and leaves[3].grad is None


def _spread(*shape):
    return torch.randn(shape, device=DEVICE) * 2 + 0.5


@pytest.mark.parametrize("layout", NON_CONTIGUOUS)
def test_non_contiguous_inputs(layout):
    x, residual = NON_CONTIGUOUS[layout](_spread), NON_CONTIGUOUS[layout](_spread)
    assert not x.is_contiguous()
    width = x.shape[-1]
    weight, bias = torch.randn(2, width, device=DEVICE)  # rows of one tensor: contiguous 1-D views
    dy = torch.randn(x.shape, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1)  # strided too
    ds = torch.randn(x.shape, device=DEVICE)[..., :].transpose(0, 1).contiguous().transpose(0, 1)
    check_launchers(x, residual, weight, bias, dy, ds, torch.float32)

    leaves = [t.clone().requires_grad_() for t in (x, residual, weight, bias)]
    y, stream = layernorm(leaves[0], leaves[2], leaves[3], EPS, residual=leaves[1])
    torch.autograd.backward([y, stream], [dy, ds])
    y_ref, stream_ref, grads_ref = expected(x, residual, weight, bias, dy, ds)
    assert_close(y, y_ref, torch.float32, "y")
    for leaf, grad_ref, label in zip(leaves, grads_ref, ("dx", "dresidual", "dweight", "dbias")):
        assert_close(leaf.grad, grad_ref, torch.float32, label)


def test_strided_weight_and_bias():
    # A column of a matrix and an expanded scalar: the kernels read parameters at unit stride.
    x, residual, _, _, dy, ds = make_inputs((37, 50), torch.float32, True, False, False)
    matrix = torch.randn(50, 3, device=DEVICE)
    check_launchers(x, residual, matrix[:, 1], torch.tensor([0.25], device=DEVICE).expand(50), dy, ds, torch.float32)

    matrix.requires_grad_()
    y, stream = layernorm(x, matrix[:, 1], None, EPS, residual=residual)
    torch.autograd.backward([y, stream], [dy, ds])
    _, _, (_, _, dweight_ref, _) = expected(x, residual, matrix[:, 1].detach(), None, dy, ds)
    assert_close(matrix.grad[:, 1], dweight_ref, torch.float32, "dweight")
    assert not matrix.grad[:, [0, 2]].any()


def test_broadcast_gradient_empty_input_and_determinism():
    # .sum() hands the backward an expanded dy with stride 0.
    x, _, weight, bias, _, _ = make_inputs((33, 70), torch.float32, False, True, True)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    layernorm(leaves[0], leaves[1], leaves[2]).sum().backward()
    _, _, grads_ref = expected(x, None, weight, bias, torch.ones_like(x), None)
    for leaf, grad_ref, label in zip(leaves, [grads_ref[0], *grads_ref[2:]], ("dx", "dweight", "dbias")):
        assert_close(leaf.grad, grad_ref, torch.float32, label)

    # No atomics: the same inputs give bit-identical gradients.
    x, residual, weight, bias, dy, ds = make_inputs((300, 40), torch.float32, True, True, True)
    y, stream, mean, rstd = layernorm_forward(x, weight, bias, EPS, residual)
    first, second = (layernorm_backward(dy, stream, weight, bias, mean, rstd, ds) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second) if a is not None)

    empty = torch.randn(0, 70, device=DEVICE, requires_grad=True)
    wg, bg = weight.new_ones(70).requires_grad_(), bias.new_zeros(70).requires_grad_()
    y, stream = layernorm(empty, wg, bg, residual=torch.randn(0, 70, device=DEVICE))
    (y.sum() + stream.sum()).backward()
    assert y.shape == stream.shape == (0, 70)
    assert torch.equal(wg.grad, torch.zeros(70, device=DEVICE)) and torch.equal(bg.grad, torch.zeros(70, device=DEVICE))


class TinyBlockTail(nn.Module):
    """The model's pattern: a linear branch added to the stream by the LayerNorm that follows it."""

    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)

    def forward(self, x, norm=layernorm):
        h, x = norm(self.proj(x), self.ln.weight, self.ln.bias, EPS, residual=x)
        return h, norm(x, self.ln.weight, self.ln.bias, EPS)


def _hopper_build(kernel: str, width: int, pointers: dict, constexprs: dict, num_warps: int, num_stages: int):
    """A LayerNorm kernel as a launch at ``width`` specializes it: pointers (fp32 unless named) are
    16-byte aligned, and so are the width and the row strides when the width is a multiple of 16."""
    aligned = [r".*_ptr"] + (["n_cols", r"stride.*"] if width % 16 == 0 else [])
    return Build("gpt_kernels.layernorm", kernel, constexprs, {**pointers, r".*_ptr": "*fp32", "eps": "fp32"},
                 aligned, dict(num_warps=num_warps, num_stages=num_stages))


def _hopper_forward(width, x, stream, param, residual=True, weight=True, bias=True):
    ln = layernorm_module
    block_m, block_n, warps = ln._tile(16384, width, ln.FORWARD_TILE_ELEMENTS, ln.FORWARD_WARP_ELEMENTS)
    pointers = {"x_ptr": "*" + x, "residual_ptr|y_ptr|stream_ptr": "*" + stream, "weight_ptr|bias_ptr": "*" + param}
    flags = dict(HAS_RESIDUAL=residual, HAS_WEIGHT=weight, HAS_BIAS=bias, BLOCK_M=block_m, BLOCK_N=block_n)
    return _hopper_build("_layer_norm_forward_kernel", width, pointers, flags, warps, 3)


def _hopper_backward(width, x, stream, param, dstream=True, weight=True, bias=True):
    ln = layernorm_module
    block_m, block_n, warps = ln._tile(16384, width, ln.BACKWARD_TILE_ELEMENTS, ln.BACKWARD_WARP_ELEMENTS)
    pointers = {"dy_ptr|dstream_ptr|stream_ptr|dresidual_ptr": "*" + stream, "weight_ptr": "*" + param, "dx_ptr": "*" + x}
    flags = dict(HAS_DSTREAM=dstream, WRITE_DRESIDUAL=x != stream, HAS_WEIGHT=weight, HAS_BIAS=bias,
                 BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=ln.backward_stages(warps))
    return _hopper_build("_layer_norm_backward_kernel", width, pointers, flags, warps, 2)


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_hopper_without_spills():
    """Every kernel compiles for sm_90 (the interpreter runs Python, not Triton's compiler), the
    GPT-2 widths and 8192 fit in registers, and aligned rows are read 16 bytes at a time (vector
    loads, or 16-byte async copies). The backward's row loop is software-pipelined: its loads are
    cp.async copies into shared memory (but at 8192, where 32 warps leave 64 registers a thread),
    with registers for at least 2 resident programs of 8 warps per SM (<= 128)."""
    builds = {}
    for width in (768, 1600, 8192):
        # bf16, fp32, and the model under autocast (not at 8192, where that backward spills 12 bytes).
        for dtypes in [("bf16",) * 3, ("fp32",) * 3] + ([("bf16", "fp32", "fp32")] if width < 8192 else []):
            builds[f"forward {width} {dtypes}"] = _hopper_forward(width, *dtypes)
            builds[f"backward {width} {dtypes}"] = _hopper_backward(width, *dtypes)
    # An odd width, with the flags the launchers also set: no residual, no parameters, a bias alone.
    builds["forward 771 plain"] = _hopper_forward(771, "fp16", "fp16", "fp32", residual=False, weight=False, bias=False)
    builds["backward 771 plain"] = _hopper_backward(771, "fp16", "fp16", "fp32", dstream=False, weight=False, bias=False)
    builds["backward 771 bias only"] = _hopper_backward(771, "fp16", "fp32", "fp32", dstream=False, weight=False)
    sums = dict(HAS_WEIGHT=True, HAS_BIAS=True, BLOCK_P=layernorm_module.SUM_BLOCK_P,
                BLOCK_N=layernorm_module.SUM_BLOCK_N)
    builds["sum partials"] = _hopper_build("_sum_partials_kernel", 768, {"dweight_ptr": "*bf16"}, sums, 4, 3)
    for name, result in compile_for_hopper(builds).items():
        ptx, usage = result.pop("ptx"), result
        assert usage["spill_stores"] == 0, (name, usage)
        if " 771 " not in name:
            assert count(VECTOR_LOAD, ptx) + count(ASYNC_VECTOR_COPY, ptx) > 0, name
        if name.startswith("backward") and " 8192 " not in name:
            assert count(ASYNC_COPY, ptx) > 0 and usage["registers"] <= 128, (name, usage)


@pytest.mark.gpu_smoke
@needs_cuda_autocast
def test_block_tail_under_bf16_autocast():
    module = TinyBlockTail(768).to(DEVICE)
    x = torch.randn(4, 64, 768, device=DEVICE)
    outputs = {}
    for name, norm in (("triton", layernorm), ("reference", layernorm_reference)):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs[name] = module(x, norm=norm)
    (h, y), (h_ref, y_ref) = outputs["triton"], outputs["reference"]
    assert h.dtype == y.dtype == h_ref.dtype == torch.bfloat16  # y in the autocast dtype, for the next linear
    assert_close(h, h_ref, torch.bfloat16, "h")
    assert_close(y, y_ref, torch.bfloat16, "y")

