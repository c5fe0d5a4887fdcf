"""``python -m bench smoke``: a short GPU window turned into verified numbers, the most valuable first.

    python -m bench smoke --budget 390 --out DIR                       # what `make gpu-check` runs
    python -m bench smoke --budget 390 --out DIR --triton-cache OLD.tar.gz   # reuse a window's kernels
    python -m bench smoke --quick --budget 120 --out DIR               # CPU: the plumbing at toy sizes

The steps, in order, each with an estimate of its time on a cold H100 (a prediction until a run
replaces it) and a time limit:

 1. environment: GPU, SM count, driver, torch, triton, ptxas, Triton's cache key, the git commit
 2. precompile: every Triton variant the later steps use, compiled in a pool of worker processes
 3. ceilings: copy bandwidth and matmul rates
 4. correctness: every op at GPT-2 124M's shapes against its float64 reference (``bench/correctness.py``)
 5. headline: each op at its GPT-2 shape against eager PyTorch (attention against SDPA's flash backend)
 6. e2e, e2e_compiled: the GPT-2 124M training step, kernels off and on; then both under torch.compile
    then the ``gpu_smoke`` test subset (``pytest -m gpu_smoke``), if time remains
 7. compile_columns: each op's torch.compile row beside the headline rows
 8. ablation_each, autotune (``GPT_ATTENTION_AUTOTUNE=1``, winners as a ready table entry), sweeps

A step whose estimate exceeds what is left of ``--budget`` is recorded as ``skipped: budget``. Each
step runs in a worker process (one, reused while it behaves), so a step that overruns its limit (a
compile that hangs) is killed and the next starts in a fresh worker. The results are saved after
every row: a run killed at any moment keeps what it finished.

``DIR`` holds at most 8 files, rewritten as the run goes (what a GPU machine sends back is limited):
``results.json``, ``results.md``, ``plots.png`` (every plot on one sheet), ``smoke.log`` and
``triton-cache.tar.gz``: the compiled kernels, binaries only, for ``--triton-cache`` in a later
window (unpacking rewrites the absolute paths Triton's cache stores). ``python -m bench report
--results DIR`` renders the run into ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench.report import SMOKE_SHEET

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # what a GPU machine sends back: at most 8 files, 16 MiB each
MAX_FILE_BYTES = 15 * 2**20  # under the 16 MiB limit, with room to spare
RESULTS_JSON, RESULTS_MD, LOG, CACHE_TAR = "results.json", "results.md", "smoke.log", "triton-cache.tar.gz"
SHEET = SMOKE_SHEET
OUTPUT_FILES = (RESULTS_JSON, RESULTS_MD, SHEET, LOG, CACHE_TAR)
SAVE_EVERY_S = 0.5  # rows come faster than that in the sweeps: the files are rewritten at most this often
FINISH_S = 15  # kept back from the budget for the last results.md, plot sheet and cache tarball
DEFAULT_BUDGET_S = 390
# Triton's cache, binaries only: compiled kernels (.cubin), their metadata and group files (.json),
# and the compiled launchers (.so). The IR (.ttir, .ttgir, .llir, .ptx, source) is what a kernel is
# built from, not what loading it needs.
CACHE_SUFFIXES = (".cubin", ".json", ".so", ".hsaco")
GROUP_PREFIX = "__grp__"


@dataclass(frozen=True)
class Step:
    name: str
    title: str
    estimate_s: float  # on a cold H100: a prediction until a run's seconds replace it
    limit_s: float
    quick_estimate_s: float = 5.0
    where: str = "worker"  # worker | parent (no GPU work of its own: it runs subprocesses)
    gpu_only: bool = False
    env: tuple[tuple[str, str], ...] = ()  # extra environment of its worker


STEPS = (
    Step("environment", "1. environment record", 20, 90),
    Step("precompile", "2. parallel precompile", 60, 150, 10, where="parent"),
    Step("ceilings", "3. ceilings", 10, 60),
    Step("correctness", "4. native correctness", 45, 150),
    Step("headline", "5. headline rows", 60, 150, 20),
    Step("e2e", "6. end to end", 45, 150, 20),
    Step("e2e_compiled", "6. end to end under torch.compile", 90, 180),
    Step("tests", "gpu_smoke tests (pytest -m gpu_smoke)", 150, 180, where="parent", gpu_only=True),
    Step("compile_columns", "7. per-op torch.compile columns", 120, 240, 20),
    Step("ablation_each", "8. ablation: each kernel alone, all but each", 120, 200, 60),
    Step("autotune", "8. attention tile autotuning", 90, 150, gpu_only=True, env=(("GPT_ATTENTION_AUTOTUNE", "1"),)),
    Step("sweeps", "8. sweeps (every benchmark case)", 240, 300, 20),
)
STEP_NAMES = tuple(step.name for step in STEPS)


class Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): stop, keep what is saved, finish the files."""


