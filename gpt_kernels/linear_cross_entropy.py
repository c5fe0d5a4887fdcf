"""The lm_head matmul fused with the cross-entropy loss: ``cross_entropy(hidden @ weight.T, targets)``
without the full ``(N, V)`` logits ever existing.

At GPT-2 training shapes the logits are ``(16·1024, 50304)``: 1.6 GB in bf16, and eager PyTorch
adds an fp32 copy, a softmax-sized tensor for the backward and the gradient of each. Here the rows
are processed in chunks; for each chunk of ``hidden``:

1. ``logits = hidden_chunk @ weight.T`` (a cuBLAS matmul, fp32 accumulation), a ``(chunk, V)`` block;
2. the cross-entropy kernel (``gpt_kernels.cross_entropy``) writes the chunk's row losses and, over the
   logits themselves, their gradient. The rule for writing a gradient over logits is that nothing
   else may read them afterwards: this block is this function's own temporary, so it may;
3. ``grad_hidden_chunk = dlogits @ weight`` and ``grad_weight += dlogits.T @ hidden_chunk``.

So the loss, ``grad_hidden`` and ``grad_weight`` all come out of the forward (as Liger-Kernel's fused
linear cross-entropy does), and the backward only multiplies them by the incoming gradient, in place,
for free when it is exactly 1 (see ``gpt_kernels.cross_entropy.scale_gradient``). With
``reduction='none'`` the upstream gradient weighs each row inside the ``grad_weight`` sum, so the
forward computes the loss only and the backward recomputes the chunks with those weights (one more
matmul per chunk).

Chunk size (``chunk_size=None``): as many chunks as keep one chunk's logits within
``CHUNK_LOGITS_BYTES`` (and, on a GPU, within a quarter of the free memory), as even as possible,
in multiples of ``CHUNK_ROW_MULTIPLE`` rows. Fewer, larger chunks mean fewer passes over the fp32
``grad_weight`` accumulator (``V × C`` read and written per chunk); smaller ones less memory.

Dtypes: a custom op is not autocast-aware, so the wrapper reads the autocast state of the inputs'
device before calling it: under autocast the matmuls run in the autocast dtype (bf16 logits from an
fp32 ``hidden`` and an fp32 ``weight``, like ``hidden @ weight.T`` under autocast), otherwise in the
inputs' dtype (``hidden`` and ``weight`` must then match). Matmuls accumulate in fp32, and
``grad_weight`` is accumulated over chunks in fp32. fp32 matmuls follow PyTorch's TF32 setting
(``torch.backends.cuda.matmul.allow_tf32``: off by default, on in ``train_gpt2.py``), as the
unfused ``lm_head`` does. The loss is fp32; ``grad_hidden`` has ``hidden``'s dtype and
``grad_weight`` ``weight``'s.

Options, the z-loss return (``return_z_loss=True`` -> ``(loss, z_loss)``), ``check_targets`` and the
input checks are those of ``gpt_kernels.cross_entropy.cross_entropy``.

Public: ``linear_cross_entropy`` (the differentiable custom op ``gpt_triton::linear_cross_entropy``),
``linear_cross_entropy_reference``, ``choose_chunk_rows``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from gpt_kernels import registry
from gpt_kernels.common import check_tensor, require_triton
from gpt_kernels.cross_entropy import (
    backward_scale,
    check_options,
    check_targets,
    check_targets_in_range,
    count_valid,
    cross_entropy_forward,
    cross_entropy_reference,
    folds_mean_into_forward,
    reduce_rows,
    scale_gradient,
)

# One chunk's logits take at most this much memory. 512 MiB is 4096 rows of GPT-2's vocabulary in
# bf16: 16·1024 tokens in 4 chunks, whose matmuls are large enough for full speed. A starting
# point; the GPU session measures time and peak memory with bench/bench_linear_cross_entropy.py.
CHUNK_LOGITS_BYTES = 512 * 2**20
CHUNK_ROW_MULTIPLE = 128  # whole matmul tiles
ROW_ALIGNMENT = 16  # elements: Triton marks a row stride divisible by 16 as aligned


def choose_chunk_rows(n_rows: int, n_classes: int, dtype: torch.dtype, device: torch.device) -> int:
    """Rows per chunk: the fewest equal chunks whose logits fit the budget (see the module doc)."""
    budget = CHUNK_LOGITS_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = min(budget, free // 4)
    n_chunks = max(1, math.ceil(n_rows * n_classes * dtype.itemsize / budget))
    rows = math.ceil(n_rows / n_chunks)
    return max(1, min(n_rows, math.ceil(rows / CHUNK_ROW_MULTIPLE) * CHUNK_ROW_MULTIPLE))


@functools.cache
def _cuda_has_fp32_out_matmul() -> bool:
    """Whether this PyTorch has ``addmm(..., out_dtype=float32)`` for half inputs on CUDA, adding into
    an fp32 ``out`` that is also its ``input``, with a transposed operand: the call
    ``_accumulate_matmul`` makes. Versions differ (some refuse an fp32 ``input``), hence the probe."""
    try:
        acc = torch.ones(2, 2, device="cuda")
        half = torch.ones(3, 2, device="cuda", dtype=torch.bfloat16)
        torch.addmm(acc, half.T, half, out_dtype=torch.float32, out=acc)
        return bool((acc == 4.0).all().item())
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc``: inside the matmul where PyTorch can (the same dtype, or
    CUDA's fp32-output matmul for half inputs); otherwise the product is rounded to ``a``'s dtype
    once per chunk before the fp32 sum."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _cuda_has_fp32_out_matmul():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += a @ b


def _chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    compute_dtype: torch.dtype,
    grad_scale: Optional[torch.Tensor],
    want_grad_hidden: bool,
    want_grad_weight: bool,
    chunk_size: int,
    n_classes: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per-row (loss, z_loss), and the gradients asked for, of the rows' losses each weighted by
    ``grad_scale`` (one element or one per row). The engine of the forward and of the 'none' backward.
    Weight rows from ``n_classes`` on (when it is > 0) are padding: their logits are computed with
    the others (aligned matmuls), kept out of the loss, and get a zero gradient."""
    n_rows, n_weight_rows = hidden.shape[0], weight.shape[0]
    n_classes = n_classes if n_classes > 0 else n_weight_rows
    device = hidden.device
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    z_loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    compute_grad = grad_scale is not None and (want_grad_hidden or want_grad_weight)
    grad_hidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if compute_grad and want_grad_hidden else None
    grad_weight_acc = (
        torch.zeros(weight.shape, dtype=torch.float32, device=device) if compute_grad and want_grad_weight else None
    )
    if chunk_size <= 0:
        chunk_size = choose_chunk_rows(n_rows, n_weight_rows, compute_dtype, device)
    chunk_size = min(chunk_size, max(n_rows, 1))
    # One buffer for every chunk's logits: allocating per chunk would hold two chunks at once while
    # the next matmul's output is allocated before the previous one is released. Its rows start on
    # 16-element boundaries (GPT-2's 50257 columns are stored in 50272), so that the kernel's loads
    # and its gradient stores over them can be 16-byte vectors; the matmuls take the row stride.
    row_stride = math.ceil(n_weight_rows / ROW_ALIGNMENT) * ROW_ALIGNMENT
    logits_buffer = torch.empty((chunk_size, row_stride), dtype=compute_dtype, device=device)[:, :n_weight_rows]

    # Our own autocast-free region: the op decides its dtypes itself (compute_dtype).
    with torch.autocast(device.type, enabled=False):
        h = hidden.to(compute_dtype)
        w = weight.to(compute_dtype)
        for start in range(0, n_rows, chunk_size):
            stop = min(start + chunk_size, n_rows)
            h_chunk = h[start:stop]
            all_logits = torch.mm(h_chunk, w.T, out=logits_buffer[: stop - start])
            logits = all_logits[:, :n_classes]  # the kernel reads the real classes' columns only
            chunk_scale = None
            if compute_grad:
                chunk_scale = grad_scale if grad_scale.numel() == 1 else grad_scale[start:stop]
            cross_entropy_forward(
                logits, targets[start:stop], ignore_index,
                label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
                grad_scale=chunk_scale, grad=logits,  # the gradient overwrites the chunk's own logits
                loss_rows=loss_rows[start:stop], z_loss_rows=z_loss_rows[start:stop],
            )
            if compute_grad and n_classes < n_weight_rows:
                all_logits[:, n_classes:].zero_()  # padding classes: no gradient (a few columns)
            if grad_hidden is not None:
                if grad_hidden.dtype == compute_dtype:
                    torch.mm(all_logits, w, out=grad_hidden[start:stop])
                else:
                    grad_hidden[start:stop].copy_(all_logits @ w)
            if grad_weight_acc is not None:
                _accumulate_matmul(grad_weight_acc, all_logits.T, h_chunk)
    grad_weight = grad_weight_acc.to(weight.dtype) if grad_weight_acc is not None else None
    return loss_rows, z_loss_rows, grad_hidden, grad_weight


