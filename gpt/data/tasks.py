"""The tasks ``prepare``'s worker processes run: read a slice of one input, tokenize it.

Each task (a few small text files, a chunk of a large one, whole lines of a jsonl file, a parquet row
group, consecutive Arrow record batches) reads its documents, encodes each with tiktoken
(``encode_ordinary``'s tokens, straight into a numpy array) and returns EOT + tokens of each document
as one array. A bad record is an error naming the input and the record, or, with
``skip_bad_records``, counted and skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import resource
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpt.data.shards import DataError
from gpt.tokenizer import EOT_TOKEN, get_encoding

BAD_RECORD_EXAMPLES = 20  # bad records kept by name in the manifest (all are counted)


@dataclass(frozen=True)
class Source:
    """One input: a file, a ``datasets`` folder, or a text held in memory. ``name`` is stable across
    machines (a path relative to the input); it names errors and decides the documents' splits."""

    kind: str  # "text", "jsonl", "parquet", "arrow" or "datasets"
    name: str
    path: Path | None = None
    text: str | None = None


@dataclass(frozen=True)
class ReadOptions:
    text_field: str = "text"
    val_fraction: float = 0.05
    skip_bad_records: bool = False


def split_key(name: str) -> float:
    """A number in [0, 1) from the name alone: the same on every machine and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64


# ----------------------------------------------------------------------------------------------------
# Tasks: what a worker reads, and how


@dataclass
class Documents:
    """What a worker read for one task: texts, whether each goes to val, whether each starts a
    document (a chunk of a large file after its first does not), and the bad records it skipped."""

    source: str
    options: ReadOptions
    texts: list[str] = field(default_factory=list)
    val: list[bool] = field(default_factory=list)
    starts: list[bool] = field(default_factory=list)
    records: int = 0
    empty: int = 0
    bad: list[str] = field(default_factory=list)
    bad_count: int = 0

    def add_text(self, text: str, val: bool, starts: bool = True) -> None:
        self.texts.append(text)
        self.val.append(val)
        self.starts.append(starts)

    def add_object(self, where: str, record) -> None:
        """A jsonl record: an object whose ``text_field`` holds the document."""
        key = self.options.text_field
        if not isinstance(record, dict):
            self.records += 1
            return self.bad_record(where, f"expected a JSON object, got {type(record).__name__}")
        if key not in record:
            self.records += 1
            fields = ", ".join(map(repr, list(record)[:8])) or "none"
            return self.bad_record(where, f"no {key!r} field (its fields: {fields}; choose one with --text-field)")
        self.add_value(where, record[key])

    def add_value(self, where: str, text) -> None:
        """A record's text: a document, or a bad record when it is not a string."""
        self.records += 1
        if not isinstance(text, str):
            kind = "null" if text is None else type(text).__name__
            return self.bad_record(where, f"the {self.options.text_field!r} field is {kind}, expected a string")
        if not text:
            self.empty += 1
            return
        self.add_text(text, split_key(f"{self.source} {where}") < self.options.val_fraction)

    def bad_record(self, where: str, problem: str, count: int = 1) -> None:
        """A record (or a whole input, ``where`` empty) that cannot be read: an error, or with
        ``skip_bad_records`` counted and kept as an example."""
        message = f"{self.source}{' ' + where if where else ''}: {problem}"
        if not self.options.skip_bad_records:
            raise DataError(message + " (--skip-bad-records skips such records)")
        self.bad_count += count
        if len(self.bad) < BAD_RECORD_EXAMPLES:
            self.bad.append(message)


@dataclass(frozen=True)
class TextTask:
    """Whole small text files or in-memory texts: ``(source, goes to val)`` pairs."""

    documents: tuple

    def read(self, options: ReadOptions) -> Documents:
        out = Documents(self.documents[0][0].name, options)
        for source, val in self.documents:
            out.add_text(source.text if source.text is not None else _decode(source.path.read_bytes()), val)
        return out


@dataclass(frozen=True)
class TextChunkTask:
    """Bytes [start, stop) of a large text file, cut at safe places (see ``safe_cut``)."""

    source: Source
    start: int
    stop: int
    val: bool

    def read(self, options: ReadOptions) -> Documents:
        with open(self.source.path, "rb") as f:
            f.seek(self.start)
            data = f.read(self.stop - self.start)
        out = Documents(self.source.name, options)
        out.add_text(_decode(data), self.val, starts=self.start == 0)
        return out


@dataclass(frozen=True)
class JsonLinesTask:
    """Whole lines of a jsonl file, read (and decompressed) by the main process."""

    source: Source
    data: bytes
    first_line: int

    def read(self, options: ReadOptions) -> Documents:
        out = Documents(self.source.name, options)
        for number, line in enumerate(self.data.split(b"\n"), self.first_line):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # UnicodeDecodeError included
                out.records += 1
                out.bad_record(f"line {number}", f"not valid JSON ({e}); expected one JSON object per line")
                continue
            out.add_object(f"line {number}", record)
        return out


