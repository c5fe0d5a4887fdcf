"""The lm_head matmul fused with the cross-entropy loss: ``cross_entropy(hidden @ weight.T, targets)``
and its gradients, in Triton GEMMs that write each ``(N, V)`` logits tile once and read it twice.

Eager PyTorch at GPT-2's loss stage (16·1024 tokens, 50257 classes) materializes the logits in bf16,
an fp32 copy, the log-softmax and the gradient of each. Here, for each chunk of rows of ``hidden``:

1. ``_logits_kernel``: tiles of ``hidden @ weight.T`` with fp32 accumulation. Its epilogue rounds a
   tile to the compute dtype (the logits ``hidden @ weight.T`` would give) and reduces it per row:
   the max and the sum of ``exp(z - max)``, the sum of the logits (label smoothing) and the target's
   logit. When gradients are wanted it stores ``exp(z - tile max)`` in the compute dtype (the logits
   themselves under a soft cap, whose derivative needs them); a loss alone (evaluation,
   ``torch.no_grad()``) stores nothing.
2. ``_row_statistics_kernel`` folds a row's tiles into its loss and z-loss, into the factors of its
   gradient ``dlogits = scale·(softmax·(1 + 2·s·lse) - (1 - eps)·onehot - eps/V)`` (times
   ``1 - tanh²`` under a soft cap), and turns each tile's max into the scale ``exp(tile max -
   max)·scale·(1 + 2·s·lse)/sum`` that makes the stored values the softmax's share of ``dlogits``.
3. ``_grad_hidden_kernel`` (``dlogits @ weight``) and ``_grad_weight_kernel`` (``dlogits.T @ hidden``):
   GEMMs whose ``dlogits`` operand is made from the stored values as it is loaded (a multiply and
   the one-hot: no exponential, which each would redo for every block of columns it writes), so the
   gradient of the logits never exists in memory.

That is the three matmuls' FLOPs, ``N·V`` exponentials, and in bf16 ``2·N·V`` bytes written and
``4·N·V`` read for the stored tiles: ~5 GB at GPT-2's step. Stored as ``exp(z - tile max)`` in
(0, 1], each value carries bf16's relative rounding (2^-9) into ``dlogits``, as a stored bf16
gradient would.

The recompute variant (``GPT_LINEAR_CROSS_ENTROPY=recompute``, ``use_variant``) stores nothing of
size ``N × V``, as Cut Cross-Entropy does: step 1 keeps its tiles on chip, and one backward kernel,
``_recomputed_grads_kernel``, computes each logits tile again (a fourth GEMM), makes its ``dlogits``
and adds both gradients' shares of it with fp32 atomics (so their last bits vary from run to run).
The other way to keep the logits on chip, a ``rows × C`` accumulator for ``grad_hidden``, does not
fit (384 KB for 128 rows at C = 768, against an H100 SM's 228 KB). The README's ledger section
weighs the two variants.

The loss, ``grad_hidden`` and ``grad_weight`` all come out of the forward (as in Liger-Kernel's fused
linear cross-entropy), and the backward only multiplies them by the incoming gradient, in place, for
free when it is exactly 1 (see ``gpt_kernels.cross_entropy.scale_gradient``). With
``reduction='none'`` the upstream gradient weighs each row inside the ``grad_weight`` sum, so the
forward computes the loss only and the backward runs the three kernels with those weights.

Chunks (``chunk_size=None``): as many as keep one chunk's logits within ``CHUNK_LOGITS_BYTES`` (and,
on a GPU, a quarter of the free memory), as even as possible, in multiples of ``CHUNK_ROW_MULTIPLE``
rows: one chunk for GPT-2 at 16·1024 tokens in bf16. With several, ``grad_weight`` is accumulated in
fp32 by ``_grad_weight_kernel`` itself (read and written once per chunk).

Dtypes: a custom op is not autocast-aware, so the wrapper reads the autocast state of the inputs'
device before calling it: under autocast the GEMMs run in the autocast dtype (bf16 logits from an
fp32 ``hidden`` and an fp32 ``weight``, like ``hidden @ weight.T`` under autocast), otherwise in the
inputs' dtype (``hidden`` and ``weight`` must then match). Accumulation is fp32 everywhere, and
``dlogits`` is rounded to the compute dtype for the gradient GEMMs, as a stored gradient would be.
fp32 GEMMs follow PyTorch's TF32 setting (``torch.backends.cuda.matmul.allow_tf32``: off by default,
on in ``train_gpt2.py``), as the unfused ``lm_head`` does. The loss is fp32; ``grad_hidden`` has
``hidden``'s dtype and ``grad_weight`` ``weight``'s. Under Triton's interpreter (CPU tests) bf16
operands are widened to fp32 before each ``tl.dot``, whose bf16 form the interpreter gets wrong; the
products are the same (a bf16 product is exact in fp32).

Options, the z-loss return (``return_z_loss=True`` -> ``(loss, z_loss)``), ``check_targets`` and the
input checks are those of ``gpt_kernels.cross_entropy.cross_entropy``.

Public: ``linear_cross_entropy`` (the differentiable custom op ``gpt_triton::linear_cross_entropy``),
``linear_cross_entropy_reference``, ``choose_chunk_rows``, ``use_variant`` and ``VARIANTS``.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt_kernels import registry
from gpt_kernels.common import check_tensor, flat_grid_tile, require_triton
from gpt_kernels.cross_entropy import (
    backward_scale,
    check_options,
    check_targets,
    check_targets_in_range,
    count_valid,
    cross_entropy_reference,
    folds_mean_into_forward,
    reduce_rows,
    scale_gradient,
    soft_cap,
)
from gpt_kernels.host import cdiv, next_power_of_2

# One chunk's logits take at most this much memory: GPT-2's 16·1024 tokens in bf16 (1.6 GB) fit in
# one chunk, so grad_weight is written once, never accumulated.
CHUNK_LOGITS_BYTES = 2 * 2**30
CHUNK_ROW_MULTIPLE = 128  # whole GEMM tiles
ROW_ALIGNMENT = 16  # elements: Triton marks a row stride divisible by 16 as aligned

# How the gradient GEMMs get the logits (GPT_LINEAR_CROSS_ENTROPY): "stored" (the default), or
# "recompute": nothing of size N x V is ever stored (for memory), the backward recomputes each logits
# tile (a fourth GEMM) and adds both gradients' shares of it with fp32 atomics (not bit-reproducible).
# The default stays until a GPU times both (bench/bench_linear_cross_entropy.py).
VARIANTS = ("stored", "recompute")


def _checked_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"GPT_LINEAR_CROSS_ENTROPY must be one of {', '.join(VARIANTS)}, got {variant!r}")
    return variant


VARIANT = _checked_variant(os.environ.get("GPT_LINEAR_CROSS_ENTROPY", "stored"))


@contextlib.contextmanager
def use_variant(variant: str):
    """GPT_LINEAR_CROSS_ENTROPY's choice for the calls made inside the block (the ledger's and the
    tests' switch)."""
    global VARIANT
    before, VARIANT = VARIANT, _checked_variant(variant)
    try:
        yield
    finally:
        VARIANT = before