# ----------------------------------------------------------------------------------- Triton's cache


def triton_cache_dir() -> Path:
    from triton import knobs

    return Path(knobs.cache.dir)


def _is_binary(name: str) -> bool:
    return name.endswith(CACHE_SUFFIXES) and not name.startswith(".")


def pack_triton_cache(cache_dir: Path, tar_path: Path, max_bytes: int = MAX_FILE_BYTES) -> dict:
    """The binary part of Triton's cache as one ``.tar.gz`` (members ``<hash>/<file>``), written
    atomically. Past ``max_bytes`` the oldest kernels are left out. Returns what it packed."""
    entries = []
    for folder in Path(cache_dir).iterdir() if Path(cache_dir).is_dir() else []:
        files = sorted(f for f in folder.iterdir() if f.is_file() and _is_binary(f.name)) if folder.is_dir() else []
        if files:
            entries.append((max(f.stat().st_mtime for f in files), folder.name, files))
    entries.sort(reverse=True)  # newest first: those are what this window compiled
    keep = len(entries)
    while True:
        temporary = tar_path.with_name(tar_path.name + ".tmp")
        with tarfile.open(temporary, "w:gz") as tar:
            for _, name, files in entries[:keep]:
                for f in files:
                    tar.add(f, arcname=f"{name}/{f.name}", recursive=False)
        size = temporary.stat().st_size
        if size <= max_bytes or keep == 0:
            break
        keep = keep * 3 // 4
    os.replace(temporary, tar_path)
    return {"file": tar_path.name, "folders": keep, "left_out": len(entries) - keep, "bytes": size,
            "source": str(cache_dir)}


def unpack_triton_cache(tar_path: Path, cache_dir: Path) -> int:
    """Unpack a :func:`pack_triton_cache` tarball into ``cache_dir``, rewriting the absolute paths
    in its group files (Triton finds a kernel through them) to where the files now are. Members
    other than ``<hash>/<binary file>`` are refused. Returns the number of files unpacked."""
    cache_dir = Path(cache_dir)
    count = 0
    groups = []
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if (not member.isfile() or len(parts) != 2 or any(p in ("", ".", "..") for p in parts)
                    or Path(member.name).is_absolute() or not _is_binary(parts[1])):
                raise ValueError(f"{tar_path}: unexpected member {member.name!r}; expected <hash>/<file> "
                                 f"with one of {', '.join(CACHE_SUFFIXES)}")
            target = cache_dir / parts[0] / parts[1]
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.unpack")
            temporary.write_bytes(tar.extractfile(member).read())
            os.replace(temporary, target)
            count += 1
            if parts[1].startswith(GROUP_PREFIX):
                groups.append(target)
    for group in groups:
        data = json.loads(group.read_text())
        children = data.get("child_paths", {})
        data["child_paths"] = {name: str(group.parent / Path(path).name) for name, path in children.items()
                               if (group.parent / Path(path).name).is_file()}
        temporary = group.with_name(f".{group.name}.unpack")
        temporary.write_text(json.dumps(data))
        os.replace(temporary, group)
    return count


# ------------------------------------------------------------------------------------ the out folder


