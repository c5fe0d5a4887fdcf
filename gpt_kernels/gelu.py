"""GPT-2's GELU (the tanh approximation), with an optional fused bias add.

``gelu(x, bias=None)`` returns ``gelu_tanh(x + bias)``. The MLP runs its first linear without a
bias and hands the bias to this op, so the pre-activation is read once and the activation written
once: the bias add costs no extra pass over the ``(B·T, 4·C)`` tensor, the largest elementwise
tensor in the model.

Public: ``gelu`` (the differentiable custom op ``gpt_triton::gelu``, backward ``gpt_triton::gelu_backward``),
``gelu_forward`` / ``gelu_backward`` (the launchers) and ``gelu_reference``.

Dtypes (custom ops are not autocast-aware, and under bf16 autocast ``x`` is bf16 while ``bias``
is an fp32 parameter): the math is fp32 whatever the inputs; each input is read in its own dtype;
the output and ``dx`` have ``x``'s dtype, ``dbias`` has ``bias``'s. fp32, fp16 and bf16 inputs.

Numerics: ``0.5·(1 + tanh(u)) = sigmoid(2u)``, so ``gelu(h) = h·sigmoid(2u)`` with
``u = √(2/π)·(h + 0.044715·h³)``. The sigmoid is evaluated from ``exp(-|2u|)``, which never
overflows and stays accurate in the negative tail where ``1 + tanh(u)`` cancels. ``h`` is clamped
to ±20 inside ``u``: there ``exp(-|2u|)`` already underflows to 0 in fp32, so the clamp changes no
result, but it keeps ``h³`` and ``h²`` finite for any finite input (no ``0·inf = NaN``).

Layout: the input is viewed as rows of its last dimension (the bias dimension), in place when its
elements are contiguous along that dimension (a column slice, every other row) and through one
contiguous copy otherwise (a transpose); a strided bias is copied to unit stride; outputs are
always contiguous. The forward kernel maps one program to a ``(BLOCK_M, BLOCK_N)`` tile, so the
bias block is loaded once per tile instead of gathered per element. The backward kernel walks a
strip of rows per program for one column block, writes ``dx``, and keeps the tile's column sums of
``dh`` in fp32 registers; each strip writes one row of partial sums and a deterministic ``sum(0)``
finishes ``dbias`` (no atomics, so runs are bit-reproducible).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gpt_kernels import registry
from gpt_kernels.common import check_same_device, check_tensor, flat_grid_tile, require_triton, rows, unit_stride
from gpt_kernels.host import cdiv, next_power_of_2


# Tile shape: BLOCK_N columns (256 bf16 = 512 contiguous bytes per row, full 128-byte lines, and
# divides 4·C for every GPT-2 width) by as many rows as make TILE_ELEMENTS. Starting points for
# Hopper; the GPU session tunes them with bench/bench_gelu.py.
MAX_BLOCK_N = 256
TILE_ELEMENTS = 4096
NUM_WARPS = 8
# The backward's strip loop is software-pipelined this deep (two stages: one tile in flight; sm_90
# builds it with cp.async at 64 registers, three stages take 76).
BACKWARD_STAGES = 2
# The backward's strip of rows per program is a power of two up to this many tiles, as long as
# the grid keeps at least MIN_PROGRAMS programs (several waves on 132 SMs): longer strips mean
# fewer partial dbias rows to write and sum.
MAX_TILES_PER_STRIP = 8
MIN_PROGRAMS = 1024

_SQRT_2_OVER_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_KAPPA = tl.constexpr(0.044715)
_CLAMP = tl.constexpr(20.0)


@triton.jit
def _sigmoid_2u(h):
    """For fp32 ``h``: ``sigmoid(2u)``, ``sigmoid(2u)·(1 - sigmoid(2u))`` and the clamped ``h`` they
    were computed from, overflow-free (see the module doc)."""
    hc = tl.minimum(tl.maximum(h, -_CLAMP), _CLAMP)
    z = 2.0 * _SQRT_2_OVER_PI * (hc + _KAPPA * hc * hc * hc)
    a = tl.exp(-tl.abs(z))  # in (0, 1]: exp(-|z|) cannot overflow
    r = 1.0 / (1.0 + a)
    # 1 - a·r rather than r for z >= 0: once a underflows to 0 this is exactly 1 (gelu(h) = h,
    # slope 1) even where the GPU's fp32 division is approximate and 1/1 might not come out as 1.
    s = tl.where(z >= 0, 1.0 - a * r, a * r)
    return s, a * r * r, hc


@triton.jit
def _gelu_forward_kernel(
    x_ptr, bias_ptr, y_ptr,
    n_rows, n_cols, stride_x_row, stride_y_row,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = flat_grid_tile(n_cols, BLOCK_M, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # rows·stride can pass 2^31 on large activations

    h = tl.load(x_ptr + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    s, _, _ = _sigmoid_2u(h)
    y = h * s
    tl.store(y_ptr + rows64[:, None] * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_backward_kernel(
    dy_ptr, x_ptr, bias_ptr, dx_ptr, dbias_partial_ptr,
    n_rows, n_cols, stride_dy_row, stride_x_row, stride_dx_row,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TILES_PER_STRIP: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    col_blocks = tl.cdiv(n_cols, BLOCK_N)  # a flat grid, as in the forward
    strip = tl.program_id(0) // col_blocks
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dbias_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Software-pipelined (cp.async on sm_90): the next tile's h and dy load while this one computes.
    for tile in tl.range(TILES_PER_STRIP, num_stages=NUM_STAGES):
        rows = (strip * TILES_PER_STRIP + tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < n_rows) & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        h = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += bias[None, :]
        s, s_one_minus_s, hc = _sigmoid_2u(h)
        # d/dh [h·sigmoid(2u)] = s + h·s(1-s)·2·du/dh. Where |h| > clamp, s(1-s) is exactly 0.
        du_dh = _SQRT_2_OVER_PI * (1.0 + 3.0 * _KAPPA * hc * hc)
        dh = dy * (s + 2.0 * hc * s_one_minus_s * du_dh)
        tl.store(dx_ptr + rows64 * stride_dx_row + cols[None, :], dh.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            dbias_acc += dh  # masked elements are 0 (dy loaded as 0)
    if HAS_BIAS:
        tl.store(dbias_partial_ptr + strip * n_cols + cols, tl.sum(dbias_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------- launchers


def _check_inputs(x: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    """ValueError for anything the kernels cannot take, saying what was expected."""
    check_tensor("gelu", "x", x, "a float32, float16 or bfloat16 tensor")
    require_triton("gelu", x.device, "x")
    if bias is None:
        return
    check_tensor("gelu", "bias", bias, "a float32, float16 or bfloat16 tensor or None")
    check_same_device("gelu", "bias", bias, "x", x)
    if x.dim() == 0 or bias.dim() != 1 or bias.shape[0] != x.shape[-1]:
        raise ValueError(
            f"gelu: bias must be 1-D with x's last dimension, i.e. shape ({x.shape[-1] if x.dim() else '?'},); "
            f"got bias {tuple(bias.shape)} for x {tuple(x.shape)}"
        )


def _block_shape(n_rows: int, n_cols: int) -> tuple[int, int]:
    block_n = min(MAX_BLOCK_N, next_power_of_2(n_cols))
    block_m = min(TILE_ELEMENTS // block_n, next_power_of_2(n_rows))
    return block_m, block_n


def _tiles_per_strip(row_tiles: int, col_blocks: int) -> int:
    """Row tiles each backward program walks: a power of two, at most MAX_TILES_PER_STRIP, while
    the grid keeps MIN_PROGRAMS programs. (Without a bias there is nothing to reduce: 1.)"""
    tiles = 1
    while tiles < MAX_TILES_PER_STRIP and cdiv(row_tiles, 2 * tiles) * col_blocks >= MIN_PROGRAMS:
        tiles *= 2
    return tiles


def gelu_forward(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the forward kernel: ``gelu_tanh(x + bias)`` in x's dtype."""
    _check_inputs(x, bias)
    bias = unit_stride(bias)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_cols = x.shape[-1] if x.dim() else 1
    if x.numel() == 0:
        return out
    x2, y2 = rows(x, n_cols), out.view(-1, n_cols)
    n_rows = x2.shape[0]
    block_m, block_n = _block_shape(n_rows, n_cols)
    grid = (cdiv(n_rows, block_m) * cdiv(n_cols, block_n),)
    _gelu_forward_kernel[grid](
        x2, bias if bias is not None else x2, y2,
        n_rows, n_cols, x2.stride(0), y2.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=NUM_WARPS,
    )
    return out


