"""AdamW with decoupled weight decay, and gradient clipping by global norm fused into the step.

Public: ``AdamW`` (the Triton optimizer) and ``TorchAdamW`` (``torch.optim.AdamW``), with one
interface. Per optimizer step the training loop does::

    norm = opt.clip_grad_norm_(max_norm)   # global gradient norm, a 0-dim fp32 tensor
    if torch.isfinite(norm):
        opt.step()                         # applies min(1, max_norm / (norm + 1e-6)) to the gradients
    opt.zero_grad(set_to_none=True)        # also drops a clip scale no step consumed

``AdamW.clip_grad_norm_`` computes the norm but does not touch the gradients: it leaves the clip
scale on the device and the next ``step()`` multiplies each gradient by it as it reads it, so
clipping costs one pass over the gradients (the norm's read) instead of three (the norm's read,
then the scaling's read and write).
``step()`` alone (no clipping) works too. The math is ``torch.optim.AdamW``'s, in the same order:
``p *= 1 - lr·wd``, ``m = lerp(m, g, 1 - β1)``, ``v = β2·v + (1 - β2)·g²``,
``p -= lr/(1 - β1^t) · m / (√v / √(1 - β2^t) + eps)``, each operation rounded to fp32 on its own
(IEEE sqrt and division, no fused multiply-adds: see ``STEP_LAUNCH_OPTIONS``).

Design: multi-tensor apply (a table of pointers), not flat buffers. The training loop zeroes
gradients with ``set_to_none=True``, so autograd allocates fresh gradient tensors every step; flat
gradient buffers would need the optimizer to own every ``.grad`` (an extra memset pass per step
and a model that must be built around its optimizer), and flat parameter buffers would need the
model's parameters to be views of them. A pointer table needs neither: the model stays plain, and
the state is per parameter, exactly ``torch.optim.AdamW``'s, so ``state_dict`` moves between the
two. Each launch covers every parameter of one dtype, all groups together (per-tensor rows carry
each group's lr, weight decay, betas and eps): one program per CHUNK elements of one tensor, found
through a static chunk table ``(tensor, start, end)``, and per-step rows with the gradient
pointer and the bias-corrected coefficients, computed on the host in float64 as torch does and
sent in one ~8 KB copy (no recompilation when lr changes, no host-device sync).
Launches per step for GPT-2 124M (148 tensors, one dtype): ``step()`` 1; ``clip_grad_norm_`` 2
(per-chunk sums of squares, then one program that adds them up, takes the root and the clip scale);
so 3 kernels and 2 small host-to-device copies per clipped step (``bench/bench_adamw.py`` counts
torch's for ``clip_grad_norm_`` + ``AdamW(fused=True)``). Parameters of several dtypes take one
launch each; parameters not 16-byte aligned (views at odd offsets) one more, without the alignment
hints that let the aligned launch use 16-byte vector loads. Full blocks are loaded unmasked and
only a tensor's ragged tail masked, since a mask on a size read from memory defeats vectorization.

``capturable=True`` keeps ``step`` (per parameter, as torch) on the device and reads ``lr`` there:
the kernel computes the bias corrections itself (in fp32, like torch's capturable mode), a
``_foreach_add_`` advances the counters, and the pointer rows are reused while no pointer changes,
so warmed-up steps can be captured in a CUDA graph. A table that would have to be built during a
capture (a tensor moved since the warm-up, or an optimizer that is not capturable) is a
RuntimeError, not a copy the graph would replay from freed memory. Inside a graph, keep
``group["lr"]`` a device tensor and update it in place (a float lr is copied into the optimizer's
own tensor only when it changes, and that copy would be frozen into the graph).

Dtypes: parameters fp32, or bf16/fp16 with fp32 moments (each step reads the parameter, computes
in fp32 and rounds the new value to the parameter's dtype; without fp32 master weights, updates
below half an ulp of a parameter are lost). Gradients have their parameter's dtype. The norm is
fp32 whatever the gradients' dtype (``torch.nn.utils`` returns it in the gradients' dtype), and a
clipped gradient is used in fp32 (torch rounds it back to bf16 first).
FSDP2 (DTensor parameters sharded on a 1-D mesh): each rank updates its own shards, and
``clip_grad_norm_`` all-reduces the shards' sums of squares, so the norm and the clip are global.
With DDP the gradients are already all-reduced when the optimizer sees them: nothing to do.
Parameters without gradients are skipped, as torch skips them (their ``step`` does not advance);
sparse gradients, AMSGrad and ``maximize`` are refused with a ValueError.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import triton
import triton.language as tl
from torch.distributed.tensor import DTensor

from gpt_kernels import registry

SUPPORTED_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# Starting points for Hopper; the GPU session tunes them with bench/bench_adamw.py. A program
# walks CHUNK elements of one tensor in BLOCK-sized steps: 16 steps of 1024 fp32 (4 KiB per
# stream) give each program enough work to hide its table lookups, and GPT-2 124M ~7,700 programs.
BLOCK = 1024
CHUNK = 16 * BLOCK
NUM_WARPS = 4
FINALIZE_BLOCK = 1024  # partial sums per iteration of the norm's single finishing program
ALIGNMENT = 16  # bytes: what a 16-byte vector load needs, and what the aligned launch promises
# The step's compile options: no contraction into fused multiply-adds. Contracted, p·(1 - lr·wd)
# + update skips the rounding of torch's separate ``param.mul_``, a last-bit difference that
# compounds: a float64-exact emulation of 50 steps on 10M elements (GPT-2's embedding has 38M) puts
# it at 1.4e-6 of the largest parameter, over the tests' 1e-6, against 9e-8 uncontracted. The cost
# is a few more arithmetic instructions per element in a memory-bound kernel.
STEP_LAUNCH_OPTIONS = dict(num_warps=NUM_WARPS, enable_fp_fusion=False)

# Per-tensor rows of the step table: int64 [gradient pointer, step pointer, lr pointer] followed by
# 8 fp32 coefficients packed into the last 4 int64 slots (one host-to-device copy for both):
# [lr/(1 - β1^t), 1 - lr·wd, √(1 - β2^t), β1, 1 - β1, β2, 1 - β2, eps]. The first three change every
# step; capturable mode (step pointer and lr pointer set) puts wd first and derives them in the kernel.
_POINTER_COLUMNS = 3
_STEP_ROW = _POINTER_COLUMNS + 4
_COEF_ROW = 2 * _STEP_ROW  # the coefficients' row stride in fp32 elements
# Device tables are cached by the pointers and sizes they hold; past this many per cache, pointers
# keep changing (a caller reallocating tensors) and the oldest entries are dropped.
_MAX_CACHED_TABLES = 8


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _table_pointer(entry_ptr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The pointer stored (as an int64) at ``entry_ptr``, typed ``DTYPE*``, with its alignment hint."""
    ptr = tl.load(entry_ptr).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _adamw_block(
    p_ptr, g_ptr, m_ptr, v_ptr, offs, mask, clip_scale,
    step_size, decay, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
    HAS_CLIP_SCALE: tl.constexpr,
):
    """One block of the AdamW update in fp32, in torch.optim.AdamW's order of operations.
    ``mask`` is None for full blocks (so the loads can be vectorized) and the tail's mask otherwise."""
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if HAS_CLIP_SCALE:
        g = g * clip_scale
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * g * g
    # IEEE-rounded sqrt and division, as torch's (Triton's `/` and tl.sqrt may compile to approximations).
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    p = p + tl.div_rn(-step_size * m, denom)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)