def check_out_dir(out: Path) -> None:
    """DIR must hold nothing but this command's files: what comes back from a GPU machine is at most
    8 files, and a folder shared with other files would not fit."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: not a folder; expected a folder for the check's {len(OUTPUT_FILES)} files")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if others:
            raise ValueError(f"--out {out} holds other files ({', '.join(others[:5])}); expected an empty folder "
                             f"or one of an earlier check (at most {MAX_FILES} files come back from a GPU machine)")


def _load_libc():
    with contextlib.suppress(OSError):
        return ctypes.CDLL(None, use_errno=True)
    return None


# Loaded here, in the parent: a child between fork and exec must not load libraries.
_LIBC = _load_libc()


def _die_with_parent() -> None:
    """In a child process (``preexec_fn``): SIGKILL when the parent dies (Linux), so a run killed by a
    time limit leaves no worker holding the GPU."""
    with contextlib.suppress(AttributeError):
        _LIBC.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _child_env(quick: bool, extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if quick:
        env["TRITON_INTERPRET"] = "1"
    env.update(extra or {})
    return env


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# ---------------------------------------------------------------------------------- the worker side


class Worker:
    """A worker process (``python -m bench.smoke --worker``) that runs steps sent on its stdin and
    answers with JSON lines; everything it prints goes to the log."""

    def __init__(self, quick: bool, env: dict, log: Callable[[str], None]):
        argv = [sys.executable, "-m", "bench.smoke", "--worker"] + (["--quick"] if quick else [])
        self.env = env
        self.proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=_child_env(quick, env), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        self.messages: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._copy, args=(log,), daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                self.messages.put(json.loads(line))
        self.messages.put(None)  # the worker is gone

    def _copy(self, log) -> None:
        for line in self.proc.stderr:
            log(line.rstrip("\n"))

    def send(self, command: dict) -> None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def next(self, timeout: float):
        return self.messages.get(timeout=max(timeout, 0.01))

    def stop(self) -> None:
        _kill(self.proc)


def worker_main(quick: bool) -> int:
    """The worker's loop: one JSON command per line on stdin, JSON messages on the real stdout;
    what the steps print goes to stderr (the parent's log)."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def emit(message: dict) -> None:
        from bench.report import jsonable

        protocol.write(json.dumps(jsonable(message), allow_nan=False) + "\n")

    for line in sys.stdin:
        command = json.loads(line)
        name = command["step"]
        try:
            summary = WORKER_STEPS[name](command, lambda path, value: emit({"set": path, "value": value}))
            emit({"done": True, "status": "ok", "summary": summary})
        except Exception as exc:  # noqa: BLE001 - a failing step is recorded; the run goes on
            from bench.runner import error_details

            traceback.print_exc()
            emit({"done": True, "status": "error", **error_details(exc)})
    return 0


def _device(command: dict) -> str:
    return "cpu" if command["quick"] else "cuda"


def _context(command: dict, **options):
    from bench.common import BenchContext

    ceilings = command["results"].get("ceilings") or {}
    return BenchContext(device=_device(command), quick=command["quick"], copy_gbps=ceilings.get("copy_gbps"),
                        matmul_tflops=dict(ceilings.get("matmul_tflops") or {}), **options)


def step_environment(command, emit) -> str:
    import hashlib

    import torch
    import triton
    from triton.runtime.cache import triton_key

    from bench import environment

    device = _device(command)
    env = environment.describe(device, environment.utc_now())
    env["date_utc"] = command["results"]["environment"]["date_utc"]  # the run's start, as the folder says
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(sm_count=props.multi_processor_count, compute_capability=f"{props.major}.{props.minor}",
                   memory_gib=props.total_memory / 2**30)
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
        version = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=30).stdout
        env["ptxas"] = version.strip().splitlines()[-1] if version.strip() else None
    except Exception as exc:  # noqa: BLE001 - a missing ptxas is a fact to record
        env["ptxas"] = f"unknown ({type(exc).__name__}: {exc})"
    env["triton_cache_key_sha256"] = hashlib.sha256(triton_key().encode()).hexdigest()
    env["triton_cache_dir"] = str(triton_cache_dir())
    env["cpu_count"] = os.cpu_count()
    emit(["environment"], env)
    return f"{env['device_name']}, torch {env['torch']}, triton {env['triton']}"


def step_ceilings(command, emit) -> str:
    from bench.ceilings import measure_ceilings

    ctx = _context(command)
    section = measure_ceilings(ctx)
    emit(["ceilings"], section)
    rates = ", ".join(f"{k} {v:,.1f}" for k, v in section["matmul_tflops"].items())
    return f"copy {section['copy_gbps']:,.0f} GB/s; matmul TFLOP/s: {rates}"


def step_correctness(command, emit) -> str:
    from bench import correctness

    rows: list[dict] = []
    for check in correctness.checks(command["quick"]):
        print(f"smoke: correctness {check.name}")
        rows += correctness.run_check(check, command["quick"], _device(command))
        emit(["smoke", "correctness"], rows)
    failed = [row for row in rows if not row["passed"]]
    return f"{len(rows) - len(failed)} of {len(rows)} rows passed" + (
        f"; failed: {', '.join(sorted({row['case'] for row in failed}))}" if failed else "")


