"""What every benchmark shares: the loop that times each case, timing done right, and one record format.

A per-op benchmark module (``bench/bench_<op>.py``) holds only what is particular to its op: its
cases and their inputs (:class:`Case`), a bytes or FLOP formula, and its competitors. Its
``run(ctx: BenchContext) -> list[dict]`` hands the cases to :func:`run_cases`, which times every
pass of every implementation, computes the speedups and records the rows, so every op lands in one
JSON file, one table and one set of plots. ``python -m bench.bench_<op> [--quick]`` runs one module
alone (:func:`run_standalone`).

Timing on a GPU is ``triton.testing.do_bench`` asked for the median (its default is the mean),
which clears the L2 cache before every repetition: GPT-2-sized tensors fit in an H100's 50 MB L2,
and a figure measured from L2 is not HBM's. On the CPU (``--quick``) timings only check that the
harness runs end to end; they are no performance claim.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, TypeVar

import torch

_main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
if _main_spec is not None and _main_spec.name.startswith("bench.bench_") and not torch.cuda.is_available():
    # ``python -m bench.bench_<op>`` without a GPU runs the kernels in Triton's interpreter, which
    # Triton picks when the kernels are decorated: every bench module imports this before any kernel.
    os.environ.setdefault("TRITON_INTERPRET", "1")

PASSES = ("forward", "backward", "forward+backward")

# The table columns of a memory-bound op timed against eager PyTorch and torch.compile (GB/s rows).
BANDWIDTH_COLUMNS = ["case", "dtype", "pass", "impl", "median_ms", "gb_per_s", "fraction_of_copy_bw",
                     "speedup_vs_eager", "speedup_vs_compile", "first_call_s", "error"]

# The status of an op module or an end-to-end configuration while it runs, as a run saves its results
# as it goes: one killed there (e.g. by a time limit) leaves it so in its results.json.
UNFINISHED = "unfinished"
UNFINISHED_ERROR = "the run stopped while this was running (killed, e.g. by a time limit, or interrupted)"


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


@dataclass
class Measurement:
    """One implementation measured on one case (see :meth:`BenchContext.measure`)."""

    timing: Timing
    first_call_s: float  # the first call's wall seconds: compilation, JIT and autotuning, not in ``timing``
    peak_memory_mb: float | None


Result = TypeVar("Result")


@dataclass
class BenchContext:
    device: str
    quick: bool
    copy_gbps: float | None = None  # measured device-to-device copy bandwidth, bytes read + written
    matmul_tflops: dict[str, float] = field(default_factory=dict)  # measured matmul rate per dtype name
    # Called with every row as record/failure make it: the harness saves a module's rows as they come,
    # so a run killed in the middle of a long module keeps them.
    on_row: Callable[[dict], None] | None = None
    # The GPU check's narrower passes (``python -m bench smoke``): with ``gpt2_only`` each module runs
    # only its GPT-2 case(s); without ``compile_baselines`` no torch.compile implementation is built.
    gpt2_only: bool = False
    compile_baselines: bool = True

    @property
    def is_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def compiles(self) -> bool:
        """Whether the torch.compile baselines run: on a GPU, unless switched off."""
        return self.is_gpu and self.compile_baselines

    def gpu_cases(self, cases: list, gpt2: int = 1) -> list:
        """A module's GPU cases, or with ``gpt2_only`` its first ``gpt2`` ones (GPT-2's shapes come first)."""
        return list(cases[:gpt2]) if self.gpt2_only else list(cases)

    def time(self, fn: Callable[[], object]) -> Timing:
        """Median time of ``fn()`` with warm-up excluded (and on a GPU, L2 flushed before each rep)."""
        if self.is_gpu:
            import triton.testing

            median, p20, p80 = triton.testing.do_bench(
                fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8], return_mode="median"
            )
            return Timing(median, p20, p80)
        fn()  # warm-up: first-call work (compilation, allocation) is not what we time
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        samples.sort()
        return Timing(statistics.median(samples), samples[0], samples[-1])

    def warm_up(self, fn: Callable[[], object]) -> float:
        """Run ``fn()`` once and wait for the device: where torch.compile compiles and Triton JIT-compiles
        and autotunes. Returns its wall seconds, for a row to report (e.g. as ``first_call_s``) beside
        timings that exclude it."""
        start = time.perf_counter()
        fn()
        if self.is_gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def peak_memory_mb(self, fn: Callable[[], object]) -> float | None:
        """Peak device memory allocated while ``fn()`` runs, above what was allocated before it."""
        if not self.is_gpu:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20

    def record(
        self,
        *,
        op: str,
        case: str,
        dtype: torch.dtype | str,
        pass_: str,
        impl: str,
        timing: Timing,
        bytes_moved: float | None = None,
        flops: float | None = None,
        peak_memory_mb: float | None = None,
        **extra,
    ) -> dict:
        """One row: time, and GB/s (from the fewest bytes the pass must move) or TFLOP/s, with the
        fraction of this device's measured ceiling. ``pass_`` is 'forward', 'backward' or 'forward+backward'."""
        dtype_name = str(dtype).replace("torch.", "")
        seconds = timing.median_ms / 1e3
        row = {
            "op": op,
            "case": case,
            "dtype": dtype_name,
            "pass": pass_,
            "impl": impl,
            "median_ms": timing.median_ms,
            "p20_ms": timing.p20_ms,
            "p80_ms": timing.p80_ms,
            "peak_memory_mb": peak_memory_mb,
        }
        if bytes_moved is not None:
            row["gb_per_s"] = bytes_moved / seconds / 1e9
            row["fraction_of_copy_bw"] = row["gb_per_s"] / self.copy_gbps if self.copy_gbps else None
        if flops is not None:
            row["tflop_per_s"] = flops / seconds / 1e12
            ceiling = self.matmul_tflops.get(dtype_name)
            row["fraction_of_matmul"] = row["tflop_per_s"] / ceiling if ceiling else None
        row.update(extra)
        return self._made(row)

    def _made(self, row: dict) -> dict:
        if self.on_row is not None:
            self.on_row(row)
        return row


    def failure(self, *, op: str, case: str, dtype: torch.dtype | str, pass_: str, impl: str,
                exc: BaseException) -> dict:
        """A row for an implementation that failed on one case (e.g. torch.compile could not compile
        it): its error in place of the figures, so the op's other rows are kept and the table says why."""
        return self._made({"op": op, "case": case, "dtype": str(dtype).replace("torch.", ""), "pass": pass_,
                           "impl": impl, "median_ms": None, "p20_ms": None, "p80_ms": None, "peak_memory_mb": None,
                           "error": f"{type(exc).__name__}: {exc}"})

    def measure(self, step: Callable[[], object], memory: bool = True) -> Measurement:
        """``step``'s first call (:meth:`warm_up`), then its timing and, when ``memory``, its peak memory."""
        first_call_s = self.warm_up(step)
        timing = self.time(step)
        return Measurement(timing, first_call_s, self.peak_memory_mb(step) if memory else None)

    def attempt(self, rows: list[dict], fn: Callable[[], Result], *, op: str, case: str,
                dtype: torch.dtype | str, pass_: str, impl: str) -> Result | None:
        """``fn()`` (e.g. building one implementation's step and measuring it), or None after appending
        its :meth:`failure` row to ``rows`` when it raises: torch.compile cannot compile it, a competitor
        rejects the shape, the device runs out of memory. So one failing implementation costs its row,
        not the op's other rows. Only ``Exception`` is caught: an interrupt still stops the run."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failing implementation is a result, not the op's end
            rows.append(self.failure(op=op, case=case, dtype=dtype, pass_=pass_, impl=impl, exc=exc))
            print(f"bench: {op} {case} {pass_} {impl}: {rows[-1]['error']}")
            return None


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as aligned text columns (floats to 4 significant digits)."""
    cells = [columns] + [
        [f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in cells)


def run_standalone(run: Callable[[BenchContext], list[dict]], argv: list[str], columns: list[str]) -> None:
    """``python -m bench.bench_<op> [--quick]``: on a GPU, this device's ceilings first (so the rows carry
    their fractions), then one op's benchmark as a table. Without a GPU, --quick is implied."""
    from bench.ceilings import measure_ceilings

    quick = "--quick" in argv or not torch.cuda.is_available()
    ctx = BenchContext(device="cuda" if torch.cuda.is_available() else "cpu", quick=quick)
    if ctx.is_gpu:
        ceilings = measure_ceilings(ctx)
        rates = ", ".join(f"{name} {rate:.0f}" for name, rate in ceilings["matmul_tflops"].items())
        print(f"copy bandwidth: {ceilings['copy_gbps']:.0f} GB/s; matmul TFLOP/s: {rates}")
    else:
        print("CPU quick mode (Triton interpreter, toy sizes): these figures are not performance claims")
    print(format_table(run(ctx), columns))


def competitors(ctx: BenchContext, eager: Callable, triton_fn: Callable,
                installed: dict[str, Callable[[], Callable]] | None = None) -> tuple[dict, list[str]]:
    """The implementations one op is timed with, baselines first (rows report speedups over them):
    eager PyTorch; on a GPU its ``torch.compile`` and every installed competitor (``installed`` maps a
    name to a loader that returns the callable or raises); then our Triton kernel where it can run.
    Also returns why any of them is missing. Call once per case: compiled ones are fresh."""
    impls, skipped = {"eager": eager}, []
    if ctx.compiles:
        # Dynamo keeps compiled variants on the eager function's code object and falls back to eager
        # past its recompile limit: start each case from an empty cache so every row is really compiled.
        torch._dynamo.reset()
        impls["torch.compile"] = torch.compile(eager, fullgraph=True, dynamic=False)
    elif ctx.is_gpu:
        skipped.append("torch.compile: left out of this pass (python -m bench smoke times it in a later one)")
    else:
        skipped.append("torch.compile: skipped on the CPU quick mode (compiling takes longer than the whole run)")
    if ctx.is_gpu:
        for name, load in (installed or {}).items():
            try:
                impls[name] = load()
            except ImportError:
                pass  # not installed: nothing to say
            except Exception as exc:  # installed but broken (e.g. built for another triton): say why
                skipped.append(f"{name}: failed to load: {type(exc).__name__}: {exc}")
    add_triton(ctx, impls, skipped, triton_fn)
    return impls, skipped


def add_triton(ctx: BenchContext, impls: dict, skipped: list[str], fn: Callable) -> None:
    """``impls["triton"] = fn`` where Triton can run on ``ctx.device``; else say why in ``skipped``."""
    from gpt_kernels import registry

    if registry.triton_runs_on(ctx.device):
        impls["triton"] = fn
    else:
        skipped.append(f"triton: cannot run on {ctx.device} (no CUDA, TRITON_INTERPRET=1 not set at import)")


def autograd_step(pass_: str, forward: Callable[[], object], inputs: Sequence[torch.Tensor], grads) -> Callable:
    """A no-argument callable that runs ``pass_`` of ``forward()`` once: the forward alone, the
    backward alone (over one graph built here and kept), or both; gradients of ``inputs`` for ``grads``."""
    if pass_ == "forward":
        return forward
    if pass_ == "backward":
        outputs = forward()
        return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), inputs, grads)


