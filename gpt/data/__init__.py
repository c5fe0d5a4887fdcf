"""Token shards: their file formats, preparing them from corpora, and the training data loader.

A shard is llm.c's format: a header of 256 little-endian int32 (magic, version, token count), then
the tokens as uint16. nanoGPT's header-less ``train.bin``/``val.bin`` and build-nanogpt's ``.npy``
shards are read too. ``prepare`` turns corpora (plain text, jsonl plain/.gz/.zst, parquet, Arrow files
and ``datasets`` folders) into shards, in worker processes, resumably; the loader reads contiguous
windows of a shard the way build-nanogpt does, with a resumable position.

    python -m gpt.data prepare my_texts/ --out data/mine    # files, folders or globs
    python -m gpt.data prepare fineweb/*.parquet --out data/fineweb --limit-tokens 10000000000
    python -m gpt.data prepare                             # the embedded corpus (the stdlib's sources)
    python -m gpt.data info data/mine                       # shards and token counts
    python -m gpt.data verify data/mine                     # headers, token counts, largest id; fails on corruption

The modules, in the order the data flows: ``shards`` (the formats), ``sources`` (what an input is and
the order of its tasks), ``tasks`` (what a worker reads and tokenizes), ``pipeline`` (``prepare``: the
workers, the resumable shard writer, the manifest), ``corpus`` (the embedded default corpus),
``loader`` (``DataLoader``), ``verification`` (``verify``), ``cli``.
"""

from gpt.data.corpus import (
    DEFAULT_CORPUS_NAME,
    default_corpus_dir,
    default_corpus_files,
    ensure_default_corpus,
    prepare_default_corpus,
)
from gpt.data.pipeline import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, prepare
from gpt.data.shards import (
    HEADER_BYTES,
    HEADER_INTS,
    MANIFEST,
    SHARD_EXTENSIONS,
    SHARD_MAGIC,
    SHARD_VERSION,
    SPLITS,
    DataError,
    find_shards,
    read_shard,
    write_shard,
)
from gpt.data.verification import ShardCheck, VerifyReport, verify
from gpt.data.cli import main  # noqa: E402 - after the modules it uses


def __getattr__(name):
    # The loader needs torch; preparing and verifying shards do not, so the tokenizing workers and the
    # command line start without importing it.
    if name == "DataLoader":
        from gpt.data.loader import DataLoader

        return DataLoader
    raise AttributeError(f"module 'gpt.data' has no attribute {name!r}")
