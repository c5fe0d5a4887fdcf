"""Compiling kernels for an H100 (sm_90) on a machine without one.

Triton's bundled ptxas needs no GPU, so a CPU test can check what the interpreter cannot: that
every kernel builds, fits in registers and moves memory in 16-byte vectors. The scripts run in a
subprocess because this process decorated the kernels for the interpreter (TRITON_INTERPRET=1).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_compile_script(script: str) -> dict:
    """Run ``script`` (Python that compiles kernels and prints one JSON line last) with Triton's
    compiler instead of its interpreter; returns that JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# Python prepended to a compile script: ``build(fn, pointers, constexprs, num_warps, num_stages,
# aligned)`` compiles a kernel for sm_90 as a launch specializes it (pointers 16-byte aligned, and the
# integer arguments named in ``aligned`` divisible by 16) and returns what ptxas reports: registers,
# spilled bytes, and the 16-byte vector loads and stores in the PTX. Floats are the arguments named
# ``eps``; every other argument is an i32 (or a constexpr).
BUILD_FOR_HOPPER = r"""
import json, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, pointers, constexprs, num_warps, num_stages, aligned=()):
    names, signature, attrs = fn.arg_names, {}, {}
    for i, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "eps" else "i32"
            if name in aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, attrs=attrs,
                       constexprs={(names.index(k),): v for k, v in constexprs.items()})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                         options=dict(num_warps=num_warps, num_stages=num_stages)).asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([triton.knobs.nvidia.ptxas.path, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    return dict(registers=int(re.search(r"Used (\d+) registers", report)[1]),
                spilled=int(re.search(r"(\d+) bytes spill stores", report)[1]),
                vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))
                + len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*, 0x10,", ptx)),
                vector_stores=len(re.findall(r"st\.global(?:\.\w+)*\.v4", ptx)))
"""