@dataclass
class Case:
    """One shape (and dtype) of an op, as its bench module describes it; :func:`run_cases` times it.

    ``step(pass_, fn)`` returns a no-argument callable running ``pass_`` of the implementation ``fn``
    once (on inputs made for it or shared by the case). ``bytes_moved(pass_)`` (the fewest bytes the
    pass must move) or ``flops(pass_)`` turn times into GB/s or TFLOP/s. Every row gets
    ``speedup_vs_<b>`` for each of ``baselines`` that ran in its pass (the first one always, None when
    it failed); ``compare_memory`` adds ``memory_vs_<first baseline>``. ``columns`` go into every row,
    ``row_columns(measurement, step)`` computes more per row (e.g. kernel launches)."""

    name: str
    dtype: torch.dtype | str
    impls: dict[str, Callable]
    step: Callable[[str, Callable], Callable[[], object]]
    passes: Sequence[str] = PASSES
    bytes_moved: Callable[[str], float] | None = None
    flops: Callable[[str], float] | None = None
    baselines: Sequence[str] = ("eager", "torch.compile")
    compare_memory: bool = False
    memory: bool = True  # measure the peak memory of each step
    columns: dict = field(default_factory=dict)
    row_columns: Callable[[Measurement, Callable], dict] | None = None
    skip: Callable[[str, str], bool] | None = None  # (pass_, impl) -> leave that row out


