"""Test setup shared by every file: Triton runs natively on a GPU and in its interpreter on the CPU.

TRITON_INTERPRET must be set before any kernel module is imported (Triton decides at decoration
time), which is why it happens here, before pytest imports the test files.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

from gpt_kernels import registry  # noqa: E402  (after TRITON_INTERPRET is set)

if DEVICE == "cpu" and registry.INTERPRETER_PROBLEM:
    # Every kernel test would fail deep inside the interpreter; say why once instead.
    pytest.exit(f"cannot test the kernels on the CPU: {registry.INTERPRETER_PROBLEM}", returncode=4)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    # fp32 tolerances (tests/compare.py) assume IEEE fp32 products; TF32, which training switches
    # on for CUDA, must not leak from one test into the next.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _fresh_seed():
    # Fresh random inputs per test, but reproducible from the test's name when one fails
    # (crc32, not hash(): Python salts str hashes per process).
    torch.manual_seed(zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()))
    yield


@pytest.fixture(autouse=True)
def _kernel_switch_restored():
    # A test that runs train_gpt2.main(["--kernels", ...]) sets the process-wide switch; the next
    # test must still see the one it started with.
    saved = registry.requested_kernels()
    yield
    registry.set_kernels(",".join(sorted(saved)) or "none")
