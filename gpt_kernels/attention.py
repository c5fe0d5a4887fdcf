"""Scaled dot-product attention on (B, H, T, D) tensors, causal or not: FlashAttention-2 in Triton.

``attention(q, k, v, causal=True, scale=None)`` takes the layout of ``F.scaled_dot_product_attention``
(with ``enable_gqa``: k and v may have fewer heads, see below) and returns ``softmax(scale · q kᵀ + mask) v`` as (B, H, T, D); ``scale`` defaults to ``1/sqrt(D)``.

Forward (one program per block of BLOCK_M query rows of one head): the query block stays in
registers while key/value blocks stream past; an online softmax keeps the running row maximum
``m`` and row sum ``l`` and rescales the fp32 accumulator, so the T×T score matrix never exists.
It stores O and the per-row log-sum-exp (``lse``, in base 2: ``m + log2(l)`` of the scores times
``scale·log2(e)``, so the kernels use ``exp2``). With ``causal`` the key blocks above the diagonal
are never visited, and only the diagonal and the last, partial blocks pay for masking: each loop
is split into an unmasked part and a masked part.

Backward (FlashAttention-2): a preprocessing kernel computes ``delta = rowsum(dO ∘ O)``; then
one kernel owns a block of BLOCK_N keys and walks the query blocks to accumulate its ``dK`` and
``dV``, and a second owns a block of BLOCK_M queries and walks the key blocks to accumulate its
``dQ``. Every gradient element is summed by exactly one program in a fixed order, with no atomics,
so the backward is deterministic: two runs give bit-identical gradients. The price is computing
``P = exp2(S - lse)`` twice, once per pass. ``GPT_ATTENTION_BACKWARD=atomic`` opts into the
other FlashAttention-2 backward: the dK/dV pass also adds each key block's share of dQ into an fp32
buffer with atomics (5 GEMMs instead of 7, no second pass), at the price of run-to-run differences
in dQ's last bits. The deterministic one stays the default until a GPU measures the difference.

Grouped-query attention: k and v may have fewer heads than q, (B, Hkv, T, D) with Hkv dividing H;
query head ``h`` reads K/V head ``h // (H / Hkv)`` through its strides (K/V are never repeated in
memory). The dK/dV program of a K/V head walks the query heads of its group one after the other and
sums their shares in registers, so dK and dV stay atomic-free and deterministic; dQ (either backward)
reads the shared K/V in place.

Layouts: q, k and v may be any strided views whose last dimension is contiguous (the model's
views of the fused ``c_attn`` output, strides (T·3C, D, 3C, 1), are read in place); anything else
is copied first. O and the gradients are allocated as (B, T, H, D) in memory and returned as the
(B, H, T, D) view, which makes the model's ``y.transpose(1, 2).reshape(B, T, C)`` (and the matching
reshapes of dq, dk, dv) free instead of a copy.

Dtypes: fp16 and bf16 (the training path) and fp32; q, k and v share one dtype (custom ops are not
autocast-aware, but under autocast all three come out of the same bf16 matmul). Math is fp32:
scores, softmax statistics and all accumulators; P and dS are rounded to the input dtype before
their matmuls, as in FlashAttention. fp32 inputs use IEEE fp32 matmuls (not TF32), so fp32 results
are accurate to fp32 everywhere. Any head dim from 1 to 256 (16, 32, 64, 128 and 256 run as they
are; the others on the next of those blocks, masked along D); any sequence length.

``attention_qkv(qkv, n_heads)`` takes the model's fused ``c_attn`` output (B, T, 3C) whole and
returns (B, T, C); its backward writes dq, dk and dv into one (B, T, 3C) gradient.

Tiles: ``HOPPER_CONFIGS`` holds block shapes, warps and pipeline stages per (head dim, dtype,
causal): starting points from Triton's fused-attention tutorial and FlashAttention-2's H100 tiles,
checked to compile for sm_90a without register spills; ``python -m bench.bench_attention`` (or
``GPT_ATTENTION_AUTOTUNE=1``) sweeps them on a GPU. ``GPT_ATTENTION_AUTOTUNE=1`` makes the fp16/bf16 CUDA path autotune instead,
keyed on (power-of-two bucket of T, head dim, causal, dtype): eight candidates per kernel, compiled
and timed once per key (tens of seconds in the first training step, then cached on disk by Triton).
Under Triton's interpreter (CPU tests) small tiles keep the tests fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gpt_kernels import registry
from gpt_kernels.common import (
    check_scale, check_tensor, default_scale, describe, last_dim_contiguous, output_buffer, require_triton,
)
from gpt_kernels.host import cdiv, next_power_of_2

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Head dims run on a block of the next of these (masked past D): D = 12 on the 16-wide kernels,
# D = 80 or 96 on the 128-wide ones.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)
MAX_HEAD_DIM = SUPPORTED_HEAD_DIMS[-1]
AUTOTUNE = os.environ.get("GPT_ATTENTION_AUTOTUNE", "0") == "1"
# The backward: "deterministic" (the default: dQ in its own pass, no atomics, bit-reproducible) or
# "atomic" (opt-in: dQ accumulated with fp32 atomics in the dK/dV pass, 5 GEMMs instead of 7; the
# order of the additions, hence the last bits of dQ, varies from run to run).
BACKWARDS = ("deterministic", "atomic")
BACKWARD = os.environ.get("GPT_ATTENTION_BACKWARD", "deterministic")
if BACKWARD not in BACKWARDS:
    raise ValueError(f"GPT_ATTENTION_BACKWARD must be one of {', '.join(BACKWARDS)}, got {BACKWARD!r}")

LOG2E = 1.4426950408889634  # exp(x) = exp2(x · log2(e))
PREPROCESS_BLOCK_M = 64


@dataclass(frozen=True)
class Tile:
    """One kernel's launch shape: BLOCK_M query rows by BLOCK_N key rows, with warps and stages."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class AttentionConfig:
    """Tiles of the three main kernels. ``forward`` and ``dq`` walk key blocks inside a query block
    (block_m must be a multiple of block_n); ``dkdv`` walks query blocks inside a key block
    (block_n must be a multiple of block_m). The multiples keep every diagonal inside whole blocks."""

    forward: Tile
    dkdv: Tile
    dq: Tile

    def __post_init__(self):
        for name, tile, outer, inner in (
            ("forward", self.forward, self.forward.block_m, self.forward.block_n),
            ("dq", self.dq, self.dq.block_m, self.dq.block_n),
            ("dkdv", self.dkdv, self.dkdv.block_n, self.dkdv.block_m),
        ):
            if min(tile.block_m, tile.block_n) < 16 or outer % inner:
                raise ValueError(
                    f"AttentionConfig.{name}: blocks must be >= 16 and nest ({outer} % {inner} != 0): {tile}"
                )


