"""Bad input, everywhere a user can reach it: every public op, the model and generation, and every
command line (``train_gpt2.py``, ``python -m gpt.data``, ``python -m gpt.generate``, ``python -m
gpt.evaluate``). Each gets either a clear error that names the problem (a ValueError, which the
command lines print as one ``error: ...`` line with exit code 2) or, where the input is valid but
unusual (empty, non-contiguous, ignored rows, a prompt longer than the block size), the right answer.
Never a crash deep inside a kernel, never a wrong number.

Ops are tested through their Triton versions (the references are PyTorch's own functions); an op
whose Triton version does not exist yet is skipped, saying so.
"""

import json
import re

import numpy as np
import pytest
import torch

from conftest import DEVICE
from gpt import checkpoint as ckpt
from gpt import data as gdata
from gpt.config import GPTConfig, preset
from gpt.data import HEADER_INTS, SHARD_MAGIC, write_shard
from gpt.generate import generate
from gpt.model import GPT
from gpt_kernels import registry
from compare import assert_close

# A device that is not the tensors' own: on a CPU-only machine the meta device stands in for it.
OTHER_DEVICE = "cpu" if DEVICE == "cuda" else "meta"
REFERENCE_DEVICE_MESSAGE = r"on one device|on the same device|is on .* but|are on .* but|needs CUDA"


def triton_version(op: str):
    impl = registry._entries[op].triton
    if impl is None:
        pytest.skip(f"{op} has no Triton version yet: nothing but PyTorch's reference to test")
    return impl


