"""The Triton decode-attention kernel (flash-decoding) against a float64 reference.

Every test poisons the cache past each row's length with NaN (the kernel must never read there)
and, where it passes an output buffer, the output too. The reference runs on the cache with those
slots zeroed. bf16 runs in the interpreter too: the kernel has no ``tl.dot``.
"""

import copy
import warnings

import pytest
import torch

from conftest import DEVICE
from gpt.generate import generate_tokens
from gpt.model import GPT, GPTConfig, KVCache
from gpt_kernels import registry
from gpt_kernels.decode_attention import (
    MAX_SPLITS,
    decode_attention,
    decode_attention_forward,
    decode_attention_reference,
)
from gpt_kernels.registry import is_triton, use_kernels
from gpt_kernels.tolerances import DECODE_GRAD_FACTOR
from compare import assert_close, fresh_buffers_poisoned

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(B, H, T, D, lengths, dtype, device=DEVICE, kv_heads=None):
    """q, and caches (``kv_heads`` heads, default H) poisoned with NaN past each row's length; plus the
    float64 reference's inputs."""
    q = torch.randn(B, H, 1, D, device=device).to(dtype)
    k = torch.randn(B, kv_heads or H, T, D, device=device).to(dtype)
    v = torch.randn(B, kv_heads or H, T, D, device=device).to(dtype)
    lengths = torch.tensor(lengths, device=device)
    past = torch.arange(T, device=device)[None, :] >= lengths[:, None]  # (B, T)
    past = past[:, None, :, None]
    k_clean, v_clean = k.double().masked_fill(past, 0.0), v.double().masked_fill(past, 0.0)
    k, v = k.masked_fill(past, float("nan")), v.masked_fill(past, float("nan"))
    return q, k, v, lengths, (q.double(), k_clean, v_clean)


def expected(reference_inputs, lengths, scale=None):
    q, k, v = reference_inputs
    return decode_attention_reference(q, k, v, lengths, scale)


# (B, H, T, D, lengths): odd cache sizes, a row of length 1, a full row, head dims that are not powers of 2.
CASES = [
    (3, 2, 150, 64, [1, 77, 150]),
    (2, 3, 37, 40, [37, 5]),
    (1, 4, 200, 16, [133]),
    (2, 1, 9, 128, [9, 2]),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])))
def test_matches_float64_reference(case, dtype):
    B, H, T, D, lengths = case
    q, k, v, lengths, ref_inputs = make_inputs(B, H, T, D, lengths, dtype)
    out = decode_attention(q, k, v, lengths)
    assert out.shape == (B, H, 1, D) and out.dtype == dtype
    assert_close(out, expected(ref_inputs, lengths), dtype, "out")


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, MAX_SPLITS])
def test_every_split_count_gives_the_same_softmax(num_splits):
    # 7 and MAX_SPLITS splits leave splits with no key at all (lse = -inf): they must weigh nothing.
    q, k, v, lengths, ref_inputs = make_inputs(3, 2, 150, 32, [1, 70, 150], torch.float32)
    with fresh_buffers_poisoned():
        out = decode_attention_forward(q, k, v, lengths, num_splits=num_splits)
    assert_close(out, expected(ref_inputs, lengths), torch.float32, f"{num_splits} splits")


# Grouped-query caches: (H, Hkv, dtype, num_splits), ragged lengths including 0 and 1.
@pytest.mark.parametrize("H, kv_heads, dtype, num_splits", [
    (4, 1, torch.float32, 3), (4, 2, torch.float16, 1), (6, 3, torch.bfloat16, None), (4, 4, torch.float32, 2),
], ids=lambda x: str(x).replace("torch.", ""))
def test_grouped_query_cache_heads(H, kv_heads, dtype, num_splits):
    """Caches with Hkv heads dividing H: query head h reads cache head h // (H / Hkv), in place."""
    q, k, v, lengths, ref_inputs = make_inputs(3, H, 45, 24, [45, 0, 17], dtype, kv_heads=kv_heads)
    with fresh_buffers_poisoned():
        out = decode_attention_forward(q, k, v, lengths, num_splits=num_splits)
    assert_close(out, expected(ref_inputs, lengths), dtype, "out")
    # The PyTorch backward sums each cache head's gradient over its group.
    check_backward_matches_reference(H, kv_heads)


