"""The Triton SwiGLU against float64 PyTorch: what is particular to it. The contract table
(test_contract.py) checks opcheck, torch.compile, bad inputs and model parity.

Launchers run with NaN-poisoned buffers, so an element a kernel skips fails. bf16 runs in the
interpreter too: these kernels have no ``tl.dot``.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from compare import assert_close, fresh_buffers_poisoned
from conftest import DEVICE
from hopper import ASYNC_VECTOR_COPY, VECTOR_LOAD, VECTOR_STORE, Build, compile_for_hopper, count
from gpt_kernels.swiglu import swiglu, swiglu_backward, swiglu_forward

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def expected(gate_up, dy):
    """``silu(gate)·up`` and its gradient in float64 (F.silu's autograd)."""
    gate_up64 = gate_up.detach().double().requires_grad_()
    gate, up = gate_up64.chunk(2, dim=-1)
    y = F.silu(gate) * up
    y.backward(dy.double())
    return y.detach(), gate_up64.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2,), (3, 5, 38), (33, 2 * 300)], ids=str)
def test_forward_and_backward_match_float64(shape, dtype):
    gate_up = (3 * torch.randn(shape, device=DEVICE)).to(dtype)
    dy = torch.randn((*shape[:-1], shape[-1] // 2), device=DEVICE).to(dtype)
    with fresh_buffers_poisoned():
        y, dgate_up = swiglu_forward(gate_up), swiglu_backward(dy, gate_up)
    y_ref, dgate_up_ref = expected(gate_up, dy)
    assert y.dtype == dgate_up.dtype == dtype and dgate_up.shape == gate_up.shape
    assert_close(y, y_ref, dtype, "y")
    assert_close(dgate_up, dgate_up_ref, dtype, "d(gate_up)", factor=2)


@pytest.mark.parametrize("layout", ["column slice", "every other row", "transpose"])
def test_non_contiguous_inputs(layout):
    base = torch.randn(24, 40, device=DEVICE, requires_grad=True)
    gate_up = {"column slice": lambda: base[:, 2:32], "every other row": lambda: base[::2],
               "transpose": lambda: base[:20].T}[layout]()
    y = swiglu(gate_up)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dgate_up_ref = expected(gate_up, dy)
    assert_close(y, y_ref, torch.float32, "y")
    grad_ref = torch.zeros_like(base, dtype=torch.float64)
    {"column slice": lambda: grad_ref[:, 2:32], "every other row": lambda: grad_ref[::2],
     "transpose": lambda: grad_ref[:20].T}[layout]().copy_(dgate_up_ref)
    assert_close(base.grad, grad_ref, torch.float32, "d(gate_up)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_saturating_gates_stay_finite(dtype):
    """silu's sigmoid from exp(-|g|): gates far in either tail give silu = g or 0 and a slope of 1 or
    0, never inf or NaN."""
    limit = 60000.0 if dtype == torch.float16 else 1e30
    gate = torch.tensor([-limit, -200.0, -30.0, 0.0, 30.0, 200.0, limit], device=DEVICE)
    gate_up = torch.cat([gate, torch.ones_like(gate)]).to(dtype)
    y, dgate_up = swiglu_forward(gate_up), swiglu_backward(torch.ones(7, device=DEVICE, dtype=dtype), gate_up)
    assert torch.isfinite(y).all() and torch.isfinite(dgate_up).all()
    assert y[0] == y[1] == 0 and y[-1] == gate_up[6] and dgate_up[:2].tolist() == [0.0, 0.0]
    assert dgate_up[6] == 1 and dgate_up[7 + 6] == gate_up[6]  # dgate = silu'(g)·up, dup = silu(g)


def test_bf16_model_path_under_autocast():
    """The Llama MLP under bf16 autocast: the fused linear's bf16 output in, bf16 out, bf16 gradient."""
    x, weight = torch.randn(4, 16, device=DEVICE), (torch.randn(2 * 24, 16, device=DEVICE) / 4).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        gate_up = F.linear(x, weight)
        y = swiglu(gate_up)
    assert gate_up.dtype == y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert weight.grad.dtype == torch.float32 and torch.isfinite(weight.grad).all()


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_hopper_with_vector_access():
    """Both kernels compile for sm_90 at llama-124m's MLP (hidden 2048) without spills and move the
    gate, up and gradient halves in 16-byte vectors."""
    sw = importlib.import_module("gpt_kernels.swiglu")
    aligned = [r".*_ptr", "hidden", "stride_in_row", "stride_y_row", "stride_dy_row", "stride_dgate_up_row"]
    block_m, block_n = sw._block_shape(16384, 2048)
    flags = dict(BLOCK_M=block_m, BLOCK_N=block_n)
    options = dict(num_warps=sw.NUM_WARPS, num_stages=3)
    builds = {}
    for dtype in ("bf16", "fp32"):
        types = {r".*_ptr": f"*{dtype}"}
        builds[f"forward {dtype}"] = Build("gpt_kernels.swiglu", "_swiglu_forward_kernel", flags, types, aligned, options)
        builds[f"backward {dtype}"] = Build("gpt_kernels.swiglu", "_swiglu_backward_kernel", flags, types, aligned, options)
    for name, result in compile_for_hopper(builds).items():
        ptx = result["ptx"]
        assert result["spill_stores"] == 0 and count(VECTOR_LOAD, ptx) + count(ASYNC_VECTOR_COPY, ptx) > 0, name
        assert count(VECTOR_STORE, ptx) > 0, name
