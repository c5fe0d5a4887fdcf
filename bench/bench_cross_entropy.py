"""Cross-entropy benchmark: the Triton op vs eager ``F.cross_entropy``, ``torch.compile`` and Liger-Kernel.

Logits are ``(B·T, 50304)`` for B·T = 8·1024 and 16·1024 tokens (GPT-2's padded vocabulary), plus
the model's own call, a ``[:, :50257]`` view of them. Passes, and the fewest bytes each must move:

* forward (no gradient: evaluation): read the logits;
* forward+backward (training): read the logits, write their gradient. With ``loss.backward()`` the
  upstream gradient is 1 and our backward has nothing to do; the ``upstream=0.5`` case (gradient
  accumulation) shows the cost of scaling the gradient in the backward.

``python -m bench.bench_cross_entropy [--quick]``: on a GPU, GPT-2 shapes in bf16 and fp32;
``--quick`` (or no GPU) a toy size on the CPU through Triton's interpreter, which only checks the harness.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.common import BenchContext, Case, competitors, module_runner, run_standalone
from gpt_kernels.cross_entropy import cross_entropy

OP = "cross_entropy"
PADDED_VOCAB, VOCAB = 50304, 50257
# (rows, columns of the tensor, columns the loss sees): the benchmark's shapes and the model's view.
GPU_CASES = [(8192, PADDED_VOCAB, PADDED_VOCAB), (16384, PADDED_VOCAB, PADDED_VOCAB), (16384, PADDED_VOCAB, VOCAB)]
QUICK_CASES = [(8, 1024, 1000)]


def eager_cross_entropy(logits, targets):
    return F.cross_entropy(logits, targets)


def bytes_moved(pass_: str, n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    logits = n_rows * n_cols * dtype.itemsize
    return logits if pass_ == "forward" else 2 * logits


def _pass_fn(pass_: str, fn, n_rows, n_cols, n_classes, dtype, targets, upstream):
    """A no-argument callable running ``pass_`` once: the forward without autograd (evaluation), or
    forward and backward for an upstream gradient of ``upstream``. Fresh logits for each competitor:
    Liger writes its gradient over the logits it is given."""
    full = (torch.randn(n_rows, n_cols, device=targets.device) * 4).to(dtype).requires_grad_()
    logits = full[:, :n_classes] if n_classes != n_cols else full
    if pass_ == "forward":
        def step():
            with torch.no_grad():
                return fn(logits, targets)
        return step
    grad_out = torch.tensor(upstream, device=full.device)
    return lambda: torch.autograd.grad(fn(logits, targets), full, grad_out)


def implementations(ctx: BenchContext) -> tuple[dict, list[str]]:
    def liger():
        from liger_kernel.transformers.functional import liger_cross_entropy

        return lambda logits, targets: liger_cross_entropy(logits, targets)

    return competitors(ctx, eager_cross_entropy, cross_entropy, {"liger": liger})


def cases(ctx: BenchContext):
    shapes = QUICK_CASES if ctx.quick else ctx.gpu_cases(GPU_CASES)
    for n_rows, n_cols, n_classes in shapes:
        for dtype in [torch.float32] if ctx.quick else [torch.bfloat16, torch.float32]:
            targets = torch.randint(0, n_classes, (n_rows,), device=ctx.device)
            shape = f"({n_rows}, {n_cols})" + (f"[:, :{n_classes}]" if n_classes != n_cols else "")
            for upstream, passes in ((1.0, ("forward", "forward+backward")), (0.5, ("forward+backward",))):
                yield Case(
                    name=shape + (f" upstream={upstream:g}" if upstream != 1.0 else ""), dtype=dtype,
                    impls=implementations(ctx)[0], passes=passes, baselines=("eager",),
                    step=lambda pass_, fn, a=(n_rows, n_cols, n_classes, dtype, targets, upstream): _pass_fn(
                        pass_, fn, *a),
                    bytes_moved=lambda pass_, n_rows=n_rows, n_classes=n_classes, dtype=dtype: bytes_moved(
                        pass_, n_rows, n_classes, dtype),
                )


run = module_runner(__name__)


COLUMNS = ["case", "dtype", "pass", "impl", "median_ms", "gb_per_s", "fraction_of_copy_bw", "speedup_vs_eager",
           "peak_memory_mb", "first_call_s", "error"]

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
