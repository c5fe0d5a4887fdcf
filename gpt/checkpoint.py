"""Checkpoints that survive a run dying at any moment, and a resume that says which one it took.

A save is two atomic steps, each a temporary file in the same folder that is flushed to disk and
then renamed into place (a rename within one file system is atomic):

1. the state, ``ckpt_<step>.pt``, hashed with SHA-256 while it is written (no second read);
2. its manifest, ``ckpt_<step>.json``: step, size in bytes, SHA-256 and model config.

A checkpoint is *complete* when its manifest exists and the file's size and SHA-256 match it. The
manifest is written last, so a run killed during a save leaves at most a temporary file (whose name
never matches ``ckpt_<step>.pt``) or a checkpoint without a manifest: neither is ever taken for a
checkpoint. Resuming takes the newest complete checkpoint and warns about each newer one it passes
over, saying why (an interrupted save, or a file damaged after it was written). Each save removes
the temporary files of killed saves and keeps only the newest ``keep_last`` complete checkpoints.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import re
import warnings
from pathlib import Path

import torch

from gpt.config import GPTConfig

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")
_MANIFEST_NAME = re.compile(r"^ckpt_(\d+)\.json$")
# ".ckpt_<step>.pt.tmp-<pid>" and ".ckpt_<step>.json.tmp-<pid>": the pid tells whose save it is.
_TEMPORARY_NAME = re.compile(r"^\.ckpt_\d+\.(pt|json)\.tmp-(\d+)$")
MANIFEST_FORMAT = 1
_HASH_CHUNK = 16 * 2**20


class CheckpointError(ValueError):
    pass


class CheckpointWarning(UserWarning):
    """A checkpoint that resuming passed over, and why."""


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def manifest_path(checkpoint: str | Path) -> Path:
    """The manifest of a checkpoint file: ``ckpt_<step>.json`` beside ``ckpt_<step>.pt``."""
    return Path(checkpoint).with_suffix(".json")


class _HashingWriter:
    """A file wrapper for ``torch.save`` that hashes the bytes as they go to disk."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def save_checkpoint(out_dir: str | Path, step: int, state: dict, keep_last: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step``, then its manifest; keep only the newest
    ``keep_last`` complete checkpoints (0: keep all). Returns the checkpoint's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    final = checkpoint_path(out_dir, step)
    try:
        with _atomic_file(final) as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
        manifest = {
            "format": MANIFEST_FORMAT,
            "step": step,
            "file": final.name,
            "bytes": writer.bytes,
            "sha256": writer.sha256.hexdigest(),
            "config": state.get("config"),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with _atomic_file(manifest_path(final)) as f:
            f.write((json.dumps(manifest, indent=2) + "\n").encode())
    except (OSError, RuntimeError) as e:
        # torch.save reports a failed write (a full disk, a vanished folder) as a RuntimeError of its
        # own, the OSError only in its context: find it, so the message says what really happened.
        cause = next((c for c in (e, e.__cause__, e.__context__) if isinstance(c, OSError)), None)
        if cause is None:
            raise
        final.unlink(missing_ok=True)  # its manifest never got written: not a checkpoint anyway
        previous = complete_checkpoints(out_dir)
        keeps = f"the newest complete checkpoint is still {previous[-1].name}" if previous else "no complete checkpoint exists"
        raise CheckpointError(f"could not save {final}: {cause.strerror or cause} ({keeps}; free the space or fix "
                              f"the folder, then run again with --resume)") from e
    prune_checkpoints(out_dir, keep_last)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Every file named like a checkpoint (complete or not; temporary files never match), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def complete_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoints with a manifest, oldest first (their checksums are checked on load, not here)."""
    return [p for p in list_checkpoints(out_dir) if manifest_path(p).is_file()]


def verify_checkpoint(path: str | Path) -> dict:
    """The manifest of the checkpoint at ``path`` once its size and SHA-256 match it; CheckpointError
    saying what is wrong otherwise."""
    path = Path(path)
    manifest_file = manifest_path(path)
    manifest, (expected_bytes, expected_sha256) = _read_manifest(
        path, manifest_file, lambda m: (int(m["bytes"]), str(m["sha256"])))
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, though its manifest {manifest_file.name} lists it")
    _check_file(path, expected_bytes, expected_sha256)
    return manifest


def load_checkpoint(path: str | Path, require_manifest: bool = False) -> dict:
    """The state saved at ``path``, checked against its manifest when it has one. A file copied
    without its manifest still loads (it was renamed into place complete), unless
    ``require_manifest``, as resuming requires."""
    path = Path(path)
    if require_manifest or manifest_path(path).is_file():
        verify_checkpoint(path)
    state = load_state_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (a {type(state).__name__}, not a dict)")
    missing = {"model", "optimizer", "step", "config"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
    return state


def load_state_file(path: str | Path):
    """``torch.load`` of a checkpoint file with ``weights_only=True``: tensors and plain types only.

    A checkpoint's manifest proves that the file is the one that was saved, not who saved it; a
    full unpickle would run whatever code a crafted file names. So a file that needs more than
    tensors, numbers, strings, lists, tuples and dicts is refused, never opened."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a paragraph; the line that names what the file wanted to load is the one that helps.
        found = re.search(r"(?:Unsupported global: GLOBAL|Trying to load unsupported GLOBAL) ([\w.]+)", str(e))
        detail = f" (it names {found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain types, and "
                              f"loading it could run code{detail}") from e
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def latest_checkpoint(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint in ``out_dir`` and its state, or None when there is none.

    Each newer checkpoint passed over is reported with a CheckpointWarning. Interrupted saves (no
    manifest) count as absent; but if the only candidates are damaged ones (a manifest that the file
    no longer matches), this raises CheckpointError rather than let the run silently start over.
    """
    out_dir = Path(out_dir)
    candidates = {_step(p): p for p in list_checkpoints(out_dir)}
    if out_dir.is_dir():  # a manifest whose file is gone still names a checkpoint that should be there
        for p in out_dir.iterdir():
            if m := _MANIFEST_NAME.match(p.name):
                candidates.setdefault(int(m.group(1)), checkpoint_path(out_dir, int(m.group(1))))
    return newest_loadable(out_dir, candidates, lambda p: load_checkpoint(p, require_manifest=True),
                           lambda p: manifest_path(p).is_file())


def newest_loadable(out_dir: Path, candidates: dict[int, Path], load, has_manifest) -> tuple[Path, dict] | None:
    """The newest of ``candidates`` (step -> path) that ``load`` loads without a CheckpointError, and
    what it loaded, warning about each newer one passed over; see latest_checkpoint. Shared with the
    sharded checkpoints of gpt/distributed.py."""
    passed_over, damaged = [], []
    for step in sorted(candidates, reverse=True):
        path = candidates[step]
        try:
            state = load(path)
        except CheckpointError as e:
            passed_over.append(str(e))
            if has_manifest(path):
                damaged.append(str(e))
            continue
        for reason in passed_over:
            warnings.warn(f"resuming from {path.name}, passing over {reason}", CheckpointWarning, stacklevel=3)
        return path, state
    if damaged:
        raise CheckpointError(f"no complete checkpoint in {out_dir} loads: {'; '.join(passed_over)}")
    for reason in passed_over:
        warnings.warn(f"no complete checkpoint: passing over {reason}", CheckpointWarning, stacklevel=3)
    return None


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (0: all). Older files that belong to no
    complete checkpoint (a save interrupted between the file and its manifest, a manifest whose
    file was deleted) go too."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 keeps every checkpoint), got {keep_last}")
    out_dir = Path(out_dir)
    complete = complete_checkpoints(out_dir)
    if not complete:
        return
    newest = _step(complete[-1])
    doomed = complete[:-keep_last] if keep_last else []
    doomed += [p for p in list_checkpoints(out_dir) if _step(p) < newest and p not in complete]
    for p in out_dir.iterdir():
        if (m := _MANIFEST_NAME.match(p.name)) and int(m.group(1)) < newest:
            if not checkpoint_path(out_dir, int(m.group(1))).is_file():
                p.unlink(missing_ok=True)
    for path in doomed:
        manifest_path(path).unlink(missing_ok=True)  # first, so the checkpoint stops being complete at once
        path.unlink(missing_ok=True)


def remove_stale_temporaries(out_dir: str | Path) -> list[Path]:
    """Delete the temporary files that saves of processes no longer running left behind; returns them."""
    out_dir = Path(out_dir)
    removed = []
    if not out_dir.is_dir():
        return removed
    for p in out_dir.iterdir():
        m = _TEMPORARY_NAME.match(p.name)
        if m and not _process_alive(int(m.group(2))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------------
# Folders (the sharded checkpoints of --fsdp runs, gpt/distributed.py): the same rule, with one
# manifest, ``manifest.json`` inside the folder, that lists every other file's size and SHA-256.
# It is written last, before the folder is renamed into place.


def folder_manifest_path(folder: str | Path) -> Path:
    return Path(folder) / "manifest.json"


def save_state_file(path: str | Path, state: dict) -> None:
    """``torch.save`` through a temporary file, flushed to disk and renamed into place."""
    with _atomic_file(Path(path)) as f:
        torch.save(state, f)


def write_folder_manifest(folder: str | Path, step: int, config: dict | None) -> dict:
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p != folder_manifest_path(folder):
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _file_sha256(p)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "files": files,
        "config": config,
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with _atomic_file(folder_manifest_path(folder)) as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def verify_folder(folder: str | Path) -> dict:
    """The manifest of the checkpoint folder once every file it lists is there with its size and
    SHA-256, and no other file is; CheckpointError saying what is wrong otherwise."""
    folder = Path(folder)
    manifest_file = folder_manifest_path(folder)
    manifest, files = _read_manifest(folder, manifest_file, lambda m: {
        str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in m["files"].items()})
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {manifest_file.name}
    if missing := sorted(set(files) - present):
        raise CheckpointError(f"{folder}: damaged: {', '.join(missing)} missing, though its manifest lists them")
    if extra := sorted(present - set(files)):
        raise CheckpointError(f"{folder}: damaged: {', '.join(extra)} not in its manifest")
    for name, (expected_bytes, expected_sha256) in files.items():
        _check_file(folder / name, expected_bytes, expected_sha256)
    return manifest


def check_compatible(saved: dict, config: GPTConfig, path: str | Path) -> None:
    """Refuse a checkpoint of another model shape or vocabulary, naming every field that differs."""
    current = config.to_dict()
    differing = [k for k, v in current.items() if saved.get(k) != v]
    if not differing:
        return
    diffs = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs run {current[k]!r}" for k in differing)
    vocabulary = {"vocab_size", "vocab_pad_multiple"}
    if set(differing) <= vocabulary:
        what = "another vocabulary"
    elif set(differing) & vocabulary:
        what = "another model config and another vocabulary"
    else:
        what = "another model config"
    raise CheckpointError(f"{path} was saved for {what} ({diffs})")


class _atomic_file:
    """``with _atomic_file(path) as f:`` writes ``.<name>.tmp-<pid>``, flushes it to disk and renames it
    to ``path`` on success; on failure the temporary file is removed and ``path`` left untouched."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def __enter__(self):
        self.file = open(self.tmp, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
                fsync_dir(self.path.parent)  # so the rename itself is on disk
        finally:
            self.tmp.unlink(missing_ok=True)
        return False


def _read_manifest(checkpoint: Path, manifest_file: Path, expected):
    """(the manifest, ``expected(manifest)``): what the manifest of ``checkpoint`` says its files
    must be; CheckpointError if the manifest is missing or is not one."""
    if not manifest_file.is_file():
        raise CheckpointError(f"{checkpoint}: no manifest {manifest_file.name}: its save did not finish")
    try:
        manifest = json.loads(manifest_file.read_text())
        return manifest, expected(manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest_file}: unreadable manifest ({type(e).__name__}: {e})") from e


def _check_file(path: Path, expected_bytes: int, expected_sha256: str) -> None:
    size = path.stat().st_size
    if size != expected_bytes:
        raise CheckpointError(f"{path}: damaged: {size} bytes, its manifest says {expected_bytes}")
    sha256 = _file_sha256(path)
    if sha256 != expected_sha256:
        raise CheckpointError(f"{path}: damaged: SHA-256 {sha256} differs from its manifest's {expected_sha256}")


def _step(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def _file_sha256(path: Path) -> str:
    sha256 = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            sha256.update(chunk)
    return sha256.hexdigest()


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