def rand(*shape, dtype=torch.float32, device=DEVICE, **kwargs):
    return torch.randn(*shape, dtype=dtype, device=device, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Ops: errors that name the problem

C, V = 48, 37


def _layernorm_cases():
    w, b = rand(C), rand(C)
    return [
        ("int x", lambda f: f(torch.ones(4, C, dtype=torch.int32, device=DEVICE), w, b), "float32, float16 or bfloat16"),
        ("float64 x", lambda f: f(rand(4, C, dtype=torch.float64), w, b), "float32, float16 or bfloat16"),
        ("not a tensor", lambda f: f([1.0] * C, w, b), "x must be a float32, float16 or bfloat16 tensor, got list"),
        ("weight shape", lambda f: f(rand(4, C), rand(C + 1), b), r"weight must be 1-D with x's last dimension"),
        ("residual shape", lambda f: f(rand(4, C), w, b, residual=rand(4, C - 1)), r"residual must have x's shape"),
        ("weight device", lambda f: f(rand(4, C), rand(C, device=OTHER_DEVICE), b), REFERENCE_DEVICE_MESSAGE),
        ("empty last dim", lambda f: f(rand(4, 0), rand(0), rand(0)), "last dimension"),
        ("negative eps", lambda f: f(rand(4, C), w, b, -1e-5), "eps must be a non-negative number"),
    ]


def _attention_cases():
    q = rand(1, 2, 5, 16)
    return [
        ("3-D", lambda f: f(rand(2, 5, 16), rand(2, 5, 16), rand(2, 5, 16)), r"4-D \(B, H, T, D\)"),
        ("shapes differ", lambda f: f(q, rand(1, 2, 6, 16), q), r"same \(B, H, T, D\) shape"),
        ("int dtype", lambda f: f(*(torch.ones(1, 2, 5, 16, dtype=torch.int32, device=DEVICE),) * 3),
         "float16, bfloat16 or float32"),
        ("mixed dtypes", lambda f: f(q, q.half(), q), "share one dtype"),
        ("devices differ", lambda f: f(q, q, rand(1, 2, 5, 16, device=OTHER_DEVICE)), REFERENCE_DEVICE_MESSAGE),
        ("head dim 300", lambda f: f(*(rand(1, 2, 5, 300),) * 3), "head dim D = 300 is not supported"),
        ("nan scale", lambda f: f(q, q, q, scale=float("nan")), "scale must be None"),
    ]


def _gelu_cases():
    return [
        ("int x", lambda f: f(torch.ones(4, C, dtype=torch.int64, device=DEVICE)), "float32, float16 or bfloat16"),
        ("not a tensor", lambda f: f(3.0), "x must be a float32, float16 or bfloat16 tensor, got float"),
        ("bias shape", lambda f: f(rand(4, C), rand(C - 1)), r"bias must be 1-D with x's last dimension"),
        ("bias dtype", lambda f: f(rand(4, C), torch.ones(C, dtype=torch.int32, device=DEVICE)),
         "bias must be a float32, float16 or bfloat16 tensor or None, got torch.int32"),
        ("bias device", lambda f: f(rand(4, C), rand(C, device=OTHER_DEVICE)), REFERENCE_DEVICE_MESSAGE),
    ]


def _targets(*values):
    return torch.tensor(values, dtype=torch.long, device=DEVICE)


def _cross_entropy_cases():
    logits, targets = rand(3, V), _targets(1, 2, 3)
    return [
        ("1-D logits", lambda f: f(rand(V), targets[:1]), r"logits must be a 2-D \(N, V\) tensor"),
        ("int logits", lambda f: f(torch.ones(3, V, dtype=torch.int32, device=DEVICE), targets),
         "float32, float16 or bfloat16"),
        ("float targets", lambda f: f(logits, targets.float()), "targets must be an int64 or int32 tensor"),
        ("targets shape", lambda f: f(logits, _targets(1, 2)), r"targets must have shape \(3,\)"),
        ("targets device", lambda f: f(logits, targets.to(OTHER_DEVICE)), REFERENCE_DEVICE_MESSAGE),
        ("target = V", lambda f: f(logits, _targets(1, V, 2)), rf"target {V} is outside \[0, {V}\)"),
        ("negative target", lambda f: f(logits, _targets(1, -5, 2)), rf"target -5 is outside \[0, {V}\)"),
        ("reduction", lambda f: f(logits, targets, reduction="avg"), "reduction must be one of"),
        ("label smoothing", lambda f: f(logits, targets, label_smoothing=1.5), "label_smoothing must be"),
        ("ignore_index type", lambda f: f(logits, targets, ignore_index=1.5), "ignore_index must be an int"),
    ]


def _linear_cross_entropy_cases():
    hidden, weight, targets = rand(3, 16), rand(V, 16), _targets(1, 2, 3)
    return [
        ("C differs", lambda f: f(hidden, rand(V, 17), targets), "must share C"),
        ("dtypes differ", lambda f: f(hidden, weight.half(), targets), "must have one dtype outside autocast"),
        ("1-D hidden", lambda f: f(rand(16), weight, targets), r"hidden must be a 2-D \(N, C\) float32, float16 or bfloat16 tensor"),
        ("weight device", lambda f: f(hidden, rand(V, 16, device=OTHER_DEVICE), targets), REFERENCE_DEVICE_MESSAGE),
        ("target = V", lambda f: f(hidden, weight, _targets(1, V, 2)), rf"target {V} is outside \[0, {V}\)"),
        ("targets shape", lambda f: f(hidden, weight, _targets(1)), r"targets must have shape \(3,\)"),
        ("chunk_size 0", lambda f: f(hidden, weight, targets, chunk_size=0), "chunk_size must be"),
    ]


def _param(*shape, **kwargs):
    return torch.nn.Parameter(rand(*shape, **kwargs))


def _step_with_grad(f, grad):
    p = _param(*grad.shape)
    optimizer = f([p])
    p.grad = grad
    optimizer.step()


def _adamw_cases():
    return [
        ("negative lr", lambda f: f([_param(3)], lr=-1.0), "invalid learning rate"),
        ("beta = 1", lambda f: f([_param(3)], betas=(1.0, 0.95)), "invalid beta parameter"),
        ("eps = 0", lambda f: f([_param(3)], eps=0.0), "invalid epsilon"),
        ("float64 parameter", lambda f: f([_param(3, dtype=torch.float64)]), "float32, bfloat16 or float16"),
        ("non-contiguous parameter", lambda f: f([torch.nn.Parameter(rand(4, 3).t())]), "must be contiguous"),
        ("devices differ", lambda f: f([_param(3), _param(3, device=OTHER_DEVICE)]), REFERENCE_DEVICE_MESSAGE),
        ("no parameters", lambda f: f([]), "empty parameter list"),
        ("sparse gradient", lambda f: _step_with_grad(f, rand(3).to_sparse()), "sparse gradients"),
    ]


def _decode_attention_cases():
    q, cache, lengths = rand(2, 2, 1, 16), rand(2, 2, 7, 16), _targets(3, 7)
    return [
        ("q with 2 rows", lambda f: f(rand(2, 2, 2, 16), cache, cache, lengths), r"q must be a \(B, H, 1, D\)"),
        ("caches differ", lambda f: f(q, cache, rand(2, 2, 6, 16), lengths), "differ"),
        ("empty cache", lambda f: f(q, rand(2, 2, 0, 16), rand(2, 2, 0, 16), lengths), "hold no position"),
        ("float lengths", lambda f: f(q, cache, cache, lengths.float()), "cache_lengths must be"),
        ("lengths shape", lambda f: f(q, cache, cache, _targets(3)), "cache_lengths must be"),
        ("int dtype", lambda f: f(*(torch.ones(2, 2, t, 16, dtype=torch.int32, device=DEVICE) for t in (1, 7, 7)),
                                  lengths), "float16, bfloat16 or float32"),
        ("devices differ", lambda f: f(q, cache, cache.to(OTHER_DEVICE), lengths), REFERENCE_DEVICE_MESSAGE),
    ]


def _rmsnorm_cases():
    w = rand(C)
    return [
        ("int x", lambda f: f(torch.ones(4, C, dtype=torch.int32, device=DEVICE), w), "float32, float16 or bfloat16"),
        ("float64 x", lambda f: f(rand(4, C, dtype=torch.float64), w), "float32, float16 or bfloat16"),
        ("not a tensor", lambda f: f([1.0] * C, w), "x must be a float32"),
        ("weight shape", lambda f: f(rand(4, C), rand(C + 1)), r"weight must be 1-D with x's last dimension"),
        ("residual shape", lambda f: f(rand(4, C), w, residual=rand(4, C - 1)), r"residual must have x's shape"),
        ("weight device", lambda f: f(rand(4, C), rand(C, device=OTHER_DEVICE)), REFERENCE_DEVICE_MESSAGE),
        ("empty last dim", lambda f: f(rand(4, 0), rand(0)), "last dimension"),
        ("negative eps", lambda f: f(rand(4, C), w, -1e-5), "eps must be a non-negative number"),
    ]


def _rope_cases():
    from gpt_kernels.rope import rope_table

    cos, sin = rope_table(16, 8, 10000.0, DEVICE)
    q, k, positions = rand(2, 5, 4, 8), rand(2, 5, 2, 8), torch.arange(5, device=DEVICE)
    return [
        ("odd head dim", lambda f: f(rand(2, 5, 4, 7), rand(2, 5, 2, 7), cos, sin, positions), "with D even"),
        ("3-D q", lambda f: f(rand(5, 4, 8), k, cos, sin, positions), r"q must be a \(B, T, H, D\) tensor"),
        ("T differs", lambda f: f(q, rand(2, 4, 2, 8), cos, sin, positions), "must share B, T and D"),
        ("table width", lambda f: f(q, k, cos[:, :2], sin[:, :2], positions), r"cos and sin must be \(L, D/2 = 4\)"),
        ("float positions", lambda f: f(q, k, cos, sin, positions.float()), "positions must be"),
        ("positions shape", lambda f: f(q, k, cos, sin, positions[None]), r"positions must be \(5,\) or \(2, 5\)"),
        ("int q", lambda f: f(q.int(), k.int(), cos, sin, positions), "float32, float16 or bfloat16"),
        ("devices differ", lambda f: f(q, k, cos, sin, positions.to(OTHER_DEVICE)), REFERENCE_DEVICE_MESSAGE),
    ]


def _swiglu_cases():
    return [
        ("odd width", lambda f: f(rand(4, 2 * C + 1)), "must be even"),
        ("scalar", lambda f: f(rand(())), "must be even"),
        ("float64", lambda f: f(rand(4, C, dtype=torch.float64)), "float32, float16 or bfloat16"),
        ("int", lambda f: f(torch.ones(4, C, dtype=torch.int32, device=DEVICE)), "float32, float16 or bfloat16"),
    ]


OP_CASES = {
    "layernorm": _layernorm_cases,
    "attention": _attention_cases,
    "gelu": _gelu_cases,
    "cross_entropy": _cross_entropy_cases,
    "linear_cross_entropy": _linear_cross_entropy_cases,
    "adamw": _adamw_cases,
    "decode_attention": _decode_attention_cases,
    "rmsnorm": _rmsnorm_cases,
    "rope": _rope_cases,
    "swiglu": _swiglu_cases,
}


def test_every_op_has_bad_input_cases():
    assert set(OP_CASES) == {op for op in registry.OPS if registry.has_triton(op)}


@pytest.mark.parametrize("op", list(OP_CASES))
def test_op_errors_name_the_problem(op):
    f = triton_version(op)
    failures = []
    for name, call, message in OP_CASES[op]():
        try:
            call(f)
        except ValueError as e:
            if not re.search(message, str(e)):
                failures.append(f"{name}: message {str(e)!r} does not match {message!r}")
        except Exception as e:  # noqa: BLE001 - anything but a ValueError is the failure we look for
            failures.append(f"{name}: {type(e).__name__} instead of a ValueError: {e}")
        else:
            failures.append(f"{name}: accepted")
    assert not failures, "\n".join(failures)


# ---------------------------------------------------------------------------------------------------
# Ops: valid but unusual input gets the right answer


def _compare(op, leaves, make_args=lambda *tensors: tensors, factor=4.0, **kwargs):
    """Run the Triton ``op`` on ``leaves`` (fp32) and its reference on float64 copies, both seen
    through ``make_args`` (e.g. as non-contiguous views); compare the outputs, then the gradients of
    every floating-point leaf."""
    ours = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in leaves]
    theirs = [(t.detach().double() if t.is_floating_point() else t).requires_grad_(t.is_floating_point())
              for t in leaves]
    out = triton_version(op)(*make_args(*ours), **kwargs)
    expected = registry._entries[op].reference(*make_args(*theirs), **kwargs)
    assert_close(out, expected, torch.float32, f"{op} output", factor=factor)
    if out.numel():
        upstream = torch.randn_like(out)
        out.backward(upstream)
        expected.backward(upstream)
        for a, r in zip(ours, theirs):
            if a.requires_grad:
                assert_close(a.grad, r.grad, torch.float32, f"{op} gradient", factor=2 * factor)


