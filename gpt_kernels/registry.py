"""Which implementation each op runs: its Triton kernel or its pure-PyTorch reference.

One syntax everywhere: ``all``, ``none``, or a comma list of op names, where a name
prefixed with ``-`` switches that op off (``all,-attention`` = every kernel but attention).
It can be set three ways:

* the CLI flag ``--kernels SPEC`` (``train_gpt2.py`` and ``python -m bench`` call :func:`set_kernels`),
* the environment variable ``GPT_KERNELS=SPEC`` (read once, at import),
* the context manager ``with use_kernels(SPEC): ...``.

A requested Triton kernel still falls back to its reference when it cannot run: the op has no
Triton version yet, or the tensors live on the CPU and Triton's interpreter is off. Each
fallback is reported once (a warning), and :func:`report` prints the whole table.

Each op module registers itself once (:func:`register`): its name, its reference, its Triton
version and how to find a call's device. That one entry is the op everywhere: the spec's names, the
report's rows, ``ops.<name>``, and ``gpt_kernels.<name>`` / ``<name>_reference`` (the package exports
what was registered, in the order ``gpt_kernels/__init__.py`` imports the op modules: the order of
every table we print).

Callers reach ops through ``ops``: ``ops.layernorm(x, w, b)`` picks the implementation from the
switch and the device of the call (its first tensor argument, by default) at call time, so a model
never changes when a kernel is swapped.
"""

from __future__ import annotations

import collections.abc
import contextlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

# Triton picks its interpreter when a kernel is *decorated*, so what counts is the setting
# at the time the kernel modules were imported, not whatever the environment says later.
TRITON_INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run kernels in this environment, or None if it can."""
    import numpy
    import triton

    numpy_version = tuple(int(part) for part in numpy.__version__.split(".")[:2])
    if triton.__version__.startswith("3.6.") and numpy_version >= (2, 4):
        # Its `range` over a kernel argument fails inside the interpreter, deep in a kernel.
        return f"Triton {triton.__version__}'s interpreter breaks with numpy {numpy.__version__}; install 'numpy<2.4'"
    return None


INTERPRETER_PROBLEM = _interpreter_problem() if TRITON_INTERPRETER else None


def first_tensor_device(args, kwargs) -> torch.device:
    """The device of a call: that of its first tensor argument (or first tensor of a list argument)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor):
            return value[0].device
    raise TypeError("cannot tell the device of this call: no tensor argument")


def params_device(args, kwargs) -> torch.device:
    """The device of an optimizer's first parameter, given tensors or param-group dicts (as torch.optim takes)."""
    params = args[0] if args else kwargs.get("params", [])
    for item in params:
        group = item["params"] if isinstance(item, dict) else [item]
        for param in [group] if isinstance(group, torch.Tensor) else group:
            return param.device
    raise ValueError("optimizer got an empty parameter list")


@dataclass
class _Entry:
    reference: Callable
    triton: Callable | None = None
    device_of: Callable = first_tensor_device  # (args, kwargs) -> the device this call runs on
    # Other entry points of the same op, switched with it: name -> (reference, triton).
    variants: dict[str, tuple[Callable, Callable | None]] = field(default_factory=dict)
    # A choice inside the Triton version worth naming in the report (e.g. attention's backward).
    note: Callable[[], str] | None = None


_entries: dict[str, _Entry] = {}  # in registration order: the order of every table
OPS: tuple[str, ...] = ()
_entry_points: dict[str, tuple[str, str | None]] = {}  # ops.<name> -> (op, variant or None)
_spec: str | None = os.environ.get("GPT_KERNELS")  # checked once the op modules registered (gpt_kernels/__init__)
_requested: frozenset[str] | None = None  # parsed from _spec on first use
_warned: set[tuple[str, str]] = set()
_assume_triton_runs = False  # set by assume_triton_runs(): the ledger's fake tensors stand in for CUDA ones
_unit_loss_gradient = False
# Custom op ("gpt_triton::name") -> its memory traffic and FLOPs, for the step ledger (bench/ledger.py).
_costs: dict[str, Callable] = {}


