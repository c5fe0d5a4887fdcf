"""Triton kernels for GPT-2 training, each beside a pure-PyTorch reference with the same signature.

Each op module registers itself with ``registry`` once; the package exports what was registered:
``from gpt_kernels import layernorm, layernorm_reference, ...`` reaches every op (and variant, such
as ``attention_qkv``) directly. Models go through ``gpt_kernels.registry.ops``, which picks Triton or
the reference per op (see ``registry``).
"""

import importlib

from gpt_kernels import registry
from gpt_kernels.registry import ops, report, set_kernels, use_kernels

# The op modules, in the order of every table (the kernel report, the spec's "all", the benchmarks).
OP_MODULES = ("layernorm", "attention", "gelu", "cross_entropy", "linear_cross_entropy", "adamw", "decode_attention",
              "rmsnorm", "rope", "swiglu")

for _module in OP_MODULES:
    importlib.import_module(f"gpt_kernels.{_module}")
# gpt_kernels.<name> is the op's public function (Triton where it has a kernel), <name>_reference its reference.
for _name, (_reference, _triton) in registry.entry_points().items():
    globals()[_name] = _triton or _reference
    globals()[f"{_name}_reference"] = _reference
registry.requested_kernels()  # a bad GPT_KERNELS fails at import, naming the ops it may hold

__all__ = ["registry", "ops", "report", "set_kernels", "use_kernels"] + [
    name for entry in registry.entry_points() for name in (entry, f"{entry}_reference")
]
