"""torch.distributed for training: one process per device, launched by ``torchrun``.

Rank, local rank and world size come from the environment torchrun sets; without it the run is
a single process and nothing here touches torch.distributed. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    enabled: bool = False  # launched by torchrun (even with one process: DDP/FSDP at world size 1)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, logs, samples and writes (unsharded) checkpoints."""
        return self.rank == 0


def setup(device: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    if "RANK" not in os.environ:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return DistInfo(), device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]), enabled=True)
    device_type = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
        device = torch.device("cuda", info.local_rank)
    else:
        device = torch.device("cpu")
    # A bounded timeout: a rank that dies leaves the others blocked in a collective, and torchrun
    # only tears the group down once one of them returns.
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        timeout=datetime.timedelta(minutes=10),
        device_id=device if device.type == "cuda" else None,
    )
    return info, device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    """The average of a scalar over all ranks (the loss we log); itself when not distributed."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":  # gloo has no AVG
            value /= dist.get_world_size()
    return value


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (e.g. the path of data rank 0 prepared)."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints (--fsdp): every rank writes its own shards with torch.distributed.checkpoint,
# which can load them back on another world size. The folder is written under a temporary name
# and renamed by rank 0 once every rank has finished, so a folder under the final name is complete.


def _sharded_name(step: int) -> str:
    return f"ckpt_{step:07d}.dcp"


def save_sharded_checkpoint(out_dir: Path, step: int, model, optimizer, extra: dict, keep_last: int) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = out_dir / _sharded_name(step)
    tmp = out_dir / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        torch.save(extra, tmp / "extra.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep_last > 0:
            for old in list_sharded_checkpoints(out_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_sharded_checkpoints(out_dir: Path) -> list[Path]:
    """Complete sharded checkpoints, oldest first (temporary folders start with a dot and never match)."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.glob("ckpt_*.dcp") if (p / "extra.pt").is_file())


def load_sharded_checkpoint(path: Path, model, optimizer) -> dict:
    """Load shards into ``model`` and ``optimizer`` (any world size); returns the unsharded rest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return torch.load(path / "extra.pt", weights_only=False)