@dataclass(frozen=True)
class GemmTile:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Tiles:
    """One tile per GEMM. ``block_m`` x ``block_n`` outputs, ``block_k`` per step: logits (rows x
    classes, over the width), grad_hidden (rows x width, over the classes), grad_weight (classes x
    width, over the rows)."""

    logits: GemmTile
    grad_hidden: GemmTile
    grad_weight: GemmTile
    recompute: GemmTile  # the recompute variant's backward (its logits tile; RECOMPUTE_COLUMNS per atomic step)

    def __post_init__(self):
        # The gradient GEMMs read one scale per row and logits tile: their steps over the classes
        # (grad_hidden's block_k, grad_weight's block_m) must not straddle two tiles.
        for classes in (self.grad_hidden.block_k, self.grad_weight.block_m):
            if self.logits.block_n % classes:
                raise ValueError(f"linear_cross_entropy tiles: {classes} classes per step must divide the logits "
                                 f"tile's {self.logits.block_n}")


def hopper_tiles(dtype: torch.dtype) -> Tiles:
    """Hopper starting points, each the largest that builds for sm_90a without spilling (checked by
    tests/test_linear_cross_entropy.py), with K steps of 128 bytes (32 rows for grad_weight, whose
    gradient tile is transposed in registers) and three stages of cp.async pipelining: logits 128x64
    on one warpgroup (its epilogue holds the tile three times: 128x128 spills); the gradient GEMMs
    256 columns wide on two warpgroups, which halves how often each recomputes a gradient tile
    against 128; the recompute variant's backward 128x128 (two stages in fp32). Starting points
    until a GPU times them (bench/bench_linear_cross_entropy.py, against eager, torch.compile and
    Liger); a retuned entry must pass the sm_90 build test."""
    step = 128 // dtype.itemsize
    return Tiles(GemmTile(128, 64, step, 4, 3), GemmTile(128, 256, step, 8, 3), GemmTile(64, 256, 32, 8, 3),
                 GemmTile(128, 128, step, 8, 3 if dtype.itemsize < 4 else 2))


# The interpreter's cost is per program and per step, hardly per element: wide tiles along the
# classes, one stage. The tests' shapes span several tiles of each GEMM in every direction.
INTERPRETER_TILES = Tiles(GemmTile(16, 256, 32, 4, 1), GemmTile(16, 32, 256, 4, 1), GemmTile(256, 32, 16, 4, 1),
                          GemmTile(16, 256, 32, 4, 1))
# The recompute variant adds its gradients' shares this many columns at a time (64 spills).
RECOMPUTE_COLUMNS = 32
# The row statistics kernel reduces a row's tiles in blocks of at most this many.
MAX_STATISTICS_BLOCK = 1024