# ----------------------------------------------------------------------------- input checks


def check_inputs(hidden, weight, targets, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                 chunk_size, autocast_on: bool, n_classes=None) -> None:
    """ValueError for anything the op cannot take, saying what was expected (no device sync)."""
    op = "linear_cross_entropy"
    if n_classes is not None and (isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1
                                  or (isinstance(weight, torch.Tensor) and n_classes > weight.shape[0])):
        rows = weight.shape[0] if isinstance(weight, torch.Tensor) else "V"
        raise ValueError(f"{op}: n_classes must be None (every weight row) or an int in [1, {rows}], got {n_classes!r}")
    for name, t, shape in (("hidden", hidden, "(N, C)"), ("weight", weight, "(V, C)")):
        check_tensor(op, name, t, f"a 2-D {shape} float32, float16 or bfloat16 tensor", dim=2)
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: hidden (N, C) and weight (V, C) must share C, got hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{op}: weight must have at least one class (V >= 1), got shape {tuple(weight.shape)}")
    if weight.device != hidden.device:
        raise ValueError(f"{op}: weight is on {weight.device} but hidden is on {hidden.device}; both must be on one device")
    if not autocast_on and weight.dtype != hidden.dtype:
        raise ValueError(
            f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must have one dtype outside autocast "
            f"(under autocast the matmul runs in the autocast dtype)"
        )
    require_triton(op, hidden.device, "hidden")
    check_targets(op, targets, hidden.shape[0], hidden.device)
    check_options(op, ignore_index, reduction, label_smoothing, lse_square_scale, softcap)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be None (automatic) or an int >= 1, got {chunk_size!r}")


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    compute_dtype: torch.dtype,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
    chunk_size: int,
    n_classes: int = -1,
    loss_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss · loss_scale, z_loss, grad_hidden, grad_weight), the gradients those of the scaled loss
    for an upstream gradient of 1 (empty tensors where not needed, and always for 'none').
    ``chunk_size`` 0 means automatic; weight rows from ``n_classes`` on (-1: none) are padding."""
    n_valid = count_valid(targets, ignore_index)
    grad_scale = None
    if reduction != "none" and (grad_hidden_needed or grad_weight_needed):
        grad_scale = torch.full((1,), loss_scale if folds_scale_into_forward(compute_dtype) else 1.0,
                                dtype=torch.float32, device=hidden.device)
        if folds_mean_into_forward(reduction, compute_dtype):
            grad_scale = grad_scale / n_valid.clamp_min(1)
    loss_rows, z_loss_rows, grad_hidden, grad_weight = _chunked_loss_and_grads(
        hidden, weight, targets, ignore_index, label_smoothing, lse_square_scale, softcap, compute_dtype,
        grad_scale, grad_hidden_needed, grad_weight_needed, chunk_size, n_classes,
    )
    loss = reduce_rows(loss_rows, n_valid, reduction)
    return (
        loss * loss_scale if loss_scale != 1.0 else loss,
        reduce_rows(z_loss_rows, n_valid, reduction),
        grad_hidden if grad_hidden is not None else hidden.new_empty(0),
        grad_weight if grad_weight is not None else weight.new_empty(0),
    )


@_linear_cross_entropy_op.register_fake
def _linear_cross_entropy_fake(hidden, weight, targets, ignore_index, reduction, label_smoothing, lse_square_scale,
                               softcap, compute_dtype, grad_hidden_needed, grad_weight_needed, chunk_size,
                               n_classes=-1, loss_scale=1.0):
    loss_shape = (hidden.shape[0],) if reduction == "none" else ()
    in_forward = reduction != "none"
    return (
        hidden.new_empty(loss_shape, dtype=torch.float32),
        hidden.new_empty(loss_shape, dtype=torch.float32),
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if in_forward and grad_hidden_needed else hidden.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if in_forward and grad_weight_needed else weight.new_empty(0),
    )


@torch.library.custom_op("gpt_triton::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: Optional[float],
    compute_dtype: torch.dtype,
    grad_hidden_needed: bool,
    grad_weight_needed: bool,
    chunk_size: int,
    n_classes: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """reduction='none': (grad_hidden, grad_weight) for per-row upstream gradients ``grad_loss``,
    recomputing each chunk's logits (empty tensors where not needed)."""
    _, _, grad_hidden, grad_weight = _chunked_loss_and_grads(
        hidden, weight, targets, ignore_index, label_smoothing, lse_square_scale, softcap, compute_dtype,
        grad_loss.float(), grad_hidden_needed, grad_weight_needed, chunk_size, n_classes,
    )
    return (
        grad_hidden if grad_hidden is not None else hidden.new_empty(0),
        grad_weight if grad_weight is not None else weight.new_empty(0),
    )


