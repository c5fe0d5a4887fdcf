"""Triton kernels for GPT-2 training, each beside a pure-PyTorch reference with the same signature.

``from gpt_kernels import layer_norm, layer_norm_reference, ...`` reaches every op directly; models go
through ``gpt_kernels.registry.ops``, which picks Triton or the reference per op (see ``registry``).
"""

from gpt_kernels import registry
from gpt_kernels.adamw import AdamW, AdamW_reference
from gpt_kernels.attention import attention, attention_qkv, attention_qkv_reference, attention_reference
from gpt_kernels.cross_entropy import cross_entropy, cross_entropy_reference
from gpt_kernels.decode_attention import decode_attention, decode_attention_reference
from gpt_kernels.gelu import gelu, gelu_reference
from gpt_kernels.layernorm import layer_norm, layer_norm_reference
from gpt_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from gpt_kernels.rmsnorm import rmsnorm, rmsnorm_reference
from gpt_kernels.rope import rope, rope_reference, rope_table
from gpt_kernels.swiglu import swiglu, swiglu_reference
from gpt_kernels.registry import ops, report, set_kernels, use_kernels

__all__ = [
    "registry", "ops", "report", "set_kernels", "use_kernels",
    "layer_norm", "layer_norm_reference",
    "attention", "attention_reference", "attention_qkv", "attention_qkv_reference",
    "gelu", "gelu_reference",
    "cross_entropy", "cross_entropy_reference",
    "linear_cross_entropy", "linear_cross_entropy_reference",
    "AdamW", "AdamW_reference",
    "decode_attention", "decode_attention_reference",
    "rmsnorm", "rmsnorm_reference",
    "rope", "rope_reference", "rope_table",
    "swiglu", "swiglu_reference",
]
