"""The `llama` architecture: its reference ops (RMSNorm, RoPE, SwiGLU, grouped-query attention) against
float64 formulas, the config and presets, parity with transformers' LlamaForCausalLM, the KV cache,
the kernels switched on, and a short training run with resume through train_gpt2.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from compare import save_perturbed_hf_model
from conftest import DEVICE
from gpt.config import PRESETS, GPTConfig, preset
from gpt.generate import generate, generate_tokens
from gpt.model import GPT, KVCache
from gpt_kernels import attention_reference, decode_attention_reference, registry
from gpt_kernels import rmsnorm_reference, rope_reference, swiglu_reference
from gpt_kernels.rope import rope_table
from gpt_kernels.registry import use_kernels
from gpt_kernels.rope import compute_rope_table

TINY = GPTConfig(arch="llama", block_size=32, vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                 mlp_hidden=48)


def rel_error(got, expected):
    return ((got.double() - expected).norm() / expected.norm()).item()


def rows_with_large_mean(shape, dtype, seed=0):
    """Fresh random rows, the last of them with a large mean and a tiny spread."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[-1] = 300.0 + 1e-3 * x[-1]
    return x.to(dtype)


# ----------------------------------------------------------------------------------------------------
# The reference ops against float64 formulas


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rmsnorm_reference(dtype, tol, with_residual):
    x = rows_with_large_mean((5, 37), dtype)
    residual = rows_with_large_mean((5, 37), dtype, seed=1) if with_residual else None
    weight = torch.randn(37, dtype=torch.float32)  # fp32 gains may meet a half-precision stream
    out = rmsnorm_reference(x, weight, 1e-6, residual=residual)
    s = x.double() + (residual.double() if with_residual else 0)
    if with_residual:
        out, stream = out
        assert stream.dtype == dtype and torch.equal(stream, x + residual)
        s = stream.double()  # the op normalizes the stored (rounded) sum
    expected = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_error(out, expected) < tol


