"""The Triton RMSNorm (fused residual add) against float64 PyTorch: what is particular to it. The
contract table (test_contract.py) checks opcheck, torch.compile, bad inputs and model parity.

Launchers run with NaN-poisoned buffers, so an element a kernel skips fails. bf16 runs in the
interpreter too: these kernels have no ``tl.dot``.
"""

import importlib

import pytest
import torch

from compare import assert_close, fresh_buffers_poisoned
from conftest import DEVICE
from hopper import ASYNC_VECTOR_COPY, VECTOR_LOAD, Build, compile_for_hopper, count
from gpt_kernels.rmsnorm import rmsnorm, rmsnorm_backward, rmsnorm_forward, rmsnorm_reference

rmsnorm_module = importlib.import_module("gpt_kernels.rmsnorm")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-6


def rows_with_large_mean(shape, dtype, seed):
    """Fresh random rows, the last of them with a large mean and a tiny spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x.view(-1, shape[-1])[-1] = 300.0 + 1e-3 * x.view(-1, shape[-1])[-1]
    return x.to(DEVICE, dtype)


def expected(x, weight, residual, dy, dstream):
    """y, stream, dx, dresidual, dweight in float64, by the reference's autograd."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, residual)]
    x64, w64, r64 = leaves
    out = rmsnorm_reference(x64, w64, EPS, residual=r64)
    outs = out if residual is not None else (out,)
    upstream = [dy.double()] + ([dstream.double()] if residual is not None else [])
    torch.autograd.backward(outs, upstream)
    return outs[0].detach(), outs[1].detach() if residual is not None else None, x64.grad, \
        (r64.grad if residual is not None else None), (w64.grad if weight is not None else None)


@pytest.mark.parametrize("with_weight", [True, False], ids=["weight", "no-weight"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(5,), (3, 37), (2, 5, 300)], ids=str)
def test_forward_and_backward_match_float64(shape, dtype, with_residual, with_weight):
    x = rows_with_large_mean(shape, dtype, 0)
    residual = rows_with_large_mean(shape, dtype, 1) if with_residual else None
    weight = torch.randn(shape[-1], device=DEVICE).to(dtype) if with_weight else None
    dy, dstream = torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype)
    with fresh_buffers_poisoned():
        y, stream, rstd = rmsnorm_forward(x, weight, EPS, residual)
        dx, dresidual, dweight = rmsnorm_backward(dy, stream if with_residual else x, weight, rstd,
                                                  dstream if with_residual else None)
    y_ref, stream_ref, dx_ref, dresidual_ref, dweight_ref = expected(x, weight, residual, dy, dstream)
    assert y.dtype == dx.dtype == dtype and dresidual is None
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx", factor=2)
    if with_residual:
        assert stream.dtype == dtype
        assert_close(stream, stream_ref, dtype, "stream")
        assert_close(dx, dresidual_ref, dtype, "dresidual", factor=2)
    if with_weight:
        assert dweight.dtype == dtype
        assert_close(dweight, dweight_ref, dtype, "dweight", factor=4)


def test_model_dtypes_under_autocast():
    """The Llama block under bf16 autocast: a bf16 branch, the fp32 stream, an fp32 weight. y comes out
    bf16 (the next linear's dtype), the stream fp32, each gradient in its input's dtype, from a bf16 dy."""
    x = torch.randn(6, 64, device=DEVICE).bfloat16().requires_grad_()
    residual = torch.randn(6, 64, device=DEVICE).requires_grad_()
    weight = (1 + torch.randn(64, device=DEVICE) / 4).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, stream = rmsnorm(x, weight, EPS, residual=residual)
        y_ref, stream_ref = rmsnorm_reference(x, weight, EPS, residual=residual)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and stream.dtype == torch.float32
    assert_close(y, y_ref, torch.bfloat16, "y")
    assert torch.equal(stream, stream_ref)
    (y.float().square().sum() + stream.sum()).backward()
    grads = [t.grad for t in (x, residual, weight)]
    for t in (x, residual, weight):
        t.grad = None
    (y_ref.float().square().sum() + stream_ref.sum()).backward()
    for grad, t, name in zip(grads, (x, residual, weight), ("dx", "dresidual", "dweight")):
        assert grad.dtype == t.dtype, name
        assert_close(grad, t.grad, torch.bfloat16, name, factor=2)


