"""The training loop's pieces: the training step, learning-rate schedule, optimizer groups,
evaluation, throughput, random-generator state.

:class:`TrainingStep` is the one optimizer step that ``train_gpt2.py`` trains with and that the
end-to-end benchmark (``bench/e2e.py``) times, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from gpt.distributed import mean_across_ranks
from gpt.numerics import StepGuard, Verdict
from gpt_kernels.registry import is_triton, ops

# Dense bf16 tensor-core peaks from the vendors' datasheets, FLOP/s, for MFU. Matched against the
# device name in this order, so the PCIe and NVL parts are found before the SXM default.
DATASHEET_BF16_PEAK = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM
    "H200": 989e12,
    "A100": 312e12,
}


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warm-up to ``max_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``max_steps``."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8):
    """AdamW through the registry, with weight decay on matrices and embeddings only: biases and
    LayerNorm gains are not decayed (decaying them only pulls them toward zero)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return ops.adamw(groups, lr=lr, betas=betas, eps=eps)


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on CUDA; a no-op in fp32 or on the CPU."""
    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def fused_loss_on(device: torch.device | str) -> bool:
    """Whether to compute the loss with the fused lm_head + loss (``GPT.forward(fused_loss=True)``):
    where its Triton kernel runs, so the (B·T, vocab) logits never exist; elsewhere the logits path."""
    return is_triton("linear_cross_entropy", device)


def set_gradient_sync(model: torch.nn.Module, enabled: bool) -> None:
    """DDP all-reduces and FSDP reduce-scatters the gradients in every backward unless told not to:
    with gradient accumulation only the last micro-step's backward should. A plain model: nothing to do."""
    model = getattr(model, "_orig_mod", model)  # under torch.compile
    if isinstance(model, DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


@dataclass
class StepResult:
    loss: float | torch.Tensor  # the mean loss over the micro-steps and ranks; a tensor without a guard
    grad_norm: float | torch.Tensor  # the global gradient norm before clipping
    verdict: Verdict | None = None  # the guard's verdict (None without a guard: the update was taken)


@dataclass
class TrainingStep:
    """One optimizer step: ``grad_accum`` micro-steps (forward under autocast with the loss scaled by
    ``1/grad_accum``, backward, the gradients synchronized across ranks only in the last one), the
    global norm clipped to ``grad_clip``, the numerics guard's verdict, the optimizer step, zero_grad.

    ``model`` is what runs the forward (the DDP or torch.compile wrapper, when there is one).
    ``next_batch()`` returns an (x, y) pair of token ids. With a ``guard`` the loss and the norm are
    read on the host (one sync per step) and a bad step skips the update; without one (the benchmark)
    nothing waits on the device and every update is taken.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]]
    grad_accum: int
    device: torch.device
    dtype: torch.dtype
    grad_clip: float
    guard: StepGuard | None = None

    def __call__(self, step: int = 0, lr: float | None = None) -> StepResult:
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        fused_loss = fused_loss_on(self.device)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            set_gradient_sync(self.model, micro == self.grad_accum - 1)
            with autocast(self.device, self.dtype):
                # The loader has checked every shard's ids. The loss comes back divided by grad_accum,
                # which the fused loss folds into the gradients it computes (no rescaling pass after).
                _, loss = self.model(x, y, check_inputs=False, loss_scale=1 / self.grad_accum, fused_loss=fused_loss)
            loss.backward()
            loss_sum += loss.detach().float()
        grad_norm = self.optimizer.clip_grad_norm_(self.grad_clip)
        if self.guard is None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(loss_sum, grad_norm)
        grad_norm = grad_norm.item()
        loss = mean_across_ranks(loss_sum).item()
        verdict = self.guard.check(step, loss, grad_norm)  # NaN/inf and loss spikes skip the update
        if verdict.update:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, grad_norm, verdict)


@torch.no_grad()
def evaluate(model, loader, batches: int, device: torch.device, dtype: torch.dtype) -> float:
    """Mean loss over the first ``batches`` batches of ``loader`` (reset first, so every eval sees the
    same data), averaged over ranks when distributed."""
    was_training = model.training
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = loader.next_batch()
        with autocast(device, dtype):
            # check_inputs=False: the loader checked every shard's ids; the checks would sync per batch.
            _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True), check_inputs=False,
                            fused_loss=fused_loss_on(device))
        total += loss.float()
    model.train(was_training)
    return mean_across_ranks(total / batches).item()


def datasheet_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in DATASHEET_BF16_PEAK.items() if key in name), None)


def rng_state() -> dict:
    """Every random generator's state as tensors and plain numbers, so a checkpoint holding it loads
    with ``torch.load(weights_only=True)`` (numpy's own state tuple holds an ndarray, which would not)."""
    version, python_state, gauss = random.getstate()
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["key"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