def _op_benchmarks(command, emit, merge, **options) -> str:
    from bench import runner

    ctx = _context(command, **options)
    selected = runner.select(command["ops"], runner.discover())
    before = command["results"].get("ops") or {"rows": [], "modules": {}}
    section = runner.run_op_benchmarks(ctx, selected, on_progress=lambda s: emit(["ops"], merge(before, s)))
    emit(["ops"], merge(before, section))
    statuses = [f"{op} {status['status']}" for op, status in section["modules"].items()]
    return f"{len(section['rows'])} rows; " + ", ".join(statuses)


def step_headline(command, emit) -> str:
    return _op_benchmarks(command, emit, lambda before, section: section, gpt2_only=True, compile_baselines=False)


def merge_compile_rows(before: dict, section: dict) -> dict:
    """The headline rows with each torch.compile row of ``section`` added, and the Triton rows'
    ``speedup_vs_compile`` filled in from it."""
    compiled = [row for row in section["rows"] if "compile" in row.get("impl", "")]
    rows = [dict(row) for row in before["rows"] if "compile" not in row.get("impl", "")]
    by_case = {(r["op"], r["case"], r["dtype"], r["pass"]): r for r in compiled if r.get("median_ms")}
    for row in rows:
        match = by_case.get((row["op"], row["case"], row["dtype"], row["pass"]))
        if row.get("impl") == "triton" and match and row.get("median_ms"):
            row["speedup_vs_compile"] = match["median_ms"] / row["median_ms"]
    merged_rows = []
    for op in dict.fromkeys([r["op"] for r in rows] + [r["op"] for r in compiled]):
        merged_rows += [r for r in rows if r["op"] == op] + [r for r in compiled if r["op"] == op]
    return {"rows": merged_rows, "modules": before.get("modules", {}),
            "compile_modules": section["modules"]}


def step_compile_columns(command, emit) -> str:
    return _op_benchmarks(command, emit, merge_compile_rows, gpt2_only=True, compile_baselines=True)


def merge_sweep(before: dict, section: dict) -> dict:
    """Each op whose full run finished replaces that op's rows (a full run has its GPT-2 cases too)."""
    done = [op for op, status in section["modules"].items() if status.get("status") == "ok"]
    rows = [row for row in before["rows"] if row["op"] not in done]
    rows += [row for row in section["rows"] if row["op"] in done]
    return {**before, "rows": rows, "modules": {**before.get("modules", {}),
                                                **{op: section["modules"][op] for op in done}}}


def step_sweeps(command, emit) -> str:
    return _op_benchmarks(command, emit, merge_sweep)


def merge_e2e(before: dict | None, section: dict, device: str) -> dict:
    """Two passes of the same step in one section: rows by configuration (kernels, compile), the
    later pass winning, the speedups and headline computed again."""
    from bench.e2e import add_speedups, headline

    if not before or not before.get("rows"):
        return section
    rows = {(r["kernels"], r["compile"]): r for r in before["rows"]}
    rows.update({(r["kernels"], r["compile"]): r for r in section["rows"]})
    merged = {**section, "rows": list(rows.values())}
    add_speedups(merged["rows"])
    merged["headline"] = headline(merged, device)
    return merged


def _e2e(command, emit, only, ablation: str) -> str:
    from bench import e2e

    device, quick = _device(command), command["quick"]
    settings = e2e.settings_for(quick, kernels=command["kernels"], ablation=ablation)
    ceilings = command["results"].get("ceilings") or {}
    before = command["results"].get("e2e")
    section = e2e.run_e2e(settings, device, quick, ceilings.get("matmul_tflops") or {},
                          on_progress=lambda s: emit(["e2e"], merge_e2e(before, s, device)), only=only)
    merged = merge_e2e(before, section, device)
    emit(["e2e"], merged)
    return "; ".join(f"{r['name']}: " + (f"{r['tokens_per_s']:,.0f} tokens/s" if r["status"] == "ok" else r["status"])
                     for r in section["rows"])


def step_e2e(command, emit) -> str:
    return _e2e(command, emit, lambda config: not config.compile, "baselines")


def step_e2e_compiled(command, emit) -> str:
    return _e2e(command, emit, lambda config: config.compile, "baselines")


def step_ablation_each(command, emit) -> str:
    return _e2e(command, emit, None, "each")