def _speedup_column(baseline: str) -> str:
    return "speedup_vs_" + baseline.replace("torch.compile", "compile").replace(" ", "_").replace("-", "_")


def add_speedups(rows: list[dict], baselines: Sequence[str], compare_memory: bool = False) -> None:
    """Fill the ratios of one pass's rows over its baselines' (see :class:`Case`); failure rows get none."""
    timed = {row["impl"]: row for row in rows if row.get("median_ms") is not None}
    for row in timed.values():
        for i, baseline in enumerate(baselines):
            if i == 0 or baseline in timed:
                base_ms = timed[baseline]["median_ms"] if baseline in timed else None
                row[_speedup_column(baseline)] = base_ms / row["median_ms"] if base_ms else None
        if compare_memory:
            base = timed.get(baselines[0], {}).get("peak_memory_mb")
            peak = row.get("peak_memory_mb")
            row["memory_vs_" + baselines[0]] = base / peak if base and peak else None


def run_cases(ctx: BenchContext, op: str, cases: Iterable[Case], skipped: Sequence[str] = ()) -> list[dict]:
    """The one benchmark loop: every pass of every implementation of every case, measured (its first
    call, which compiles and autotunes, outside the timed region), with speedups over the case's
    baselines. One implementation failing on one case costs that row only (see :meth:`BenchContext.attempt`)."""
    for reason in skipped:
        print(f"bench_{op}: {reason}")
    rows: list[dict] = []
    for case in cases:  # a generator: each case's inputs exist only while it runs
        for pass_ in case.passes:
            pass_rows: list[dict] = []
            for impl, fn in case.impls.items():
                if case.skip is not None and case.skip(pass_, impl):
                    continue
                key = dict(op=op, case=case.name, dtype=case.dtype, pass_=pass_, impl=impl)

                def measure(fn=fn):
                    step = case.step(pass_, fn)
                    measured = ctx.measure(step, memory=case.memory)
                    return measured, (case.row_columns(measured, step) if case.row_columns else {})

                result = ctx.attempt(pass_rows, measure, **key)
                if result is None:
                    continue
                measured, more = result
                pass_rows.append(ctx.record(
                    **key, timing=measured.timing,
                    bytes_moved=case.bytes_moved(pass_) if case.bytes_moved else None,
                    flops=case.flops(pass_) if case.flops else None,
                    peak_memory_mb=measured.peak_memory_mb, **case.columns, **more,
                    first_call_s=measured.first_call_s,
                ))
            add_speedups(pass_rows, case.baselines, case.compare_memory)
            rows += pass_rows
    return rows


