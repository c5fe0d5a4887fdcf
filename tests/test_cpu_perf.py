"""pytest-benchmark for the CPU-side pieces that can slow training down without any GPU in sight:
the tokenizer, the data loader and the optimizer's host-side bookkeeping.

The normal test run passes ``--benchmark-disable`` (pytest.ini), so each benchmarked call runs once
as a plain test. To measure them:

    python -m pytest tests/test_cpu_perf.py --benchmark-enable            # a table of timings
    python -m pytest tests/test_cpu_perf.py --benchmark-enable --benchmark-autosave   # keep them in .benchmarks/
    python -m pytest tests/test_cpu_perf.py --benchmark-enable --benchmark-compare     # against the last saved run
"""

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from conftest import DEVICE  # noqa: E402
from gpt.data import DataLoader, write_shard  # noqa: E402
from gpt.tokenizer import VOCAB_SIZE, decode, encode  # noqa: E402
from gpt_kernels.adamw import AdamW  # noqa: E402

adamw_module = importlib.import_module("gpt_kernels.adamw")  # the module, not the op

# Real text with code, prose and odd whitespace: the Python sources of this repository's model.
SAMPLE_TEXT = (Path(__file__).resolve().parents[1] / "gpt" / "model.py").read_text()


def test_tokenizer_throughput(benchmark):
    ids = benchmark(encode, SAMPLE_TEXT)
    benchmark.extra_info["tokens_per_call"] = len(ids)
    benchmark.extra_info["chars_per_call"] = len(SAMPLE_TEXT)
    assert decode(ids) == SAMPLE_TEXT
    assert len(SAMPLE_TEXT) / len(ids) > 2  # BPE merges: several characters per token on code and prose


def test_data_loader_batches_per_second(benchmark, tmp_path):
    batch_size, seq_len = 8, 256
    tokens = np.random.default_rng(0).integers(0, VOCAB_SIZE, size=40 * batch_size * seq_len, dtype=np.uint16)
    write_shard(tmp_path / "synthetic_train_000000.bin", tokens)
    loader = DataLoader(tmp_path, "train", batch_size, seq_len, seed=0)

    x, y = benchmark(loader.next_batch)
    benchmark.extra_info["tokens_per_batch"] = batch_size * seq_len
    assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    assert ((x >= 0) & (x < VOCAB_SIZE)).all()


class _KernelStandIn:
    """Takes a Triton kernel's place: records each launch's grid and runs nothing, so what is timed is
    the optimizer's host-side work alone (bucketing, pointer and coefficient tables, caches)."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def test_optimizer_host_side_step(benchmark, monkeypatch):
    """The Triton AdamW's host side per step, its kernels stubbed out: what a GPU step costs the host
    while the device waits for it. Many small tensors (GPT-2 124M has 148), two groups, as training."""
    launches = {name: _KernelStandIn() for name in ("_grad_sum_squares_kernel", "_finalize_norm_kernel",
                                                    "_adamw_kernel")}
    for name, stand_in in launches.items():
        monkeypatch.setattr(adamw_module, name, stand_in)
    torch.manual_seed(0)
    # On the device the optimizer takes: a GPU's, or the CPU where Triton's interpreter makes it one.
    params = [torch.nn.Parameter(torch.randn(16, device=DEVICE)) for _ in range(148)]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = AdamW([{"params": params[:74], "weight_decay": 0.1},
                       {"params": params[74:], "weight_decay": 0.0}], lr=1e-3)

    def step():
        optimizer.clip_grad_norm_(1.0)
        optimizer.step()

    benchmark(step)
    benchmark.extra_info["tensors"] = len(params)
    calls = len(launches["_adamw_kernel"].grids)
    assert calls >= 1 and launches["_adamw_kernel"].grids[-1] == (len(params),)  # one launch, a chunk per tensor
    assert len(launches["_grad_sum_squares_kernel"].grids) == len(launches["_finalize_norm_kernel"].grids) == calls
    assert all(optimizer.state[p]["step"].item() == calls for p in params)