def gemm_tiles(dtype: torch.dtype) -> Tiles:
    return INTERPRETER_TILES if registry.TRITON_INTERPRETER else hopper_tiles(dtype)


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


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mma(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``acc + a @ b``. UPCAST_DOT (the interpreter, bf16): the same products from fp32 operands."""
    if UPCAST_DOT:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _column_in_tile(targets, first_class, BLOCK: tl.constexpr):
    """Each target's column within the tile of classes [first_class, first_class + BLOCK), or -1: a
    32-bit index to compare with the tile's columns (64-bit compares would double their registers)."""
    inside = (targets >= first_class) & (targets < first_class + BLOCK)
    return tl.where(inside, targets - first_class, -1).to(tl.int32)


@triton.jit
def _logits_tile(h_ptr, stride_h_row, w_ptr, stride_w_row, n_rows, n_classes, width,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, NUM_STAGES: tl.constexpr):
    """This program's fp32 ``hidden[rows] @ weight[classes].T`` tile, with ``rows``, ``classes`` and
    their masks: program (i, j) takes row block i and class block j. Row blocks are the fast grid
    axis, so the programs resident at once share one block of classes: each weight tile comes from
    HBM about once, while hidden (25 MB at GPT-2) stays in L2. Rows and classes past the end read a
    row from the start of their operand instead (wrapped, as in Triton's matmul tutorial), so that
    the loads are masked along K only; their results are for the caller to drop."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    classes = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    h_rows = h_ptr + (rows % n_rows).to(tl.int64)[:, None] * stride_h_row
    w_rows = w_ptr + (classes % n_classes).to(tl.int64)[:, None] * stride_w_row
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, width, BLOCK_K, num_stages=NUM_STAGES):
        k_ok = (k + ks) < width
        h = tl.load(h_rows + (k + ks)[None, :], mask=k_ok[None, :], other=0.0)
        w = tl.load(w_rows + (k + ks)[None, :], mask=k_ok[None, :], other=0.0)
        acc = _mma(h, tl.trans(w), acc, DOT_PRECISION, UPCAST_DOT)
    return acc, rows, classes, rows < n_rows, classes < n_classes


@triton.jit
def _logits_kernel(
    h_ptr, stride_h_row, w_ptr, stride_w_row, logits_ptr, stride_logits_row,
    targets_ptr, stride_targets,
    tile_max_ptr, tile_sum_ptr, tile_sum_z_ptr, target_z_ptr, n_tiles,
    n_rows, n_classes, n_columns, width, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, STORE_LOGITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    acc, rows, classes, row_ok, class_ok = _logits_tile(
        h_ptr, stride_h_row, w_ptr, stride_w_row, n_rows, n_classes, width,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT, NUM_STAGES)
    pid_rows, pid_classes = tl.program_id(0), tl.program_id(1)

    # The logits as the compute dtype holds them (what hidden @ weight.T would give): the loss is theirs.
    # What the gradient kernels need is stored when gradients are wanted: exp(z - tile max), in (0, 1],
    # which they scale by the row's exp(tile max - max)/sum to get the softmax, so that they compute no
    # exponential of their own (each would redo it for every block of columns it writes); under a soft
    # cap, whose derivative needs z, the logits themselves. Stores go up to the buffer's 16-aligned row
    # end (n_columns), not n_classes, so that they are 16-byte vectors (the columns past n_classes are
    # never read as classes), through a block pointer: a (BLOCK_M, BLOCK_N) tensor of 64-bit addresses
    # spills.
    x = acc.to(h_ptr.dtype.element_ty)  # h is in the compute dtype (the logits buffer may be a placeholder)
    out = tl.make_block_ptr(logits_ptr, (n_rows, n_columns), (stride_logits_row, 1),
                            (pid_rows * BLOCK_M, pid_classes * BLOCK_N), (BLOCK_M, BLOCK_N), (1, 0))
    if STORE_LOGITS and HAS_SOFTCAP:
        tl.store(out, x, boundary_check=(0, 1))
    z = x.to(tl.float32)
    if HAS_SOFTCAP:
        z = soft_cap(z, softcap)
    z = tl.where(class_ok[None, :], z, float("-inf"))  # every tile holds at least one class
    tile_max = tl.max(z, axis=1)
    exp_z = tl.exp(z - tile_max[:, None])
    if STORE_LOGITS and not HAS_SOFTCAP:
        tl.store(out, exp_z.to(logits_ptr.dtype.element_ty), boundary_check=(0, 1))
    partial = rows.to(tl.int64) * n_tiles + pid_classes
    tl.store(tile_max_ptr + partial, tile_max, mask=row_ok)
    tl.store(tile_sum_ptr + partial, tl.sum(exp_z, axis=1), mask=row_ok)
    if HAS_SMOOTHING:
        tl.store(tile_sum_z_ptr + partial, tl.sum(tl.where(class_ok[None, :], z, 0.0), axis=1), mask=row_ok)
    # The target's logit, from the one tile that holds it. A target outside [0, V) (possible only with
    # the host check off) is in no tile: its row keeps the NaN the buffer starts with.
    targets = tl.load(targets_ptr + (rows % n_rows).to(tl.int64) * stride_targets)
    hit = tl.arange(0, BLOCK_N)[None, :] == _column_in_tile(targets, pid_classes * BLOCK_N, BLOCK_N)[:, None]
    hit = hit & class_ok[None, :]
    in_tile = tl.sum(hit.to(tl.int32), axis=1) > 0
    tl.store(target_z_ptr + rows, tl.sum(tl.where(hit, z, 0.0), axis=1), mask=row_ok & in_tile)


@triton.jit
def _row_statistics_kernel(
    tile_max_ptr, tile_sum_ptr, tile_sum_z_ptr, target_z_ptr, n_tiles,
    targets_ptr, stride_targets, grad_scale_ptr, stride_grad_scale,
    loss_ptr, z_loss_ptr, factors_ptr, stride_factors,
    n_classes, ignore_index, label_smoothing, lse_square_scale,
    HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr, COMPUTE_GRAD: tl.constexpr, TILE_SCALES: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)
    base = row.to(tl.int64) * n_tiles
    offs = tl.arange(0, BLOCK_T)
    # The tiles' (max, sum of exp) pairs folded into the row's, as an online log-sum-exp does.
    running_max = float("-inf")
    running_sum = 0.0
    sum_z = 0.0
    for start in range(0, n_tiles, BLOCK_T):
        mask = start + offs < n_tiles
        tile_max = tl.load(tile_max_ptr + base + start + offs, mask=mask, other=float("-inf"))
        tile_sum = tl.load(tile_sum_ptr + base + start + offs, mask=mask, other=0.0)
        new_max = tl.maximum(running_max, tl.max(tile_max, axis=0))
        running_sum = (running_sum * tl.exp(running_max - new_max)
                       + tl.sum(tile_sum * tl.exp(tile_max - new_max), axis=0))
        running_max = new_max
        if HAS_SMOOTHING:
            sum_z += tl.sum(tl.load(tile_sum_z_ptr + base + start + offs, mask=mask, other=0.0), axis=0)

    target = tl.load(targets_ptr + row.to(tl.int64) * stride_targets).to(tl.int64)
    ignored = target == ignore_index
    z_target = tl.load(target_z_ptr + row)
    log_sum = tl.log(running_sum)
    lse = running_max + log_sum
    # lse - z_target, without rounding lse first: at |logits| ~ 1e4 an fp32 lse is only good to 1e-3.
    loss = (running_max - z_target) + log_sum
    if HAS_SMOOTHING:
        # (1 - eps)·(lse - z_t) + eps·(lse - mean z) = (lse - z_t) - eps·(mean z - z_t)
        loss -= label_smoothing * (sum_z / n_classes - z_target)
    z_loss = 0.0
    if HAS_Z_LOSS:
        z_loss = lse_square_scale * lse * lse
        loss += z_loss
    tl.store(loss_ptr + row, tl.where(ignored, 0.0, loss))
    tl.store(z_loss_ptr + row, tl.where(ignored, 0.0, z_loss))

    if COMPUTE_GRAD:
        # dlogits = exp(z - max)·softmax_factor - target_weight·onehot - uniform: an ignored row's are 0.
        scale = tl.load(grad_scale_ptr + row * stride_grad_scale).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        softmax_factor = scale / running_sum
        if HAS_Z_LOSS:
            softmax_factor = softmax_factor * (1.0 + 2.0 * lse_square_scale * lse)
        target_weight = scale
        uniform = scale * 0.0
        if HAS_SMOOTHING:
            target_weight = scale * (1.0 - label_smoothing)
            uniform = scale * label_smoothing / n_classes
        tl.store(factors_ptr + row, running_max)
        tl.store(factors_ptr + stride_factors + row, softmax_factor)
        tl.store(factors_ptr + 2 * stride_factors + row, target_weight)
        tl.store(factors_ptr + 3 * stride_factors + row, uniform)
        if TILE_SCALES:
            # Over each tile's max, in place: softmax = exp(z - tile max) · exp(tile max - max)/sum.
            for start in range(0, n_tiles, BLOCK_T):
                mask = start + offs < n_tiles
                tile_max = tl.load(tile_max_ptr + base + start + offs, mask=mask, other=0.0)
                tile_scale = tl.exp(tile_max - running_max) * softmax_factor
                tl.store(tile_max_ptr + base + start + offs, tile_scale, mask=mask)


@triton.jit
def _row_factors(factors_ptr, stride_factors, targets_ptr, stride_targets, rows, row_ok):
    """A block of rows' gradient factors (zeros, so a zero gradient, for rows past the end)."""
    row_max = tl.load(factors_ptr + rows, mask=row_ok, other=0.0)
    softmax_factor = tl.load(factors_ptr + stride_factors + rows, mask=row_ok, other=0.0)
    target_weight = tl.load(factors_ptr + 2 * stride_factors + rows, mask=row_ok, other=0.0)
    uniform = tl.load(factors_ptr + 3 * stride_factors + rows, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows.to(tl.int64) * stride_targets, mask=row_ok, other=-1)
    return row_max, softmax_factor, target_weight, uniform, targets


@triton.jit
def _dlogits(x, first_class, ok, row_max, softmax_factor, tile_scale, target_weight, uniform, targets, softcap,
             FROM_LOGITS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """The gradient of a (rows, classes) tile whose classes start at ``first_class``, from ``x``: the
    logits (FROM_LOGITS), or what _logits_kernel stored, ``exp(z - tile max)``, to scale by the rows'
    ``tile_scale``. 0 where ``ok`` is false."""
    z = x.to(tl.float32)
    if FROM_LOGITS:
        if HAS_SOFTCAP:
            z = soft_cap(z, softcap)
        softmax = tl.exp(z - row_max[:, None]) * softmax_factor[:, None]
    else:
        softmax = z * tile_scale[:, None]
    onehot = tl.arange(0, BLOCK)[None, :] == _column_in_tile(targets, first_class, BLOCK)[:, None]
    grad = softmax - tl.where(onehot, target_weight[:, None], 0.0) - uniform[:, None]
    if HAS_SOFTCAP:
        # d/dx [c·tanh(x/c)] = 1 - tanh² = 1 - (z/c)²
        z_over_cap = z / softcap
        grad = grad * (1.0 - z_over_cap * z_over_cap)
    return tl.where(ok, grad, 0.0)


@triton.jit
def _grad_hidden_kernel(
    logits_ptr, stride_logits_row, w_ptr, stride_w_row, grad_h_ptr, stride_grad_h_row,
    targets_ptr, stride_targets, factors_ptr, stride_factors, tile_scale_ptr, n_tiles,
    n_rows, n_classes, n_columns, n_weight_rows, width, softcap,
    HAS_SOFTCAP: tl.constexpr, LOGITS_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # Column blocks are the fast grid axis: the programs of one row block run together and read its
    # stored tiles from HBM once between them.
    rows, cols = flat_grid_tile(width, BLOCK_M, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    row_max, softmax_factor, target_weight, uniform, targets = _row_factors(
        factors_ptr, stride_factors, targets_ptr, stride_targets, rows, row_ok)

    # Loads are masked by bounds that are multiples of 16 where Triton can see it (the logits' aligned
    # row length n_columns, the width), so that they stay 16-byte vectors; the gradient is masked to
    # the classes.
    logit_rows = logits_ptr + (rows % n_rows).to(tl.int64)[:, None] * stride_logits_row
    tile_scales = tile_scale_ptr + (rows % n_rows).to(tl.int64) * n_tiles
    col_ok = cols < width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, n_classes, BLOCK_K, num_stages=NUM_STAGES):
        classes = k + ks
        class_ok = classes < n_classes
        x = tl.load(logit_rows + classes[None, :], mask=(classes < n_columns)[None, :], other=0.0)
        w = tl.load(w_ptr + classes.to(tl.int64)[:, None] * stride_w_row + cols[None, :],
                    mask=(classes < n_weight_rows)[:, None] & col_ok[None, :], other=0.0)
        # The rows' scales of the logits tile these classes lie in (BLOCK_K divides LOGITS_TILE).
        tile_scale = tl.load(tile_scales + k // LOGITS_TILE)
        grad = _dlogits(x, k, class_ok[None, :], row_max, softmax_factor, tile_scale, target_weight, uniform,
                        targets, softcap, HAS_SOFTCAP, HAS_SOFTCAP, BLOCK_K)
        acc = _mma(grad.to(w.dtype), w, acc, DOT_PRECISION, UPCAST_DOT)
    tl.store(grad_h_ptr + rows.to(tl.int64)[:, None] * stride_grad_h_row + cols[None, :],
             acc.to(grad_h_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _grad_weight_kernel(
    logits_ptr, stride_logits_row, h_ptr, stride_h_row, grad_w_ptr, stride_grad_w_row,
    targets_ptr, stride_targets, factors_ptr, stride_factors, tile_scale_ptr, n_tiles,
    n_rows, n_classes, n_columns, n_weight_rows, width, softcap,
    HAS_SOFTCAP: tl.constexpr, ACCUMULATE: tl.constexpr, LOGITS_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    # Output rows are classes, the K loop walks the token rows; column blocks are the fast grid axis,
    # so the programs of one block of classes read its stored columns from HBM once between them.
    classes, cols = flat_grid_tile(width, BLOCK_M, BLOCK_N)
    first_class = (tl.program_id(0) // tl.cdiv(width, BLOCK_N)) * BLOCK_M
    ks = tl.arange(0, BLOCK_K)
    class_ok = classes < n_classes
    col_ok = cols < width
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if first_class < n_classes:  # blocks of padding classes only have a zero gradient
        # Masks along the contiguous dimensions by multiples of 16, as in _grad_hidden_kernel.
        column_ok = (classes < n_columns)[None, :]
        for k in tl.range(0, n_rows, BLOCK_K, num_stages=NUM_STAGES):
            rows = k + ks
            row_ok = rows < n_rows
            row_max, softmax_factor, target_weight, uniform, targets = _row_factors(
                factors_ptr, stride_factors, targets_ptr, stride_targets, rows, row_ok)
            x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_logits_row + classes[None, :],
                        mask=row_ok[:, None] & column_ok, other=0.0)
            h = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_h_row + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            # The rows' scales of the logits tile these classes lie in (BLOCK_M divides LOGITS_TILE).
            tile_scale = tl.load(tile_scale_ptr + rows.to(tl.int64) * n_tiles + first_class // LOGITS_TILE,
                                 mask=row_ok, other=0.0)
            grad = _dlogits(x, first_class, row_ok[:, None] & class_ok[None, :], row_max, softmax_factor,
                            tile_scale, target_weight, uniform, targets, softcap, HAS_SOFTCAP, HAS_SOFTCAP, BLOCK_M)
            acc = _mma(tl.trans(grad.to(h.dtype)), h, acc, DOT_PRECISION, UPCAST_DOT)
    out = grad_w_ptr + classes.to(tl.int64)[:, None] * stride_grad_w_row + cols[None, :]
    out_mask = (classes < n_weight_rows)[:, None] & col_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(out, mask=out_mask, other=0.0)
    tl.store(out, acc.to(grad_w_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _recomputed_grads_kernel(
    h_ptr, stride_h_row, w_ptr, stride_w_row, grad_h_ptr, grad_w_ptr,
    targets_ptr, stride_targets, factors_ptr, stride_factors,
    n_rows, n_classes, width, softcap,
    HAS_SOFTCAP: tl.constexpr, WANT_HIDDEN: tl.constexpr, WANT_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """The recompute variant's backward, one (rows, classes) tile per program: the logits tile again,
    its dlogits, then both gradients' shares of it, added with fp32 atomics into ``grad_h`` (N, C)
    and ``grad_w`` (V, C), both contiguous fp32 and zeroed. Row blocks are the fast grid axis, so the
    programs resident at once update one block of grad_w rows, which stays in L2."""
    acc, rows, classes, row_ok, class_ok = _logits_tile(
        h_ptr, stride_h_row, w_ptr, stride_w_row, n_rows, n_classes, width,
        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, UPCAST_DOT, NUM_STAGES)
    row_max, softmax_factor, target_weight, uniform, targets = _row_factors(
        factors_ptr, stride_factors, targets_ptr, stride_targets, rows, row_ok)
    x = acc.to(h_ptr.dtype.element_ty)  # the logits as the forward's statistics saw them
    grad = _dlogits(x, tl.program_id(1) * BLOCK_N, row_ok[:, None] & class_ok[None, :], row_max, softmax_factor,
                    softmax_factor, target_weight, uniform, targets, softcap, True, HAS_SOFTCAP, BLOCK_N)
    grad = grad.to(h_ptr.dtype.element_ty)
    rows64 = rows.to(tl.int64)[:, None]
    classes64 = classes.to(tl.int64)[:, None]
    for start in range(0, width, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < width
        if WANT_HIDDEN:
            w = tl.load(w_ptr + classes64 * stride_w_row + cols[None, :], mask=class_ok[:, None] & col_ok[None, :],
                        other=0.0)
            grad_h = _mma(grad, w, tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), DOT_PRECISION, UPCAST_DOT)
            tl.atomic_add(grad_h_ptr + rows64 * width + cols[None, :], grad_h, mask=row_ok[:, None] & col_ok[None, :],
                          sem="relaxed")
        if WANT_WEIGHT:
            h = tl.load(h_ptr + rows64 * stride_h_row + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            grad_w = _mma(tl.trans(grad), h, tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32), DOT_PRECISION,
                          UPCAST_DOT)
            tl.atomic_add(grad_w_ptr + classes64 * width + cols[None, :], grad_w,
                          mask=class_ok[:, None] & col_ok[None, :], sem="relaxed")


# ----------------------------------------------------------------------------- the engine


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A matrix as the kernels read it: unit column stride, any row stride."""
    return t if t.stride(1) == 1 else t.contiguous()


def _loss_and_grads(
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
    Weight rows from ``n_classes`` on (when it is > 0) are padding: out of the loss, zero gradient."""
    n_rows, width = hidden.shape
    n_weight_rows = weight.shape[0]
    n_classes = n_classes if n_classes > 0 else n_weight_rows
    device = hidden.device
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    z_loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    compute_grad = grad_scale is not None and (want_grad_hidden or want_grad_weight)
    if n_rows == 0:
        grad_hidden = torch.empty_like(hidden) if compute_grad and want_grad_hidden else None
        grad_weight = torch.zeros_like(weight) if compute_grad and want_grad_weight else None
        return loss_rows, z_loss_rows, grad_hidden, grad_weight
    if chunk_size <= 0:
        chunk_size = choose_chunk_rows(n_rows, n_classes, compute_dtype, device)
    chunk_size = min(chunk_size, n_rows)
    n_chunks = cdiv(n_rows, chunk_size)
    recompute = compute_grad and VARIANT == "recompute"
    # The gradients: written once by their kernels in their inputs' dtypes, or accumulated in fp32 (by
    # grad_weight's kernel over several chunks; by the recompute variant's atomics) and cast at the end.
    grad_hidden = grad_weight = None
    if compute_grad and want_grad_hidden:
        grad_hidden = (torch.zeros(hidden.shape, dtype=torch.float32, device=device) if recompute
                       else torch.empty_like(hidden, memory_format=torch.contiguous_format))
    if compute_grad and want_grad_weight:
        if recompute:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device)
        else:
            grad_weight = torch.empty(weight.shape, dtype=weight.dtype if n_chunks == 1 else torch.float32,
                                      device=device)

    # Our own autocast-free region: the op decides its dtypes itself (compute_dtype).
    with torch.autocast(device.type, enabled=False):
        h = _as_rows(hidden.to(compute_dtype))
        w = _as_rows(weight.to(compute_dtype))
    tiles = gemm_tiles(compute_dtype)
    n_tiles = cdiv(n_classes, tiles.logits.block_n)
    statistics_block = min(MAX_STATISTICS_BLOCK, next_power_of_2(n_tiles))
    precision = dict(DOT_PRECISION="tf32" if compute_dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
                     else "ieee", UPCAST_DOT=registry.TRITON_INTERPRETER and compute_dtype == torch.bfloat16,
                     HAS_SOFTCAP=softcap is not None)

    def launch(tile: GemmTile) -> dict:
        return dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, NUM_STAGES=tile.num_stages,
                    num_warps=tile.num_warps, **precision)

    softcap_value = float(softcap or 1.0)
    # One set of buffers for every chunk. The logits' rows start on 16-element boundaries (GPT-2's
    # 50257 classes are stored in 50272 columns), so that their tiles load as 16-byte vectors.
    row_stride = cdiv(n_classes, ROW_ALIGNMENT) * ROW_ALIGNMENT
    store = compute_grad and not recompute
    logits = torch.empty((chunk_size, row_stride), dtype=compute_dtype, device=device) if store else loss_rows

    def per_tile() -> torch.Tensor:
        return torch.empty((chunk_size, n_tiles), dtype=torch.float32, device=device)

    tile_max, tile_sum = per_tile(), per_tile()
    tile_sum_z = per_tile() if label_smoothing > 0 else tile_sum  # only written with label smoothing
    target_z = torch.empty(chunk_size, dtype=torch.float32, device=device)
    factors = torch.empty((4, chunk_size), dtype=torch.float32, device=device) if compute_grad else loss_rows
    for chunk, start in enumerate(range(0, n_rows, chunk_size)):
        stop = min(start + chunk_size, n_rows)
        rows = stop - start
        h_chunk, chunk_targets = h[start:stop], targets[start:stop]
        target_z.fill_(float("nan"))
        _logits_kernel[(cdiv(rows, tiles.logits.block_m), n_tiles)](
            h_chunk, h_chunk.stride(0), w, w.stride(0), logits, logits.stride(0) if store else 0,
            chunk_targets, chunk_targets.stride(0),
            tile_max, tile_sum, tile_sum_z, target_z, n_tiles,
            rows, n_classes, row_stride, width, softcap_value,
            HAS_SMOOTHING=label_smoothing > 0, STORE_LOGITS=store, **launch(tiles.logits),
        )
        chunk_scale, stride_scale = loss_rows, 0  # a placeholder without gradients
        if compute_grad:
            chunk_scale = grad_scale if grad_scale.numel() == 1 else grad_scale[start:stop]
            stride_scale = chunk_scale.stride(0) if chunk_scale.numel() > 1 else 0
        _row_statistics_kernel[(rows,)](
            tile_max, tile_sum, tile_sum_z, target_z, n_tiles,
            chunk_targets, chunk_targets.stride(0), chunk_scale, stride_scale,
            loss_rows[start:stop], z_loss_rows[start:stop], factors, factors.stride(0) if compute_grad else 0,
            n_classes, ignore_index, float(label_smoothing), float(lse_square_scale),
            HAS_SMOOTHING=label_smoothing > 0, HAS_Z_LOSS=lse_square_scale > 0, COMPUTE_GRAD=compute_grad,
            TILE_SCALES=store and softcap is None, BLOCK_T=statistics_block, num_warps=4,
        )
        if not compute_grad:
            continue
        if recompute:  # a gradient not wanted gets a placeholder pointer the kernel never touches
            tile = tiles.recompute
            grad_h_chunk = grad_hidden[start:stop] if grad_hidden is not None else loss_rows
            _recomputed_grads_kernel[(cdiv(rows, tile.block_m), cdiv(n_classes, tile.block_n))](
                h_chunk, h_chunk.stride(0), w, w.stride(0), grad_h_chunk,
                grad_weight if grad_weight is not None else loss_rows,
                chunk_targets, chunk_targets.stride(0), factors, factors.stride(0),
                rows, n_classes, width, softcap_value, WANT_HIDDEN=grad_hidden is not None,
                WANT_WEIGHT=grad_weight is not None, BLOCK_C=RECOMPUTE_COLUMNS, **launch(tile),
            )
            continue
        if grad_hidden is not None:
            out, tile = grad_hidden[start:stop], tiles.grad_hidden
            _grad_hidden_kernel[(cdiv(rows, tile.block_m) * cdiv(width, tile.block_n),)](
                logits, logits.stride(0), w, w.stride(0), out, out.stride(0),
                chunk_targets, chunk_targets.stride(0), factors, factors.stride(0), tile_max, n_tiles,
                rows, n_classes, row_stride, n_weight_rows, width, softcap_value,
                LOGITS_TILE=tiles.logits.block_n, **launch(tile),
            )
        if grad_weight is not None:
            tile = tiles.grad_weight
            _grad_weight_kernel[(cdiv(n_weight_rows, tile.block_m) * cdiv(width, tile.block_n),)](
                logits, logits.stride(0), h_chunk, h_chunk.stride(0), grad_weight, grad_weight.stride(0),
                chunk_targets, chunk_targets.stride(0), factors, factors.stride(0), tile_max, n_tiles,
                rows, n_classes, row_stride, n_weight_rows, width, softcap_value,
                ACCUMULATE=chunk > 0, LOGITS_TILE=tiles.logits.block_n, **launch(tile),
            )
    if grad_weight is not None and grad_weight.dtype != weight.dtype:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_hidden is not None and grad_hidden.dtype != hidden.dtype:
        grad_hidden = grad_hidden.to(hidden.dtype)
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
    loss_rows, z_loss_rows, grad_hidden, grad_weight = _loss_and_grads(
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
    _, _, grad_hidden, grad_weight = _loss_and_grads(
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


# For the ledger's count of weight re-reads: an H100 SXM runs 132 of the grad_hidden programs at once.
RESIDENT_PROGRAMS = 132


def _engine_cost(hidden, weight, targets, label_smoothing, softcap, compute_dtype, chunk_size, n_classes,
                 want_hidden: bool, want_weight: bool, per_row_scale: bool):
    """Bytes and FLOPs of ``_loss_and_grads`` on a GPU (Hopper tiles), kernel by kernel. Operands
    shared by the programs resident at once are counted once per such wave (the grid orders say which):
    the weight once per chunk in the logits GEMM and once per wave in grad_hidden's, hidden once. The
    recompute variant's fp32 atomics are counted as the accumulators they reach in HBM (zeroed, then
    read and written once each, the block of rows being updated staying in L2), not as the
    ``2·N·V·C / 128`` adds that go to L2."""
    (n, c), v_rows, a = hidden.shape, weight.shape[0], compute_dtype.itemsize
    v = n_classes if n_classes > 0 else v_rows
    tiles = hopper_tiles(compute_dtype)
    chunk = chunk_size if chunk_size > 0 else choose_chunk_rows(n, v, compute_dtype, torch.device("cpu"))
    chunks = cdiv(n, max(1, chunk))
    stored, f32 = n * v * a, 4
    per_tile = n * cdiv(v, tiles.logits.block_n) * f32  # one value per row and logits tile
    read = written = 0
    for t in (hidden, weight):  # the casts to the compute dtype
        if t.dtype != compute_dtype:
            read, written = read + registry.tensor_bytes(t), written + t.numel() * a
    with_grads = want_hidden or want_weight
    recompute = with_grads and VARIANT == "recompute"
    if recompute:
        stored = 0
    partials = (3 if label_smoothing > 0 else 2) * per_tile
    # The logits GEMM: hidden once, the weight once per chunk, the targets; the partials, the target
    # logits (NaN-filled first) and, with gradients, the stored tiles. The row statistics read the
    # partials back and write the loss, the gradient factors and (without a soft cap) the tile scales.
    read += n * c * a + chunks * v * c * a + registry.tensor_bytes(targets)
    written += partials + 2 * n * f32 + (stored if with_grads else 0)
    read += partials + n * f32 + registry.tensor_bytes(targets) + (n * f32 if per_row_scale else 0)
    written += 2 * n * f32 + (4 * n * f32 if with_grads else 0)
    scales = per_tile if with_grads and not recompute and softcap is None else 0
    read, written = read + scales, written + scales
    flops = 2 * n * v * c
    row_factors = 4 * n * f32 + registry.tensor_bytes(targets) + scales
    if recompute:  # the logits again (hidden and the weight once each), then the atomics
        read += n * c * a + v * c * a + row_factors
        flops += 2 * n * v * c
        for wanted, t, rows in ((want_hidden, hidden, n), (want_weight, weight, v_rows)):
            if wanted:
                accumulator = rows * c * f32
                read, written = read + accumulator, written + 2 * accumulator
                flops += 2 * n * v * c
                if t.dtype != torch.float32:
                    read, written = read + accumulator, written + registry.tensor_bytes(t)
        return read, written, flops
    if want_hidden:
        tile = tiles.grad_hidden
        programs = cdiv(chunk, tile.block_m) * cdiv(c, tile.block_n)
        waves = chunks * cdiv(programs, RESIDENT_PROGRAMS)
        read += stored + waves * v * c * a + row_factors
        written += n * c * hidden.element_size()
        flops += 2 * n * v * c
    if want_weight:
        accumulator = v_rows * c * (weight.element_size() if chunks == 1 else f32)
        read += stored + n * c * a + row_factors + (chunks - 1) * accumulator
        written += chunks * accumulator
        flops += 2 * n * v * c
        if chunks > 1 and weight.dtype != torch.float32:
            read, written = read + accumulator, written + registry.tensor_bytes(weight)
    return read, written, flops


def _forward_cost(args, outputs):
    hidden, weight, targets, _, reduction, label_smoothing, _, softcap, compute_dtype, want_hidden, want_weight, \
        chunk_size, n_classes = args[:13]
    read, written, flops = _engine_cost(hidden, weight, targets, label_smoothing, softcap, compute_dtype, chunk_size,
                                        n_classes, reduction != "none" and want_hidden,
                                        reduction != "none" and want_weight, False)
    return read + registry.tensor_bytes(targets), written, flops  # count_valid reads the targets first


def _backward_cost(args, outputs):
    _, hidden, weight, targets, _, label_smoothing, _, softcap, compute_dtype, want_hidden, want_weight, chunk_size, \
        n_classes = args[:13]
    return _engine_cost(hidden, weight, targets, label_smoothing, softcap, compute_dtype, chunk_size, n_classes,
                        want_hidden, want_weight, True)


registry.register_cost("gpt_triton::linear_cross_entropy_backward", _backward_cost)
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


def variant_note() -> str:
    """The registry report's word on which variant runs (GPT_LINEAR_CROSS_ENTROPY)."""
    if VARIANT == "recompute":
        return ("logits recomputed in the backward (4 GEMMs, fp32 atomics, not bit-reproducible; "
                "GPT_LINEAR_CROSS_ENTROPY=recompute)")
    return "logits stored once (3 GEMMs; GPT_LINEAR_CROSS_ENTROPY=recompute stores nothing)"


registry.register("linear_cross_entropy", reference=linear_cross_entropy_reference, triton=linear_cross_entropy,
                  note=variant_note)
