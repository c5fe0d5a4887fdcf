"""How close a kernel must come to its float64 reference, stated once for the tests and the GPU check.

Errors are relative to the scale of the expected tensor: ``max|actual - expected| / max|expected|``.
``tests/`` and ``python -m bench smoke`` both import these, so a tolerance changed here changes both.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# Relative tolerance of a result computed in `dtype` (inputs and outputs in that dtype, math in fp32).
# fp16 has an 11-bit mantissa (2^-11 ~ 4.9e-4 per rounding), bf16 an 8-bit one (2^-8 ~ 3.9e-3).
RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}
# A loss is fp32 math on the logits as given, whatever their dtype: its error is fp32 rounding, summed.
LOSS_FACTOR = 2
# linear_cross_entropy's d_hidden sums over the vocabulary's V products: fp32 rounding grows with it,
# for the kernel and for any fp32 matmul alike.
LONG_SUM_FACTOR = 10
# decode_attention's gradients (through its reference's autograd) over a float64 emulation.
DECODE_GRAD_FACTOR = 10
# AdamW: moments (fp32 whatever the parameters' dtype) and fp32 parameters after a step, relative to
# each tensor's largest value; a low-precision parameter is one rounding of its dtype (RTOL).
ADAMW_STEP_RTOL = 1e-6


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so an element a kernel forgets to write fails the comparison."""
    return torch.full_like(t, float("nan"))


@contextlib.contextmanager
def fresh_buffers_poisoned() -> Iterator[None]:
    """Every tensor ``torch.empty*`` allocates inside comes NaN-filled (PyTorch's deterministic mode
    fills uninitialized memory), so the buffers an op allocates itself are poisoned too."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]
