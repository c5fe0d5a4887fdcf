"""The lm_head matmul fused with the cross-entropy loss: ``cross_entropy(hidden @ weight.T, targets)``."""

from kernels import registry
from kernels.cross_entropy import cross_entropy_reference


def linear_cross_entropy_reference(hidden, weight, targets, ignore_index=-100, reduction="mean"):
    """PyTorch reference: the full (N, V) logits, then the loss in fp32."""
    return cross_entropy_reference(hidden @ weight.T, targets, ignore_index=ignore_index, reduction=reduction)


registry.register("linear_cross_entropy", reference=linear_cross_entropy_reference)