@_linear_cross_entropy_backward_op.register_fake
def _linear_cross_entropy_backward_fake(grad_loss, hidden, weight, targets, ignore_index, label_smoothing,
                                        lse_square_scale, softcap, compute_dtype, grad_hidden_needed,
                                        grad_weight_needed, chunk_size, n_classes=-1):
    return (
        torch.empty_like(hidden, memory_format=torch.contiguous_format) if grad_hidden_needed else hidden.new_empty(0),
        torch.empty_like(weight, memory_format=torch.contiguous_format) if grad_weight_needed else weight.new_empty(0),
    )


def folds_scale_into_forward(compute_dtype: torch.dtype) -> bool:
    """Whether the forward's gradients carry ``loss_scale`` (not in fp16, whose small gradients would
    underflow: there the backward multiplies, as it does the mean's 1/n)."""
    return compute_dtype != torch.float16


def _forward_cost(args, outputs):
    """Bytes and FLOPs of the forward as ``_chunked_loss_and_grads`` runs it: the casts to the compute
    dtype, then per chunk the logits' matmul, the loss kernel over them (gradient written in place),
    grad_hidden's matmul and the fp32 grad_weight accumulation (read and written per chunk)."""
    hidden, weight, targets, _, reduction, *_, compute_dtype, want_hidden, want_weight, chunk_size = args[:12]
    (n, c), v, a = hidden.shape, weight.shape[0], compute_dtype.itemsize
    with_grads = reduction != "none" and (want_hidden or want_weight)
    chunk = chunk_size if chunk_size > 0 else choose_chunk_rows(n, v, compute_dtype, torch.device("cpu"))
    chunks = math.ceil(n / max(1, chunk))
    read = registry.tensor_bytes(targets) + n * c * a + chunks * v * c * a  # count_valid; the logits' matmuls
    written = n * v * a + 2 * n * 4  # logits; per-row loss and z-loss
    flops = 2 * n * v * c
    for t in (hidden, weight):
        if t.dtype != compute_dtype:
            read, written = read + registry.tensor_bytes(t), written + t.numel() * a
    read, written = read + n * v * a, written + (n * v * a if with_grads else 0)  # the loss kernel
    if with_grads and want_hidden:
        read, written, flops = read + n * v * a + chunks * v * c * a, written + n * c * hidden.element_size(), flops + 2 * n * v * c
    if with_grads and want_weight:
        acc = v * c * 4
        read += n * v * a + n * c * a + chunks * acc
        written += acc + chunks * acc  # zeroed, then accumulated per chunk
        flops += 2 * n * v * c
        if weight.dtype != torch.float32:
            read, written = read + acc, written + registry.tensor_bytes(weight)
    return read, written, flops


