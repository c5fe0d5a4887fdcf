"""Rotary position embeddings (RoPE), the rotate-half convention of Llama and Hugging Face.

Each head vector ``x`` of size D is split into halves ``x1 = x[:D/2]`` and ``x2 = x[D/2:]``; at
position ``p`` pair ``i`` turns by the angle ``p · θ^(-2i/D)``::

    out[:D/2] = x1 · cos - x2 · sin
    out[D/2:] = x2 · cos + x1 · sin

which is Hugging Face's ``q · cos + rotate_half(q) · sin`` with its duplicated (L, D) table.

``rope_table(length, head_dim, theta, device)`` -> ``(cos, sin)``, each (length, D/2) fp32, computed
once per (length, head_dim, theta, device) and cached (the model also keeps them as buffers). The
angles are Hugging Face's ``LlamaRotaryEmbedding`` (default rope type) to the bit: ``inv_freq =
1 / θ^(arange(0, D, 2) / D)`` in fp32, angle = fp32 position times ``inv_freq``.

``rope(q, k, cos, sin, positions)`` -> ``(q_rot, k_rot)``:

* ``q`` (B, T, Hq, D) and ``k`` (B, T, Hkv, D), as the model has them right after the projection
  (views of it, so strided); D even; Hkv may differ from Hq (grouped-query attention);
* ``cos``, ``sin`` (L, D/2) fp32 tables from ``rope_table``, L at least the largest position + 1;
* ``positions`` int64/int32, (T,) for every row alike (training, a prefill) or (B, T) per row (a
  decode step of the KV cache, where each row sits at its own length);
* the returned q_rot and k_rot have their inputs' shapes and dtypes; the rotation is computed in
  fp32 (float64 for float64 inputs) and rounded once. Callers use only the returned tensors: an
  implementation may rotate q and k in place and return them. Gradients flow to q and k (not to
  the tables).

Public: ``rope`` (the differentiable custom op ``gpt_triton::rope``, backward
``gpt_triton::rope_backward``), ``rope_forward`` (the launcher, both directions), ``rope_reference``
and ``rope_table``.

The Triton version is one kernel for both directions: the backward is the same rotation by the
opposite angle (``sin`` negated), applied to the gradients of ``q_rot`` and ``k_rot``. One program
takes one token: it gathers that token's ``cos``/``sin`` row (by its position) once, then rotates
every q head and every k head of the token, reading each element once and writing it once, in fp32,
rounded once to the input's dtype. Inputs are read through their strides (the projection's views,
as they are; a copy only when the head dim itself is strided); outputs are new contiguous
(B, T, H, D) tensors. A position outside the table, ``[0, L)``, gives NaN rows rather than an
out-of-bounds read (checking on the host would cost a GPU sync per call).

Why a separate kernel, not fused into the attention kernels' Q/K loads: fusion could save at most
this kernel's own traffic, q and k read and written once each way. The step ledger (``python -m
bench ledger --preset llama-124m``, B=16, T=1024, bf16) counts that at 1.62 GB of the all-on
micro-step's 47.65 GB (3.4%; 0.54 of 22.35 predicted ms), and fusion would not get all of it: the
attention backward would rotate Q/K again on load and un-rotate dQ/dK on store, and the KV cache
stores rotated keys, so prefill and decode would still write them. A few percent does not pay for
a rotation inside the FlashAttention loops (the README says what would change that). This kernel against the PyTorch reference is the larger difference: the ledger
counts 66.19 GB for all on but RoPE, 18.5 GB more (the reference's halves, casts and concatenation).
Out of place rather than in place: the traffic is the same (one read and one write of each
element), and rotating q and k in place, views of the projection's output, would make this a
mutating custom op, which torch.library's autograd registration does not take.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gpt_kernels import registry
from gpt_kernels.common import check_same_device, check_tensor, describe, require_triton
from gpt_kernels.host import next_power_of_2

# Heads rotated per step of a program's loop (a (HEAD_BLOCK, D/2) pair of tiles), by two warps: at
# D = 64 that is 8 elements a thread, so bf16 halves move as 16-byte vectors (four warps gave 8-byte
# ones). Starting points for Hopper; the GPU session tunes them with bench/bench_rope.py.
HEAD_BLOCK = 16
NUM_WARPS = 2


def rope_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """``inv_freq``, (D/2,) fp32, computed as transformers computes it."""
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"rope: the head dim must be even and >= 2, got {head_dim}")
    if not theta > 0:
        raise ValueError(f"rope: theta must be > 0, got {theta}")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta ** exponents)


def compute_rope_table(length: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each (length, D/2) fp32, uncached (the model builds its buffers with it)."""
    angles = torch.arange(length, device=device).float()[:, None] * rope_frequencies(head_dim, theta, device)[None, :]
    return angles.cos(), angles.sin()


