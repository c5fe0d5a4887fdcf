"""The Triton RoPE against float64 PyTorch: what is particular to it. The contract table
(test_contract.py) checks opcheck, torch.compile, bad inputs and model parity; test_llama.py the
reference against complex numbers and transformers.

Launchers run with NaN-poisoned buffers, so an element a kernel skips fails. bf16 runs in the
interpreter too: this kernel has no ``tl.dot``.
"""

import importlib

import pytest
import torch

from compare import assert_close, fresh_buffers_poisoned
from conftest import DEVICE
from hopper import ASYNC_VECTOR_COPY, VECTOR_LOAD, VECTOR_STORE, Build, compile_for_hopper, count
from gpt_kernels.rope import rope, rope_forward, rope_reference, rope_table

rope_module = importlib.import_module("gpt_kernels.rope")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def projection_views(B, T, Hq, Hkv, D, dtype):
    """q and k as the model has them: strided (B, T, H, D) views of one [q | k | v] projection."""
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEVICE).to(dtype)
    q, k, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=2)
    return q.view(B, T, Hq, D), k.view(B, T, Hkv, D)


def expected(q, k, cos, sin, positions, dq_rot, dk_rot):
    """q_rot, k_rot, dq, dk in float64, by the reference's autograd."""
    q64, k64 = (t.detach().double().requires_grad_() for t in (q, k))
    outs = rope_reference(q64, k64, cos.double(), sin.double(), positions)
    torch.autograd.backward(outs, [dq_rot.double(), dk_rot.double()])
    return outs[0].detach(), outs[1].detach(), q64.grad, k64.grad


@pytest.mark.parametrize("per_row", [False, True], ids=["positions (T,)", "positions (B, T)"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_and_backward_match_float64(dtype, per_row):
    # Odd T and half-dim (D = 10), grouped heads; 20 query heads: more than one HEAD_BLOCK.
    B, T, Hq, Hkv, D = 2, 5, 20, 4, 10
    q, k = projection_views(B, T, Hq, Hkv, D, dtype)
    cos, sin = rope_table(40, D, 5000.0, DEVICE)
    positions = torch.tensor([[30, 31, 32, 33, 34], [0, 1, 2, 3, 4]], device=DEVICE, dtype=torch.int32)
    positions = positions if per_row else positions[0].long()
    dq_rot, dk_rot = torch.randn(q.shape, device=DEVICE).to(dtype), torch.randn(k.shape, device=DEVICE).to(dtype)
    with fresh_buffers_poisoned():
        q_rot, k_rot = rope_forward(q, k, cos, sin, positions)
        dq, dk = rope_forward(dq_rot, dk_rot, cos, sin, positions, inverse=True)
    q_ref, k_ref, dq_ref, dk_ref = expected(q, k, cos, sin, positions, dq_rot, dk_rot)
    for got, want, name in ((q_rot, q_ref, "q_rot"), (k_rot, k_ref, "k_rot"), (dq, dq_ref, "dq"), (dk, dk_ref, "dk")):
        assert got.dtype == dtype and got.is_contiguous(), name
        assert_close(got, want, dtype, name)


def test_autograd_through_the_projection():
    """q and k views of one projection: their gradients land in its gradient; v's part stays 0."""
    q, k = projection_views(2, 3, 2, 1, 8, torch.float32)
    qkv = q._base.detach().requires_grad_()
    q, k, _ = qkv.split([16, 8, 8], dim=2)
    q, k = q.view(2, 3, 2, 8), k.view(2, 3, 1, 8)
    cos, sin = rope_table(8, 8, 10000.0, DEVICE)
    positions = torch.arange(2, 5, device=DEVICE)
    q_rot, k_rot = rope(q, k, cos, sin, positions)
    (q_rot.sum(2, keepdim=True) * k_rot).square().sum().backward()
    grad = qkv.grad.clone()
    qkv.grad = None
    q_ref, k_ref = rope_reference(q, k, cos, sin, positions)
    (q_ref.sum(2, keepdim=True) * k_ref).square().sum().backward()
    assert_close(grad, qkv.grad, torch.float32, "d(qkv)")
    assert torch.equal(grad[..., 24:], torch.zeros_like(grad[..., 24:]))


def test_inverse_undoes_the_rotation_and_head_dim_strides_are_copied():
    q = torch.randn(1, 4, 3, 16, device=DEVICE).transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    k = torch.randn(1, 4, 2, 16, device=DEVICE)
    cos, sin = rope_table(8, 16, 10000.0, DEVICE)
    positions = torch.tensor([7, 0, 3, 5], device=DEVICE)
    back = rope_forward(*rope_forward(q, k, cos, sin, positions), cos, sin, positions, inverse=True)
    assert_close(back[0], q, torch.float32, "q")
    assert_close(back[1], k, torch.float32, "k")


def test_position_outside_the_table_gives_nan_not_a_stray_read():
    q, k = torch.randn(1, 2, 1, 4, device=DEVICE), torch.randn(1, 2, 1, 4, device=DEVICE)
    cos, sin = rope_table(4, 4, 10000.0, DEVICE)
    q_rot, k_rot = rope_forward(q, k, cos, sin, torch.tensor([3, 4], device=DEVICE))
    assert torch.isfinite(q_rot[:, 0]).all() and torch.isnan(q_rot[:, 1]).all() and torch.isnan(k_rot[:, 1]).all()


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_kernel_compiles_for_hopper_without_spills():
    """The kernel compiles for sm_90 at head dim 64 in bf16 and fp32, without spills, and moves both
    halves of each head in 16-byte vectors."""
    rp = importlib.import_module("gpt_kernels.rope")
    aligned = [r".*_ptr", r"stride(?!.*positions).*"]
    flags = dict(INVERSE=False, HALF=32, HEAD_BLOCK=rp.HEAD_BLOCK, BLOCK_HALF=32)  # D = 64
    builds = {f"rope {dtype}": Build("gpt_kernels.rope", "_rope_kernel", flags,
                                     {"positions_ptr": "*i64", r".*_ptr": f"*{dtype}"}, aligned,
                                     dict(num_warps=rp.NUM_WARPS, num_stages=3))
              for dtype in ("bf16", "fp32")}
    for name, result in compile_for_hopper(builds).items():
        ptx = result["ptx"]
        assert result["spill_stores"] == 0 and count(VECTOR_LOAD, ptx) + count(ASYNC_VECTOR_COPY, ptx) > 0, name
        assert count(VECTOR_STORE, ptx) > 0, name
