"""A run's results on disk: one folder per run with ``results.json``, ``results.md`` and the plots,
and ``python -m bench report``, which renders the latest run into ``bench/RESULTS.md``.

    bench/results/<UTC date>-<device>/results.json   every figure, the ceilings, the environment
    bench/results/<UTC date>-<device>/results.md     the same as Markdown tables
    bench/results/<UTC date>-<device>/*.png          per-op bars with the roofline; the ablation

``--quick`` runs go to ``bench/results/quick/`` (not committed) and are never picked as "latest"
unless asked for: their CPU figures are no performance claim.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from bench.common import UNFINISHED
from bench.e2e import add_speedups, headline
from bench.plots import render_plots

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK_RESULTS_DIR = RESULTS_DIR / "quick"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
RESULTS_FILE = "results.json"
QUICK_DISCLAIMER = ("--quick run on the CPU (Triton's interpreter, toy sizes): these figures only check that the "
                    "harness works end to end. They are not performance claims.")
SCHEMA_VERSION = 1
SMOKE_SHEET = "plots.png"  # python -m bench smoke's one sheet of every plot
# Row keys shown in their own columns (or merged into one), before any module-specific extras.
ROW_KEYS = ("op", "case", "dtype", "pass", "impl", "median_ms", "p20_ms", "p80_ms", "gb_per_s", "fraction_of_copy_bw",
            "tflop_per_s", "fraction_of_matmul", "peak_memory_mb")
COLUMN_LABELS = {"gb_per_s": "GB/s", "fraction_of_copy_bw": "of copy BW", "tflop_per_s": "TFLOP/s",
                 "fraction_of_matmul": "of matmul", "peak_memory_mb": "peak MiB"}

# ---------------------------------------------------------------------------------------------- JSON


def jsonable(value):
    """``value`` with non-finite floats as null (JSON has no NaN) and anything unknown as its str."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def create_run_dir(results: dict, root: Path, suffix: str = "") -> Path:
    """A new, empty folder under ``root`` named by the run's date and device; returns it."""
    stamp = results["environment"]["date_utc"].replace("-", "").replace(":", "").replace("+0000", "Z")
    name = f"{stamp}-{_slug(results['environment']['device_name'])}" + (f"-{suffix}" if suffix else "")
    run_dir = root / name
    count = 1
    while run_dir.exists():
        count += 1
        run_dir = root / f"{name}-{count}"
    run_dir.mkdir(parents=True)
    return run_dir


def write_json(results: dict, path: Path) -> None:
    # Through a temporary file: a run killed while writing keeps its previous, whole, results file.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(jsonable(results), indent=2, allow_nan=False) + "\n")
    os.replace(temporary, path)


def save_progress(results: dict, run_dir: Path) -> None:
    """The run's ``results.json`` as it stands, marked incomplete. A run saves after every op module and
    every end-to-end configuration, so one killed by a time limit still leaves every figure it finished
    (``python -m bench report`` renders it, or merges it with the runs that finish the rest)."""
    write_json({**results, "complete": False}, run_dir / RESULTS_FILE)


def finish_run(results: dict, run_dir: Path) -> Path:
    """The finished run into ``run_dir``: its JSON, Markdown and plots; returns ``run_dir``."""
    results["complete"] = True
    results["plots"] = render_plots(results, run_dir)
    write_json(results, run_dir / RESULTS_FILE)
    (run_dir / "results.md").write_text(render_markdown(results, image_prefix=""))
    return run_dir


def write_run(results: dict, root: Path, suffix: str = "") -> Path:
    """A new folder under ``root`` holding the run's JSON, Markdown and plots; returns it."""
    return finish_run(results, create_run_dir(results, root, suffix))


