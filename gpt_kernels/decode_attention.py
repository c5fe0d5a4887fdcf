"""Attention of one new query row per sequence against a KV cache (the generation step), in Triton.

``decode_attention(q, k_cache, v_cache, cache_lengths, scale=None)``: ``q`` is (B, H, 1, D), the
caches (B, Hkv, T, D) with Hkv dividing H (grouped-query attention: query head ``h`` reads cache
head ``h // (H / Hkv)`` in place, never a repeated copy), and row ``b`` attends to its first ``cache_lengths[b]`` cached positions (the
new token's own key and value included, written there before the call); the rest of the cache is
never read. Returns (B, H, 1, D) in q's dtype.

One query row has too little work for a program per head: at batch 1 GPT-2 small has 12 heads,
and 12 programs leave most of an H100's 132 SMs idle while each streams the whole cache. So the
keys are split across programs ("flash-decoding"):

* the split kernel, one program per (head, split), streams its BLOCK_N-key blocks with an online
  softmax (running max ``m`` and sum ``l``, fp32) and writes its normalized partial output and
  its log-sum-exp ``m + log2(l)`` (base 2: the scores are pre-multiplied by ``scale·log2(e)``);
* the combine kernel, one program per head, weighs each split's output by ``2^(lse_i - max lse)``
  and normalizes: the exact softmax over all keys, whatever the split.

With a single split (enough heads to fill the GPU already) the split kernel writes the output
itself and the combine launch is skipped. Splits that start past a row's length do no work
(lse = -inf, weight 0). A row of length 0 has no key to attend to: its output is zeros (an
empty weighted sum), in the kernel and the reference alike; lengths past T count as T.

The scores are a row-vector times a matrix: no ``tl.dot`` (its smallest tile is 16 rows, 15 of
them wasted here), but elementwise products summed along D in fp32. The kernel is bound by
reading K and V once: 2·B·H·L·D elements for rows of length L.

Layouts: q and the caches may be any strided views whose last dimension is contiguous (the model
passes its (B, 1, 3C) ``c_attn`` view as q and a prefix view of its preallocated cache); the
output is contiguous (B, H, 1, D). Dtypes fp32, fp16, bf16; head dims up to 256.

Tiles (``_tile``) and the split count (``_num_splits``) are starting points for Hopper: tiles
that ptxas compiles for sm_90a without spills in at most about 128 registers (at least four
programs per SM to keep loads in flight; the loop has no ``tl.dot``, so ``num_stages`` pipelining
does not apply), and splits until there are four programs per SM. ``python -m bench.bench_decode_attention``
on an H100 is where to tune them.

This is an inference op; its autograd formula is plain PyTorch (correct, not fast).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gpt_kernels import registry
from gpt_kernels.common import check_scale, check_tensor, default_scale, describe, last_dim_contiguous, require_triton
from gpt_kernels.host import cdiv, next_power_of_2

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_SPLITS = 64  # the combine kernel holds every split's partial output (MAX_SPLITS × D fp32) in registers
PROGRAMS_PER_SM = 4  # split until B·H·splits reaches this many programs per SM
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _decode_split_kernel(
    Q, K, V, Lengths, Out, PartialOut, PartialLse,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh,
    n_heads, group, max_len, keys_per_split, scale_log2e,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    b = bh // n_heads
    h = bh % n_heads
    length = tl.minimum(tl.load(Lengths + b).to(tl.int32), max_len)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, length)

    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + d, mask=d_mask, other=0.0)
    q = q.to(tl.float32) * scale_log2e
    kv_h = h // group  # grouped-query attention: `group` consecutive query heads share a cache head
    k_head = K + b.to(tl.int64) * stride_kb + kv_h.to(tl.int64) * stride_kh
    v_head = V + b.to(tl.int64) * stride_vb + kv_h.to(tl.int64) * stride_vh

    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_mask = n < hi
        tile_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_head + n[:, None] * stride_kt + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(n_mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))  # finite: every block holds at least one valid key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        v = tl.load(v_head + n[:, None] * stride_vt + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new

    if SINGLE_SPLIT:
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)  # a row of length 0: zeros
        out_ptr = Out + b.to(tl.int64) * stride_ob + h * stride_oh + d
        tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=d_mask)
    else:
        has_keys = l_i > 0.0
        l_safe = tl.where(has_keys, l_i, 1.0)
        lse = tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))
        partial = bh.to(tl.int64) * num_splits + split
        tl.store(PartialOut + partial * BLOCK_D + d, acc / l_safe)
        tl.store(PartialLse + partial, lse)


@triton.jit
def _decode_combine_kernel(
    PartialOut, PartialLse, Out,
    stride_ob, stride_oh,
    n_heads, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // n_heads
    h = bh % n_heads
    s = tl.arange(0, BLOCK_S)
    s_mask = s < num_splits
    d = tl.arange(0, BLOCK_D)
    first = bh.to(tl.int64) * num_splits
    lse = tl.load(PartialLse + first + s, mask=s_mask, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # every split empty (length 0): weights 0
    weight = tl.exp2(lse - lse_max)
    partial = tl.load(PartialOut + (first + s)[:, None] * BLOCK_D + d[None, :], mask=s_mask[:, None], other=0.0)
    total = tl.sum(weight, axis=0)
    out = tl.sum(weight[:, None] * partial, axis=0) / tl.where(total > 0.0, total, 1.0)
    out_ptr = Out + b.to(tl.int64) * stride_ob + h * stride_oh + d
    tl.store(out_ptr, out.to(Out.dtype.element_ty), mask=d < HEAD_DIM)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(q, k_cache, v_cache, cache_lengths, scale) -> None:
    """ValueError for anything the kernels cannot take, saying what was expected."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(
            f"decode_attention: q must be a (B, H, 1, D) tensor (one query row per sequence), got {describe(q)}"
        )
    B, H, _, D = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or (t.shape[0], t.shape[3]) != (B, D):
            raise ValueError(
                f"decode_attention: {name} must be a (B, Hkv, T, D) = ({B}, Hkv, T, {D}) tensor matching q, "
                f"got {describe(t)}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    H_kv = k_cache.shape[1]
    if H_kv == 0 and H or H_kv and H % H_kv:
        raise ValueError(
            f"decode_attention: the cache heads ({H_kv}) must divide the query heads ({H}): grouped-query "
            f"attention shares each cache head among H / Hkv query heads"
        )
    if k_cache.shape[2] < 1:
        raise ValueError("decode_attention: the caches hold no position (T = 0)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"decode_attention: q and the caches must be float16, bfloat16 or float32, got {q.dtype}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise ValueError(
            f"decode_attention: q and the caches must share one dtype, got q {q.dtype}, "
            f"k_cache {k_cache.dtype}, v_cache {v_cache.dtype}"
        )
    check_tensor("decode_attention", "cache_lengths", cache_lengths, f"a ({B},) int32/int64 tensor", shape=(B,),
                 dtypes=(torch.int32, torch.int64))
    devices = {q.device, k_cache.device, v_cache.device, cache_lengths.device}
    if len(devices) != 1:
        raise ValueError(f"decode_attention: all tensors must be on one device, got {sorted(map(str, devices))}")
    require_triton("decode_attention", q.device)
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head dim D = {D} is not supported (1 to {MAX_HEAD_DIM})")
    check_scale("decode_attention", scale)


def _tile(block_d: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): 16 elements of each K and V tile per thread. For sm_90a ptxas fits that
    in 48-64 registers when the strides are multiples of 16 (the model's caches and q at D = 64),
    and in 80-150 when Triton cannot assume so (D = 40: 148; D = 64 with 32 elements per thread:
    236). Checked to compile without spills for D = 16 to 256."""
    num_warps = 4 if block_d <= 64 else 8
    block_n = max(16, min(128, 16 * 32 * num_warps // block_d))
    return block_n, num_warps


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter: a few splits, enough to exercise the combine


def _num_splits(n_programs: int, max_len: int, block_n: int, device: torch.device) -> int:
    """Enough splits for PROGRAMS_PER_SM programs per SM, but never less than one key block each."""
    wanted = cdiv(PROGRAMS_PER_SM * _sm_count(device), n_programs)
    return max(1, min(wanted, cdiv(max_len, block_n), MAX_SPLITS))


def decode_attention_forward(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lengths: torch.Tensor,
    scale: Optional[float] = None, num_splits: Optional[int] = None,
) -> torch.Tensor:
    """Launch the kernels; returns (B, H, 1, D) in q's dtype. ``num_splits`` overrides the heuristic
    (tests, tuning)."""
    _check_inputs(q, k_cache, v_cache, cache_lengths, scale)
    B, H, _, D = q.shape
    max_len = k_cache.shape[2]
    out = torch.empty((B, H, 1, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = (last_dim_contiguous(t) for t in (q, k_cache, v_cache))

    block_d = next_power_of_2(D)
    block_n, num_warps = _tile(block_d)
    if num_splits is None:
        num_splits = _num_splits(B * H, max_len, block_n, q.device)
    elif not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"decode_attention: num_splits must be an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    # Whole key blocks per split; the last splits may get fewer keys, or none.
    keys_per_split = cdiv(cdiv(max_len, num_splits), block_n) * block_n
    single = num_splits == 1
    if single:
        partial_out = partial_lse = out  # unused: the split kernel writes the output itself
    else:
        partial_out = torch.empty((B * H, num_splits, block_d), dtype=torch.float32, device=q.device)
        partial_lse = torch.empty((B * H, num_splits), dtype=torch.float32, device=q.device)

    _decode_split_kernel[(B * H, num_splits)](
        q, k_cache, v_cache, cache_lengths, out, partial_out, partial_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        H, H // k_cache.shape[1], max_len, keys_per_split, default_scale(q, scale) * LOG2E,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=block_n, SINGLE_SPLIT=single,
        num_warps=num_warps,
    )
    if not single:
        _decode_combine_kernel[(B * H,)](
            partial_out, partial_lse, out, out.stride(0), out.stride(1), H, num_splits,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=next_power_of_2(num_splits), num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------- custom op


@torch.library.custom_op("gpt_triton::decode_attention", mutates_args=())
def _decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lengths: torch.Tensor, scale: float
) -> torch.Tensor:
    return decode_attention_forward(q, k_cache, v_cache, cache_lengths, scale)


@_decode_attention_op.register_fake
def _decode_attention_fake(q, k_cache, v_cache, cache_lengths, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k_cache, v_cache, cache_lengths, scale = inputs
    ctx.save_for_backward(q, k_cache, v_cache, cache_lengths)
    ctx.scale = scale


def _backward(ctx, grad_out):
    """softmax attention's gradients, in fp32 PyTorch: generation never calls this, but a
    differentiable op should not silently return no gradient."""
    q, k, v, lengths = ctx.saved_tensors
    # A group's query heads as G query rows of their cache head, (B, Hkv, G, D): dK and dV sum the group.
    B, H, _, D = q.shape
    grouped = (B, k.shape[1], H // k.shape[1], D)
    qf, kf, vf, gf = q.float().reshape(grouped), k.float(), v.float(), grad_out.float().reshape(grouped)
    valid = (torch.arange(k.shape[2], device=k.device)[None, :] < lengths[:, None])[:, None, None, :]
    scores = (qf @ kf.transpose(-1, -2)) * ctx.scale  # (B, Hkv, G, T)
    p = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
    p = torch.where(valid, p, 0.0)  # a row of length 0 (softmax of nothing: NaN) has no gradient
    dp = gf @ vf.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(dim=-1, keepdim=True))
    dq = (ds @ kf) * ctx.scale
    dk = (ds.transpose(-1, -2) @ qf) * ctx.scale
    dv = p.transpose(-1, -2) @ gf
    return dq.reshape(q.shape).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


_decode_attention_op.register_autograd(_backward, setup_context=_setup_context)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lengths: torch.Tensor,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Triton flash-decoding: ``softmax(scale · q kᵀ) v`` over the first ``cache_lengths[b]`` cached
    positions of each row; q (B, H, 1, D), caches (B, Hkv, T, D) with Hkv dividing H. See the module doc. Bad inputs raise
    ValueError before anything is launched."""
    _check_inputs(q, k_cache, v_cache, cache_lengths, scale)
    return torch.ops.gpt_triton.decode_attention(q, k_cache, v_cache, cache_lengths, default_scale(q, scale))


def decode_attention_reference(q, k_cache, v_cache, cache_lengths, scale=None):
    """PyTorch reference. ``q`` (B, H, 1, D); caches (B, H, T_max, D) of which row ``b`` holds
    ``cache_lengths[b]`` valid positions (the new token's key and value included). A row of length 0
    gives zeros (SDPA's answer for a fully masked row differs across PyTorch versions). Unlike the
    kernel, which never reads past a row's length, SDPA multiplies the masked-out slots by zero:
    they must hold finite values (0 · NaN is NaN).

    Grouped-query attention: the caches may have fewer heads than q, (B, Hkv, T_max, D) with Hkv
    dividing H; query head ``h`` reads cache head ``h // (H // Hkv)``, with no copy of the caches."""
    positions = torch.arange(k_cache.shape[2], device=q.device)
    valid = positions[None, :] < cache_lengths[:, None]  # (B, T_max)
    B, H, _, D = q.shape
    Hkv = k_cache.shape[1]
    if H != Hkv:
        if H % Hkv:
            raise ValueError(f"decode_attention: cache heads ({Hkv}) must divide the query heads ({H})")
        # The group's query heads become G query rows of their cache head: (B, Hkv, G, D).
        out = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), k_cache, v_cache,
                                             attn_mask=valid[:, None, None, :], scale=scale)
        out = out.reshape(B, H, 1, D)
    else:
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid[:, None, None, :], scale=scale)
    return out.masked_fill((cache_lengths <= 0)[:, None, None, None], 0.0)


registry.register("decode_attention", reference=decode_attention_reference, triton=decode_attention)
