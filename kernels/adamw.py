"""AdamW with decoupled weight decay, and gradient clipping by global norm."""

import torch

from kernels import registry


class AdamW_reference(torch.optim.AdamW):
    """PyTorch reference: ``torch.optim.AdamW`` plus ``clip_grad_norm_``, the interface training uses.

    ``clip_grad_norm_(max_norm)`` returns the global gradient norm (before clipping) and clips to
    ``max_norm`` when it is given; a fused optimizer may defer the scaling into its ``step``.
    """

    def __init__(self, params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)

    def clip_grad_norm_(self, max_norm=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if max_norm is None or max_norm <= 0:
            return torch.nn.utils.get_total_norm([p.grad for p in params])
        return torch.nn.utils.clip_grad_norm_(params, max_norm)


registry.register("adamw", reference=AdamW_reference)