def read_results(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def find_results(path: Path = RESULTS_DIR, allow_quick: bool = False) -> Path:
    """The results file ``path`` names: a ``results.json``, a run folder, or a folder of runs (then the
    latest run by date, --quick runs left out unless ``allow_quick``)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / RESULTS_FILE).is_file():
        return path / RESULTS_FILE
    candidates = []
    for file in path.glob(f"**/{RESULTS_FILE}"):
        try:
            results = read_results(file)
        except (OSError, json.JSONDecodeError):
            continue
        if results.get("quick") and not allow_quick:
            continue
        # A merged run has its latest part's date: on a tie it is the one wanted.
        candidates.append((results.get("environment", {}).get("date_utc", ""), "merged_from" in results, str(file),
                           file))
    if not candidates:
        skipped = "" if allow_quick else " (--quick runs are left out: pass --allow-quick to render one)"
        raise FileNotFoundError(f"no results under {path}{skipped}: run `python -m bench` first")
    return max(candidates)[-1]


def merge_results(parts: list[dict]) -> dict:
    """One run from partial runs on the same device, when the whole suite does not fit one session
    (e.g. ``--ablation none --ops layernorm``, ``--ablation none --ops attention``, ``--ops none``), or
    when a run was killed before its end. Later parts win per op and per end-to-end configuration,
    except that what a killed part left unfinished never replaces a finished figure. End-to-end rows
    are merged when the parts ran the same step (same settings but ``--ablation``, so ``--ablation
    baselines`` and ``--ablation each`` complete each other); otherwise the latest part's step wins.
    Each row keeps the fractions computed against its own run's ceilings; the merged ceilings (and so
    the plots' rooflines) are the latest part's."""
    if not parts:
        raise ValueError("nothing to merge")
    parts = sorted(parts, key=lambda r: r["environment"]["date_utc"])
    devices = {part["environment"]["device_name"] for part in parts}
    if len(devices) > 1:
        raise ValueError(f"cannot merge runs from different devices: {', '.join(sorted(devices))}")
    if len({part["quick"] for part in parts}) > 1:
        raise ValueError("cannot merge a --quick run with a real one")
    merged = {**parts[-1], "command": " ; ".join(part["command"] for part in parts), "plots": []}
    merged["merged_from"] = [part["environment"]["date_utc"] for part in parts]
    merged["merged_parts"] = [
        {"date_utc": part["environment"]["date_utc"], "git_commit": part["environment"].get("git_commit"),
         "git_dirty": part["environment"].get("git_dirty"), "command": part["command"],
         "complete": part.get("complete", True)}
        for part in parts
    ]
    modules, rows_by_op = {}, {}
    for part in parts:
        ops = part.get("ops") or {"rows": [], "modules": {}}  # a part killed before its op benchmarks has none
        for op, status in ops["modules"].items():
            if status.get("status") == UNFINISHED and op in modules:
                continue
            modules[op] = status
            rows_by_op[op] = [row for row in ops["rows"] if row.get("op") == op]
    merged["ops"] = {"rows": [row for op in modules for row in rows_by_op[op]], "modules": modules}
    merged["e2e"] = _merge_e2e([part.get("e2e") or {} for part in parts], merged["environment"]["device"])
    return merged


def _same_step(a: dict, b: dict) -> bool:
    """Whether two end-to-end sections timed the same step (their settings differ at most in --ablation)."""
    def step(section):
        return {k: v for k, v in section.get("settings", {}).items() if k != "ablation"}
    return step(a) == step(b) and a.get("model") == b.get("model")


def _merge_e2e(sections: list[dict], device: str) -> dict:
    with_rows = [section for section in sections if section.get("rows")]
    if not with_rows:
        return sections[-1]
    latest = with_rows[-1]
    rows: dict[tuple, dict] = {}
    for section in with_rows:
        if not _same_step(section, latest):
            continue
        for row in section["rows"]:
            key = (row["kernels"], row["compile"])
            if row.get("status") == UNFINISHED and key in rows:
                continue
            rows[key] = dict(row)
    # The baselines first (eager, then eager + compile), then the others as they first came.
    ordered = sorted(rows.values(), key=lambda r: (0, r["compile"]) if r["kernels"] == "none" else (1, False))
    add_speedups(ordered)
    section = {**latest, "rows": ordered}
    section["headline"] = headline(section, device)
    return section


def write_merged_run(results_files: list[Path], root: Path | None = None) -> Path:
    """Merge the given runs into a new run folder under ``root`` (default: beside the latest of them);
    returns its results file."""
    parts = [(read_results(path), Path(path)) for path in results_files]
    latest = max(parts, key=lambda part: part[0]["environment"]["date_utc"])[1]
    merged = merge_results([results for results, _ in parts])
    return write_run(merged, root or latest.parent.parent, suffix="merged") / RESULTS_FILE


# ------------------------------------------------------------------------------------------ Markdown


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if abs(value) >= 10 ** digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _time_cell(row: dict) -> str:
    if row.get("median_ms") is None:  # a failed or unfinished row
        return "–"
    return f"{fmt(row.get('median_ms'))} ({fmt(row.get('p20_ms'), 3)}–{fmt(row.get('p80_ms'), 3)})"


def _environment(results: dict) -> str:
    env = results["environment"]
    commit = env["git_commit"] + (" (uncommitted changes)" if env.get("git_dirty") else "")
    return table(["", ""], [
        ["device", env["device_name"]],
        ["driver / CUDA", f"{env.get('driver') or '–'} / {env.get('cuda') or '–'}"],
        ["torch / triton", f"{env['torch']} / {env['triton']}"],
        ["commit", commit],
        ["date (UTC)", env["date_utc"] + (f" (merged from the runs of {', '.join(results['merged_from'])})"
                                          if results.get("merged_from") else "")],
        ["command", f"`{results.get('command', 'python -m bench')}`"],
    ] + [
        [label, fmt(env[key])] for key, label in (("sm_count", "SMs"), ("ptxas", "ptxas"),
                                                  ("triton_cache_key_sha256", "Triton cache key (sha256)"))
        if env.get(key) is not None
    ] + [
        [f"part {i}", f"{part['date_utc']}, commit {part.get('git_commit') or '–'}"
                      + (" (uncommitted changes)" if part.get("git_dirty") else "")
                      + ("" if part.get("complete", True) else " (stopped before its end)")
                      + f": `{part['command']}`"]
        for i, part in enumerate(results.get("merged_parts", []), 1)
    ])


def _ceilings(results: dict) -> str:
    ceilings = results.get("ceilings") or {}
    rows = [["copy bandwidth (read + write)", f"{fmt(ceilings.get('copy_gbps'))} GB/s"]]
    rows += [[f"{dtype} matmul", f"{fmt(rate)} TFLOP/s"] for dtype, rate in ceilings.get("matmul_tflops", {}).items()]
    return table(["ceiling", "measured"], rows) + f"\n\n{ceilings.get('method', '')}"


def _e2e(results: dict, image_prefix: str) -> str:
    e2e = results.get("e2e") or {}
    if not e2e.get("rows"):
        return _not_run(results, "`--ablation none`")
    s, model = e2e["settings"], e2e["model"]
    toy = f" (toy size for --quick: {model['toy_overrides']})" if model.get("toy_overrides") else ""
    parts = [
        f"Preset **{s['preset']}**{toy}, {fmt(model['parameters'])} parameters; B={s['batch_size']}, "
        f"T={s['seq_len']}, {s['grad_accum']} micro-step(s) per step ({fmt(e2e['tokens_per_step'])} tokens), "
        f"{s['dtype']}; {s['warmup_steps']} warm-up steps, then {s['steps']} timed.",
        f"FLOPs per token: {e2e['flops_formula']} = {fmt(e2e['flops_per_token'])}. MFU is their rate over the "
        f"measured {e2e['matmul_ceiling_dtype']} matmul rate, and over the datasheet peak "
        f"({fmt(e2e.get('datasheet_peak_tflops'))} TFLOP/s) where one is known for this device and dtype.",
        f"Method: {e2e['method']}.",
    ]
    headline = e2e.get("headline") or {}
    targets = headline.get("targets")
    if targets:
        on = headline.get("all_kernels") or {}
        met = {True: "met", False: "**not met**", None: "not measured"}
        parts.append(
            f"Targets: ≥ {fmt(targets['tokens_per_s'])} tokens/s with all kernels on: "
            f"{fmt(on.get('tokens_per_s'))} ({met[targets.get('tokens_per_s_met')]}); ≥ "
            f"{targets['speedup_vs_compile']}x eager + torch.compile: {fmt(on.get('speedup_vs_compile'))}x "
            f"({met[targets.get('speedup_vs_compile_met')]})."
        )
    header = ["configuration", "Triton kernels", "tokens/s", "step ms (p20–p80)", "MFU (measured matmul)",
              "MFU (datasheet)", "peak memory (MiB)", "vs eager", "vs eager + compile", "first step s",
              "warm-up s", "notes"]
    rows = []
    for row in e2e["rows"]:
        if row.get("status") != "ok":
            rows.append([row["name"], row["kernels"], None, None, None, None, None, None, None, None, None,
                         f"{row.get('status')}: {row.get('error')}"])
            continue
        rows.append([row["name"], row["kernels"], row["tokens_per_s"], _time_cell(row),
                     row.get("mfu_vs_measured_matmul"), row.get("mfu_vs_datasheet"), row.get("peak_memory_mb"),
                     row.get("speedup_vs_eager"), row.get("speedup_vs_compile"), row.get("first_step_s"),
                     row.get("warmup_s"), "; ".join(row.get("notes", []))])
    parts.append(table(header, rows))
    if "ablation.png" in results.get("plots", []):
        parts.append(f"![tokens/s per configuration]({image_prefix}ablation.png)")
    return "\n\n".join(parts)


def _op_table(rows: list[dict]) -> str:
    present = [key for key in ("gb_per_s", "fraction_of_copy_bw", "tflop_per_s", "fraction_of_matmul",
                               "peak_memory_mb") if any(row.get(key) is not None for row in rows)]
    extras = [key for key in dict.fromkeys(k for row in rows for k in row) if key not in ROW_KEYS]
    header = ["case", "dtype", "pass", "impl", "median ms (p20–p80)"] + [COLUMN_LABELS[k] for k in present] + extras
    body = [[row.get("case"), row.get("dtype"), row.get("pass"), row.get("impl"), _time_cell(row)]
            + [row.get(key) for key in present + extras] for row in rows]
    return table(header, body)


def _ops(results: dict, image_prefix: str) -> str:
    ops = results.get("ops") or {}
    rows, modules = ops.get("rows", []), ops.get("modules", {})
    if not modules:
        return _not_run(results, "`--ops none`")
    parts = []
    for op, status in modules.items():
        op_rows = [row for row in rows if row.get("op") == op]
        parts.append(f"### {op}")
        if status.get("status") != "ok":
            parts.append(f"**{status.get('status')}**: {status.get('error')}")
        if op_rows:
            parts.append(_op_table(op_rows))
        if f"op_{op}.png" in results.get("plots", []):
            parts.append(f"![{op}]({image_prefix}op_{op}.png)")
        if status.get("notes"):
            parts.append("Notes: " + "; ".join(status["notes"]))
        if "seconds" in status:
            parts.append(f"Wall time of the module, compilation and autotuning included: {status['seconds']:.1f} s.")
    return "\n\n".join(parts)


def _not_run(results: dict, option: str) -> str:
    if not results.get("complete", True):
        return "Not reached: the run stopped first."
    return "Not run (see the GPU check's steps above)." if results.get("smoke") else f"Not run ({option})."


def _smoke(results: dict, image_prefix: str) -> str:
    """The GPU check's own sections: its steps against the budget, the native correctness rows, the
    gpu_smoke tests, the autotuned attention tiles and the kernel cache it packed."""
    smoke = results["smoke"]
    parts = [f"Budget {fmt(smoke.get('budget_s'))} s; the run took {fmt(smoke.get('seconds'))} s. Estimates are "
             "predictions for a cold H100; `skipped: budget` means the estimate exceeded what was left."]
    parts.append(table(["step", "status", "seconds", "estimate s", "limit s", "result"], [
        [step["title"], step["status"], step.get("seconds"), step.get("estimate_s"), step.get("limit_s"),
         step.get("summary") or step.get("error")] for step in smoke.get("steps", [])]))
    rows = smoke.get("correctness") or []
    parts.append("### Native correctness")
    if rows:
        failed = [row for row in rows if not row["passed"]]
        parts.append(f"{len(rows) - len(failed)} of {len(rows)} rows passed"
                     + (f"; **failed: {', '.join(sorted({row['case'] + ' ' + row['quantity'] for row in failed}))}**"
                        if failed else "")
                     + ". Every output and gradient against the op's `<op>_reference` in float64, the op's own "
                       "buffers NaN-poisoned first; tolerances from `gpt_kernels/tolerances.py` (the tests').")
        parts.append(table(["check", "shape", "quantity", "relative error", "tolerance", "passed", "error"], [
            [row["case"], row.get("shape"), row["quantity"], row.get("relative_error"), row.get("tolerance"),
             "yes" if row["passed"] else "**NO**", row.get("error")] for row in rows]))
    else:
        parts.append("Not reached.")
    tests = smoke.get("tests")
    if tests:
        parts.append("### `pytest -m gpu_smoke`")
        parts.append(", ".join(f"{tests.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped")) + ".")
        if tests.get("failures"):
            parts.append(table(["test", "kind", "message"],
                               [[f["test"], f["kind"], f["message"]] for f in tests["failures"]]))
    autotune = smoke.get("autotune")
    if autotune:
        parts.append("### Autotuned attention tiles (for `HOPPER_CONFIGS` in `gpt_kernels/attention.py`)")
        parts.append("```python\n" + "\n".join(autotune.get("table_entries", [])) + "\n```")
    cache = smoke.get("triton_cache")
    if cache and cache.get("file"):
        parts.append(f"Compiled kernels: `{cache['file']}` ({cache['folders']} cache entries, "
                     f"{cache['bytes'] / 2**20:.1f} MiB); `python -m bench smoke --triton-cache FILE` reuses them.")
    if SMOKE_SHEET in results.get("plots", []):
        parts.append(f"![every plot of the run]({image_prefix}{SMOKE_SHEET})")
    return "\n\n".join(parts)


def render_markdown(results: dict, image_prefix: str = "") -> str:
    """The whole run as Markdown; images are linked as ``image_prefix + name``."""
    parts = ["# Benchmark results"]
    if results.get("quick"):
        parts.append(f"> **{QUICK_DISCLAIMER}**")
    if results.get("complete") is False:
        parts.append("> **This run stopped before its end** (killed, e.g. by a time limit): below is what it "
                     "finished. `python -m bench report --results THIS --results ANOTHER` merges it with a run "
                     "of the rest.")
    commits = {part.get("git_commit") for part in results.get("merged_parts", [])}
    if len(commits) > 1:
        parts.append("> **The merged parts were measured at different commits** (see the parts below).")
    parts.append(_environment(results))
    if results.get("smoke"):
        parts += ["## GPU check (`python -m bench smoke`)", _smoke(results, image_prefix)]
    parts += [
        "## Ceilings",
        _ceilings(results),
        "## End to end: one training step, and what each kernel buys",
        _e2e(results, image_prefix),
        "## Per-kernel benchmarks",
        "Time is the median (p20–p80) with warm-up excluded and, on a GPU, the L2 cache flushed before every "
        "repetition. GB/s counts the fewest bytes a pass must move; the fraction is over the measured copy "
        "bandwidth (or, for TFLOP/s, the measured matmul rate of the row's dtype).",
        _ops(results, image_prefix),
    ]
    return "\n\n".join(parts) + "\n"


def write_report(results_file: Path, markdown_path: Path = RESULTS_MD) -> Path:
    """Render ``results_file`` into ``markdown_path`` (re-rendering its plots if they are missing)."""
    results_file = Path(results_file).resolve()
    results = read_results(results_file)
    run_dir = results_file.parent
    if any(not (run_dir / name).is_file() for name in results.get("plots", [])) or "plots" not in results:
        results["plots"] = render_plots(results, run_dir)
    prefix = os.path.relpath(run_dir, Path(markdown_path).resolve().parent).replace(os.sep, "/") + "/"
    markdown = render_markdown(results, image_prefix=prefix)
    source = os.path.relpath(results_file, Path(markdown_path).resolve().parent).replace(os.sep, "/")
    markdown = markdown.replace("# Benchmark results\n", f"# Benchmark results\n\nFrom [{source}]({source}), "
                                "rendered by `python -m bench report`.\n", 1)
    Path(markdown_path).write_text(markdown)
    return Path(markdown_path)
