"""RMSNorm over the last dimension, with an optional fused residual add (the Llama block's norm).

``rmsnorm(x, weight, eps, residual=None)`` has the calling and return convention of
``layer_norm(x, weight, bias, eps, residual=None)``: without ``residual`` it returns
``y = x / sqrt(mean(x²) + eps) · weight``; with ``residual`` it returns the pair
``(rmsnorm(x + residual), x + residual)``, the pre-norm block's add-then-norm in one call.

Public: ``rmsnorm`` (for now the reference itself: no Triton kernel is registered yet) and
``rmsnorm_reference``.

The contract a Triton version must keep (the same as the LayerNorm's):

* ``x`` and ``residual`` have the same shape (..., C); ``weight`` is (C,), or None for no gain;
* the sum ``x + residual`` is stored in ``promote_types(x, residual)`` and is the second output;
* statistics and arithmetic are fp32 (float64 for float64 inputs), ``weight`` upcast;
* ``y`` has the stream's dtype, or the autocast dtype under autocast (the next op is a linear);
* every gradient comes back in its input's dtype.

Numerics follow Hugging Face's ``LlamaRMSNorm``: ``x · rsqrt(mean(x²) + eps)``, then times the
weight, so fp32 results match transformers' to the last bit.
"""

from __future__ import annotations

import torch

from gpt_kernels import registry
from gpt_kernels.layernorm import output_dtype


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


rmsnorm = rmsnorm_reference

registry.register("rmsnorm", reference=rmsnorm_reference, triton=None)
