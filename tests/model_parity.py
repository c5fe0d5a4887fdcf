"""One check every kernel's test file uses: a tiny GPT gives the same logits, loss and gradients
with the op on Triton as with every op on its PyTorch reference."""

import copy
import warnings

import torch

from conftest import DEVICE
from gpt.model import GPT, GPTConfig
from gpt.training import fused_loss_on
from gpt_kernels.registry import is_triton, use_kernels
from compare import assert_close

# Small enough for Triton's interpreter, yet with GPT-2's shape rules: a padded vocabulary
# (1000 -> 1024), several heads of width 16, biases, two blocks to chain the fused residual adds.
TINY = GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=32, bias=True)


def _run(model, idx, targets):
    logits, loss = model(idx, targets, fused_loss=fused_loss_on(DEVICE))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return logits, loss.detach(), grads


def assert_model_parity(op: str, config: GPTConfig = TINY, batch: int = 2, seq: int = 24, factor: float = 10.0):
    """fp32 forward + backward with ``op`` on Triton vs all references; ``factor`` scales fp32's tolerance
    for the longer accumulation chains of a whole model."""
    torch.manual_seed(0)
    model = GPT(config).to(DEVICE)
    idx = torch.randint(0, config.vocab_size, (batch, seq), device=DEVICE)
    targets = torch.randint(0, config.vocab_size, (batch, seq), device=DEVICE)
    targets[0, :3] = -100  # ignored positions must drop out of the loss in both paths

    with use_kernels("none"):
        ref_logits, ref_loss, ref_grads = _run(copy.deepcopy(model), idx, targets)
    with use_kernels(op), warnings.catch_warnings():
        # A silent fallback to the reference would make this test vacuous.
        warnings.filterwarnings("error", message="kernel .* runs its PyTorch reference")
        assert is_triton(op, DEVICE), f"{op} does not run on Triton here"
        logits, loss, grads = _run(copy.deepcopy(model), idx, targets)

    if logits is not None:
        assert_close(logits, ref_logits, torch.float32, "logits", factor)
    assert_close(loss, ref_loss, torch.float32, "loss", factor)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], torch.float32, f"grad {name}", factor)


def gpt2_width_losses_and_peaks(*specs: str) -> list[tuple[torch.Tensor, int]]:
    """A 2-layer GPT-2-width model at 8·1024 tokens under bf16 autocast (CUDA only), one forward and
    backward per kernel spec: ``(loss, peak bytes allocated above what was held before)`` for each."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=1024, n_layer=2)).cuda()
    idx = torch.randint(0, 50257, (8, 1024), device="cuda")
    targets = torch.randint(0, 50257, (8, 1024), device="cuda")
    results = []
    for spec in specs:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with use_kernels(spec), torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, targets, fused_loss=fused_loss_on("cuda"))
        loss.backward()
        torch.cuda.synchronize()
        results.append((loss.detach(), torch.cuda.max_memory_allocated() - before))
    return results