def test_layernorm_empty_and_strided_inputs():
    f = triton_version("layernorm")
    assert f(rand(0, C), rand(C), rand(C)).shape == (0, C)
    _compare("layernorm", [rand(5, 2 * C), rand(C), rand(C)], lambda x, w, b: (x[:, :C], w, b))  # row stride 2C
    _compare("layernorm", [rand(C, 5), rand(C), rand(C)], lambda x, w, b: (x.t(), w, b))  # column stride C


def test_attention_empty_and_strided_inputs():
    f = triton_version("attention")
    empty = rand(1, 2, 0, 16)
    assert f(empty, empty, empty).shape == (1, 2, 0, 16)
    # The model's layout: (B, T, H, D) projections seen as (B, H, T, D) through their strides.
    _compare("attention", [rand(1, 7, 2, 16) for _ in range(3)], lambda *qkv: [t.transpose(1, 2) for t in qkv],
             causal=True)


def test_gelu_empty_and_strided_inputs():
    f = triton_version("gelu")
    assert f(rand(0, C), rand(C)).shape == (0, C)
    _compare("gelu", [rand(C, 6), rand(C)], lambda x, b: (x.t(), b))


def test_llama_ops_empty_and_strided_inputs():
    from gpt_kernels.rope import rope_table

    rmsnorm, rope, swiglu = (triton_version(op) for op in ("rmsnorm", "rope", "swiglu"))
    assert rmsnorm(rand(0, C), rand(C)).shape == (0, C) and swiglu(rand(3, 0, 2 * C)).shape == (3, 0, C)
    cos, sin = rope_table(8, 16, 10000.0, DEVICE)
    empty = rand(2, 0, 2, 16)
    assert [t.shape for t in rope(empty, empty, cos, sin, torch.arange(0, device=DEVICE))] == [empty.shape] * 2
    _compare("rmsnorm", [rand(C, 5), rand(C)], lambda x, w: (x.t(), w))  # column stride C
    _compare("swiglu", [rand(2 * C, 6)], lambda x: (x.t(),))  # (strided RoPE inputs: tests/test_rope.py)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy"])
