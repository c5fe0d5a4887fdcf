import pytest
import torch

from gpt.config import PRESETS, GPTConfig, preset
from gpt.model import GPT
from gpt_kernels.registry import use_kernels


def _count(config: GPTConfig) -> int:
    with torch.device("meta"):  # counts parameters without allocating GPT-2-sized tensors
        return GPT(config).num_parameters()


def test_gpt2_parameter_counts():
    assert _count(preset("gpt2")) == 124_475_904  # vocab padded to 50304
    assert _count(preset("gpt2", vocab_pad_multiple=1)) == 124_439_808  # GPT-2's own 50257


def test_presets_sizes():
    # GPT-2's published sizes (rounded, vocab padded): medium 350M, large 774M, xl 1558M.
    assert round(_count(preset("gpt2-medium")) / 1e6) == 355
    assert round(_count(preset("gpt2-large")) / 1e6) == 774
    assert round(_count(preset("gpt2-xl")) / 1e6) == 1558
    assert set(PRESETS) >= {"gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "tiny", "small"}


def test_flops_per_token_gpt2():
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    n = 124_475_904 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * n + 6 * 12 * 1024 * 768


def test_init_and_tying():
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=100, n_layer=4, n_head=2, n_embd=64)
    model = GPT(config)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.transformer.wte.weight.shape[0] == 128  # 100 padded to a multiple of 64
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
    assert abs(proj.std().item() - 0.02 / (2 * 4) ** 0.5) < 2e-3
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 2e-3


def test_forward_shapes_loss_and_padding():
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config)
    idx = torch.randint(0, 100, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 100) and loss is None  # padding columns never reach the caller
    _, loss = model(idx, idx)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), idx.reshape(-1))
    torch.testing.assert_close(loss, expected)
    targets = idx.clone()
    targets[:, :8] = -100
    _, masked = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 100), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(masked, expected)


def test_the_fused_loss_is_the_callers_choice_not_a_kernel_switch():
    """forward returns logits unless its caller passes fused_loss=True, whichever kernels are on."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=32))
    idx = torch.randint(0, 100, (2, 16))
    with use_kernels("none"):
        logits, loss = model(idx, idx)
        no_logits, fused = model(idx, idx, fused_loss=True)  # the fused op's PyTorch reference
    assert logits.shape == (2, 16, 100) and no_logits is None
    torch.testing.assert_close(fused, loss)
    with use_kernels("linear_cross_entropy"):
        logits_on, loss_on = model(idx, idx)
    torch.testing.assert_close(logits_on, logits)
    torch.testing.assert_close(loss_on, loss)


def test_matches_textbook_block_order():
    """The fused add-then-norm layout computes exactly x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=100, n_layer=3, n_head=2, n_embd=32)
    model = GPT(config)
    idx = torch.randint(0, 100, (2, 10))
    t = model.transformer
    x = t.wte(idx) + t.wpe(torch.arange(10))
    for block in t.h:
        x = x + block.attn(block.ln_1(x))
        x = x + block.mlp(block.ln_2(x))
    expected = model.lm_head(t.ln_f(x))[..., :100]
    torch.testing.assert_close(model(idx)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "shape, dtype, match",
    [((2, 17), torch.long, "exceeds the model's block size"), ((2, 4), torch.float32, "int64/int32"), ((8,), torch.long, r"\(B, T\)")],
)
def test_bad_inputs(shape, dtype, match):
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=32))
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(shape, dtype=dtype))


def test_check_inputs_false_skips_only_the_range_checks():
    """The training loop's hot path: the same loss on valid ids, no host-syncing range check."""
    model = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=32))
    idx = torch.randint(0, 100, (2, 8))
    torch.testing.assert_close(model(idx, idx, check_inputs=False)[1], model(idx, idx)[1], rtol=0, atol=0)
    padding_id = torch.full((2, 8), 100)  # a row of the padded embedding: only the range check catches it
    with pytest.raises(ValueError, match="token ids must lie in"):
        model(padding_id)
    model(padding_id, check_inputs=False)
    with pytest.raises(ValueError, match="must equal idx shape"):  # shapes are still checked
        model(idx, idx[:, :4], check_inputs=False)


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")


def _hf_model(tmp_path, fmt):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=64, n_layer=3, n_head=4,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=(fmt == "safetensors"))
    return hf


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_matches_transformers(tmp_path, fmt):
    hf = _hf_model(tmp_path, fmt)
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.config.n_head == 4 and model.config.vocab_size == 300
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = model(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        GPT.from_pretrained(tmp_path)
    bogus = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(2)}, str(bogus))
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        GPT.from_pretrained(bogus)