registry.register_cost("gpt_triton::linear_cross_entropy", _forward_cost)


def _setup_context(ctx, inputs, output):
    (hidden, weight, targets, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
     compute_dtype, grad_hidden_needed, grad_weight_needed, chunk_size, n_classes, loss_scale) = inputs
    _, z_loss, grad_hidden, grad_weight = output
    ctx.mark_non_differentiable(z_loss, grad_hidden, grad_weight)
    # Outputs without a gradient get None in the backward, not zero tensors (grad_weight's is V x C).
    ctx.set_materialize_grads(False)
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets)
    else:
        ctx.save_for_backward(targets, grad_hidden, grad_weight)
    ctx.options = (ignore_index, label_smoothing, lse_square_scale, softcap, compute_dtype)
    ctx.reduction, ctx.chunk_size, ctx.n_classes = reduction, chunk_size, n_classes
    # The part of loss_scale the backward applies: none when the forward's gradients carry it.
    ctx.backward_loss_scale = 1.0 if reduction != "none" and folds_scale_into_forward(compute_dtype) else loss_scale
    ctx.grads_needed = (grad_hidden_needed, grad_weight_needed)


def _backward(ctx, grad_loss, _grad_z_loss, _grad_grad_hidden, _grad_grad_weight):
    grad_hidden_needed, grad_weight_needed = ctx.grads_needed
    if grad_loss is None:  # the loss was not used: no gradient reaches hidden or weight
        return (None,) * 14
    ignore_index, label_smoothing, lse_square_scale, softcap, compute_dtype = ctx.options
    if (ctx.needs_input_grad[0] and not grad_hidden_needed) or (ctx.needs_input_grad[1] and not grad_weight_needed):
        raise RuntimeError("gpt_triton::linear_cross_entropy was told a gradient is not needed, so it has none")
    if ctx.backward_loss_scale != 1.0:
        grad_loss = grad_loss * ctx.backward_loss_scale
    if ctx.reduction == "none":
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden, grad_weight = torch.ops.gpt_triton.linear_cross_entropy_backward(
            grad_loss, hidden, weight, targets, ignore_index, label_smoothing, lse_square_scale, softcap,
            compute_dtype, grad_hidden_needed, grad_weight_needed, ctx.chunk_size, ctx.n_classes,
        )
    else:
        targets, grad_hidden, grad_weight = ctx.saved_tensors
        # The forward's gradients are final when the upstream gradient is exactly 1 (loss.backward() with
        # loss_scale folded in): scale_rows_ then reads the factor and exits. The step ledger's fake
        # tensors cannot be read, so it says so (registry.unit_loss_gradient).
        final = registry.unit_loss_gradient() and ctx.backward_loss_scale == 1.0 and (
            ctx.reduction == "sum" or folds_mean_into_forward(ctx.reduction, compute_dtype))
        if not final:
            scale = backward_scale(grad_loss, targets, ignore_index, ctx.reduction, compute_dtype)
            if grad_hidden_needed:
                grad_hidden = scale_gradient(grad_hidden, scale)
            if grad_weight_needed:
                grad_weight = scale_gradient(grad_weight, scale)
    return (grad_hidden if grad_hidden_needed else None, grad_weight if grad_weight_needed else None,
            None, None, None, None, None, None, None, None, None, None, None, None)


_linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: Optional[float] = None,
    return_z_loss: bool = False,
    check_targets: bool = True,
    chunk_size: Optional[int] = None,
    n_classes: Optional[int] = None,
    loss_scale: float = 1.0,
):
    """``loss_scale · cross_entropy(hidden @ weight[:n_classes].T, targets, ...)`` for ``hidden`` (N, C), ``weight``
    (V, C) and ``targets`` (N,), differentiable in ``hidden`` and ``weight``, without the (N, V)
    logits. Rows of ``weight`` from ``n_classes`` on (default: none) are padding, such as the
    model's 50304-row table for 50257 tokens: they take part in the aligned matmuls, never in the
    loss, and get a zero gradient. ``loss_scale`` (a number, e.g. ``1/grad_accum``) is folded into the
    gradients the forward computes, so ``loss.backward()`` needs no rescaling pass over them, as
    ``(loss / grad_accum).backward()`` would. See the module doc for dtypes and chunking, and
    ``gpt_kernels.cross_entropy`` for the options."""
    device_type = hidden.device.type if isinstance(hidden, torch.Tensor) else "cpu"
    autocast_on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    check_inputs(hidden, weight, targets, ignore_index, reduction, label_smoothing, lse_square_scale, softcap,
                 chunk_size, autocast_on, n_classes)
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)) or not math.isfinite(loss_scale) \
            or loss_scale <= 0:
        raise ValueError(f"linear_cross_entropy: loss_scale must be a finite number > 0, got {loss_scale!r}")
    if check_targets:
        check_targets_in_range("linear_cross_entropy", targets, n_classes or weight.shape[0], ignore_index)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast_on else hidden.dtype
    grad_on = torch.is_grad_enabled()
    loss, z_loss, _, _ = torch.ops.gpt_triton.linear_cross_entropy(
        hidden, weight, targets, ignore_index, reduction, float(label_smoothing), float(lse_square_scale),
        None if softcap is None else float(softcap), compute_dtype,
        grad_on and hidden.requires_grad, grad_on and weight.requires_grad, chunk_size or 0, n_classes or -1,
        float(loss_scale),
    )
    return (loss, z_loss) if return_z_loss else loss


def linear_cross_entropy_reference(
    hidden,
    weight,
    targets,
    ignore_index=-100,
    reduction="mean",
    *,
    label_smoothing=0.0,
    lse_square_scale=0.0,
    softcap=None,
    return_z_loss=False,
    check_targets=True,
    chunk_size=None,
    n_classes=None,
    loss_scale=1.0,
):
    """PyTorch reference: the full (N, n_classes) logits, then the loss in fp32, times ``loss_scale``.
    ``chunk_size`` is accepted (so that either implementation takes the same call) and has no effect here."""
    result = cross_entropy_reference(
        hidden @ weight[:n_classes].T, targets, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale, softcap=softcap, return_z_loss=return_z_loss, check_targets=check_targets,
    )
    if loss_scale == 1.0:
        return result
    return (result[0] * loss_scale, result[1]) if return_z_loss else result * loss_scale


registry.register("linear_cross_entropy", reference=linear_cross_entropy_reference, triton=linear_cross_entropy)
