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

from bench.common import BenchContext, Case, autograd_step, competitors, run_cases, run_standalone
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

    def liger(x, weight, bias, eps=EPS, residual=None):
        if residual is not None:
            x = x + residual
            return LigerLayerNormFunction.apply(x, weight, bias, eps), x
        return LigerLayerNormFunction.apply(x, weight, bias, eps)

    return liger


def bytes_moved(pass_: str, n_rows: int, n_cols: int, dtypes, with_residual: bool) -> int:
    x_dtype, residual_dtype, param_dtype = dtypes
    stream_size = (torch.promote_types(x_dtype, residual_dtype) if with_residual else x_dtype).itemsize
    x_size, residual_size = x_dtype.itemsize, residual_dtype.itemsize
    m, params = n_rows * n_cols, n_cols * param_dtype.itemsize
    if with_residual:
        forward = m * (x_size + residual_size + 2 * stream_size) + 2 * params
        dresidual = residual_size if residual_dtype != x_dtype else 0
        backward = m * (3 * stream_size + x_size + dresidual) + 3 * params
    else:
        forward = m * 2 * x_size + 2 * params
        backward = m * 3 * x_size + 3 * params
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[pass_]


def implementations(ctx: BenchContext, with_residual: bool) -> tuple[dict, list[str]]:
    # Liger's LayerNorm has no fused residual: it competes on the plain case only.
    installed = {} if with_residual else {"liger": _liger_layer_norm}
    return competitors(ctx, eager_layer_norm, layernorm, installed)


def cases(ctx: BenchContext):
    shapes = QUICK_SHAPES if ctx.quick else ctx.gpu_cases(GPU_SHAPES)
    for n_rows, n_cols in shapes:
        for dtypes in QUICK_DTYPES if ctx.quick else GPU_DTYPES:
            x_dtype, residual_dtype, param_dtype = dtypes
            dtype_name = str(x_dtype).replace("torch.", "") + ("" if len(set(dtypes)) == 1 else "+fp32")
            for with_residual in (False, True):
                if not with_residual and len(set(dtypes)) > 1:
                    continue  # the mixed case exists only with the residual stream

                def randn(*shape, dtype, requires_grad=True):
                    return torch.randn(shape, device=ctx.device, dtype=dtype, requires_grad=requires_grad)

                x, weight, bias = randn(n_rows, n_cols, dtype=x_dtype), randn(n_cols, dtype=param_dtype), \
                    randn(n_cols, dtype=param_dtype)
                residual = randn(n_rows, n_cols, dtype=residual_dtype) if with_residual else None
                stream_dtype = torch.promote_types(x_dtype, residual_dtype) if with_residual else x_dtype
                grads = [randn(n_rows, n_cols, dtype=stream_dtype, requires_grad=False)
                         for _ in range(2 if with_residual else 1)]
                leaves = [t for t in (x, residual, weight, bias) if t is not None]

                def step(pass_, fn, x=x, residual=residual, weight=weight, bias=bias, grads=grads, leaves=leaves):
                    def forward():
                        out = fn(x, weight, bias, EPS, residual=residual)
                        return list(out) if isinstance(out, tuple) else [out]
                    return autograd_step(pass_, forward, leaves, grads)

                yield Case(
                    name=f"({n_rows}, {n_cols})" + (" +residual" if with_residual else ""), dtype=dtype_name,
                    impls=implementations(ctx, with_residual)[0], step=step,
                    bytes_moved=lambda pass_, n_rows=n_rows, n_cols=n_cols, dtypes=dtypes, r=with_residual: bytes_moved(
                        pass_, n_rows, n_cols, dtypes, r),
                )


def run(ctx: BenchContext) -> list[dict]:
    return run_cases(ctx, OP, cases(ctx), implementations(ctx, False)[1])


COLUMNS = ["case", "dtype", "pass", "impl", "median_ms", "gb_per_s", "fraction_of_copy_bw", "speedup_vs_eager",
           "speedup_vs_compile", "first_call_s", "error"]

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
