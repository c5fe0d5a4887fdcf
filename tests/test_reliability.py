"""Reliability: a run killed at any moment resumes as if nothing had happened; a checkpoint is used
only when it is complete; the numerics watch keeps bad steps out of the weights.

The kill-and-resume test runs ``train_gpt2.py`` as a subprocess and SIGKILLs it at five points (two
random moments, two during a checkpoint write, one right after a checkpoint file appears), resuming
each time in the same folder; the log and the final weights must equal those of an uninterrupted run.
Set GPT_KILL_SEED to replay a failure's random kill points.

Further down: checkpoints that would run code when unpickled are refused by every command; what
crashes leave (torn log lines, a kill during start-up, a full disk, injected by
tests/fault_injector.py) does not stop a resume; an unusable --out-dir or --data is one error line;
sharded (--fsdp) checkpoints follow the manifest rule; and a dropout run resumes bit-exactly with
either AdamW.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt import checkpoint as ckpt
from gpt.config import preset
from gpt.model import GPT
from gpt.numerics import StepGuard
from gpt_kernels import registry
from synthetic_data import sentence_corpus

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, EVERY = 12, 2
FAST = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--kernels", "none", "--device", "cpu",
        "--eval-batches", "1", "--eval-every", "0", "--warmup-steps", "2", "--sample-tokens", "1"]
# A short spike window so the z-scores (and the guard's state in the checkpoint) take part in the comparison.
RUN = [*FAST, "--max-steps", str(MAX_STEPS), "--checkpoint-every", str(EVERY), "--keep-last", "2", "--spike-window", "4"]
TIMING_KEYS = {"tokens_per_sec", "step_ms", "mfu"}
WAIT_S = 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return sentence_corpus(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------------------------------------------
# Kill and resume


def _start(out_dir: Path, data_dir: Path, output: Path, *extra) -> subprocess.Popen:
    # Unbuffered: the "resuming from" line must survive a SIGKILL. One thread: the same arithmetic in
    # every run, and no OpenMP threads spinning against each other on a busy 2-core CI machine.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(output, "w") as out:
        return subprocess.Popen([sys.executable, str(ROOT / "train_gpt2.py"), *RUN, "--data", str(data_dir),
                                 "--out-dir", str(out_dir), *extra], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)


def _records(out_dir: Path) -> list[dict]:
    path = out_dir / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _wait_until(proc: subprocess.Popen, condition, what: str, output: Path) -> None:
    """Poll ``condition`` every millisecond once the run has printed its header (by then a resumed
    run has dropped the log records it will redo), failing if the run ends or takes too long."""
    deadline = time.monotonic() + WAIT_S
    started = False
    while not (started and condition()):
        started = started or "model: " in output.read_text()
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{output.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _temporary(out_dir: Path, step: int, pid: int) -> Path:
    return out_dir / f".{ckpt.checkpoint_path(out_dir, step).name}.tmp-{pid}"


def _newest_complete_step(out_dir: Path) -> int:
    complete = ckpt.complete_checkpoints(out_dir)
    return int(complete[-1].stem.split("_")[1]) if complete else 0


def _kill_points(rng: random.Random, checkpoint_bytes: int, out_dir: Path):
    """Five ways to die, each a function of the step the run resumes from that returns (description,
    trigger, step of the checkpoint being written or None); a trigger ``(proc) -> bool`` says when
    to kill. Targets are relative to the resume step, so a kill that came late never leaves a
    later target unreachable."""

    def after_step(step, delay):
        def trigger(proc):
            if not any(r.get("step") == step and "train_loss" in r for r in _records(out_dir)):
                return False
            time.sleep(delay)
            return True
        return trigger

    def during_write(step, fraction):
        def trigger(proc):
            try:
                return _temporary(out_dir, step, proc.pid).stat().st_size >= fraction * checkpoint_bytes
            except FileNotFoundError:
                return False
        return trigger

    def after_rename(path):
        def inode():  # a new file, not one an earlier kill left behind
            try:
                return path.stat().st_ino
            except FileNotFoundError:
                return None
        before = inode()
        return lambda proc: inode() not in (None, before)

    def random_moment(start):
        step, delay = start + rng.randrange(EVERY), rng.uniform(0, 0.3)
        return f"a random moment, {delay:.2f}s after step {step} is logged", after_step(step, delay), None

    def write_starts(start):
        step = start + EVERY
        return f"as the step-{step} checkpoint's temporary file appears", during_write(step, 0.0), step

    def half_written(start):
        step = start + EVERY
        return f"half-way through writing the step-{step} checkpoint", during_write(step, 0.5), step

    def renamed(start):
        step = start + EVERY
        trigger = after_rename(ckpt.checkpoint_path(out_dir, step))
        return f"as the step-{step} checkpoint file gets its final name", trigger, None

    return [random_moment, write_starts, random_moment, half_written, renamed]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture
def processes():
    """Runs started by a test; any still alive at its end (a failed test) are killed."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_kill_and_resume_loses_nothing(data_dir, tmp_path, processes):
    seed = int(os.environ.get("GPT_KILL_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    reference, out = tmp_path / "reference", tmp_path / "killed"

    # The uninterrupted run goes alongside the killed ones (they are single-threaded; CI has 2 cores).
    ref = _start(reference, data_dir, tmp_path / "reference.txt")
    processes.append(ref)
    with torch.device("meta"):  # a checkpoint holds the weights and AdamW's two moments, all fp32
        checkpoint_bytes = 3 * 4 * GPT(preset("tiny")).num_parameters()

    for cycle, kill_point in enumerate(_kill_points(rng, checkpoint_bytes, out)):
        expected_start = _newest_complete_step(out)
        description, trigger, writing = kill_point(expected_start)
        context = f"kill {cycle + 1} ({description}; GPT_KILL_SEED={seed})"
        output = tmp_path / f"run{cycle}.txt"
        proc = _start(out, data_dir, output, "--resume")
        processes.append(proc)
        try:
            _wait_until(proc, lambda: trigger(proc), description, output)
        finally:
            proc.kill()  # SIGKILL: no handler, no cleanup
            proc.wait()
        said = output.read_text()
        if expected_start:
            assert f"resuming from {ckpt.checkpoint_path(out, expected_start)} at step {expected_start}" in said, context
        else:
            assert "no checkpoint" in said, f"{context}:\n{said[-2000:]}"

        # What a resume now finds: the newest checkpoint with a manifest, never a temporary file.
        newest = _newest_complete_step(out)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ckpt.CheckpointWarning)
            found = ckpt.latest_checkpoint(out)
        if newest:
            path, state = found
            assert path == ckpt.checkpoint_path(out, newest) and state["step"] == newest, context
            assert ckpt.verify_checkpoint(path)["step"] == newest, context
        else:
            assert found is None, context
        if writing:  # killed mid-write: that checkpoint does not exist, only its temporary file
            assert _temporary(out, writing, proc.pid).exists(), context
            assert not ckpt.checkpoint_path(out, writing).exists() and newest < writing, context

    final = tmp_path / "final.txt"
    proc = _start(out, data_dir, final, "--resume")
    processes.append(proc)
    assert proc.wait(timeout=WAIT_S) == 0, final.read_text()[-3000:]
    assert ref.wait(timeout=WAIT_S) == 0, (tmp_path / "reference.txt").read_text()[-3000:]

    assert _without_timing(_records(out)) == _without_timing(_records(reference)), f"GPT_KILL_SEED={seed}"
    got, want = (ckpt.load_checkpoint(ckpt.checkpoint_path(d, MAX_STEPS)) for d in (out, reference))
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for index, moments in want["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(got["optimizer"]["state"][index][key], value), (index, key)
    assert got["train_loader"] == want["train_loader"] and got["numerics"] == want["numerics"]
    # Hygiene: only the newest --keep-last complete checkpoints, no temporary or orphaned files.
    names = sorted(p.name for p in out.iterdir())
    kept = [ckpt.checkpoint_path(out, step) for step in (MAX_STEPS - EVERY, MAX_STEPS)]
    expected = sorted([p.name for p in kept] + [ckpt.manifest_path(p).name for p in kept] + ["log.jsonl"])
    assert names == expected, f"GPT_KILL_SEED={seed}"


# ---------------------------------------------------------------------------------------------------
# Checkpoint hygiene


def _state(step: int, **config) -> dict:
    return {"model": {"w": torch.randn(64)}, "optimizer": {}, "step": step, "config": preset("tiny", **config).to_dict()}


def _save(out, *steps, keep_last=0):
    for step in steps:
        ckpt.save_checkpoint(out, step, _state(step), keep_last=keep_last)


def test_manifest_records_size_and_checksum(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 7, _state(7))
    manifest = json.loads(ckpt.manifest_path(path).read_text())
    assert manifest["step"] == 7 and manifest["file"] == path.name
    assert manifest["bytes"] == path.stat().st_size
    assert manifest["sha256"] == ckpt._file_sha256(path)
    assert manifest["config"] == preset("tiny").to_dict()
    assert ckpt.load_checkpoint(path)["step"] == 7


def test_keep_last(tmp_path):
    _save(tmp_path, 1, 2, 3, 4, keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_0000003.pt", "ckpt_0000004.pt"]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["ckpt_0000003.json", "ckpt_0000004.json"]
    _save(tmp_path, 5, 6)  # keep_last=0 keeps everything
    assert len(ckpt.list_checkpoints(tmp_path)) == 4
    with pytest.raises(ValueError, match="keep_last must be >= 0"):
        ckpt.prune_checkpoints(tmp_path, -1)


def test_resume_passes_over_an_interrupted_save_and_says_so(tmp_path):
    _save(tmp_path, 3, 6)
    ckpt.manifest_path(ckpt.checkpoint_path(tmp_path, 6)).unlink()  # died between the file and its manifest
    with pytest.warns(ckpt.CheckpointWarning, match=r"resuming from ckpt_0000003.pt, passing over .*ckpt_0000006.pt: "
                                                    r"no manifest ckpt_0000006.json: its save did not finish"):
        path, state = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "ckpt_0000003.pt" and state["step"] == 3
    _save(tmp_path, 9, keep_last=2)  # the next save clears the orphan
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_0000003.pt", "ckpt_0000009.pt"]


def test_only_interrupted_saves_means_a_fresh_start(tmp_path):
    _save(tmp_path, 3)
    ckpt.manifest_path(ckpt.checkpoint_path(tmp_path, 3)).unlink()
    with pytest.warns(ckpt.CheckpointWarning, match="no complete checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path) is None
    # The file itself is whole (renamed into place only once written): asked for by name, it loads.
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 3))["step"] == 3
    with pytest.raises(ckpt.CheckpointError, match="no manifest"):
        ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 3), require_manifest=True)
    assert ckpt.latest_checkpoint(tmp_path / "nothing-here") is None


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    ("flip", "SHA-256 .* differs from its manifest"),
    ("truncate", "damaged: .* bytes, its manifest says"),
    ("delete", "missing, though its manifest"),
    ("manifest", "unreadable manifest"),
])
def test_damaged_checkpoint_is_refused(tmp_path, damage, message):
    _save(tmp_path, 3, 6)
    path = ckpt.checkpoint_path(tmp_path, 6)
    if damage == "flip":
        _flip_a_byte(path)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "delete":
        path.unlink()
    else:
        ckpt.manifest_path(path).write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.load_checkpoint(path)
    with pytest.warns(ckpt.CheckpointWarning, match=message):
        assert ckpt.latest_checkpoint(tmp_path)[0].name == "ckpt_0000003.pt"
    # With no good checkpoint left, resuming refuses rather than silently starting over.
    ckpt.checkpoint_path(tmp_path, 3).unlink()
    ckpt.manifest_path(ckpt.checkpoint_path(tmp_path, 3)).unlink()
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint in .* loads"):
        ckpt.latest_checkpoint(tmp_path)


