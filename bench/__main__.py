"""The benchmark suite: the device's ceilings, every op's benchmark, and the end-to-end ablation.

    python -m bench                                  # GPU: everything at GPT-2 sizes, GPT-2 124M B=16 T=1024 bf16
    python -m bench --ops layernorm,attention --ablation baselines
    python -m bench --kernels all,-attention --preset gpt2-medium --batch-size 8
    python -m bench --quick                          # CPU, Triton's interpreter, toy sizes: checks the harness only
    python -m bench report                           # the latest run -> bench/RESULTS.md
    python -m bench smoke --budget 390 --out DIR     # a short GPU window: most valuable first (bench/smoke.py)
    python -m bench data                             # prepare's tokens/s against tiktoken alone, its peak memory

A run writes ``bench/results/<UTC date>-<device>/`` (``--quick``: under ``bench/results/quick/``):
``results.json`` (environment, ceilings, every figure), ``results.md`` and the plots. The exit
status is 1 when an op benchmark or an end-to-end configuration failed (each failure, a failing
torch.compile included, is recorded in the results; the others still run).

The whole suite is expected to take longer than a 10-minute command (not yet timed on a GPU: each
op's torch.compile baselines and Triton's autotuning dominate). Where commands are time-limited,
run it in parts and merge them:

    python -m bench --ablation none --ops layernorm,gelu
    python -m bench --ablation none --ops attention
    python -m bench --ablation none --ops cross_entropy,linear_cross_entropy,adamw,decode_attention
    python -m bench --ops none --ablation baselines  # eager, eager + compile, all on, all on + compile
    python -m bench --ops none --ablation each       # each kernel on alone and off alone
    python -m bench report --results bench/results/RUN1 --results bench/results/RUN2 ...

``report`` merges the parts into one run (later parts win per op and per end-to-end configuration)
and renders it. A run saves its results after every op and configuration, so one killed by a time
limit (``timeout 590 python -m bench ...``) keeps what it finished and can be merged likewise.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() or "--quick" in sys.argv[1:]:
    # --quick runs the Triton kernels in the interpreter, which Triton picks when the kernels are
    # decorated: this must precede every import of a kernel module.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import shlex  # noqa: E402
from pathlib import Path  # noqa: E402

from bench import ceilings, e2e, environment, report, runner  # noqa: E402
from bench.common import BenchContext  # noqa: E402
from gpt.config import PRESETS  # noqa: E402
from gpt_kernels import registry  # noqa: E402


def parse_run_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="CPU, Triton's interpreter, toy sizes: checks the harness, measures nothing "
                        "(the default when there is no CUDA GPU)")
    p.add_argument("--ops", default="all",
                   help="op benchmarks to run: 'all', 'none', or a list such as 'gelu,attention' or 'all,-adamw'")
    p.add_argument("--kernels", default="all",
                   help="the kernels of the end-to-end 'kernels on' configurations, and the ones ablated one by one "
                        "(registry syntax: 'all', 'layernorm,attention', 'all,-gelu')")
    p.add_argument("--ablation", choices=e2e.ABLATIONS, default="full",
                   help="end-to-end configurations: full (baselines + each kernel on alone and off alone), "
                        "baselines (eager, eager + compile, kernels on, kernels on + compile), each (each kernel "
                        "on alone and off alone: with baselines, a full run in two parts), none")
    p.add_argument("--preset", choices=list(PRESETS), help="model of the end-to-end step (default gpt2)")
    p.add_argument("--batch-size", type=int, help="sequences per micro-step (default 16)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 1024)")
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step (default 1)")
    p.add_argument("--dtype", choices=list(e2e.DTYPES), help="autocast dtype of the step (default bfloat16)")
    p.add_argument("--warmup-steps", type=int, help="untimed steps first: compilation, JIT, autotuning (default 3)")
    p.add_argument("--steps", type=int, help="timed steps per configuration (default 10)")
    p.add_argument("--out", type=Path,
                   help=f"folder the run's folder goes in (default {report.RESULTS_DIR}; "
                        f"with --quick {report.QUICK_RESULTS_DIR})")
    return p.parse_args(argv)


def parse_report_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench report",
                                description="Render a run's results into bench/RESULTS.md.")
    p.add_argument("--results", type=Path, action="append",
                   help="a results.json, a run's folder, or a folder of runs (its latest; default bench/results). "
                        "Given several times, the runs are merged into a new run folder (later runs win per op "
                        "and per end-to-end configuration): for a suite split over several commands")
    p.add_argument("--out", type=Path, help="folder the merged run goes in (default: beside the latest part, "
                                            "e.g. bench/results)")
    p.add_argument("--markdown", type=Path, default=report.RESULTS_MD, help="where to write (default bench/RESULTS.md)")
    p.add_argument("--allow-quick", action="store_true", help="accept a --quick run (labelled as no performance claim)")
    return p.parse_args(argv)


def _print_summary(results: dict) -> None:
    for op, status in results["ops"]["modules"].items():
        detail = f"{status['rows']} rows, {status['seconds']:.1f} s" if status["status"] == "ok" else status["error"]
        print(f"  {op:22s} {status['status']:8s} {detail}")
    for row in results["e2e"]["rows"]:
        if row["status"] == "ok":
            speedup = row.get("speedup_vs_eager")
            print(f"  {row['name']:32s} {row['tokens_per_s']:>12,.0f} tokens/s  {row['median_ms']:9.2f} ms/step"
                  + (f"  {speedup:.2f}x eager" if speedup else ""))
        else:
            print(f"  {row['name']:32s} {row['status']}: {row['error']}")


def run(argv: list[str]) -> int:
    args = parse_run_args(argv)
    cuda = torch.cuda.is_available()
    quick = args.quick or not cuda
    if quick and not args.quick:
        print("bench: no CUDA GPU, so this is a --quick run")
    device = "cpu" if quick else "cuda"

    # Check every option before the first measurement, so a typo costs no GPU time.
    selected = runner.select(args.ops, runner.discover())
    settings = e2e.settings_for(quick, preset=args.preset, batch_size=args.batch_size, seq_len=args.seq_len,
                                grad_accum=args.grad_accum, dtype=args.dtype, warmup_steps=args.warmup_steps,
                                steps=args.steps, kernels=args.kernels, ablation=args.ablation)
    e2e.check_settings(settings, device, quick)
    out_root = args.out or (report.QUICK_RESULTS_DIR if quick else report.RESULTS_DIR)

    if quick:
        print(f"bench: {report.QUICK_DISCLAIMER}")
    print(registry.report(device))
    results = {
        "schema_version": report.SCHEMA_VERSION,
        "quick": quick,
        "disclaimer": report.QUICK_DISCLAIMER if quick else None,
        "command": shlex.join(["python", "-m", "bench", *argv]),
        "environment": environment.describe(device, environment.utc_now()),
    }
    # The results are saved as they grow (after every op module and end-to-end configuration): a run
    # killed by a time limit keeps what it finished, for `report` to render or merge with the rest.
    run_dir = report.create_run_dir(results, out_root)
    print(f"bench: saving into {run_dir}")

    def save(section: str):
        def store(value: dict) -> None:
            results[section] = value
            report.save_progress(results, run_dir)
        return store

    ctx = BenchContext(device=device, quick=quick)
    save("ceilings")(ceilings.measure_ceilings(ctx))
    rates = ", ".join(f"{k} {v:,.1f}" for k, v in ctx.matmul_tflops.items())
    print(f"bench: copy {ctx.copy_gbps:,.0f} GB/s; matmul TFLOP/s: {rates}")
    results["ops"] = runner.run_op_benchmarks(ctx, selected, on_progress=save("ops"))
    results["e2e"] = e2e.run_e2e(settings, device, quick, ctx.matmul_tflops, on_progress=save("e2e"))
    report.finish_run(results, run_dir)

    print(f"bench: results in {run_dir}")
    _print_summary(results)
    if quick:
        print(f"bench: {report.QUICK_DISCLAIMER}")
    else:
        print("bench: `python -m bench report` renders the latest run into bench/RESULTS.md")
    failed = [op for op, s in results["ops"]["modules"].items() if s["status"] == "error"]
    # A baseline that fails (a torch.compile, a competitor) is recorded and the run is fine; one of
    # our own kernels that fails is a broken run.
    failed += [f"{row.get('op')} {row.get('case')} {row.get('pass')} (triton)" for row in results["ops"]["rows"]
               if row.get("impl") == "triton" and row.get("error")]
    failed += [row["name"] for row in results["e2e"]["rows"] if row["status"] == "error"]
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def render_report(args: argparse.Namespace) -> int:
    files = [report.find_results(path, args.allow_quick) for path in args.results or [report.RESULTS_DIR]]
    if len(files) > 1:
        files = [report.write_merged_run(files, args.out)]
        print(f"bench: merged the runs into {files[0].parent}")
    print(f"bench: wrote {report.write_report(files[0], args.markdown)} from {files[0]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:1] == ["report"]:
            return render_report(parse_report_args(argv[1:]))
        if argv[:1] == ["smoke"]:
            from bench import smoke

            return smoke.main(argv[1:])
        if argv[:1] == ["data"]:
            from bench import data

            return data.main(argv[1:])
        return run(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