def test_losses_with_ignored_empty_and_strided_rows(op):
    f = triton_version(op)
    n, hidden = 6, 16
    inputs = (lambda: [rand(n, V)]) if op == "cross_entropy" else (lambda: [rand(n, hidden), rand(V, hidden)])

    # Some rows ignored, with the default and a custom ignore_index: the mean is over the others.
    for ignore_index in (-100, 5):
        _compare(op, [*inputs(), _targets(ignore_index, 3, ignore_index, 0, V - 1, 2)], ignore_index=ignore_index)

    # Every row ignored: a loss of 0 and zero gradients, not NaN.
    leaves = [t.requires_grad_() for t in inputs()]
    loss = f(*leaves, _targets(*[-100] * n))
    loss.backward()
    assert loss.item() == 0.0 and all(torch.equal(t.grad, torch.zeros_like(t)) for t in leaves)

    # No rows at all: a loss of 0, as the reference says.
    empty = [rand(0, V)] if op == "cross_entropy" else [rand(0, hidden), rand(V, hidden)]
    assert f(*empty, _targets()).item() == registry._entries[op].reference(*empty, _targets()).item() == 0.0

    # Non-contiguous input: a column slice of wider logits, or transposed hidden states.
    targets = _targets(1, 2, 3, 4, 5, 6)
    if op == "cross_entropy":
        _compare(op, [rand(n, V + 27), targets], lambda x, t: (x[:, :V], t))
    else:
        _compare(op, [rand(hidden, n), rand(V, hidden), targets], lambda h, w, t: (h.t(), w, t))