def register(op: str, *, reference: Callable, triton: Callable | None = None,
             device_of: Callable = first_tensor_device,
             variants: dict[str, tuple[Callable, Callable | None]] | None = None,
             note: Callable[[], str] | None = None) -> None:
    """Called once by each op module, at its end: the op's name (the spec's, ``ops.<name>``'s and the
    public function's), its reference, its Triton version where one exists, and ``device_of(args,
    kwargs)``, the device a call runs on. ``variants`` are other entry points of the op (attention
    over packed q/k/v), each a (reference, triton) pair reached as ``ops.<variant>`` that follows the
    op's switch; ``note()`` names a choice inside the Triton version, shown by :func:`report`."""
    global OPS, _requested
    if op in _entries:
        raise ValueError(f"op {op!r} is registered twice")
    _entries[op] = _Entry(reference, triton, device_of, dict(variants or {}), note)
    _entry_points[op] = (op, None)
    _entry_points.update({variant: (op, variant) for variant in variants or {}})
    OPS = tuple(_entries)
    _requested = None  # "all" now includes this op


def entry_points() -> dict[str, tuple[Callable, Callable | None]]:
    """Every registered public name -> (reference, triton): each op and each of its variants."""
    return {name: (_entries[op].variants[variant] if variant else (_entries[op].reference, _entries[op].triton))
            for name, (op, variant) in _entry_points.items()}


def register_cost(custom_op: str, cost: Callable) -> None:
    """``cost(args, outputs) -> (bytes_read, bytes_written, flops)`` of one call of ``custom_op``
    (e.g. ``"gpt_triton::attention"``), for ops whose kernels move more (or compute more) than
    reading each input and writing each output once. ``args`` are the op's arguments in schema order."""
    _costs[custom_op] = cost


def op_costs() -> dict[str, Callable]:
    return dict(_costs)


def tensor_bytes(*tensors) -> int:
    """Bytes of the distinct elements of the given tensors (None skipped; the same view counted once;
    a broadcast, stride-0 dimension counted once): what a kernel reading or writing each once moves."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        elements = 1
        for size, stride in zip(t.shape, t.stride()):
            if stride != 0:
                elements *= size
        total += elements * t.element_size()
    return total


def default_cost(args, outputs) -> tuple[int, int, int]:
    """A fused kernel's cost: each input tensor read once, each output written once, no FLOPs counted."""
    def tensors(value):
        if isinstance(value, (list, tuple)):
            return [t for item in value for t in tensors(item)]
        return [value] if isinstance(value, torch.Tensor) else []
    return tensor_bytes(*tensors(args)), tensor_bytes(*tensors(outputs)), 0


@contextlib.contextmanager
def assume_triton_runs(unit_loss_gradient: bool = False) -> Iterator[None]:
    """Inside, every device counts as one Triton runs on: the step ledger traces the model on CPU fake
    tensors that stand for CUDA ones, and must take the same paths (no kernel is ever launched there).

    ``unit_loss_gradient``: the ledger calls ``loss.backward()`` on the loss itself, whose upstream
    gradient is exactly 1. Where a GPU kernel skips its work on reading a factor of 1 (the fused
    loss's rescale), :func:`unit_loss_gradient` lets the traced path skip it too: fake tensors hold
    no value to test."""
    global _assume_triton_runs, _unit_loss_gradient
    saved = _assume_triton_runs, _unit_loss_gradient
    _assume_triton_runs, _unit_loss_gradient = True, unit_loss_gradient
    try:
        yield
    finally:
        _assume_triton_runs, _unit_loss_gradient = saved


def unit_loss_gradient() -> bool:
    return _unit_loss_gradient


def parse_kernels(spec: str | None) -> frozenset[str]:
    """``'all'`` / ``'none'`` / ``'layernorm,attention'`` / ``'all,-gelu'`` -> the set of ops asked on Triton."""
    if spec is None or spec.strip() == "":
        return frozenset(OPS)
    chosen: set[str] = set()
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        remove = name.startswith("-")
        name = name.lstrip("-")
        if name == "all":
            names = set(OPS)
        elif name == "none":
            names = set()
            if remove:
                raise ValueError(f"kernel spec {spec!r}: '-none' means nothing; use 'all'")
            chosen.clear()
        elif name in _entries:
            names = {name}
        else:
            raise ValueError(
                f"kernel spec {spec!r}: unknown op {name!r}; expected 'all', 'none' or a comma list of "
                f"{', '.join(OPS)} (prefix a name with '-' to switch it off)"
            )
        chosen = chosen - names if remove else chosen | names
    return frozenset(chosen)


