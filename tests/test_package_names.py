"""Our import names must never collide with an installed package's.

The kernel package was once called ``kernels``, the import name of Hugging Face's hub-kernel loader,
which transformers 5 depends on: from the repository root our folder shadowed theirs and every
transformers model class failed to build. These tests catch the next such collision, whatever its
name, in the way a user meets it: one process started from the repository root.
"""

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("gpt_kernels", "gpt", "bench")


def test_no_installed_distribution_provides_our_import_names():
    owners = importlib.metadata.packages_distributions()
    for name in OUR_PACKAGES:
        others = sorted(set(owners.get(name, [])) - {"gpt-triton", "gpt_triton"})
        assert not others, f"import name {name!r} is also provided by installed {others}"


# Run in a fresh interpreter whose first sys.path entry is the repository root, as
# `python train_gpt2.py` or `python -m pytest` from a clone has it.
SIDE_BY_SIDE = r"""
import sys, torch
import gpt_kernels, gpt, bench
from gpt.config import GPTConfig
from gpt.model import GPT
import transformers

root = sys.argv[1]
for module in (gpt_kernels, gpt, bench):
    assert module.__file__.startswith(root), (module.__name__, module.__file__)

torch.manual_seed(0)
idx = torch.randint(0, 300, (2, 16))
hf_gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
    vocab_size=300, n_positions=32, n_embd=32, n_layer=1, n_head=2)).eval()
hf_llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)).eval()
ours = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=1, n_head=2, n_embd=32)).eval()
with torch.no_grad(), gpt_kernels.use_kernels("all"):
    shapes = [tuple(hf_gpt2(idx).logits.shape), tuple(hf_llama(idx).logits.shape), tuple(ours(idx)[0].shape)]
assert shapes == [(2, 16, 300)] * 3, shapes
print("ok", transformers.__version__)
"""


def test_transformers_models_build_beside_our_packages():
    result = subprocess.run([sys.executable, "-c", SIDE_BY_SIDE, str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


def test_old_name_kernels_is_not_ours():
    """Where a ``kernels`` package is installed (transformers 5 pulls one in), it is Hugging Face's."""
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        pytest.skip("no package 'kernels' installed")
    assert Path(spec.origin).parent.parent != ROOT, f"'kernels' resolves to a folder of this repository: {spec.origin}"
