"""Triton kernels for GPT-2 training, each beside a pure-PyTorch reference with the same signature.

``from kernels import layer_norm, layer_norm_reference, ...`` reaches every op directly; models go
through ``kernels.registry.ops``, which picks Triton or the reference per op (see ``registry``).
"""

from kernels import registry
from kernels.adamw import AdamW, AdamW_reference
from kernels.attention import attention, attention_reference
from kernels.cross_entropy import cross_entropy, cross_entropy_reference
from kernels.decode_attention import decode_attention, decode_attention_reference
from kernels.gelu import gelu, gelu_reference
from kernels.layernorm import layer_norm, layer_norm_reference
from kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from kernels.registry import ops, report, set_kernels, use_kernels

__all__ = [
    "registry", "ops", "report", "set_kernels", "use_kernels",
    "layer_norm", "layer_norm_reference",
    "attention", "attention_reference",
    "gelu", "gelu_reference",
    "cross_entropy", "cross_entropy_reference",
    "linear_cross_entropy", "linear_cross_entropy_reference",
    "AdamW", "AdamW_reference",
    "decode_attention", "decode_attention_reference",
]
