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