@dataclass(frozen=True)
class ParquetTask:
    """One row group of a parquet file, whose first row is the file's ``first_row``."""

    source: Source
    row_group: int
    first_row: int

    def read(self, options: ReadOptions) -> Documents:
        import pyarrow.parquet as pq

        def values():
            file = pq.ParquetFile(self.source.path)
            return file.read_row_group(self.row_group, columns=[options.text_field]).column(0).to_pylist()

        return _read_rows(self.source, options, self.first_row, f"row group {self.row_group}", "parquet", values)


@dataclass(frozen=True)
class ArrowTask:
    """Record batches [first_batch, first_batch + batches) of an Arrow file."""

    source: Source
    path: Path
    first_batch: int
    batches: int
    first_row: int

    def read(self, options: ReadOptions) -> Documents:
        def values():
            batches = itertools.islice(arrow_batches(self.path), self.first_batch, self.first_batch + self.batches)
            return [value for batch in batches for value in batch.column(options.text_field).to_pylist()]

        return _read_rows(self.source, options, self.first_row, f"record batches {self.first_batch}..", "Arrow",
                          values)


def _read_rows(source: Source, options: ReadOptions, first_row: int, where: str, kind: str, values) -> Documents:
    """The documents of a columnar task, one per row from ``first_row``: ``values()`` reads the text
    column's values; a damaged file makes all of them one bad record."""
    out = Documents(source.name, options)
    try:
        rows = values()
    except Exception as e:  # noqa: BLE001 - pyarrow raises OSError, ArrowInvalid and others for corruption
        out.bad_record(f"rows {first_row}.. ({where})", f"unreadable: corrupt {kind} data ({type(e).__name__}: {e})")
        return out
    for row, value in enumerate(rows, first_row):
        out.add_value(f"row {row}", value)
    return out


def _decode(data: bytes) -> str:
    # Invalid UTF-8 is decoded with replacement characters rather than skipping the file: a stray
    # Latin-1 byte should not drop an otherwise good document.
    return data.decode("utf-8", errors="replace")


@dataclass
class Tokenized:
    """A task's result: EOT + tokens of each document (or piece of one), concatenated."""

    tokens: np.ndarray  # uint16
    lengths: np.ndarray  # tokens per piece
    val: np.ndarray  # per piece: whether it goes to val
    starts: np.ndarray  # per piece: whether it starts a document
    records: int
    empty: int
    bad: list[str]
    bad_count: int
    peak_rss_mib: float  # the process's peak resident memory so far


def run_task(task, options: ReadOptions) -> Tokenized:
    """Read and tokenize one task (in a worker process, or in this one with one worker)."""
    documents = task.read(options)
    encoding = get_encoding()
    eot = np.array([EOT_TOKEN], dtype=np.uint32)
    parts, lengths = [], np.empty(len(documents.texts), dtype=np.int64)
    for index, (text, starts) in enumerate(zip(documents.texts, documents.starts)):
        if starts:  # build-nanogpt's layout: EOT starts every document
            parts.append(eot)
        piece = encode_ordinary_to_numpy(encoding, text)
        parts.append(piece)
        lengths[index] = piece.size + starts
    tokens = np.concatenate(parts, dtype=np.uint16, casting="same_kind") if parts else np.empty(0, np.uint16)
    return Tokenized(tokens, lengths, np.array(documents.val, dtype=bool), np.array(documents.starts, dtype=bool),
                     documents.records, documents.empty, documents.bad, documents.bad_count, peak_rss_mib())


def encode_ordinary_to_numpy(encoding, text: str) -> np.ndarray:
    """``encoding.encode_ordinary(text)`` as a uint32 array, without building a list of Python ints
    (and one thread, without ``encode_ordinary_batch``'s thread pool): special tokens in the text are
    ordinary text, since none is allowed and none disallowed."""
    try:
        return encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    except UnicodeEncodeError:  # lone surrogates (from JSON's escapes): replaced, as encode_ordinary does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: Linux's VmHWM, which (unlike getrusage's maxrss)
    does not carry over the peak of the process this one was exec'd from."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; a fallback elsewhere


def arrow_batches(path: Path):
    """The record batches of an Arrow file, IPC file or stream format (``datasets`` writes streams),
    memory-mapped: skipping batches reads nothing."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as mapped:
        try:
            reader = pa.ipc.open_file(mapped)
        except pa.ArrowInvalid:
            mapped.seek(0)
            yield from pa.ipc.open_stream(mapped)
            return
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)
