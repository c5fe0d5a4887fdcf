"""Find the per-op benchmark modules (``bench/bench_<op>.py``) and run them, one failure at a time.

Each module exposes ``run(ctx: BenchContext) -> list[dict]``. A module that is missing, fails to
import or raises is recorded in the results (its status, the error and the end of its traceback)
and the run goes on with the next one: one broken benchmark must not cost the whole run's figures.
What a module prints (e.g. why a competitor is skipped) is shown and kept as the module's notes.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

from bench.common import UNFINISHED, UNFINISHED_ERROR, BenchContext
from gpt_kernels.registry import OPS

BENCH_DIR = Path(__file__).resolve().parent
TRACEBACK_LINES = 12  # enough to find the failing line, short enough for a results file


def discover(directory: Path = BENCH_DIR) -> dict[str, str]:
    """op name -> module name for every ``bench_<op>.py`` in ``directory``, in the registry's op
    order (then any other op alphabetically)."""
    found = {path.stem.removeprefix("bench_"): f"bench.{path.stem}" for path in directory.glob("bench_*.py")}
    ordered = [op for op in OPS if op in found] + sorted(op for op in found if op not in OPS)
    return {op: found[op] for op in ordered}


def select(spec: str | None, available: dict[str, str]) -> dict[str, str | None]:
    """The ops ``spec`` asks for, in the registry's syntax (``all``, ``none``, ``gelu,attention``,
    ``all,-adamw``), each with its module name, or None when the op has no benchmark module (it is
    then reported as missing). ``all`` is every registered op and every module found."""
    known = list(OPS) + [op for op in available if op not in OPS]
    chosen: list[str] = []
    for raw in (spec or "all").split(","):
        name = raw.strip().lower()
        if not name:
            continue
        remove = name.startswith("-")
        name = name.lstrip("-")
        if name == "none" and not remove:
            chosen = []
            continue
        if name == "all":
            names = known
        elif name in known:
            names = [name]
        else:
            raise ValueError(
                f"--ops {spec!r}: unknown op {name!r}; expected 'all', 'none' or a comma list of "
                f"{', '.join(known)} (prefix a name with '-' to leave it out)"
            )
        if remove:
            chosen = [op for op in chosen if op not in names]
        else:
            chosen += [op for op in names if op not in chosen]
    return {op: available.get(op) for op in known if op in chosen}


class _Tee(io.TextIOBase):
    """Writes through to ``stream`` and keeps a copy, so a module's messages are shown and recorded."""

    def __init__(self, stream):
        self.stream = stream
        self.copy = io.StringIO()

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.copy.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def _free_memory(ctx: BenchContext) -> None:
    """Drop what the previous module left behind (tensors, compiled graphs) before the next runs."""
    gc.collect()
    torch._dynamo.reset()
    if ctx.is_gpu:
        torch.cuda.empty_cache()


def error_details(exc: BaseException) -> dict:
    """A failure as the results record it: the error, and the end of its traceback."""
    lines = traceback.format_exception(exc)
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": "".join(lines[-TRACEBACK_LINES:])}


def run_module(ctx: BenchContext, op: str, module_name: str | None) -> tuple[list[dict], dict]:
    """Rows of one op's benchmark, and its status: ok, missing or error (with the error)."""
    if module_name is None:
        return [], {"status": "missing", "error": f"no benchmark module bench/bench_{op}.py"}
    start = time.perf_counter()
    tee = _Tee(sys.stdout)
    status: dict = {"module": module_name}
    rows: list[dict] = []
    try:
        with contextlib.redirect_stdout(tee):
            module = importlib.import_module(module_name)
            result = module.run(ctx)
        if not isinstance(result, list) or not all(isinstance(row, dict) for row in result):
            raise TypeError(f"{module_name}.run returned {type(result).__name__}, expected a list of row dicts")
        rows = result
        status["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failing benchmark is a result, not the end of the run
        status.update(status="error", **error_details(exc))
        print(f"bench: {op}: {status['error']}")
    finally:
        _free_memory(ctx)
    status.update(
        seconds=time.perf_counter() - start,  # the module's wall time, compile and autotune included
        rows=len(rows),
        notes=[line for line in tee.copy.getvalue().splitlines() if line.strip()],
    )
    return rows, status


def run_op_benchmarks(ctx: BenchContext, selected: dict[str, str | None],
                      on_progress: Callable[[dict], None] | None = None) -> dict:
    """The results' ``ops`` section: every row, and each module's status. ``on_progress(section)`` is
    called before each module (which is marked unfinished until it returns), after each row it makes,
    and after the last module, so a caller can save the section as it grows."""
    section = {"rows": [], "modules": {}}
    for op, module_name in selected.items():
        print(f"bench: {op} ({module_name or 'missing'})")
        if on_progress is not None:
            section["modules"][op] = {"status": UNFINISHED, "module": module_name, "error": UNFINISHED_ERROR}
            made: list[dict] = []  # this module's rows so far, saved beside the finished modules' ones

            def save_row(row: dict) -> None:
                made.append(row)
                on_progress({**section, "rows": section["rows"] + made})

            ctx.on_row = save_row
            on_progress(section)
        try:
            rows, status = run_module(ctx, op, module_name)
        finally:
            ctx.on_row = None
        section["rows"] += rows
        section["modules"][op] = status
    if on_progress is not None:
        on_progress(section)
    return section
