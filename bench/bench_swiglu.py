"""SwiGLU benchmark: the Triton op vs eager PyTorch, torch.compile and Liger-Kernel, at Llama MLP shapes.

The input is the fused gate/up projection's output, ``(B·T, 2·hidden)``: llama-124m's hidden 2048 and
llama-1b's 8192, at 16·1024 tokens (8·1024 for the wider one). Bytes are the fewest each pass must
move (M = rows·hidden elements):

* forward: read gate and up (2M), write the product (M);
* backward: read dy (M) and gate_up (2M), write d(gate_up) (2M);
* forward+backward: both (the forward's output is not needed by the backward).

Liger-Kernel's SwiGLU takes gate and up as two tensors (``LigerSiLUMulFunction``): it gets the two
halves of the same fused tensor, views, as the model has them.

``python -m bench.bench_swiglu [--quick]``: on a GPU the shapes above in bf16 and fp32; ``--quick``
(or no GPU) a toy size on the CPU through Triton's interpreter, which only checks the harness.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.common import (BANDWIDTH_COLUMNS, BenchContext, Case, autograd_step, competitors, module_runner,
                          run_standalone)
from gpt_kernels.swiglu import swiglu

OP = "swiglu"
GPU_SHAPES = [(16 * 1024, 2 * 2048), (8 * 1024, 2 * 8192)]
QUICK_SHAPES = [(64, 2 * 192)]


def eager_swiglu(gate_up):
    """The eager baseline: ``F.silu(gate) * up`` on the two halves, in the input's dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _liger_swiglu():
    """Liger-Kernel's SiLU-mul on the two halves; ImportError when it is not installed."""
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    def liger(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return LigerSiLUMulFunction.apply(gate, up)

    return liger


def bytes_moved(pass_: str, n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    m = n_rows * n_cols // 2 * dtype.itemsize
    forward, backward = 3 * m, 5 * m
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[pass_]


def implementations(ctx: BenchContext) -> tuple[dict, list[str]]:
    return competitors(ctx, eager_swiglu, swiglu, {"liger": _liger_swiglu})


def cases(ctx: BenchContext):
    shapes = QUICK_SHAPES if ctx.quick else ctx.gpu_cases(GPU_SHAPES)
    for n_rows, n_cols in shapes:
        for dtype in [torch.float32] if ctx.quick else [torch.bfloat16, torch.float32]:
            gate_up = torch.randn(n_rows, n_cols, device=ctx.device, dtype=dtype, requires_grad=True)
            dy = torch.randn(n_rows, n_cols // 2, device=ctx.device, dtype=dtype)
            yield Case(
                name=f"({n_rows}, {n_cols})", dtype=dtype, impls=implementations(ctx)[0],
                step=lambda pass_, fn, gate_up=gate_up, dy=dy: autograd_step(pass_, lambda: fn(gate_up), (gate_up,), dy),
                bytes_moved=lambda pass_, n_rows=n_rows, n_cols=n_cols, dtype=dtype: bytes_moved(
                    pass_, n_rows, n_cols, dtype),
            )


run = module_runner(__name__)


COLUMNS = BANDWIDTH_COLUMNS

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
