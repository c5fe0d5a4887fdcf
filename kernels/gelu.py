"""GPT-2's GELU (the tanh approximation), with an optional fused bias add."""

import torch.nn.functional as F

from kernels import registry


def gelu_reference(x, bias=None):
    """PyTorch reference: ``gelu_tanh(x + bias)``."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh")


registry.register("gelu", reference=gelu_reference)
