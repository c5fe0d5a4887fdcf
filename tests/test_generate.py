"""Generation: the KV cache against cache-free generation, HuggingFace parity, sampling options, the CLI.

Everything runs the PyTorch references (``use_kernels("none")``): the Triton decode kernel inside
generation is tested in tests/test_decode_attention.py.
"""

import pytest
import torch

from compare import save_perturbed_hf_model
from conftest import DEVICE
from gpt.checkpoint import save_checkpoint
from gpt.generate import filter_logits, generate, generate_tokens, load_model, main, sample_next
from gpt.model import GPT, GPTConfig, KVCache
from gpt.tokenizer import EOT_TOKEN, decode, encode
from gpt_kernels.registry import use_kernels

TINY = GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(autouse=True)
def _reference_kernels():
    with use_kernels("none"):
        yield


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(TINY).to(DEVICE)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, TINY.vocab_size, (n,), generator=g).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------------------
# The KV cache


@pytest.mark.parametrize("max_new_tokens", [12, 40], ids=["within-block", "past-block"])
def test_kv_cache_equals_cache_free_greedy(model, max_new_tokens):
    # Several prompt lengths in one batch; with 40 new tokens the longest row passes the block size
    # (32) and generation goes on without the cache, sliding the window.
    prompts = prompts_of([1, 7, 11, 4])
    cached = generate_tokens(model, prompts, max_new_tokens, temperature=0.0, use_kv_cache=True)
    cache_free = generate_tokens(model, prompts, max_new_tokens, temperature=0.0, use_kv_cache=False)
    assert cached == cache_free
    assert all(len(c) == max_new_tokens for c in cached)
    # Batching changes nothing: each row alone gives the same tokens.
    for prompt, completion in zip(prompts, cached):
        assert generate_tokens(model, [prompt], max_new_tokens, temperature=0.0) == [completion]


def test_prefill_and_decode_logits_match_full_forward(model):
    torch.manual_seed(1)
    seq = torch.randint(0, TINY.vocab_size, (3, 14), device=DEVICE)
    prompt_lengths = torch.tensor([5, 9, 2], device=DEVICE)
    with torch.no_grad():
        full, _ = model(seq)
        cache = KVCache(TINY, 3, 14, DEVICE)
        logits, _ = model(seq[:, :9], kv_cache=cache, prompt_lengths=prompt_lengths)
        torch.testing.assert_close(logits, full[torch.arange(3), prompt_lengths - 1])
        for step in range(4):  # each row continues from its own length with its own next token
            positions = prompt_lengths + step
            logits, _ = model(seq[torch.arange(3), positions][:, None], kv_cache=cache)
            torch.testing.assert_close(logits, full[torch.arange(3), positions])
    assert cache.lengths.tolist() == (prompt_lengths + 4).tolist() and cache.longest == 13


def test_kv_cache_rejects_misuse(model):
    idx = torch.zeros((2, 4), dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="block_size"):
        KVCache(TINY, 2, TINY.block_size + 1, DEVICE)
    cache = KVCache(TINY, 2, 5, DEVICE)
    with pytest.raises(ValueError, match="lengths in"):
        model(idx, kv_cache=cache, prompt_lengths=[5, 1])
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.zeros((2, 6), dtype=torch.long, device=DEVICE), kv_cache=cache)
    with pytest.raises(ValueError, match="exclude"):
        model(idx, idx, kv_cache=cache)
    model(idx, kv_cache=cache)
    with pytest.raises(ValueError, match="one new token per row"):
        model(idx, kv_cache=cache)
    model(idx[:, :1], kv_cache=cache)
    with pytest.raises(ValueError, match="full"):
        model(idx[:, :1], kv_cache=cache)


def test_training_forward_unchanged_by_the_cache_path(model):
    idx = torch.randint(0, TINY.vocab_size, (2, 16), device=DEVICE)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, TINY.vocab_size) and loss.ndim == 0


