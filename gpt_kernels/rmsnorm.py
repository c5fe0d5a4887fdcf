"""RMSNorm over the last dimension, with an optional fused residual add (the Llama block's norm).

``rmsnorm(x, weight, eps, residual=None)`` has the calling and return convention of
``layernorm(x, weight, bias, eps, residual=None)``: without ``residual`` it returns
``y = x / sqrt(mean(x²) + eps) · weight``; with ``residual`` it returns the pair
``(rmsnorm(x + residual), x + residual)``, the pre-norm block's add-then-norm in one call.

Public: ``rmsnorm`` (the differentiable custom ops ``gpt_triton::rms_norm`` and
``gpt_triton::rms_norm_residual``, backward ``gpt_triton::rms_norm_backward``),
``rmsnorm_forward`` / ``rmsnorm_backward`` (the launchers) and ``rmsnorm_reference``.

Dtypes, as the LayerNorm's (custom ops are not autocast-aware; in the model, under bf16 autocast,
``x`` is a linear's bf16 output, ``residual`` the fp32 stream and ``weight`` fp32):

* ``x`` and ``residual`` have the same shape (..., C); ``weight`` is (C,), or None for no gain;
* the sum ``x + residual`` is computed in fp32 and stored in ``promote_types(x, residual)``; it is
  the second output and is rounded before it is normalized (the backward reads it back);
* statistics and arithmetic are fp32, ``weight`` read in its own dtype (the stream's or fp32);
* ``y`` has the stream's dtype, or the autocast dtype under autocast (the next op is a linear); the
  backward reads a low-precision ``dy`` as it is;
* every gradient comes back in its input's dtype.

Numerics follow Hugging Face's ``LlamaRMSNorm``: ``x · rsqrt(mean(x²) + eps)``, then times the
weight. There is no centring, so a row with a large mean and a tiny spread is no harder than any
other: ``mean(x²)`` is a sum of positive terms.

Forward: one read of each input row, kept in registers; ``rstd`` (fp32, one per row) saved for the
backward. Backward: with ``x̂ = x·rstd`` and ``g = w·dy``, ``dx = rstd·(g - x̂·mean(x̂·g))``, plus
the gradient reaching the stream output directly; ``x`` and ``residual`` get that same gradient
(one write when their dtypes agree). ``dweight = Σ_rows dy·x̂`` is reduced as the LayerNorm's
``dweight`` is (its launch shapes, partial rows and fixed-order sum kernel, imported from
``gpt_kernels.layernorm``): a fixed number of programs walk the row tiles, each writes one row of
fp32 partial sums, and a second kernel adds them in a fixed order (no atomics: bit-reproducible).
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt_kernels import registry
from gpt_kernels.common import FLOAT_DTYPES, check_same_device, describe, require_triton, unit_stride
from gpt_kernels.host import cdiv
from gpt_kernels.layernorm import (
    BACKWARD_PROGRAMS_PER_SM, BACKWARD_TILE_ELEMENTS, BACKWARD_WARP_ELEMENTS, FORWARD_TILE_ELEMENTS,
    FORWARD_WARP_ELEMENTS, MAX_WIDTH, SUM_BLOCK_N, SUM_BLOCK_P, _backward_grid, _backward_rows, _forward_rows,
    _load_backward_tile, _load_stream_tile, _store_stream_grad, _sum_partials_kernel, _tile, backward_stages,
    output_dtype, stream_dtype,
)


@triton.jit
def _rms_norm_forward_kernel(
    x_ptr, residual_ptr, weight_ptr, y_ptr, stream_ptr, rstd_ptr,
    n_rows, n_cols, stride_x_row, stride_residual_row, stride_y_row, stride_stream_row, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    x, rows, cols, row_mask, col_mask, mask, rows64 = _load_stream_tile(
        x_ptr, residual_ptr, stream_ptr, n_rows, n_cols, stride_x_row, stride_residual_row, stride_stream_row,
        HAS_RESIDUAL, BLOCK_M, BLOCK_N)

    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows64 * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _rms_norm_backward_kernel(
    dy_ptr, dstream_ptr, stream_ptr, weight_ptr, rstd_ptr, dx_ptr, dresidual_ptr, partial_ptr,
    n_rows, n_cols, stride_dy_row, stride_dstream_row, stride_stream_row, stride_dx_row, stride_dresidual_row,
    HAS_DSTREAM: tl.constexpr, WRITE_DRESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_WEIGHT:
        weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dweight_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)

    # Program p takes tiles p, p + P, p + 2P, ... (as the LayerNorm backward), software-pipelined.
    for tile in tl.range(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.num_programs(0), num_stages=NUM_STAGES):
        x, dy, rows, row_mask, mask, rows64 = _load_backward_tile(
            tile, stream_ptr, dy_ptr, n_rows, cols, col_mask, stride_stream_row, stride_dy_row, BLOCK_M)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)

        x_hat = x * rstd[:, None]  # 0 outside the mask, as x is
        dx_hat = dy
        if HAS_WEIGHT:
            dx_hat = dy * weight[None, :]
        # d x̂_j / d x_i = rstd·(δ_ij - x̂_i·x̂_j/N): one row mean.
        mean_x_hat_dx_hat = tl.sum(x_hat * dx_hat, axis=1) / n_cols
        dx = (dx_hat - x_hat * mean_x_hat_dx_hat[:, None]) * rstd[:, None]
        _store_stream_grad(dx, dstream_ptr, dx_ptr, dresidual_ptr, rows64, cols, mask,
                           stride_dstream_row, stride_dx_row, stride_dresidual_row, HAS_DSTREAM, WRITE_DRESIDUAL)
        if HAS_WEIGHT:
            dweight_acc += tl.sum(dy * x_hat, axis=0)

    if HAS_WEIGHT:  # one row of partial sums per program, added up by layernorm's _sum_partials_kernel
        tl.store(partial_ptr + tl.program_id(0) * n_cols + cols, dweight_acc, mask=col_mask)


# ----------------------------------------------------------------------------- launchers


def _check_inputs(x, weight, eps, residual, out_dtype=None) -> None:
    """ValueError for anything the kernels cannot take, saying what was expected."""
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"rmsnorm: out_dtype must be None, float32, float16 or bfloat16, got {out_dtype}")
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"rmsnorm: x must be a float32, float16 or bfloat16 tensor, got {describe(x)}")
    if x.dim() == 0 or x.shape[-1] == 0 or x.shape[-1] > MAX_WIDTH:
        raise ValueError(f"rmsnorm: x must have a last dimension (the one normalized) of 1 to {MAX_WIDTH} elements, "
                         f"got shape {tuple(x.shape)}")
    require_triton("rmsnorm", x.device, "x")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"rmsnorm: eps must be a non-negative number, got {eps!r}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or residual.dtype not in FLOAT_DTYPES:
            raise ValueError(f"rmsnorm: residual must be a float32, float16 or bfloat16 tensor or None, "
                             f"got {describe(residual)}")
        check_same_device("rmsnorm", "residual", residual, "x", x)
        if residual.shape != x.shape:
            raise ValueError(f"rmsnorm: residual must have x's shape {tuple(x.shape)} (no broadcasting), "
                             f"got {tuple(residual.shape)}")
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"rmsnorm: weight must be a tensor or None, got {type(weight).__name__}")
    check_same_device("rmsnorm", "weight", weight, "x", x)
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rmsnorm: weight must be 1-D with x's last dimension, i.e. shape ({x.shape[-1]},); "
                         f"got weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    allowed = {stream_dtype(x, residual), torch.float32}
    if weight.dtype not in allowed:
        raise ValueError(f"rmsnorm: weight must be {' or '.join(sorted(str(d) for d in allowed))} (the normalized "
                         f"stream's dtype, or an fp32 parameter under autocast), got {weight.dtype}")


def rmsnorm_forward(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    eps: float = 1e-5,
    residual: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """Launch the forward kernel: ``(y, stream, rstd)``. ``stream`` is ``x + residual`` (None without a
    residual), ``y`` its RMSNorm in ``out_dtype`` (default: the stream's), ``rstd`` fp32 of shape
    ``x.shape[:-1]``."""
    _check_inputs(x, weight, eps, residual, out_dtype)
    weight = unit_stride(weight)
    dtype = stream_dtype(x, residual)
    out = torch.empty(x.shape, dtype=out_dtype or dtype, device=x.device)
    stream = torch.empty(x.shape, dtype=dtype, device=x.device) if residual is not None else None
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if x.numel() == 0:
        return out, stream, rstd

    x2, residual2, y2, stream2 = _forward_rows(x, residual, out, stream)
    n_rows, n_cols = x2.shape
    block_m, block_n, num_warps = _tile(n_rows, n_cols, FORWARD_TILE_ELEMENTS, FORWARD_WARP_ELEMENTS)
    _rms_norm_forward_kernel[(cdiv(n_rows, block_m),)](
        x2, residual2, weight if weight is not None else x2, y2, stream2, rstd,
        n_rows, n_cols, x2.stride(0), residual2.stride(0), y2.stride(0), stream2.stride(0), float(eps),
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
    )
    return out, stream, rstd


def rmsnorm_backward(
    dy: torch.Tensor,
    stream: torch.Tensor,
    weight: Optional[torch.Tensor],
    rstd: torch.Tensor,
    dstream: Optional[torch.Tensor] = None,
    x_dtype: Optional[torch.dtype] = None,
    residual_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel: ``(dx, dresidual, dweight)``.

    ``stream`` is the tensor the forward normalized (``x``, or ``x + residual``), ``dy`` the gradient
    of ``y`` and ``dstream`` (optional) the gradient reaching the stream output directly. ``dx`` is
    the stream's whole gradient in ``x_dtype`` (default: the stream's); ``dresidual`` the same values
    in ``residual_dtype``, written only when that is given (else None); ``dweight`` None without a
    weight."""
    _check_inputs(stream, weight, 0.0, None)
    weight = unit_stride(weight)
    for name, grad in (("dy", dy), ("dstream", dstream)):
        if grad is None and name == "dstream":
            continue
        if not isinstance(grad, torch.Tensor) or grad.shape != stream.shape or grad.device != stream.device \
                or grad.dtype not in FLOAT_DTYPES:
            raise ValueError(f"rmsnorm backward: {name} must be a float tensor shaped like the stream "
                             f"{tuple(stream.shape)} on {stream.device}, got {describe(grad)}")
    if not isinstance(rstd, torch.Tensor) or rstd.shape != stream.shape[:-1] or rstd.dtype != torch.float32 \
            or rstd.device != stream.device or not rstd.is_contiguous():
        raise ValueError(f"rmsnorm backward: rstd must be a contiguous float32 tensor of shape "
                         f"{tuple(stream.shape[:-1])} on {stream.device} (as the forward returns it), got {describe(rstd)}")
    for name, dtype in (("x_dtype", x_dtype), ("residual_dtype", residual_dtype)):
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise ValueError(f"rmsnorm backward: {name} must be float32, float16 or bfloat16, got {dtype}")

    dx = torch.empty(stream.shape, dtype=x_dtype or stream.dtype, device=stream.device)
    dresidual = torch.empty(stream.shape, dtype=residual_dtype, device=stream.device) if residual_dtype else None
    if stream.numel() == 0:
        return dx, dresidual, torch.zeros_like(weight) if weight is not None else None

    n_cols = stream.shape[-1]
    stream2, dy2, dstream2, dx2, dresidual2 = _backward_rows(stream, dy, dstream, dx, dresidual)
    n_rows = stream2.shape[0]
    block_m, block_n, num_warps, n_programs = _backward_grid(n_rows, n_cols, weight is not None, stream.device)
    partial = dx2  # a placeholder pointer when there is nothing to reduce
    if weight is not None:
        partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=stream.device)
    _rms_norm_backward_kernel[(n_programs,)](
        dy2, dstream2, stream2, weight if weight is not None else stream2, rstd, dx2, dresidual2, partial,
        n_rows, n_cols, dy2.stride(0), dstream2.stride(0), stream2.stride(0), dx2.stride(0), dresidual2.stride(0),
        HAS_DSTREAM=dstream is not None, WRITE_DRESIDUAL=dresidual is not None, HAS_WEIGHT=weight is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, NUM_STAGES=backward_stages(num_warps), num_warps=num_warps, num_stages=2,
    )
    dweight = None
    if weight is not None:
        dweight = torch.empty_like(weight)
        _sum_partials_kernel[(cdiv(n_cols, SUM_BLOCK_N),)](
            partial, dweight, partial, n_programs, n_cols, HAS_WEIGHT=True, HAS_BIAS=False,
            BLOCK_P=SUM_BLOCK_P, BLOCK_N=SUM_BLOCK_N, num_warps=4,
        )
    return dx, dresidual, dweight


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::rms_norm", mutates_args=())
def _rms_norm_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = rmsnorm_forward(x, weight, eps, out_dtype=out_dtype)
    return y, rstd


