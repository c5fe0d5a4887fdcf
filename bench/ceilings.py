"""The device's two ceilings, measured once per run: every later figure is also a fraction of them.

* Copy bandwidth: a device-to-device copy of a buffer far larger than L2, counted as the bytes
  read plus the bytes written. A memory-bound kernel cannot beat it (bar caching), so a kernel's
  GB/s over it is how close it gets to the roofline.
* Matmul rate: a large square ``torch.matmul`` (cuBLAS), per dtype. Attention, the fused loss and
  the model's MFU are reported against it as well as against the datasheet peak, since no real
  kernel reaches the datasheet figure.

Both are timed by :meth:`BenchContext.time` (median, L2 flushed on a GPU). On the CPU (``--quick``)
the sizes are toys and the figures only exercise the code.
"""

from __future__ import annotations

import torch

from bench.common import BenchContext

# 256 MiB of fp32: far beyond any L2 (the H100's is 50 MB), so the copy streams from HBM.
GPU_COPY_ELEMENTS = 2**26
QUICK_COPY_ELEMENTS = 2**20
# 8192³ keeps an H100 busy for ~1 ms in bf16: long enough that launch overhead is noise.
GPU_MATMUL_SIZE = 8192
QUICK_MATMUL_SIZE = 256
# The dtypes the ceilings are keyed by (``BenchContext.matmul_tflops``): the row dtype names.
# "tfloat32" is fp32 inputs on tensor cores (torch.backends.cuda.matmul.allow_tf32), what the
# training loop enables for its fp32 matmuls; "float32" is exact fp32.
GPU_MATMUL_DTYPES = ("bfloat16", "float16", "tfloat32", "float32")
QUICK_MATMUL_DTYPES = ("float32",)


def copy_bytes(numel: int, element_size: int) -> int:
    """Bytes a copy of ``numel`` elements moves: each is read once and written once."""
    return 2 * numel * element_size


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of an (m, k) @ (k, n) product: one multiply and one add per term."""
    return 2 * m * n * k


def measure_copy_gbps(ctx: BenchContext) -> float:
    numel = QUICK_COPY_ELEMENTS if ctx.quick else GPU_COPY_ELEMENTS
    src = torch.randn(numel, device=ctx.device)
    dst = torch.empty_like(src)
    timing = ctx.time(lambda: dst.copy_(src))
    return copy_bytes(numel, src.element_size()) / (timing.median_ms / 1e3) / 1e9


def measure_matmul_tflops(ctx: BenchContext, dtype_name: str) -> float:
    """The dense matmul rate in ``dtype_name`` (a key of GPU_MATMUL_DTYPES), TFLOP/s."""
    size = QUICK_MATMUL_SIZE if ctx.quick else GPU_MATMUL_SIZE
    dtype = torch.float32 if dtype_name == "tfloat32" else getattr(torch, dtype_name)
    a = torch.randn(size, size, device=ctx.device, dtype=dtype)
    b = torch.randn(size, size, device=ctx.device, dtype=dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype_name == "tfloat32"
    try:
        timing = ctx.time(lambda: torch.matmul(a, b))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return matmul_flops(size, size, size) / (timing.median_ms / 1e3) / 1e12


def measure_ceilings(ctx: BenchContext) -> dict:
    """Measure both ceilings, store them on ``ctx`` (so every row gets its fractions) and return
    them as the results' ``ceilings`` section."""
    ctx.copy_gbps = measure_copy_gbps(ctx)
    dtypes = QUICK_MATMUL_DTYPES if ctx.quick else GPU_MATMUL_DTYPES
    ctx.matmul_tflops = {name: measure_matmul_tflops(ctx, name) for name in dtypes}
    size = QUICK_MATMUL_SIZE if ctx.quick else GPU_MATMUL_SIZE
    copy_mib = (QUICK_COPY_ELEMENTS if ctx.quick else GPU_COPY_ELEMENTS) * 4 / 2**20
    return {
        "copy_gbps": ctx.copy_gbps,
        "matmul_tflops": dict(ctx.matmul_tflops),
        "method": f"copy: {copy_mib:.0f} MiB fp32 device-to-device, bytes read + written; "
                  f"matmul: {size}x{size}x{size} torch.matmul, 2·M·N·K FLOPs; median time",
    }
