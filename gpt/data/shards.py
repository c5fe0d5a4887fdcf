"""The token shard formats: writing llm.c shards, reading them and the other layouts, finding a split's.

A shard is llm.c's format: a header of 256 little-endian int32 (magic, version, token count, then
zeros), then the tokens as uint16. nanoGPT's header-less ``train.bin``/``val.bin`` and
build-nanogpt's ``.npy`` shards are read too.
"""

from __future__ import annotations

import glob
import json
import os
import uuid
from pathlib import Path

import numpy as np

SHARD_MAGIC = 20240520  # llm.c's magic for token files
SHARD_VERSION = 1  # version 1: GPT-2 tokens as uint16
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAGIC_BYTES = np.array([SHARD_MAGIC], dtype="<i4").tobytes()
MANIFEST = "manifest.json"
SHARD_EXTENSIONS = (".bin", ".npy")
SPLITS = ("train", "val")


class DataError(ValueError):
    """A problem with the data the user pointed us at: missing, malformed or unsuitable."""


def shard_header(count: int) -> bytes:
    """llm.c's 1024-byte header for a shard of ``count`` tokens."""
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = SHARD_MAGIC, SHARD_VERSION, count
    return header.tobytes()


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(shard_header(tokens.size))
            f.write(tokens.astype("<u2", copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json_atomically(path: Path, obj) -> None:
    """``obj`` as JSON at ``path``: through a temporary file, fsynced, renamed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(obj, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def has_llmc_magic(path: Path) -> bool:
    """Whether the file starts with llm.c's 4-byte magic (a file shorter than 4 bytes does not)."""
    with open(path, "rb") as f:
        return f.read(4) == MAGIC_BYTES


def _read_bin(path: Path) -> np.ndarray:
    size = path.stat().st_size
    if not has_llmc_magic(path):
        # nanoGPT's train.bin/val.bin: uint16 tokens and nothing else.
        if 0 < size < 4 and MAGIC_BYTES.startswith(path.read_bytes()):
            raise DataError(f"{path}: truncated shard: its {size} bytes are the start of llm.c's magic "
                            f"{SHARD_MAGIC}, the rest of the {HEADER_BYTES}-byte header is missing")
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