def test_rmsnorm_output_in_the_autocast_dtype():
    x, weight = torch.randn(4, 16), torch.ones(16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stream = rmsnorm_reference(x, weight, 1e-5, residual=torch.randn(4, 16))
    assert y.dtype == torch.bfloat16 and stream.dtype == torch.float32


def test_rope_table_and_rotation_against_complex_numbers():
    B, T, Hq, Hkv, D, theta = 2, 7, 4, 2, 10, 31337.0
    cos, sin = rope_table(16, D, theta)
    assert cos.shape == (16, D // 2) and cos.dtype == torch.float32
    assert rope_table(16, D, theta)[0] is cos  # computed once per (length, head dim, theta, device)
    # strided inputs, as the model has them: views of one (B, T, (Hq + Hkv)·D) projection
    qk = torch.randn(B, T, (Hq + Hkv) * D, dtype=torch.float64)
    q, k = qk.split([Hq * D, Hkv * D], dim=2)
    q, k = q.view(B, T, Hq, D), k.view(B, T, Hkv, D)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 5, 6]])

    def direct(x):  # pair (x[i], x[i + D/2]) as a complex number, turned by position · θ^(-2i/D)
        angle = positions[:, :, None, None].double() * theta ** (-torch.arange(0, D, 2).double() / D)
        z = torch.complex(x[..., : D // 2], x[..., D // 2:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1)

    for dtype, tol in [(torch.float64, 1e-6), (torch.float32, 1e-6), (torch.bfloat16, 8e-3)]:
        q_rot, k_rot = rope_reference(q.to(dtype), k.to(dtype), cos, sin, positions)
        assert q_rot.dtype == dtype and q_rot.shape == q.shape and k_rot.shape == k.shape
        assert rel_error(q_rot, direct(q)) < tol and rel_error(k_rot, direct(k)) < tol
    # (T,) positions are every row's
    q_rot, _ = rope_reference(q, k, cos, sin, positions[1])
    assert rel_error(q_rot[1], direct(q)[1]) < 1e-6


def test_rope_matches_transformers_bit_for_bit():
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=32, rope_theta=5000.0)
    hf_rope = llama.LlamaRotaryEmbedding(config)
    positions = torch.arange(20)[None]
    q, k = torch.randn(1, 4, 20, 16), torch.randn(1, 4, 20, 16)  # HF's (B, H, T, D)
    hf_cos, hf_sin = hf_rope(q, positions)
    hf_q, hf_k = llama.apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    cos, sin = compute_rope_table(32, 16, 5000.0)
    our_q, our_k = rope_reference(q.transpose(1, 2), k.transpose(1, 2), cos, sin, positions[0])
    assert torch.equal(our_q.transpose(1, 2), hf_q) and torch.equal(our_k.transpose(1, 2), hf_k)


def test_rope_rejects_bad_input():
    cos, sin = rope_table(8, 4, 10000.0)
    q = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match="positions must be"):
        rope_reference(q, q, cos, sin, torch.arange(8.0))
    with pytest.raises(ValueError, match="even"):
        rope_table(8, 5, 10000.0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_swiglu_reference(dtype, tol):
    gate_up = (3 * torch.randn(3, 5, 2 * 19, dtype=torch.float64)).to(dtype)
    out = swiglu_reference(gate_up[:, 1:])  # non-contiguous
    gate, up = gate_up[:, 1:].double().chunk(2, dim=-1)
    expected = gate / (1 + torch.exp(-gate)) * up
    assert out.dtype == dtype and out.shape == (3, 4, 19)
    assert rel_error(out, expected) < tol
    with pytest.raises(ValueError, match="must be even"):
        swiglu_reference(torch.randn(2, 5))


@pytest.mark.parametrize("causal", [True, False])
def test_grouped_attention_reference(causal):
    B, Hq, Hkv, T, D = 2, 6, 2, 9, 8
    q, k, v = torch.randn(B, Hq, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    group = Hq // Hkv
    kr, vr = (t.double().repeat_interleave(group, dim=1) for t in (k, v))  # head h reads head h // group
    scores = q.double() @ kr.transpose(-1, -2) / math.sqrt(D)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = scores.softmax(-1) @ vr
    assert rel_error(attention_reference(q, k, v, causal=causal), expected) < 1e-6


def test_grouped_decode_attention_reference():
    B, Hq, Hkv, L, D = 3, 4, 2, 6, 8
    q, k, v = torch.randn(B, Hq, 1, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    lengths = torch.tensor([6, 1, 4])
    expected = decode_attention_reference(q.double(), *(t.double().repeat_interleave(2, dim=1) for t in (k, v)),
                                          lengths)
    assert rel_error(decode_attention_reference(q, k, v, lengths), expected) < 1e-6


def test_ops_are_registered_with_triton_kernels():
    for op in ("rmsnorm", "rope", "swiglu"):
        assert op in registry.OPS and registry.has_triton(op)
        assert registry.implementation(op, "cpu")[0] == ("triton" if registry.triton_runs_on("cpu") else "torch")


# ----------------------------------------------------------------------------------------------------
# Config and presets


def test_presets():
    sizes = {}
    for name in ("llama-tiny", "llama-124m", "llama-1b"):
        config = PRESETS[name]
        assert config.arch == "llama" and not config.bias and not config.tie_embeddings
        with torch.device("meta"):
            model = GPT(config)
        assert "wpe" not in model.transformer and model.lm_head.weight is not model.transformer.wte.weight
        sizes[name] = model.num_parameters()
    c = PRESETS["llama-124m"]
    assert (c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.mlp_width, c.padded_vocab_size) == (12, 768, 12, 4, 2048, 50304)
    per_layer = 768 * (768 + 2 * 256) + 768 * 768 + 3 * 768 * 2048 + 2 * 768
    assert sizes["llama-124m"] == 12 * per_layer + 768 + 2 * 50304 * 768
    c = PRESETS["llama-1b"]
    assert (c.n_layer, c.n_embd, c.n_head, c.kv_heads, c.mlp_width) == (16, 2048, 32, 8, 8192)
    assert 1.1e9 < sizes["llama-1b"] < 1.3e9  # 1.18B on the 50304-row vocabulary
    # overriding a preset's width keeps the derived sizes consistent (bench --quick does this)
    assert preset("gpt2", n_embd=64, n_head=4).mlp_width == 256


@pytest.mark.parametrize("values, message", [
    (dict(arch="mamba"), "arch must be one of"),
    (dict(arch="llama", n_head=4, n_kv_head=3, n_embd=32), "must divide n_head"),
    (dict(n_head=4, n_kv_head=2, n_embd=32), "gpt2 has no grouped-query attention"),
    (dict(arch="llama", n_head=4, n_embd=12), "even head dim"),
])
def test_config_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**values)


# ----------------------------------------------------------------------------------------------------
# Parity with transformers' LlamaForCausalLM


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def hf_llama(request, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=31337.0, rms_norm_eps=1e-6,
        tie_word_embeddings=request.param,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    # RMSNorm gains away from their init of ones.
    return save_perturbed_hf_model(hf, tmp_path_factory.mktemp("hf_llama"), 0.1, only="norm")


def test_hf_llama_logits_match_transformers(hf_llama):
    folder, hf = hf_llama
    ours = GPT.from_pretrained(folder).eval()
    assert ours.config.kv_heads == 2 and ours.config.rope_theta == 31337.0
    idx = torch.randint(0, 211, (2, 24))
    with torch.no_grad(), use_kernels("none"):
        logits, _ = ours(idx)
        expected = hf(idx).logits
    assert logits.shape == expected.shape
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_hf_llama_greedy_generation_matches_transformers(hf_llama):
    folder, hf = hf_llama
    ours = GPT.from_pretrained(folder)
    prompt = torch.randint(0, 211, (1, 7))
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    with use_kernels("none"):
        out = generate(ours, prompt, 16, temperature=0.0)
    assert out.tolist() == expected.tolist()


def test_hf_llama_needs_its_config(hf_llama, tmp_path):
    folder, _ = hf_llama
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="needs its config.json"):
        GPT.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------
# The model: KV cache, kernels on


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(TINY).to(DEVICE)


def test_kv_cache_equals_cache_free_greedy(model):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in (1, 7, 11, 4)]
    with use_kernels("none"):
        for new_tokens in (12, 30):  # 30: the longest row slides past the block size, without the cache
            cached = generate_tokens(model, prompts, new_tokens, temperature=0.0, use_kv_cache=True)
            assert cached == generate_tokens(model, prompts, new_tokens, temperature=0.0, use_kv_cache=False)


@pytest.mark.parametrize("kernels", ["none", "all"])
def test_prefill_and_decode_logits_match_full_forward(model, kernels):
    """RoPE at the right positions in prefill and in each decode step (a (B, 1) position per row),
    on the references and with every kernel on (the grouped-query attention runs its reference)."""
    torch.manual_seed(1)
    seq = torch.randint(0, TINY.vocab_size, (3, 14), device=DEVICE)
    prompt_lengths = torch.tensor([5, 9, 2], device=DEVICE)
    with torch.no_grad(), use_kernels(kernels):
        full, _ = model(seq)
        cache = KVCache(TINY, 3, 14, DEVICE)
        logits, _ = model(seq[:, :9], kv_cache=cache, prompt_lengths=prompt_lengths)
        torch.testing.assert_close(logits, full[torch.arange(3), prompt_lengths - 1])
        assert cache.keys[0].shape == (3, TINY.kv_heads, 14, TINY.head_dim)  # the cache holds only the KV heads
        for step in range(4):  # each row at its own position
            positions = prompt_lengths + step
            logits, _ = model(seq[torch.arange(3), positions][:, None], kv_cache=cache)
            torch.testing.assert_close(logits, full[torch.arange(3), positions])


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_kernels_on_match_the_references(n_kv_head):
    """With every kernel asked for, the Triton RMSNorm, RoPE, SwiGLU, attention (grouped K/V heads included) and loss run;
    the loss and gradients match the references'."""
    assert registry.is_triton("attention", DEVICE)
    torch.manual_seed(0)
    config = GPTConfig(arch="llama", block_size=16, vocab_size=100, n_layer=1, n_head=4, n_kv_head=n_kv_head,
                       n_embd=32, mlp_hidden=48)
    model = GPT(config).to(DEVICE)
    idx = torch.randint(0, 100, (2, 16), device=DEVICE)
    results = []
    for spec in ("none", "all"):
        model.zero_grad()
        with use_kernels(spec):
            logits, loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[1][1].items():
        torch.testing.assert_close(grad, results[0][1][name], atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_generation_with_every_kernel_on(model):
    """Grouped-query prefill (Triton attention) and decode steps (Triton decode attention) give the
    references' tokens, with the KV cache and without it."""
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in (3, 8, 5)]
    with use_kernels("none"):
        reference = generate_tokens(model, prompts, 4, temperature=0.0, use_kv_cache=True)
    with use_kernels("all"):
        assert registry.is_triton("decode_attention", DEVICE) and TINY.kv_heads < TINY.n_head
        assert generate_tokens(model, prompts, 4, temperature=0.0, use_kv_cache=True) == reference
        assert generate_tokens(model, prompts, 4, temperature=0.0, use_kv_cache=False) == reference


# ----------------------------------------------------------------------------------------------------
# Training through train_gpt2.py, and resume


def test_llama_tiny_trains_and_resumes(tmp_path):
    import json
    import shutil

    import numpy as np

    import train_gpt2
    from gpt.data import write_shard

    rng = np.random.default_rng(0)
    sentences = [rng.integers(0, 2000, size=rng.integers(5, 12)) for _ in range(50)]
    stream = np.concatenate([sentences[i] for i in rng.integers(0, 50, size=3000)]).astype(np.uint16)
    write_shard(tmp_path / "synthetic_train_000000.bin", stream[:-2000])
    write_shard(tmp_path / "synthetic_val_000000.bin", stream[-2000:])
    common = ["--preset", "llama-tiny", "--batch-size", "4", "--seq-len", "32", "--kernels", "none",
              "--device", "cpu", "--eval-batches", "2", "--warmup-steps", "2", "--data", str(tmp_path),
              "--max-steps", "6", "--checkpoint-every", "3", "--eval-every", "3", "--lr", "3e-3",
              "--sample-tokens", "4"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_gpt2.main([*common, "--out-dir", str(straight)]) == 0
    # As if the run had died after its step-3 checkpoint: that checkpoint and the log, then --resume.
    resumed.mkdir()
    for path in [*straight.glob("ckpt_0000003.*"), straight / "log.jsonl"]:
        shutil.copy(path, resumed / path.name)
    assert train_gpt2.main([*common, "--out-dir", str(resumed), "--resume"]) == 0

    def records(folder):
        return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]

    losses = lambda folder: [(r["step"], r["train_loss"]) for r in records(folder) if "train_loss" in r]  # noqa: E731
    assert losses(resumed) == losses(straight) and len(losses(straight)) == 6
    vals = [r["val_loss"] for r in records(straight) if "val_loss" in r]
    assert vals[-1] < vals[0], vals
    saved = torch.load(straight / "ckpt_0000006.pt", weights_only=True)
    assert saved["config"]["arch"] == "llama"


# ----------------------------------------------------------------------------------------------------
# The end-to-end benchmark


def test_e2e_bench_runs_a_llama_preset():
    from bench import e2e

    settings = e2e.E2ESettings(preset="llama-124m", batch_size=2, seq_len=16, dtype="float32", warmup_steps=1,
                               steps=1, ablation="full")
    config, configs = e2e.check_settings(settings, "cpu", quick=True)
    assert config.arch == "llama" and config.kv_heads == 1  # the toy size keeps grouped-query attention
    ablated = {c.name for c in configs}
    assert "only attention" in ablated and "only layernorm" not in ablated and "only gelu" not in ablated
    settings.ablation = "baselines"
    section = e2e.run_e2e(settings, "cpu", quick=True, matmul_tflops={})
    rows = [row for row in section["rows"] if "error" not in row and "skipped" not in row]
    assert len(rows) == 2 and all(row["median_ms"] > 0 for row in rows), section["rows"]
    assert section["flops_per_token"] == e2e.flops_per_token(config, 16)


# ----------------------------------------------------------------------------------------------------
# FSDP2 (the worker shards each block, as train_gpt2.py does): two CPU ranks against one process


def test_fsdp_two_ranks_match_one_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    import fsdp_worker
    from gpt.training import make_optimizer

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "tests" / "fsdp_worker.py"), str(out), "none", "llama"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = torch.load(out, weights_only=True)
    with use_kernels("none"):
        torch.manual_seed(0)
        model = GPT(fsdp_worker.LLAMA_CONFIG)
        losses, _ = fsdp_worker.train(model, make_optimizer(model, lr=1e-2, weight_decay=0.1))
    np.testing.assert_allclose(sharded["losses"], losses, rtol=1e-5)
    for name, p in model.state_dict().items():
        # As in test_distributed's DDP test: a gradient that cancels to ~0 is rounding noise that
        # differs with the reduction order, and Adam turns it into a step of up to lr (1e-2). So every
        # element within a tenth of a step, and all but 1% within rtol 1e-4 / atol 1e-5.
        diff = (sharded["params"][name] - p).abs()
        assert diff.max() <= 1e-3, f"{name}: max |difference| {diff.max():.3g}"
        loose = diff > 1e-5 + 1e-4 * p.abs()
        assert loose.sum() <= max(1, loose.numel() // 100), f"{name}: {int(loose.sum())} elements differ"