def test_temporaries_of_dead_saves_are_removed(tmp_path):
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                  capture_output=True, text=True, check=True).stdout)
    dead = _temporary(tmp_path, 3, dead_pid)
    live = _temporary(tmp_path, 3, os.getpid())
    dead.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    _save(tmp_path, 6)
    assert not dead.exists() and live.exists()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt_0000006.pt"]


def test_a_failed_save_leaves_nothing(tmp_path):
    _save(tmp_path, 3)
    with pytest.raises(Exception):
        ckpt.save_checkpoint(tmp_path, 6, {**_state(6), "unpicklable": lambda: None})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000003.json", "ckpt_0000003.pt"]


def test_incompatible_checkpoint_names_the_mismatch():
    saved = preset("tiny").to_dict()
    with pytest.raises(ckpt.CheckpointError, match=r"another model config \(n_layer: checkpoint 4 vs run 2\)"):
        ckpt.check_compatible(saved, preset("tiny", n_layer=2), "ckpt.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"another vocabulary \(vocab_size: checkpoint 50257 vs run 32000\)"):
        ckpt.check_compatible(saved, preset("tiny", vocab_size=32000), "ckpt.pt")
    with pytest.raises(ckpt.CheckpointError, match="another model config and another vocabulary"):
        ckpt.check_compatible(saved, preset("tiny", vocab_size=32000, n_embd=64), "ckpt.pt")
    ckpt.check_compatible(saved, preset("tiny"), "ckpt.pt")


# ---------------------------------------------------------------------------------------------------
# Numerics watch


def test_guard_skips_nonfinite_steps_and_stops_when_asked():
    guard = StepGuard(spike_zscore=0)
    assert guard.check(0, 3.0, 1.0).update
    verdict = guard.check(1, float("nan"), 1.0)
    assert not verdict.update and verdict.skip_reason == "nonfinite" and "non-finite loss nan" in verdict.message
    verdict = guard.check(2, 3.0, float("inf"))
    assert not verdict.update and "non-finite gradient norm inf" in verdict.message and verdict.stop is None
    assert guard.skipped == 2 and guard.consecutive == 2
    assert guard.check(3, 3.0, 1.0).update and guard.consecutive == 0
    assert guard.summary() == "2 steps skipped (2 non-finite)"

    stop = StepGuard(on_nonfinite="stop").check(5, float("inf"), float("nan"))
    assert not stop.update and "step 5: non-finite loss inf and gradient norm nan" in stop.stop


def test_guard_stops_after_consecutive_skips():
    guard = StepGuard(max_consecutive_skips=3)
    verdicts = [guard.check(step, float("nan"), float("nan")) for step in range(3)]
    assert [v.stop is None for v in verdicts] == [True, True, False]
    assert "3 steps in a row skipped, the last one at step 2" in verdicts[-1].stop
    assert StepGuard(max_consecutive_skips=0).check(0, float("nan"), 1.0).stop is None


def test_guard_skips_loss_spikes_by_zscore():
    guard = StepGuard(spike_zscore=4.0, spike_window=8)
    losses = [5.0, 5.1, 4.9, 5.05, 4.95, 5.0, 5.1, 4.9]
    assert all(guard.check(i, loss, 1.0).zscore is None for i, loss in enumerate(losses))  # filling the window
    ordinary = guard.check(8, 5.08, 1.0)
    assert ordinary.update and abs(ordinary.zscore - (5.08 - np.mean(losses)) / np.std(losses)) < 1e-9
    spike = guard.check(9, 9.0, 1.0)
    assert not spike.update and spike.skip_reason == "loss_spike" and spike.zscore > 4
    assert "loss spike 9.0000" in spike.message
    # The spike joined the window: a lasting new level is accepted after a few steps, not skipped forever.
    verdicts = [guard.check(10 + i, 9.0, 1.0) for i in range(8)]
    assert verdicts[-1].update and sum(not v.update for v in verdicts) < 4
    assert not StepGuard(spike_zscore=0, spike_window=2).check(0, 1.0, 1.0).skip_reason


def test_guard_state_round_trip_decides_identically():
    rng = np.random.default_rng(0)
    losses = list(5 + rng.standard_normal(40) * 0.1)
    losses[30] = float("nan")
    losses[33] = 12.0
    whole = StepGuard(spike_window=6)
    first = [whole.check(i, loss, 1.0) for i, loss in enumerate(losses)]
    half = StepGuard(spike_window=6)
    for i, loss in enumerate(losses[:20]):
        half.check(i, loss, 1.0)
    resumed = StepGuard(spike_window=6)
    resumed.load_state_dict(torch.load(_roundtrip(half.state_dict()), weights_only=True))
    assert [resumed.check(20 + i, loss, 1.0) for i, loss in enumerate(losses[20:])] == first[20:]


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


class _FaultyGPT(GPT):
    """GPT whose training loss is multiplied by ``faults[step]`` (NaN, or a spike) at given steps."""

    faults: dict[int, float] = {}

    def __init__(self, config):
        super().__init__(config)
        self.training_calls = 0

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = super().forward(idx, targets, **kwargs)
        if targets is not None and self.training and torch.is_grad_enabled():
            factor = self.faults.get(self.training_calls)
            self.training_calls += 1
            if factor is not None:
                loss = loss * factor
        return logits, loss


def _train_with_faults(monkeypatch, faults, *args):
    import train_gpt2

    monkeypatch.setattr(_FaultyGPT, "faults", faults)
    monkeypatch.setattr(train_gpt2, "GPT", _FaultyGPT)
    with registry.use_kernels("none"):
        return train_gpt2.main([*FAST, *map(str, args)])


def test_training_skips_nonfinite_and_spiking_steps(data_dir, tmp_path, monkeypatch, capsys):
    nan, spike = 2, 5
    _train_with_faults(monkeypatch, {nan: float("nan"), spike: 40.0}, "--data", data_dir, "--out-dir", tmp_path,
                       "--max-steps", 7, "--spike-window", 3)
    records = [r for r in _records(tmp_path) if "train_loss" in r]
    assert [r.get("skipped") for r in records] == [None, None, "nonfinite", None, None, "loss_spike", None]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 1, 2, 2]
    assert np.isnan(records[nan]["train_loss"]) and records[spike]["loss_z"] > 6
    assert "loss_z" not in records[3] and "loss_z" in records[4]  # the NaN never joined the window
    # Neither skipped step reached the optimizer: 7 steps, 5 updates.
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 7))
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {5.0}
    assert state["numerics"]["skips"] == {"nonfinite": 1, "loss_spike": 1}
    out = capsys.readouterr().out
    assert "step 2: non-finite loss nan and gradient norm nan: step skipped" in out
    assert "2 steps skipped (1 non-finite, 1 loss spike)" in out