def step_autotune(command, emit) -> str:
    """Attention's autotuned tiles at GPT-2's shape (bf16, causal, head dims 64 and 128), written
    out as entries for ``HOPPER_CONFIGS``."""
    import torch

    attention_module = importlib.import_module("gpt_kernels.attention")
    if not attention_module.AUTOTUNE:
        raise RuntimeError("GPT_ATTENTION_AUTOTUNE=1 was not set when the kernels were imported")
    winners, entries = [], []
    for head_dim in (64, 128):
        heads = 768 // head_dim
        q, k, v, do = (torch.randn(16, heads, 1024, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_()
        start = time.perf_counter()
        attention_module.attention(q, k, v, causal=True).backward(do)
        torch.cuda.synchronize()
        tiles, timings = {}, {}
        for kernel, tuner in (("forward", attention_module._forward_autotuned),
                              ("dkdv", attention_module._dkdv_autotuned), ("dq", attention_module._dq_autotuned)):
            best = tuner.best_config
            tiles[kernel] = (best.kwargs["BLOCK_M"], best.kwargs["BLOCK_N"], best.num_warps, best.num_stages)
            timings[kernel] = {f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}": t
                               for c, t in (getattr(tuner, "configs_timings", None) or {}).items()}
        tile = ", ".join(f"{kernel}=Tile{value}" for kernel, value in tiles.items())
        entries.append(f"({head_dim}, torch.bfloat16, True): AttentionConfig({tile}),")
        winners.append({"head_dim": head_dim, "dtype": "bfloat16", "causal": True, "tiles": tiles,
                        "tuning_s": time.perf_counter() - start, "timings_ms": timings,
                        "table": str(attention_module.HOPPER_CONFIGS[(head_dim, torch.bfloat16, True)])})
        emit(["smoke", "autotune"], {"winners": winners, "table_entries": entries})
    return "; ".join(entries)


WORKER_STEPS = {
    "environment": step_environment, "ceilings": step_ceilings, "correctness": step_correctness,
    "headline": step_headline, "e2e": step_e2e, "e2e_compiled": step_e2e_compiled,
    "compile_columns": step_compile_columns, "ablation_each": step_ablation_each, "autotune": step_autotune,
    "sweeps": step_sweeps,
}


# ------------------------------------------------------------------------------ precompile jobs


def precompile_jobs(quick: bool, ops_spec: str) -> list[str]:
    """The jobs that together compile every Triton variant the later steps use: each correctness
    check's kernel half, each op benchmark's GPT-2 cases, and one GPT-2 training step."""
    from bench import correctness, runner

    jobs = [f"check:{check.name}" for check in correctness.checks(quick)]
    jobs += [f"bench:{op}" for op, module in runner.select(ops_spec, runner.discover()).items() if module]
    jobs.append("e2e")
    # On the CPU nothing compiles (the interpreter runs the kernels): two jobs test the pool.
    return jobs[:2] if quick else jobs


def job_main(name: str, quick: bool, kernels: str) -> int:
    """One precompile job (``python -m bench.smoke --job NAME``): run it once, timing nothing."""
    device = "cpu" if quick else "cuda"
    kind, _, arg = name.partition(":")
    if kind == "check":
        from bench import correctness

        correctness.run_kernel(correctness.find_check(arg, quick), quick, device)
    elif kind == "bench":
        from bench import runner
        from bench.common import BenchContext, Timing

        class CompileOnly(BenchContext):
            """Runs each implementation once: the first call compiles, nothing is timed."""

            def time(self, fn):
                fn()
                return Timing(1.0, 1.0, 1.0)

            def peak_memory_mb(self, fn):
                return None

        importlib.import_module(runner.discover()[arg]).run(
            CompileOnly(device=device, quick=quick, gpt2_only=True, compile_baselines=False))
    elif kind == "e2e":
        from dataclasses import replace

        import torch

        from bench import e2e

        settings = replace(e2e.settings_for(quick, kernels=kernels), warmup_steps=1, steps=1)
        gpt_config, _ = e2e.check_settings(settings, device, quick)
        config = e2e.Configuration("kernels on", frozenset(e2e.kernel_set(kernels)), False)
        e2e.measure(config, settings, gpt_config, torch.device(device))
    else:
        raise ValueError(f"unknown precompile job {name!r}")
    return 0


# ----------------------------------------------------------------------------------------- the run


class Smoke:
    """The parent: runs the steps against the budget and keeps DIR's files up to date."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        from bench import environment, report

        self.args, self.quick, self.out = args, args.quick, args.out
        self.start = time.monotonic()
        self.deadline = self.start + args.budget
        self.worker: Worker | None = None
        self.saved_at = 0.0
        self.lock = threading.Lock()
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_file = open(self.out / LOG, "a", buffering=1)
        self.cache_dir = triton_cache_dir()
        now = environment.utc_now()
        device = "cpu" if self.quick else "cuda"
        self.results = {
            "schema_version": report.SCHEMA_VERSION,
            "quick": self.quick,
            "disclaimer": report.QUICK_DISCLAIMER if self.quick else None,
            "command": shlex.join(["python", "-m", "bench", "smoke", *argv]),
            # Replaced by step 1's record (taken in the worker, which owns the GPU).
            "environment": {**environment.describe("cpu", now), "device": device,
                            "device_name": "CPU (--quick)" if self.quick else _gpu_name()},
            "complete": False,
            "smoke": {"budget_s": args.budget, "steps": [], "correctness": [], "triton_cache": None},
        }

    # -- bookkeeping

    def log(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)
            if not self.log_file.closed:  # a worker's last lines may come after the end
                self.log_file.write(text + "\n")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic() - FINISH_S

    def save(self, markdown: bool = True) -> None:
        from bench import report

        report.write_json(self.results, self.out / RESULTS_JSON)
        self.saved_at = time.monotonic()
        if markdown:
            _write_text(self.out / RESULTS_MD, report.render_markdown(self.results, image_prefix=""))

    def set(self, path: list[str], value) -> None:
        target = self.results
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = value
        if time.monotonic() - self.saved_at >= SAVE_EVERY_S:
            self.save()

    # -- the steps

    def run(self) -> int:
        self.log(f"smoke: budget {self.args.budget:.0f} s, saving into {self.out}")
        if self.quick:
            from bench.report import QUICK_DISCLAIMER

            self.log(f"smoke: {QUICK_DISCLAIMER}")
        if self.args.triton_cache:
            count = unpack_triton_cache(self.args.triton_cache, self.cache_dir)
            self.log(f"smoke: unpacked {count} files of {self.args.triton_cache} into {self.cache_dir}")
            self.results["smoke"]["triton_cache_unpacked"] = {"from": str(self.args.triton_cache), "files": count}
        self.save()
        stopped = False
        try:
            for step in STEPS:
                self.run_step(step)
        except (Terminated, KeyboardInterrupt):
            stopped = True
            self.log("smoke: stopped (signal); keeping what is saved")
        finally:
            if self.worker is not None:
                self.worker.stop()
            self.finish(stopped)
        failed = [row for row in self.results["smoke"]["correctness"] if not row["passed"]]
        errors = [s["name"] for s in self.results["smoke"]["steps"] if s["status"] in ("error", "timeout")]
        if failed or errors:
            self.log(f"smoke: {len(failed)} correctness rows failed; steps with errors: {', '.join(errors) or 'none'}")
        return 1 if failed or errors or stopped else 0

    def run_step(self, step: Step) -> None:
        entry = {"name": step.name, "title": step.title,
                 "estimate_s": step.quick_estimate_s if self.quick else step.estimate_s, "limit_s": step.limit_s}
        self.results["smoke"]["steps"].append(entry)
        left = self.left()
        if step.gpu_only and self.quick:
            entry.update(status="skipped: needs a GPU")
        elif step.name in self.args.skip:
            entry.update(status="skipped: --skip")
        elif entry["estimate_s"] > left:
            entry.update(status="skipped: budget", left_s=max(left, 0.0))
        if "status" in entry:
            self.log(f"smoke: {step.title}: {entry['status']}")
            self.save()
            return
        limit = min(step.limit_s, left)
        entry.update(status="unfinished", limit_s=limit, started_s=self.elapsed())
        self.save()
        self.log(f"smoke: {step.title} (estimate {entry['estimate_s']:.0f} s, limit {limit:.0f} s)")
        start = time.monotonic()
        try:
            if step.where == "parent":
                outcome = PARENT_STEPS[step.name](self, start + limit)
            else:
                outcome = self.in_worker(step, start + limit)
        except Exception as exc:  # noqa: BLE001 - a step that fails is recorded; the next one runs
            from bench.runner import error_details

            outcome = {"status": "error", **error_details(exc)}
        finally:
            entry["seconds"] = time.monotonic() - start
        entry.update(outcome)
        self.log(f"smoke: {step.title}: {entry['status']} in {entry['seconds']:.1f} s"
                 + (f": {entry.get('summary') or entry.get('error')}" if entry.get("summary") or entry.get("error")
                    else ""))
        self.save()

    def in_worker(self, step: Step, deadline: float) -> dict:
        env = dict(step.env)
        if self.worker is not None and (self.worker.env != env or self.worker.proc.poll() is not None):
            self.worker.stop()
            self.worker = None
        if self.worker is None:
            self.worker = Worker(self.quick, env, self.log)
        command = {"step": step.name, "quick": self.quick, "ops": self.args.ops, "kernels": self.args.kernels,
                   "results": {key: self.results.get(key) for key in ("environment", "ceilings", "ops", "e2e")}}
        try:
            self.worker.send(command)
        except BrokenPipeError:
            pass  # it died: the next message says so
        while True:
            try:
                message = self.worker.next(deadline - time.monotonic())
            except queue.Empty:
                self.worker.stop()
                self.worker = None
                return {"status": "timeout", "error": f"over its {step.limit_s:.0f} s limit (or the budget): stopped"}
            if message is None:
                code = self.worker.proc.wait()
                self.worker = None
                return {"status": "error", "error": f"the worker died (exit status {code}); see {LOG}"}
            if "set" in message:
                self.set(message["set"], message["value"])
            elif message.get("done"):
                return {key: value for key, value in message.items() if key != "done"}

    # -- the parent's own steps

    def precompile(self, deadline: float) -> dict:
        jobs = precompile_jobs(self.quick, self.args.ops)
        workers = max(1, min(os.cpu_count() or 1, 16, len(jobs)))
        self.log(f"smoke: precompiling in {workers} processes: {', '.join(jobs)}")
        pending, running, done = list(jobs), {}, []
        record = {"workers": workers, "jobs": done}
        try:
            self._run_jobs(pending, running, done, record, workers, deadline)
        finally:  # a signal must not leave jobs compiling beside what runs next
            for proc, _ in running.values():
                _kill(proc)
        self.set(["smoke", "precompile"], record)
        self.pack_cache()
        bad = [job["job"] for job in done if job["status"] != "ok"]
        summary = f"{len(done) - len(bad)} of {len(done)} jobs ok" + (f"; not ok: {', '.join(bad)}" if bad else "")
        if any(job["status"] in ("timeout", "not started") for job in done):
            return {"status": "timeout", "summary": summary}
        return {"status": "error" if bad else "ok", "summary": summary}

    def _run_jobs(self, pending: list, running: dict, done: list, record: dict, workers: int,
                  deadline: float) -> None:
        while pending or running:
            while pending and len(running) < workers:
                name = pending.pop(0)
                argv = [sys.executable, "-m", "bench.smoke", "--job", name, "--kernels", self.args.kernels]
                argv += ["--quick"] if self.quick else []
                running[name] = (subprocess.Popen(argv, cwd=REPO_ROOT, env=_child_env(self.quick),
                                                  stdout=self.log_file, stderr=subprocess.STDOUT,
                                                  start_new_session=True, preexec_fn=_die_with_parent),
                                 time.monotonic())
            for name, (proc, started) in list(running.items()):
                if proc.poll() is not None:
                    done.append({"job": name, "status": "ok" if proc.returncode == 0 else "error",
                                 "exit_status": proc.returncode, "seconds": time.monotonic() - started})
                    del running[name]
            if time.monotonic() > deadline:
                for name, (proc, started) in running.items():
                    _kill(proc)
                    done.append({"job": name, "status": "timeout", "seconds": time.monotonic() - started})
                done += [{"job": name, "status": "not started"} for name in pending]
                running.clear()
                pending.clear()
            self.results["smoke"]["precompile"] = record
            time.sleep(0.2)

    def tests(self, deadline: float) -> dict:
        with tempfile.TemporaryDirectory() as scratch:
            junit = Path(scratch) / "junit.xml"
            argv = [sys.executable, "-m", "pytest", "-m", "gpu_smoke", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}"]
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=_child_env(False), stdout=self.log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                return {"status": "timeout", "error": f"pytest -m gpu_smoke ran past its limit; see {LOG}"}
            finally:
                _kill(proc)  # its whole process group, whatever it started
            summary = parse_junit(junit) if junit.is_file() else {"error": f"no report (exit status {proc.returncode})"}
        summary["exit_status"] = proc.returncode
        self.set(["smoke", "tests"], summary)
        ok = proc.returncode == 0
        text = ", ".join(f"{summary.get(k, 0)} {k}" for k in ("passed", "failed", "errors", "skipped"))
        return {"status": "ok" if ok else "error", "summary": text}

    # -- the end

    def pack_cache(self) -> None:
        if not self.cache_dir.is_dir():
            self.results["smoke"]["triton_cache"] = {"file": None, "note": f"no cache at {self.cache_dir}"}
            return
        packed = pack_triton_cache(self.cache_dir, self.out / CACHE_TAR)
        self.results["smoke"]["triton_cache"] = packed
        self.log(f"smoke: {CACHE_TAR}: {packed['folders']} kernels, {packed['bytes'] / 2**20:.1f} MiB")

    def finish(self, stopped: bool) -> None:
        from bench.plots import render_sheet

        self.results["smoke"]["seconds"] = self.elapsed()
        if not stopped:
            self.results["complete"] = True
        with contextlib.suppress(Exception):
            self.pack_cache()
        try:
            self.results["plots"] = [SHEET] if render_sheet(self.results, self.out / SHEET) else []
        except Exception as exc:  # noqa: BLE001 - a plot that fails must not cost the results
            self.log(f"smoke: plots failed: {type(exc).__name__}: {exc}")
            self.results["plots"] = []
        self.save()
        self.log(f"smoke: done in {self.elapsed():.0f} s; `python -m bench report --results {self.out}` "
                 "renders it into bench/RESULTS.md")
        self.log_file.close()


PARENT_STEPS = {"precompile": Smoke.precompile, "tests": Smoke.tests}


def parse_junit(path: Path) -> dict:
    """Counts and failures of a pytest JUnit XML report."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for suite in suites:
        counts["tests"] += int(suite.get("tests", 0))
        counts["failed"] += int(suite.get("failures", 0))
        counts["errors"] += int(suite.get("errors", 0))
        counts["skipped"] += int(suite.get("skipped", 0))
        for case in suite.iter("testcase"):
            for tag in ("failure", "error"):
                problem = case.find(tag)
                if problem is not None:
                    message = (problem.get("message") or "").splitlines()
                    failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": tag,
                                     "message": message[0][:300] if message else ""})
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return {**counts, "failures": failures}


