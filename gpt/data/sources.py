"""What ``prepare`` reads: the kinds of input, and the order of the tasks that tokenize them.

By file name:
- ``.jsonl``, ``.json``, ``.ndjson``, plain or ``.gz``/``.zst``: one document per line, a JSON object
  whose ``text_field`` holds the text (FineWeb's jsonl dumps, most corpora);
- ``.parquet``: one document per row of the ``text_field`` column, read a row group at a time (FineWeb);
- ``.arrow``, and folders saved by Hugging Face ``datasets``' ``save_to_disk`` (``state.json`` listing
  Arrow stream files): one document per row, read with pyarrow (``datasets`` is not needed);
- anything else: a plain text file, one document. A large one is read in chunks cut where tiktoken's
  GPT-2 pattern would split anyway, so its tokens are those of the whole file.

The main process plans the tasks (``gpt.data.tasks``) in a fixed order, each about ``TASK_BYTES`` of
text, reading little: file heads, parquet metadata, Arrow batch sizes, and the jsonl bytes, which it
decompresses. Tasks do not depend on the worker count, so neither do the shards.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import zlib
from pathlib import Path

from gpt.data.shards import DataError
from gpt.data.tasks import (
    ArrowTask,
    Documents,
    JsonLinesTask,
    ParquetTask,
    ReadOptions,
    Source,
    TextChunkTask,
    TextTask,
    arrow_batches,
)

TASK_BYTES = 4 << 20  # text per task: about a million tokens, a second or two of one core
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
DATASETS_STATE = "state.json"  # save_to_disk's list of a dataset's Arrow files
DATASETS_METADATA = ("dataset_info.json", "dataset_dict.json")  # metadata, not text
_BINARY_SNIFF_BYTES = 8000  # git's test for a binary file: a NUL byte among the first 8000


# ----------------------------------------------------------------------------------------------------
# Finding the inputs


def kind_of(path: Path) -> str:
    name = path.name.lower()
    for suffix in COMPRESSIONS:
        name = name.removesuffix(suffix)
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return {".parquet": "parquet", ".arrow": "arrow"}.get(Path(name).suffix, "text")


def _is_datasets_folder(folder: Path) -> bool:
    return (folder / DATASETS_STATE).is_file()


def find_sources(inputs) -> list[Source]:
    """Every input named by ``inputs`` (files, folders walked recursively, or globs), once each, sorted
    by name. A folder holding ``state.json`` is a ``datasets`` folder, read as one input."""
    sources: dict[Path, Source] = {}

    def add(path: Path, name: str) -> None:
        kind = "datasets" if path.is_dir() else kind_of(path)
        sources.setdefault(path.resolve(), Source(kind, name, path))

    def add_folder(folder: Path, prefix: str) -> None:
        if _is_datasets_folder(folder):
            return add(folder, prefix or folder.name)
        for root, dirs, files in os.walk(folder):
            # Hidden files and folders (.git, .venv, editor state) are never the text one means.
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for d in [d for d in dirs if _is_datasets_folder(Path(root) / d)]:
                dirs.remove(d)
                add(Path(root) / d, (Path(prefix) / Path(root, d).relative_to(folder)).as_posix())
            for file in files:
                path = Path(root) / file
                if not file.startswith(".") and file not in DATASETS_METADATA and path.is_file():
                    add(path, (Path(prefix) / path.relative_to(folder)).as_posix())

    for item in inputs:
        item = Path(item)
        if item.is_dir():
            add_folder(item, item.name if _is_datasets_folder(item) else "")
        elif item.is_file():
            add(item, item.name)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            if not matches:
                raise DataError(f"input {item}: no such file or folder, and no file matches it as a glob")
            for match in matches:
                if match.is_dir():
                    add_folder(match, match.name if _is_datasets_folder(match) else "")
                elif match.is_file():
                    add(match, match.name)
    if not sources:
        raise DataError(f"no input files in {', '.join(map(str, inputs)) or '(no inputs given)'}")
    return sorted(sources.values(), key=lambda s: (s.name, str(s.path)))


def has_text(source: Source) -> bool:
    """Whether a plain-text input is non-empty text: a file counts unless a NUL byte appears in its
    first 8000 bytes (git's test for binary files); an unreadable file does not count."""
    if source.text is not None:
        return bool(source.text)
    try:
        with open(source.path, "rb") as f:
            head = f.read(_BINARY_SNIFF_BYTES)
    except OSError:
        return False
    return bool(head) and b"\0" not in head


def signature(source: Source) -> list:
    """What identifies an input's content cheaply (sizes and modification times), for resuming."""
    if source.text is not None:
        return [source.name, hashlib.sha256(source.text.encode()).hexdigest()]
    paths = [source.path / DATASETS_STATE, *_datasets_files(source)] if source.kind == "datasets" else [source.path]
    stats = [p.stat() for p in paths]
    return [source.kind, source.name, [[s.st_size, s.st_mtime_ns] for s in stats]]


# ----------------------------------------------------------------------------------------------------
# Planning: an input's tasks, in order


def plan_text(sources: list[Source], val: dict[str, bool]):
    """Tasks for plain-text inputs: small files batched, large ones cut into chunks."""
    batch, batch_bytes = [], 0
    for source in sources:
        size = len(source.text.encode()) if source.text is not None else source.path.stat().st_size
        if size > TASK_BYTES and source.path is not None:
            if batch:
                yield TextTask(tuple(batch))
                batch, batch_bytes = [], 0
            start = 0
            for stop in text_cuts(source.path, size):
                yield TextChunkTask(source, start, stop, val[source.name])
                start = stop
            continue
        batch.append((source, val[source.name]))
        batch_bytes += size
        if batch_bytes >= TASK_BYTES:
            yield TextTask(tuple(batch))
            batch, batch_bytes = [], 0
    if batch:
        yield TextTask(tuple(batch))


# A cut is safe where a whitespace byte follows a non-whitespace character: tiktoken's GPT-2 pattern
# ('s|'t|...| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+) never puts a non-space character and the
# whitespace after it in one piece, and no piece before the cut looks past it except \s+(?!\S), which
# sees the same whitespace there or the end of the text. So the pieces, and the tokens, of the two
# parts are those of the whole. The whitespace is ASCII (so the cut splits no character), and the
# character before it must not be whitespace to Python (a superset of the Unicode White_Space that
# tiktoken's regex uses).
_CUT_CANDIDATES = re.compile(rb"[ \n]")


def safe_cut(data: bytes, begin: int) -> int | None:
    """The first offset ``p >= begin`` of ``data`` where a cut is safe, or None."""
    for match in _CUT_CANDIDATES.finditer(data, max(begin, 1)):
        p = match.start()
        lead = p - 1
        while lead > 0 and p - lead < 4 and 0x80 <= data[lead] < 0xC0:  # back to the character's first byte
            lead -= 1
        try:
            character = data[lead:p].decode()
        except UnicodeDecodeError:
            continue
        if not character.isspace():
            return p
    return None


def text_cuts(path: Path, size: int):
    """The ends of a large text file's chunks: about every TASK_BYTES, each at a safe cut."""
    start = 0
    with open(path, "rb") as f:
        while size - start > TASK_BYTES:
            target, cut = start + TASK_BYTES, None
            while cut is None and target < size:
                window_start = target - 4  # room to step back over the character before the cut
                f.seek(window_start)
                window = f.read(1 << 20)
                cut = safe_cut(window, 4)
                target = window_start + len(window)
                cut = None if cut is None else window_start + cut
            if cut is None:
                break
            yield cut
            start = cut
    yield size


def plan_jsonl(source: Source, options: ReadOptions, problems: Documents):
    """Tasks of whole lines, read (and decompressed) here; a corrupt or empty file is a bad record."""
    compression = COMPRESSIONS.get(source.path.suffix.lower())
    line, carry, seen_text = 1, b"", False
    try:
        for block in _blocks(source.path, compression):
            carry += block
            end = carry.rfind(b"\n") + 1
            if end and len(carry) >= TASK_BYTES:
                lines, carry = carry[:end], carry[end:]
                seen_text = seen_text or bool(lines.strip())
                yield JsonLinesTask(source, lines, line)
                line += lines.count(b"\n")
    except (OSError, EOFError, zlib.error, ValueError) as e:  # BadGzipFile is an OSError, ZstdError a ValueError
        end = carry.rfind(b"\n") + 1
        if end:  # the whole lines before the damage are still records
            yield JsonLinesTask(source, carry[:end], line)
        last = line + carry[:end].count(b"\n") - 1
        what = f"corrupt {compression} data" if compression else "unreadable"
        problems.bad_record(f"after line {last}" if last else "",
                            f"{what} ({type(e).__name__}: {e}); the rest of the file is lost")
        return
    if carry:
        seen_text = seen_text or bool(carry.strip())
        yield JsonLinesTask(source, carry, line)
    if not seen_text:
        problems.bad_record("", "empty input: no records")


def _blocks(path: Path, compression: str | None):
    """The file's (decompressed) bytes, a block at a time."""
    if compression == "gzip":
        with gzip.open(path, "rb") as f:
            while block := f.read(TASK_BYTES):
                yield block
        return
    with open(path, "rb") as f:
        if compression != "zstd":
            while block := f.read(TASK_BYTES):
                yield block
            return
        import zstandard

        # A decompression object per frame, so that a truncated file is an error (zstandard's stream
        # reader ends quietly where the data stops).
        frame, fed = zstandard.ZstdDecompressor().decompressobj(), False
        while data := f.read(1 << 20):
            while data:
                try:
                    block = frame.decompress(data)
                except zstandard.ZstdError as e:
                    raise ValueError(str(e)) from e
                fed = True
                if block:
                    yield block
                data = b""
                if frame.eof:
                    data, frame, fed = frame.unused_data, zstandard.ZstdDecompressor().decompressobj(), False
        if fed:
            raise EOFError("the file ends inside a zstd frame")


def _text_column_ok(schema, options: ReadOptions, problems: Documents, where: str = "") -> bool:
    """Whether a table's schema has a string column ``text_field``; if not, a bad input."""
    import pyarrow as pa

    key = options.text_field
    if key not in schema.names:
        columns = ", ".join(map(repr, schema.names[:8])) or "none"
        problems.bad_record(where, f"no {key!r} column (its columns: {columns}; choose one with --text-field)")
        return False
    kind = schema.field(key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        problems.bad_record(where, f"the {key!r} column holds {kind}, expected strings")
        return False
    return True


def plan_parquet(source: Source, options: ReadOptions, problems: Documents):
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(source.path)
    except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError: not parquet, or its footer is damaged
        problems.bad_record("", f"not a readable parquet file ({type(e).__name__}: {e})")
        return
    if not _text_column_ok(file.schema_arrow, options, problems):
        return
    if file.metadata.num_rows == 0:
        problems.bad_record("", "empty input: no rows")
        return
    first_row = 0
    for group in range(file.num_row_groups):
        yield ParquetTask(source, group, first_row)
        first_row += file.metadata.row_group(group).num_rows


def _datasets_files(source: Source) -> list[Path]:
    try:
        state = json.loads((source.path / DATASETS_STATE).read_text())
        return [source.path / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{source.name}: not a folder saved by datasets' save_to_disk: its {DATASETS_STATE} "
                        f"does not list the Arrow files ({type(e).__name__}: {e})") from e


def plan_arrow(source: Source, options: ReadOptions, problems: Documents):
    """Tasks of consecutive record batches of an Arrow file, or of each file of a ``datasets`` folder."""
    files = _datasets_files(source) if source.kind == "datasets" else [source.path]
    rows = 0
    for path in files:
        part = Source("arrow", f"{source.name}/{path.name}", path) if source.kind == "datasets" else source
        where = path.name if source.kind == "datasets" else ""
        try:
            schema = next(arrow_batches(path)).schema if path.stat().st_size else None
        except StopIteration:
            schema = None
        except Exception as e:  # noqa: BLE001 - ArrowInvalid, OSError: not Arrow, or damaged
            problems.bad_record(where, f"not a readable Arrow file ({type(e).__name__}: {e})")
            continue
        if schema is None or not _text_column_ok(schema, options, problems, where):
            continue
        start, count, size, first_row, row = 0, 0, 0, 0, 0  # rows are numbered per file
        for index, batch in enumerate(arrow_batches(path)):
            if count and size >= TASK_BYTES:
                yield ArrowTask(part, path, start, count, first_row)
                start, count, size, first_row = index, 0, 0, row
            count += 1
            size += batch.column(options.text_field).nbytes
            row += batch.num_rows
        if count:
            yield ArrowTask(part, path, start, count, first_row)
        rows += row
    if rows == 0 and not problems.bad_count:
        problems.bad_record("", "empty input: no rows")