# Starting points for H100/H200, NOT measured on a GPU yet (see the module doc). Chosen from the
# Triton fused-attention tutorial's and FlashAttention-2's Hopper tiles, then checked statically:
# every kernel compiled for sm_90a (16-byte-aligned strides, as the model's views have) and put
# through ptxas -v, keeping tiles with no register spills and, where the choice was free, the larger
# tile (fewer re-reads of the streamed operand). Registers per thread (causal) and shared memory at
# 3 stages, fp16/bf16, causal (triton 3.6's ptxas):
#   forward: the Triton tutorial's autotune filter (`keep`) drops tiles under 128×128 scores with 8
#     warps on Hopper, so 128×128 with 8 warps: D16 150, D32 156, D64 206 regs; D128 at 2 stages
#     (3 would take 224 KB of shared memory) 253. 128×64 with 4 warps spills at D128.
#   dK/dV: 64 queries × 64 keys, 4 warps at D16-64 (160, 168, 222 regs: 2 programs per SM, and the
#     QKᵀ and dO·Vᵀ products are N=64 warpgroup MMAs where 32 queries made them N=32); at D128 the
#     64-query tiles spill, so 32 × 128 with 8 warps (252 regs). Since the grouped-query loop
#     (_dkdv_inner) the MHA kernels take D64 226 and D128 247 regs; with 3 query heads per K/V head
#     D64 254 and D128 248 (the atomic-dQ variant 255 and 248), all without spills.
#   dQ 128 queries × 64 keys, 8 warps: 122, 119, 128 regs (D16-64); at D128 128×32: 146 regs, 115 KB
#     (128×64 takes 254 regs and 164 KB).
#   D256 (half-height tiles, 2 stages): forward 64×32 with 4 warps 255 regs (64×64 spills), dK/dV
#     16×32 176 (16×64 spills), dQ 64×32 239. Head dims masked up to a block (96 on the D128 tiles) take about the block's.
# fp32 runs IEEE matmuls on FMA units, whose layouts cost far more registers: its spill-free tiles
# are much smaller (forward D128 fits only 32×16). Head dims between two entries run on the larger
# one's kernels, masked along D.
_HALF_TILES = {
    # D16, D32 and D64 take the same tiles.
    **dict.fromkeys((16, 32, 64), AttentionConfig(forward=Tile(128, 128, 8, 3), dkdv=Tile(64, 64, 4, 3),
                                                  dq=Tile(128, 64, 8, 3))),
    128: AttentionConfig(forward=Tile(128, 128, 8, 2), dkdv=Tile(32, 128, 8, 3), dq=Tile(128, 32, 8, 3)),
    # D256 (and 129-255 masked up to it): fp32 accumulators of 256 columns need half-height tiles.
    256: AttentionConfig(forward=Tile(64, 32, 4, 2), dkdv=Tile(16, 32, 8, 2), dq=Tile(64, 32, 8, 2)),
}
_FP32_TILES = {
    **dict.fromkeys((16, 32, 64), AttentionConfig(forward=Tile(64, 32, 8, 3), dkdv=Tile(16, 64, 8, 3),
                                                  dq=Tile(64, 32, 8, 3))),
    128: AttentionConfig(forward=Tile(32, 16, 8, 3), dkdv=Tile(16, 32, 8, 3), dq=Tile(64, 16, 8, 3)),
    256: AttentionConfig(forward=Tile(16, 16, 8, 2), dkdv=Tile(16, 16, 8, 2), dq=Tile(16, 16, 8, 2)),
}
HOPPER_CONFIGS: dict[tuple[int, torch.dtype, bool], AttentionConfig] = {
    (head_dim, dtype, causal): (_FP32_TILES if dtype == torch.float32 else _HALF_TILES)[head_dim]
    for head_dim in SUPPORTED_HEAD_DIMS
    for dtype in SUPPORTED_DTYPES
    for causal in (False, True)
}
# The interpreter's cost is per operation, not per FLOP; small tiles still make every masked and
# unmasked loop run at the tests' sequence lengths (17 ... 200), with query and key blocks of
# different sizes so the diagonal spans several inner blocks.
INTERPRETER_CONFIG = AttentionConfig(forward=Tile(32, 16), dkdv=Tile(16, 32), dq=Tile(32, 16))


def select_config(head_dim: int, dtype: torch.dtype, causal: bool, device: torch.device) -> AttentionConfig:
    """The tiles for these inputs: the interpreter's on the CPU, the Hopper table's on a GPU."""
    if device.type == "cpu":
        return INTERPRETER_CONFIG
    return HOPPER_CONFIGS[(head_block(head_dim), dtype, bool(causal))]


