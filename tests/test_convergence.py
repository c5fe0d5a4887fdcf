"""Convergence: a GPT trained with every Triton kernel on follows, step by step, the loss curve of
the same GPT trained with every op on its PyTorch reference (as Liger-Kernel checks its kernels).

The model-parity tests compare one forward and backward; here the errors of every kernel, the
optimizer's included, compound over a training run, and the curves must still agree: within 1e-4
relative at every step in fp32 (the interpreter on the CPU), and within 2% under bf16 autocast on
a GPU, where the kernels' bf16 rounding differs from PyTorch's.
"""

import copy

import pytest
import torch

from conftest import DEVICE
from gpt.model import GPT, GPTConfig
from gpt.training import autocast, cosine_lr, make_optimizer
from gpt_kernels import registry
from gpt_kernels.registry import use_kernels


def loss_curve(initial: GPT, kernels: str, data: torch.Tensor, steps: int, dtype: torch.dtype,
               max_lr: float) -> list[float]:
    """The training loop's pieces (decay groups, warm-up and cosine lr, clipping) for ``steps`` steps."""
    model = copy.deepcopy(initial)
    device = torch.device(DEVICE)
    losses = []
    with use_kernels(kernels):
        if kernels == "all":  # every op on Triton: a silent fallback would compare the references with themselves
            kernels = [op for op in registry.OPS if registry.has_triton(op)]
            assert all(registry.is_triton(op, DEVICE) for op in kernels), registry.report(DEVICE)
        optimizer = make_optimizer(model, lr=max_lr, weight_decay=0.1)
        for step in range(steps):
            lr = cosine_lr(step, max_lr, max_lr / 10, warmup_steps=5, max_steps=steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = data[step, :, :-1].contiguous(), data[step, :, 1:].contiguous()
            with autocast(device, dtype):
                _, loss = model(x, y)
            loss.backward()
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    return losses


def bigram_batches(vocab_size: int, steps: int, batch: int, seq: int) -> torch.Tensor:
    """Runs of consecutive token ids from random starts: a rule a model learns in a few steps, so
    the loss really falls and the curves have somewhere to diverge."""
    starts = torch.randint(0, vocab_size, (steps, batch, 1), device=DEVICE)
    return (starts + torch.arange(seq + 1, device=DEVICE)) % vocab_size


# Two blocks (the fused residual adds chain across them), a vocabulary of 128, one sequence of 16
# tokens per step: every kernel's interpreter run stays small enough for 30 steps.
CONVERGENCE = GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32, bias=True)


def test_every_kernel_follows_the_reference_loss_curve_fp32():
    steps = 30
    torch.manual_seed(0)
    initial = GPT(CONVERGENCE).to(DEVICE)
    data = bigram_batches(CONVERGENCE.vocab_size, steps, batch=1, seq=16)
    reference = loss_curve(initial, "none", data, steps, torch.float32, max_lr=1e-2)
    triton = loss_curve(initial, "all", data, steps, torch.float32, max_lr=1e-2)
    assert reference[-1] < reference[0] - 0.3, "the model did not learn: the comparison would say little"
    for step, (got, want) in enumerate(zip(triton, reference)):
        assert abs(got - want) <= 1e-4 * abs(want), f"step {step}: loss {got} vs the references' {want}"


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast at GPT-2 width needs a GPU")
def test_every_kernel_follows_the_reference_loss_curve_bf16_gpt2_width():
    steps = 50
    torch.manual_seed(0)
    config = GPTConfig(block_size=1024, n_layer=2)  # GPT-2's width, vocabulary and heads; two blocks
    initial = GPT(config).to(DEVICE)
    data = bigram_batches(config.vocab_size, steps, batch=4, seq=512)
    reference = loss_curve(initial, "none", data, steps, torch.bfloat16, max_lr=6e-4)
    triton = loss_curve(initial, "all", data, steps, torch.bfloat16, max_lr=6e-4)
    assert reference[-1] < reference[0] - 1.0, "the model did not learn: the comparison would say little"
    for step, (got, want) in enumerate(zip(triton, reference)):
        assert abs(got - want) <= 0.02 * abs(want), f"step {step}: loss {got} vs the references' {want}"
