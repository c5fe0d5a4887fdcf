"""What a result was measured on: device, driver, library versions, commit and date."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

import torch
import triton

REPO_ROOT = Path(__file__).resolve().parents[1]


def _command_output(args: list[str]) -> str | None:
    try:
        done = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str:
    return _command_output(["git", "rev-parse", "HEAD"]) or "unknown"


def git_dirty() -> bool | None:
    """Whether the working tree differs from the commit (the figures may not be the commit's)."""
    status = _command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    return None if status is None else bool(status)


def driver_version() -> str | None:
    """The NVIDIA driver's version (torch does not expose it; nvidia-smi does)."""
    out = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else f"CPU ({cpu_name()})"


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def describe(device: str, when: datetime.datetime) -> dict:
    """The results' ``environment`` section."""
    return {
        "device": device,
        "device_name": device_name(device),
        "driver": driver_version() if device.startswith("cuda") else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "date_utc": when.isoformat(),
    }
