"""End to end: the training step of a preset, tokens/s and MFU, and the kernel ablation.

One step is ``train_gpt2.py``'s own optimizer step, ``gpt.training.TrainingStep``: ``grad_accum``
micro-steps (forward under autocast, backward), then ``clip_grad_norm_``, ``step`` and ``zero_grad``,
without the numerics guard, whose host sync is not part of what is timed. Batches are random
token ids (never zeros), made on the device beforehand and rotated, so the data loader is not in
the timed loop. Each configuration builds a fresh model (same seed) and optimizer, runs warm-up
steps (which hold torch.compile's compilation, Triton's JIT and autotuning: their wall time is
reported separately) and then times each step with CUDA events; the figure is the median step.

FLOPs per token are ``GPT.flops_per_token(T)``: 6·N + 6·L·T·C, N the parameters that take part
in a matmul (all but the position embedding), the second term causal attention's QKᵀ and AV
(forward 2·2·T·C per token per layer, halved by the mask, times 3 for forward and backward).
MFU is that rate over the measured matmul rate of the step's dtype and over the datasheet peak.

The ablation: all kernels off (eager), off + torch.compile, all on, all on + torch.compile, each
kernel on alone and each kernel off alone, which is what tells a user what each kernel buys.
"""

from __future__ import annotations

import gc
import itertools
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import torch

from bench.common import UNFINISHED, UNFINISHED_ERROR
from bench.runner import error_details
from gpt.config import GPTConfig, preset
from gpt.model import GPT, ops_called
from gpt.training import TrainingStep, datasheet_peak_flops, make_optimizer
from gpt_kernels import registry
from gpt_kernels.registry import OPS, use_kernels

# decode_attention only runs in generation (one query against a KV cache): no training step calls it.
# Ops without a Triton kernel have nothing to switch.
TRAINING_OPS = tuple(op for op in OPS if op != "decode_attention" and registry.has_triton(op))
FLOPS_FORMULA = (
    "6·N + 6·L·T·C per token (N: parameters in matmuls, i.e. all but the position embedding and an untied "
    "token embedding; "
    "the second term is causal attention's QKᵀ and AV, forward + backward)"
)
# --quick: whatever the preset, a toy model the interpreter runs in well under a second a step.
QUICK_OVERRIDES = dict(block_size=32, n_layer=1, n_head=2, n_embd=64, vocab_size=512)
QUICK_LLAMA_OVERRIDES = dict(QUICK_OVERRIDES, n_kv_head=1, mlp_hidden=128)  # grouped heads and SwiGLU kept
# The headline target (one H100): GPT-2 124M, B=16, T=1024, bf16.
TARGET = dict(preset="gpt2", batch_size=16, seq_len=1024, dtype="bfloat16", tokens_per_s=560_000,
              speedup_vs_compile=1.3)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# full: the baselines and each kernel on alone and off alone; baselines: eager, eager + compile, kernels on,
# kernels on + compile; each: each kernel on alone and off alone (with baselines, a full run split in two).
ABLATIONS = ("full", "baselines", "each", "none")


@dataclass
class E2ESettings:
    preset: str = "gpt2"
    batch_size: int = 16
    seq_len: int = 1024
    grad_accum: int = 1
    dtype: str = "bfloat16"
    warmup_steps: int = 3
    steps: int = 10
    kernels: str = "all"  # the kernels the "on" configurations use, and whose ablation rows run
    ablation: str = "full"  # full | baselines (eager, compile, all on, all on + compile) | none
    grad_clip: float = 1.0
    lr: float = 6e-4
    weight_decay: float = 0.1


QUICK_SETTINGS = E2ESettings(preset="tiny", batch_size=2, seq_len=32, dtype="float32", warmup_steps=1, steps=2)


@dataclass(frozen=True)
class Configuration:
    name: str
    kernels: frozenset[str]  # the ops asked on Triton
    compile: bool

    @property
    def spec(self) -> str:
        """The registry's kernel spec for this configuration."""
        return ",".join(op for op in TRAINING_OPS if op in self.kernels) or "none"


def kernel_set(spec: str) -> tuple[str, ...]:
    """The training ops a ``--kernels`` spec switches on, in the registry's order."""
    chosen = registry.parse_kernels(spec)
    return tuple(op for op in TRAINING_OPS if op in chosen)


