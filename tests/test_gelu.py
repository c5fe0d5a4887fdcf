"""The Triton GELU (tanh approximation, optional fused bias) against float64 PyTorch.

Launchers are tested with NaN-poisoned output buffers, so an element a kernel skips fails; the
custom op is tested through autograd, opcheck and torch.compile. bf16 runs in the interpreter too:
only ``tl.dot`` on bf16 is broken there, and this kernel has none.
"""

import importlib
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import DEVICE
from hopper import ASYNC_VECTOR_COPY, VECTOR_LOAD, VECTOR_STORE, Build, compile_for_hopper, count
from gpt_kernels.gelu import gelu, gelu_backward, gelu_forward, gelu_reference
from compare import NON_CONTIGUOUS, assert_close, fresh_buffers_poisoned, needs_cuda_autocast

# The module, not the function of the same name that gpt_kernels/__init__ exports (which
# `import gpt_kernels.gelu as ...` would give).
gelu_module = importlib.import_module("gpt_kernels.gelu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1,), (1023,), (3, 4, 768), (257, 3072)] + (
    [(4096, 3072), (1000, 6400), (3, 1, 50257)] if DEVICE == "cuda" else []
)
# The large-magnitude ranges (bf16 has fp32's exponent range, so it gets fp32's).
LARGE_RANGE = {torch.float32: 30.0, torch.float16: 10.0, torch.bfloat16: 30.0}


def make_inputs(shape, dtype, with_bias, bias_dtype=None):
    """x, bias and an upstream gradient dy. Errors are relative to the largest expected value, so a
    tensor of a few elements stays where GELU and its slope are normal numbers in fp16 (above -3);
    larger ones span GELU's tail, which their largest values keep in scale."""
    tiny = math.prod(shape) < 64
    x = (torch.rand(shape, device=DEVICE) * 4 - 2 if tiny else torch.randn(shape, device=DEVICE) * 3).to(dtype)
    bias = None
    if with_bias:
        bias = torch.rand(shape[-1], device=DEVICE) * 2 - 1 if tiny else torch.randn(shape[-1], device=DEVICE)
        bias = bias.to(bias_dtype or dtype)
    dy = torch.randn(shape, device=DEVICE)
    if tiny:
        dy = (torch.rand(shape, device=DEVICE) + 0.5) * dy.sign()
    return x, bias, dy.to(dtype)


def expected_forward_backward(x, bias, dy):
    """y, dx, dbias of gelu_tanh(x + bias) in float64: gelu_reference (F.gelu) and PyTorch's autograd."""
    x64 = x.detach().double().requires_grad_()
    bias64 = bias.detach().double().requires_grad_() if bias is not None else None
    y = gelu_reference(x64, bias64)
    y.backward(dy.double())
    return y.detach(), x64.grad, (bias64.grad if bias is not None else None)


def launch(x, bias, dy):
    """Both launchers, every buffer they allocate NaN-poisoned: ``(y, dx, dbias)``."""
    with fresh_buffers_poisoned():
        return gelu_forward(x, bias), *gelu_backward(dy, x, bias)


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_float64(shape, dtype, with_bias):
    x, bias, dy = make_inputs(shape, dtype, with_bias)
    y, dx, dbias = launch(x, bias, dy)
    y_ref, dx_ref, dbias_ref = expected_forward_backward(x, bias, dy)

    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    if with_bias:
        assert dbias.dtype == bias.dtype
        assert_close(dbias, dbias_ref, dtype, "dbias")
    else:
        assert dbias is None


