"""The plumbing every op module shares: input checks with one message shape, matrix views, output
buffers. Each op module imports these; none defines its own.

A bad input gets one ``ValueError`` line, ``"<op>: <name> must be <what is expected>, got <what came>"``,
raised before anything is launched.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from gpt_kernels import registry

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def describe(t) -> str:
    """What a value is, for an error message: ``torch.float16 (2, 8) on cpu``, or its type's name."""
    return f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__


def check_tensor(op: str, name: str, t, expected: str, *, dim: Optional[int] = None, shape=None,
                 dtypes=FLOAT_DTYPES, device: Optional[torch.device] = None) -> None:
    """ValueError unless ``t`` is a tensor of ``dim`` dimensions (or exactly ``shape``), one of ``dtypes``,
    on ``device``; ``expected`` says all that in words for the message."""
    ok = isinstance(t, torch.Tensor) and (dim is None or t.dim() == dim)
    ok = ok and (shape is None or tuple(t.shape) == tuple(shape)) and (dtypes is None or t.dtype in dtypes)
    if not (ok and (device is None or t.device == device)):
        raise ValueError(f"{op}: {name} must be {expected}, got {describe(t)}")


def check_same_device(op: str, name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    if t.device != like.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}; "
                         "both must be on the same device")


def require_triton(op: str, device: torch.device, what: str = "tensors") -> None:
    """ValueError unless Triton can launch on ``device``: CUDA, or the CPU under the interpreter."""
    if not registry.triton_runs_on(device):
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before import, "
                         f"for CPU), got {what} on {device}")


def check_scale(op: str, scale) -> None:
    """Attention's softmax scale: None (1/sqrt(D)) or a finite number."""
    is_number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if scale is not None and not (is_number and math.isfinite(scale)):
        raise ValueError(f"{op}: scale must be None (1/sqrt(D)) or a finite number, got {scale!r}")


def default_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def output_buffer(op: str, name: str, buffer: Optional[torch.Tensor], shape, dtype: torch.dtype,
                  device: torch.device, contiguous: bool = True) -> torch.Tensor:
    """A new (contiguous) output of ``shape``, or the caller's ``buffer`` once checked: it must match
    exactly and be contiguous (``contiguous=False``: its last dimension only, any other strides)."""
    if buffer is None:
        return torch.empty(shape, dtype=dtype, device=device)
    ok = isinstance(buffer, torch.Tensor) and tuple(buffer.shape) == tuple(shape) and buffer.dtype == dtype
    if not (ok and buffer.device == device and (buffer.is_contiguous() if contiguous else buffer.stride(-1) == 1)):
        layout = "contiguous" if contiguous else "last-dim-contiguous"
        raise ValueError(f"{op}: {name} must be a {layout} {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {describe(buffer)}")
    return buffer


def rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """``t`` as a (rows, n_cols) matrix with unit column stride: a view when the strides allow it
    (e.g. a column slice keeps its row stride), a contiguous copy otherwise."""
    matrix = t.reshape(-1, n_cols)
    return matrix if matrix.stride(1) == 1 or n_cols == 1 else matrix.contiguous()


def unit_stride(param: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A weight or bias as the kernels index it, element i at offset i: a strided or expanded view
    (not the model's parameter) is copied, which costs one small vector."""
    return param.contiguous() if param is not None else None


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The attention kernels take any strides but need the last dimension contiguous: copy only otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


@triton.jit
def flat_grid_tile(n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's (BLOCK_M rows, BLOCK_N columns) block of an output, over a flat 1-D grid (CUDA
    caps grid axes 1 and 2 at 65535): neighbouring programs take neighbouring column blocks of one row
    tile, so together they stream through memory in order (an elementwise kernel), or share the row
    tile's operand through L2 (a GEMM). Returns (rows, cols)."""
    col_blocks = tl.cdiv(n_cols, BLOCK_N)
    rows = (tl.program_id(0) // col_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (tl.program_id(0) % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols
