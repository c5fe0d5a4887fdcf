"""Compiling kernels for an H100 (sm_90) on a machine without one.

Triton's bundled ptxas needs no GPU, so a CPU test can check what the interpreter cannot: that
every kernel builds, fits in registers and moves memory in 16-byte vectors. A test describes each
kernel as a launch specializes it (:class:`Build`) and calls :func:`compile_for_hopper`, which
compiles them in a subprocess, because this process decorated the kernels for the interpreter
(TRITON_INTERPRET=1), and returns each one's PTX and ptxas's resource report.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Build:
    """One kernel of ``module`` as a launch specializes it: its constexprs, each argument's type
    (``types`` maps a regular expression of argument names to ``"*bf16"``, ``"i32"``, ``"fp32"``...;
    the first that matches wins, ``default_type`` otherwise), the arguments hinted 16-divisible
    (``aligned``, regular expressions too: pointers, and row strides and widths that are), and the
    launch options (``num_warps``, ``num_stages``, ...)."""

    module: str
    kernel: str
    constexprs: dict
    types: dict = field(default_factory=dict)
    aligned: list = field(default_factory=list)
    options: dict = field(default_factory=dict)
    default_type: str = "i32"


def compile_for_hopper(builds: dict[str, Build]) -> dict[str, dict]:
    """Compile every build for sm_90 with Triton's compiler (not its interpreter), in a subprocess.
    Returns, per name: ``ptx`` (its text), ``registers``, ``spill_stores`` and ``stack_frame`` (bytes)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    request = pickle.dumps({name: asdict(build) for name, build in builds.items()})
    done = subprocess.run([sys.executable, __file__], input=request, cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


def count(pattern: str, ptx: str) -> int:
    """How often the regular expression ``pattern`` occurs in ``ptx``."""
    return len(re.findall(pattern, ptx))


# PTX instructions the checks count: 16-byte vector loads and stores, 16-byte async copies to shared memory.
VECTOR_LOAD, VECTOR_STORE = r"ld\.global(?:\.\w+)*\.v4", r"st\.global(?:\.\w+)*\.v4"
ASYNC_COPY, ASYNC_VECTOR_COPY = r"cp\.async\.\w+\.shared\.global", r"cp\.async\.\w+\.shared\.global[^;]*, 0x10,"


def _build(module: str, kernel: str, constexprs: dict, types: dict, aligned: list, options: dict,
           default_type: str) -> dict:
    """Compile one kernel (in the subprocess) and read ptxas's register and spill report."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), kernel)
    names = fn.arg_names

    def arg_type(name):
        return next((t for pattern, t in types.items() if re.fullmatch(pattern, name)), default_type)

    signature = {n: "constexpr" if n in constexprs else arg_type(n) for n in names}
    hinted = [i for i, n in enumerate(names) if n not in constexprs and any(re.fullmatch(a, n) for a in aligned)]
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(i,): [["tt.divisibility", 16]] for i in hinted})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    return dict(ptx=ptx, registers=int(re.search(r"Used (\d+) registers", report)[1]),
                spill_stores=int(re.search(r"(\d+) bytes spill stores", report)[1]),
                stack_frame=int(re.search(r"(\d+) bytes stack frame", report)[1]))


if __name__ == "__main__":
    builds = pickle.loads(sys.stdin.buffer.read())
    print(json.dumps({name: _build(**build) for name, build in builds.items()}))
