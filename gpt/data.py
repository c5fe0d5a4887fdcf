"""Token shards: their file formats, preparing them from text, and the training data loader.

A shard is llm.c's format: a header of 256 little-endian int32 (magic, version, token count), then
the tokens as uint16. nanoGPT's header-less ``train.bin``/``val.bin`` and build-nanogpt's ``.npy``
shards are read too. ``prepare`` turns text files into shards; the loader reads contiguous windows
of a shard the way build-nanogpt does, with a resumable position.

    python -m gpt.data prepare my_texts/ --out data/mine   # tokenize files, folders or globs
    python -m gpt.data prepare                            # the embedded corpus (the stdlib's sources)
    python -m gpt.data info data/mine                      # shards and token counts
    python -m gpt.data verify data/mine                    # headers, token counts, largest id; fails on corruption
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import sys
import sysconfig
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt.tokenizer import EOT_TOKEN, VOCAB_SIZE, get_encoding

SHARD_MAGIC = 20240520  # llm.c's magic for token files
SHARD_VERSION = 1  # version 1: GPT-2 tokens as uint16
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MANIFEST = "manifest.json"
SHARD_EXTENSIONS = (".bin", ".npy")
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 100_000_000  # build-nanogpt's and llm.c's shard size: 200 MB of uint16
DEFAULT_VAL_FRACTION = 0.05
DEFAULT_CORPUS_NAME = "stdlib"
# Folders of the standard library that hold its own tests or installed packages, not library code.
_STDLIB_EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
_PYDOC_TOPICS_DOCUMENTS = 8  # the pydoc topics text is split into this many documents


class DataError(ValueError):
    """A problem with the data the user pointed us at: missing, malformed or unsuitable."""


# ----------------------------------------------------------------------------------------------------
# Shard files


def write_shard(path: str | Path, tokens) -> Path:
    """Write ``tokens`` (ints in [0, 65536)) as an llm.c shard. The file appears under its final name
    only once complete: it is written to a temporary file in the same folder, then renamed."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise DataError(f"{path}: a shard needs a non-empty 1-D sequence of tokens, got shape {tokens.shape}")
    if tokens.dtype != np.uint16:
        if not np.issubdtype(tokens.dtype, np.integer):
            raise DataError(f"{path}: tokens must be integers, got dtype {tokens.dtype}")
        if tokens.min() < 0 or tokens.max() >= 2**16:
            raise DataError(f"{path}: token ids must lie in [0, 65536) to fit uint16, "
                            f"got [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2", copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_shard(path: str | Path) -> np.ndarray:
    """The tokens of a shard as a uint16 array (memory-mapped where the file allows).

    ``.bin``: llm.c's format when the file starts with its magic, else nanoGPT's raw uint16 tokens.
    ``.npy``: build-nanogpt's shards, of any integer dtype whose values fit uint16.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such shard file")
    if path.suffix == ".npy":
        tokens = _read_npy(path)
    elif path.suffix == ".bin":
        tokens = _read_bin(path)
    else:
        raise DataError(f"{path}: unknown shard format (expected a .bin or .npy file)")
    if tokens.size == 0:
        raise DataError(f"{path}: empty shard (no tokens)")
    return tokens


def _read_bin(path: Path) -> np.ndarray:
    size = path.stat().st_size
    first = np.fromfile(path, dtype="<i4", count=1) if size >= 4 else np.zeros(0, dtype="<i4")
    if first.size == 0 or first[0] != SHARD_MAGIC:
        # nanoGPT's train.bin/val.bin: uint16 tokens and nothing else.
        if size % 2:
            raise DataError(f"{path}: truncated shard: {size} bytes is not a whole number of uint16 tokens "
                            f"(and the file does not start with llm.c's magic {SHARD_MAGIC})")
        return np.memmap(path, dtype="<u2", mode="r") if size else np.zeros(0, dtype=np.uint16)
    if size < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard: {size} bytes, shorter than llm.c's {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    version, count = int(header[1]), int(header[2])
    if version != SHARD_VERSION:
        raise DataError(f"{path}: corrupt shard header: version {version}, expected {SHARD_VERSION} "
                        "(GPT-2 tokens as uint16)")
    if count < 0:
        raise DataError(f"{path}: corrupt shard header: negative token count {count}")
    expected = HEADER_BYTES + 2 * count
    if size < expected:
        raise DataError(f"{path}: truncated shard: the header announces {count} tokens ({expected} bytes) "
                        f"but the file has {size} bytes")
    if size > expected:
        raise DataError(f"{path}: corrupt shard header: it announces {count} tokens ({expected} bytes) "
                        f"but the file has {size} bytes")
    if count == 0:
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))


def _read_npy(path: Path) -> np.ndarray:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: expected a 1-D integer array of tokens, got {tokens.dtype} of shape {tokens.shape}")
    if tokens.dtype == np.uint16 or tokens.size == 0:
        return tokens.astype(np.uint16, copy=False)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= 2**16:
        raise DataError(f"{path}: token ids must lie in [0, 65536), found ids in [{low}, {high}]")
    return tokens.astype(np.uint16)


def find_shards(data: str | Path, split: str) -> list[Path]:
    """The ``split`` shards of ``data`` (a folder, or a glob of files), sorted by name: files whose
    names contain "train" (or "val") and end in .bin or .npy."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    data = Path(data)
    patterns = " or ".join(f"*{split}*{ext}" for ext in SHARD_EXTENSIONS)
    if data.is_dir():
        candidates = list(data.iterdir())
    else:
        candidates = [Path(p) for p in glob.glob(str(data))]
        if not candidates:
            raise DataError(f"no {split} shards: {data} is neither a folder nor a glob that matches files")
    shards = sorted(
        p for p in candidates
        if p.is_file() and not p.name.startswith(".") and split in p.name and p.suffix in SHARD_EXTENSIONS
    )
    if not shards:
        raise DataError(f"no {split} shards in {data} (looked for {patterns})")
    return shards


# ----------------------------------------------------------------------------------------------------
# Preparing shards from text


@dataclass(frozen=True)
class _Document:
    """One document to tokenize: a file, or text already in memory. ``name`` is stable across
    machines (a path relative to the input) and decides the document's split."""

    name: str
    path: Path | None = None
    text: str | None = None


def _split_key(name: str) -> float:
    """A number in [0, 1) from the name alone: the same on every machine and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64


def _documents_from_inputs(inputs) -> list[_Document]:
    """Every file named by ``inputs`` (files, folders walked recursively, or globs), once each."""
    documents: dict[Path, _Document] = {}

    def add_folder(folder: Path) -> None:
        for root, dirs, files in os.walk(folder):
            # Hidden files and folders (.git, .venv, editor state) are never the text one means.
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for file in files:
                path = Path(root) / file
                if not file.startswith(".") and path.is_file():
                    documents.setdefault(path.resolve(), _Document(path.relative_to(folder).as_posix(), path))

    for item in inputs:
        item = Path(item)
        if item.is_dir():
            add_folder(item)
        elif item.is_file():
            documents.setdefault(item.resolve(), _Document(item.name, item))
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            if not matches:
                raise DataError(f"input {item}: no such file or folder, and no file matches it as a glob")
            for match in matches:
                if match.is_dir():
                    add_folder(match)
                elif match.is_file():
                    documents.setdefault(match.resolve(), _Document(match.name, match))
    if not documents:
        raise DataError(f"no input files in {', '.join(map(str, inputs)) or '(no inputs given)'}")
    return sorted(documents.values(), key=lambda d: (d.name, str(d.path)))


def _has_text(document: _Document) -> bool:
    """Whether a document is non-empty text. A file counts as text unless a NUL byte appears in its
    first 8000 bytes (git's test for binary files); an unreadable file does not count."""
    if document.text is not None:
        return bool(document.text)
    try:
        with open(document.path, "rb") as f:
            head = f.read(8000)
    except OSError:
        return False
    return bool(head) and b"\0" not in head


def _tokenize_document(document: _Document) -> np.ndarray:
    """EOT followed by the document's tokens (build-nanogpt's layout: EOT starts every document)."""
    if document.text is not None:
        text = document.text
    else:
        # Invalid UTF-8 is decoded with replacement characters rather than skipping the file: a
        # stray Latin-1 byte should not drop an otherwise good document.
        text = document.path.read_bytes().decode("utf-8", errors="replace")
    return np.array([EOT_TOKEN, *get_encoding().encode_ordinary(text)], dtype=np.uint16)


class _ShardWriter:
    """Collects one split's token stream and writes it as fixed-size shards (the last one shorter)."""

    def __init__(self, out_dir: Path, name: str, split: str, shard_tokens: int):
        self.out_dir, self.name, self.split, self.shard_tokens = out_dir, name, split, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[str] = []
        self.documents = 0
        self.tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self.documents += 1
        self.tokens += tokens.size
        self.pending.append(tokens)
        self.pending_tokens += tokens.size
        while self.pending_tokens >= self.shard_tokens:
            stream = np.concatenate(self.pending)
            self._write(stream[: self.shard_tokens])
            self.pending = [stream[self.shard_tokens:]]
            self.pending_tokens = self.pending[0].size

    def close(self) -> None:
        if self.pending_tokens:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_tokens = [], 0

    def _write(self, tokens: np.ndarray) -> None:
        shard = f"{self.name}_{self.split}_{len(self.shards):06d}.bin"
        write_shard(self.out_dir / shard, tokens)
        self.shards.append(shard)


def prepare(
    inputs,
    out_dir: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    name: str = "data",
    verbose: bool = True,
) -> dict:
    """Tokenize text files into train and val shards in ``out_dir``; returns the manifest.

    ``inputs``: files, folders (every non-hidden text file inside, recursively) or globs. Each file
    is one document. A document goes to val when a hash of its name (its path relative to the
    input) falls below ``val_fraction``, so the split is the same on every run and machine.
    """
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    documents = _documents_from_inputs(inputs)
    return _prepare_documents(documents, Path(out_dir), source=", ".join(map(str, inputs)), name=name,
                              shard_tokens=shard_tokens, val_fraction=val_fraction, workers=workers,
                              verbose=verbose)


def _prepare_documents(documents: list[_Document], out_dir: Path, *, source: str, name: str, shard_tokens: int,
                       val_fraction: float, workers: int | None, verbose: bool) -> dict:
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise DataError(f"name {name!r} must be a plain file-name prefix")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")

    listed = len(documents)
    documents = [d for d in documents if _has_text(d)]
    if not documents:
        raise DataError(f"no text documents in {source}: all {listed} files are empty, binary or unreadable")
    skipped = listed - len(documents)

    val_names = {d.name for d in documents if _split_key(d.name) < val_fraction}
    if val_fraction > 0 and len(documents) >= 2:
        # Small inputs can miss the fraction entirely, or land wholly in val: keep one document on each side.
        by_key = sorted(documents, key=lambda d: _split_key(d.name))
        if not val_names:
            val_names = {by_key[0].name}
        if len(val_names) == len(documents):
            val_names.discard(by_key[-1].name)

    out_dir.mkdir(parents=True, exist_ok=True)
    # The manifest goes first and comes back last, so an interrupted run leaves a folder known to be
    # incomplete; shards from an earlier run under this name go too, so none can linger.
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for split in SPLITS:
        for old in out_dir.glob(f"{name}_{split}_*.bin"):
            old.unlink()

    writers = {split: _ShardWriter(out_dir, name, split, shard_tokens) for split in SPLITS}
    get_encoding()  # built once here, so forked workers inherit it instead of each building their own
    with tqdm(total=len(documents), unit="doc", desc=f"tokenizing {name}", disable=not verbose) as progress:
        for document, tokens in zip(documents, _tokenize_all(documents, workers)):
            writers["val" if document.name in val_names else "train"].add(tokens)
            progress.update()
    for writer in writers.values():
        writer.close()

    manifest = {
        "source": source,
        "tokenizer": "gpt2",
        "format": f"llm.c: {HEADER_INTS} int32 header (magic {SHARD_MAGIC}, version {SHARD_VERSION}), uint16 tokens",
        "name": name,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "skipped_files": skipped,
        "splits": {
            split: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards} for split, w in writers.items()
        },
    }
    _write_json_atomically(out_dir / MANIFEST, manifest)
    if verbose:
        counts = ", ".join(f"{split} {w.tokens:,} tokens in {w.documents:,} documents" for split, w in writers.items())
        print(f"prepared {out_dir}: {counts}" + (f"; skipped {skipped} empty or non-text files" if skipped else ""))
        if val_fraction > 0 and not writers["val"].documents:
            print("note: a single document is not split, so there are no val shards "
                  "(give several files to get a validation split)")
    return manifest


def _tokenize_all(documents: list[_Document], workers: int):
    """Each document's tokens, in order."""
    if workers == 1 or len(documents) == 1:
        yield from map(_tokenize_document, documents)
        return
    chunksize = max(1, min(32, len(documents) // (workers * 8)))
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(_tokenize_document, documents, chunksize=chunksize)


def _write_json_atomically(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# The embedded default corpus: the running Python's standard library


def default_corpus_files() -> list[Path]:
    """Every ``.py`` file of the running Python's standard library, without its tests and installed
    packages, sorted."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # pydoc_data/topics.py is the topics text as string literals; it joins the corpus as prose instead.
    prose = stdlib / "pydoc_data" / "topics.py"
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _STDLIB_EXCLUDED_DIRS]
        files += [Path(root) / n for n in names if n.endswith(".py") and not n.startswith("test_")]
    return sorted(f for f in files if f != prose)


def _default_corpus_documents() -> list[_Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    documents = [_Document(path.relative_to(stdlib).as_posix(), path) for path in default_corpus_files()]
    from pydoc_data.topics import topics

    # The reference manual's prose, in a few documents so that its share of val is about val_fraction.
    names = sorted(topics)
    for i in range(_PYDOC_TOPICS_DOCUMENTS):
        text = "\n\n".join(topics[n] for n in names[i::_PYDOC_TOPICS_DOCUMENTS])
        documents.append(_Document(f"pydoc_data/topics/{i}", text=text))
    return documents


def default_corpus_dir() -> Path:
    """Where the default corpus's shards live: ``$GPT_DATA_DIR``, else a per-Python-version cache folder."""
    if os.environ.get("GPT_DATA_DIR"):
        return Path(os.environ["GPT_DATA_DIR"]).expanduser()
    return Path.home() / ".cache" / "gpt_triton" / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}"


def _prepare_default_corpus(out_dir: Path, *, name: str = DEFAULT_CORPUS_NAME,
                            shard_tokens: int = DEFAULT_SHARD_TOKENS, val_fraction: float = DEFAULT_VAL_FRACTION,
                            workers: int | None = None, verbose: bool = True) -> dict:
    source = f"Python {sys.version.split()[0]} standard library: {sysconfig.get_paths()['stdlib']}"
    return _prepare_documents(_default_corpus_documents(), out_dir, source=source, name=name,
                              shard_tokens=shard_tokens, val_fraction=val_fraction, workers=workers, verbose=verbose)


def ensure_default_corpus(verbose: bool = True) -> Path:
    """The default corpus's folder, preparing it first unless its manifest says it is complete."""
    out_dir = default_corpus_dir()
    if (out_dir / MANIFEST).is_file():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # Several processes (the ranks of one torchrun) may get here together: one prepares, the others
    # wait for it and then find the manifest.
    with open(out_dir / ".lock", "w") as lock:
        _lock_file(lock)
        if not (out_dir / MANIFEST).is_file():
            if verbose:
                print(f"preparing the default corpus (the Python standard library's sources) in {out_dir}")
            _prepare_default_corpus(out_dir, verbose=verbose)
    return out_dir


def _lock_file(file) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, concurrent first uses may duplicate the work
        return
    fcntl.flock(file, fcntl.LOCK_EX)


# ----------------------------------------------------------------------------------------------------
# The loader


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


# ----------------------------------------------------------------------------------------------------
# Verifying a folder of shards


@dataclass
class ShardCheck:
    """What ``verify`` found in one shard file: its layout, token count and largest id, or its problem."""

    path: Path
    split: str
    layout: str = ""
    tokens: int = 0
    largest_id: int | None = None
    problem: str | None = None


@dataclass
class VerifyReport:
    data: str
    shards: list[ShardCheck]
    problems: list[str]  # corruption: ``verify`` fails when there is any
    notes: list[str]  # worth knowing, not corruption

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(data: str | Path, vocab_size: int = VOCAB_SIZE) -> VerifyReport:
    """Check every train and val shard of ``data`` (a folder or a glob): its header against its size,
    that it holds tokens, and that every id is below ``vocab_size``; and, when the folder has a
    ``manifest.json`` (written last by ``prepare``), that the shards and token counts are the ones it
    lists. Reads every token once. Raises DataError when there is no shard at all."""
    found, missing = {}, {}
    for split in SPLITS:
        try:
            found[split] = find_shards(data, split)
        except DataError as e:
            missing[split] = str(e)
    if not found:
        if not Path(data).is_dir() and not glob.glob(str(data)):
            raise DataError(f"{data}: no such folder, and no file matches it as a glob")
        raise DataError(f"no shards in {data} (looked for *train*/*val* files ending in .bin or .npy)")
    checks = [_check_shard(path, split, vocab_size) for split, paths in found.items() for path in paths]
    problems = [f"{c.path.name}: {c.problem}" for c in checks if c.problem]
    notes = [f"no {split} shards (training needs both train and val shards)" for split in missing]
    folder = Path(data)
    if folder.is_dir():
        leftovers = sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
        if leftovers:
            notes.append(f"temporary files of an interrupted write (ignored, safe to delete): {', '.join(leftovers)}")
        problems += _check_against_manifest(folder, checks)
    return VerifyReport(str(data), checks, problems, notes)


def _check_shard(path: Path, split: str, vocab_size: int) -> ShardCheck:
    check = ShardCheck(path, split)
    try:
        tokens = read_shard(path)
    except DataError as e:
        check.problem = str(e).removeprefix(f"{path}: ")
        return check
    check.tokens = int(tokens.size)
    check.largest_id = int(tokens.max())
    if path.suffix == ".npy":
        check.layout = ".npy tokens"
    elif np.fromfile(path, dtype="<i4", count=1)[0] == SHARD_MAGIC:
        header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
        check.layout = f"llm.c header (magic {header[0]}, version {header[1]}, {header[2]:,} tokens)"
        if header[3:].any():
            check.problem = (f"corrupt shard header: its reserved ints 3..{HEADER_INTS - 1} should be 0, "
                             f"int {3 + int(np.flatnonzero(header[3:])[0])} is not")
    else:
        check.layout = "raw uint16 tokens (nanoGPT; no header)"
    if check.problem is None and check.largest_id >= vocab_size:
        check.problem = (f"token id {check.largest_id} is outside the vocabulary (vocab_size {vocab_size}): "
                         "corrupt, or tokenized for another model")
    return check


def _check_against_manifest(folder: Path, checks: list[ShardCheck]) -> list[str]:
    path = folder / MANIFEST
    if not path.is_file():
        return []
    try:
        manifest = json.loads(path.read_text())
        listed = {split: (list(s["shards"]), int(s["tokens"])) for split, s in manifest["splits"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"]
    problems = []
    for split, (names, tokens) in listed.items():
        present = {c.path.name: c for c in checks if c.split == split}
        absent = [name for name in names if name not in present]
        extra = [name for name in present if name not in names]
        if absent:
            problems.append(f"{MANIFEST} lists {split} shards that are missing: {', '.join(absent)}")
        if extra:
            problems.append(f"{split} shards not listed in {MANIFEST}: {', '.join(extra)}")
        counted = sum(c.tokens for name, c in present.items() if name in names and not c.problem)
        if not absent and all(not present[name].problem for name in names) and counted != tokens:
            problems.append(f"{MANIFEST} says the {split} shards hold {tokens:,} tokens, they hold {counted:,}")
    return problems


def _print_verify_report(report: VerifyReport) -> None:
    print(f"verifying {report.data}")
    for c in report.shards:
        status = f"CORRUPT: {c.problem}" if c.problem else "ok"
        details = f"{c.layout}; {c.tokens:,} tokens, largest id {c.largest_id}" if c.largest_id is not None else ""
        print(f"  {c.split:5s} {c.path.name}: {details + '; ' if details else ''}{status}")
    for split in SPLITS:
        shards = [c for c in report.shards if c.split == split]
        if shards:
            ids = [c.largest_id for c in shards if c.largest_id is not None]
            print(f"{split}: {len(shards)} shards, {sum(c.tokens for c in shards):,} tokens, "
                  f"largest id {max(ids) if ids else 'n/a'}")
    for note in report.notes:
        print(f"note: {note}")


# ----------------------------------------------------------------------------------------------------
# Command line


def _info(data: str) -> None:
    manifest = Path(data) / MANIFEST
    if manifest.is_file():
        print(f"{manifest}: source {json.loads(manifest.read_text()).get('source')}")
    elif Path(data).is_dir():
        print(f"{data}: no {MANIFEST} (not prepared by gpt.data, or its preparation did not finish)")
    found = False
    for split in SPLITS:
        try:
            shards = find_shards(data, split)
        except DataError:
            continue
        found = True
        counts = [read_shard(p).size for p in shards]
        for path, count in zip(shards, counts):
            print(f"  {path.name}: {count:,} tokens")
        print(f"{split}: {len(shards)} shards, {sum(counts):,} tokens")
    if not found:
        raise DataError(f"no shards in {data} (looked for *train*/*val* files ending in .bin or .npy)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare", help="tokenize text files into shards")
    p.add_argument("inputs", nargs="*", help="files, folders or globs (none: the default corpus)")
    p.add_argument("--out", help="output folder (required with inputs; default corpus: its cache folder)")
    p.add_argument("--name", help="shard file prefix (default: 'data', or 'stdlib' for the default corpus)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard")
    p.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION, help="share of documents for val")
    p.add_argument("--workers", type=int, help="tokenizing processes (default: every core)")
    i = commands.add_parser("info", help="list a folder's shards and token counts")
    i.add_argument("data", help="folder (or glob) of shards")
    v = commands.add_parser("verify", help="check every shard's header, token count and ids; exit 2 on corruption")
    v.add_argument("data", help="folder (or glob) of shards")
    v.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help="token ids must be below this")
    args = parser.parse_args(argv)

    try:
        if args.command == "info":
            _info(args.data)
        elif args.command == "verify":
            report = verify(args.data, args.vocab_size)
            _print_verify_report(report)
            if not report.ok:
                raise DataError(f"{args.data}: {len(report.problems)} problem(s): {'; '.join(report.problems)}")
            print("OK")
        elif args.inputs:
            if not args.out:
                raise DataError("prepare: --out DIR is required when inputs are given")
            prepare(args.inputs, args.out, shard_tokens=args.shard_tokens, val_fraction=args.val_fraction,
                    workers=args.workers, name=args.name or "data")
        else:
            _prepare_default_corpus(Path(args.out) if args.out else default_corpus_dir(),
                                    name=args.name or DEFAULT_CORPUS_NAME, shard_tokens=args.shard_tokens,
                                    val_fraction=args.val_fraction, workers=args.workers)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
