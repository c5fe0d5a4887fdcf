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

from bench.common import BenchContext, Case, autograd_step, competitors, run_cases, run_standalone
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

    def liger(x, weight, eps=EPS, residual=None):
        if residual is not None:
            x = x + residual
            return LigerRMSNormFunction.apply(x, weight, eps), x
        return LigerRMSNormFunction.apply(x, weight, eps)

    return liger


def bytes_moved(pass_: str, n_rows: int, n_cols: int, dtypes, with_residual: bool) -> int:
    x_dtype, residual_dtype, weight_dtype = dtypes
    stream_size = (torch.promote_types(x_dtype, residual_dtype) if with_residual else x_dtype).itemsize
    x_size, residual_size = x_dtype.itemsize, residual_dtype.itemsize
    m, weight = n_rows * n_cols, n_cols * weight_dtype.itemsize
    if with_residual:
        forward = m * (x_size + residual_size + 2 * stream_size) + weight
        dresidual = residual_size if residual_dtype != x_dtype else 0
        backward = m * (3 * stream_size + x_size + dresidual) + 2 * weight
    else:
        forward = m * 2 * x_size + weight
        backward = m * 3 * x_size + 2 * weight
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[pass_]


def implementations(ctx: BenchContext, with_residual: bool) -> tuple[dict, list[str]]:
    # Liger's RMSNorm has no fused residual: it competes on the plain case only.
    installed = {} if with_residual else {"liger": _liger_rmsnorm}
    return competitors(ctx, eager_rmsnorm, rmsnorm, installed)


def cases(ctx: BenchContext):
    shapes = QUICK_SHAPES if ctx.quick else ctx.gpu_cases(GPU_SHAPES)
    for n_rows, n_cols in shapes:
        for dtypes in QUICK_DTYPES if ctx.quick else GPU_DTYPES:
            x_dtype, residual_dtype, weight_dtype = dtypes
            dtype_name = str(x_dtype).replace("torch.", "") + ("" if len(set(dtypes)) == 1 else "+fp32")
            for with_residual in (False, True):
                if not with_residual and len(set(dtypes)) > 1:
                    continue  # the mixed case exists only with the residual stream

                def randn(*shape, dtype, requires_grad=True):
                    return torch.randn(shape, device=ctx.device, dtype=dtype, requires_grad=requires_grad)

                x, weight = randn(n_rows, n_cols, dtype=x_dtype), randn(n_cols, dtype=weight_dtype)
                residual = randn(n_rows, n_cols, dtype=residual_dtype) if with_residual else None
                stream_dtype = torch.promote_types(x_dtype, residual_dtype) if with_residual else x_dtype
                grads = [randn(n_rows, n_cols, dtype=stream_dtype, requires_grad=False)
                         for _ in range(2 if with_residual else 1)]
                leaves = [t for t in (x, residual, weight) if t is not None]

                def step(pass_, fn, x=x, residual=residual, weight=weight, grads=grads, leaves=leaves):
                    def forward():
                        out = fn(x, weight, EPS, residual=residual)
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
