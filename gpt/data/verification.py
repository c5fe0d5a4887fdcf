"""``verify``: every shard's header against its size, its token count and largest id, and the manifest."""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt.data.shards import HEADER_INTS, MANIFEST, SPLITS, DataError, find_shards, has_llmc_magic, read_shard
from gpt.tokenizer import VOCAB_SIZE

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
        unfinished = sorted(p.name for p in folder.glob(".prepare-*.json"))
        if unfinished:
            notes.append(f"an unfinished prepare ({', '.join(unfinished)}): run the same prepare command again "
                         "to continue it")
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
    elif has_llmc_magic(path):  # read_shard checked that a file with the magic holds a whole header
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


def print_verify_report(report: VerifyReport) -> None:
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

