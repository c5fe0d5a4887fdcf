"""SwiGLU, the Llama MLP's activation: ``silu(gate) · up`` over the fused gate/up projection.

``swiglu(gate_up)`` takes the output of one linear of width ``2·hidden`` laid out ``[gate | up]``
along the last dimension (``gate_up[..., :hidden]`` is the gate, ``gate_up[..., hidden:]`` the up
projection; Hugging Face's ``gate_proj`` rows then ``up_proj`` rows, concatenated, form that
linear's weight) and returns ``silu(gate) · up``, shape (..., hidden).

Public: ``swiglu`` (for now the reference itself: no Triton kernel is registered yet) and
``swiglu_reference``.

The contract a Triton version must keep: the math in fp32 (float64 for float64 input), the output
and the gradient (one (..., 2·hidden) tensor, ``[dgate | dup]``) in the input's dtype; any last
dimension that is even; a ValueError for an odd one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gpt_kernels import registry


def swiglu_reference(gate_up):
    """PyTorch reference: ``silu(gate) · up`` in fp32 (or wider), returned in ``gate_up``'s dtype."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dimension holds [gate | up] and must be even, got {tuple(gate_up.shape)}")
    math_dtype = torch.promote_types(gate_up.dtype, torch.float32)
    gate, up = gate_up.to(math_dtype).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


swiglu = swiglu_reference

registry.register("swiglu", reference=swiglu_reference, triton=None)
