"""Attention of one new query row per sequence against a KV cache (the generation step)."""

import torch
import torch.nn.functional as F

from kernels import registry


def decode_attention_reference(q, k_cache, v_cache, cache_lengths, scale=None):
    """PyTorch reference. ``q`` (B, H, 1, D); caches (B, H, T_max, D) of which row ``b`` holds
    ``cache_lengths[b]`` valid positions (the new token's key and value included)."""
    positions = torch.arange(k_cache.shape[2], device=q.device)
    valid = positions[None, :] < cache_lengths[:, None]  # (B, T_max)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid[:, None, None, :], scale=scale)


registry.register("decode_attention", reference=decode_attention_reference)
