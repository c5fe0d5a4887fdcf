"""AdamW benchmark: one optimizer step of the Triton AdamW vs torch.optim.AdamW, for GPT-2's parameter sets.

Each implementation runs one step with and without gradient clipping: the Triton optimizer's
``clip_grad_norm_`` + ``step`` (the clip scale applied as the step reads the gradients) against
``torch.nn.utils.clip_grad_norm_`` followed by ``torch.optim.AdamW`` with ``foreach=True`` and with
``fused=True``, and on a GPU the foreach pair under ``torch.compile``.

Bytes are the fewest a step must move: it reads the parameter, the gradient and both fp32 moments
and writes back the parameter and the moments (3·s + 16 bytes per element, s the parameter's size:
28 in fp32); clipping adds one read of the gradients for the norm (32 in fp32). torch's clip also
writes the scaled gradients back and reads them again in the step: it moves more than counted.
``launches`` is the number of GPU kernels one step runs (from the profiler; copies not counted).

``python -m bench.bench_adamw [--quick]``: on a GPU, the GPT-2 124M (148 tensors) and 350M (292
tensors) parameter sets in fp32; ``--quick`` (or no GPU) a toy set on the CPU through Triton's
interpreter, which only checks the harness.
"""

from __future__ import annotations

import sys

import torch

from bench.common import BenchContext, Case, add_triton, module_runner, run_standalone
from gpt.config import PRESETS
from gpt.model import GPT
from gpt_kernels.adamw import AdamW

OP = "adamw"
GPU_MODELS = ("gpt2", "gpt2-medium")
QUICK_SHAPES = [(1,), (3,), (1000,), (37, 71)]
MAX_NORM = 1.0  # below the norm of random gradients, so clipping really scales them
HYPERPARAMETERS = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
WEIGHT_DECAY = 0.1


def model_shapes(preset: str) -> list[torch.Size]:
    """The parameter shapes of a GPT-2 preset, read from the model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(PRESETS[preset])
    return [p.shape for p in model.parameters()]


def make_parameters(shapes, device: str, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=device, dtype=dtype) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        params.append(p)
    return params


def param_groups(params) -> list[dict]:
    """The training split: decay for matrices and embeddings, none for biases and LayerNorm gains."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def bytes_moved(numel: int, dtype: torch.dtype, clip: bool) -> int:
    per_element = 3 * dtype.itemsize + 16 + (dtype.itemsize if clip else 0)
    return numel * per_element


def implementations(ctx: BenchContext) -> tuple[dict, list[str]]:
    """name -> factory(params) returning a no-argument ``step(clip)`` closure, and why any are missing."""
    impls, skipped = {}, []

    def triton_step(params):
        opt = AdamW(param_groups(params), **HYPERPARAMETERS)

        def step(clip):
            if clip:
                opt.clip_grad_norm_(MAX_NORM)
            opt.step()
        return step
    add_triton(ctx, impls, skipped, triton_step)

    def torch_step(**options):
        def factory(params):
            opt = torch.optim.AdamW(param_groups(params), **HYPERPARAMETERS, **options)

            def step(clip):
                if clip:
                    torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
                opt.step()
            return step
        return factory

    impls["torch foreach"] = torch_step(foreach=True)
    impls["torch fused"] = torch_step(fused=True)
    if ctx.compiles:
        def compiled_step(params):
            step = torch_step(foreach=True)(params)
            torch._dynamo.reset()  # every case compiled afresh, not past the recompile limit
            return torch.compile(step)
        impls["torch.compile foreach"] = compiled_step
    elif not ctx.is_gpu:
        skipped.append("torch.compile: skipped on the CPU quick mode (compiling an optimizer takes minutes there)")
    return impls, skipped


def count_launches(ctx: BenchContext, fn) -> int | None:
    """GPU kernels launched by one call of ``fn`` (memory copies and sets not counted)."""
    if not ctx.is_gpu:
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [
        e for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.lower().startswith(("memcpy", "memset"))
    ]
    return len(kernels)


def cases(ctx: BenchContext):
    models = [("toy", QUICK_SHAPES)] if ctx.quick else [(name, model_shapes(name)) for name in ctx.gpu_cases(GPU_MODELS)]
    dtype = torch.float32
    for name, shapes in models:
        numel = sum(torch.Size(s).numel() for s in shapes)

        def step(pass_, factory, shapes=shapes):
            """One optimizer step on fresh parameters (freed with the step, before the next implementation)."""
            torch.manual_seed(0)
            optimizer_step = factory(make_parameters(shapes, ctx.device, dtype))
            return lambda: optimizer_step(pass_ == "clip+step")

        yield Case(
            name=f"{name} ({len(shapes)} tensors, {numel / 1e6:.1f}M params)", dtype=dtype,
            impls=implementations(ctx)[0], step=step, passes=("step", "clip+step"), memory=False,
            bytes_moved=lambda pass_, numel=numel: bytes_moved(numel, dtype, pass_ == "clip+step"),
            baselines=("torch fused",), row_columns=lambda measured, step: dict(launches=count_launches(ctx, step)),
        )


run = module_runner(__name__)


COLUMNS = ["case", "pass", "impl", "median_ms", "gb_per_s", "fraction_of_copy_bw", "launches", "speedup_vs_torch_fused",
           "first_call_s", "error"]

if __name__ == "__main__":
    run_standalone(run, sys.argv[1:], COLUMNS)