@pytest.mark.gpu_smoke
def test_backward_row_strips(monkeypatch):
    # Small inputs give one row tile per backward program; allow long strips, so that programs
    # loop over several tiles, the last strip is ragged, and dbias sums several partial rows.
    monkeypatch.setattr(gelu_module, "MIN_PROGRAMS", 1)
    assert gelu_module._tiles_per_strip(row_tiles=19, col_blocks=1) == gelu_module.MAX_TILES_PER_STRIP
    x, bias, dy = make_inputs((300, 130), torch.float32, True)  # 19 tiles of 16 rows: strips of 8, 8, 3
    with fresh_buffers_poisoned():
        dx, dbias = gelu_backward(dy, x, bias)
    _, dx_ref, dbias_ref = expected_forward_backward(x, bias, dy)
    assert_close(dx, dx_ref, torch.float32, "dx")
    assert_close(dbias, dbias_ref, torch.float32, "dbias")
    # No atomics: the same inputs give the same bits (on a GPU too, where programs finish in any order).
    assert torch.equal(gelu_backward(dy, x, bias)[1], dbias)


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_magnitudes(dtype, with_bias):
    limit = LARGE_RANGE[dtype]
    x = (torch.rand(67, 301, device=DEVICE) * 2 - 1).mul(limit).to(dtype)
    bias = torch.randn(301, device=DEVICE).to(dtype) if with_bias else None
    dy = torch.randn_like(x)
    y, dx, dbias = launch(x, bias, dy)
    y_ref, dx_ref, dbias_ref = expected_forward_backward(x, bias, dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, dx_ref, dtype, "dx")
    if with_bias:
        assert_close(dbias, dbias_ref, dtype, "dbias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_values_saturate_without_nan(dtype):
    # Where x³ or x² overflow even fp32, gelu(x) is exactly x (x > 0) or 0 (x < 0), and so is
    # its slope 1 or 0: no inf - inf or 0 · inf may leak out as NaN.
    biggest = torch.finfo(dtype).max
    x = torch.tensor([biggest, -biggest, 1e4, -1e4, 100.0, -100.0, 30.0, -30.0], device=DEVICE).to(dtype)
    dy = torch.rand_like(x) + 0.5
    y, dx, _ = launch(x, None, dy)
    assert torch.equal(y, torch.where(x > 0, x, torch.zeros_like(x)))
    assert torch.equal(dx, torch.where(x > 0, dy, torch.zeros_like(dy)))


@pytest.mark.parametrize(
    "x_dtype, bias_dtype",
    [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
     (torch.bfloat16, torch.float32)],
    ids=["fp32", "fp16", "fp16+fp32bias", "bf16+fp32bias"],
)
def test_autograd_dtypes_match_reference(x_dtype, bias_dtype):
    """The autocast case: x in half precision, bias an fp32 parameter. Output and dx take x's dtype,
    dbias the bias's, in the op and in the reference alike."""
    x, bias, dy = make_inputs((5, 7, 96), x_dtype, True, bias_dtype)
    results = {}
    for name, fn in (("triton", gelu), ("reference", gelu_reference)):
        xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
        y = fn(xg, bg)
        y.backward(dy)
        assert (y.dtype, xg.grad.dtype, bg.grad.dtype) == (x_dtype, x_dtype, bias_dtype), name
        results[name] = (y, xg.grad, bg.grad)
    y_ref, dx_ref, dbias_ref = expected_forward_backward(x, bias, dy)
    for name, (y, dx, dbias) in results.items():
        assert_close(y, y_ref, x_dtype, f"{name} y")
        assert_close(dx, dx_ref, x_dtype, f"{name} dx")
        assert_close(dbias, dbias_ref, x_dtype, f"{name} dbias")


def _spread(*shape):
    return torch.randn(shape, device=DEVICE) * 3


@pytest.mark.parametrize("layout", NON_CONTIGUOUS)
def test_non_contiguous_inputs(layout):
    x = NON_CONTIGUOUS[layout](_spread)
    assert not x.is_contiguous()
    bias = torch.randn(x.shape[-1], device=DEVICE)
    dy = torch.randn(x.shape, device=DEVICE).transpose(0, 1).contiguous().transpose(0, 1)  # strided too
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    y = gelu(xg, bg)
    y.backward(dy)
    y_ref, dx_ref, dbias_ref = expected_forward_backward(x, bias, dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(xg.grad, dx_ref, torch.float32, "dx")
    assert_close(bg.grad, dbias_ref, torch.float32, "dbias")


BIAS_LAYOUTS = {
    "every_other": lambda n: torch.randn(2 * n, device=DEVICE)[::2],
    "expanded": lambda n: torch.randn(1, device=DEVICE).expand(n),  # stride 0
}


@pytest.mark.parametrize("layout", BIAS_LAYOUTS)
def test_strided_bias(layout):
    # The kernels index the bias as bias[col]: a strided view must not be read as if contiguous.
    x, _, dy = make_inputs((9, 70), torch.float32, False)
    bias = BIAS_LAYOUTS[layout](70)
    assert not bias.is_contiguous()
    y, dx, dbias = launch(x, bias, dy)
    y_ref, dx_ref, dbias_ref = expected_forward_backward(x, bias, dy)
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(dx, dx_ref, torch.float32, "dx")
    assert_close(dbias, dbias_ref, torch.float32, "dbias")


def test_scalar_input():
    x = torch.tensor(0.7, device=DEVICE, requires_grad=True)
    y = gelu(x)
    y.backward()
    y_ref, dx_ref, _ = expected_forward_backward(x, None, torch.ones_like(x))
    assert y.shape == () and x.grad.shape == ()
    assert_close(y, y_ref, torch.float32, "y")
    assert_close(x.grad, dx_ref, torch.float32, "dx")


def test_broadcast_gradient_and_empty_input():
    # .sum() hands the backward an expanded dy with stride 0.
    x, bias, _ = make_inputs((33, 70), torch.float32, True)
    xg, bg = x.clone().requires_grad_(), bias.clone().requires_grad_()
    gelu(xg, bg).sum().backward()
    _, dx_ref, dbias_ref = expected_forward_backward(x, bias, torch.ones_like(x))
    assert_close(xg.grad, dx_ref, torch.float32, "dx")
    assert_close(bg.grad, dbias_ref, torch.float32, "dbias")

    empty = torch.randn(0, 70, device=DEVICE, requires_grad=True)
    bg = bias.clone().requires_grad_()
    y = gelu(empty, bg)
    y.sum().backward()
    assert y.shape == (0, 70) and torch.equal(bg.grad, torch.zeros_like(bias))


class TinyMLP(nn.Module):
    """GPT-2's MLP as the model writes it: the first linear without its bias, fused into the GELU."""

    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x, activation=gelu):
        return self.c_proj(activation(F.linear(x, self.c_fc.weight), self.c_fc.bias))


@pytest.mark.gpu_smoke
@needs_cuda_autocast
def test_mlp_under_bf16_autocast():
    mlp = TinyMLP(64).to(DEVICE)
    x = torch.randn(4, 32, 64, device=DEVICE)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = F.linear(x, mlp.c_fc.weight)
        y = gelu(h, mlp.c_fc.bias)
        y_ref = gelu_reference(h, mlp.c_fc.bias)
    assert h.dtype == y.dtype == torch.bfloat16
    assert_close(y, y_ref, torch.bfloat16, "y")
    y.float().square().sum().backward()
    assert mlp.c_fc.bias.grad.dtype == torch.float32


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_hopper_with_vector_loads():
    """The model's case (bf16 activation, fp32 bias, (16384, 3072)) as launched: the activation is
    moved in 16-byte vectors, never one bf16 element at a time. The backward's strip loop is
    software-pipelined: x and dy arrive by 16-byte cp.async copies (the next tile's while this one
    computes)."""
    block_m, block_n = gelu_module._block_shape(16384, 3072)
    tile = dict(HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=block_n)
    aligned = [r".*_ptr", "n_cols", r"stride.*"]
    built = compile_for_hopper({
        "forward": Build("gpt_kernels.gelu", "_gelu_forward_kernel", tile,
                         {"x_ptr|y_ptr": "*bf16", "bias_ptr": "*fp32"}, aligned,
                         dict(num_warps=gelu_module.NUM_WARPS, num_stages=3)),
        "backward": Build("gpt_kernels.gelu", "_gelu_backward_kernel",
                          dict(tile, TILES_PER_STRIP=gelu_module.MAX_TILES_PER_STRIP, NUM_STAGES=gelu_module.BACKWARD_STAGES),
                          {"dy_ptr|x_ptr|dx_ptr": "*bf16", "bias_ptr|dbias_partial_ptr": "*fp32"}, aligned,
                          dict(num_warps=gelu_module.NUM_WARPS, num_stages=2)),
    })
    forward, backward = built["forward"]["ptx"], built["backward"]["ptx"]
    assert count(VECTOR_LOAD, forward) >= 1 and count(VECTOR_STORE, forward) >= 1
    assert count(ASYNC_VECTOR_COPY, backward) >= 2 and count(VECTOR_STORE, backward) >= 1
    for ptx in (forward, backward):  # never one bf16 element at a time
        assert count(r"ld\.global\.b16", ptx) == count(r"st\.global\.b16", ptx) == 0

