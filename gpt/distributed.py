"""torch.distributed for training: one process per device, launched by ``torchrun``.

Rank, local rank and world size come from the environment torchrun sets; without it the run is
a single process and nothing here touches torch.distributed. NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import datetime
import os
import pickle
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
# which can load them back on another world size. The folder is written under a temporary name;
# once every rank has finished, rank 0 adds ``extra.pt`` (the unsharded rest), then the manifest
# (every file's size and SHA-256, written last), and renames the folder into place. Resuming takes
# the newest folder whose files match its manifest, as for unsharded checkpoints (gpt/checkpoint.py).
#
# Loading never unpickles arbitrary objects: extra.pt and DCP's non-tensor values go through
# ``torch.load(weights_only=True)``, and DCP's own ``.metadata`` pickle through an unpickler that
# knows only DCP's metadata classes.


def _sharded_name(step: int) -> str:
    return f"ckpt_{step:07d}.dcp"


def save_sharded_checkpoint(out_dir: Path, step: int, model, optimizer, extra: dict, keep_last: int) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from gpt import checkpoint as ckpt

    final = out_dir / _sharded_name(step)
    tmp = out_dir / f".{final.name}.tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        ckpt.save_state_file(tmp / "extra.pt", extra)
        ckpt.write_folder_manifest(tmp, step, extra.get("config"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ckpt.fsync_dir(out_dir)
        if keep_last > 0:
            complete = [p for p in list_sharded_checkpoints(out_dir) if ckpt.folder_manifest_path(p).is_file()]
            for old in complete[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def list_sharded_checkpoints(out_dir: Path) -> list[Path]:
    """Every folder named like a sharded checkpoint, complete or not, oldest first (temporary folders
    start with a dot and never match)."""
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.glob("ckpt_*.dcp") if p.is_dir())


def latest_sharded_checkpoint(out_dir: Path) -> tuple[Path, dict] | None:
    """The newest sharded checkpoint whose files match its manifest, and its ``extra.pt``; None when
    there is none. Passed-over ones are reported as gpt.checkpoint.latest_checkpoint does."""
    from gpt import checkpoint as ckpt

    def load(path: Path) -> dict:
        ckpt.verify_folder(path)
        return ckpt.load_state_file(path / "extra.pt")

    candidates = {int(p.name[len("ckpt_"):-len(".dcp")]): p for p in list_sharded_checkpoints(out_dir)}
    return ckpt.newest_loadable(out_dir, candidates, load, lambda p: ckpt.folder_manifest_path(p).is_file())


def load_sharded_checkpoint(path: Path, model, optimizer) -> dict:
    """Load shards into ``model`` and ``optimizer`` (any world size); returns the unsharded rest."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from gpt import checkpoint as ckpt

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, storage_reader=_safe_reader(path), planner=_safe_planner())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return ckpt.load_state_file(path / "extra.pt")


def load_sharded_model_state(path: Path) -> dict:
    """The model weights of a sharded checkpoint, gathered in this one process (no process group)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=_safe_reader(path), planner=_safe_planner(keys={"model"}, empty=True),
                     no_dist=True)
    return state["model"]


# DCP's .metadata names these globals (besides its own metadata classes): a path, torch.Size, a
# dtype, a layout. Nothing else may be looked up while unpickling it.
_METADATA_GLOBALS = {("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"),
                     ("pathlib", "PureWindowsPath"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.metadata as metadata

        if module == "torch.distributed.checkpoint.metadata" and isinstance(getattr(metadata, name, None), type):
            return getattr(metadata, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the DCP metadata names {module}.{name}, which is not DCP metadata")


def _read_metadata(file: Path):
    """DCP's ``.metadata`` pickle, unpickled with only DCP's metadata classes allowed."""
    from gpt import checkpoint as ckpt

    try:
        with open(file, "rb") as f:
            return _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise ckpt.CheckpointError(f"{file}: refused: {e}") from e
    except (OSError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ckpt.CheckpointError(f"{file}: not readable DCP metadata ({type(e).__name__}: {e})") from e


def _safe_reader(path: Path):
    """DCP's file reader with the metadata read by _read_metadata. It is read once here first: DCP
    itself would catch a refusal, log it and go on to look for per-rank metadata."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    _read_metadata(Path(path) / ".metadata")

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            metadata = _read_metadata(Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _safe_planner(keys=None, empty: bool = False):
    """DCP's load planner, with non-tensor values (the optimizer's step, its hyperparameters) read by
    ``torch.load(weights_only=True)`` instead of a full unpickle."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    base = _EmptyStateDictLoadPlanner if empty else DefaultLoadPlanner

    class SafePlanner(base):
        def load_bytes(self, read_item, value) -> None:
            loaded = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
            else:
                self.state_dict[read_item.dest_index.fqn] = loaded

    return SafePlanner(keys=keys) if empty else SafePlanner()