@functools.lru_cache(maxsize=16)
def _cached_table(length: int, head_dim: int, theta: float, device: torch.device):
    return compute_rope_table(length, head_dim, theta, device)


def rope_table(length: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each (length, D/2) fp32, computed once per (length, head_dim, theta, device)."""
    return _cached_table(int(length), int(head_dim), float(theta), torch.device(device or "cpu"))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    math_dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x.to(math_dtype).chunk(2, dim=-1)
    cos, sin = cos.to(math_dtype), sin.to(math_dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@triton.jit
def _rotate_heads(x_ptr, out_ptr, x_offset, out_offset, n_heads, stride_x_head, stride_out_head, cos, sin,
                  HALF: tl.constexpr, HEAD_BLOCK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate the ``n_heads`` head vectors of one token: ``[x1·cos - x2·sin | x2·cos + x1·sin]``."""
    cols = tl.arange(0, BLOCK_HALF)
    for head0 in range(0, n_heads, HEAD_BLOCK):
        heads = head0 + tl.arange(0, HEAD_BLOCK)
        mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
        x1_ptrs = x_ptr + x_offset + heads[:, None].to(tl.int64) * stride_x_head + cols[None, :]
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        out1 = x1 * cos[None, :] - x2 * sin[None, :]
        out2 = x2 * cos[None, :] + x1 * sin[None, :]
        out1_ptrs = out_ptr + out_offset + heads[:, None].to(tl.int64) * stride_out_head + cols[None, :]
        tl.store(out1_ptrs, out1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out1_ptrs + HALF, out2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, positions_ptr,
    seq_len, n_q_heads, n_k_heads, table_len, stride_table,
    stride_q_batch, stride_q_token, stride_q_head, stride_k_batch, stride_k_token, stride_k_head,
    stride_q_out_batch, stride_q_out_token, stride_q_out_head,
    stride_k_out_batch, stride_k_out_token, stride_k_out_head,
    stride_positions_batch, stride_positions_token,
    INVERSE: tl.constexpr, HALF: tl.constexpr, HEAD_BLOCK: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One program per token (b, t): its table row once, then its q heads and its k heads. ``INVERSE``
    turns by the opposite angle (the backward). ``HALF`` (D/2) is a compile-time constant: the second
    half sits at a known offset, so both halves load as 16-byte vectors (a handful of head dims exist)."""
    token = tl.program_id(0)
    b = (token // seq_len).to(tl.int64)
    t = (token % seq_len).to(tl.int64)
    position = tl.load(positions_ptr + b * stride_positions_batch + t * stride_positions_token).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)
    in_table = (position >= 0) & (position < table_len)
    table_mask = (cols < HALF) & in_table
    cos = tl.load(cos_ptr + position * stride_table + cols, mask=table_mask, other=float("nan"))
    sin = tl.load(sin_ptr + position * stride_table + cols, mask=table_mask, other=float("nan"))
    if INVERSE:
        sin = -sin
    _rotate_heads(q_ptr, q_out_ptr, b * stride_q_batch + t * stride_q_token,
                  b * stride_q_out_batch + t * stride_q_out_token, n_q_heads, stride_q_head, stride_q_out_head,
                  cos, sin, HALF, HEAD_BLOCK, BLOCK_HALF)
    _rotate_heads(k_ptr, k_out_ptr, b * stride_k_batch + t * stride_k_token,
                  b * stride_k_out_batch + t * stride_k_out_token, n_k_heads, stride_k_head, stride_k_out_head,
                  cos, sin, HALF, HEAD_BLOCK, BLOCK_HALF)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(q, k, cos, sin, positions, triton_dtypes=True) -> None:
    """ValueError for anything the op cannot take (the reference's checks, and the kernel's dtypes)."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[-1] % 2 or t.shape[-1] == 0:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"rope: {name} must be a (B, T, H, D) tensor with D even, got {shape}")
        if triton_dtypes:
            check_tensor("rope", name, t, "a float32, float16 or bfloat16 tensor")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, T and D")
    B, T, _, D = q.shape
    if not all(isinstance(t, torch.Tensor) for t in (cos, sin)) or cos.shape != sin.shape or cos.dim() != 2 \
            or cos.shape[1] != D // 2:
        raise ValueError(f"rope: cos and sin must be (L, D/2 = {D // 2}) tables, got {describe(cos)}, {describe(sin)}")
    if not isinstance(positions, torch.Tensor) or positions.dtype not in (torch.int64, torch.int32) \
            or positions.shape not in ((T,), (B, T)):
        raise ValueError(f"rope: positions must be ({T},) or ({B}, {T}) int64/int32, got {describe(positions)}")
    if triton_dtypes:
        for name, t in (("cos", cos), ("sin", sin)):
            check_tensor("rope", name, t, f"a float32 (L, {D // 2}) table from rope_table", dtypes=(torch.float32,))
        for name, t in (("k", k), ("cos", cos), ("sin", sin), ("positions", positions)):
            check_same_device("rope", name, t, "q", q)
        require_triton("rope", q.device, "q")


def rope_forward(q, k, cos, sin, positions, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel: ``(q_rot, k_rot)``, new contiguous tensors in q's and k's dtypes.
    ``inverse=True`` turns by the opposite angle (the backward, applied to the gradients)."""
    _check_inputs(q, k, cos, sin, positions)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    B, T, _, D = q.shape
    if B * T == 0:
        return q_out, k_out
    # The kernel reads any strides but unit ones along the head dim (the projection's views have them).
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    cos, sin = cos.contiguous(), sin.contiguous()  # the model's tables already are: no copy
    position_strides = (0, positions.stride(0)) if positions.dim() == 1 else tuple(positions.stride())
    half = D // 2
    _rope_kernel[(B * T,)](
        q, k, q_out, k_out, cos, sin, positions,
        T, q.shape[2], k.shape[2], cos.shape[0], cos.stride(0),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        *position_strides,
        INVERSE=inverse, HALF=half, HEAD_BLOCK=min(HEAD_BLOCK, next_power_of_2(max(q.shape[2], k.shape[2], 1))),
        BLOCK_HALF=next_power_of_2(half), num_warps=NUM_WARPS,
    )
    return q_out, k_out


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gpt_triton::rope", mutates_args=())
def _rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_forward(q, k, cos, sin, positions)


@_rope_op.register_fake
def _rope_fake(q, k, cos, sin, positions):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("gpt_triton::rope_backward", mutates_args=())
def _rope_backward_op(dq_rot: torch.Tensor, dk_rot: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_forward(dq_rot, dk_rot, cos, sin, positions, inverse=True)


@_rope_backward_op.register_fake
def _rope_backward_fake(dq_rot, dk_rot, cos, sin, positions):
    return dq_rot.new_empty(dq_rot.shape), dk_rot.new_empty(dk_rot.shape)


def _setup_context(ctx, inputs, output):
    _, _, cos, sin, positions = inputs
    ctx.save_for_backward(cos, sin, positions)  # the tables and positions only: a rotation's slope is itself


def _backward(ctx, dq_rot, dk_rot):
    cos, sin, positions = ctx.saved_tensors
    dq, dk = torch.ops.gpt_triton.rope_backward(dq_rot, dk_rot, cos, sin, positions)
    return dq, dk, None, None, None


_rope_op.register_autograd(_backward, setup_context=_setup_context)


def rope(q, k, cos, sin, positions):
    """Triton RoPE of q and k at ``positions`` (see the module doc); differentiable in q and k. Bad
    inputs raise ValueError before anything is launched."""
    _check_inputs(q, k, cos, sin, positions)
    return torch.ops.gpt_triton.rope(q, k, cos, sin, positions)


def rope_reference(q, k, cos, sin, positions):
    """PyTorch reference (see the module doc for the contract)."""
    _check_inputs(q, k, cos, sin, positions, triton_dtypes=False)
    # (T, D/2) or (B, T, D/2) -> broadcast over the heads: (T, 1, D/2) or (B, T, 1, D/2)
    cos, sin = cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _cost(args, outputs):
    """q and k read, q_rot and k_rot written (or the gradients, backward), and only the table rows the
    positions gather: at most one (cos, sin) row per token, never the whole table."""
    q, k, cos, sin, positions = args
    rows = min(cos.shape[0], positions.numel())
    read = registry.tensor_bytes(q, k, positions) + 2 * rows * cos.shape[1] * cos.element_size()
    return read, registry.tensor_bytes(*outputs), 0


registry.register("rope", reference=rope_reference, triton=rope)
registry.register_cost("gpt_triton::rope", _cost)
registry.register_cost("gpt_triton::rope_backward", _cost)