def set_kernels(spec: str | None) -> frozenset[str]:
    """Switch the given ops onto Triton and every other op onto its reference; returns the set."""
    global _spec, _requested
    _requested = parse_kernels(spec)
    _spec = spec
    return _requested


def requested_kernels() -> frozenset[str]:
    global _requested
    if _requested is None:
        _requested = parse_kernels(_spec)
    return _requested


@contextlib.contextmanager
def use_kernels(spec: str | None) -> Iterator[frozenset[str]]:
    """``with use_kernels("none"): ...`` runs the block on the references, then restores the switches."""
    saved = _spec, _requested
    try:
        yield set_kernels(spec)
    finally:
        _set_state(*saved)


def _set_state(spec, requested) -> None:
    global _spec, _requested
    _spec, _requested = spec, requested


def triton_runs_on(device: torch.device | str) -> bool:
    if _assume_triton_runs:
        return True
    device_type = torch.device(device).type
    return device_type == "cuda" or (device_type == "cpu" and TRITON_INTERPRETER and INTERPRETER_PROBLEM is None)


def implementation(op: str, device: torch.device | str) -> tuple[str, str]:
    """('triton' | 'torch', why) for ``op`` on ``device`` under the current switches."""
    entry = _entries[op]
    if op not in requested_kernels():
        return "torch", "switched off"
    if entry.triton is None:
        return "torch", "no Triton kernel yet"
    if torch.device(device).type == "cpu" and INTERPRETER_PROBLEM is not None and not _assume_triton_runs:
        return "torch", INTERPRETER_PROBLEM
    if not triton_runs_on(device):
        return "torch", f"Triton cannot run on {torch.device(device).type} (no CUDA; TRITON_INTERPRET=1 was not set at import)"
    if torch.device(device).type == "cpu":
        return "triton", "Triton interpreter (CPU, slow: for testing)"
    return "triton", "Triton kernel"


def has_triton(op: str) -> bool:
    """Whether ``op`` has a Triton kernel at all."""
    return _entries[op].triton is not None


def is_triton(op: str, device: torch.device | str) -> bool:
    """Whether ``op`` runs its Triton kernel on ``device`` now (e.g. to pick the fused-loss path)."""
    return implementation(op, device)[0] == "triton"


def resolve(op: str, device: torch.device | str, variant: str | None = None) -> Callable:
    """The callable that ``op`` (or its ``variant``) runs on ``device`` now; warns once per fallback reason."""
    impl, why = implementation(op, device)
    entry = _entries[op]
    reference, triton = entry.variants[variant] if variant else (entry.reference, entry.triton)
    if impl == "triton":
        return triton
    if op in requested_kernels() and (op, why) not in _warned:
        _warned.add((op, why))
        warnings.warn(f"kernel {op!r} asked on Triton runs its PyTorch reference: {why}", stacklevel=3)
    return reference


def report(device: torch.device | str) -> str:
    """A table of which implementation each op uses on ``device``, for the start of a run."""
    rows = [("op", "implementation", "why")]
    for op in OPS:
        impl, why = implementation(op, device)
        note = _entries[op].note if op in _entries else None
        rows.append((op, impl, f"{why}; {note()}" if impl == "triton" and note else why))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class _Ops:
    """``ops.<name>(...)`` for every registered op and variant: each call runs the implementation the
    switches pick for the call's device."""

    def __getattr__(self, name: str) -> Callable:
        if name not in _entry_points:
            raise AttributeError(f"ops has no op {name!r}; registered: {', '.join(_entry_points)}")
        op, variant = _entry_points[name]
        device_of = _entries[op].device_of

        def call(*args, **kwargs):
            if args and isinstance(args[0], collections.abc.Iterator):
                args = (list(args[0]), *args[1:])  # a one-shot iterable (model.parameters()) is read twice
            return resolve(op, device_of(args, kwargs), variant)(*args, **kwargs)

        call.__name__ = call.__qualname__ = name
        setattr(self, name, call)  # later lookups skip __getattr__
        return call


ops = _Ops()