def _gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    return out.splitlines()[0].strip() if out else "CUDA GPU"


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench smoke", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole command (default {DEFAULT_BUDGET_S}); a step whose estimate "
                        "exceeds what is left is skipped")
    p.add_argument("--out", type=Path, required=True, help="folder of the check's files (empty, or an earlier check's)")
    p.add_argument("--triton-cache", type=Path, help="a triton-cache.tar.gz of an earlier check, unpacked first")
    p.add_argument("--quick", action="store_true", help="CPU, Triton's interpreter, toy sizes: the plumbing only")
    p.add_argument("--ops", default="all", help="op benchmarks of the headline, compile and sweep steps (default all)")
    p.add_argument("--kernels", default="all", help="the end-to-end step's kernels (default all)")
    p.add_argument("--skip", default="", help=f"steps to leave out, comma-separated: {', '.join(STEP_NAMES)}")
    args = p.parse_args(argv)
    if not args.budget > 0:
        raise ValueError(f"--budget {args.budget:g}: expected a positive number of seconds")
    args.skip = [name.strip() for name in args.skip.split(",") if name.strip()]
    unknown = [name for name in args.skip if name not in STEP_NAMES]
    if unknown:
        raise ValueError(f"--skip {','.join(unknown)}: unknown step; expected names from {', '.join(STEP_NAMES)}")
    if args.triton_cache is not None and not args.triton_cache.is_file():
        raise FileNotFoundError(f"--triton-cache {args.triton_cache}: no such file")
    check_out_dir(args.out)
    from bench import e2e, runner
    from gpt_kernels import registry

    runner.select(args.ops, runner.discover())
    registry.parse_kernels(args.kernels)
    if not args.quick:
        import torch

        if not torch.cuda.is_available():
            raise ValueError("no CUDA GPU: the check needs one (--quick runs its plumbing on the CPU)")
    e2e.check_settings(e2e.settings_for(args.quick, kernels=args.kernels), "cpu" if args.quick else "cuda", args.quick)
    return args


def main(argv: list[str]) -> int:
    """``python -m bench smoke ...`` (bad options raise ValueError for the caller's one error line)."""
    args = parse_args(argv)
    smoke = Smoke(args, argv)

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return smoke.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _child_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.smoke", description="a worker or precompile job of the check")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--job")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--kernels", default="all")
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.quick)
    return job_main(args.job, args.quick, args.kernels)


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