def module_runner(module_name: str) -> Callable[[BenchContext], list[dict]]:
    """``run(ctx)`` for a bench module that holds ``OP``, ``cases(ctx)`` and ``implementations(ctx)``
    (-> impls, why any are missing), looked up at each run: a test may replace them."""
    def run(ctx: BenchContext) -> list[dict]:
        module = sys.modules[module_name]
        return run_cases(ctx, module.OP, module.cases(ctx), module.implementations(ctx)[1])
    return run


def with_unfused_residual(norm: Callable) -> Callable:
    """A competitor's row norm without a fused residual, ``norm(x, *params, eps)``, called as the fused
    ones are: ``fn(x, *params, eps, residual=None)`` adds the residual first (one more full pass) and
    then returns (y, the stream)."""
    def fn(x, *params_and_eps, residual=None):
        if residual is None:
            return norm(x, *params_and_eps)
        stream = x + residual
        return norm(stream, *params_and_eps), stream
    return fn


def residual_norm_bytes(pass_: str, n_rows: int, n_cols: int, dtypes, with_residual: bool, n_params: int) -> int:
    """The fewest bytes a row norm with an optional fused residual must move (LayerNorm, RMSNorm).

    ``dtypes`` is (x, residual/stream, parameter) dtype; ``n_params`` the width-sized parameters
    (weight and bias: 2; weight alone: 1). M = rows·width elements; per-row statistics are left out.
    Forward reads x (and the residual), writes y (and the stream) and reads the parameters; backward
    reads dy and the normalized stream (and the stream's own gradient), writes dx (and dresidual when
    its dtype differs from dx's), reads the weight and writes every parameter's gradient."""
    x_dtype, residual_dtype, param_dtype = dtypes
    stream_size = (torch.promote_types(x_dtype, residual_dtype) if with_residual else x_dtype).itemsize
    x_size, residual_size = x_dtype.itemsize, residual_dtype.itemsize
    m, params = n_rows * n_cols, n_cols * param_dtype.itemsize
    if with_residual:
        forward = m * (x_size + residual_size + 2 * stream_size) + n_params * params
        dresidual = residual_size if residual_dtype != x_dtype else 0
        backward = m * (3 * stream_size + x_size + dresidual) + (n_params + 1) * params
    else:
        forward = m * 2 * x_size + n_params * params
        backward = m * 3 * x_size + (n_params + 1) * params
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[pass_]


