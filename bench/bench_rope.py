"""RoPE benchmark: the Triton op vs eager PyTorch, torch.compile and Liger-Kernel, at Llama shapes.

q and k are the model's: views of one (B, T, (Hq + 2·Hkv)·D) projection output, (B, T, H, D) with
strides, at llama-124m's heads (12 query, 4 key/value, D = 64) and llama-1b's (32/8, D = 64), B·T =
16·1024 tokens, positions (T,). Bytes are the fewest each pass must move (E = B·T·(Hq + Hkv)·D
elements; the cos/sin rows, shared by the batch, left out):

* forward: read q and k, write q_rot and k_rot (2E);
* backward: read the two gradients, write dq and dk (2E);
* forward+backward: both.

Liger-Kernel's RoPE (``LigerRopeFunction``) takes (B, H, T, D) tensors and HF's duplicated (T, D)
tables: it gets (B, H, T, D) transposes (views) and the duplicated rows, gathered in the call.

``python -m bench.bench_rope [--quick]``: on a GPU the shapes above in bf16 and fp32; ``--quick`` (or no
GPU) a toy size on the CPU through Triton's interpreter, which only checks the harness.
"""

from __future__ import annotations

import sys

import torch

from bench.common import (BANDWIDTH_COLUMNS, BenchContext, Case, autograd_step, competitors, module_runner,
                          run_standalone)
from gpt_kernels.rope import rope, rope_reference, rope_table

OP = "rope"
THETA = 10000.0
# (B, T, Hq, Hkv, D)
GPU_SHAPES = [(16, 1024, 12, 4, 64), (8, 2048, 32, 8, 64)]
QUICK_SHAPES = [(1, 8, 4, 2, 16)]


def _liger_rope():
    """Liger-Kernel's RoPE on (B, H, T, D) transposes; ImportError when it is not installed."""
    from liger_kernel.ops.rope import LigerRopeFunction

    def liger(q, k, cos, sin, positions):
        full_cos, full_sin = (torch.cat([t, t], dim=-1)[positions][None] for t in (cos, sin))
        q_rot, k_rot = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), full_cos, full_sin)
        return q_rot.transpose(1, 2), k_rot.transpose(1, 2)

    return liger


def bytes_moved(pass_: str, batch: int, seq: int, q_heads: int, kv_heads: int, head_dim: int,
                dtype: torch.dtype) -> int:
    elements = batch * seq * (q_heads + kv_heads) * head_dim
    one_way = 2 * elements * dtype.itemsize
    return {"forward": one_way, "backward": one_way, "forward+backward": 2 * one_way}[pass_]


def implementations(ctx: BenchContext) -> tuple[dict, list[str]]:
    return competitors(ctx, rope_reference, rope, {"liger": _liger_rope})


def cases(ctx: BenchContext):
    shapes = QUICK_SHAPES if ctx.quick else ctx.gpu_cases(GPU_SHAPES)
    for B, T, Hq, Hkv, D in shapes:
        for dtype in [torch.float32] if ctx.quick else [torch.bfloat16, torch.float32]:
            qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=ctx.device, dtype=dtype)
            q, k, _ = qkv.split([Hq * D, Hkv * D, Hkv * D], dim=2)
            q, k = q.view(B, T, Hq, D).requires_grad_(), k.view(B, T, Hkv, D).requires_grad_()
            cos, sin = rope_table(T, D, THETA, ctx.device)
            positions = torch.arange(T, device=ctx.device)
            grads = [torch.randn(B, T, H, D, device=ctx.device, dtype=dtype) for H in (Hq, Hkv)]

            def step(pass_, fn, q=q, k=k, cos=cos, sin=sin, positions=positions, grads=grads):
                return autograd_step(pass_, lambda: list(fn(q, k, cos, sin, positions)), (q, k), grads)

            yield Case(
                name=f"B{B} T{T} H{Hq}/{Hkv} D{D}", dtype=dtype, impls=implementations(ctx)[0], step=step,
                bytes_moved=lambda pass_, shape=(B, T, Hq, Hkv, D), dtype=dtype: bytes_moved(pass_, *shape, dtype),
            )


run = module_runner(__name__)


COLUMNS = BANDWIDTH_COLUMNS

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
