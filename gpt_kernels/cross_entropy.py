"""Cross-entropy over ``(N, V)`` logits: loss and gradient in one kernel launch.

``cross_entropy(logits, targets)`` is ``F.cross_entropy`` for GPT-2's training loss, with the
options large-vocabulary training asks for:

* ``ignore_index``: rows whose target equals it add nothing to the loss or the gradient, and
  ``mean`` divides by the number of the other rows; if every row is ignored the loss is 0 (not NaN)
  and so is the gradient.
* ``reduction``: ``mean`` | ``sum`` | ``none`` (per-row losses, 0 on ignored rows).
* ``label_smoothing`` (eps): ``(1 - eps)·nll + eps·mean_j(-log softmax_j)``, as ``F.cross_entropy``.
* z-loss (``lse_square_scale`` = s > 0): adds ``s·logsumexp(z)²`` per row to the loss (PaLM's
  auxiliary loss, which keeps the log-normalizer near 0). **How it is returned:** the loss always
  includes it; ``return_z_loss=True`` returns ``(loss, z_loss)`` where ``z_loss`` is that term alone,
  reduced like the loss, fp32 and detached (for logging: its gradient already flows through ``loss``).
  The default return is the loss alone.
* ``softcap`` (c): the loss sees ``z = c·tanh(x/c)`` instead of the logits ``x`` (Gemma 2).

The loss is fp32 whatever the logits' dtype (fp32, fp16, bf16); targets are int64 or int32.

How the kernel works: one program per row walks the vocabulary in ``BLOCK_V`` blocks, keeping a
running max and a running sum of exponentials (an online log-sum-exp, so extreme logits neither
overflow nor lose the row's scale), plus the target's logit and, with label smoothing, the sum of
the logits. When a gradient is needed it walks the row a second time and writes
``dloss/dx = (softmax·(1 + 2·s·lse) - (1 - eps)·onehot - eps/V)·scale`` (times ``1 - tanh²`` with a
softcap). The row was just read, so on a GPU the second walk mostly hits L2: HBM sees about one read
of the logits and one write of the gradient. Numerics: the loss is ``(max - z_t) + log(sum)`` and
the softmax ``exp(z - max)/sum``, never through a rounded ``lse`` (at logits of ±1e4 an fp32 lse is
only good to 1e-3).

The backward only multiplies that gradient by the incoming gradient (``scale_gradient``). Run
eagerly it does so in place, and the kernel leaves every tile whose factor is exactly 1
(``loss.backward()``) untouched, so the backward then costs nothing; a second backward through the
same graph is refused by autograd instead of scaling twice. Traced by torch.compile it is a plain
out-of-place product, which inductor fuses into the gradient's consumer (AOT autograd cannot
partition a backward that mutates a saved forward output).

Where the gradient goes (the rule): the gradient may overwrite the logits only where nothing else
can read the logits afterwards. Here the logits belong to the caller (the model returns them, the
user may reuse them), so this op always writes into a buffer of its own, one ``(N, V)`` tensor in
the logits' dtype (as eager ``F.cross_entropy``'s backward allocates one). The backward's scaling is in place on that buffer, which the forward allocated and nothing else holds.

The mean's ``1/n`` is folded into the forward's gradient so that the common ``loss.backward()`` needs
no second pass, except for fp16 logits: fp16 cannot hold ``softmax/n`` (about 1e-9 at GPT-2 sizes
is below fp16's smallest subnormal), so a GradScaler's large upstream factor could not bring it back;
there the forward writes the unscaled gradient and the backward multiplies by ``grad/n``.

Layout: logits need unit column stride and any row stride (the model passes a ``[:, :50257]`` view
of its 50304-column lm_head output, read in place); anything else is copied once. Only a row's last
block is masked, so rows whose stride is a multiple of 16 elements are read (and the gradient, when
its rows are so too, written) in 16-byte vectors whatever V is. Targets may have any stride. The
gradient is contiguous. Masked logits (-inf) are fine wherever they are, as long as a row keeps
one finite logit.

Input checks: ``ValueError`` for wrong shapes, dtypes, devices and options, on the host. Targets
outside ``[0, V)`` that are not ``ignore_index`` need the targets' values, so checking them costs a
device sync: ``check_targets=True`` (the default) does it, ``check_targets=False`` skips it for hot
loops, and it is skipped under ``torch.compile`` (a sync would break the graph). An unchecked bad
target gives a NaN loss for its row, never an out-of-bounds read.

Public: ``cross_entropy`` (the differentiable custom op ``gpt_triton::cross_entropy``),
``cross_entropy_forward`` (the launcher: per-row losses and gradient, optional preallocated
buffers), ``scale_rows_`` (the backward's launcher), ``cross_entropy_reference``. The checks,
``soft_cap``, ``reduce_rows``, ``backward_scale`` and ``scale_gradient`` are shared with
``linear_cross_entropy``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from gpt_kernels import registry
from gpt_kernels.common import (
    FLOAT_DTYPES as SUPPORTED_DTYPES, describe, flat_grid_tile, output_buffer, require_triton,
)
from gpt_kernels.host import cdiv, next_power_of_2

TARGET_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")

# One row per program, BLOCK_V columns per step: 8192 columns is 16 KB of bf16 in flight per
# program, 16 fp32 registers per thread at 16 warps, and 7 steps for GPT-2's 50257. Starting points
# for Hopper; the GPU session tunes them with bench/bench_cross_entropy.py.
MAX_BLOCK_V = 8192
# Software-pipeline depth of the walks over a row (cp.async on sm_90): two stages, one block in flight.
PIPELINE_STAGES = 2
# The in-place scaling of the backward: (BLOCK_M, BLOCK_N) tiles of SCALE_TILE_ELEMENTS.
SCALE_MAX_BLOCK_N = 2048
SCALE_TILE_ELEMENTS = 8192


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


# ----------------------------------------------------------------------------- kernels


@triton.jit
def soft_cap(x, cap):
    """``cap·tanh(x/cap)``. tanh from exp(-2|u|) in (0, 1]: no overflow for any finite or infinite x."""
    u = x / cap
    t = tl.exp(-2.0 * tl.abs(u))
    tanh_abs = (1.0 - t) / (1.0 + t)
    return cap * tl.where(u >= 0, tanh_abs, -tanh_abs)


@triton.jit
def _online_lse(z, mask, running_max, running_sum, sum_z_minus_target, z_target, softcap,
                HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """One block of walk 1: the running max and sum of exp (rescaled whenever the max grows), and
    the smoothing sum of z - z_target (so that large logits of one sign do not swamp it)."""
    if HAS_SOFTCAP:
        z = tl.where(mask, soft_cap(z, softcap), float("-inf"))
    new_max = tl.maximum(running_max, tl.max(z, axis=0))
    # Shift by 0 while every logit so far is -inf (masked columns): exp(-inf - -inf) is NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(z - shift), axis=0)
    if HAS_SMOOTHING:
        sum_z_minus_target += tl.sum(tl.where(mask, z - z_target, 0.0), axis=0)
    return new_max, running_sum, sum_z_minus_target


@triton.jit
def _gradient(z, offs, target, running_max, softmax_factor, target_weight, uniform, softcap,
              HAS_SOFTCAP: tl.constexpr):
    """One block of walk 2: softmax = exp(z - max) / sum, whose exponent is exact where exp(z - lse)
    would carry lse's rounding, minus the target's (smoothed) one-hot, through the soft cap."""
    if HAS_SOFTCAP:
        z = soft_cap(z, softcap)
    grad = tl.exp(z - running_max) * softmax_factor - tl.where(offs == target, target_weight, 0.0) - uniform
    if HAS_SOFTCAP:
        # d/dx [c·tanh(x/c)] = 1 - tanh² = 1 - (z/c)²
        z_over_cap = z / softcap
        grad = grad * (1.0 - z_over_cap * z_over_cap)
    return grad


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, stride_logits_row,
    targets_ptr, stride_targets,
    grad_ptr, stride_grad_row,
    grad_scale_ptr, stride_grad_scale,
    loss_ptr, z_loss_ptr,
    n_cols, ignore_index,
    label_smoothing, lse_square_scale, softcap,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)  # row·stride passes 2^31 beyond ~43k rows of 50304
    logits_row = logits_ptr + row64 * stride_logits_row
    grad_row = grad_ptr + row64 * stride_grad_row
    cols = tl.arange(0, BLOCK_V)

    target = tl.load(targets_ptr + row64 * stride_targets).to(tl.int64)
    if target == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(z_loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                tl.store(grad_row + offs, tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty), mask=offs < n_cols)
        return

    # The target's logit, read before anything is written: the gradient may overwrite the logits.
    # A target outside [0, V) (possible only with the host check off) reads nothing and gives NaN.
    target_ok = (target >= 0) & (target < n_cols)
    z_target = tl.load(logits_row + target, mask=target_ok, other=float("nan")).to(tl.float32)
    if HAS_SOFTCAP:
        z_target = soft_cap(z_target, softcap)

    # Walk 1: online log-sum-exp over the whole blocks, unmasked (a mask on n_cols, 50257 for GPT-2,
    # would rule out vector loads) and software-pipelined (cp.async on sm_90: the next block loads
    # while this one is reduced); then the masked last block, peeled out of the loop, whose mask
    # would otherwise stop the pipeliner.
    running_max = float("-inf")
    running_sum = 0.0
    sum_z_minus_target = 0.0
    full_end = (n_cols // BLOCK_V) * BLOCK_V
    for start in tl.range(0, full_end, BLOCK_V, num_stages=NUM_STAGES):
        offs = start + cols
        z = tl.load(logits_row + offs).to(tl.float32)
        running_max, running_sum, sum_z_minus_target = _online_lse(
            z, offs < n_cols, running_max, running_sum, sum_z_minus_target, z_target, softcap, HAS_SMOOTHING, HAS_SOFTCAP)
    if full_end < n_cols:
        offs = full_end + cols
        mask = offs < n_cols
        z = tl.load(logits_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        running_max, running_sum, sum_z_minus_target = _online_lse(
            z, mask, running_max, running_sum, sum_z_minus_target, z_target, softcap, HAS_SMOOTHING, HAS_SOFTCAP)
    log_sum = tl.log(running_sum)
    lse = running_max + log_sum

    # lse - z_target, without rounding lse first: at |logits| ~ 1e4 an fp32 lse is only good to 1e-3.
    loss = (running_max - z_target) + log_sum
    if HAS_SMOOTHING:
        # (1 - eps)·(lse - z_t) + eps·(lse - mean z) = (lse - z_t) - eps·mean(z - z_t)
        loss -= label_smoothing * (sum_z_minus_target / n_cols)
    z_loss = 0.0
    if HAS_Z_LOSS:
        z_loss = lse_square_scale * lse * lse
        loss += z_loss
    tl.store(loss_ptr + row, loss)
    tl.store(z_loss_ptr + row, z_loss)

    if COMPUTE_GRAD:
        # Walk 2: the gradient of this row's loss, times the row's scale. softmax = exp(z - max) / sum,
        # whose exponent is exact where exp(z - lse) would carry lse's rounding.
        scale = tl.load(grad_scale_ptr + row * stride_grad_scale).to(tl.float32)
        softmax_factor = scale / running_sum
        if HAS_Z_LOSS:
            softmax_factor = softmax_factor * (1.0 + 2.0 * lse_square_scale * lse)
        target_weight = scale
        uniform = 0.0
        if HAS_SMOOTHING:
            target_weight = scale * (1.0 - label_smoothing)
            uniform = scale * label_smoothing / n_cols
        # The same split as walk 1. The gradient may overwrite the logits in place: each block is read
        # before it is written, and the pipeline reads ahead only into blocks not yet written.
        for start in tl.range(0, full_end, BLOCK_V, num_stages=NUM_STAGES):
            offs = start + cols
            z = tl.load(logits_row + offs).to(tl.float32)
            grad = _gradient(z, offs, target, running_max, softmax_factor, target_weight, uniform, softcap, HAS_SOFTCAP)
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty))
        if full_end < n_cols:
            offs = full_end + cols
            mask = offs < n_cols
            z = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
            grad = _gradient(z, offs, target, running_max, softmax_factor, target_weight, uniform, softcap, HAS_SOFTCAP)
            tl.store(grad_row + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    x_ptr, stride_x_row, scale_ptr, stride_scale, n_rows, n_cols,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, cols = flat_grid_tile(n_cols, BLOCK_M, BLOCK_N)
    row_mask = rows < n_rows
    scale = tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=1.0).to(tl.float32)
    # A factor of exactly 1 (loss.backward()) leaves the tile as it is: skip its read and write.
    if tl.max(tl.abs(scale - 1.0), axis=0) != 0.0:
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_x_row + cols[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (x * scale[:, None]).to(x_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- input checks


def check_options(op: str, ignore_index, reduction, label_smoothing, lse_square_scale, softcap) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {', '.join(map(repr, REDUCTIONS))}, got {reduction!r}")
    if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"{op}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not (isinstance(lse_square_scale, (int, float)) and 0.0 <= lse_square_scale < math.inf):
        raise ValueError(f"{op}: lse_square_scale (the z-loss weight) must be a finite float >= 0, got {lse_square_scale!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0.0 < softcap < math.inf):
        raise ValueError(f"{op}: softcap must be None or a finite float > 0, got {softcap!r}")


def check_targets(op: str, targets, n_rows: int, device: torch.device) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dtype not in TARGET_DTYPES:
        raise ValueError(f"{op}: targets must be an int64 or int32 tensor, got {describe(targets)}")
    if targets.shape != (n_rows,):
        raise ValueError(f"{op}: targets must have shape ({n_rows},), one class index per row; got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"{op}: targets are on {targets.device} but the logits' inputs are on {device}; both must be on one device")


def check_inputs(logits, targets, ignore_index, reduction, label_smoothing, lse_square_scale, softcap) -> None:
    """ValueError for anything the op cannot take, saying what was expected (no device sync)."""
    op = "cross_entropy"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{op}: logits must be a 2-D (N, V) tensor, got {describe(logits)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{op}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError(f"{op}: logits must have at least one class (V >= 1), got shape {tuple(logits.shape)}")
    require_triton(op, logits.device, "logits")
    check_targets(op, targets, logits.shape[0], logits.device)
    check_options(op, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)


def check_targets_in_range(op: str, targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """ValueError if a target is outside [0, n_classes) and not ignore_index. Reads the targets'
    values, hence one device sync; skipped under torch.compile."""
    if torch.compiler.is_compiling() or targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= n_classes)) & (targets != ignore_index)
    if bad.any().item():
        first = targets[bad][0].item()
        raise ValueError(
            f"{op}: target {first} is outside [0, {n_classes}) and is not ignore_index ({ignore_index}); "
            f"{int(bad.sum().item())} such target(s). (check_targets=False skips this check.)"
        )


# ----------------------------------------------------------------------------- launchers


def count_valid(targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The number of non-ignored rows, as a device tensor (no sync)."""
    return (targets != ignore_index).sum()


