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

Public: ``rope`` (for now the reference itself: no Triton kernel is registered yet),
``rope_reference`` and ``rope_table``.
"""

from __future__ import annotations

import functools

import torch

from gpt_kernels import registry


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


def rope_reference(q, k, cos, sin, positions):
    """PyTorch reference (see the module doc for the contract)."""
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 4 or t.shape[-1] % 2:
            raise ValueError(f"rope: {name} must be a (B, T, H, D) tensor with D even, got {tuple(t.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must share B, T and D")
    B, T, _, D = q.shape
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != D // 2:
        raise ValueError(f"rope: cos and sin must be (L, D/2 = {D // 2}) tables, "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if positions.dtype not in (torch.int64, torch.int32) or positions.shape not in ((T,), (B, T)):
        raise ValueError(f"rope: positions must be ({T},) or ({B}, {T}) int64/int32, "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    # (T, D/2) or (B, T, D/2) -> broadcast over the heads: (1 or B, T, 1, D/2)
    cos, sin = cos[positions], sin[positions]
    cos, sin = cos.view(-1, T, 1, D // 2), sin.view(-1, T, 1, D // 2)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


rope = rope_reference

registry.register("rope", reference=rope_reference, triton=None)