def ablation(kernel_ops: tuple[str, ...], which: str = "full") -> list[Configuration]:
    """The configurations to run, duplicates dropped (e.g. with one kernel, 'only it' is 'all on')."""
    if which not in ABLATIONS:
        raise ValueError(f"--ablation {which!r}: expected one of {', '.join(ABLATIONS)}")
    if which == "none":
        return []
    on = frozenset(kernel_ops)
    label = "all kernels" if on == frozenset(TRAINING_OPS) else f"kernels {','.join(kernel_ops)}"
    configs = [] if which == "each" else [
        Configuration("eager (kernels off)", frozenset(), False),
        Configuration("eager + torch.compile", frozenset(), True),
        Configuration(label, on, False),
        Configuration(f"{label} + torch.compile", on, True),
    ]
    if which in ("full", "each"):
        configs += [Configuration(f"only {op}", frozenset({op}), False) for op in kernel_ops]
        configs += [Configuration(f"all but {op}", on - {op}, False) for op in kernel_ops]
    unique, seen = [], set()
    for config in configs:
        if (config.kernels, config.compile) not in seen:
            seen.add((config.kernels, config.compile))
            unique.append(config)
    return unique


def model_config(settings: E2ESettings, quick: bool) -> GPTConfig:
    config = preset(settings.preset, **(quick_overrides(settings.preset) if quick else {}))
    if settings.seq_len > config.block_size:
        raise ValueError(f"--seq-len {settings.seq_len} exceeds the {settings.preset} model's block size "
                         f"{config.block_size}" + (" (its --quick toy size)" if quick else ""))
    return config


def quick_overrides(preset_name: str) -> dict:
    return QUICK_LLAMA_OVERRIDES if preset(preset_name).arch == "llama" else QUICK_OVERRIDES


def flops_per_token(config: GPTConfig, seq_len: int) -> int:
    """The model's own count (``GPT.flops_per_token``), from a model built on the meta device."""
    with torch.device("meta"):
        return GPT(config).flops_per_token(seq_len)


def throughput(tokens_per_step: int, step_ms: float, flops_per_token: float,
               matmul_tflops: float | None, datasheet_flops: float | None) -> dict:
    """tokens/s, the FLOP rate they mean, and MFU over the measured matmul rate and the datasheet peak."""
    tokens_per_s = tokens_per_step / (step_ms / 1e3)
    achieved = flops_per_token * tokens_per_s
    return {
        "tokens_per_s": tokens_per_s,
        "achieved_tflop_per_s": achieved / 1e12,
        "mfu_vs_measured_matmul": achieved / (matmul_tflops * 1e12) if matmul_tflops else None,
        "mfu_vs_datasheet": achieved / datasheet_flops if datasheet_flops else None,
    }


def matmul_ceiling_dtype(dtype: str, device: str) -> str:
    """The ceiling the step's matmuls run against: bf16, or fp32 on tensor cores (TF32 is on in
    training, as in ``train_gpt2.py``) on a GPU and exact fp32 on the CPU."""
    if dtype == "bfloat16":
        return "bfloat16"
    return "tfloat32" if device.startswith("cuda") else "float32"


