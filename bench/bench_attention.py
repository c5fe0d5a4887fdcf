"""Attention benchmark: the Triton FlashAttention-2 vs F.scaled_dot_product_attention (flash backend),
a torch.compile'd naive attention, and flash-attn when it is installed.

Inputs are laid out as in the model: q, k, v are (B, H, T, D) views of one (B, T, 3·H·D) tensor.
FLOPs are the matmuls' (the fewest any exact implementation must do): the forward's two matmuls
``4·B·H·T²·D``, the backward's five ``2.5×`` that, both halved under causal masking (the skipped
upper triangle). Rows carry the fraction of the device's measured bf16 matmul rate.

Cases: GPT-2's shape (B·H = 8·12 and 16·12, T = 1024, D = 64, causal) first, then llama-124m's
grouped-query shape (12 query heads sharing 4 K/V heads, D = 64, T = 1024, causal; q, k and v views of
one (B, T, (12 + 2·4)·64) projection, K/V never repeated but by the naive row), then a sweep of T from
512 to 8192 at D = 64 and 128, causal and not, with B·T = 16k tokens and H·D = 2048 (the FlashAttention
papers' sweep), and last T = 16384. Every row reports ``first_call_s``, its first call's wall time
(compilation, Triton JIT, autotuning), which the timing leaves out; an implementation that fails on a
case (out of memory, a compilation error) is a row with its error.

``python -m bench.bench_attention [--quick]``: on a GPU, bf16; ``--quick`` (or no GPU) one toy case
on the CPU through Triton's interpreter, which only checks the harness.
"""

from __future__ import annotations

import contextlib
import math
import sys

import torch
import torch.nn.functional as F

from bench.common import BenchContext, Case, add_triton, autograd_step, run_cases, run_standalone
from gpt_kernels.attention import attention

OP = "attention"
# (B, H, T, D, causal). GPT-2's shapes first: the rows that matter most are measured first.
# A sixth field, when present, is the number of K/V heads (grouped-query attention).
GPT2_CASES = [(8, 12, 1024, 64, True), (16, 12, 1024, 64, True)]
GQA_CASES = [(8, 12, 1024, 64, True, 4)]  # llama-124m
# The sweep is T = 512…8192; T = 16384 comes after all of it, the first to go if a run is cut
# short. It is cheap: no torch.compile row past NAIVE_MAX_T and no new Triton compilation (T is not a
# constexpr), so its four cases add two or three implementations × three passes of timed rows, each a
# fraction of a second of do_bench (with GPT_ATTENTION_AUTOTUNE=1, one more autotuning per kernel and case).
SWEEP_LENGTHS = (512, 1024, 2048, 4096, 8192)
LONGEST = 16384
SWEEP_TOKENS, SWEEP_WIDTH = 16 * 1024, 2048  # B·T and H·D of every sweep case


