"""DDP on two CPU processes (gloo) against one process with the same total batch."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.checkpoint import verify_folder
from gpt_kernels import registry
from synthetic_data import random_corpus

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
COMMON = ["--preset", "tiny", "--seq-len", "32", "--kernels", "none", "--device", "cpu", "--eval-every", "0",
          "--eval-batches", "2", "--warmup-steps", "2", "--max-steps", str(STEPS), "--total-batch-tokens", "256",
          "--sample-tokens", "4"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return random_corpus(tmp_path_factory.mktemp("data"), seed=1, vocab=3000, train_tokens=40_000, val_tokens=4_000)


def run(out_dir, data_dir, nproc, *extra, torchrun=None):
    """One training run: plain python for one process unless ``torchrun`` is asked for."""
    script = [str(ROOT / "train_gpt2.py"), *COMMON, "--data", str(data_dir), "--out-dir", str(out_dir), *extra]
    if not (nproc > 1 if torchrun is None else torchrun):
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out_dir):
    records = [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if "train_loss" in r]


def final_params(out_dir):
    return torch.load(Path(out_dir) / f"ckpt_{STEPS:07d}.pt", weights_only=True)["model"]


def test_ddp_matches_single_process(data_dir, tmp_path):
    # One process: micro-batch 8 of 32 tokens = 256. Two ranks: 4 each, reading the same rows between them.
    run(tmp_path / "one", data_dir, 1, "--batch-size", "8")
    result = run(tmp_path / "two", data_dir, 2, "--batch-size", "4")
    assert "x 2 ranks" in result.stdout and result.stdout.count("sample:") == 1  # only rank 0 prints
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-5)
    one, two = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    for name in one:
        # A gradient that is zero in exact arithmetic (the key bias: softmax ignores a per-query
        # shift), or that cancels to ~0 for a rare weight, is rounding noise that differs with the
        # reduction order, and Adam's normalization turns that noise into full steps of up to lr
        # (2e-3). So: every element within 1e-4 (a twentieth of one step), and all but a handful
        # (1 in 10,000) within rtol 1e-4 / atol 1e-5.
        diff = (two[name] - one[name]).abs()
        assert diff.max() <= 1e-4, f"{name}: max |difference| {diff.max():.3g}"
        loose = diff > 1e-5 + 1e-4 * one[name].abs()
        assert loose.sum() <= max(1, loose.numel() // 10_000), f"{name}: {int(loose.sum())} elements differ"


def test_ddp_with_gradient_accumulation_and_resume(data_dir, tmp_path):
    # Two ranks x micro-batch 2 x 2 accumulation steps = 256 tokens per step.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, data_dir, 2, "--batch-size", "2", "--checkpoint-every", "3")
    run(resumed, data_dir, 2, "--batch-size", "2", "--checkpoint-every", "3")
    for leftover in resumed.glob(f"ckpt_{STEPS:07d}.*"):  # as if the run had died after step 3
        leftover.unlink()
    result = run(resumed, data_dir, 2, "--batch-size", "2", "--checkpoint-every", "3", "--resume")
    assert "resuming from" in result.stdout
    assert losses(resumed) == losses(straight)


def test_total_batch_must_divide_across_ranks(data_dir, tmp_path):
    script = [str(ROOT / "train_gpt2.py"), *COMMON, "--data", str(data_dir), "--out-dir", str(tmp_path),
              "--batch-size", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "not a multiple of batch-size*seq-len*world-size" in result.stderr


def test_fsdp_matches_single_process_and_resumes_on_another_world_size(data_dir, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run(single, data_dir, 1, "--batch-size", "8")
    run(sharded, data_dir, 2, "--batch-size", "4", "--fsdp", "--checkpoint-every", "3")
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5)
    newest = sharded / f"ckpt_{STEPS:07d}.dcp"
    assert verify_folder(newest)["step"] == STEPS  # a manifest with every file's size and SHA-256

    # Damage the newest (a flipped byte in a shard): resuming passes over it, saying why, and takes the
    # two-rank run's step-3 shards, on one rank (micro-batch 8: the same 256 tokens per step).
    shard = next(newest.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    result = run(sharded, data_dir, 1, "--batch-size", "8", "--fsdp", "--resume", torchrun=True)
    assert f"resuming from {sharded / 'ckpt_0000003.dcp'} at step 3" in result.stdout
    assert f"passing over {shard}: damaged: SHA-256" in result.stderr
    np.testing.assert_allclose(losses(sharded), losses(single), rtol=1e-5)


@pytest.mark.parametrize("kernels", ["adamw", "none"])
def test_fsdp_optimizer_and_fused_clipping_match_one_process(tmp_path, kernels):
    """The Triton AdamW on FSDP2 shards (norm all-reduced across them) against torch's AdamW unsharded."""
    import fsdp_worker
    from gpt.model import GPT
    from gpt.training import make_optimizer
    from gpt_kernels.registry import use_kernels

    # The worker's ranks are CPU processes (gloo), so the Triton AdamW runs there in the interpreter,
    # also on a GPU machine, where only the interpreter's own numpy limit can rule it out.
    if kernels == "adamw" and registry._interpreter_problem():
        pytest.skip(f"the CPU ranks cannot run the Triton AdamW: {registry._interpreter_problem()}")
    out = tmp_path / "result.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "fsdp_worker.py"), str(out), kernels]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),  # the worker imports gpt and kernels
           "TRITON_INTERPRET": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = torch.load(out, weights_only=True)
    assert sharded["optimizer"] == ("AdamW" if kernels == "adamw" else "TorchAdamW")

    with use_kernels("none"):
        torch.manual_seed(0)
        model = GPT(fsdp_worker.CONFIG)
        losses, norms = fsdp_worker.train(model, make_optimizer(model, lr=1e-2, weight_decay=0.1))
    assert norms[0] > 0.05  # the clip was active
    np.testing.assert_allclose(sharded["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(sharded["norms"], norms, rtol=1e-5)
    for name, p in model.state_dict().items():
        torch.testing.assert_close(sharded["params"][name], p, rtol=1e-4, atol=1e-5, msg=name)


def test_a_failing_rank_ends_every_rank(data_dir, tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the job must end with the error, not hang."""
    script = [str(ROOT / "tests" / "failing_rank_worker.py"), *COMMON, "--data", str(data_dir),
              "--out-dir", str(tmp_path), "--batch-size", "4"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stderr
    assert time.monotonic() - started < 120, "the surviving rank was left waiting"