# ----------------------------------------------------------------------------------------------------
# HuggingFace parity


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A random GPT-2 (GPT-2's vocabulary, so the CLI's tokenizer fits) saved with save_pretrained,
    every parameter perturbed so that biases and LayerNorms are not their trivial init."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(config).eval()
    return save_perturbed_hf_model(hf, tmp_path_factory.mktemp("hf_gpt2"), 0.05)


def test_greedy_matches_transformers_generate(hf_folder):
    folder, hf = hf_folder
    ours = GPT.from_pretrained(folder).to(DEVICE)
    prompt = torch.tensor([encode("The quick brown fox jumps over")])
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
    out = generate(ours, prompt.to(DEVICE), 20, temperature=0.0)
    assert out.tolist() == expected.tolist()


# ----------------------------------------------------------------------------------------------------
# Sampling


def test_filter_logits_top_k_and_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = probs.log()
    kept = lambda out: torch.isfinite(out).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [[True, True, False, False], [False, False, True, True]]
    # The smallest set whose mass reaches top_p: 0.5 < 0.75, so 0.5 + 0.3 is needed; 0.85 needs a third.
    assert kept(filter_logits(logits, top_p=0.75)) == [[True, True, False, False], [False, False, True, True]]
    assert kept(filter_logits(logits, top_p=0.85)) == [[True, True, True, False], [False, True, True, True]]
    assert kept(filter_logits(logits, top_p=1e-6)) == [[True, False, False, False], [False, False, False, True]]
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    prompts = prompts_of([3, 6])
    greedy = generate_tokens(model, prompts, 10, temperature=0.0)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    assert generate_tokens(model, prompts, 10, temperature=0.8, top_k=1, generator=gen) == greedy
    assert generate_tokens(model, prompts, 10, temperature=0.8, top_p=1e-9, generator=gen) == greedy