@triton.jit
def _adamw_kernel(
    chunk_table_ptr, tensor_table_ptr, step_table_ptr, coef_ptr, clip_scale_ptr,
    PARAM_DTYPE: tl.constexpr, ALIGNED: tl.constexpr, CAPTURABLE: tl.constexpr, HAS_CLIP_SCALE: tl.constexpr,
    STEP_ROW: tl.constexpr, COEF_ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_table_ptr + 3 * chunk)
    start = tl.multiple_of(tl.load(chunk_table_ptr + 3 * chunk + 1), BLOCK)  # chunks start at multiples of CHUNK
    end = tl.load(chunk_table_ptr + 3 * chunk + 2)

    p_ptr = _table_pointer(tensor_table_ptr + 3 * tensor, PARAM_DTYPE, ALIGNED)
    m_ptr = _table_pointer(tensor_table_ptr + 3 * tensor + 1, tl.float32, ALIGNED)
    v_ptr = _table_pointer(tensor_table_ptr + 3 * tensor + 2, tl.float32, ALIGNED)
    step_row = step_table_ptr + STEP_ROW * tensor
    g_ptr = _table_pointer(step_row, PARAM_DTYPE, ALIGNED)
    coefs = coef_ptr + COEF_ROW * tensor
    one_minus_beta1 = tl.load(coefs + 4)
    beta2 = tl.load(coefs + 5)
    one_minus_beta2 = tl.load(coefs + 6)
    eps = tl.load(coefs + 7)
    if CAPTURABLE:
        # step (already advanced) and lr live on the device; the corrections are computed here in fp32.
        beta1 = tl.load(coefs + 3)
        step = tl.load(_table_pointer(step_row + 1, tl.float32, False))
        lr = tl.load(_table_pointer(step_row + 2, tl.float32, False))
        weight_decay = tl.load(coefs)
        bias_correction1 = 1.0 - tl.exp2(step * tl.log2(beta1))
        bias_correction2 = 1.0 - tl.exp2(step * tl.log2(beta2))
        step_size = tl.div_rn(lr, bias_correction1)
        decay = 1.0 - lr * weight_decay
        bias_correction2_sqrt = tl.sqrt_rn(bias_correction2)
    else:
        step_size = tl.load(coefs)
        decay = tl.load(coefs + 1)
        bias_correction2_sqrt = tl.load(coefs + 2)
    clip_scale = 1.0
    if HAS_CLIP_SCALE:
        clip_scale = tl.load(clip_scale_ptr)

    offs = tl.arange(0, BLOCK)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in tl.range(start, full_end, BLOCK):
        _adamw_block(
            p_ptr + block_start, g_ptr + block_start, m_ptr + block_start, v_ptr + block_start, offs, None,
            clip_scale, step_size, decay, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
            HAS_CLIP_SCALE,
        )
    if full_end < end:  # the ragged tail of a tensor's last chunk
        _adamw_block(
            p_ptr + full_end, g_ptr + full_end, m_ptr + full_end, v_ptr + full_end, offs, offs < end - full_end,
            clip_scale, step_size, decay, bias_correction2_sqrt, one_minus_beta1, beta2, one_minus_beta2, eps,
            HAS_CLIP_SCALE,
        )