def residual_norm_cases(ctx: BenchContext, shapes, dtype_triples, n_params: int, eps: float,
                        implementations: Callable[[BenchContext, bool], tuple[dict, list[str]]]):
    """The cases of a row norm with an optional fused residual (LayerNorm, RMSNorm): every (rows, width)
    of ``shapes`` in every (x, residual/stream, parameter) dtype triple, plain and with the residual
    (a mixed triple only with it). Implementations are called ``fn(x, *params, eps, residual=...)``
    with ``n_params`` width-sized parameters; ``implementations(ctx, with_residual)`` picks them."""
    for n_rows, n_cols in shapes:
        for dtypes in dtype_triples:
            x_dtype, residual_dtype, param_dtype = dtypes
            dtype_name = str(x_dtype).replace("torch.", "") + ("" if len(set(dtypes)) == 1 else "+fp32")
            for with_residual in (False, True):
                if not with_residual and len(set(dtypes)) > 1:
                    continue  # the mixed case exists only with the residual stream

                def randn(*shape, dtype, requires_grad=True):
                    return torch.randn(shape, device=ctx.device, dtype=dtype, requires_grad=requires_grad)

                x = randn(n_rows, n_cols, dtype=x_dtype)
                params = [randn(n_cols, dtype=param_dtype) for _ in range(n_params)]
                residual = randn(n_rows, n_cols, dtype=residual_dtype) if with_residual else None
                stream_dtype = torch.promote_types(x_dtype, residual_dtype) if with_residual else x_dtype
                grads = [randn(n_rows, n_cols, dtype=stream_dtype, requires_grad=False)
                         for _ in range(2 if with_residual else 1)]
                leaves = [t for t in (x, residual, *params) if t is not None]

                def step(pass_, fn, x=x, residual=residual, params=params, grads=grads, leaves=leaves):
                    def forward():
                        out = fn(x, *params, eps, residual=residual)
                        return list(out) if isinstance(out, tuple) else [out]
                    return autograd_step(pass_, forward, leaves, grads)

                yield Case(
                    name=f"({n_rows}, {n_cols})" + (" +residual" if with_residual else ""), dtype=dtype_name,
                    impls=implementations(ctx, with_residual)[0], step=step,
                    bytes_moved=lambda pass_, n_rows=n_rows, n_cols=n_cols, dtypes=dtypes, r=with_residual:
                        residual_norm_bytes(pass_, n_rows, n_cols, dtypes, r, n_params),
                )