def test_top_p_one_equals_plain_sampling(model):
    prompt = prompts_of([4])[0]
    sampled = generate_tokens(model, [prompt], 10, temperature=1.0, top_p=1.0,
                              generator=torch.Generator(device=DEVICE).manual_seed(5))
    # Plain sampling written out: softmax of the full forward's last logits, one multinomial draw.
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    ids = torch.tensor([prompt], device=DEVICE)
    with torch.no_grad():
        for _ in range(10):
            probs = torch.softmax(model(ids)[0][:, -1].float(), dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    assert sampled == [ids[0, len(prompt):].tolist()]


def test_fixed_seed_reproduces_and_leaves_global_rng_alone(model):
    prompts = prompts_of([2, 5])
    state = torch.get_rng_state()

    def sample(seed):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        return generate_tokens(model, prompts, 12, temperature=1.0, top_k=50, top_p=0.9, generator=gen)

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    assert torch.equal(torch.get_rng_state(), state)


def test_stop_token_ends_rows_and_pads_tensors(model):
    # Sampled, not greedy (a random model's greedy output repeats one token): stopped rows keep
    # drawing with the others, so the random stream, and every row's tokens, stay the same.
    prompts = prompts_of([3, 8, 5])

    def sample(prompts, stop_token=None, tensor=False):
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        if tensor:
            return generate(model, torch.tensor(prompts, device=DEVICE), 12, generator=gen, stop_token=stop_token)
        return generate_tokens(model, prompts, 12, generator=gen, stop_token=stop_token)

    free = sample(prompts)
    stop = free[0][4]  # a token row 0 emits in the middle
    stopped = sample(prompts, stop)
    assert len(stopped[0]) <= 5
    for completion, full in zip(stopped, free):
        assert completion == (full[: full.index(stop) + 1] if stop in full else full)
    # The tensor API pads stopped rows with the stop token; a batch whose rows all stopped ends early.
    alone = prompts[:1]
    stop = sample(alone)[0][4]
    out = sample(alone, stop, tensor=True)
    assert out.shape[1] <= 3 + 5 and out[0, 3:].tolist() == sample(alone, stop)[0]
    same_length = [p[:3] for p in prompts]
    out = sample(same_length, stop, tensor=True)
    for row, completion in zip(out[:, 3:].tolist(), sample(same_length, stop)):
        assert row == completion + [stop] * (len(row) - len(completion))


def test_prompt_longer_than_block_keeps_its_last_block(model):
    long_prompt = prompts_of([45])[0]
    out = generate_tokens(model, [long_prompt], 5, temperature=0.0)
    assert out == generate_tokens(model, [long_prompt[-TINY.block_size:]], 5, temperature=0.0, use_kv_cache=False)


def test_compiled_model_generates_through_its_module(model):
    prompts = prompts_of([4, 2])
    compiled = torch.compile(model)  # generation unwraps it: no graph is ever compiled here
    assert generate_tokens(compiled, prompts, 6, temperature=0.0) == generate_tokens(model, prompts, 6, temperature=0.0)


def test_sampling_arguments_are_checked(model):
    prompts = prompts_of([2])
    for kwargs, message in [
        (dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate_tokens(model, prompts, 2, **kwargs)
    with pytest.raises(ValueError, match="at least one token"):
        generate_tokens(model, [[]], 2)
    with pytest.raises(ValueError, match="vocab_size"):
        generate_tokens(model, [[TINY.vocab_size]], 2)
    assert sample_next(torch.tensor([[0.0, 3.0, 1.0]]), temperature=0.0).tolist() == [1]


# ----------------------------------------------------------------------------------------------------
# The command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = GPTConfig(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    state = dict(model=model.state_dict(), optimizer={}, step=1, config=config.to_dict())
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), 1, state), model


def test_cli_streams_one_greedy_sample(checkpoint, capsys):
    path, model = checkpoint
    args = ["--checkpoint", str(path), "--prompt", "Hello, I'm", "--max-new-tokens", "8", "--temperature", "0",
            "--device", DEVICE, "--dtype", "float32"]
    assert main(args) == 0
    first = capsys.readouterr().out
    expected = generate_tokens(model.to(DEVICE), [encode("Hello, I'm")], 8, temperature=0.0, stop_token=EOT_TOKEN)[0]
    assert first == "Hello, I'm" + decode([t for t in expected if t != EOT_TOKEN]) + "\n"
    assert main(args) == 0 and capsys.readouterr().out == first


def test_cli_batches_prompts_and_samples(checkpoint, capsys):
    path, _ = checkpoint
    with use_kernels("all"):  # --kernels is applied inside, and restored by use_kernels on exit
        code = main(["--checkpoint", str(path), "--prompt", "a", "--prompt", "The end of the", "--num-samples", "2",
                     "--max-new-tokens", "5", "--top-p", "0.9", "--device", DEVICE, "--kernels", "none"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("--- sample") == 4 and out.count("The end of the") == 2


def test_cli_hf_weights_and_benchmark(hf_folder, capsys):
    folder, _ = hf_folder
    assert main(["--hf-weights", str(folder), "--max-new-tokens", "3", "--num-samples", "2", "--benchmark",
                 "--device", DEVICE, "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "with the KV cache:" in out and "without the KV cache:" in out and "tokens/s" in out


def test_cli_rejects_a_prompt_longer_than_the_block(checkpoint, capsys):
    path, _ = checkpoint
    assert main(["--checkpoint", str(path), "--prompt", "word " * 100, "--device", DEVICE]) == 2
    assert "longer than the model's block size 64" in capsys.readouterr().err
    assert main(["--checkpoint", str(path.parent / "missing.pt"), "--device", DEVICE]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_load_model_from_an_fsdp_style_sharded_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    model = GPT(TINY)
    folder = tmp_path / "ckpt_0000001.dcp"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"model": model.state_dict(), "optimizer": {}}, checkpoint_id=str(folder))
    torch.save({"config": TINY.to_dict(), "step": 1}, folder / "extra.pt")
    loaded = load_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        load_model(tmp_path)
