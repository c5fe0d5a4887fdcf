"""LayerNorm over the last dimension, with an optional fused residual add.

``layer_norm(x, weight, bias, eps, residual=None)``: with ``residual`` it returns
``(layer_norm(x + residual), x + residual)``, the pre-norm block's add-then-norm in one call.
"""

import torch
import torch.nn.functional as F

from kernels import registry


def layer_norm_reference(x, weight, bias, eps=1e-5, residual=None):
    """PyTorch reference: statistics in fp32 (as F.layer_norm keeps them), output in the input's dtype."""
    if residual is not None:
        x = x + residual
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps), x
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


registry.register("layernorm", reference=layer_norm_reference)
