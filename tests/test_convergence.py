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
from gpt.training import TrainingStep, cosine_lr, make_optimizer
from gpt_kernels import registry
from gpt_kernels.registry import use_kernels


def loss_curve(initial: GPT, kernels: str, data: torch.Tensor, steps: int, dtype: torch.dtype,
               max_lr: float) -> list[float]:
    """The training loop's step (decay groups, warm-up and cosine lr, clipping) for ``steps`` steps."""
    model = copy.deepcopy(initial)
    device = torch.device(DEVICE)
    batches = iter([(data[step, :, :-1].contiguous(), data[step, :, 1:].contiguous()) for step in range(steps)])
    with use_kernels(kernels):
        if kernels == "all":  # every op on Triton: a silent fallback would compare the references with themselves
            kernels = [op for op in registry.OPS if registry.has_triton(op)]
            assert all(registry.is_triton(op, DEVICE) for op in kernels), registry.report(DEVICE)
        optimizer = make_optimizer(model, lr=max_lr, weight_decay=0.1)
        training_step = TrainingStep(model, optimizer, batches.__next__, 1, device, dtype, grad_clip=1.0)
        lrs = [cosine_lr(step, max_lr, max_lr / 10, warmup_steps=5, max_steps=steps) for step in range(steps)]
        return [training_step(step, lr).loss.item() for step, lr in enumerate(lrs)]


def bigram_batches(vocab_size: int, steps: int, batch: int, seq: int) -> torch.Tensor:
    """Runs of consecutive token ids from random starts: a rule a model learns in a few steps, so
    the loss really falls and the curves have somewhere to diverge."""
    starts = torch.randint(0, vocab_size, (steps, batch, 1), device=DEVICE)
    return (starts + torch.arange(seq + 1, device=DEVICE)) % vocab_size


# Two blocks (the fused residual adds chain across them), a vocabulary of 128, one sequence of 16
# tokens per step: every kernel's interpreter run stays small enough for 30 steps.
CONVERGENCE = GPTConfig(block_size=16, vocab_size=128, n_layer=2, n_head=2, n_embd=32, bias=True)


def reference_and_triton_curves(config: GPTConfig, steps: int, batch: int, seq: int, dtype: torch.dtype,
                                max_lr: float) -> tuple[list[float], list[float]]:
    """The loss curves of one initial GPT trained on the same bigram batches with every op on its
    reference and with every op on Triton."""
    torch.manual_seed(0)
    initial = GPT(config).to(DEVICE)
    data = bigram_batches(config.vocab_size, steps, batch, seq)
    return loss_curve(initial, "none", data, steps, dtype, max_lr), loss_curve(initial, "all", data, steps, dtype, max_lr)


def assert_follows(triton: list[float], reference: list[float], rtol: float) -> None:
    for step, (got, want) in enumerate(zip(triton, reference)):
        assert abs(got - want) <= rtol * abs(want), f"step {step}: loss {got} vs the references' {want}"


def test_every_kernel_follows_the_reference_loss_curve_fp32():
    reference, triton = reference_and_triton_curves(CONVERGENCE, 30, batch=1, seq=16, dtype=torch.float32, max_lr=1e-2)
    assert reference[-1] < reference[0] - 0.3, "the model did not learn: the comparison would say little"
    assert_follows(triton, reference, rtol=1e-4)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="bf16 autocast at GPT-2 width needs a GPU")
def test_every_kernel_follows_the_reference_loss_curve_bf16_gpt2_width():
    config = GPTConfig(block_size=1024, n_layer=2)  # GPT-2's width, vocabulary and heads; two blocks
    reference, triton = reference_and_triton_curves(config, 50, batch=4, seq=512, dtype=torch.bfloat16, max_lr=6e-4)
    assert reference[-1] < reference[0] - 1.0, "the model did not learn: the comparison would say little"
    assert_follows(triton, reference, rtol=0.02)
