"""Fused lm_head + cross-entropy benchmark: time and peak memory of the loss stage.

The training setup of GPT-2 small: ``hidden`` (B·T, 768) in fp32 (the final LayerNorm's output) and
the fp32 ``lm_head`` weight (V, 768), under bf16 autocast, for B·T = 8·1024 and 16·1024 tokens and
V = 50304 (the model passes the 50257 real rows; the padded size is the benchmark's shape).
Competitors: ``lm_head`` + ``F.cross_entropy`` eager and ``torch.compile``d, Liger-Kernel's fused
linear cross-entropy if importable, and ours (``chunk_size`` automatic): ``triton`` the default
variant (logits tiles stored once), ``triton (recompute)`` the one that stores nothing of size N x V.

Each row reports the time, TFLOP/s of the three matmuls a training step needs (logits, d_hidden,
d_weight: ``6·N·V·C``; the forward alone ``2·N·V·C``) and the peak memory above the inputs.
What the fused op is for: at N = 16·1024 in bf16, a peak at least 4x below eager's at no more than
10% extra time.

``python -m bench.bench_linear_cross_entropy [--quick]``; ``--quick`` (or no GPU) a toy size on the CPU.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

import torch
import torch.nn.functional as F

from bench.common import BenchContext, Case, competitors, module_runner, run_standalone
from gpt_kernels.linear_cross_entropy import linear_cross_entropy

# The module, for its variant switch (gpt_kernels exports the op under the same name).
lce_module = importlib.import_module("gpt_kernels.linear_cross_entropy")

OP = "linear_cross_entropy"
GPU_SHAPES = [(8192, 768, 50304), (16384, 768, 50304)]  # (N, C, V)
QUICK_SHAPES = [(16, 32, 1000)]


def eager_linear_cross_entropy(hidden, weight, targets):
    """What the model does without the fused op: the full logits, then the loss in fp32."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def implementations(ctx: BenchContext) -> tuple[dict, list[str]]:
    def liger():
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        return lambda hidden, weight, targets: liger_fused_linear_cross_entropy(hidden, weight, targets)

    def recomputed(hidden, weight, targets):
        # The forward computes the gradients too (the backward only scales them): all under the switch.
        with lce_module.use_variant("recompute"):
            return linear_cross_entropy(hidden, weight, targets)

    impls, skipped = competitors(ctx, eager_linear_cross_entropy, linear_cross_entropy, {"liger": liger})
    if "triton" in impls:
        impls["triton (recompute)"] = recomputed
    return impls, skipped


def cases(ctx: BenchContext):
    # bf16 autocast on the GPU (training); the interpreter cannot time a CPU autocast run usefully.
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if ctx.is_gpu else contextlib.nullcontext
    for n_rows, width, n_classes in QUICK_SHAPES if ctx.quick else ctx.gpu_cases(GPU_SHAPES):
        hidden = torch.randn(n_rows, width, device=ctx.device, requires_grad=True)
        weight = (torch.randn(n_classes, width, device=ctx.device) * 0.02).requires_grad_()
        targets = torch.randint(0, n_classes, (n_rows,), device=ctx.device)

        def step(pass_, fn, hidden=hidden, weight=weight, targets=targets):
            def forward():
                with torch.no_grad(), autocast():
                    return fn(hidden, weight, targets)

            def forward_backward():
                with autocast():
                    loss = fn(hidden, weight, targets)
                return torch.autograd.grad(loss, (hidden, weight))
            return forward if pass_ == "forward" else forward_backward

        matmul_flops = 2 * n_rows * n_classes * width
        yield Case(
            name=f"N={n_rows} C={width} V={n_classes}",
            dtype=torch.bfloat16 if ctx.is_gpu else torch.float32,  # the matmuls' dtype: the ceiling to compare with
            impls=implementations(ctx)[0], step=step, passes=("forward", "forward+backward"),
            flops=lambda pass_, f=matmul_flops: f * (1 if pass_ == "forward" else 3),
            baselines=("eager",), compare_memory=True, columns=dict(autocast=ctx.is_gpu),
        )


run = module_runner(__name__)


COLUMNS = ["case", "dtype", "pass", "impl", "median_ms", "tflop_per_s", "speedup_vs_eager", "peak_memory_mb",
           "memory_vs_eager", "first_call_s", "error"]

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
