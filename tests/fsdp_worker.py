"""Run under torchrun by tests/test_distributed.py: a small GPT sharded with FSDP2, trained a few
steps with the optimizer the registry picks (and fused clipping), saving rank 0's view of the result."""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from gpt.model import GPT, GPTConfig
from gpt.training import make_optimizer
from gpt_kernels.registry import set_kernels

CONFIG = GPTConfig(block_size=16, vocab_size=500, n_layer=2, n_head=2, n_embd=32)
# The Llama block (grouped-query attention, untied embeddings): `fsdp_worker.py OUT KERNELS llama`
LLAMA_CONFIG = GPTConfig(arch="llama", block_size=16, vocab_size=500, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                         mlp_hidden=48)
STEPS, BATCH = 3, 4


def batches():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, CONFIG.vocab_size, (BATCH, 16), generator=generator) for _ in range(STEPS)]


def train(model, optimizer, rank=0, world_size=1):
    """Each rank takes its rows of every batch; returns the losses averaged over ranks and the norms."""
    losses, norms = [], []
    rows = BATCH // world_size
    for batch in batches():
        x = batch[rank * rows:(rank + 1) * rows]
        _, loss = model(x, x)
        loss.backward()
        norm = optimizer.clip_grad_norm_(0.05)  # small, so clipping really scales the update
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dist.is_initialized():
            dist.all_reduce(loss := loss.detach().clone())
            loss /= world_size
        losses.append(loss.item())
        norms.append(float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
    return losses, norms


if __name__ == "__main__":
    set_kernels(sys.argv[2])  # the optimizer under test; the model's ops stay on their references
    dist.init_process_group("gloo")
    # The ranks are CPU processes: without a mesh FSDP2 picks the machine's accelerator, and on a GPU
    # machine it would move the parameters there.
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = GPT(LLAMA_CONFIG if sys.argv[3:] == ["llama"] else CONFIG)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = make_optimizer(model, lr=1e-2, weight_decay=0.1)
    losses, norms = train(model, optimizer, dist.get_rank(), dist.get_world_size())
    # Every rank joins the all-gathers (and waits for them) before rank 0 alone saves the result.
    params = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        torch.save({"losses": losses, "norms": norms, "params": params, "optimizer": type(optimizer).__name__},
                   sys.argv[1])
    dist.barrier()  # leave together: gloo aborts a rank that tears down while another is still busy
    dist.destroy_process_group()
    # Under load, a gloo thread can still be joinable when the interpreter's C++ destructors run at
    # exit, and std::terminate aborts the process ("terminate called without an active exception")
    # after all the work is done and saved. Leave without running those destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