# ----------------------------------------------------------------------------- kernels


# Kernels take n_heads unspecialized: it only splits the program id, so Triton's specializations of
# an integer argument (on 1, or on a multiple of 16) would only multiply the compilations.
@triton.jit
def _head_offset(bh, n_heads, stride_b, stride_h):
    # int64: batch · stride passes 2^31 elements for long sequences of wide models.
    return (bh // n_heads).to(tl.int64) * stride_b + (bh % n_heads).to(tl.int64) * stride_h


@triton.jit
def _kv_head_offset(bh, n_heads, group, stride_b, stride_h):
    """The offset of the K/V head that query head ``bh`` (batch · n_heads + head) reads: grouped-query
    attention shares K/V head ``h // group`` among ``group`` consecutive query heads, read in place."""
    return (bh // n_heads).to(tl.int64) * stride_b + ((bh % n_heads) // group).to(tl.int64) * stride_h


@triton.jit
def _load(ptrs, mask, d_mask, MASKED: tl.constexpr, PAD_D: tl.constexpr):
    """A block load, masked by ``mask`` (rows or keys past the end) when MASKED and by ``d_mask`` (the
    head dimension padded up to its block) when PAD_D: at the supported head dims an unmasked block
    load stays unmasked."""
    if MASKED:
        if PAD_D:
            return tl.load(ptrs, mask=mask & d_mask, other=0.0)
        else:
            return tl.load(ptrs, mask=mask, other=0.0)
    else:
        if PAD_D:
            return tl.load(ptrs, mask=d_mask, other=0.0)
        else:
            return tl.load(ptrs)


@triton.jit
def _store(ptrs, value, mask, d_mask, PAD_D: tl.constexpr):
    if PAD_D:
        tl.store(ptrs, value, mask=mask & d_mask)
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _forward_inner(
    acc, m_i, l_i, q, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi). MASKED blocks may hold keys past the end or above
    the diagonal; unmasked ones are known to be entirely valid, so they skip all mask arithmetic."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_head + offs_n[None, :] * stride_kt + offs_d[:, None]  # Kᵀ block (D, BLOCK_N)
        v_ptrs = v_head + offs_n[:, None] * stride_vt + offs_d[None, :]
        in_range = offs_n < seq_len
        kt = _load(kt_ptrs, in_range[None, :], d_ok[:, None], MASKED, PAD_D)
        v = _load(v_ptrs, in_range[:, None], d_ok[None, :], MASKED, PAD_D)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale  # log2-scaled scores, fp32
        if MASKED:
            valid = in_range[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            s = tl.where(valid, s, float("-inf"))
        # Every row sees at least one valid key in the first block it visits (key 0, or its own
        # position on the diagonal), so m_new is finite from then on and no exp2(-inf + inf) occurs.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["n_heads", "group", "T_BUCKET"])
def _attention_forward_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    n_heads, group, seq_len, T_BUCKET, qk_scale,  # T_BUCKET only keys the autotuner
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    if CAUSAL:
        # The last query blocks have the most keys to visit: launch them first (see _grid).
        start_m = tl.cdiv(seq_len, BLOCK_M) - 1 - tl.program_id(1)
    else:
        start_m = tl.program_id(1)
    q_head = Q + _head_offset(bh, n_heads, stride_qb, stride_qh)
    k_head = K + _kv_head_offset(bh, n_heads, group, stride_kb, stride_kh)
    v_head = V + _kv_head_offset(bh, n_heads, group, stride_vb, stride_vh)
    o_head = O + _head_offset(bh, n_heads, stride_ob, stride_oh)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    row_ok = offs_m < seq_len
    q = _load(q_head + offs_m[:, None] * stride_qt + offs_d[None, :], row_ok[:, None], d_ok[None, :], True, PAD_D)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # Keys before this block's first row are visible to every row; the diagonal block is masked.
        diag = start_m * BLOCK_M
        acc, m_i, l_i = _forward_inner(
            acc, m_i, l_i, q, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale, 0, diag,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, DOT_PRECISION,
        )
        acc, m_i, l_i = _forward_inner(
            acc, m_i, l_i, q, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale,
            diag, tl.minimum(diag + BLOCK_M, seq_len),
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, DOT_PRECISION,
        )
    else:
        full = (seq_len // BLOCK_N) * BLOCK_N
        acc, m_i, l_i = _forward_inner(
            acc, m_i, l_i, q, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale, 0, full,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, DOT_PRECISION,
        )
        acc, m_i, l_i = _forward_inner(
            acc, m_i, l_i, q, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale, full, seq_len,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, DOT_PRECISION,
        )

    o = acc / l_i[:, None]
    _store(o_head + offs_m[:, None] * stride_ot + offs_d[None, :], o.to(O.dtype.element_ty), row_ok[:, None],
           d_ok[None, :], PAD_D)
    tl.store(LSE + bh.to(tl.int64) * seq_len + offs_m, m_i + tl.log2(l_i), mask=row_ok)


@triton.jit(do_not_specialize=["n_heads"])
def _backward_preprocess_kernel(
    O, DO, DELTA, stride_ob, stride_oh, stride_ot, stride_dob, stride_doh, stride_dot,
    n_heads, seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO ∘ O), the softmax backward's ``Σ_j P_ij dP_ij`` without P."""
    bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    row_ok = offs_m < seq_len
    o_ptrs = O + _head_offset(bh, n_heads, stride_ob, stride_oh) + offs_m[:, None] * stride_ot + offs_d[None, :]
    do_ptrs = DO + _head_offset(bh, n_heads, stride_dob, stride_doh) + offs_m[:, None] * stride_dot + offs_d[None, :]
    o = _load(o_ptrs, row_ok[:, None], d_ok[None, :], True, PAD_D).to(tl.float32)
    do = _load(do_ptrs, row_ok[:, None], d_ok[None, :], True, PAD_D).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + offs_m, tl.sum(o * do, 1), mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_group, do_group, lse_group, delta_group, dq_group, offs_n, seq_len,
    stride_qh, stride_qt, stride_doh, stride_dot, stride_dqh, stride_dqt, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, GROUP: tl.constexpr,
):
    """Accumulate one key block's dK and dV over query blocks [lo, hi) of each of the GROUP query
    heads that share it (``*_group`` point at the first), in transposed form (keys along rows), so
    the key block's K and V stay in registers. The heads' blocks run as one flat loop, not a loop
    nest: nesting the pipelined loop in a loop over heads made ptxas spill (sm_90a, D64 and D128)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    for step in range(0, n_blocks * GROUP):
        if GROUP == 1:
            start_m = lo + step * BLOCK_M
            q_head, do_head, lse_row, delta_row, dq_head = q_group, do_group, lse_group, delta_group, dq_group
        else:
            g = step // n_blocks  # query heads are consecutive: head g of the group is g heads on
            start_m = lo + (step - g * n_blocks) * BLOCK_M
            q_head = q_group + g.to(tl.int64) * stride_qh
            do_head = do_group + g.to(tl.int64) * stride_doh
            lse_row = lse_group + g.to(tl.int64) * seq_len
            delta_row = delta_group + g.to(tl.int64) * seq_len
            dq_head = dq_group + g.to(tl.int64) * stride_dqh
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt_ptrs = q_head + offs_m[None, :] * stride_qt + offs_d[:, None]  # Qᵀ block (D, BLOCK_M)
        do_ptrs = do_head + offs_m[:, None] * stride_dot + offs_d[None, :]
        row_ok = offs_m < seq_len
        qt = _load(qt_ptrs, row_ok[None, :], d_ok[:, None], MASKED, PAD_D)
        do = _load(do_ptrs, row_ok[:, None], d_ok[None, :], MASKED, PAD_D)
        if MASKED:
            lse = tl.load(lse_row + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_row + offs_m, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_row + offs_m)
            delta = tl.load(delta_row + offs_m)
        pt = tl.exp2(tl.dot(k, qt, input_precision=DOT_PRECISION) * qk_scale - lse[None, :])  # Pᵀ
        if MASKED:
            valid = row_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_m[None, :] >= offs_n[:, None])
            pt = tl.where(valid, pt, 0.0)  # before any product: a masked exp2 may be inf
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:  # this key block's share of the query block's dQ (unscaled), added in fp32
            dq = tl.dot(tl.trans(dst.to(k.dtype)), k, input_precision=DOT_PRECISION)
            dq_ptrs = dq_head + offs_m[:, None] * stride_dqt + offs_d[None, :]
            tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["n_kv_heads", "T_BUCKET"])
def _attention_backward_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt, stride_dqab, stride_dqah, stride_dqat,
    n_kv_heads, seq_len, T_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ATOMIC_DQ: tl.constexpr, GROUP: tl.constexpr,
):
    # One program per block of keys of one K/V head. Under grouped-query attention it walks the
    # GROUP query heads that share the K/V head (see _dkdv_inner), accumulating their dK and dV in
    # the same registers: every dK/dV element is summed by one program, in a fixed order, and
    # written once (no atomics). GROUP is a compile-time constant: GROUP = 1 is the MHA kernel.
    # Under causal masking the first key blocks are seen by the most queries; the natural order
    # already launches the longest programs first.
    bkv = tl.program_id(0)
    start_n = tl.program_id(1)
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    key_ok = offs_n[:, None] < seq_len
    k_ptrs = K + _head_offset(bkv, n_kv_heads, stride_kb, stride_kh) + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = V + _head_offset(bkv, n_kv_heads, stride_vb, stride_vh) + offs_n[:, None] * stride_vt + offs_d[None, :]
    k = _load(k_ptrs, key_ok, d_ok[None, :], True, PAD_D)
    v = _load(v_ptrs, key_ok, d_ok[None, :], True, PAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query blocks in three runs: the diagonal (masked), whole blocks below it (unmasked), and the
    # last partial block (masked). Without causal masking the diagonal run is empty. Rows of keys
    # past the end compute garbage that is never stored.
    full = (seq_len // BLOCK_M) * BLOCK_M
    below = 0
    if CAUSAL:
        below = start_n * BLOCK_N + BLOCK_N
    n_heads = n_kv_heads * GROUP
    bh = (bkv // n_kv_heads) * n_heads + (bkv % n_kv_heads) * GROUP  # the group's first query head
    q_group = Q + _head_offset(bh, n_heads, stride_qb, stride_qh)
    do_group = DO + _head_offset(bh, n_heads, stride_dob, stride_doh)
    lse_group = LSE + bh.to(tl.int64) * seq_len
    delta_group = DELTA + bh.to(tl.int64) * seq_len
    dq_group = DQ_ACC + _head_offset(bh, n_heads, stride_dqab, stride_dqah)
    if CAUSAL:
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_group, do_group, lse_group, delta_group, dq_group, offs_n, seq_len,
            stride_qh, stride_qt, stride_doh, stride_dot, stride_dqah, stride_dqat, qk_scale,
            start_n * BLOCK_N, tl.minimum(below, seq_len),
            HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, DOT_PRECISION, ATOMIC_DQ, GROUP,
        )
    dk, dv = _dkdv_inner(
        dk, dv, k, v, q_group, do_group, lse_group, delta_group, dq_group, offs_n, seq_len,
        stride_qh, stride_qt, stride_doh, stride_dot, stride_dqah, stride_dqat, qk_scale, below, full,
        HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, DOT_PRECISION, ATOMIC_DQ, GROUP,
    )
    dk, dv = _dkdv_inner(
        dk, dv, k, v, q_group, do_group, lse_group, delta_group, dq_group, offs_n, seq_len,
        stride_qh, stride_qt, stride_doh, stride_dot, stride_dqah, stride_dqat, qk_scale, tl.maximum(full, below), seq_len,
        HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, DOT_PRECISION, ATOMIC_DQ, GROUP,
    )

    dk *= sm_scale  # S = scale · QKᵀ, so dK = scale · dSᵀ Q
    dk_ptrs = DK + _head_offset(bkv, n_kv_heads, stride_dkb, stride_dkh) + offs_n[:, None] * stride_dkt + offs_d[None, :]
    dv_ptrs = DV + _head_offset(bkv, n_kv_heads, stride_dvb, stride_dvh) + offs_n[:, None] * stride_dvt + offs_d[None, :]
    _store(dk_ptrs, dk.to(DK.dtype.element_ty), key_ok, d_ok[None, :], PAD_D)
    _store(dv_ptrs, dv.to(DV.dtype.element_ty), key_ok, d_ok[None, :], PAD_D)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Accumulate one query block's dQ over key blocks [lo, hi)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt_ptrs = k_head + offs_n[None, :] * stride_kt + offs_d[:, None]  # Kᵀ block (D, BLOCK_N)
        vt_ptrs = v_head + offs_n[None, :] * stride_vt + offs_d[:, None]
        in_range = offs_n < seq_len
        kt = _load(kt_ptrs, in_range[None, :], d_ok[:, None], MASKED, PAD_D)
        vt = _load(vt_ptrs, in_range[None, :], d_ok[:, None], MASKED, PAD_D)
        p = tl.exp2(tl.dot(q, kt, input_precision=DOT_PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            valid = in_range[None, :]
            if CAUSAL:
                valid = valid & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["n_heads", "group", "T_BUCKET"])
def _attention_backward_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot, stride_dqb, stride_dqh, stride_dqt,
    n_heads, group, seq_len, T_BUCKET, sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(0)
    if CAUSAL:  # longest programs first, as in the forward
        start_m = tl.cdiv(seq_len, BLOCK_M) - 1 - tl.program_id(1)
    else:
        start_m = tl.program_id(1)
    k_head = K + _kv_head_offset(bh, n_heads, group, stride_kb, stride_kh)
    v_head = V + _kv_head_offset(bh, n_heads, group, stride_vb, stride_vh)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    row_ok = offs_m < seq_len
    q_ptrs = Q + _head_offset(bh, n_heads, stride_qb, stride_qh) + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = DO + _head_offset(bh, n_heads, stride_dob, stride_doh) + offs_m[:, None] * stride_dot + offs_d[None, :]
    q = _load(q_ptrs, row_ok[:, None], d_ok[None, :], True, PAD_D)
    do = _load(do_ptrs, row_ok[:, None], d_ok[None, :], True, PAD_D)
    # Rows past the end load lse = delta = 0 and dO = 0: finite values, their dQ is never stored.
    lse = tl.load(LSE + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh.to(tl.int64) * seq_len + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if CAUSAL:
        diag = start_m * BLOCK_M
        dq = _dq_inner(
            dq, q, do, lse, delta, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale, 0, diag,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, DOT_PRECISION,
        )
        dq = _dq_inner(
            dq, q, do, lse, delta, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale,
            diag, tl.minimum(diag + BLOCK_M, seq_len), HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, DOT_PRECISION,
        )
    else:
        full = (seq_len // BLOCK_N) * BLOCK_N
        dq = _dq_inner(
            dq, q, do, lse, delta, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale, 0, full,
            HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, DOT_PRECISION,
        )
        dq = _dq_inner(
            dq, q, do, lse, delta, k_head, v_head, offs_m, seq_len, stride_kt, stride_vt, qk_scale, full, seq_len,
            HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, DOT_PRECISION,
        )

    dq *= sm_scale
    dq_ptrs = DQ + _head_offset(bh, n_heads, stride_dqb, stride_dqh) + offs_m[:, None] * stride_dqt + offs_d[None, :]
    _store(dq_ptrs, dq.to(DQ.dtype.element_ty), row_ok[:, None], d_ok[None, :], PAD_D)


# Autotuned variants (GPT_ATTENTION_AUTOTUNE=1, fp16 and bf16). The key is (T bucket, head dim,
# causal) plus every tensor argument's dtype, which Triton's autotuner appends by itself; T itself is
# not in it, so a new length in the same power-of-two bucket reuses the winner. Eight candidates per
# kernel at most: each costs a compilation (about a second) the first time a key is seen, and the
# first training step pays for all of them; Triton caches the winners on disk for later runs. Every
# kernel overwrites its outputs without reading them (no accumulation, no atomics), so the
# autotuner's repeated benchmark launches need no reset_to_zero or restore_value.
def _autotuned(kernel, key, candidates):
    """``kernel`` autotuned over ``candidates``, (BLOCK_M, BLOCK_N, num_warps, num_stages) each."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in candidates]
    return triton.autotune(configs, key=key, cache_results=True)(kernel)


_TUNE_KEY = ["T_BUCKET", "HEAD_DIM", "CAUSAL"]
_forward_autotuned = _autotuned(_attention_forward_kernel, _TUNE_KEY, [
    # No 8-warp tile under 128×128 scores (the Triton tutorial's `keep` rule for Hopper).
    (128, 128, 8, 3), (128, 128, 8, 2), (128, 128, 4, 3), (128, 64, 4, 3),
    (128, 64, 4, 4), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3),
])
_dkdv_autotuned = _autotuned(_attention_backward_dkdv_kernel, _TUNE_KEY + ["GROUP"], [
    (32, 128, 8, 3), (32, 128, 8, 4), (32, 128, 4, 3), (64, 128, 8, 3),
    (64, 64, 4, 3), (32, 64, 4, 3), (32, 64, 8, 3), (64, 64, 8, 3),
])
_dq_autotuned = _autotuned(_attention_backward_dq_kernel, _TUNE_KEY, [
    (128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 3), (128, 32, 4, 3),
    (128, 16, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3), (64, 32, 4, 3),
])


# ----------------------------------------------------------------------------- launchers


def _check_inputs(q, k, v, scale) -> None:
    """ValueError for anything the kernels cannot take, saying what was expected."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D (B, H, T, D) tensor, got {describe(t)}")
    if k.shape != v.shape or (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            f"attention: q (B, H, T, D) and k, v (B, Hkv, T, D) must have the same (B, H, T, D) shape but for "
            f"fewer k/v heads, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[1] == 0 and q.shape[1] or k.shape[1] and q.shape[1] % k.shape[1]:
        raise ValueError(
            f"attention: the k/v heads ({k.shape[1]}) must divide the query heads ({q.shape[1]}): grouped-query "
            f"attention shares each k/v head among H / Hkv query heads"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention: q, k, v must be float16, bfloat16 or float32, got {q.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"attention: q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    require_triton("attention", q.device)
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D = {q.shape[-1]} is not supported; head dims run from 1 to {MAX_HEAD_DIM}")
    check_scale("attention", scale)


def _bthd_empty(like: torch.Tensor) -> torch.Tensor:
    """An uninitialized (B, H, T, D) tensor laid out as (B, T, H, D) in memory (see the module doc)."""
    B, H, T, D = like.shape
    return torch.empty((B, T, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _grid(n_heads_total: int, seq_len: int, block: str):
    """(B·H, blocks along T). Heads on the first axis: it has no 65535 limit, and since the GPU
    launches programs in order of that axis first, under causal masking every head's heaviest block
    starts before any lighter one (longest first, the shortest tail)."""
    return lambda meta: (n_heads_total, cdiv(seq_len, meta[block]))


def _launch(kernel, autotuned, tile: Optional[Tile], grid, args, constexprs) -> None:
    """Run ``kernel`` with ``tile`` (block shape, warps, stages), or its autotuned variant without one."""
    if tile is None:
        autotuned[grid](*args, **constexprs)
    else:
        kernel[grid](
            *args, **constexprs, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
            num_warps=tile.num_warps, num_stages=tile.num_stages,
        )


def _resolve(q: torch.Tensor, causal: bool, config: Optional[AttentionConfig]) -> Optional[AttentionConfig]:
    """The tiles to launch with; None means autotune (fp16 and bf16 only: the candidates are
    tensor-core tiles, which fp32's IEEE matmuls overflow: tens of seconds of compilation each,
    to spill or exceed shared memory)."""
    if config is not None:
        return config
    if AUTOTUNE and q.device.type == "cuda" and q.dtype != torch.float32:
        return None
    return select_config(q.shape[-1], q.dtype, causal, q.device)


def _constexprs(q: torch.Tensor, causal: bool) -> dict:
    # fp32 inputs get IEEE matmuls (Triton's default for them is TF32, a 10-bit mantissa); the
    # setting is ignored for fp16/bf16 inputs.
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return dict(HEAD_DIM=q.shape[-1], BLOCK_D=head_block(q.shape[-1]), CAUSAL=bool(causal), DOT_PRECISION=precision)


def head_block(head_dim: int) -> int:
    """The kernels' block along the head dimension: the smallest supported head dim >= ``head_dim``."""
    return next(block for block in SUPPORTED_HEAD_DIMS if block >= head_dim)


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None, config: Optional[AttentionConfig] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel: ``(O, lse)``, O (B, H, T, D) in q's dtype and lse (B, H, T) fp32 in
    base 2 (see the module doc). O goes into ``out`` if given (the packed op's (B, T, C) output,
    viewed per head). ``config`` overrides the tile table."""
    _check_inputs(q, k, v, scale)
    B, H, T, _ = q.shape
    out = _bthd_empty(q) if out is None else output_buffer("attention", "out", out, q.shape, q.dtype, q.device, False)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    sm_scale = default_scale(q, scale)
    config = _resolve(q, causal, config)
    _launch(
        _attention_forward_kernel, _forward_autotuned, config and config.forward,
        _grid(B * H, T, "BLOCK_M"),
        (q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
         H, H // k.shape[1], T, next_power_of_2(T), sm_scale * LOG2E),
        _constexprs(q, causal),
    )
    return out, lse


def attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool = True, scale: Optional[float] = None,
    dq: Optional[torch.Tensor] = None, dk: Optional[torch.Tensor] = None, dv: Optional[torch.Tensor] = None,
    config: Optional[AttentionConfig] = None, backward: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels: ``(dq, dk, dv)`` from dO and the forward's inputs, O and lse,
    into the given buffers if any. ``backward`` (default ``BACKWARD``, set by GPT_ATTENTION_BACKWARD):
    "deterministic" (no atomics: dQ in a pass of its own) or "atomic" (dQ accumulated with fp32
    atomics in the dK/dV pass: 5 GEMMs instead of 7, its last bits varying from run to run)."""
    backward = backward or BACKWARD
    if backward not in BACKWARDS:
        raise ValueError(f"attention backward: backward must be one of {', '.join(BACKWARDS)}, got {backward!r}")
    _check_inputs(q, k, v, scale)
    B, H, T, D = q.shape
    for name, t in (("dO (the output gradient)", do), ("o", o)):
        check_tensor("attention backward", name, t, f"a {q.dtype} tensor of shape {tuple(q.shape)} on {q.device}",
                     shape=q.shape, dtypes=(q.dtype,), device=q.device)
    output_buffer("attention", "lse", lse, (B, H, T), torch.float32, q.device)
    grads = []
    for name, buffer, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        buffer = _bthd_empty(like) if buffer is None else buffer
        grads.append(output_buffer("attention", name, buffer, like.shape, q.dtype, q.device, contiguous=False))
    dq, dk, dv = grads
    H_kv = k.shape[1]
    if q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    q, k, v, o, do = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), last_dim_contiguous(o), last_dim_contiguous(do)
    sm_scale = default_scale(q, scale)
    config = _resolve(q, causal, config)
    constexprs = _constexprs(q, causal)

    delta = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    _backward_preprocess_kernel[(B * H, cdiv(T, PREPROCESS_BLOCK_M))](
        o, do, delta, *_strides(o), *_strides(do), H, T, HEAD_DIM=D, BLOCK_D=head_block(D), BLOCK_M=PREPROCESS_BLOCK_M,
        num_warps=4,
    )
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    tail = (T, next_power_of_2(T), sm_scale, sm_scale * LOG2E)
    atomic = backward == "atomic"
    if atomic and config is None:  # autotuning would rerun the atomic additions: the table's tiles
        config = select_config(D, q.dtype, causal, q.device)
    dq_acc = torch.zeros((B, H, T, D), dtype=torch.float32, device=q.device) if atomic else delta
    _launch(
        _attention_backward_dkdv_kernel, _dkdv_autotuned, config and config.dkdv,
        _grid(B * H_kv, T, "BLOCK_N"),
        (q, k, v, do, lse, delta, dk, dv, dq_acc, *common, *_strides(dk), *_strides(dv), *_strides(dq_acc), H_kv, *tail),
        dict(constexprs, ATOMIC_DQ=atomic, GROUP=H // H_kv),
    )
    if atomic:
        dq.copy_(dq_acc.mul_(sm_scale))  # S = scale · QKᵀ, so dQ = scale · dS K
        return dq, dk, dv
    _launch(
        _attention_backward_dq_kernel, _dq_autotuned, config and config.dq,
        _grid(B * H, T, "BLOCK_M"),
        (q, k, v, do, lse, delta, dq, *common, *_strides(dq), H, H // H_kv, *tail), constexprs,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, causal, scale)


@_attention_op.register_fake
def _attention_fake(q, k, v, causal, scale):
    B, H, T, _ = q.shape
    return _bthd_empty(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("gpt_triton::attention_backward", mutates_args=())
def _attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, lse, causal, scale)


@_attention_backward_op.register_fake
def _attention_backward_fake(do, q, k, v, o, lse, causal, scale):
    return _bthd_empty(q), _bthd_empty(k), _bthd_empty(v)


def attention_flops(heads: int, t_q: int, t_k: int, head_dim: int, causal: bool, backward: bool = False) -> int:
    """FLOPs of ``heads`` (B·H) attention heads: QKᵀ and PV forward (2 GEMMs), 5 backward (S recomputed,
    dP, dV, dQ, dK). Causal masking halves them (the skipped blocks)."""
    flops = 2 * 2 * heads * t_q * t_k * head_dim
    flops = flops * 5 // 2 if backward else flops
    return flops // 2 if causal else flops


def _forward_cost(args, outputs):
    q, k, _, causal, _ = args
    read, written, _ = registry.default_cost(args, outputs)
    return read, written, attention_flops(q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3], causal)


def _backward_cost(args, outputs):
    do, q, k, _, _, lse, causal, _ = args
    read, written, _ = registry.default_cost(args, outputs)
    delta = 2 * registry.tensor_bytes(lse)  # rowsum(dO·O), written by the preprocessing kernel and read back
    return read + delta // 2, written + delta // 2, attention_flops(
        q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.shape[3], causal, backward=True)


registry.register_cost("gpt_triton::attention", _forward_cost)
registry.register_cost("gpt_triton::attention_backward", _backward_cost)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.gpt_triton.attention_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: Optional[float] = None
) -> torch.Tensor:
    """Triton FlashAttention-2: ``softmax(scale · q kᵀ (+ causal mask)) v`` for (B, H, T, D) inputs,
    differentiable in q, k and v; k and v may have fewer heads (B, Hkv, T, D), Hkv dividing H
    (grouped-query attention). See the module doc for layouts, dtypes and determinism. Bad inputs
    raise ValueError before anything is launched."""
    _check_inputs(q, k, v, scale)
    return torch.ops.gpt_triton.attention(q, k, v, bool(causal), default_scale(q, scale))[0]


def attention_reference(q, k, v, causal=True, scale=None):
    """PyTorch reference: ``F.scaled_dot_product_attention``, whose best backend is the eager baseline.

    Grouped-query attention: k and v may have fewer heads than q, (B, Hkv, T, D) with Hkv dividing
    Hq; query head ``h`` reads key/value head ``h // (Hq // Hkv)``. SDPA's ``enable_gqa`` takes them
    without repeating K/V in memory where its backend can (the flash backend on CUDA)."""
    grouped = k.dim() == 4 and q.dim() == 4 and k.shape[1] != q.shape[1]
    if grouped and q.shape[1] % k.shape[1]:
        raise ValueError(f"attention: k/v heads ({k.shape[1]}) must divide the query heads ({q.shape[1]})")
    if grouped:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


# ----------------------------------------------------------------------------- packed q, k, v
#
# The model's c_attn writes q, k and v side by side, (B, T, 3C). Taking that tensor whole, the
# backward writes dq, dk and dv into one (B, T, 3C) buffer, the gradient c_attn's backward reads;
# three separate gradients would be concatenated into it by autograd (the backward of the split), a
# read and a write of the whole (B, T, 3C) gradient.


def _check_packed(qkv, n_heads) -> None:
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"attention_qkv: n_heads must be an int >= 1, got {n_heads!r}")
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 3 or qkv.shape[-1] % (3 * n_heads):
        raise ValueError(f"attention_qkv: qkv must be a (B, T, 3·C) tensor with C divisible by n_heads={n_heads}, "
                         f"got {describe(qkv)}")


