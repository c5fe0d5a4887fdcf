"""SwiGLU, the Llama MLP's activation: ``silu(gate) · up`` over the fused gate/up projection.

``swiglu(gate_up)`` takes the output of one linear of width ``2·hidden`` laid out ``[gate | up]``
along the last dimension (``gate_up[..., :hidden]`` is the gate, ``gate_up[..., hidden:]`` the up
projection; Hugging Face's ``gate_proj`` rows then ``up_proj`` rows, concatenated, form that
linear's weight) and returns ``silu(gate) · up``, shape (..., hidden).

Public: ``swiglu`` (the differentiable custom op ``gpt_triton::swiglu``, backward
``gpt_triton::swiglu_backward``), ``swiglu_forward`` / ``swiglu_backward`` (the launchers) and
``swiglu_reference``.

Dtypes: the math in fp32 whatever the input; the output and the gradient (one (..., 2·hidden)
tensor, ``[dgate | dup]``) in the input's dtype; fp32, fp16 and bf16. Any even last dimension; a
ValueError for an odd one.

Numerics: ``silu(g) = g·sigmoid(g)``, the sigmoid from ``exp(-|g|)`` (never overflows, accurate in
both tails); ``d silu/dg = s·(1 + g·(1 - s))``.

One pass each way. The forward reads each row's gate and up halves and writes the product. The
backward reads ``gate_up`` and ``dy`` once and writes ``dgate`` and ``dup`` into one
(..., 2·hidden) buffer, laid out like ``gate_up``, so the linear's backward takes it as it is: no
concatenation, and nothing saved but the input (the activation is recomputed, not stored).

Layout: ``gate_up`` is viewed as rows of its last dimension, in place when its elements are
contiguous along it and through one copy otherwise; each program takes a (BLOCK_M, BLOCK_N) tile
of the hidden columns, the gate and up halves at the same columns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gpt_kernels import registry
from gpt_kernels.common import check_tensor, describe, flat_grid_tile, require_triton, rows
from gpt_kernels.host import cdiv, next_power_of_2

# Tile: up to BLOCK_N hidden columns (1024 bytes of bf16 per half-row) by as many rows as make
# TILE_ELEMENTS. Starting points for Hopper; the GPU session tunes them with bench/bench_swiglu.py.
MAX_BLOCK_N = 512
TILE_ELEMENTS = 2048
NUM_WARPS = 4


@triton.jit
def _sigmoid(g):
    a = tl.exp(-tl.abs(g))  # in (0, 1]: cannot overflow
    r = 1.0 / (1.0 + a)
    return tl.where(g >= 0, r, a * r)


@triton.jit
def _swiglu_forward_kernel(
    gate_up_ptr, y_ptr, n_rows, hidden, stride_in_row, stride_y_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = flat_grid_tile(hidden, BLOCK_M, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < hidden)
    rows64 = rows.to(tl.int64)[:, None]  # rows·stride can pass 2^31 on large activations

    gate_ptrs = gate_up_ptr + rows64 * stride_in_row + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + hidden, mask=mask, other=0.0).to(tl.float32)
    y = gate * _sigmoid(gate) * up
    tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(
    dy_ptr, gate_up_ptr, dgate_up_ptr, n_rows, hidden, stride_dy_row, stride_in_row, stride_dgate_up_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = flat_grid_tile(hidden, BLOCK_M, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < hidden)
    rows64 = rows.to(tl.int64)[:, None]

    gate_ptrs = gate_up_ptr + rows64 * stride_in_row + cols[None, :]
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + hidden, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = _sigmoid(gate)
    silu = gate * s
    dgate = dy * up * s * (1.0 + gate * (1.0 - s))
    dup = dy * silu
    dgate_ptrs = dgate_up_ptr + rows64 * stride_dgate_up_row + cols[None, :]
    tl.store(dgate_ptrs, dgate.to(dgate_up_ptr.dtype.element_ty), mask=mask)
    tl.store(dgate_ptrs + hidden, dup.to(dgate_up_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _check_input(gate_up) -> None:
    check_tensor("swiglu", "gate_up", gate_up, "a float32, float16 or bfloat16 tensor")
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension holds [gate | up] and must be even, got {tuple(gate_up.shape)}")
    require_triton("swiglu", gate_up.device, "gate_up")


def _block_shape(n_rows: int, hidden: int) -> tuple[int, int]:
    block_n = min(MAX_BLOCK_N, next_power_of_2(hidden))
    return min(TILE_ELEMENTS // block_n, next_power_of_2(n_rows)), block_n


def _grid(n_rows: int, hidden: int):
    block_m, block_n = _block_shape(n_rows, hidden)
    return (cdiv(n_rows, block_m) * cdiv(hidden, block_n),), block_m, block_n


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: ``silu(gate) · up``, shape (..., hidden), in gate_up's dtype."""
    _check_input(gate_up)
    hidden = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], hidden), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    x2, y2 = rows(gate_up, 2 * hidden), out.view(-1, hidden)
    grid, block_m, block_n = _grid(x2.shape[0], hidden)
    _swiglu_forward_kernel[grid](x2, y2, x2.shape[0], hidden, x2.stride(0), y2.stride(0),
                                 BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return out


def swiglu_backward(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    """Launch the backward kernel: ``[dgate | dup]``, one tensor shaped and typed like ``gate_up``."""
    _check_input(gate_up)
    hidden = gate_up.shape[-1] // 2
    expected = (*gate_up.shape[:-1], hidden)
    if not isinstance(dy, torch.Tensor) or tuple(dy.shape) != expected or dy.device != gate_up.device \
            or not dy.is_floating_point():
        raise ValueError(f"swiglu backward: dy must be a float tensor of shape {expected} on {gate_up.device}, "
                         f"got {describe(dy)}")
    dgate_up = torch.empty(gate_up.shape, dtype=gate_up.dtype, device=gate_up.device)
    if dgate_up.numel() == 0:
        return dgate_up
    x2, dy2, dx2 = rows(gate_up, 2 * hidden), rows(dy, hidden), dgate_up.view(-1, 2 * hidden)
    grid, block_m, block_n = _grid(x2.shape[0], hidden)
    _swiglu_backward_kernel[grid](dy2, x2, dx2, x2.shape[0], hidden, dy2.stride(0), x2.stride(0), dx2.stride(0),
                                  BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS)
    return dgate_up


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::swiglu", mutates_args=())
def _swiglu_op(gate_up: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(gate_up)


@_swiglu_op.register_fake
def _swiglu_fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


@torch.library.custom_op("gpt_triton::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate_up: torch.Tensor) -> torch.Tensor:
    return swiglu_backward(dy, gate_up)


@_swiglu_backward_op.register_fake
def _swiglu_backward_fake(dy, gate_up):
    return torch.empty_like(gate_up, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])  # the input only: the backward recomputes silu(gate)


def _backward(ctx, dy):
    (gate_up,) = ctx.saved_tensors
    return torch.ops.gpt_triton.swiglu_backward(dy, gate_up)


_swiglu_op.register_autograd(_backward, setup_context=_setup_context)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton ``silu(gate) · up`` over ``gate_up = [gate | up]``, differentiable; see the module doc.
    Bad inputs raise ValueError before anything is launched."""
    _check_input(gate_up)
    return torch.ops.gpt_triton.swiglu(gate_up)


def swiglu_reference(gate_up):
    """PyTorch reference: ``silu(gate) · up`` in fp32 (or wider), returned in ``gate_up``'s dtype."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension holds [gate | up] and must be even, got {tuple(gate_up.shape)}")
    math_dtype = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(math_dtype).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


registry.register("swiglu", reference=swiglu_reference, triton=swiglu)