def gelu_backward(
    dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the backward kernel: ``(dx, dbias)`` from the upstream gradient and the saved inputs;
    ``dbias`` is None without a bias."""
    _check_inputs(x, bias)
    bias = unit_stride(bias)
    check_tensor("gelu backward", "dy", dy, f"a float tensor shaped like x {tuple(x.shape)} on {x.device}",
                 shape=x.shape, device=x.device)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_cols = x.shape[-1] if x.dim() else 1
    if x.numel() == 0:
        return dx, (torch.zeros_like(bias) if bias is not None else None)

    x2, dy2, dx2 = rows(x, n_cols), rows(dy, n_cols), dx.view(-1, n_cols)
    n_rows = x2.shape[0]
    block_m, block_n = _block_shape(n_rows, n_cols)
    row_tiles, col_blocks = cdiv(n_rows, block_m), cdiv(n_cols, block_n)
    tiles_per_strip = _tiles_per_strip(row_tiles, col_blocks) if bias is not None else 1
    n_strips = cdiv(row_tiles, tiles_per_strip)
    partial = torch.empty((n_strips, n_cols), dtype=torch.float32, device=x.device) if bias is not None else x2
    _gelu_backward_kernel[(n_strips * col_blocks,)](
        dy2, x2, bias if bias is not None else x2, dx2, partial,
        n_rows, n_cols, dy2.stride(0), x2.stride(0), dx2.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, TILES_PER_STRIP=tiles_per_strip,
        NUM_STAGES=BACKWARD_STAGES, num_warps=NUM_WARPS, num_stages=2,
    )
    dbias = partial.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dbias


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::gelu", mutates_args=())
def _gelu_op(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return gelu_forward(x, bias)


@_gelu_op.register_fake
def _gelu_fake(x, bias):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


# Returns [dx] without a bias and [dx, dbias] with one: a schema cannot return an optional tensor.
@torch.library.custom_op("gpt_triton::gelu_backward", mutates_args=())
def _gelu_backward_op(dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor]) -> list[torch.Tensor]:
    dx, dbias = gelu_backward(dy, x, bias)
    return [dx] if dbias is None else [dx, dbias]


@_gelu_backward_op.register_fake
def _gelu_backward_fake(dy, x, bias):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return [dx] if bias is None else [dx, torch.empty(bias.shape, dtype=bias.dtype, device=bias.device)]


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    # The inputs, not the pre-activation x + bias: x is kept alive anyway and the backward adds
    # the bias again for free, so the op stores nothing extra.
    ctx.save_for_backward(x, bias)


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    grads = torch.ops.gpt_triton.gelu_backward(dy, x, bias)
    return grads[0], (grads[1] if bias is not None else None)


_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def gelu(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton GELU (tanh approximation) of ``x + bias``, differentiable in both; see the module doc
    for dtypes. Bad inputs raise ValueError before anything is launched."""
    _check_inputs(x, bias)
    return torch.ops.gpt_triton.gelu(x, bias)


def gelu_reference(x, bias=None):
    """PyTorch reference: ``gelu_tanh(x + bias)`` with the Triton op's dtype contract: math in fp32
    (or wider, for float64 inputs), output and dx in x's dtype, dbias in bias's dtype. Upcasting
    changes nothing for a single half dtype, since F.gelu computes those in fp32 anyway; for bf16 x
    with an fp32 bias (autocast) it makes the add fp32, as in the kernel."""
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    if bias is not None:
        math_dtype = torch.promote_types(math_dtype, bias.dtype)
    h = x.to(math_dtype)
    if bias is not None:
        h = h + bias.to(math_dtype)
    return F.gelu(h, approximate="tanh").to(x.dtype)


registry.register("gelu", reference=gelu_reference, triton=gelu)
