"""Decode-attention benchmark: the Triton flash-decoding kernel vs SDPA, and generation's tokens/s.

Kernel rows: one query row per sequence against a KV cache of T positions, GPT-2's heads (H = 12,
D = 64), T up to 8192. Every row of the batch is at full length T, so SDPA without a mask does
exactly the kernel's work on its best (flash / memory-efficient) backend; ``sdpa-masked`` is the
PyTorch reference, which a batch of different lengths needs (a boolean mask, math backend),
``torch.compile`` compiles that reference, and flash-attn's ``flash_attn_with_kvcache`` (its own
split-KV decode) runs when installed. Bytes are the fewest the step must move: K and V read once,
2·B·H·T·D elements (q and the output are noise).

Generation rows (pass ``generate``): tokens/s of greedy generation of a randomly initialized model
(speed does not depend on the weights), a batch of prompts of different lengths, with the KV cache
and without it, with every Triton kernel (so the prefill runs the Triton attention and each step
the decode kernel) and with none. GPT-2 124M in bf16 on a GPU; a toy model on the CPU.

``python -m bench.bench_decode_attention [--quick]``: on a GPU the sizes above; ``--quick`` (or
no GPU) toy sizes on the CPU through Triton's interpreter, which only checks the harness.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.common import BenchContext, Case, add_triton, run_cases, run_standalone
from gpt.config import GPTConfig, preset
from gpt.generate import generate_tokens
from gpt.model import GPT
from gpt.training import autocast
from gpt_kernels import registry
from gpt_kernels.decode_attention import decode_attention, decode_attention_reference

try:
    from flash_attn import flash_attn_with_kvcache

    FLASH_ATTN_MISSING = None
except Exception as e:  # noqa: BLE001 - not installed, or built for another torch/CUDA: no flash-attn rows
    flash_attn_with_kvcache = None
    FLASH_ATTN_MISSING = f"flash-attn: not importable ({type(e).__name__}: {e})"

OP = "decode_attention"
HEADS, HEAD_DIM = 12, 64
# (B, T): one long sequence (the case flash-decoding exists for), a small batch, a serving-sized batch.
GPU_CASES = [(1, 1024), (1, 4096), (1, 8192), (8, 2048), (8, 8192), (64, 1024)]
QUICK_CASES = [(2, 64)]
GPU_GENERATION = dict(config=preset("gpt2"), prompt_lengths=(64, 40, 17, 64), new_tokens=128, dtype=torch.bfloat16)
QUICK_GENERATION = dict(config=GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32),
                        prompt_lengths=(5, 3), new_tokens=4, dtype=torch.float32)


def sdpa(q, k, v, lengths):
    """Every row at full length: no mask, so SDPA may pick its flash or memory-efficient kernel."""
    return F.scaled_dot_product_attention(q, k, v)


def flash_attn_decode(q, k, v, lengths):
    """flash-attn's decode kernel, which takes (B, T, H, D) layouts and int32 lengths."""
    out = flash_attn_with_kvcache(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                  cache_seqlens=lengths.int())
    return out.transpose(1, 2)


def implementations(ctx: BenchContext) -> tuple[dict, list[str]]:
    impls, skipped = {"sdpa": sdpa, "sdpa-masked": decode_attention_reference}, []
    add_triton(ctx, impls, skipped, decode_attention)
    if ctx.compiles:
        torch._dynamo.reset()
        impls["torch.compile"] = torch.compile(decode_attention_reference, dynamic=False)
    if ctx.is_gpu:
        if flash_attn_with_kvcache is not None:
            impls["flash-attn"] = flash_attn_decode
        else:
            skipped.append(FLASH_ATTN_MISSING)
    else:
        skipped.append("torch.compile: skipped on the CPU quick mode (compiling takes longer than the whole run)")
    return impls, skipped


def kernel_cases(ctx: BenchContext):
    heads, head_dim = (2, 16) if ctx.quick else (HEADS, HEAD_DIM)
    for B, T in QUICK_CASES if ctx.quick else ctx.gpu_cases(GPU_CASES):
        for dtype in [torch.float32] if ctx.quick else [torch.bfloat16, torch.float16]:
            q = torch.randn(B, heads, 1, head_dim, device=ctx.device, dtype=dtype)
            k = torch.randn(B, heads, T, head_dim, device=ctx.device, dtype=dtype)
            v = torch.randn(B, heads, T, head_dim, device=ctx.device, dtype=dtype)
            lengths = torch.full((B,), T, device=ctx.device, dtype=torch.int32)
            yield Case(
                name=f"B={B} H={heads} T={T} D={head_dim}", dtype=dtype, impls=implementations(ctx)[0],
                step=lambda pass_, fn, args=(q, k, v, lengths): lambda: fn(*args), passes=("forward",),
                bytes_moved=lambda pass_, n=2 * B * heads * T * head_dim * dtype.itemsize: n, baselines=("sdpa",),
            )


def generation_case(ctx: BenchContext) -> Case:
    setup = QUICK_GENERATION if ctx.quick else GPU_GENERATION
    config, dtype, new_tokens = setup["config"], setup["dtype"], setup["new_tokens"]
    torch.manual_seed(0)
    model = GPT(config).to(ctx.device).eval()
    prompts = [torch.randint(0, config.vocab_size, (n,)).tolist() for n in setup["prompt_lengths"]]

    def generate(kernels: str, use_cache: bool):
        def run():
            with registry.use_kernels(kernels), autocast(torch.device(ctx.device), dtype):
                generate_tokens(model, prompts, new_tokens, temperature=0.0, use_kv_cache=use_cache)
        return run

    # The interpreter would take minutes for a whole model on Triton: the quick mode runs the references.
    impls = {("kv-cache" if use_cache else "no-cache") + ("+triton" if kernels == "all" else "+torch"):
             generate(kernels, use_cache) for kernels in (["none"] if ctx.quick else ["all", "none"])
             for use_cache in (True, False)}
    return Case(
        name=f"generate L={config.n_layer} C={config.n_embd} B={len(prompts)} new={new_tokens}", dtype=dtype,
        impls=impls, step=lambda pass_, run: run, passes=("generate",), baselines=(), memory=False,
        row_columns=lambda measured, _: dict(tokens_per_s=len(prompts) * new_tokens / (measured.timing.median_ms / 1e3)),
    )


def run(ctx: BenchContext) -> list[dict]:
    # The generation rows time whole models, not the op at its shape: left out of a GPT-2-only pass.
    rows = run_cases(ctx, OP, kernel_cases(ctx), implementations(ctx)[1])
    return rows if ctx.gpt2_only else rows + run_cases(ctx, OP, [generation_case(ctx)])


COLUMNS = ["case", "dtype", "impl", "median_ms", "gb_per_s", "fraction_of_copy_bw", "speedup_vs_sdpa", "tokens_per_s",
           "first_call_s", "error"]

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
