"""LayerNorm over the last dimension, with an optional fused residual add.

``layernorm(x, weight, bias, eps, residual=None)``: with ``residual`` it returns
``(layernorm(x + residual), x + residual)``, the pre-norm block's add-then-norm in one call.

Public: ``layernorm`` (the differentiable custom ops ``gpt_triton::layer_norm`` and
``gpt_triton::layer_norm_residual``, backward ``gpt_triton::layer_norm_backward``),
``layernorm_forward`` / ``layernorm_backward`` (the launchers) and ``layernorm_reference``.

Dtypes (custom ops are not autocast-aware; in the model, under bf16 autocast, ``x`` is a linear's
bf16 output, ``residual`` the fp32 stream and the parameters fp32):

* the sum ``x + residual`` is computed in fp32 and stored in ``promote_types(x, residual)``;
* the normalized output has the dtype of the stream it normalizes (the sum, or ``x`` without a
  residual), except under autocast, where it has the autocast dtype: the next op is a linear,
  which autocast would cast it to anyway, and writing bf16 saves that cast (a read and a write of
  the fp32 output) and its backward's upcast of ``dy`` (the backward reads a bf16 ``dy`` as it is);
* ``weight`` and ``bias`` are read in their own dtype, which is the stream's or fp32;
* statistics and all arithmetic are fp32; every gradient comes back in its input's dtype.

Forward: one read of each input row, kept in registers. The mean, then the variance of the
centred row (two reductions over registers, no ``E[x²] - E[x]²`` cancellation); ``mean`` and
``rstd`` (fp32, one per row) are saved for the backward. With a residual, the sum is rounded to
its stored dtype *before* it is normalized, so the backward, which reads the stored sum back,
sees exactly the values the forward normalized.

Backward: ``dx = rstd·(w·dy - mean(w·dy) - x̂·mean(x̂·w·dy))`` from the saved statistics, plus the
gradient that reaches the stream output directly. ``x`` and ``residual`` get that same gradient
(each in its own dtype: one write when their dtypes agree, two when they differ). A fixed number
of programs walk the row tiles and keep ``Σ dy·x̂`` and ``Σ dy`` per column in fp32 registers;
each writes one row of partial sums, and a second small kernel adds them up (in a fixed order)
into ``dweight`` and ``dbias``: no second pass over ``x``, no atomics (runs are bit-reproducible).

Layout: inputs are viewed as rows of the last dimension, in place when their elements are
contiguous along it and through one contiguous copy otherwise (``weight`` and ``bias`` too, when
strided); outputs are contiguous. One program takes a ``(BLOCK_M, BLOCK_N)`` tile: ``BLOCK_N`` is
the row width rounded up to a power of two (masked), and narrow rows are stacked ``BLOCK_M`` high
so each program moves a useful amount of memory. Widths up to ``MAX_WIDTH``: from 16384 on the
backward's row no longer fits in registers (ptxas spills; slow but exact), from 32768 on the
forward's.
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gpt_kernels import registry
from gpt_kernels.common import (
    FLOAT_DTYPES as SUPPORTED_DTYPES, check_same_device, check_tensor, describe, require_triton, rows, unit_stride,
)
from gpt_kernels.host import cdiv, next_power_of_2

MAX_WIDTH = 65536

# Tile sizes and warps, picked from the row width (no autotuning: the first training step must not
# wait for it). Starting points for Hopper; the GPU session tunes them with bench/bench_layernorm.py.
# A tile holds about *_TILE_ELEMENTS elements (several rows when they are narrow), and gets one warp
# per *_WARP_ELEMENTS of them, within [MIN_WARPS, MAX_WARPS]. The backward holds about twice the
# live values per element (x, dy, x̂, the gradient, the stream's own gradient): triton 3.6's ptxas
# (sm_90) gives it 72-95 registers at 8 elements per thread at GPT-2 widths, against 108-115 at 16;
# the forward takes 40-64 at 16. No spills up to width 8192, but for 12 bytes in the mixed-dtype
# backward (bf16 x, fp32 stream) at 8192, where 32 warps cap a thread at 64 registers.
FORWARD_TILE_ELEMENTS, FORWARD_WARP_ELEMENTS = 4096, 512
BACKWARD_TILE_ELEMENTS, BACKWARD_WARP_ELEMENTS = 2048, 256
MIN_WARPS, MAX_WARPS = 4, 32
# The backward runs this many programs per SM (fewer when there are fewer tiles), each looping over
# row tiles: fewer programs mean fewer partial dweight/dbias rows to write and sum. On the CPU
# (interpreter) a handful, so that tests exercise the loop.
BACKWARD_PROGRAMS_PER_SM = 2
# Pipeline depth of the backward's row loop: two stages (one tile in flight). Tiles that need
# MAX_WARPS (widths from 8192: 64 registers per thread) run unpipelined, since the extra buffers
# make the fp32 backward spill there.
BACKWARD_STAGES = 2
INTERPRETER_BACKWARD_PROGRAMS = 4
# The partial rows are summed by a (SUM_BLOCK_P, SUM_BLOCK_N) tile per column block. Narrow column
# blocks, because this grid is all the parallelism the sum has: at width 768, 32 columns give 24
# programs to read the 264 partial rows (1.6 MB), where 128 gave 6 programs on 6 of 132 SMs.
SUM_BLOCK_P, SUM_BLOCK_N = 64, 32


@triton.jit
def _load_stream_tile(
    x_ptr, residual_ptr, stream_ptr, n_rows, n_cols, stride_x_row, stride_residual_row, stride_stream_row,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A norm forward's first step (LayerNorm and RMSNorm): this program's (BLOCK_M, BLOCK_N) tile of
    ``x`` in fp32, with the residual added and the stream stored (rounded to its dtype, as it is
    normalized so) when there is one. Returns the tile and its indices and masks."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]  # rows·stride can pass 2^31 on large activations

    x = tl.load(x_ptr + rows64 * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + rows64 * stride_residual_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        stream = x.to(stream_ptr.dtype.element_ty)
        tl.store(stream_ptr + rows64 * stride_stream_row + cols[None, :], stream, mask=mask)
        x = stream.to(tl.float32)  # normalize what was stored: the backward reads it back
    return x, rows, cols, row_mask, col_mask, mask, rows64


@triton.jit
def _load_backward_tile(tile, stream_ptr, dy_ptr, n_rows, cols, col_mask, stride_stream_row, stride_dy_row,
                        BLOCK_M: tl.constexpr):
    """A norm backward's row tile ``tile`` (LayerNorm and RMSNorm): the normalized stream and ``dy`` in
    fp32, with the tile's row indices and masks."""
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(stream_ptr + rows64 * stride_stream_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows64 * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, dy, rows, row_mask, mask, rows64


@triton.jit
def _store_stream_grad(
    dx, dstream_ptr, dx_ptr, dresidual_ptr, rows64, cols, mask, stride_dstream_row, stride_dx_row,
    stride_dresidual_row, HAS_DSTREAM: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr,
):
    """A norm backward's last step for one tile (LayerNorm and RMSNorm): add the gradient reaching the
    stream output directly to ``dx`` (fp32), store it as dx and, in its own dtype, as dresidual."""
    if HAS_DSTREAM:
        dstream = tl.load(dstream_ptr + rows64 * stride_dstream_row + cols[None, :], mask=mask, other=0.0)
        dx += dstream.to(tl.float32)
    tl.store(dx_ptr + rows64 * stride_dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if WRITE_DRESIDUAL:
        tl.store(dresidual_ptr + rows64 * stride_dresidual_row + cols[None, :],
                 dx.to(dresidual_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr, residual_ptr, weight_ptr, bias_ptr, y_ptr, stream_ptr, mean_ptr, rstd_ptr,
    n_rows, n_cols, stride_x_row, stride_residual_row, stride_y_row, stride_stream_row, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    x, rows, cols, row_mask, col_mask, mask, rows64 = _load_stream_tile(
        x_ptr, residual_ptr, stream_ptr, n_rows, n_cols, stride_x_row, stride_residual_row, stride_stream_row,
        HAS_RESIDUAL, BLOCK_M, BLOCK_N)

    mean = tl.sum(x, axis=1) / n_cols
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / n_cols + eps)
    y = centred * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_backward_kernel(
    dy_ptr, dstream_ptr, stream_ptr, weight_ptr, mean_ptr, rstd_ptr, dx_ptr, dresidual_ptr, partial_ptr,
    n_rows, n_cols, stride_dy_row, stride_dstream_row, stride_stream_row, stride_dx_row, stride_dresidual_row,
    HAS_DSTREAM: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dweight_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_BIAS:
        dbias_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # Program p takes tiles p, p + P, p + 2P, ...: neighbouring programs read neighbouring rows. The
    # loop is software-pipelined (cp.async on sm_90): the next tile's rows load while this one computes.
    for tile in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0), num_stages=NUM_STAGES):
        x, dy, rows, row_mask, mask, rows64 = _load_backward_tile(
            tile, stream_ptr, dy_ptr, n_rows, cols, col_mask, stride_stream_row, stride_dy_row, BLOCK_M)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dx_hat = dy  # 0 outside the mask, as dy is
        if HAS_WEIGHT:
            dx_hat = dy * weight[None, :]
        # d x̂_j / d x_i = rstd·(δ_ij - 1/N - x̂_i·x̂_j/N): the two row means below.
        mean_dx_hat = tl.sum(dx_hat, axis=1) / n_cols
        mean_x_hat_dx_hat = tl.sum(x_hat * dx_hat, axis=1) / n_cols
        dx = (dx_hat - mean_dx_hat[:, None] - x_hat * mean_x_hat_dx_hat[:, None]) * rstd[:, None]
        _store_stream_grad(dx, dstream_ptr, dx_ptr, dresidual_ptr, rows64, cols, mask,
                           stride_dstream_row, stride_dx_row, stride_dresidual_row, HAS_DSTREAM, WRITE_DRESIDUAL)
        # Summed over the tile's rows now, so the accumulators stay one row high (at GPT-2 widths a
        # tile's rows sit in the same thread's registers: the sum needs no shuffles).
        if HAS_WEIGHT:
            dweight_acc += tl.sum(dy * x_hat, axis=0)
        if HAS_BIAS:
            dbias_acc += tl.sum(dy, axis=0)

    # One row of partial sums per program: row 0 for dweight, the last for dbias.
    partial_row = partial_ptr + tl.program_id(0) * (HAS_WEIGHT + HAS_BIAS) * n_cols
    if HAS_WEIGHT:
        tl.store(partial_row + cols, dweight_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(partial_row + HAS_WEIGHT * n_cols + cols, dbias_acc, mask=col_mask)


@triton.jit
def _sum_partials_kernel(
    partial_ptr, dweight_ptr, dbias_ptr, n_partials, n_cols,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Column sums of the backward's partial rows, written in each parameter's dtype."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    row_stride = (HAS_WEIGHT + HAS_BIAS) * n_cols
    dweight_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < n_partials)[:, None] & col_mask[None, :]
        row_ptr = partial_ptr + rows[:, None] * row_stride + cols[None, :]
        if HAS_WEIGHT:
            dweight_acc += tl.load(row_ptr, mask=mask, other=0.0)
        if HAS_BIAS:
            dbias_acc += tl.load(row_ptr + HAS_WEIGHT * n_cols, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(dweight_ptr + cols, tl.sum(dweight_acc, axis=0).to(dweight_ptr.dtype.element_ty), mask=col_mask)
    if HAS_BIAS:
        tl.store(dbias_ptr + cols, tl.sum(dbias_acc, axis=0).to(dbias_ptr.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------- launchers


def stream_dtype(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of the stream that is normalized (and of the output): ``x``'s, or that of ``x + residual``."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _check_inputs(x, weight, bias, eps, residual, out_dtype=None) -> None:
    """ValueError for anything the kernels cannot take, saying what was expected."""
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"layernorm: out_dtype must be None, float32, float16 or bfloat16, got {out_dtype}")
    check_tensor("layernorm", "x", x, "a float32, float16 or bfloat16 tensor")
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] > MAX_WIDTH:
        raise ValueError(
            f"layernorm: x must have a last dimension (the one normalized) of 1 to {MAX_WIDTH} elements, "
            f"got shape {tuple(x.shape)}"
        )
    require_triton("layernorm", x.device, "x")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"layernorm: eps must be a non-negative number, got {eps!r}")
    if residual is not None:
        check_tensor("layernorm", "residual", residual, "a float32, float16 or bfloat16 tensor or None")
        check_same_device("layernorm", "residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(
                f"layernorm: residual must have x's shape {tuple(x.shape)} (no broadcasting), "
                f"got {tuple(residual.shape)}"
            )
    normalized = stream_dtype(x, residual)
    allowed = {normalized, torch.float32}
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"layernorm: {name} must be a tensor or None, got {type(param).__name__}")
        check_same_device("layernorm", name, param, "x", x)
        if param.dim() != 1 or param.shape[0] != x.shape[-1]:
            raise ValueError(
                f"layernorm: {name} must be 1-D with x's last dimension, i.e. shape ({x.shape[-1]},); "
                f"got {name} {tuple(param.shape)} for x {tuple(x.shape)}"
            )
        if param.dtype not in allowed:
            raise ValueError(
                f"layernorm: {name} must be {' or '.join(sorted(str(d) for d in allowed))} (the normalized stream's "
                f"dtype, or fp32 parameters under autocast), got {param.dtype}"
            )


def _tile(n_rows: int, n_cols: int, tile_elements: int, warp_elements: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of ``n_cols`` elements."""
    block_n = next_power_of_2(n_cols)
    block_m = max(1, min(tile_elements // block_n, next_power_of_2(n_rows)))
    num_warps = min(MAX_WARPS, max(MIN_WARPS, block_m * block_n // warp_elements))
    return block_m, block_n, num_warps


def backward_stages(num_warps: int) -> int:
    return BACKWARD_STAGES if num_warps < MAX_WARPS else 1


@functools.lru_cache(maxsize=None)
def _max_backward_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return BACKWARD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_BACKWARD_PROGRAMS


def _forward_rows(x, residual, out, stream):
    """A norm forward's tensors as (rows, width) views (LayerNorm and RMSNorm): x, residual, y, stream;
    a missing residual or stream is given another tensor's view, a pointer the kernel never reads."""
    n_cols = x.shape[-1]
    x2, y2 = rows(x, n_cols), out.view(-1, n_cols)
    residual2 = rows(residual, n_cols) if residual is not None else x2
    stream2 = stream.view(-1, n_cols) if stream is not None else y2
    return x2, residual2, y2, stream2


def _backward_rows(stream, dy, dstream, dx, dresidual):
    """A norm backward's tensors as (rows, width) views (LayerNorm and RMSNorm): stream, dy, dstream,
    dx, dresidual; a missing dstream or dresidual is given another tensor's view, never read."""
    n_cols = stream.shape[-1]
    stream2, dy2, dx2 = rows(stream, n_cols), rows(dy, n_cols), dx.view(-1, n_cols)
    dstream2 = rows(dstream, n_cols) if dstream is not None else dy2
    dresidual2 = dresidual.view(-1, n_cols) if dresidual is not None else dx2
    return stream2, dy2, dstream2, dx2, dresidual2


def _backward_grid(n_rows: int, n_cols: int, has_params: bool, device: torch.device) -> tuple[int, int, int, int]:
    """A norm backward's tile (block_m, block_n, num_warps) and number of programs (LayerNorm and
    RMSNorm). Without parameters there is nothing to reduce across rows: one tile per program."""
    block_m, block_n, num_warps = _tile(n_rows, n_cols, BACKWARD_TILE_ELEMENTS, BACKWARD_WARP_ELEMENTS)
    n_tiles = cdiv(n_rows, block_m)
    n_programs = min(n_tiles, _max_backward_programs(device)) if has_params else n_tiles
    return block_m, block_n, num_warps, n_programs


def layernorm_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(y, stream, mean, rstd)``. ``stream`` is ``x + residual``
    (None without a residual), ``y`` its LayerNorm in ``out_dtype`` (default: the stream's),
    ``mean``/``rstd`` fp32 of shape ``x.shape[:-1]``."""
    _check_inputs(x, weight, bias, eps, residual, out_dtype)
    weight, bias = unit_stride(weight), unit_stride(bias)
    dtype = stream_dtype(x, residual)
    out = torch.empty(x.shape, dtype=out_dtype or dtype, device=x.device)
    stream = torch.empty(x.shape, dtype=dtype, device=x.device) if residual is not None else None
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out, stream, mean, rstd

    x2, residual2, y2, stream2 = _forward_rows(x, residual, out, stream)
    n_rows, n_cols = x2.shape
    block_m, block_n, num_warps = _tile(n_rows, n_cols, FORWARD_TILE_ELEMENTS, FORWARD_WARP_ELEMENTS)
    _layer_norm_forward_kernel[(cdiv(n_rows, block_m),)](
        x2, residual2, weight if weight is not None else x2, bias if bias is not None else x2,
        y2, stream2, mean, rstd,
        n_rows, n_cols, x2.stride(0), residual2.stride(0), y2.stride(0), stream2.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, stream, mean, rstd


def layernorm_backward(
    dy: torch.Tensor,
    stream: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dstream: Optional[torch.Tensor] = None,
    x_dtype: Optional[torch.dtype] = None,
    residual_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel: ``(dx, dresidual, dweight, dbias)``.

    ``stream`` is the tensor the forward normalized (``x``, or ``x + residual``), ``dy`` the gradient
    of ``y`` and ``dstream`` (optional) the gradient reaching the stream output directly. ``dx`` is
    the stream's whole gradient in ``x_dtype`` (default: the stream's); ``dresidual`` the same
    values in ``residual_dtype``, written only when that is given (else None); ``dweight``/``dbias``
    are None without a weight/bias."""
    _check_inputs(stream, weight, bias, 0.0, None)
    weight, bias = unit_stride(weight), unit_stride(bias)
    for name, grad in (("dy", dy), ("dstream", dstream)):
        if grad is not None or name == "dy":
            check_tensor("layernorm backward", name, grad, f"a float tensor shaped like the stream "
                         f"{tuple(stream.shape)} on {stream.device}", shape=stream.shape, device=stream.device)
    for name, stat in (("mean", mean), ("rstd", rstd)):
        if not isinstance(stat, torch.Tensor) or stat.shape != stream.shape[:-1] or stat.dtype != torch.float32 \
                or stat.device != stream.device or not stat.is_contiguous():
            raise ValueError(
                f"layernorm backward: {name} must be a contiguous float32 tensor of shape {tuple(stream.shape[:-1])} "
                f"on {stream.device} (as the forward returns it), got {describe(stat)}"
            )
    for name, dtype in (("x_dtype", x_dtype), ("residual_dtype", residual_dtype)):
        if dtype is not None and dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"layernorm backward: {name} must be float32, float16 or bfloat16, got {dtype}")

    x_dtype = x_dtype or stream.dtype
    dx = torch.empty(stream.shape, dtype=x_dtype, device=stream.device)
    dresidual = None
    if residual_dtype is not None:
        dresidual = torch.empty(stream.shape, dtype=residual_dtype, device=stream.device)
    n_cols = stream.shape[-1]
    n_params = (weight is not None) + (bias is not None)
    if stream.numel() == 0:
        zeros = [torch.zeros_like(p) if p is not None else None for p in (weight, bias)]
        return dx, dresidual, *zeros

    stream2, dy2, dstream2, dx2, dresidual2 = _backward_rows(stream, dy, dstream, dx, dresidual)
    n_rows = stream2.shape[0]
    block_m, block_n, num_warps, n_programs = _backward_grid(n_rows, n_cols, n_params > 0, stream.device)
    partial = dx2  # a placeholder pointer when there is nothing to reduce
    if n_params:
        partial = torch.empty((n_programs, n_params, n_cols), dtype=torch.float32, device=stream.device)
    _layer_norm_backward_kernel[(n_programs,)](
        dy2, dstream2, stream2, weight if weight is not None else stream2, mean, rstd, dx2, dresidual2, partial,
        n_rows, n_cols, dy2.stride(0), dstream2.stride(0), stream2.stride(0), dx2.stride(0), dresidual2.stride(0),
        HAS_DSTREAM=dstream is not None, WRITE_DRESIDUAL=dresidual is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=backward_stages(num_warps), num_warps=num_warps, num_stages=2,
    )
    dweight = torch.empty_like(weight) if weight is not None else None
    dbias = torch.empty_like(bias) if bias is not None else None
    if n_params:
        _sum_partials_kernel[(cdiv(n_cols, SUM_BLOCK_N),)](
            partial, dweight if dweight is not None else partial, dbias if dbias is not None else partial,
            n_programs, n_cols, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            BLOCK_P=SUM_BLOCK_P, BLOCK_N=SUM_BLOCK_N, num_warps=4,
        )
    return dx, dresidual, dweight, dbias


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::layer_norm", mutates_args=())
def _layer_norm_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = layernorm_forward(x, weight, bias, eps, out_dtype=out_dtype)
    return y, mean, rstd


@_layer_norm_op.register_fake
def _layer_norm_fake(x, weight, bias, eps, out_dtype=None):
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("gpt_triton::layer_norm_residual", mutates_args=())
def _layer_norm_residual_op(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layernorm_forward(x, weight, bias, eps, residual, out_dtype=out_dtype)


@_layer_norm_residual_op.register_fake
def _layer_norm_residual_fake(x, residual, weight, bias, eps, out_dtype=None):
    dtype = stream_dtype(x, residual)
    stats = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return (x.new_empty(x.shape, dtype=out_dtype or dtype), x.new_empty(x.shape, dtype=dtype), stats,
            torch.empty_like(stats))


# Returns [dx, dresidual?, dweight?, dbias?]: dresidual only when residual_dtype is given, the
# parameter gradients only for the parameters given (a schema cannot return an optional tensor).
@torch.library.custom_op("gpt_triton::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(
    dy: torch.Tensor,
    dstream: Optional[torch.Tensor],
    stream: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    x_dtype: torch.dtype,
    residual_dtype: Optional[torch.dtype],
) -> list[torch.Tensor]:
    grads = layernorm_backward(dy, stream, weight, bias, mean, rstd, dstream, x_dtype, residual_dtype)
    return [g for g in grads if g is not None]


@_layer_norm_backward_op.register_fake
def _layer_norm_backward_fake(dy, dstream, stream, weight, bias, mean, rstd, x_dtype, residual_dtype):
    grads = [stream.new_empty(stream.shape, dtype=x_dtype)]
    if residual_dtype is not None:
        grads.append(stream.new_empty(stream.shape, dtype=residual_dtype))
    return grads + [torch.empty_like(p) for p in (weight, bias) if p is not None]


def _setup_context(ctx, inputs, output, has_residual):
    if has_residual:
        x, residual, weight, bias, _, _ = inputs
        _, stream, mean, rstd = output
        ctx.residual_dtype = residual.dtype
    else:
        x, weight, bias, _, _ = inputs
        stream, (_, mean, rstd) = x, output
    ctx.x_dtype = x.dtype
    ctx.has_residual = has_residual
    ctx.mark_non_differentiable(mean, rstd)
    # An output nobody uses (the stream after the last LayerNorm) then gets None, not a zero tensor to read.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(stream, weight, bias, mean, rstd)


def _backward(ctx, dy, dstream):
    """Gradients of (x, [residual,] weight, bias, eps, out_dtype) from those of y and (with a residual) the
    stream. ``dy`` comes in y's dtype (bf16 under autocast): the kernel reads it as it is."""
    stream, weight, bias, mean, rstd = ctx.saved_tensors
    has_residual = ctx.has_residual
    if dy is None:  # only the stream output was used: its gradient passes straight through
        dx, dweight, dbias = dstream.to(ctx.x_dtype), None, None
        dresidual = dstream.to(ctx.residual_dtype) if has_residual else None
    else:
        # x and the residual get the same gradient: written once when their dtypes agree.
        write_dresidual = has_residual and ctx.residual_dtype != ctx.x_dtype
        grads = iter(torch.ops.gpt_triton.layer_norm_backward(
            dy, dstream, stream, weight, bias, mean, rstd, ctx.x_dtype, ctx.residual_dtype if write_dresidual else None
        ))
        dx = next(grads)
        dresidual = next(grads) if write_dresidual else dx
        dweight = next(grads) if weight is not None else None
        dbias = next(grads) if bias is not None else None
    if has_residual:
        return dx, dresidual, dweight, dbias, None, None
    return dx, dweight, dbias, None, None


_layer_norm_op.register_autograd(
    lambda ctx, dy, _dmean, _drstd: _backward(ctx, dy, None),
    setup_context=functools.partial(_setup_context, has_residual=False),
)
_layer_norm_residual_op.register_autograd(
    lambda ctx, dy, dstream, _dmean, _drstd: _backward(ctx, dy, dstream),
    setup_context=functools.partial(_setup_context, has_residual=True),
)


def output_dtype(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of ``y``: the autocast dtype when autocast is on for ``x``'s device, else the stream's."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return stream_dtype(x, residual)


def layernorm(x, weight, bias, eps=1e-5, residual=None):
    """Triton LayerNorm over the last dimension: ``y``, or with ``residual`` the pair
    ``(layernorm(x + residual), x + residual)``; differentiable in every tensor. See the module doc
    for dtypes (``y`` in the autocast dtype under autocast). Bad inputs raise ValueError before
    anything is launched."""
    _check_inputs(x, weight, bias, eps, residual)
    out_dtype = output_dtype(x, residual)
    if residual is None:
        return torch.ops.gpt_triton.layer_norm(x, weight, bias, float(eps), out_dtype)[0]
    y, stream, _, _ = torch.ops.gpt_triton.layer_norm_residual(x, residual, weight, bias, float(eps), out_dtype)
    return y, stream


def layernorm_reference(x, weight, bias, eps=1e-5, residual=None):
    """PyTorch reference with the Triton op's dtype contract: the sum ``x + residual`` in
    ``promote_types(x, residual)`` (PyTorch adds in fp32 and rounds once); the normalization in fp32
    (or float64 for float64 inputs) with the parameters upcast, so fp32 parameters may meet an
    fp16/bf16 stream; the output in the stream's dtype, or the autocast dtype under autocast (what
    eager PyTorch gives the next linear: ``F.layer_norm``'s fp32 output, cast); each gradient in its
    input's dtype. For a single fp32 dtype this is exactly ``F.layer_norm``."""
    out_dtype = output_dtype(x, residual)
    if residual is not None:
        x = x + residual
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    weight = weight.to(math_dtype) if weight is not None else None
    bias = bias.to(math_dtype) if bias is not None else None
    y = F.layer_norm(x.to(math_dtype), (x.shape[-1],), weight, bias, eps).to(out_dtype)
    return (y, x) if residual is not None else y


registry.register("layernorm", reference=layernorm_reference, triton=layernorm)
