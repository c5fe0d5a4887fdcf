"""The training data loader: contiguous windows of the shards, build-nanogpt's way, resumable."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from gpt.data.shards import DataError, find_shards, read_shard
from gpt.tokenizer import VOCAB_SIZE

class DataLoader:
    """Batches ``(x, y)`` of int64 token ids, shape (batch_size, seq_len), ``y`` being ``x`` shifted by one.

    Reads build-nanogpt's way: each step takes batch_size*seq_len+1 contiguous tokens at
    ``position + rank*batch_size*seq_len`` of the current shard and advances ``position`` by
    batch_size*seq_len*world_size, so the ranks read disjoint, interleaved windows; the next shard
    starts when the next step would not fit. After the last shard a new epoch starts. The train
    shards' order is shuffled per epoch from (seed, epoch); val's is fixed. Shards too short for
    one step of every rank are skipped with a warning (an error if no shard is long enough).

    The state (``state_dict``) is the same on every rank, so rank 0's copy resumes them all.
    """

    def __init__(self, data: str | Path, split: str, batch_size: int, seq_len: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, vocab_size: int = VOCAB_SIZE):
        for label, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise DataError(f"{label} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside [0, world_size={world_size})")
        self.data, self.split = data, split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.vocab_size = seed, vocab_size

        self.shard_paths = find_shards(data, split)
        needed = self._tokens_per_step + 1
        lengths = [read_shard(p).size for p in self.shard_paths]
        self._usable = [i for i, n in enumerate(lengths) if n >= needed]
        self.num_tokens = sum(lengths[i] for i in self._usable)  # in the shards this loader reads
        if not self._usable:
            raise DataError(f"no {split} shard in {data} holds the {needed} tokens one step needs "
                            f"(batch_size*seq_len*world_size + 1); the longest has {max(lengths)}")
        too_short = [self.shard_paths[i].name for i, n in enumerate(lengths) if n < needed]
        if too_short:
            warnings.warn(f"skipping {split} shards shorter than the {needed} tokens one step needs: "
                          f"{', '.join(too_short)}", stacklevel=2)
        self._checked: set[int] = set()  # shards whose token ids were checked against vocab_size
        self.reset()

    @property
    def tokens_per_batch(self) -> int:
        """Tokens in one batch of this rank (``x.numel()``)."""
        return self.batch_size * self.seq_len

    @property
    def _tokens_per_step(self) -> int:
        return self.tokens_per_batch * self.world_size

    def reset(self) -> None:
        """Back to the start: epoch 0, the first shard, position 0."""
        self._seek(epoch=0, shard_index=0, position=0)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.position + self.rank * self.tokens_per_batch
        window = torch.from_numpy(self._tokens[start:start + self.tokens_per_batch + 1].astype(np.int64))
        x = window[:-1].view(self.batch_size, self.seq_len)
        y = window[1:].view(self.batch_size, self.seq_len)
        self.position += self._tokens_per_step
        if self.position + self._tokens_per_step + 1 > self._tokens.size:
            if self.shard_index + 1 < len(self._usable):
                self._seek(self.epoch, self.shard_index + 1, 0)
            else:
                self._seek(self.epoch + 1, 0, 0)
        return x, y

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()  # an endless stream: epochs follow each other

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "shard_index": self.shard_index,
            "position": self.position,
            "seed": self.seed,
            "shards": [p.name for p in self.shard_paths],
            "shard": self.shard_name,  # checks, on load, that shard_index still means the same shard
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the loader that saved ``state`` was (its seed included)."""
        missing = {"epoch", "shard_index", "position", "seed", "shards", "shard"} - set(state)
        if missing:
            raise DataError(f"not a DataLoader state: it lacks {sorted(missing)}")
        names = [p.name for p in self.shard_paths]
        if state["shards"] != names:
            raise DataError(f"the loader state was saved for other {self.split} shards ({state['shards']}) "
                            f"than those in {self.data} ({names})")
        seed, epoch, shard_index, position = state["seed"], state["epoch"], state["shard_index"], state["position"]
        saved_with = "another batch size, sequence length or world size"
        order = self._shard_order(epoch, seed)
        if not 0 <= shard_index < len(order) or names[order[shard_index]] != state["shard"]:
            raise DataError(f"the loader state's shard {state['shard']} (index {shard_index} of epoch {epoch}) "
                            f"is not where this loader would read it: it was saved with {saved_with}")
        length = read_shard(self.shard_paths[order[shard_index]]).size
        if not 0 <= position <= length - self._tokens_per_step - 1:
            raise DataError(f"the loader state's position {position} does not fit shard {state['shard']} "
                            f"({length} tokens, {self._tokens_per_step} per step): it was saved with {saved_with}")
        self.seed = seed
        self._seek(epoch, shard_index, position)

    @property
    def shard_name(self) -> str:
        return self.shard_paths[self._current].name

    def _shard_order(self, epoch: int, seed: int) -> list[int]:
        if self.split != "train":
            return self._usable
        permutation = np.random.default_rng([seed, epoch]).permutation(len(self._usable))
        return [self._usable[i] for i in permutation]

    def _seek(self, epoch: int, shard_index: int, position: int) -> None:
        current = self._shard_order(epoch, self.seed)[shard_index]
        tokens = read_shard(self.shard_paths[current])
        if current not in self._checked:
            largest = int(tokens.max())
            if largest >= self.vocab_size:
                raise DataError(f"{self.shard_paths[current]}: token id {largest} is outside the "
                                f"vocabulary (vocab_size {self.vocab_size}); was it tokenized for another model?")
            self._checked.add(current)
        self.epoch, self.shard_index, self.position = epoch, shard_index, position
        self._current, self._tokens = current, tokens