def random_batches(count: int, batch_size: int, seq_len: int, vocab_size: int, device: str):
    """``count`` (x, y) pairs of random token ids, y being x shifted by one, as the loader makes them."""
    tokens = torch.randint(0, vocab_size, (count, batch_size, seq_len + 1), device=device)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, count: int, device: torch.device) -> list[float]:
    """Milliseconds of each of ``count`` consecutive steps: CUDA events on a GPU (no host sync
    between steps, as in training), the wall clock on the CPU."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        for start, end in events:
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _free_memory(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure(config: Configuration, settings: E2ESettings, gpt_config: GPTConfig, device: torch.device) -> dict:
    """Run one configuration: warm-up (timed on its own), then the timed steps. Returns the raw
    figures; :func:`run_e2e` adds the derived ones."""
    dtype = DTYPES[settings.dtype]
    with use_kernels(config.spec):
        torch.manual_seed(0)
        model = GPT(gpt_config).to(device)
        optimizer = make_optimizer(model, settings.lr, settings.weight_decay)
        train_model = torch.compile(model) if config.compile else model
        batches = random_batches(settings.grad_accum + 1, settings.batch_size, settings.seq_len,
                                 gpt_config.vocab_size, device.type)
        # The training loop's own step, without the numerics guard (whose one host sync per step is not timed).
        step = TrainingStep(train_model, optimizer, itertools.cycle(batches).__next__, settings.grad_accum, device, dtype,
                            settings.grad_clip)

        start = time.perf_counter()
        step()  # compilation, Triton JIT and autotuning happen here
        _synchronize(device)
        first_step_s = time.perf_counter() - start
        for _ in range(settings.warmup_steps - 1):
            step()
        _synchronize(device)
        warmup_s = time.perf_counter() - start

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = time_steps(step, settings.steps, device)
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        triton_ops = [op for op in TRAINING_OPS if registry.is_triton(op, device)]
    notes = []
    fallbacks = sorted(config.kernels - set(triton_ops))
    if fallbacks:
        notes.append(f"asked on Triton but ran the reference: {', '.join(fallbacks)}")
    if "linear_cross_entropy" in triton_ops and "cross_entropy" in triton_ops:
        notes.append("cross_entropy is not called: the fused linear_cross_entropy computes the loss")
    return {
        "first_step_s": first_step_s,
        "warmup_s": warmup_s,
        "step_ms": times,
        "median_ms": float(np.median(times)),
        "p20_ms": float(np.percentile(times, 20)),
        "p80_ms": float(np.percentile(times, 80)),
        "peak_memory_mb": peak_mb,
        "triton_ops": triton_ops,
        "notes": notes,
    }


def check_settings(settings: E2ESettings, device: str, quick: bool) -> tuple[GPTConfig, list[Configuration]]:
    """ValueError for settings the step cannot run with (checked before any measurement, so a typo
    costs no GPU time); else the model's config and the configurations to run."""
    if settings.dtype not in DTYPES:
        raise ValueError(f"--dtype {settings.dtype!r}: expected one of {', '.join(DTYPES)}")
    if settings.dtype != "float32" and torch.device(device).type != "cuda":
        raise ValueError(f"--dtype {settings.dtype} needs CUDA; on the CPU the step runs in float32")
    if settings.steps < 1 or settings.warmup_steps < 1 or settings.grad_accum < 1 or settings.batch_size < 1:
        raise ValueError("--steps, --warmup-steps, --grad-accum and --batch-size must each be at least 1")
    if settings.seq_len < 1:
        raise ValueError(f"--seq-len must be at least 1, got {settings.seq_len}")
    config = model_config(settings, quick)
    kernel_ops = tuple(op for op in kernel_set(settings.kernels) if op in ops_called(config))
    return config, ablation(kernel_ops, settings.ablation)


