"""Checkpoints that survive a run dying at any moment.

Each checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed
into place (a rename within one file system is atomic): a reader sees a complete file or none.
Files are ``ckpt_<step>.pt``; resuming takes the newest that loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from gpt.config import GPTConfig

_NAME = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(ValueError):
    pass


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:07d}.pt"


def save_checkpoint(out_dir: str | Path, step: int, state: dict, keep_last: int = 2) -> Path:
    """Write ``state`` atomically as the checkpoint of ``step``; keep only the newest ``keep_last``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(out_dir, step)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(out_dir)  # so the rename itself is on disk
    if keep_last > 0:
        for old in list_checkpoints(out_dir)[:-keep_last]:
            old.unlink(missing_ok=True)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (temporary files never match), oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    missing = {"model", "optimizer", "step", "config"} - set(state)
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {sorted(missing)}")
    return state


def latest_checkpoint(out_dir: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``out_dir`` that loads, or None when there is none."""
    errors = []
    for path in reversed(list_checkpoints(out_dir)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            errors.append(str(e))
    if errors:
        raise CheckpointError("no checkpoint in {} loads:\n  {}".format(out_dir, "\n  ".join(errors)))
    return None


def check_compatible(saved: dict, config: GPTConfig, path: str | Path) -> None:
    """Refuse a checkpoint of another model shape or vocabulary, naming every field that differs."""
    current = config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {v!r}" for k, v in current.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(f"{path} was saved for another model config ({'; '.join(diffs)})")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
