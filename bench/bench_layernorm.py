"""LayerNorm benchmark: the Triton op vs eager PyTorch, torch.compile and Liger-Kernel, at GPT-2 shapes.

Rows are B·T tokens (8·1024 and 16·1024), widths GPT-2's n_embd (768, 1024, 1280, 1600). Each shape
runs plain (``F.layer_norm(x, w, b)``) and with the fused residual (the model's path,
``layernorm(branch, w, b, residual=stream)`` against the eager pair ``s = branch + stream;
F.layer_norm(s)``), in bf16 and fp32, and on the GPU also as the model runs under bf16 autocast: a
bf16 branch, an fp32 stream and fp32 parameters ("bf16+fp32").

Bytes are the fewest each pass must move, whatever an implementation actually moves (M = rows·width
elements; the per-row mean/rstd, 8 bytes a row, are left out):

* forward: read x (and the residual), write y (and the stream), read weight and bias;
* backward: read dy, the normalized stream (and the stream's own gradient); write dx (and
  dresidual when its dtype differs from dx's: otherwise it is the same tensor); read weight,
  write dweight and dbias;
* forward+backward: both.

So the fused residual's saving is visible as the eager pair's lower GB/s: it moves one more M-sized
tensor forward (writes the stream, then reads it back) than the bytes counted.

``python -m bench.bench_layernorm [--quick]``: on a GPU the shapes above; ``--quick`` (or no GPU) a
toy size on the CPU through Triton's interpreter, which only checks the harness.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.common import (BANDWIDTH_COLUMNS, BenchContext, competitors, module_runner, residual_norm_bytes,
                          residual_norm_cases, run_standalone, with_unfused_residual)
from gpt_kernels.layernorm import layernorm

OP = "layernorm"
EPS = 1e-5
GPU_SHAPES = [(rows, width) for rows in (8 * 1024, 16 * 1024) for width in (768, 1024, 1280, 1600)]
QUICK_SHAPES = [(16, 256)]
# (x dtype, residual/stream dtype, parameter dtype); the last is the model under bf16 autocast.
GPU_DTYPES = [(torch.bfloat16,) * 3, (torch.float32,) * 3, (torch.bfloat16, torch.float32, torch.float32)]
QUICK_DTYPES = [(torch.float32,) * 3]


def eager_layer_norm(x, weight, bias, eps=EPS, residual=None):
    """The unfused baseline: the residual add (one full pass) and then F.layer_norm (another)."""
    if residual is None:
        return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    stream = x + residual
    return F.layer_norm(stream, (x.shape[-1],), weight, bias, eps), stream


def _liger_layer_norm():
    """Liger-Kernel's LayerNorm (no residual); ImportError when it is not installed."""
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    return with_unfused_residual(LigerLayerNormFunction.apply)


def bytes_moved(pass_: str, n_rows: int, n_cols: int, dtypes, with_residual: bool) -> int:
    return residual_norm_bytes(pass_, n_rows, n_cols, dtypes, with_residual, n_params=2)


def implementations(ctx: BenchContext, with_residual: bool = False) -> tuple[dict, list[str]]:
    # Liger's LayerNorm has no fused residual: it competes on the plain case only.
    installed = {} if with_residual else {"liger": _liger_layer_norm}
    return competitors(ctx, eager_layer_norm, layernorm, installed)


def cases(ctx: BenchContext):
    shapes = QUICK_SHAPES if ctx.quick else ctx.gpu_cases(GPU_SHAPES)
    dtypes = QUICK_DTYPES if ctx.quick else GPU_DTYPES
    return residual_norm_cases(ctx, shapes, dtypes, 2, EPS, implementations)


run = module_runner(__name__)


COLUMNS = BANDWIDTH_COLUMNS

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