def _sweep_case(T: int, D: int, causal: bool) -> tuple:
    return (SWEEP_TOKENS // T, SWEEP_WIDTH // D, T, D, causal)


SWEEP_CASES = [_sweep_case(T, D, causal) for D in (64, 128) for causal in (True, False) for T in SWEEP_LENGTHS]
SWEEP_CASES += [_sweep_case(LONGEST, D, causal) for D in (64, 128) for causal in (True, False)]
# One grouped-query toy case: it takes the GQA path of every row (the MHA path is the same code).
QUICK_CASES = [(1, 4, 48, 16, True, 2)]
# The naive attention materializes B·H·T² scores: past this length it only measures the allocator.
NAIVE_MAX_T = 4096


def attention_flops(pass_: str, B: int, H: int, T: int, D: int, causal: bool) -> float:
    forward = 4.0 * B * H * T * T * D * (0.5 if causal else 1.0)
    return {"forward": forward, "backward": 2.5 * forward, "forward+backward": 3.5 * forward}[pass_]


def naive_attention(q, k, v, causal=True):
    """Attention as written in a textbook: the T×T scores in memory, softmax in fp32 (K/V repeated
    to the query heads under grouped-query attention)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        T = q.shape[-2]
        above = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def sdpa(q, k, v, causal=True):
    if k.shape[1] != q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


try:
    from flash_attn import flash_attn_func

    FLASH_ATTN_MISSING = None
except Exception as e:  # noqa: BLE001 - not installed, or built for another torch/CUDA: no flash_attn rows
    flash_attn_func = None
    FLASH_ATTN_MISSING = f"flash_attn: not importable ({type(e).__name__}: {e})"


def flash_attn(q, k, v, causal=True):
    """flash-attn's own kernel, which takes (B, T, H, D): the model's views transposed, no copy."""
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
    return out.transpose(1, 2)


def implementations(ctx: BenchContext) -> tuple[dict, list[str]]:
    """The competitors that can run on ``ctx.device`` (fresh ones: call once per case), and why any
    others cannot."""
    impls, skipped = {"sdpa": sdpa}, []  # sdpa first: the baseline; on the GPU run() forces its flash backend
    add_triton(ctx, impls, skipped, attention)
    if ctx.compiles:
        torch._dynamo.reset()  # a fresh cache per case, so no case falls back to eager past the recompile limit
        impls["torch.compile naive"] = torch.compile(naive_attention, fullgraph=True, dynamic=False)
    elif not ctx.is_gpu:
        skipped.append("torch.compile naive: skipped on the CPU quick mode (compiling takes longer than the whole run)")
    if ctx.is_gpu and flash_attn_func is not None:
        impls["flash_attn"] = flash_attn
    elif ctx.is_gpu:
        skipped.append(FLASH_ATTN_MISSING)
    return impls, skipped


def model_layout_inputs(B, H, T, D, dtype, device, kv_heads=None):
    """q, k, v as the model makes them: views of the fused c_attn output ([q | k | v], k and v with
    ``kv_heads`` heads, default H), with their gradient dO."""
    heads = (H, kv_heads or H, kv_heads or H)
    qkv = torch.randn(B, T, sum(heads) * D, device=device, dtype=dtype, requires_grad=True)
    q, k, v = (t.view(B, T, n, D).transpose(1, 2) for t, n in zip(qkv.split([n * D for n in heads], dim=2), heads))
    return q, k, v, torch.randn(B, H, T, D, device=device, dtype=dtype)


def run(ctx: BenchContext) -> list[dict]:
    with contextlib.ExitStack() as stack:
        if ctx.is_gpu:
            # SDPA's flash backend, forced: the target compares against it. (Set once here,
            # not per call, so the switch costs nothing inside the timed loop.) The CPU picks its own.
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
        return run_cases(ctx, OP, cases(ctx), implementations(ctx)[1])


def cases(ctx: BenchContext):
    shapes = QUICK_CASES if ctx.quick else ctx.gpu_cases(GPT2_CASES + GQA_CASES + SWEEP_CASES, gpt2=len(GPT2_CASES))
    dtype = torch.float32 if ctx.quick else torch.bfloat16
    for B, H, T, D, causal, *kv_heads in shapes:
        Hkv = kv_heads[0] if kv_heads else H
        q, k, v, do = model_layout_inputs(B, H, T, D, dtype, ctx.device, Hkv)
        heads = f"H{H}" if Hkv == H else f"H{H}/{Hkv}kv"
        yield Case(
            name=f"B{B} {heads} T{T} D{D} {'causal' if causal else 'full'}", dtype=dtype, impls=implementations(ctx)[0],
            step=lambda pass_, fn, q=q, k=k, v=v, do=do, causal=causal: autograd_step(
                pass_, lambda: fn(q, k, v, causal=causal), (q, k, v), do),
            flops=lambda pass_, B=B, H=H, T=T, D=D, causal=causal: attention_flops(pass_, B, H, T, D, causal),
            baselines=("sdpa",), columns=dict(B=B, H=H, T=T, D=D, causal=causal, kv_heads=Hkv),
            skip=lambda pass_, impl, T=T: impl == "torch.compile naive" and T > NAIVE_MAX_T,
        )


COLUMNS = ["case", "dtype", "pass", "impl", "median_ms", "tflop_per_s", "fraction_of_matmul", "speedup_vs_sdpa",
           "peak_memory_mb", "first_call_s", "error"]

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
