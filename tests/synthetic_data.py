"""Small token-shard corpora that the training, evaluation and distributed tests write for themselves."""

from pathlib import Path

import numpy as np

from gpt.data import write_shard


def write_split_shards(folder: Path, train: np.ndarray, val: np.ndarray, prefix: str) -> Path:
    """One train and one val shard of uint16 token ids in ``folder``; returns the folder."""
    write_shard(folder / f"{prefix}_train_000000.bin", train.astype(np.uint16))
    write_shard(folder / f"{prefix}_val_000000.bin", val.astype(np.uint16))
    return folder


def sentence_corpus(folder: Path) -> Path:
    """A corpus with structure to learn: a few hundred short 'sentences' drawn from a small vocabulary."""
    rng = np.random.default_rng(0)
    sentences = [rng.integers(0, 2000, size=rng.integers(5, 12)) for _ in range(50)]
    stream = np.concatenate([sentences[i] for i in rng.integers(0, 50, size=3000)])
    return write_split_shards(folder, stream[:-2000], stream[-2000:], "synthetic")


def random_corpus(folder: Path, seed: int, vocab: int, train_tokens: int, val_tokens: int) -> Path:
    """Uniformly random token ids below ``vocab``: nothing to learn, only something to read."""
    rng = np.random.default_rng(seed)
    return write_split_shards(folder, rng.integers(0, vocab, train_tokens), rng.integers(0, vocab, val_tokens), "t")