@pytest.mark.parametrize("layout", ["column slice", "transpose"])
def test_non_contiguous_inputs(layout):
    base = torch.randn(40, 24, device=DEVICE)
    x = base[:, 3:20] if layout == "column slice" else base[:17].T
    residual, weight = torch.randn(x.shape, device=DEVICE).T.contiguous().T, torch.randn(24, device=DEVICE)[::1]
    weight = torch.randn(2 * x.shape[-1], device=DEVICE)[::2]  # strided gain
    y, stream = rmsnorm(x, weight, EPS, residual=residual)
    y_ref, _ = rmsnorm_reference(x.double(), weight.double(), EPS, residual=residual.double())
    assert_close(y, y_ref, torch.float32, "y")
    assert torch.equal(stream, x + residual)


def test_backward_loops_over_row_tiles_deterministically():
    """More row tiles than backward programs: each program walks several, dweight sums their partial
    rows in a fixed order, so the same inputs give the same bits."""
    x, weight, dy = torch.randn(300, 40, device=DEVICE), torch.randn(40, device=DEVICE), torch.randn(300, 40, device=DEVICE)
    _, _, rstd = rmsnorm_forward(x, weight, EPS)
    _, _, dweight = rmsnorm_backward(dy, x, weight, rstd)
    *_, dweight_ref = expected(x, weight, None, dy, None)
    assert_close(dweight, dweight_ref, torch.float32, "dweight", factor=4)
    assert torch.equal(rmsnorm_backward(dy, x, weight, rstd)[2], dweight)


def test_only_the_stream_used():
    """The last block's stream output alone reaches the loss: its gradient passes straight through."""
    x, residual = torch.randn(3, 8, device=DEVICE, requires_grad=True), torch.randn(3, 8, device=DEVICE).half()
    residual.requires_grad_()
    _, stream = rmsnorm(x, torch.ones(8, device=DEVICE), EPS, residual=residual)
    stream.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and residual.grad.dtype == torch.float16


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_hopper_without_spills():
    """Both kernels compile for sm_90 at llama widths (768, 4096) in fp32 and the autocast mix, fit in
    registers (ptxas: 40-86 per thread, no spills), and read aligned rows 16 bytes at a time."""
    ln = importlib.import_module("gpt_kernels.layernorm")
    aligned = [r".*_ptr", "n_cols", "stride_x_row", "stride_residual_row", "stride_y_row", "stride_stream_row",
               "stride_dy_row", "stride_dstream_row", "stride_dx_row", "stride_dresidual_row"]
    builds = {}
    # The model under autocast (bf16 x, fp32 stream and weight: the most registers) and, at the widest, fp32.
    for width, dtypes in ((768, (("bf16", "fp32", "fp32"),)), (4096, (("fp32",) * 3, ("bf16", "fp32", "fp32")))):
        for x, stream, weight in dtypes:
            block_m, block_n, warps = ln._tile(16384, width, ln.FORWARD_TILE_ELEMENTS, ln.FORWARD_WARP_ELEMENTS)
            types = {"x_ptr|y_ptr": f"*{x}", "residual_ptr|stream_ptr": f"*{stream}", "weight_ptr": f"*{weight}",
                     r".*_ptr": "*fp32", "eps": "fp32"}
            builds[f"forward {width} {x}/{stream}"] = Build(
                "gpt_kernels.rmsnorm", "_rms_norm_forward_kernel",
                dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, BLOCK_M=block_m, BLOCK_N=block_n), types, aligned,
                dict(num_warps=warps, num_stages=3))
            block_m, block_n, warps = ln._tile(16384, width, ln.BACKWARD_TILE_ELEMENTS, ln.BACKWARD_WARP_ELEMENTS)
            types = {"dy_ptr|dx_ptr": f"*{x}", "dstream_ptr|stream_ptr|dresidual_ptr": f"*{stream}",
                     "weight_ptr": f"*{weight}", r".*_ptr": "*fp32", "eps": "fp32"}
            flags = dict(HAS_DSTREAM=True, WRITE_DRESIDUAL=x != stream, HAS_WEIGHT=True, BLOCK_M=block_m,
                         BLOCK_N=block_n, NUM_STAGES=ln.backward_stages(warps))
            builds[f"backward {width} {x}/{stream}"] = Build("gpt_kernels.rmsnorm", "_rms_norm_backward_kernel", flags,
                                                             types, aligned, dict(num_warps=warps, num_stages=2))
    for name, result in compile_for_hopper(builds).items():
        ptx = result["ptx"]
        assert result["spill_stores"] == 0 and count(VECTOR_LOAD, ptx) + count(ASYNC_VECTOR_COPY, ptx) > 0, name