def reduce_rows(row_values: torch.Tensor, n_valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """``mean`` divides by the non-ignored rows, and gives 0 when there are none (ignored rows hold 0)."""
    if reduction == "none":
        return row_values
    total = row_values.sum()
    return total / n_valid.clamp_min(1) if reduction == "mean" else total


def folds_mean_into_forward(reduction: str, grad_dtype: torch.dtype) -> bool:
    """Whether the forward's gradient already carries the mean's 1/n (not in fp16: see the module doc)."""
    return reduction == "mean" and grad_dtype != torch.float16


def cross_entropy_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    *,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    grad_scale: Optional[torch.Tensor] = None,
    grad: Optional[torch.Tensor] = None,
    loss_rows: Optional[torch.Tensor] = None,
    z_loss_rows: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Launch the kernel: per-row ``(loss, z_loss)`` (fp32, 0 on ignored rows; the loss includes the
    z-loss) and, when ``grad_scale`` is given, the gradient of each row's loss times
    ``grad_scale`` (a one-element or a per-row fp32 tensor).

    The gradient goes into ``grad`` if given (it may be ``logits`` itself, which is then
    overwritten: only for logits nothing else reads), else into a new contiguous tensor in the
    logits' dtype. ``loss_rows``/``z_loss_rows`` are optional preallocated (N,) fp32 buffers."""
    check_inputs(logits, targets, ignore_index, "none", label_smoothing, lse_square_scale, softcap)
    n_rows, n_cols = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    loss_rows = output_buffer("cross_entropy", "loss_rows", loss_rows, (n_rows,), torch.float32, logits.device)
    z_loss_rows = output_buffer("cross_entropy", "z_loss_rows", z_loss_rows, (n_rows,), torch.float32, logits.device)
    if grad_scale is not None:
        if grad is None:
            grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
        elif grad.shape != logits.shape or grad.dtype not in SUPPORTED_DTYPES or grad.device != logits.device or grad.stride(1) != 1:
            raise ValueError(
                f"cross_entropy: grad must be a float tensor of shape {tuple(logits.shape)} on {logits.device} "
                f"with unit column stride, got {describe(grad)} with strides {grad.stride()}"
            )
        grad_scale, stride_grad_scale = _checked_scale(grad_scale, n_rows, logits.device)
    if n_rows == 0:
        return loss_rows, z_loss_rows, grad

    block_v = min(MAX_BLOCK_V, next_power_of_2(n_cols))
    compute_grad = grad_scale is not None
    _cross_entropy_kernel[(n_rows,)](
        logits, logits.stride(0),
        targets, targets.stride(0),
        grad if compute_grad else logits, grad.stride(0) if compute_grad else 0,
        grad_scale if compute_grad else loss_rows, stride_grad_scale if compute_grad else 0,
        loss_rows, z_loss_rows,
        n_cols, ignore_index,
        float(label_smoothing), float(lse_square_scale), float(softcap or 1.0),
        HAS_SMOOTHING=label_smoothing > 0.0, HAS_Z_LOSS=lse_square_scale > 0.0, HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad, BLOCK_V=block_v, NUM_STAGES=PIPELINE_STAGES, num_warps=_num_warps(block_v),
    )
    return loss_rows, z_loss_rows, grad


def scale_rows_(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """In place ``x *= scale`` row by row: ``scale`` has one element (every row) or one per row.
    Tiles whose factor is exactly 1 are not touched."""
    if x.dim() != 2 or x.stride(1) != 1 or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"scale_rows_: x must be a 2-D float tensor with unit column stride, got {describe(x)}")
    n_rows, n_cols = x.shape
    scale, stride_scale = _checked_scale(scale, n_rows, x.device)
    if x.numel() == 0:
        return x
    block_n = min(SCALE_MAX_BLOCK_N, next_power_of_2(n_cols))
    block_m = min(SCALE_TILE_ELEMENTS // block_n, next_power_of_2(n_rows))
    grid = (cdiv(n_rows, block_m) * cdiv(n_cols, block_n),)
    _scale_rows_kernel[grid](
        x, x.stride(0), scale, stride_scale, n_rows, n_cols,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=_num_warps(block_m * block_n),
    )
    return x


def _checked_scale(scale: torch.Tensor, n_rows: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """A one-element or (n_rows,) float tensor -> (tensor, its stride per row: 0 for one element)."""
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or scale.device != device:
        raise ValueError(f"gradient scale must be a float tensor on {device}, got {describe(scale)}")
    if scale.numel() == 1:
        return scale.reshape(1), 0
    if scale.shape != (n_rows,):
        raise ValueError(f"gradient scale must have one element or shape ({n_rows},), got {tuple(scale.shape)}")
    return scale, scale.stride(0)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, z_loss, gradient of the loss w.r.t. the logits for an upstream gradient of 1; an
    empty tensor when ``compute_grad`` is False). The fp16 gradient lacks the mean's 1/n."""
    n_valid = count_valid(targets, ignore_index)
    grad_scale = None
    if compute_grad:
        grad_scale = torch.ones(1, dtype=torch.float32, device=logits.device)
        if folds_mean_into_forward(reduction, logits.dtype):
            grad_scale = grad_scale / n_valid.clamp_min(1)
    loss_rows, z_loss_rows, grad = cross_entropy_forward(
        logits, targets, ignore_index, label_smoothing=label_smoothing, lse_square_scale=lse_square_scale,
        softcap=softcap, grad_scale=grad_scale,
    )
    if grad is None:
        grad = logits.new_empty(0)
    return reduce_rows(loss_rows, n_valid, reduction), reduce_rows(z_loss_rows, n_valid, reduction), grad


@_cross_entropy_op.register_fake
def _cross_entropy_fake(logits, targets, ignore_index, reduction, label_smoothing, lse_square_scale, softcap, compute_grad):
    loss_shape = (logits.shape[0],) if reduction == "none" else ()
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    return logits.new_empty(loss_shape, dtype=torch.float32), logits.new_empty(loss_shape, dtype=torch.float32), grad


def backward_scale(grad_loss: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str,
                   grad_dtype: torch.dtype) -> torch.Tensor:
    """The factor (one element, or one per row for 'none') that turns the forward's gradient into the
    gradient for ``grad_loss``: ``grad_loss``, divided by n for a mean the forward left out."""
    scale = grad_loss.float()
    if reduction == "mean" and not folds_mean_into_forward(reduction, grad_dtype):
        scale = scale / count_valid(targets, ignore_index).clamp_min(1)
    return scale.reshape(-1)


def scale_gradient(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A saved forward gradient times the backward's factor (``backward_scale``), row by row.

    Run eagerly, in place by ``scale_rows_`` (free when the factor is 1): the buffer is the forward's
    own and autograd frees it after the backward. A second backward through the same graph
    (``retain_graph=True``) is refused by autograd, since the saved tensor was modified, instead of
    silently scaling twice. Traced (torch.compile, export, opcheck: a dispatch mode is active), out
    of place in plain PyTorch: AOT autograd cannot partition a backward that mutates a saved forward
    output, and inductor fuses the product into whatever consumes the gradient."""
    if is_in_torch_dispatch_mode():
        return (grad * scale.view(-1, 1)).to(grad.dtype)
    scale_rows_(grad, scale)
    # The kernel writes through a raw pointer: tell autograd, so that its saved-tensor check sees it.
    torch.autograd.graph.increment_version(grad)
    return grad


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, reduction, *_ = inputs
    _, z_loss, grad = output
    ctx.mark_non_differentiable(z_loss, grad)
    ctx.save_for_backward(targets, grad)
    ctx.ignore_index, ctx.reduction = ignore_index, reduction


def _backward(ctx, grad_loss, _grad_z_loss, _grad_grad):
    targets, grad = ctx.saved_tensors
    if grad.numel() == 0 and targets.numel() != 0:
        raise RuntimeError("gpt_triton::cross_entropy was called with compute_grad=False, so it has no gradient")
    grad = scale_gradient(grad, backward_scale(grad_loss, targets, ctx.ignore_index, ctx.reduction, grad.dtype))
    return grad, None, None, None, None, None, None, None


_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    check_targets: bool = True,
):
    """Triton cross-entropy of ``(N, V)`` logits against ``(N,)`` class indices, differentiable in the
    logits; see the module doc for the options, the z-loss return and ``check_targets``."""
    check_inputs(logits, targets, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    if check_targets:
        check_targets_in_range("cross_entropy", targets, logits.shape[1], ignore_index)
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    loss, z_loss, _ = torch.ops.gpt_triton.cross_entropy(
        logits, targets, ignore_index, reduction, float(label_smoothing), float(lse_square_scale),
        None if softcap is None else float(softcap), compute_grad,
    )
    return (loss, z_loss) if return_z_loss else loss


def cross_entropy_reference(
    logits,
    targets,
    ignore_index=-100,
    reduction="mean",
    *,
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    return_z_loss=False,
    check_targets=True,
):
    """PyTorch reference: ``F.cross_entropy`` on fp32 logits (half-precision logits lose nothing in
    the loss), with the Triton op's options and contract (an all-ignored mean is 0, not NaN)."""
    if check_targets and isinstance(targets, torch.Tensor):
        check_targets_in_range("cross_entropy_reference", targets, logits.shape[-1], ignore_index)
    z = logits.float() if logits.dtype != torch.float64 else logits
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, targets.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    valid = targets != ignore_index
    z_loss = torch.zeros_like(loss)
    if lse_square_scale:
        z_loss = torch.where(valid, lse_square_scale * torch.logsumexp(z, dim=-1).square(), z_loss)
        loss = loss + z_loss
    n_valid = valid.sum()
    loss, z_loss = reduce_rows(loss, n_valid, reduction), reduce_rows(z_loss, n_valid, reduction)
    return (loss, z_loss.detach()) if return_z_loss else loss


registry.register("cross_entropy", reference=cross_entropy_reference, triton=cross_entropy)