def test_model_layouts_scale_and_length_edges():
    # q as the model passes it (a view of the fused (B, 1, 3C) c_attn output), the caches as prefix
    # views of a longer buffer, an explicit scale, a row of length 0 (zeros) and one past T (= T).
    B, H, T, D = 3, 2, 40, 16
    qkv = torch.randn(B, 1, 3 * H * D, device=DEVICE)
    q = qkv[..., : H * D].view(B, 1, H, D).transpose(1, 2)
    buffer = torch.randn(2, B, H, T + 8, D, device=DEVICE)
    k, v = buffer[0, :, :, :T], buffer[1, :, :, :T]
    lengths = torch.tensor([0, 17, T + 5], device=DEVICE)
    out = decode_attention(q, k, v, lengths, scale=0.3)
    ref = decode_attention_reference(q.double(), k.double(), v.double(), lengths.clamp_max(T), scale=0.3)
    assert_close(out, ref, torch.float32)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(decode_attention_reference(q, k, v, lengths)[0], torch.zeros_like(out[0]))


def test_int32_lengths_and_large_scores():
    # Scores in the hundreds: the online softmax must subtract the running maximum.
    q, k, v, lengths, ref_inputs = make_inputs(2, 2, 70, 64, [70, 31], torch.float32)
    q = q * 30
    ref = decode_attention_reference(q.double(), *ref_inputs[1:], lengths)
    out = decode_attention(q, k, v, lengths.int())
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, factor=10)


def check_backward_matches_reference(H, kv_heads=None):
    """Gradients of q, k, v through decode_attention against the float64 reference's."""
    q, k, v, lengths, _ = make_inputs(2, H, 33, 16, [33, 20], torch.float32, kv_heads=kv_heads)
    k, v = k.nan_to_num(), v.nan_to_num()
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    grad = torch.randn_like(q)
    decode_attention(*inputs, lengths).backward(grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    decode_attention_reference(*ref_inputs, lengths).backward(grad.double())
    for name, mine, ref in zip("qkv", inputs, ref_inputs):
        assert_close(mine.grad, ref.grad, torch.float32, f"d{name}", factor=DECODE_GRAD_FACTOR)


def test_backward_matches_reference():
    check_backward_matches_reference(2)


@pytest.mark.gpu_smoke
def test_gpt_generation_with_decode_attention_on_triton():
    """The model's decode steps with the Triton kernel give the reference's logits and tokens."""
    torch.manual_seed(0)
    config = GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=32)
    model = GPT(config).to(DEVICE).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    with use_kernels("none"):
        ref_tokens = generate_tokens(model, prompts, 6, temperature=0.0)
    with use_kernels("decode_attention"), warnings.catch_warnings():
        # A silent fallback to the reference would make this test vacuous.
        warnings.filterwarnings("error", message="kernel .* runs its PyTorch reference")
        assert is_triton("decode_attention", DEVICE)
        tokens = generate_tokens(copy.deepcopy(model), prompts, 6, temperature=0.0)
        # One decode step's logits, compared directly.
        padded = torch.tensor([p + [0] * (7 - len(p)) for p in prompts], device=DEVICE)
        lengths = torch.tensor([len(p) for p in prompts], device=DEVICE)
        logits = {}
        for spec in ("none", "decode_attention"):
            with use_kernels(spec), torch.no_grad():
                cache = KVCache(config, 3, 8, DEVICE)
                model(padded, kv_cache=cache, prompt_lengths=lengths)
                logits[spec], _ = model(torch.tensor([[11], [12], [13]], device=DEVICE), kv_cache=cache)
    assert tokens == ref_tokens
    assert_close(logits["decode_attention"], logits["none"], torch.float32, "logits", factor=10)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="long caches are too slow for Triton's interpreter")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T", [(1, 8192), (8, 4096), (64, 1024)])
def test_long_caches_on_gpu(B, T, dtype):
    lengths = torch.randint(1, T + 1, (B,)).tolist()
    lengths[0] = T
    q, k, v, lengths, ref_inputs = make_inputs(B, 12, T, 64, lengths, dtype)
    with fresh_buffers_poisoned():
        out = decode_attention_forward(q, k, v, lengths)
    assert_close(out, expected(ref_inputs, lengths), dtype, "out")