@triton.jit
def _grad_sum_squares_kernel(
    chunk_table_ptr, grad_table_ptr, partials_ptr,
    GRAD_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
):
    """partials[chunk] = the sum of squares of one chunk of one gradient, accumulated in fp32."""
    chunk = tl.program_id(0)
    tensor = tl.load(chunk_table_ptr + 3 * chunk)
    start = tl.multiple_of(tl.load(chunk_table_ptr + 3 * chunk + 1), BLOCK)
    end = tl.load(chunk_table_ptr + 3 * chunk + 2)
    g_ptr = _table_pointer(grad_table_ptr + tensor, GRAD_DTYPE, True)  # gradients are always aligned

    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    full_end = start + (end - start) // BLOCK * BLOCK
    for block_start in tl.range(start, full_end, BLOCK):
        g = tl.load(g_ptr + block_start + offs).to(tl.float32)
        acc += g * g
    if full_end < end:
        g = tl.load(g_ptr + full_end + offs, mask=offs < end - full_end, other=0.0).to(tl.float32)
        acc += g * g
    tl.store(partials_ptr + chunk, tl.sum(acc, axis=0))


@triton.jit
def _finalize_norm_kernel(
    partials_ptr, n_partials, norm_ptr, clip_scale_ptr, max_norm,
    HAS_MAX_NORM: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: the global norm from the partial sums, and the clip scale torch would apply."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for block_start in tl.range(0, n_partials, BLOCK):
        acc += tl.load(partials_ptr + block_start + offs, mask=block_start + offs < n_partials, other=0.0)
    norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    tl.store(norm_ptr, norm)
    if HAS_MAX_NORM:
        # torch.nn.utils.clip_grad_norm_: clamp(max_norm * (1 / (norm + 1e-6)), max=1); NaN stays NaN.
        scale = max_norm * tl.div_rn(1.0, norm + 1e-6)
        tl.store(clip_scale_ptr, tl.minimum(scale, 1.0, propagate_nan=tl.PropagateNan.ALL))


# ----------------------------------------------------------------------------- the reference


def _all_plain_cuda(params) -> bool:
    """Whether every parameter (given as tensors or param groups) is a plain CUDA floating tensor,
    which torch's fused AdamW takes; DTensor shards and CPU tensors keep torch's default."""
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    tensors = [t for group in tensors for t in ([group] if isinstance(group, torch.Tensor) else group)]
    return bool(tensors) and all(
        type(t) in (torch.Tensor, torch.nn.Parameter) and t.is_cuda and t.is_floating_point() for t in tensors
    )


class TorchAdamW(torch.optim.AdamW):
    """PyTorch reference: ``torch.optim.AdamW`` plus ``clip_grad_norm_``, the interface training uses.

    ``clip_grad_norm_(max_norm)`` returns the global gradient norm (before clipping) and clips to
    ``max_norm`` when it is given; a fused optimizer may defer the scaling into its ``step``.

    On CUDA it defaults to ``fused=True``, torch's fastest AdamW (what nanoGPT uses), so that every
    ablation with the ``adamw`` kernel off compares against the strongest PyTorch baseline, not
    the slower foreach loop. Pass ``foreach=`` or ``fused=`` to choose otherwise.
    """

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs):
        params = list(params)
        if "fused" not in kwargs and "foreach" not in kwargs and _all_plain_cuda(params):
            kwargs["fused"] = True
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    def clip_grad_norm_(self, max_norm=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if max_norm is None or max_norm <= 0:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


# ----------------------------------------------------------------------------- the Triton optimizer


def _check_hyperparameters(lr, betas, eps, weight_decay, read_lr_tensor: bool = True) -> None:
    """ValueError, as torch.optim.AdamW gives, for hyperparameters the update cannot use.
    ``read_lr_tensor=False`` skips the value of a tensor lr (reading a CUDA one would sync)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"AdamW: lr must be a number or a one-element tensor, got shape {tuple(lr.shape)}")
        if read_lr_tensor and not 0.0 <= lr.item():
            raise ValueError(f"AdamW: invalid learning rate {lr.item()}: expected lr >= 0")
    elif not 0.0 <= lr:
        raise ValueError(f"AdamW: invalid learning rate {lr}: expected lr >= 0")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"AdamW: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AdamW: invalid beta parameter at index {i}: {beta}; expected 0 <= beta < 1")
    if not eps > 0.0:
        raise ValueError(f"AdamW: invalid epsilon value {eps}: expected eps > 0")
    if not 0.0 <= weight_decay:
        raise ValueError(f"AdamW: invalid weight_decay value {weight_decay}: expected weight_decay >= 0")


def _local(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds of an FSDP2 (DTensor) parameter, gradient or moment; ``t`` otherwise.
    The update is elementwise, so each rank updates its shards and only the norm needs the others."""
    return t.to_local() if isinstance(t, DTensor) else t


def _shard_group(params) -> "dist.ProcessGroup | None":
    """The process group over which FSDP2 shards these parameters (None when none is a DTensor)."""
    groups = set()
    for p in params:
        if isinstance(p, DTensor):
            if p.device_mesh.ndim != 1 or not all(placement.is_shard() for placement in p.placements):
                raise ValueError(f"AdamW: DTensor parameters must be sharded on a 1-D mesh (FSDP2's fully_shard), "
                                 f"got placements {p.placements} on a {p.device_mesh.ndim}-D mesh")
            groups.add(p.device_mesh.get_group())
    if len(groups) > 1:
        raise ValueError("AdamW: all DTensor parameters must be sharded over one process group")
    return groups.pop() if groups else None


def _kernel_ready_grad(p: torch.Tensor) -> torch.Tensor:
    """``p.grad`` (this rank's shard of it under FSDP2), checked, as a dense aligned tensor laid out
    like ``p`` (a copy only when it is not)."""
    g = _local(p.grad)
    if g.is_sparse:
        raise ValueError("AdamW does not support sparse gradients")
    if g.dtype != p.dtype:
        raise ValueError(f"AdamW: a gradient must have its parameter's dtype {p.dtype}, got {g.dtype}")
    if not g.is_contiguous() or g.data_ptr() % ALIGNMENT != 0:
        g = g.clone(memory_format=torch.contiguous_format)
    return g


class _Plan:
    """The static tables of one launch: chunk -> (tensor, start, end), tensor -> (param, exp_avg,
    exp_avg_sq) pointers. Valid while none of those tensors moves."""

    def __init__(self, chunk_table: torch.Tensor, tensor_table: torch.Tensor | None):
        self.chunk_table = chunk_table
        self.tensor_table = tensor_table
        self.n_chunks = chunk_table.shape[0]


def _chunk_table(numels: list[int], device: torch.device) -> torch.Tensor:
    """int64 [n_chunks, 3]: (tensor index, first element, end) of every CHUNK-element piece."""
    numels_t = torch.tensor(numels, dtype=torch.int64)
    counts = (numels_t + CHUNK - 1) // CHUNK
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    start = (torch.arange(tensor.numel(), dtype=torch.int64) - first_chunk[tensor]) * CHUNK
    end = torch.minimum(start + CHUNK, numels_t[tensor])
    return _to_device(torch.stack([tensor, start, end], dim=1), device)


def _remember(cache: dict, key, value):
    """``cache[key] = value``, dropping the oldest entry when the cache is full; returns ``value``."""
    if len(cache) >= _MAX_CACHED_TABLES:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def _to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on ``device`` without blocking the host (pinned, asynchronous copy)."""
    if device.type == "cpu":
        return host
    if torch.cuda.is_current_stream_capturing():
        # A CUDA graph would replay this copy from a pinned buffer that is freed (and reused) once
        # the capture ends, and freeze a table whose contents change every step.
        raise RuntimeError(
            "AdamW: a pointer table had to be built inside CUDA graph capture. Capture needs "
            "capturable=True and warm-up steps on the same tensors (parameters, gradients and state "
            "keep their addresses; gradients contiguous and 16-byte aligned)"
        )
    return host.pin_memory().to(device, non_blocking=True)


class AdamW(torch.optim.Optimizer):
    """Fused AdamW on Triton (see the module doc): ``torch.optim.AdamW``'s update and state, with
    the step for all parameters of a dtype in one launch and gradient clipping fused into it."""

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, *, capturable=False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        self.capturable = capturable
        self._device = None
        self._pending_clip_scale = None
        self._plans: dict[tuple, _Plan] = {}
        self._cached_step_tables: dict[tuple, tuple] = {}
        self._cached_grad_tables: dict[tuple, torch.Tensor] = {}
        self._lr_tensors: dict[int, tuple[float, torch.Tensor]] = {}
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)  # fills in the defaults, which the checks need
        try:
            self._check_new_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_new_group(self, group: dict) -> None:
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        device = self._device
        for p in group["params"]:
            if p.dtype not in SUPPORTED_PARAM_DTYPES:
                raise ValueError(f"AdamW: parameters must be float32, bfloat16 or float16, got {p.dtype}")
            if not registry.triton_runs_on(p.device):
                raise ValueError(
                    f"AdamW: the Triton optimizer needs CUDA parameters (or TRITON_INTERPRET=1 set before "
                    f"import for CPU ones), got a parameter on {p.device}"
                )
            device = p.device if device is None else device
            if p.device != device:
                raise ValueError(f"AdamW: all parameters must be on one device, got {device} and {p.device}")
            if not p.is_contiguous():
                raise ValueError(f"AdamW: parameters must be contiguous, got one of shape {tuple(p.shape)} "
                                 f"with strides {p.stride()}")
        self._device = device

    # ------------------------------------------------------------------ the training loop's interface

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None = None) -> torch.Tensor:
        """The global L2 norm of all gradients (a 0-dim fp32 tensor on the parameters' device).

        With ``max_norm > 0`` the next ``step()`` scales the gradients by ``min(1, max_norm / (norm + 1e-6))``
        as it reads them (the gradients themselves are left unchanged); ``zero_grad`` drops that scale.
        """
        self._pending_clip_scale = None
        device = self._device
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.numel() > 0:
                    by_dtype.setdefault(p.dtype, []).append(_kernel_ready_grad(p))
        if not by_dtype:  # no gradients (or only empty ones): a zero norm, which never clips
            return torch.zeros((), dtype=torch.float32, device=device)
        clip = max_norm is not None and max_norm > 0
        plans = {dtype: self._plan(tuple(g.numel() for g in grads)) for dtype, grads in by_dtype.items()}
        partials = torch.empty(sum(plan.n_chunks for plan in plans.values()), dtype=torch.float32, device=device)
        offset = 0
        for dtype, grads in by_dtype.items():
            plan = plans[dtype]
            grad_table = self._grad_table(grads)
            _grad_sum_squares_kernel[(plan.n_chunks,)](
                plan.chunk_table, grad_table, partials[offset:],
                GRAD_DTYPE=_TL_DTYPES[dtype], BLOCK=BLOCK, num_warps=NUM_WARPS,
            )
            offset += plan.n_chunks
        group = _shard_group(p for g in self.param_groups for p in g["params"] if p.grad is not None)
        if group is not None:
            # FSDP2: each rank holds a disjoint shard of every gradient, so the squares add up across ranks.
            squares = partials.sum()
            dist.all_reduce(squares, group=group)
            norm = squares.sqrt()
            if clip:  # torch.nn.utils.clip_grad_norm_'s scale, as the finishing kernel computes it
                self._pending_clip_scale = torch.clamp(max_norm * (1.0 / (norm + 1e-6)), max=1.0)
            return norm
        norm = torch.empty((), dtype=torch.float32, device=device)
        clip_scale = torch.empty((), dtype=torch.float32, device=device) if clip else norm
        _finalize_norm_kernel[(1,)](
            partials, partials.numel(), norm, clip_scale, float(max_norm) if clip else 0.0,
            HAS_MAX_NORM=clip, BLOCK=FINALIZE_BLOCK, num_warps=NUM_WARPS,
        )
        if clip:
            self._pending_clip_scale = clip_scale
        return norm

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip_scale, self._pending_clip_scale = self._pending_clip_scale, None

        # Bucket by launch: (param dtype, whether param and moments are 16-byte aligned).
        buckets: dict[tuple[torch.dtype, bool], list] = {}
        for group_index, group in enumerate(self.param_groups):
            self._check_group(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = _kernel_ready_grad(p)
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(p, state)
                param, exp_avg, exp_avg_sq = _local(p), _local(state["exp_avg"]), _local(state["exp_avg_sq"])
                if not g.numel() == param.numel() == exp_avg.numel() == exp_avg_sq.numel():
                    # The kernel trusts the sizes: a mismatch (p.data replaced by a tensor of another
                    # size, or foreign state) would read and write out of bounds.
                    raise ValueError(
                        f"AdamW: a parameter of shape {tuple(p.shape)} has a gradient of shape {tuple(p.grad.shape)} "
                        f"and moments of shape {tuple(state['exp_avg'].shape)}; they must all match"
                    )
                pointers = (param.data_ptr(), exp_avg.data_ptr(), exp_avg_sq.data_ptr())
                aligned = all(ptr % ALIGNMENT == 0 for ptr in pointers)
                buckets.setdefault((p.dtype, aligned), []).append((group_index, g, state, pointers))
        if not buckets:
            return loss

        entries = [entry for bucket in buckets.values() for entry in bucket]
        steps = [state["step"] for _, _, state, _ in entries]
        torch._foreach_add_(steps, 1.0)  # one call for every counter (CPU, or the device when capturable)
        step_values = None if self.capturable else torch.stack(steps).tolist()

        first = 0
        for (dtype, aligned), bucket in buckets.items():
            plan = self._plan(tuple(g.numel() for _, g, _, _ in bucket), tuple(ptrs for *_, ptrs in bucket))
            bucket_steps = None if step_values is None else step_values[first:first + len(bucket)]
            first += len(bucket)
            if plan.n_chunks == 0:
                continue
            step_table, coefs = self._step_table(bucket, bucket_steps)
            _adamw_kernel[(plan.n_chunks,)](
                plan.chunk_table, plan.tensor_table, step_table, coefs,
                clip_scale if clip_scale is not None else coefs,
                PARAM_DTYPE=_TL_DTYPES[dtype], ALIGNED=aligned, CAPTURABLE=self.capturable,
                HAS_CLIP_SCALE=clip_scale is not None, STEP_ROW=_STEP_ROW, COEF_ROW=_COEF_ROW,
                BLOCK=BLOCK, **STEP_LAUNCH_OPTIONS,
            )
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Gradients that are dropped (a skipped step) or zeroed must not be clipped by a stale scale.
        self._pending_clip_scale = None
        super().zero_grad(set_to_none=set_to_none)

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state dict of this class or of ``torch.optim.AdamW``. Moments are kept fp32 (torch
        would cast them to the parameters' dtype) and copied (never shared with ``state_dict``)."""
        # Checked before anything is loaded: a refused dict leaves this optimizer as it was.
        for group in state_dict["param_groups"]:
            self._check_group(group)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        loaded = [(p, state_dict["state"][i]) for i, p in zip(saved_ids, params) if i in state_dict["state"]]
        for p, saved in loaded:
            if any(saved[key].shape != p.shape for key in ("exp_avg", "exp_avg_sq")):
                raise ValueError(f"AdamW: the state dict holds moments of shape {tuple(saved['exp_avg'].shape)} "
                                 f"for a parameter of shape {tuple(p.shape)}")
        super().load_state_dict(state_dict)
        for p, saved in loaded:
            moments = {
                key: saved[key].to(p.device, torch.float32, memory_format=torch.contiguous_format, copy=True)
                for key in ("exp_avg", "exp_avg_sq")
            }
            self.state[p] = {"step": self._new_step(p, float(saved["step"])), **moments}
        self._plans.clear()
        self._cached_step_tables.clear()
        self._cached_grad_tables.clear()

    # ------------------------------------------------------------------ internals

    def _check_group(self, group: dict) -> None:
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"], read_lr_tensor=False)
        # A state dict from torch brings its flags into the groups: refuse the ones we do not implement.
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"AdamW: {flag}=True is not supported by the Triton optimizer")
        if group.get("decoupled_weight_decay") is False:
            raise ValueError("AdamW: these groups are Adam's (L2-coupled weight decay); this optimizer is AdamW")

    def _new_step(self, p: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        # torch.optim.AdamW's layout: a 0-dim fp32 tensor, on the CPU unless capturable.
        return torch.tensor(value, dtype=torch.float32, device=p.device if self.capturable else "cpu")

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = self._new_step(p)
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)

    def _plan(self, numels: tuple[int, ...], pointers: tuple = ()) -> _Plan:
        """The cached tables for tensors of these sizes and (param, exp_avg, exp_avg_sq) pointers
        (the chunk table alone when no pointers are given: the norm needs no more)."""
        key = (CHUNK, numels, pointers)
        plan = self._plans.get(key)
        if plan is None:
            tensor_table = _to_device(torch.tensor(pointers, dtype=torch.int64), self._device) if pointers else None
            plan = _remember(self._plans, key, _Plan(_chunk_table(list(numels), self._device), tensor_table))
        return plan

    def _grad_table(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The gradients' pointers on the device; kept while they do not move when capturable (no
        host-to-device copy may happen inside a CUDA graph)."""
        pointers = tuple(g.data_ptr() for g in grads)
        cached = self._cached_grad_tables.get(pointers)
        if cached is not None:
            return cached
        table = _to_device(torch.tensor(pointers, dtype=torch.int64), self._device)
        return _remember(self._cached_grad_tables, pointers, table) if self.capturable else table

    def _lr_pointer(self, group_index: int, group: dict) -> int:
        """Capturable mode: the address of a device fp32 scalar holding the group's lr."""
        lr = group["lr"]
        if isinstance(lr, torch.Tensor) and lr.device == self._device and lr.dtype == torch.float32:
            return lr.data_ptr()
        value = float(lr)
        cached = self._lr_tensors.get(group_index)
        if cached is None:
            cached = (value, torch.tensor(value, dtype=torch.float32, device=self._device))
        elif cached[0] != value:
            cached[1].fill_(value)
            cached = (value, cached[1])
        self._lr_tensors[group_index] = cached
        return cached[1].data_ptr()

    def _step_table(self, bucket: list, step_values: list[float] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-tensor rows for one launch, on the device: the int64 pointer table and its fp32
        coefficient view (see ``_STEP_ROW``)."""
        groups = self.param_groups
        if self.capturable:
            lr_pointers = {i: self._lr_pointer(i, groups[i]) for i in {group_index for group_index, *_ in bucket}}
            pointers = [(g.data_ptr(), s["step"].data_ptr(), lr_pointers[i]) for i, g, s, _ in bucket]
            coefs = [(groups[i]["weight_decay"], 0.0, 0.0, *self._beta_coefs(groups[i])) for i, *_ in bucket]
            key = (tuple(pointers), tuple(coefs))
            cached = self._cached_step_tables.get(key)
            if cached is not None:
                return cached
        else:
            pointers = [(g.data_ptr(), 0, 0) for _, g, _, _ in bucket]
            per_step: dict[tuple[int, float], tuple] = {}
            coefs = []
            for (group_index, *_), step in zip(bucket, step_values):
                row = per_step.get((group_index, step))
                if row is None:
                    row = per_step[(group_index, step)] = self._step_coefs(groups[group_index], step)
                coefs.append(row)

        host = np.zeros((len(bucket), _STEP_ROW), dtype=np.int64)
        host[:, :_POINTER_COLUMNS] = pointers
        host[:, _POINTER_COLUMNS:].view(np.float32)[:] = coefs  # float64 -> fp32, rounded to nearest as torch casts
        table = _to_device(torch.from_numpy(host), self._device)
        result = (table, table[:, _POINTER_COLUMNS:].view(torch.float32))
        return _remember(self._cached_step_tables, key, result) if self.capturable else result

    @staticmethod
    def _beta_coefs(group: dict) -> tuple:
        beta1, beta2 = group["betas"]
        return beta1, 1.0 - beta1, beta2, 1.0 - beta2, group["eps"]

    @classmethod
    def _step_coefs(cls, group: dict, step: float) -> tuple:
        """The update's scalars for one group at one step, in float64 exactly as torch.optim.AdamW computes them."""
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        return (step_size, 1 - lr * group["weight_decay"], bias_correction2**0.5, *cls._beta_coefs(group))


# The op ``adamw`` builds the optimizer: ``gpt_kernels.adamw(params, lr=...)`` / ``ops.adamw(...)``.
adamw, adamw_reference = AdamW, TorchAdamW
registry.register("adamw", reference=adamw_reference, triton=adamw, device_of=registry.params_device)