def split_qkv(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, 3C) -> q, k, v as (B, H, T, D) views (no copy)."""
    B, T, three_c = qkv.shape
    C = three_c // 3
    return tuple(t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in qkv.split(C, dim=2))


def _bhtd_view(btc: torch.Tensor, n_heads: int) -> torch.Tensor:
    B, T, C = btc.shape
    return btc.view(B, T, n_heads, C // n_heads).transpose(1, 2)


@torch.library.custom_op("gpt_triton::attention_qkv", mutates_args=())
def _attention_qkv_op(qkv: torch.Tensor, n_heads: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = split_qkv(qkv, n_heads)
    B, T, three_c = qkv.shape
    out = torch.empty((B, T, three_c // 3), dtype=qkv.dtype, device=qkv.device)
    _, lse = attention_forward(q, k, v, causal, scale, out=_bhtd_view(out, n_heads))
    return out, lse


@_attention_qkv_op.register_fake
def _attention_qkv_fake(qkv, n_heads, causal, scale):
    B, T, three_c = qkv.shape
    return qkv.new_empty((B, T, three_c // 3)), qkv.new_empty((B, n_heads, T), dtype=torch.float32)


@torch.library.custom_op("gpt_triton::attention_qkv_backward", mutates_args=())
def _attention_qkv_backward_op(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, n_heads: int, causal: bool, scale: float,
) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = split_qkv(dqkv, n_heads)
    attention_backward(_bhtd_view(do, n_heads), *split_qkv(qkv, n_heads), _bhtd_view(o, n_heads), lse, causal, scale,
                       dq=dq, dk=dk, dv=dv)
    return dqkv


@_attention_qkv_backward_op.register_fake
def _attention_qkv_backward_fake(do, qkv, o, lse, n_heads, causal, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _packed_forward_cost(args, outputs):
    qkv, n_heads, causal, _ = args
    read, written, _ = registry.default_cost(args, outputs)
    B, T, three_c = qkv.shape
    return read, written, attention_flops(B * n_heads, T, T, three_c // 3 // n_heads, causal)


def _packed_backward_cost(args, outputs):
    do, qkv, o, lse, n_heads, causal, _ = args
    read, written, _ = registry.default_cost(args, outputs)
    delta = registry.tensor_bytes(lse)  # rowsum(dO·O), written by the preprocessing kernel and read back
    B, T, three_c = qkv.shape
    return read + delta, written + delta, attention_flops(B * n_heads, T, T, three_c // 3 // n_heads, causal,
                                                          backward=True)


registry.register_cost("gpt_triton::attention_qkv", _packed_forward_cost)
registry.register_cost("gpt_triton::attention_qkv_backward", _packed_backward_cost)


def _setup_packed(ctx, inputs, output):
    qkv, n_heads, causal, scale = inputs
    o, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, o, lse)
    ctx.n_heads, ctx.causal, ctx.scale = n_heads, causal, scale


def _packed_backward(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    dqkv = torch.ops.gpt_triton.attention_qkv_backward(do.contiguous(), qkv, o, lse, ctx.n_heads, ctx.causal,
                                                      ctx.scale)
    return dqkv, None, None, None


_attention_qkv_op.register_autograd(_packed_backward, setup_context=_setup_packed)


def attention_qkv(qkv: torch.Tensor, n_heads: int, causal: bool = True, scale: Optional[float] = None) -> torch.Tensor:
    """Attention over the packed output of a fused q/k/v projection: ``qkv`` (B, T, 3C) holds q, k and v
    side by side, each C = n_heads · D wide; returns (B, T, C), the heads side by side (what the
    output projection takes). The gradient of ``qkv`` is written as one (B, T, 3C) tensor."""
    _check_packed(qkv, n_heads)
    q, k, v = split_qkv(qkv, n_heads)
    _check_inputs(q, k, v, scale)
    return torch.ops.gpt_triton.attention_qkv(qkv, n_heads, bool(causal), default_scale(q, scale))[0]


def attention_qkv_reference(qkv, n_heads, causal=True, scale=None):
    """PyTorch reference: the split into heads, ``F.scaled_dot_product_attention``, the heads joined."""
    _check_packed(qkv, n_heads)
    B, T, _ = qkv.shape
    y = attention_reference(*split_qkv(qkv, n_heads), causal=causal, scale=scale)
    return y.transpose(1, 2).reshape(B, T, -1)


def backward_note() -> str:
    """The backward in use, for the registry's report."""
    if BACKWARD == "atomic":
        return "backward: atomic dQ (5 GEMMs, not bit-reproducible; GPT_ATTENTION_BACKWARD=atomic)"
    return "backward: deterministic (GPT_ATTENTION_BACKWARD=atomic for the atomic-dQ one)"


registry.register("attention", reference=attention_reference, triton=attention,
                  variants={"attention_qkv": (attention_qkv_reference, attention_qkv)}, note=backward_note)
