"""The training loop's pieces: learning-rate schedule, optimizer groups, evaluation, throughput."""

from __future__ import annotations

import contextlib
import math
import random

import numpy as np
import torch

from gpt.distributed import mean_across_ranks
from gpt_kernels.registry import ops

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
            _, loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True), check_inputs=False)
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