def test_adamw_empty_parameter_and_strided_gradient():
    f = triton_version("adamw")
    shapes = [(0,), (5, 3), (7,)]
    ours = [_param(*shape) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizers = f(ours, lr=1e-2), registry._entries["adamw"].reference(theirs, lr=1e-2)
    for _ in range(2):
        grads = [rand(*shapes[0]), rand(3, 5).t(), rand(*shapes[2])]  # the middle one non-contiguous
        for params, optimizer in zip((ours, theirs), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.clone()  # clone keeps the strides
            optimizer.clip_grad_norm_(1.0)
            optimizer.step()
    for p, r in zip(ours, theirs):
        assert_close(p.detach(), r.detach(), torch.float32, "parameter", factor=4)


def test_decode_attention_empty_rows_and_long_lengths():
    f = triton_version("decode_attention")
    q, k, v = rand(3, 2, 1, 16), rand(3, 2, 9, 16), rand(3, 2, 9, 16)
    lengths = _targets(0, 4, 50)  # an empty row gives zeros; a length past T counts as T
    out = f(q, k, v, lengths)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    expected = registry._entries["decode_attention"].reference(q.double(), k.double(), v.double(), lengths.clamp_max(9))
    assert_close(out, expected, torch.float32, "output", factor=4)
    # Strided caches: a prefix of a longer preallocated cache.
    big_k, big_v = rand(3, 2, 20, 16), rand(3, 2, 20, 16)
    out = f(q, big_k[:, :, :9], big_v[:, :, :9], _targets(9, 5, 1))
    expected = registry._entries["decode_attention"].reference(q.double(), big_k[:, :, :9].double(),
                                                               big_v[:, :, :9].double(), _targets(9, 5, 1))
    assert_close(out, expected, torch.float32, "strided caches", factor=4)


# ---------------------------------------------------------------------------------------------------
# The model and generation

SMALL = GPTConfig(block_size=8, vocab_size=100, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture
def small_model():
    with registry.use_kernels("none"):
        torch.manual_seed(0)
        yield GPT(SMALL).eval()


@pytest.mark.parametrize("idx, targets, message", [
    (torch.zeros(1, 9, dtype=torch.long), None, "sequence length 9 exceeds the model's block size 8"),
    (torch.zeros(1, 4), None, "idx must be a \\(B, T\\) tensor of int64/int32"),
    (torch.zeros(4, dtype=torch.long), None, "idx must be a \\(B, T\\) tensor"),
    (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long), "targets shape"),
    (torch.zeros(1, 2, dtype=torch.long), torch.tensor([[1, 100]]), r"target 100 is outside \[0, 100\)"),
])
def test_model_errors_name_the_problem(small_model, idx, targets, message):
    with pytest.raises(ValueError, match=message):
        small_model(idx, targets)


@pytest.mark.parametrize("bad_id", [100, 120, -1])
def test_model_refuses_token_ids_outside_the_vocabulary(small_model, bad_id):
    with pytest.raises(ValueError, match="vocab"):
        small_model(torch.tensor([[1, bad_id]]))


def test_generate_prompt_longer_than_block_size_keeps_its_last_block(small_model):
    prompt = torch.randint(0, SMALL.vocab_size, (1, 3 * SMALL.block_size))
    out = generate(small_model, prompt, 3, temperature=0)
    cropped = generate(small_model, prompt[:, -SMALL.block_size:], 3, temperature=0)
    assert torch.equal(out[:, :prompt.shape[1]], prompt) and torch.equal(out[:, -3:], cropped[:, -3:])


@pytest.mark.parametrize("idx, message", [
    (torch.zeros(1, 0, dtype=torch.long), "at least one token"),
    (torch.tensor([[1, 100]]), r"prompt token ids must lie in \[0, vocab_size=100\)"),
    (torch.zeros(3, dtype=torch.long), r"idx must be a \(B, T\) tensor"),
])
def test_generate_errors_name_the_problem(small_model, idx, message):
    with pytest.raises(ValueError, match=message):
        generate(small_model, idx, 2)


# ---------------------------------------------------------------------------------------------------
# Shards: python -m gpt.data verify / info, and the loader


def _header(count, version=1, reserved=0):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, version, count
    header[10] = reserved
    return header.tobytes()


@pytest.fixture
def shards(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) * 50
    write_shard(tmp_path / "x_train_000000.bin", tokens)
    write_shard(tmp_path / "x_train_000001.bin", tokens[:500])
    write_shard(tmp_path / "x_val_000000.bin", tokens[:300])
    return tmp_path


def test_verify_reports_headers_counts_and_largest_id(shards, capsys):
    assert gdata.main(["verify", str(shards)]) == 0
    out = capsys.readouterr().out
    assert "x_train_000000.bin: llm.c header (magic 20240520, version 1, 1,000 tokens); 1,000 tokens, largest id 49950" in out
    assert "train: 2 shards, 1,500 tokens, largest id 49950" in out and "val: 1 shards, 300 tokens" in out
    assert out.rstrip().endswith("OK")
    report = gdata.verify(shards)
    assert report.ok and [c.tokens for c in report.shards] == [1000, 500, 300]


CORRUPTIONS = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-7]), "truncated shard"),
    "cut inside the header": (lambda p: p.write_bytes(p.read_bytes()[:100]), "shorter than llm.c's 1024-byte header"),
    "wrong version": (lambda p: p.write_bytes(_header(1000, version=7) + p.read_bytes()[1024:]), "version 7"),
    "reserved header ints": (lambda p: p.write_bytes(_header(1000, reserved=5) + p.read_bytes()[1024:]),
                             "reserved ints .* should be 0, int 10 is not"),
    "count too small": (lambda p: p.write_bytes(_header(900) + p.read_bytes()[1024:]), "announces 900 tokens"),
    "empty shard": (lambda p: p.write_bytes(_header(0)), "empty shard"),
    "id outside the vocabulary": (lambda p: write_shard(p, np.full(1000, 60000)), "token id 60000 is outside the vocabulary"),
    "odd-sized raw file": (lambda p: p.write_bytes(b"\x01\x02\x03"), "not a whole number of uint16 tokens"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_verify_and_training_refuse_a_corrupt_shard(shards, capsys, corruption):
    damage, message = CORRUPTIONS[corruption]
    damage(shards / "x_train_000000.bin")
    assert gdata.main(["verify", str(shards)]) == 2
    captured = capsys.readouterr()
    assert "x_train_000000.bin: " in captured.out and "CORRUPT" in captured.out
    assert captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1
    assert re.search(message, captured.err), captured.err
    if corruption == "reserved header ints":
        return  # only verify is that strict: the loader reads such a shard (its tokens may well be fine)
    # The loader refuses it too, with the same diagnosis (the vocabulary is checked when a shard is read).
    with pytest.raises(gdata.DataError, match=message):
        loader = gdata.DataLoader(shards, "train", 2, 8)
        for _ in range(200):
            loader.next_batch()


def test_verify_checks_the_manifest(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"doc{i}.txt").write_text(f"document {i}: " + "some words here " * 40)
    out = tmp_path / "prepared"
    gdata.prepare([tmp_path / "docs"], out, shard_tokens=200, val_fraction=0.3, workers=1, verbose=False)
    assert gdata.verify(out).ok
    shards = sorted(out.glob("*_train_*.bin"))
    shards[-1].unlink()
    write_shard(out / "data_train_999999.bin", np.arange(10))
    problems = gdata.verify(out).problems
    assert any(f"lists train shards that are missing: {shards[-1].name}" in p for p in problems), problems
    assert any("train shards not listed in manifest.json: data_train_999999.bin" in p for p in problems), problems
    assert gdata.main(["verify", str(out)]) == 2
    capsys.readouterr()


def test_verify_notes_leftovers_and_a_missing_split(tmp_path, capsys):
    write_shard(tmp_path / "x_train_000000.bin", np.arange(100))
    (tmp_path / ".x_train_000001.bin.123-abc.tmp").write_bytes(b"partial")
    assert gdata.main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: no val shards" in out and "temporary files of an interrupted write" in out


def test_verify_with_another_vocabulary(shards, capsys):
    assert gdata.main(["verify", str(shards), "--vocab-size", "1000"]) == 2
    assert "token id 49950 is outside the vocabulary (vocab_size 1000)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["verify", "info"])
def test_data_cli_without_shards(tmp_path, capsys, command):
    (tmp_path / "empty").mkdir()
    assert gdata.main([command, str(tmp_path / "empty")]) == 2
    assert "no shards in" in capsys.readouterr().err
    assert gdata.main([command, str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "missing") in err


def test_prepare_without_inputs_found(tmp_path, capsys):
    assert gdata.main(["prepare", str(tmp_path / "nothing*.txt"), "--out", str(tmp_path / "out")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# train_gpt2.py

FAST = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--kernels", "none", "--device", "cpu",
        "--eval-batches", "1", "--eval-every", "0", "--warmup-steps", "1", "--sample-tokens", "2"]


def train(*args):
    import train_gpt2

    with registry.use_kernels(None):
        return train_gpt2.main([*FAST, *map(str, args)])


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be >= 1, got 0"),
    ("--seq-len", "-3", "--seq-len must be >= 1"),
    ("--eval-batches", "0", "--eval-batches must be >= 1"),
    ("--keep-last", "-1", "--keep-last must be >= 0"),
    ("--checkpoint-every", "-5", "--checkpoint-every must be >= 0"),
    ("--spike-window", "1", "--spike-window must be >= 2"),
    ("--spike-zscore", "nan", "--spike-zscore must be >= 0"),
    ("--on-nonfinite", "ignore", "invalid choice: 'ignore'"),
    ("--device", "tpu", "--device 'tpu' is not a device"),
    ("--sample-prompt", "", "--sample-prompt must not be empty"),
])
def test_train_flag_errors(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        train("--out-dir", tmp_path, "--max-steps", 1, flag, value)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_train_on_a_machine_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    import train_gpt2

    with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is available here"):
        train_gpt2.main(["--device", "cuda", "--out-dir", str(tmp_path), "--max-steps", "1"])


@pytest.mark.parametrize("problem, message", [
    ("missing folder", "is neither a folder nor a glob"),
    ("empty folder", "no train shards in"),
    ("truncated shard", "truncated shard"),
    ("id outside the vocabulary", "token id 60000 is outside the vocabulary"),
    ("only val shards", "no train shards in"),
])
def test_train_refuses_bad_data(tmp_path, problem, message):
    data = tmp_path / "data"
    if problem != "missing folder":
        data.mkdir()
    tokens = np.arange(2000) % 1000
    if problem in ("truncated shard", "id outside the vocabulary"):
        write_shard(data / "d_val_000000.bin", tokens)
        train_shard = write_shard(data / "d_train_000000.bin", np.where(tokens == 7, 60000, tokens)
                                  if problem == "id outside the vocabulary" else tokens)
        if problem == "truncated shard":
            train_shard.write_bytes(train_shard.read_bytes()[:-10])
    if problem == "only val shards":
        write_shard(data / "d_val_000000.bin", tokens)
    with pytest.raises(ValueError, match=message):
        train("--data", data, "--out-dir", tmp_path / "out", "--max-steps", 1)


def test_train_resume_refuses_a_damaged_checkpoint_and_another_config(tmp_path):
    data = tmp_path / "data"
    write_shard(data / "d_train_000000.bin", np.arange(3000) % 1000)
    write_shard(data / "d_val_000000.bin", np.arange(500) % 1000)
    out = tmp_path / "out"
    # A long sample prompt, more tokens than the block size: the sample keeps the prompt's last block.
    long_prompt = "def f(x): return x + 1\n" * 40
    assert train("--data", data, "--out-dir", out, "--max-steps", 1, "--sample-prompt", long_prompt) == 0
    path = ckpt.checkpoint_path(out, 1)
    data_bytes = bytearray(path.read_bytes())
    data_bytes[-50] ^= 0xFF
    path.write_bytes(bytes(data_bytes))
    with pytest.raises(ValueError, match=r"no complete checkpoint in .* loads: .*ckpt_0000001.pt: damaged: SHA-256"):
        train("--data", data, "--out-dir", out, "--max-steps", 2, "--resume")
    ckpt.save_checkpoint(out, 1, {"model": {}, "optimizer": {}, "step": 1, "config": preset("tiny", n_layer=2).to_dict()})
    with pytest.raises(ValueError, match=r"another model config \(n_layer: checkpoint 2 vs run 4\)"):
        train("--data", data, "--out-dir", out, "--max-steps", 2, "--resume")



# ---------------------------------------------------------------------------------------------------
# python -m gpt.generate and python -m gpt.evaluate

GPT2_VOCAB_SMALL = GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16)  # the tokenizer's vocabulary


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    with registry.use_kernels("none"):
        model = GPT(GPT2_VOCAB_SMALL)
    state = {"model": model.state_dict(), "optimizer": {}, "step": 1, "config": GPT2_VOCAB_SMALL.to_dict()}
    return ckpt.save_checkpoint(tmp_path_factory.mktemp("ckpt"), 1, state)


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "an empty prompt has no token to continue from"),
    (["--prompt", "word " * 20], "longer than the model's block size 8"),
    (["--num-samples", "0"], "--num-samples must be >= 1"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "0"], "top_p must be"),
    (["--dtype", "bfloat16", "--device", "cpu"], "needs CUDA"),
])
def test_generate_cli_errors(small_checkpoint, capsys, args, message):
    from gpt import generate as generate_cli

    with registry.use_kernels(None):
        assert generate_cli.main(["--checkpoint", str(small_checkpoint), "--kernels", "none", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("module", ["generate", "evaluate"])
def test_cli_refuses_a_missing_or_damaged_checkpoint(small_checkpoint, tmp_path, capsys, module):
    cli = __import__(f"gpt.{module}", fromlist=["main"])
    assert cli.main(["--checkpoint", str(tmp_path / "nope.pt"), "--device", "cpu"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    damaged = tmp_path / small_checkpoint.name
    damaged.write_bytes(small_checkpoint.read_bytes()[:-1000])
    ckpt.manifest_path(damaged).write_text(ckpt.manifest_path(small_checkpoint).read_text())
    assert cli.main(["--checkpoint", str(damaged), "--device", "cpu"]) == 2
    assert "damaged" in capsys.readouterr().err


def test_evaluate_cli_refuses_bad_data(small_checkpoint, tmp_path, capsys):
    from gpt import evaluate as evaluate_cli

    (tmp_path / "empty").mkdir()
    with registry.use_kernels(None):
        assert evaluate_cli.main(["--checkpoint", str(small_checkpoint), "--data", str(tmp_path / "empty"),
                                  "--device", "cpu", "--kernels", "none"]) == 2
    assert "no val shards" in capsys.readouterr().err
    hellaswag = tmp_path / "hellaswag.jsonl"
    hellaswag.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}) + "\n")
    with registry.use_kernels(None):
        assert evaluate_cli.main(["--checkpoint", str(small_checkpoint), "--hellaswag", str(hellaswag),
                                  "--device", "cpu", "--kernels", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
