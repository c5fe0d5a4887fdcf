"""Tolerances and checks every kernel test uses, stated once (named apart from gpt/numerics.py, the step guard).

The tolerances themselves live in ``gpt_kernels.tolerances``, which ``python -m bench smoke`` (the
GPU check) shares. The expected side is computed in float64 (or float32 where float64 is too slow)
from the same inputs.
"""

import torch

from conftest import DEVICE
from gpt_kernels.tolerances import RTOL, fresh_buffers_poisoned, poisoned_like, relative_error  # noqa: F401

# bf16 `tl.dot` is not supported by Triton's interpreter (it multiplies raw bits): bf16 runs on the GPU only.
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "", factor: float = 1.0):
    """Fails on shape mismatch, any NaN/inf the expected side lacks, or relative error over RTOL[dtype]·factor."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite values where the reference has none"
    err = relative_error(actual[finite], expected[finite]) if finite.any() else 0.0
    tol = RTOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"