def run_e2e(settings: E2ESettings, device: str, quick: bool, matmul_tflops: dict[str, float],
            on_progress: Callable[[dict], None] | None = None,
            only: Callable[[Configuration], bool] | None = None) -> dict:
    """The results' ``e2e`` section: the settings, the model's FLOP count, one row per configuration.
    ``on_progress(section)`` is called before each configuration, with it as an unfinished row, so a
    caller can save the section as it grows. ``only`` keeps the settings' configurations it accepts
    (e.g. the uncompiled ones first, the compiled ones in a later pass)."""
    torch_device = torch.device(device)
    gpt_config, configs = check_settings(settings, device, quick)
    configs = [config for config in configs if only is None or only(config)]
    tokens_per_step = settings.batch_size * settings.seq_len * settings.grad_accum
    per_token = flops_per_token(gpt_config, settings.seq_len)
    ceiling_dtype = matmul_ceiling_dtype(settings.dtype, device)
    datasheet = datasheet_peak_flops(torch_device) if settings.dtype == "bfloat16" else None
    with torch.device("meta"):
        parameters = GPT(gpt_config).num_parameters()
    compile_skipped = None
    if torch_device.type != "cuda":
        compile_skipped = "torch.compile skipped on the CPU: compiling takes minutes there and measures nothing"

    section = {
        "settings": asdict(settings),
        "model": {"preset": settings.preset, "toy_overrides": quick_overrides(settings.preset) if quick else None,
                  "config": gpt_config.to_dict(), "parameters": parameters},
        "tokens_per_step": tokens_per_step,
        "flops_per_token": per_token,
        "flops_formula": FLOPS_FORMULA,
        "matmul_ceiling_dtype": ceiling_dtype,
        "datasheet_peak_tflops": datasheet / 1e12 if datasheet else None,
        "method": "median of per-step CUDA-event times (wall clock on the CPU) after warm-up; random token ids "
                  "made on the device beforehand (no data loader in the loop); torch.compile in its default mode",
        "rows": [],
    }
    rows = section["rows"]
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as train_gpt2.py does
    try:
        for config in configs:
            row = {"name": config.name, "kernels": config.spec, "compile": config.compile}
            if config.compile and compile_skipped:
                rows.append({**row, "status": "skipped", "error": compile_skipped})
                continue
            print(f"bench: e2e {config.name} ({settings.steps} steps after {settings.warmup_steps} warm-up)")
            if on_progress is not None:
                rows.append({**row, "status": UNFINISHED, "error": UNFINISHED_ERROR})
                on_progress(section)
                rows.pop()
            try:
                figures = measure(config, settings, gpt_config, torch_device)
            except Exception as exc:  # noqa: BLE001 - one failing configuration (torch.compile's included) is a result
                rows.append({**row, "status": "error", **error_details(exc)})
                print(f"bench: e2e {config.name}: {rows[-1]['error']}")
                continue
            finally:
                _free_memory(torch_device)
            figures.update(throughput(tokens_per_step, figures["median_ms"], per_token,
                                      matmul_tflops.get(ceiling_dtype), datasheet))
            rows.append({**row, "status": "ok", **figures})
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32
    add_speedups(rows)
    section["headline"] = headline(section, device)
    return section


def add_speedups(rows: list[dict]) -> None:
    baselines = {
        "speedup_vs_eager": next((r for r in rows if r["kernels"] == "none" and not r["compile"]), None),
        "speedup_vs_compile": next((r for r in rows if r["kernels"] == "none" and r["compile"]), None),
    }
    for row in rows:
        for key, baseline in baselines.items():
            ok = row.get("status") == "ok" and baseline is not None and baseline.get("status") == "ok"
            row[key] = baseline["median_ms"] / row["median_ms"] if ok else None


def headline(section: dict, device: str) -> dict:
    """The best configuration, the all-kernels figures, and the issue's targets where the run is
    the target's configuration (GPT-2 124M, B=16, T=1024, bf16, on a GPU)."""
    ok = [r for r in section["rows"] if r.get("status") == "ok"]
    settings = section["settings"]
    is_target = device.startswith("cuda") and all(settings[k] == TARGET[k] for k in ("preset", "batch_size",
                                                                                     "seq_len", "dtype"))
    summary = {"target_configuration": is_target, "best": None, "all_kernels": None}
    if ok:
        best = max(ok, key=lambda r: r["tokens_per_s"])
        summary["best"] = {"name": best["name"], "tokens_per_s": best["tokens_per_s"]}
    on = next((r for r in ok if r["kernels"] == settings_spec(settings) and not r["compile"]), None)
    if on is not None:
        summary["all_kernels"] = {k: on.get(k) for k in ("name", "tokens_per_s", "mfu_vs_measured_matmul",
                                                         "mfu_vs_datasheet", "peak_memory_mb",
                                                         "speedup_vs_eager", "speedup_vs_compile")}
    if is_target:
        summary["targets"] = {"tokens_per_s": TARGET["tokens_per_s"],
                              "speedup_vs_compile": TARGET["speedup_vs_compile"]}
        if on is not None:
            summary["targets"]["tokens_per_s_met"] = on["tokens_per_s"] >= TARGET["tokens_per_s"]
            if on.get("speedup_vs_compile") is not None:
                summary["targets"]["speedup_vs_compile_met"] = on["speedup_vs_compile"] >= TARGET["speedup_vs_compile"]
    return summary


def settings_spec(settings: dict) -> str:
    """The registry spec of the run's "kernels on" configuration."""
    return ",".join(kernel_set(settings["kernels"])) or "none"


def settings_for(quick: bool, **overrides) -> E2ESettings:
    """The defaults for this kind of run (the GPU headline, or the --quick toy), with overrides
    (None values ignored) applied."""
    base = QUICK_SETTINGS if quick else E2ESettings()
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
