"""GPT-2's tokenizer from local files: known ids, lossless round trips, and refusal of a tampered file."""

import random
import shutil

import pytest

from gpt import tokenizer
from gpt.tokenizer import EOT_TOKEN, VOCAB_SIZE, TokenizerError, decode, encode, get_encoding


def test_known_ids():
    assert encode("Hello world") == [15496, 995]
    assert get_encoding().encode("<|endoftext|>", allowed_special="all") == [EOT_TOKEN] == [50256]
    assert get_encoding().n_vocab == VOCAB_SIZE == 50257
    assert get_encoding().name == "gpt2"


def test_special_token_text_is_ordinary_text():
    ids = encode("a<|endoftext|>b")
    assert EOT_TOKEN not in ids
    assert decode(ids) == "a<|endoftext|>b"
    assert decode([EOT_TOKEN]) == "<|endoftext|>"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "plain ASCII, with   spaces\tand\nnewlines\r\n",
        "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
        "中文字符 日本語のテキスト 한국어",
        "combining: e\u0301 a\u0308\u0323 Z\u0336\u0337",
        "control chars \x00\x01\x07\x1b[0m\x7f\u200b\ufeff",
        "lone surrogate-free astral: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀",
        "def f(x):\n    return x ** 2  # code\n",
    ],
)
def test_round_trip(text):
    assert decode(encode(text)) == text


def test_round_trip_random_strings():
    rng = random.Random(0)
    # Code points from every plane in use, surrogates excluded (they cannot be encoded as UTF-8).
    ranges = [(0, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    for _ in range(200):
        text = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40)))
        assert decode(encode(text)) == text


def test_tampered_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # no copy of these temporary files in tiktoken's cache
    vocab_bpe = tmp_path / "vocab.bpe"
    encoder_json = tmp_path / "encoder.json"
    shutil.copy(tokenizer._package_file("vocab.bpe"), vocab_bpe)
    shutil.copy(tokenizer._package_file("encoder.json"), encoder_json)
    assert tokenizer._build_encoding(vocab_bpe, encoder_json).encode_ordinary("Hello world") == [15496, 995]

    content = vocab_bpe.read_bytes()
    vocab_bpe.write_bytes(content.replace(b"\xc4\xa0 t", b"\xc4\xa0 x", 1))  # one merge changed
    with pytest.raises(TokenizerError, match=r"vocab\.bpe: sha256 [0-9a-f]{64} differs from the expected"):
        tokenizer._build_encoding(vocab_bpe, encoder_json)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(TokenizerError, match="cannot read .*vocab.bpe"):
        tokenizer._build_encoding(tmp_path / "vocab.bpe", tmp_path / "encoder.json")
