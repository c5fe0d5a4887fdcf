"""Tolerances and checks every kernel test uses, stated once.

Errors are relative to the scale of the expected tensor: ``max|actual - expected| / max|expected|``.
The expected side is computed in float64 (or float32 where float64 is too slow) from the same inputs.
"""

import torch

from conftest import DEVICE

# Relative tolerance of a result computed in `dtype` (inputs and outputs in that dtype, math in fp32).
# fp16 has an 11-bit mantissa (2^-11 ~ 4.9e-4 per rounding), bf16 an 8-bit one (2^-8 ~ 3.9e-3).
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}

# bf16 `tl.dot` is not supported by Triton's interpreter (it multiplies raw bits): bf16 runs on the GPU only.
FLOAT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "", factor: float = 1.0):
    """Fails on shape mismatch, any NaN/inf the expected side lacks, or relative error over RTOL[dtype]·factor."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    assert torch.equal(torch.isfinite(actual), finite), f"{name}: non-finite values where the reference has none"
    err = relative_error(actual[finite], expected[finite]) if finite.any() else 0.0
    tol = RTOL[dtype] * factor
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgets to write fails the comparison."""
    return torch.full_like(t, float("nan"))
