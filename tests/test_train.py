"""The training job end to end on the CPU: logs, checkpoints, resume, and its errors."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from synthetic_data import sentence_corpus

ROOT = Path(__file__).resolve().parents[1]
# The reference ops keep these runs fast; the kernels' own parity with the references is tested per op.
FAST = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--kernels", "none", "--device", "cpu",
        "--eval-batches", "2", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return sentence_corpus(tmp_path_factory.mktemp("data"))


def train(*args):
    import train_gpt2  # imported here: nothing in the package imports the training script

    return train_gpt2.main([*FAST, *map(str, args)])


def read_log(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def test_training_logs_and_learns(data_dir, tmp_path, capsys):
    assert train("--data", data_dir, "--out-dir", tmp_path, "--max-steps", 40, "--eval-every", 20, "--lr", 3e-3) == 0
    records = read_log(tmp_path)
    steps = [r for r in records if "train_loss" in r]
    assert [r["step"] for r in steps] == list(range(40))
    for key in ("train_loss", "lr", "tokens_per_sec", "grad_norm"):
        assert all(np.isfinite(r[key]) for r in steps), key
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(vals) == 3 and vals[-1] < vals[0] - 1.0, vals  # steps 0 and 20, and the final one
    assert (tmp_path / "ckpt_0000040.pt").exists()
    out = capsys.readouterr().out
    assert "layernorm" in out and "switched off" in out  # the table of implementations
    assert "sample:" in out


def test_resume_gives_the_same_losses(data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["--data", data_dir, "--max-steps", 8, "--checkpoint-every", 4, "--eval-every", 0]
    train(*common, "--out-dir", straight)
    train(*common, "--out-dir", resumed)
    for leftover in resumed.glob("ckpt_0000008.*"):  # as if the run had died after its step-4 checkpoint
        leftover.unlink()
    train(*common, "--out-dir", resumed, "--resume")
    losses = lambda d: [(r["step"], r["train_loss"]) for r in read_log(d) if "train_loss" in r]  # noqa: E731
    assert losses(resumed) == losses(straight)


def test_resume_refuses_another_config(data_dir, tmp_path):
    train("--data", data_dir, "--out-dir", tmp_path, "--max-steps", 1, "--eval-every", 0)
    import train_gpt2

    with pytest.raises(ValueError, match="another model config.*n_layer"):
        train_gpt2.main(["--preset", "small", "--batch-size", "2", "--seq-len", "32", "--kernels", "none",
                         "--device", "cpu", "--data", str(data_dir), "--out-dir", str(tmp_path), "--resume"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--seq-len", "4096"], "exceeds the tiny preset's block size"),
        (["--total-batch-tokens", "100"], "not a multiple"),
        (["--kernels", "flash"], "unknown op 'flash'"),
        (["--data", "{empty}"], "no .*shards|No .*shards|no shard"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, extra, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = [e.replace("{empty}", str(empty)) for e in extra]
    args = [sys.executable, str(ROOT / "train_gpt2.py"), *FAST, "--out-dir", str(tmp_path / "out"), "--max-steps", "1", *extra]
    result = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ")
    assert re.search(message, result.stderr), result.stderr


def test_hellaswag_at_each_evaluation(data_dir, tmp_path):
    examples = [{"ctx": "The cat sat on the", "endings": ["mat.", "moon.", "idea.", "sky."], "label": i % 4}
                for i in range(4)]
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    train("--data", data_dir, "--out-dir", tmp_path / "out", "--max-steps", 2, "--eval-every", 1,
          "--hellaswag", path, "--sample-tokens", 2)
    scored = [r for r in read_log(tmp_path / "out") if "hellaswag_acc" in r]
    assert [r["step"] for r in scored] == [0, 1]
    assert all(0.0 <= r["hellaswag_acc"] <= 1.0 and 0.0 <= r["hellaswag_acc_norm"] <= 1.0 for r in scored)


def test_the_training_step_accumulates_like_one_large_batch():
    """Two micro-steps of two rows take the update one step of four rows takes: the loss, the gradient
    norm and the new weights (the shared step of train_gpt2.py and bench/e2e.py)."""
    import copy

    import torch

    from gpt.model import GPT, GPTConfig
    from gpt.numerics import StepGuard
    from gpt.training import TrainingStep, make_optimizer
    from gpt_kernels.registry import use_kernels

    torch.manual_seed(0)
    initial = GPT(GPTConfig(block_size=16, vocab_size=100, n_layer=1, n_head=2, n_embd=32))
    x, y = torch.randint(0, 100, (2, 4, 16))
    results = []
    for grad_accum, batches in ((1, [(x, y)]), (2, [(x[:2], y[:2]), (x[2:], y[2:])])):
        model = copy.deepcopy(initial)
        step = TrainingStep(model, make_optimizer(model, 1e-3, 0.1), iter(batches).__next__, grad_accum,
                            torch.device("cpu"), torch.float32, grad_clip=1.0, guard=StepGuard())
        with use_kernels("none"):
            results.append((step(0, lr=1e-3), model))
    (large, large_model), (accumulated, accumulated_model) = results
    assert accumulated.verdict.update and accumulated.loss == pytest.approx(large.loss, rel=1e-6)
    assert accumulated.grad_norm == pytest.approx(large.grad_norm, rel=1e-5)
    for got, want in zip(accumulated_model.parameters(), large_model.parameters()):
        torch.testing.assert_close(got, want)