@_rms_norm_op.register_fake
def _rms_norm_fake(x, weight, eps, out_dtype=None):
    return x.new_empty(x.shape, dtype=out_dtype or x.dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("gpt_triton::rms_norm_residual", mutates_args=())
def _rms_norm_residual_op(
    x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float,
    out_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return rmsnorm_forward(x, weight, eps, residual, out_dtype=out_dtype)


@_rms_norm_residual_op.register_fake
def _rms_norm_residual_fake(x, residual, weight, eps, out_dtype=None):
    dtype = stream_dtype(x, residual)
    return (x.new_empty(x.shape, dtype=out_dtype or dtype), x.new_empty(x.shape, dtype=dtype),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


# Returns [dx, dresidual?, dweight?]: dresidual only when residual_dtype is given, dweight only with a
# weight (a schema cannot return an optional tensor).
@torch.library.custom_op("gpt_triton::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    dy: torch.Tensor, dstream: Optional[torch.Tensor], stream: torch.Tensor, weight: Optional[torch.Tensor],
    rstd: torch.Tensor, x_dtype: torch.dtype, residual_dtype: Optional[torch.dtype],
) -> list[torch.Tensor]:
    grads = rmsnorm_backward(dy, stream, weight, rstd, dstream, x_dtype, residual_dtype)
    return [g for g in grads if g is not None]


@_rms_norm_backward_op.register_fake
def _rms_norm_backward_fake(dy, dstream, stream, weight, rstd, x_dtype, residual_dtype):
    grads = [stream.new_empty(stream.shape, dtype=x_dtype)]
    if residual_dtype is not None:
        grads.append(stream.new_empty(stream.shape, dtype=residual_dtype))
    return grads + ([torch.empty_like(weight)] if weight is not None else [])


def _setup_context(ctx, inputs, output, has_residual):
    if has_residual:
        x, residual, weight, _, _ = inputs
        _, stream, rstd = output
        ctx.residual_dtype = residual.dtype
    else:
        x, weight, _, _ = inputs
        stream, (_, rstd) = x, output
    ctx.x_dtype = x.dtype
    ctx.has_residual = has_residual
    ctx.mark_non_differentiable(rstd)
    # An output nobody uses (the stream after the last norm) then gets None, not a zero tensor to read.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(stream, weight, rstd)


def _backward(ctx, dy, dstream):
    """Gradients of (x, [residual,] weight, eps, out_dtype) from those of y and (with a residual) the
    stream. ``dy`` comes in y's dtype (bf16 under autocast): the kernel reads it as it is."""
    stream, weight, rstd = ctx.saved_tensors
    has_residual = ctx.has_residual
    if dy is None:  # only the stream output was used: its gradient passes straight through
        dx, dweight = dstream.to(ctx.x_dtype), None
        dresidual = dstream.to(ctx.residual_dtype) if has_residual else None
    else:
        # x and the residual get the same gradient: written once when their dtypes agree.
        write_dresidual = has_residual and ctx.residual_dtype != ctx.x_dtype
        grads = iter(torch.ops.gpt_triton.rms_norm_backward(
            dy, dstream, stream, weight, rstd, ctx.x_dtype, ctx.residual_dtype if write_dresidual else None))
        dx = next(grads)
        dresidual = next(grads) if write_dresidual else dx
        dweight = next(grads) if weight is not None else None
    if has_residual:
        return dx, dresidual, dweight, None, None
    return dx, dweight, None, None


_rms_norm_op.register_autograd(
    lambda ctx, dy, _drstd: _backward(ctx, dy, None),
    setup_context=functools.partial(_setup_context, has_residual=False),
)
_rms_norm_residual_op.register_autograd(
    lambda ctx, dy, dstream, _drstd: _backward(ctx, dy, dstream),
    setup_context=functools.partial(_setup_context, has_residual=True),
)


def rmsnorm(x, weight, eps=1e-5, residual=None):
    """Triton RMSNorm over the last dimension: ``y``, or with ``residual`` the pair
    ``(rmsnorm(x + residual), x + residual)``; differentiable in every tensor. See the module doc for
    dtypes (``y`` in the autocast dtype under autocast). Bad inputs raise ValueError before anything
    is launched."""
    _check_inputs(x, weight, eps, residual)
    out_dtype = output_dtype(x, residual)
    if residual is None:
        return torch.ops.gpt_triton.rms_norm(x, weight, float(eps), out_dtype)[0]
    y, stream, _ = torch.ops.gpt_triton.rms_norm_residual(x, residual, weight, float(eps), out_dtype)
    return y, stream


def rmsnorm_reference(x, weight, eps=1e-5, residual=None):
    """PyTorch reference with the op's dtype contract (see the module doc)."""
    out_dtype = output_dtype(x, residual)
    if residual is not None:
        x = x + residual
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    h = x.to(math_dtype)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        h = weight.to(math_dtype) * h
    y = h.to(out_dtype)
    return (y, x) if residual is not None else y


def _backward_cost(args, outputs):
    """Each tensor once, plus the dweight partial rows written and read back: one row per backward
    program, BACKWARD_PROGRAMS_PER_SM on each of an H100's 132 SMs (the ledger's device)."""
    read, written, flops = registry.default_cost(args, outputs)
    dy, _, stream, weight = args[:4]
    if weight is None:
        return read, written, flops
    block_m, _, _ = _tile(stream.numel() // stream.shape[-1], stream.shape[-1], BACKWARD_TILE_ELEMENTS,
                          BACKWARD_WARP_ELEMENTS)
    partials = min(cdiv(stream.numel() // stream.shape[-1], block_m), BACKWARD_PROGRAMS_PER_SM * 132)
    partial_bytes = partials * stream.shape[-1] * 4
    return read + partial_bytes, written + partial_bytes, flops


registry.register("rmsnorm", reference=rmsnorm_reference, triton=rmsnorm)
registry.register_cost("gpt_triton::rms_norm_backward", _backward_cost)
