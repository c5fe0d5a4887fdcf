"""`python -m bench smoke` (make gpu-check): its plumbing on the CPU, at toy sizes in Triton's interpreter.

What a GPU window relies on: every step runs and saves as it goes, a tiny budget skips steps and still
writes valid files, a kill keeps the rows saved so far, the output folder stays within 8 files, and the
compiled-kernel tarball unpacks into a cache Triton reads, somewhere else.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from bench import correctness, report, smoke
from bench.__main__ import main as bench_main
from bench.correctness import checks
from hopper import ROOT

QUICK = ["--quick", "--ops", "gelu", "--kernels", "gelu"]


def start_smoke(out: Path, *options: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(out.parent / "triton-cache")}
    return subprocess.Popen([sys.executable, "-m", "bench", "smoke", "--out", str(out), *QUICK, *options],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_within_file_limit(out: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert all((out / name).is_file() for name in names), names
    assert len(names) <= smoke.MAX_FILES and set(names) <= set(smoke.OUTPUT_FILES), names


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    """One --quick check end to end (the tail's ablation and sweeps left out: they reuse steps 5 and 6)."""
    out = tmp_path_factory.mktemp("check") / "out"
    proc = start_smoke(out, "--budget", "300", "--skip", "ablation_each,sweeps")
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, out, json.loads((out / smoke.RESULTS_JSON).read_text()), output


def test_quick_check_runs_every_step_in_order(quick_check):
    status, out, results, output = quick_check
    assert status == 0, output[-3000:]
    steps = {step["name"]: step for step in results["smoke"]["steps"]}
    assert list(steps) == list(smoke.STEP_NAMES)
    for name in ("environment", "precompile", "ceilings", "correctness", "headline", "e2e", "e2e_compiled",
                 "compile_columns"):
        assert steps[name]["status"] == "ok", steps[name]
        assert steps[name]["seconds"] >= 0 and steps[name]["estimate_s"] > 0
    assert steps["tests"]["status"] == steps["autotune"]["status"] == "skipped: needs a GPU"
    assert steps["ablation_each"]["status"] == steps["sweeps"]["status"] == "skipped: --skip"
    assert results["complete"] is True and results["quick"] is True
    env = results["environment"]
    assert len(env["triton_cache_key_sha256"]) == 64 and env["git_commit"] and env["ptxas"]
    assert [job["status"] for job in results["smoke"]["precompile"]["jobs"]] == ["ok", "ok"]


def test_quick_check_compares_every_op_and_gradient(quick_check):
    _, _, results, _ = quick_check
    rows = results["smoke"]["correctness"]
    assert {row["case"] for row in rows} == {check.name for check in checks(quick=True)}
    assert all(row["passed"] and row["relative_error"] <= row["tolerance"] for row in rows), rows
    quantities = {(row["op"], row["quantity"]) for row in rows}
    assert {("layernorm", "dresidual"), ("attention", "dk"), ("gelu", "dbias"), ("cross_entropy", "dlogits"),
            ("linear_cross_entropy", "dweight"), ("adamw", "exp_avg_sq1"), ("decode_attention", "dv")} <= quantities
    assert results["ops"]["rows"] and results["ops"]["modules"]["gelu"]["status"] == "ok"
    assert [row["status"] for row in results["e2e"]["rows"]] == ["ok", "ok", "skipped", "skipped"]


def test_quick_check_stays_within_eight_files_and_renders(quick_check, tmp_path, capsys):
    _, out, results, _ = quick_check
    assert_within_file_limit(out)
    assert results["plots"] == [smoke.SHEET] and (out / smoke.SHEET).stat().st_size > 0
    assert "## GPU check" in (out / smoke.RESULTS_MD).read_text()
    markdown = tmp_path / "RESULTS.md"
    assert bench_main(["report", "--results", str(out), "--allow-quick", "--markdown", str(markdown)]) == 0
    text = markdown.read_text()
    assert "### Native correctness" in text and "skipped: needs a GPU" in text and "plots.png" in text
    assert_within_file_limit(out)  # report re-renders nothing into the check's folder


def test_tiny_budget_skips_every_step_and_still_writes_valid_files(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "no-cache"))
    out = tmp_path / "out"
    assert bench_main(["smoke", "--budget", "1", "--out", str(out), *QUICK]) == 0
    results = json.loads((out / smoke.RESULTS_JSON).read_text())
    statuses = {step["name"]: step["status"] for step in results["smoke"]["steps"]}
    assert statuses["tests"] == statuses["autotune"] == "skipped: needs a GPU"
    assert {status for name, status in statuses.items() if name not in ("tests", "autotune")} == {"skipped: budget"}
    assert results["complete"] is True and results["smoke"]["correctness"] == []
    assert "Not reached." in (out / smoke.RESULTS_MD).read_text()
    assert_within_file_limit(out)


def test_a_kill_keeps_the_rows_saved_so_far(tmp_path):
    out = tmp_path / "out"
    proc = start_smoke(out, "--budget", "300", "--skip", "precompile")
    results_file = out / smoke.RESULTS_JSON
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results_file.is_file() and json.loads(results_file.read_text())["smoke"]["correctness"]:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        os.kill(proc.pid, signal.SIGKILL)  # no chance to finish: what is on disk is all there is
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    results = json.loads(results_file.read_text())
    assert results["complete"] is False and results["smoke"]["correctness"]
    assert results["smoke"]["steps"][-1]["status"] in ("unfinished", "ok")
    assert "stopped before its end" in report.render_markdown(results)
    assert_within_file_limit(out)


