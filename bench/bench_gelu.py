"""GELU benchmark: the Triton op vs eager PyTorch and torch.compile, at GPT-2's MLP activation.

The tensor is the MLP's pre-activation, ``(B·T, 4·C)``. Each case runs with the fused bias (the
model's path: ``gelu(x, b)`` vs the eager pair ``F.gelu(x + b)``) and without one (``F.gelu(x)``).
Bytes are the fewest each pass must move, whatever the implementation actually moves:

* forward: read x, write y (plus read the bias),
* backward: read dy and x, write dx (plus read the bias, write dbias),
* forward+backward: both, x read twice (the forward's output is not needed by the backward).

Liger-Kernel has no plain GELU (only the GEGLU product), so it has no row here.

``python -m bench.bench_gelu [--quick]``: on a GPU, GPT-2 shapes in bf16 and fp32; ``--quick`` (or
no GPU) a toy size on the CPU through Triton's interpreter, which only checks the harness.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.common import (BANDWIDTH_COLUMNS, BenchContext, Case, autograd_step, competitors, module_runner,
                          run_standalone)
from gpt_kernels.gelu import gelu

OP = "gelu"
# (B·T, 4·C): GPT-2 small with B·T = 16·1024 tokens, and GPT-2 XL's width.
GPU_SHAPES = [(16384, 3072), (8192, 6400)]
QUICK_SHAPES = [(64, 384)]


def eager_gelu(x, bias=None):
    """The unfused baseline: a bias add (one full pass) and then F.gelu (another)."""
    if bias is not None:
        x = x + bias
    return F.gelu(x, approximate="tanh")


def bytes_moved(pass_: str, n_rows: int, n_cols: int, dtype: torch.dtype, with_bias: bool) -> int:
    activation = n_rows * n_cols * dtype.itemsize
    bias = n_cols * dtype.itemsize if with_bias else 0
    if pass_ == "forward":
        return 2 * activation + bias
    if pass_ == "backward":
        return 3 * activation + 2 * bias
    return 5 * activation + 3 * bias


def implementations(ctx: BenchContext) -> tuple[dict, list[str]]:
    # No Liger competitor: Liger-Kernel has GEGLU (a gated product), not a plain GELU.
    return competitors(ctx, eager_gelu, gelu)


def cases(ctx: BenchContext):
    shapes = QUICK_SHAPES if ctx.quick else ctx.gpu_cases(GPU_SHAPES)
    for n_rows, n_cols in shapes:
        for dtype in [torch.float32] if ctx.quick else [torch.bfloat16, torch.float32]:
            for with_bias in (True, False):
                x = torch.randn(n_rows, n_cols, device=ctx.device, dtype=dtype, requires_grad=True)
                bias = torch.randn(n_cols, device=ctx.device, dtype=dtype, requires_grad=True) if with_bias else None
                dy = torch.randn_like(x)
                inputs = (x,) if bias is None else (x, bias)
                yield Case(
                    name=f"({n_rows}, {n_cols})" + (" +bias" if with_bias else ""), dtype=dtype,
                    impls=implementations(ctx)[0],
                    step=lambda pass_, fn, x=x, bias=bias, dy=dy, inputs=inputs: autograd_step(
                        pass_, lambda: fn(x, bias), inputs, dy),
                    bytes_moved=lambda pass_, n_rows=n_rows, n_cols=n_cols, dtype=dtype, with_bias=with_bias: bytes_moved(
                        pass_, n_rows, n_cols, dtype, with_bias),
                )


run = module_runner(__name__)


COLUMNS = BANDWIDTH_COLUMNS

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
