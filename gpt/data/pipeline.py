"""``prepare``: inputs -> tokenizing worker processes -> train and val shards, resumable after a kill.

The main process plans tasks in a fixed order (``gpt.data.sources``), hands them to a pool of workers
(``gpt.data.tasks``) and takes their results back in that same order, so the shards are the same for
any worker count. Each document goes to val when a hash of its name falls below ``val_fraction``.

Each split's shard being filled is a hidden ``.partial`` file that already has a full shard's
header; a full one is fsynced and renamed to its final name. A hidden progress file records, at most
``CHECKPOINT_SECONDS`` apart and after every finished shard, how many tasks are done and how long
each partial file was then (fsynced first). A run started again with the same arguments truncates
the partial files to those lengths (taking back a shard finished after the record) and continues
with the next task: the shards are byte for byte those of an uninterrupted run. The manifest is
written last, and the progress file then removed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections import deque
from pathlib import Path

import numpy as np
from tqdm import tqdm

from gpt.data import sources as planning
from gpt.data.shards import (
    HEADER_BYTES,
    HEADER_INTS,
    MANIFEST,
    SHARD_MAGIC,
    SHARD_VERSION,
    SPLITS,
    DataError,
    shard_header,
    write_json_atomically,
)
from gpt.data.tasks import BAD_RECORD_EXAMPLES, Documents, ReadOptions, Source, Tokenized, run_task, split_key
from gpt.tokenizer import get_encoding

DEFAULT_SHARD_TOKENS = 100_000_000  # build-nanogpt's and llm.c's shard size: 200 MB of uint16
DEFAULT_VAL_FRACTION = 0.05
CHECKPOINT_SECONDS = 30.0
PLAN_VERSION = 1  # changes when the task plan does: an unfinished run of another plan starts over
_PLANNERS = {"jsonl": planning.plan_jsonl, "parquet": planning.plan_parquet, "arrow": planning.plan_arrow,
             "datasets": planning.plan_arrow}


def prepare(
    inputs,
    out_dir: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    name: str = "data",
    text_field: str = "text",
    limit_tokens: int | None = None,
    skip_bad_records: bool = False,
    verbose: bool = True,
) -> dict:
    """Tokenize ``inputs`` into train and val shards in ``out_dir``; returns the manifest.

    ``inputs``: files, folders (every non-hidden file inside, recursively) or globs: plain text (one
    document per file), jsonl (plain, .gz, .zst), parquet, Arrow files and ``datasets`` folders (one
    document per record, its text in ``text_field``). ``limit_tokens`` stops after that many tokens.
    A bad record is an error naming its input and record, unless ``skip_bad_records``.
    """
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    return prepare_sources(planning.find_sources(inputs), Path(out_dir), description=", ".join(map(str, inputs)),
                           name=name, shard_tokens=shard_tokens, val_fraction=val_fraction, workers=workers,
                           text_field=text_field, limit_tokens=limit_tokens, skip_bad_records=skip_bad_records,
                           verbose=verbose)


def prepare_sources(sources: list[Source], out_dir: Path, *, description: str, name: str, shard_tokens: int,
                    val_fraction: float, workers: int | None, text_field: str = "text",
                    limit_tokens: int | None = None, skip_bad_records: bool = False, verbose: bool = True) -> dict:
    """``prepare`` for inputs already found (the default corpus passes its own)."""
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise DataError(f"shard_tokens must be a positive integer, got {shard_tokens!r}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise DataError(f"name {name!r} must be a plain file-name prefix")
    if limit_tokens is not None and (not isinstance(limit_tokens, int) or limit_tokens < 1):
        raise DataError(f"limit_tokens must be a positive integer, got {limit_tokens!r}")
    if not text_field:
        raise DataError("the text field's name must not be empty")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise DataError(f"workers must be at least 1, got {workers}")

    texts = [s for s in sources if s.kind == "text"]
    readable = [s for s in texts if planning.has_text(s)]
    sources = [s for s in sources if s.kind != "text" or s in readable]
    if not sources:
        raise DataError(f"no text documents in {description}: all {len(texts)} files are empty, binary or unreadable")
    # Small inputs of whole files can miss the fraction entirely, or land wholly in val: keep one
    # document on each side. (Records stream, so their split follows the hash alone.)
    val = {s.name: split_key(s.name) < val_fraction for s in readable}
    if val_fraction > 0 and len(readable) == len(sources) >= 2:
        by_key = sorted(readable, key=lambda s: split_key(s.name))
        if not any(val.values()):
            val[by_key[0].name] = True
        if all(val.values()):
            val[by_key[-1].name] = False

    options = ReadOptions(text_field, val_fraction, skip_bad_records)
    settings = json.loads(json.dumps({
        "plan_version": PLAN_VERSION, "task_bytes": planning.TASK_BYTES, "name": name, "shard_tokens": shard_tokens,
        "val_fraction": val_fraction, "text_field": text_field, "limit_tokens": limit_tokens,
        "skip_bad_records": skip_bad_records,
        # Every input's size and modification time, hashed: a folder of many files stays a short record.
        "inputs": hashlib.sha256(json.dumps([planning.signature(s) for s in sources]).encode()).hexdigest(),
    }))
    run = _Run(out_dir, name, shard_tokens, settings, verbose)
    run.skipped_files = len(texts) - len(readable)
    get_encoding()  # built once here, so forked workers inherit it instead of each building their own
    items = _plan(sources, val, options)
    with tqdm(total=limit_tokens, initial=run.total_tokens, unit="tok", unit_scale=True, desc=f"tokenizing {name}",
              disable=not verbose) as progress:
        for item, result in _in_order(items, run.tasks_done, workers, options):
            if result is None:  # the bad inputs that planning found before this task
                run.add_problems(item)
                continue
            added = run.add(result, limit_tokens)
            progress.update(added)
            progress.set_postfix(docs=f"{run.documents:,}", refresh=False)
            if limit_tokens is not None and run.total_tokens >= limit_tokens:
                break
    return run.finish(description, val_fraction, text_field, limit_tokens)


def _plan(sources: list[Source], val: dict[str, bool], options: ReadOptions):
    """Every task, in order, with the bad inputs found while planning (as ``Documents``) in between."""
    text_run: list[Source] = []
    for source in sources:
        if source.kind == "text":
            text_run.append(source)
            continue
        if text_run:
            yield from planning.plan_text(text_run, val)
            text_run = []
        problems = Documents(source.name, options)
        yield from _PLANNERS[source.kind](source, options, problems)
        if problems.bad_count:
            yield problems
    if text_run:
        yield from planning.plan_text(text_run, val)


def _in_order(items, tasks_done: int, workers: int, options: ReadOptions):
    """``(item, result)`` for each planned item after the first ``tasks_done`` tasks, in plan order;
    a task's result is its ``Tokenized``, a bad-input note's is None. At most two tasks per worker are
    in flight, so memory stays bounded however fast the planning is."""
    def todo():
        position = 0
        for item in items:
            if isinstance(item, Documents):
                if position >= tasks_done:
                    yield item
                continue
            if position >= tasks_done:
                yield item
            position += 1

    if workers == 1:
        for item in todo():
            yield item, None if isinstance(item, Documents) else run_task(item, options)
        return
    with multiprocessing.Pool(workers) as pool:
        pending = deque()
        for item in todo():
            pending.append((item, None if isinstance(item, Documents) else pool.apply_async(run_task, (item, options))))
            while len(pending) > 2 * workers:
                done, future = pending.popleft()
                yield done, future and future.get()
        while pending:
            done, future = pending.popleft()
            yield done, future and future.get()


def _publish(partial: Path, final: Path) -> None:
    """A complete shard takes its final name (a separate function so that tests can fail it)."""
    os.replace(partial, final)


class _SplitWriter:
    """One split's shards: fixed-size shards (the last one shorter), the one being filled kept in a
    hidden ``.partial`` file with a full shard's header, renamed once full."""

    def __init__(self, out_dir: Path, name: str, split: str, shard_tokens: int):
        self.out_dir, self.name, self.split, self.shard_tokens = out_dir, name, split, shard_tokens
        self.shards: list[str] = []
        self.partial_tokens = 0
        self.documents = 0
        self.tokens = 0
        self.file = None

    def shard_path(self, index: int) -> Path:
        return self.out_dir / f"{self.name}_{self.split}_{index:06d}.bin"

    def partial_path(self, index: int) -> Path:
        return self.out_dir / f".{self.name}_{self.split}_{index:06d}.bin.partial"

    def remove_all(self) -> None:
        for pattern in (f"{self.name}_{self.split}_*.bin", f".{self.name}_{self.split}_*.bin.partial"):
            for old in self.out_dir.glob(pattern):
                old.unlink()

    def add(self, tokens: np.ndarray, documents: int) -> bool:
        """Append tokens; whether a shard was finished."""
        self.documents += documents
        self.tokens += tokens.size
        finished = False
        while tokens.size:
            if self.file is None:
                self.file = open(self.partial_path(len(self.shards)), "wb")
                self.file.write(shard_header(self.shard_tokens))
            room = self.shard_tokens - self.partial_tokens
            self.file.write(tokens[:room].astype("<u2", copy=False).tobytes())
            self.partial_tokens += min(room, tokens.size)
            tokens = tokens[room:]
            if self.partial_tokens == self.shard_tokens:
                self._finish()
                finished = True
        return finished

    def sync(self) -> None:
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())

    def close(self) -> None:
        """Finish the last, shorter shard: its header gets its true token count."""
        if self.partial_tokens:
            self.file.seek(0)
            self.file.write(shard_header(self.partial_tokens))
            self._finish()

    def _finish(self) -> None:
        self.sync()
        self.file.close()
        self.file = None
        index = len(self.shards)
        _publish(self.partial_path(index), self.shard_path(index))
        self.shards.append(self.shard_path(index).name)
        self.partial_tokens = 0

    def state(self) -> dict:
        return {"shards": self.shards, "partial_tokens": self.partial_tokens, "documents": self.documents,
                "tokens": self.tokens}

    def restore(self, state: dict) -> None:
        """Back to a progress record's state; raises _CannotResume where the files do not allow it."""
        shards, length = list(state["shards"]), int(state["partial_tokens"])
        full = HEADER_BYTES + 2 * self.shard_tokens
        for index, shard in enumerate(shards):
            path = self.shard_path(index)
            if shard != path.name or not path.is_file() or path.stat().st_size != full:
                raise _CannotResume(f"shard {shard} is missing or damaged")
        index = len(shards)
        partial = self.partial_path(index)
        if self.shard_path(index).is_file():  # finished after the record: its start is the partial file
            os.replace(self.shard_path(index), partial)
        for pattern in (f"{self.name}_{self.split}_*.bin", f".{self.name}_{self.split}_*.bin.partial"):
            for path in self.out_dir.glob(pattern):
                if path not in (partial, *map(self.shard_path, range(index))):
                    path.unlink()
        if length:
            if not partial.is_file() or partial.stat().st_size < HEADER_BYTES + 2 * length:
                raise _CannotResume(f"{partial.name} is shorter than recorded")
            self.file = open(partial, "r+b")
            self.file.truncate(HEADER_BYTES + 2 * length)
            self.file.write(shard_header(self.shard_tokens))
            self.file.seek(0, os.SEEK_END)
        else:
            partial.unlink(missing_ok=True)
        self.shards, self.partial_tokens = shards, length
        self.documents, self.tokens = int(state["documents"]), int(state["tokens"])


