"""RMSNorm benchmark: the Triton op vs eager PyTorch, torch.compile and Liger-Kernel, at Llama shapes.

Rows are B·T tokens (16·1024), widths the llama presets' (768 for llama-124m, 2048 for llama-1b) and
4096. Each shape runs plain (``rmsnorm(x, w)``) and with the fused residual (the model's path,
``rmsnorm(branch, w, residual=stream)`` against the eager pair ``s = branch + stream; rmsnorm(s)``), in
bf16 and fp32, and on the GPU also as the model runs under bf16 autocast: a bf16 branch, an fp32
stream and an fp32 weight ("bf16+fp32").

Bytes are the fewest each pass must move (M = rows·width elements; rstd, 4 bytes a row, left out):

* forward: read x (and the residual), write y (and the stream), read the weight;
* backward: read dy and the normalized stream (and the stream's own gradient); write dx (and
  dresidual when its dtype differs from dx's); read the weight, write dweight;
* forward+backward: both.

``python -m bench.bench_rmsnorm [--quick]``: on a GPU the shapes above; ``--quick`` (or no GPU) a toy
size on the CPU through Triton's interpreter, which only checks the harness.
"""

from __future__ import annotations

import sys

import torch

from bench.common import (BANDWIDTH_COLUMNS, BenchContext, competitors, module_runner, residual_norm_bytes,
                          residual_norm_cases, run_standalone, with_unfused_residual)
from gpt_kernels.rmsnorm import rmsnorm, rmsnorm_reference

OP = "rmsnorm"
EPS = 1e-5
GPU_SHAPES = [(16 * 1024, width) for width in (768, 2048, 4096)]
QUICK_SHAPES = [(16, 256)]
# (x dtype, residual/stream dtype, weight dtype); the last is the model under bf16 autocast.
GPU_DTYPES = [(torch.bfloat16,) * 3, (torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32)]
QUICK_DTYPES = [(torch.float32,) * 3]


def eager_rmsnorm(x, weight, eps=EPS, residual=None):
    """The unfused baseline: the residual add (one full pass) and then Hugging Face's RMSNorm math."""
    return rmsnorm_reference(x, weight, eps, residual=residual)


def _liger_rmsnorm():
    """Liger-Kernel's RMSNorm (no residual, Llama's casting); ImportError when it is not installed."""
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return with_unfused_residual(LigerRMSNormFunction.apply)


def bytes_moved(pass_: str, n_rows: int, n_cols: int, dtypes, with_residual: bool) -> int:
    return residual_norm_bytes(pass_, n_rows, n_cols, dtypes, with_residual, n_params=1)


def implementations(ctx: BenchContext, with_residual: bool = False) -> tuple[dict, list[str]]:
    # Liger's RMSNorm has no fused residual: it competes on the plain case only.
    installed = {} if with_residual else {"liger": _liger_rmsnorm}
    return competitors(ctx, eager_rmsnorm, rmsnorm, installed)


def cases(ctx: BenchContext):
    shapes = QUICK_SHAPES if ctx.quick else ctx.gpu_cases(GPU_SHAPES)
    dtypes = QUICK_DTYPES if ctx.quick else GPU_DTYPES
    return residual_norm_cases(ctx, shapes, dtypes, 1, EPS, implementations)


run = module_runner(__name__)


COLUMNS = BANDWIDTH_COLUMNS

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