def test_training_stops_on_nonfinite_when_asked(data_dir, tmp_path, monkeypatch):
    import train_gpt2

    with pytest.raises(train_gpt2.RunError, match="step 1: non-finite loss nan.*stopping \\(--on-nonfinite stop\\)"):
        _train_with_faults(monkeypatch, {1: float("nan")}, "--data", data_dir, "--out-dir", tmp_path / "stop",
                           "--max-steps", 5, "--on-nonfinite", "stop")
    assert [r["step"] for r in _records(tmp_path / "stop")] == [0, 1]  # the bad step is logged

    with pytest.raises(train_gpt2.RunError, match="2 steps in a row skipped, the last one at step 2"):
        _train_with_faults(monkeypatch, {1: float("nan"), 2: float("inf")}, "--data", data_dir,
                           "--out-dir", tmp_path / "diverged", "--max-steps", 5, "--max-consecutive-skips", 2)


# ---------------------------------------------------------------------------------------------------
# A checkpoint never runs code: every loader uses torch.load(weights_only=True)


class _CreatesAFile:
    """Unpickling this calls ``open(path, "w")``: a stand-in for any code a crafted file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _crafted_checkpoint(out_dir: Path, marker: Path, step: int = 2) -> Path:
    """A checkpoint of the tiny model whose pickle would create ``marker``, saved by our own
    save_checkpoint so that its manifest matches it byte for byte."""
    model = GPT(preset("tiny"))
    state = {"model": model.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "step": step,
             "config": preset("tiny").to_dict(), "payload": _CreatesAFile(marker)}
    path = ckpt.save_checkpoint(out_dir, step, state)
    ckpt.verify_checkpoint(path)  # the manifest vouches for it: integrity is not origin
    return path


def _command(*args, fault=None, timeout=300):
    """Run ``python ARGS`` from the repository root (through tests/fault_injector.py when ``fault``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    prefix = [str(ROOT / "tests" / "fault_injector.py"), *fault] if fault else []
    return subprocess.run([sys.executable, *prefix, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def _one_error_line(result, *expected):
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_load_checkpoint_refuses_a_file_that_would_run_code(tmp_path):
    marker = tmp_path / "created-by-the-checkpoint"
    path = _crafted_checkpoint(tmp_path / "run", marker)
    with pytest.raises(ckpt.CheckpointError, match=f"{path}: refused: it holds objects other than tensors"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint .* loads"):
        ckpt.latest_checkpoint(tmp_path / "run")
    assert not marker.exists()


@pytest.mark.parametrize("command", ["train --resume", "gpt.generate", "gpt.evaluate"])
def test_commands_refuse_a_checkpoint_that_would_run_code(data_dir, tmp_path, command):
    marker = tmp_path / "created-by-the-checkpoint"
    path = _crafted_checkpoint(tmp_path / "run", marker)
    if command == "train --resume":
        result = _command(ROOT / "train_gpt2.py", *RUN, "--data", data_dir, "--out-dir", tmp_path / "run", "--resume")
    elif command == "gpt.generate":
        result = _command("-m", "gpt.generate", "--checkpoint", path, "--device", "cpu", "--max-new-tokens", 1)
    else:
        result = _command("-m", "gpt.evaluate", "--checkpoint", path, "--device", "cpu", "--data", data_dir,
                          "--batches", 1, "--seq-len", 16)
    _one_error_line(result, str(path), "refused: it holds objects other than tensors", "(it names io.open)")
    assert not marker.exists()


def test_rng_state_round_trips_through_a_weights_only_load():
    import io

    from gpt.training import rng_state, set_rng_state

    random.random()
    np.random.standard_normal()  # a cached Gaussian is part of numpy's state
    buffer = io.BytesIO()
    torch.save(rng_state(), buffer)
    expected = (random.random(), np.random.standard_normal(), torch.rand(3))
    buffer.seek(0)
    set_rng_state(torch.load(buffer, weights_only=True))
    got = (random.random(), np.random.standard_normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


# ---------------------------------------------------------------------------------------------------
# What real crashes leave behind: torn log lines, a kill during start-up, a full disk


def _reference_log(data_dir, tmp_path_factory, *extra) -> list[dict]:
    out = tmp_path_factory.mktemp("reference")
    result = _command(ROOT / "train_gpt2.py", *RUN, "--data", data_dir, "--out-dir", out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return _without_timing(_records(out))


@pytest.fixture(scope="module")
def reference_log(data_dir, tmp_path_factory):
    return _reference_log(data_dir, tmp_path_factory)


def _interrupted_run(data_dir, out: Path) -> None:
    """The 12-step run of RUN, ended by a full disk while saving its step-8 checkpoint: the newest
    complete checkpoint is step 6's, and the log holds steps 0-7."""
    result = _command(ROOT / "train_gpt2.py", *RUN, "--data", data_dir, "--out-dir", out,
                      fault=["enospc", ".ckpt_0000008.pt.tmp-"])
    _one_error_line(result, "could not save", "ckpt_0000008.pt", "No space left on device",
                    "the newest complete checkpoint is still ckpt_0000006.pt")
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["ckpt_0000004.pt", "ckpt_0000006.pt"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert [r["step"] for r in _records(out)] == list(range(8))


def test_a_full_disk_then_a_torn_log_line_then_resume_loses_nothing(data_dir, tmp_path, reference_log):
    out = tmp_path / "run"
    _interrupted_run(data_dir, out)
    with open(out / "log.jsonl", "a") as log:  # the disk filled up in the middle of a log record, too
        log.write('{"step": 8, "train_loss": 3.2, "lr": 0.0')
    result = _command(ROOT / "train_gpt2.py", *RUN, "--data", data_dir, "--out-dir", out, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ckpt_0000006.pt at step 6" in result.stdout
    assert "dropping its torn last line" in result.stderr and "Traceback" not in result.stderr
    assert _without_timing(_records(out)) == reference_log


def test_a_garbled_log_line_before_the_last_is_an_error(tmp_path):
    import train_gpt2

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0}\n{"step": 1, "tra\n{"step": 2}\n')
    with pytest.raises(train_gpt2.RunError, match="line 2 is not a log record"):
        train_gpt2._truncate_log(log, 2)
    assert log.read_text() == '{"step": 0}\n{"step": 1, "tra\n{"step": 2}\n'  # left as it was


def test_kill_during_resume_start_up_loses_nothing(data_dir, tmp_path, reference_log, processes):
    """SIGKILL at random moments of a resumed run's start-up (loading the checkpoint, rewriting the
    log, before its first step), three times over: the next resume still ends with the
    uninterrupted run's log."""
    seed = int(os.environ.get("GPT_KILL_SEED", random.SystemRandom().randrange(2**32)))
    rng = random.Random(seed)
    out = tmp_path / "run"
    _interrupted_run(data_dir, out)
    for attempt in range(3):
        output = tmp_path / f"start-up{attempt}.txt"
        proc = _start(out, data_dir, output, "--resume")
        processes.append(proc)
        # A random moment between the process's start and its header (printed once the checkpoint is
        # loaded and the log rewritten), so before its first step.
        deadline = time.monotonic() + rng.uniform(0, 3.0)
        while time.monotonic() < deadline and "model: " not in output.read_text() and proc.poll() is None:
            time.sleep(0.001)
        proc.kill()
        proc.wait()
        lines = (out / "log.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines]  # every line whole: the old log or the new one
        assert steps in (list(range(8)), list(range(6))), f"GPT_KILL_SEED={seed}: {steps}"
    proc = _start(out, data_dir, tmp_path / "final.txt", "--resume")
    processes.append(proc)
    assert proc.wait(timeout=WAIT_S) == 0, (tmp_path / "final.txt").read_text()[-3000:]
    assert _without_timing(_records(out)) == reference_log, f"GPT_KILL_SEED={seed}"
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name], f"GPT_KILL_SEED={seed}"


class _FullDisk:
    """``open`` for gpt.checkpoint whose files with ``match`` in their name hit ENOSPC after 1 KiB."""

    def __init__(self, match):
        self.match = match

    def __call__(self, path, mode="r", *args, **kwargs):
        import errno

        file = open(path, mode, *args, **kwargs)
        if self.match not in str(path):
            return file
        written = [0]
        real_write = file.write

        def write(data):
            written[0] += len(data)
            if written[0] > 1024 if self.match.endswith(".pt") else True:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(data)

        file.write = write
        return file


@pytest.mark.parametrize("what", [".pt", ".json"])
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, what):
    _save(tmp_path, 2)
    monkeypatch.setattr(ckpt, "open", _FullDisk(f"ckpt_0000004{what}"), raising=False)
    with pytest.raises(ckpt.CheckpointError, match=r"could not save .*ckpt_0000004.pt: No space left on device "
                                                   r"\(the newest complete checkpoint is still ckpt_0000002.pt"):
        ckpt.save_checkpoint(tmp_path, 4, _state(4))
    monkeypatch.undo()
    path, state = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "ckpt_0000002.pt" and state["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_0000002.json", "ckpt_0000002.pt"]


def test_training_on_a_full_disk_writing_a_manifest_ends_with_one_error_line(data_dir, tmp_path):
    out = tmp_path / "run"
    result = _command(ROOT / "train_gpt2.py", *RUN, "--data", data_dir, "--out-dir", out, "--max-steps", 4,
                      fault=["enospc", ".ckpt_0000004.json.tmp-"])
    _one_error_line(result, "could not save", "ckpt_0000004.pt", "No space left on device",
                    "the newest complete checkpoint is still ckpt_0000002.pt")
    assert [p.name for p in ckpt.complete_checkpoints(out)] == ["ckpt_0000002.pt"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------------------------------
# Every expected failure of the command line: one error line, a non-zero exit


def _sys_is_unwritable() -> bool:
    try:
        (Path("/sys") / f"write-test-{os.getpid()}").write_bytes(b"")
    except OSError:
        return True
    (Path("/sys") / f"write-test-{os.getpid()}").unlink()
    return False


@pytest.mark.parametrize("case", ["a file", "under a file", "read-only folder", "sysfs"])
def test_training_refuses_an_out_dir_it_cannot_write(data_dir, tmp_path, case):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    if case == "a file":
        out, expected = a_file, "is a file, not a folder"
    elif case == "under a file":
        out, expected = a_file / "run", "is not a writable folder (Not a directory)"
    elif case == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root writes into a folder without write permission; the 'sysfs' case covers it")
        out, expected = tmp_path / "read-only", "is not a writable folder (Permission denied)"
        out.mkdir(mode=0o555)
    else:
        if not _sys_is_unwritable():
            pytest.skip("/sys is writable here")
        out, expected = Path("/sys/gpt-run"), "is not a writable folder"
    result = _command(ROOT / "train_gpt2.py", *FAST, "--max-steps", 1, "--data", data_dir, "--out-dir", out)
    _one_error_line(result, f"--out-dir {out}", expected)


@pytest.mark.parametrize("case", ["missing", "permission (injected)", "permission (chmod)"])
def test_training_refuses_data_it_cannot_read(data_dir, tmp_path, case):
    data, fault = tmp_path / "data", None
    shutil.copytree(data_dir, data)
    shard = data / "synthetic_train_000000.bin"
    if case == "missing":
        data = tmp_path / "no-such-folder"
        expected = ["no-such-folder"]
    elif case == "permission (injected)":  # as a non-root user sees a file it may not read
        fault, expected = ["eacces", shard.name], ["Permission denied", shard.name]
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads a file without read permission; the injected case covers it")
        shard.chmod(0)
        expected = ["Permission denied", shard.name]
    result = _command(ROOT / "train_gpt2.py", *FAST, "--max-steps", 1, "--data", data, "--out-dir", tmp_path / "out",
                      fault=fault)
    _one_error_line(result, *expected)


# ---------------------------------------------------------------------------------------------------
# Kill and resume in process, on a model small enough for the Triton AdamW in the interpreter, with
# dropout on: the resumed run must restore every random generator, or its losses drift.

MICRO = dict(block_size=32, vocab_size=2048, n_layer=2, n_head=2, n_embd=32)
MICRO_RUN = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--eval-batches", "1",
             "--eval-every", "3", "--warmup-steps", "2", "--sample-tokens", "1", "--sample-prompt", "a",
             "--max-steps", "6", "--checkpoint-every", "2", "--dropout", "0.2"]


class _Crash(Exception):
    """Stands for a kill: raised out of the training loop, with nothing saved on the way out."""


def _train_micro(monkeypatch, data_dir, out, kernels, *extra, crash_at_batch=None):
    import train_gpt2
    from gpt.config import GPTConfig
    from gpt.data import DataLoader

    monkeypatch.setattr(train_gpt2, "preset", lambda name, **overrides: GPTConfig(**MICRO, **overrides))
    batches = [0]

    class CrashingLoader(DataLoader):
        def next_batch(self):
            if self.split == "train":
                batches[0] += 1
                if batches[0] == crash_at_batch:
                    raise _Crash
            return super().next_batch()

    monkeypatch.setattr(train_gpt2, "DataLoader", CrashingLoader)
    with registry.use_kernels(kernels):
        return train_gpt2.main([*MICRO_RUN, "--kernels", kernels, "--data", str(data_dir), "--out-dir", str(out), *extra])


@pytest.mark.parametrize("kernels", ["none", "adamw"])
def test_kill_and_resume_with_dropout_and_either_adamw(data_dir, tmp_path, monkeypatch, capsys, kernels):
    if kernels == "adamw" and not registry.triton_runs_on("cpu"):
        pytest.skip("Triton does not run on the CPU here")
    _train_micro(monkeypatch, data_dir, tmp_path / "straight", kernels)
    optimizer_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("adamw "))
    assert optimizer_row.split()[1] == ("triton" if kernels == "adamw" else "torch"), optimizer_row
    crashed = tmp_path / "crashed"
    with pytest.raises(_Crash):  # during step 3, after the step-2 checkpoint
        _train_micro(monkeypatch, data_dir, crashed, kernels, crash_at_batch=4)
    assert [r["step"] for r in _records(crashed) if "train_loss" in r] == [0, 1, 2]
    _train_micro(monkeypatch, data_dir, crashed, kernels, "--resume")
    straight, resumed = _records(tmp_path / "straight"), _records(crashed)
    assert _without_timing(resumed) == _without_timing(straight)
    assert len({r["train_loss"] for r in straight if "train_loss" in r}) == 6
    got, want = (ckpt.load_checkpoint(ckpt.checkpoint_path(d, 6)) for d in (crashed, tmp_path / "straight"))
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name


# ---------------------------------------------------------------------------------------------------
# Sharded (--fsdp) checkpoints: a manifest written last, damaged ones passed over, nothing unpickled
# but tensors, plain types and DCP's metadata. (tests/test_distributed.py saves real ones under torchrun.)


def _sharded(out_dir: Path, step: int, extra: dict | None = None, manifest: bool = True) -> Path:
    """A folder as save_sharded_checkpoint leaves it, written by one process (no process group)."""
    import torch.distributed.checkpoint as dcp

    folder = out_dir / f"ckpt_{step:07d}.dcp"
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        dcp.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint_id=str(folder))
    ckpt.save_state_file(folder / "extra.pt", extra or {"step": step, "config": {"n_layer": 1}, "rng": {}})
    if manifest:
        ckpt.write_folder_manifest(folder, step, {"n_layer": 1})
    return folder


@pytest.mark.parametrize("damage, message", [
    ("flip", "SHA-256 .* differs from its manifest"),
    ("truncate", "damaged: .* bytes, its manifest says"),
    ("delete", "extra.pt missing, though its manifest lists them"),
    ("add", "stray not in its manifest"),
    ("manifest", "unreadable manifest"),
    ("no manifest", "no manifest manifest.json: its save did not finish"),
])
def test_sharded_checkpoints_resume_from_the_newest_complete_one(tmp_path, damage, message):
    from gpt.distributed import latest_sharded_checkpoint

    _sharded(tmp_path, 3)
    newest = _sharded(tmp_path, 6, manifest=damage != "no manifest")
    assert ckpt.verify_folder(tmp_path / "ckpt_0000003.dcp")["step"] == 3
    shard = next(newest.glob("*.distcp"))
    if damage == "flip":
        _flip_a_byte(shard)
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "delete":
        (newest / "extra.pt").unlink()
    elif damage == "add":
        (newest / "stray").write_text("")
    elif damage == "manifest":
        ckpt.folder_manifest_path(newest).write_text("{not json")
    with pytest.warns(ckpt.CheckpointWarning, match=f"resuming from ckpt_0000003.dcp, passing over .*{message}"):
        path, extra = latest_sharded_checkpoint(tmp_path)
    assert path.name == "ckpt_0000003.dcp" and extra["step"] == 3
    shutil.rmtree(tmp_path / "ckpt_0000003.dcp")
    if damage == "no manifest":  # an interrupted save: as if absent
        with pytest.warns(ckpt.CheckpointWarning, match="no complete checkpoint"):
            assert latest_sharded_checkpoint(tmp_path) is None
    else:  # damaged after it was written: refuse rather than silently start over
        with pytest.raises(ckpt.CheckpointError, match="no complete checkpoint in .* loads"):
            latest_sharded_checkpoint(tmp_path)


def test_sharded_checkpoints_never_run_code(tmp_path):
    import pickle

    from gpt.distributed import latest_sharded_checkpoint, load_sharded_model_state
    from gpt.generate import load_model

    marker = tmp_path / "created-by-the-checkpoint"
    crafted_extra = _sharded(tmp_path / "extra", 2, extra={"step": 2, "config": {}, "payload": _CreatesAFile(marker)})
    with pytest.raises(ckpt.CheckpointError, match="extra.pt: refused: it holds objects other than tensors"):
        latest_sharded_checkpoint(tmp_path / "extra")
    with pytest.raises(ckpt.CheckpointError, match="extra.pt: refused"):
        load_model(crafted_extra)

    # DCP's own .metadata is a pickle: only its metadata classes may be named in it.
    crafted_metadata = _sharded(tmp_path / "metadata", 2, manifest=False)
    with open(crafted_metadata / ".metadata", "wb") as f:
        pickle.dump(_CreatesAFile(marker), f)
    ckpt.write_folder_manifest(crafted_metadata, 2, {})
    with pytest.raises(ckpt.CheckpointError, match=r"\.metadata: refused: .* names io.open"):
        load_sharded_model_state(crafted_metadata)
    assert not marker.exists()

    # And an honest folder loads: the model weights, and the optimizer's non-tensor values.
    honest = _sharded(tmp_path / "honest", 2)
    assert set(load_sharded_model_state(honest)) == {"weight", "bias"}