class _CannotResume(Exception):
    pass


class _Run:
    """One prepare's output folder: its writers, counters and progress file; resumes an unfinished
    run with the same settings, else starts afresh."""

    def __init__(self, out_dir: Path, name: str, shard_tokens: int, settings: dict, verbose: bool):
        self.out_dir, self.settings, self.verbose = out_dir, settings, verbose
        self.progress_path = out_dir / f".prepare-{name}.json"
        self.writers = {split: _SplitWriter(out_dir, name, split, shard_tokens) for split in SPLITS}
        self.tasks_done = self.records = self.empty = self.bad_count = 0
        self.bad: list[str] = []
        self.peak_rss_mib = 0.0
        self.skipped_files = 0
        self.last_checkpoint = time.monotonic()
        out_dir.mkdir(parents=True, exist_ok=True)
        # The manifest goes first and comes back last, so an interrupted run leaves a folder known to
        # be incomplete.
        (out_dir / MANIFEST).unlink(missing_ok=True)
        if not self._resume():
            self.progress_path.unlink(missing_ok=True)
            for writer in self.writers.values():  # shards of an earlier run under this name go, none can linger
                writer.remove_all()
            self.checkpoint()

    def _resume(self) -> bool:
        try:
            state = json.loads(self.progress_path.read_text())
        except (OSError, ValueError):
            return False
        try:
            if state.get("settings") != self.settings:
                raise _CannotResume("it had other inputs or settings")
            for split, writer in self.writers.items():
                writer.restore(state["splits"][split])
        except (_CannotResume, KeyError, TypeError, ValueError) as e:
            if self.verbose:
                print(f"starting over: the unfinished run in {self.out_dir} cannot be continued ({e})")
            for writer in self.writers.values():
                if writer.file is not None:
                    writer.file.close()
                writer.file = None
            return False
        self.tasks_done = state["tasks_done"]
        self.records, self.empty, self.bad_count, self.bad = state["records"], state["empty"], state["bad_count"], \
            state["bad"]
        if self.verbose:
            print(f"continuing the unfinished run in {self.out_dir}: {self.total_tokens:,} tokens already in "
                  f"shards, from task {self.tasks_done}")
        return True

    @property
    def total_tokens(self) -> int:
        return sum(w.tokens for w in self.writers.values())

    @property
    def documents(self) -> int:
        return sum(w.documents for w in self.writers.values())

    def checkpoint(self) -> None:
        for writer in self.writers.values():
            writer.sync()
        write_json_atomically(self.progress_path, {
            "settings": self.settings, "tasks_done": self.tasks_done, "records": self.records, "empty": self.empty,
            "bad_count": self.bad_count, "bad": self.bad,
            "splits": {split: writer.state() for split, writer in self.writers.items()},
        })
        self.last_checkpoint = time.monotonic()

    def add_problems(self, problems: Documents) -> None:
        self._count_bad(problems.bad, problems.bad_count)

    def _count_bad(self, examples: list[str], count: int) -> None:
        self.bad_count += count
        self.bad = (self.bad + examples)[:BAD_RECORD_EXAMPLES]

    def add(self, result: Tokenized, limit_tokens: int | None) -> int:
        """One task's tokens into the splits (cut at ``limit_tokens``); returns how many were added."""
        tokens, lengths, val, starts = result.tokens, result.lengths, result.val, result.starts
        if limit_tokens is not None and self.total_tokens + tokens.size > limit_tokens:
            keep = limit_tokens - self.total_tokens
            ends = np.cumsum(lengths)
            pieces = int(np.searchsorted(ends, keep)) + 1  # the last one is cut
            lengths = lengths[:pieces].copy()
            lengths[-1] -= ends[pieces - 1] - keep
            tokens, val, starts = tokens[:keep], val[:pieces], starts[:pieces]
        in_val = np.repeat(val, lengths)
        finished = self.writers["train"].add(tokens[~in_val], int(np.count_nonzero(starts & ~val)))
        finished |= self.writers["val"].add(tokens[in_val], int(np.count_nonzero(starts & val)))
        self.records += result.records
        self.empty += result.empty
        self._count_bad(result.bad, result.bad_count)
        self.peak_rss_mib = max(self.peak_rss_mib, result.peak_rss_mib)
        self.tasks_done += 1
        if finished or time.monotonic() - self.last_checkpoint > CHECKPOINT_SECONDS:
            self.checkpoint()
        return int(tokens.size)

    def finish(self, description: str, val_fraction: float, text_field: str, limit_tokens: int | None) -> dict:
        if not self.total_tokens:
            raise DataError(f"no text documents in {description}: every record is empty or bad"
                            + (f" ({self.bad_count:,} bad)" if self.bad_count else ""))
        for writer in self.writers.values():
            writer.close()
        manifest = {
            "source": description,
            "tokenizer": "gpt2",
            "format": f"llm.c: {HEADER_INTS} int32 header (magic {SHARD_MAGIC}, version {SHARD_VERSION}), uint16 tokens",
            "name": self.settings["name"],
            "val_fraction": val_fraction,
            "shard_tokens": self.settings["shard_tokens"],
            "text_field": text_field,
            "limit_tokens": limit_tokens,
            "skipped_files": self.skipped_files,
            "records": self.records,
            "empty_records": self.empty,
            "bad_records": self.bad_count,
            "bad_record_examples": self.bad,
            "splits": {split: {"documents": w.documents, "tokens": w.tokens, "shards": w.shards}
                       for split, w in self.writers.items()},
        }
        write_json_atomically(self.out_dir / MANIFEST, manifest)
        self.progress_path.unlink(missing_ok=True)
        if self.verbose:
            self._print_summary(val_fraction)
        return manifest

    def _print_summary(self, val_fraction: float) -> None:
        counts = ", ".join(f"{split} {w.tokens:,} tokens in {w.documents:,} documents" for split, w in self.writers.items())
        print(f"prepared {self.out_dir}: {counts}"
              + (f"; skipped {self.skipped_files} empty or non-text files" if self.skipped_files else ""))
        if self.bad_count:
            print(f"skipped {self.bad_count:,} bad records or inputs; the first: " + "; ".join(self.bad[:3]))
        if self.peak_rss_mib:
            print(f"peak memory of a tokenizing process: {self.peak_rss_mib:,.0f} MiB")
        if val_fraction > 0 and not self.writers["val"].documents:
            print("note: no document went to val (a single document is not split, and records are split by a "
                  "hash of their name: give more documents or a larger --val-fraction)")