def test_out_folder_with_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert bench_main(["smoke", "--out", str(tmp_path), *QUICK]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out") and "notes.txt" in err and len(err.splitlines()) == 1
    assert bench_main(["smoke", "--out", str(tmp_path / "new"), "--budget", "0", *QUICK]) == 2
    assert bench_main(["smoke", "--out", str(tmp_path / "new"), "--skip", "nosuchstep", *QUICK]) == 2


# Compiles one kernel for sm_90 with Triton's bundled ptxas (no GPU needed) through its cache, and
# says which files the compiled kernel came with: a cache hit loads only what the cache holds.
COMPILE = r"""
import importlib, json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
gelu = importlib.import_module("gpt_kernels.gelu")
fn = gelu._gelu_forward_kernel
names = fn.arg_names
pointers = {"x_ptr": "*bf16", "bias_ptr": "*fp32", "y_ptr": "*bf16"}
constexprs = dict(HAS_BIAS=True, BLOCK_M=8, BLOCK_N=256)
signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in names}
source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
print(json.dumps(sorted(kernel.asm)))
"""


def compile_in(cache_dir: Path) -> list[str]:
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, "-c", COMPILE], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernel_cache_tarball_holds_binaries_and_unpacks_elsewhere(tmp_path):
    first, second = tmp_path / "first" / "cache", tmp_path / "second" / "cache"
    assert "ptx" in compile_in(first)  # compiled: every stage's output is in hand
    tar_path = tmp_path / smoke.CACHE_TAR
    packed = smoke.pack_triton_cache(first, tar_path)
    assert packed["folders"] >= 1 and packed["left_out"] == 0
    with tarfile.open(tar_path) as tar:
        members = tar.getnames()
    assert any(name.endswith(".cubin") for name in members)
    assert not any(name.endswith((".ptx", ".ttir", ".ttgir", ".llir", ".source")) for name in members), members

    assert smoke.unpack_triton_cache(tar_path, second) == len(members)
    for group in second.glob(f"*/{smoke.GROUP_PREFIX}*.json"):
        for path in json.loads(group.read_text())["child_paths"].values():
            assert Path(path).parent == group.parent and Path(path).is_file()
    files_before = sorted(p for p in second.rglob("*") if p.is_file())
    assert compile_in(second) == ["cubin"]  # found in the unpacked cache: nothing was compiled
    assert sorted(p for p in second.rglob("*") if p.is_file()) == files_before


def test_unpacking_refuses_members_outside_the_cache(tmp_path):
    evil = tmp_path / "evil.tar.gz"
    (tmp_path / "x.cubin").write_bytes(b"\0")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(tmp_path / "x.cubin", arcname="../x.cubin")
    with pytest.raises(ValueError, match="unexpected member"):
        smoke.unpack_triton_cache(evil, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_junit_summary(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_gelu" name="test_a"/>'
        '<testcase classname="tests.test_gelu" name="test_b"><failure message="relative error 1e-1 &gt; 3e-2"/>'
        '</testcase><testcase classname="tests.test_gelu" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    summary = smoke.parse_junit(junit)
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["failures"] == [{"test": "tests.test_gelu::test_b", "kind": "failure",
                                    "message": "relative error 1e-1 > 3e-2"}]


def test_correctness_rows_catch_an_unwritten_element_and_a_wrong_value(monkeypatch):
    real = correctness.gelu

    def skips_first_row(x, bias):
        y = torch.empty_like(x)  # poisoned by the check: the row left unwritten stays NaN
        y[1:] = real(x, bias)[1:]
        return y

    check = correctness.find_check("gelu float32", quick=True)
    monkeypatch.setattr(correctness, "gelu", skips_first_row)
    rows = {row["quantity"]: row for row in correctness.run_check(check, quick=True, device="cpu")}
    assert not rows["y"]["passed"] and rows["y"]["non_finite"] > 0

    monkeypatch.setattr(correctness, "gelu", lambda x, bias: real(x, bias) * (1 + 1e-4))
    rows = {row["quantity"]: row for row in correctness.run_check(check, quick=True, device="cpu")}
    assert not rows["y"]["passed"] and rows["y"]["relative_error"] > rows["y"]["tolerance"]

    monkeypatch.setattr(correctness, "gelu", lambda x, bias: 1 / 0)
    (row,) = correctness.run_check(check, quick=True, device="cpu")
    assert not row["passed"] and row["error"].startswith("ZeroDivisionError")


def test_a_step_past_its_limit_is_stopped_and_the_next_runs_in_a_fresh_worker(tmp_path, monkeypatch, capsys):
    steps = {step.name: step for step in smoke.STEPS}
    monkeypatch.setattr(smoke, "STEPS", (
        steps["environment"],
        dataclasses.replace(steps["correctness"], limit_s=0.2, quick_estimate_s=0.1),  # takes seconds here
        steps["ceilings"],
    ))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "no-cache"))
    out = tmp_path / "out"
    assert bench_main(["smoke", "--budget", "120", "--out", str(out), *QUICK]) == 1
    results = json.loads((out / smoke.RESULTS_JSON).read_text())
    statuses = [(step["name"], step["status"]) for step in results["smoke"]["steps"]]
    assert statuses == [("environment", "ok"), ("correctness", "timeout"), ("ceilings", "ok")]
    assert results["ceilings"]["copy_gbps"] > 0 and results["complete"] is True
