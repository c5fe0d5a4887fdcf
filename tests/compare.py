"""Tolerances and checks every kernel test uses, stated once (named apart from gpt/numerics.py, the step guard).

The tolerances themselves live in ``gpt_kernels.tolerances``, which ``python -m bench smoke`` (the
GPU check) shares. The expected side is computed in float64 (or float32 where float64 is too slow)
from the same inputs.
"""

import pytest
import torch

from conftest import DEVICE
from gpt_kernels.tolerances import RTOL, fresh_buffers_poisoned, poisoned_like, relative_error  # noqa: F401

# Views of rows 130 wide that a kernel must read through their strides (or copy), each made by
# ``make(*shape)`` (a test's own random values): layout name -> view.
NON_CONTIGUOUS = {
    "transposed": lambda make: make(130, 45).t(),
    "column_slice": lambda make: make(45, 135)[:, :130],  # read in place through the row stride
    "every_other_row": lambda make: make(4, 90, 130)[:, ::2],
}

# Autocast's bf16 matmuls need CUDA; on the CPU each op's autograd dtype tests cover the same dtypes.
needs_cuda_autocast = pytest.mark.skipif(DEVICE != "cuda", reason="autocast bf16 matmuls need CUDA; the CPU covers "
                                         "the dtypes in test_autograd_dtypes_match_reference")

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


def save_perturbed_hf_model(hf, folder, scale: float, only: str = ""):
    """Add ``scale``·N(0, 1) to every parameter of the transformers model ``hf`` whose name contains
    ``only`` (so LayerNorm/RMSNorm gains and biases are not their trivial init), then save it into
    ``folder`` with save_pretrained. Returns (folder, hf), as the parity fixtures hand them on."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if only in name:
                p.add_(scale * torch.randn_like(p))
    hf.save_pretrained(folder)
    return folder, hf
