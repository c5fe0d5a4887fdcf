"""The benchmark harness: the --quick run end to end, and the counting behind every figure.

The quick run is in-process on a restricted set (two op modules, three kernels in the ablation,
one timed step) to stay within the test budget; the full --quick run is `python -m bench --quick`.
"""

import copy
import dataclasses
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import ceilings, e2e, plots, report, runner
from bench.__main__ import main
from bench.common import UNFINISHED, UNFINISHED_ERROR, BenchContext
from gpt.config import preset
from gpt_kernels import registry

# Cheap modules first: the quick run takes the first two that exist (others may still be written).
FAST_OPS = ("gelu", "cross_entropy", "adamw", "layernorm", "linear_cross_entropy", "attention")
GPT2_FLOPS_PER_TOKEN_T1024 = 6 * (124_475_904 - 1024 * 768) + 6 * 12 * 1024 * 768  # = 798,759,936


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One in-process --quick run: (exit status, its folder, its results)."""
    out = tmp_path_factory.mktemp("bench_results")
    ops = [op for op in FAST_OPS if op in runner.discover()][:2]
    argv = ["--quick", "--ops", ",".join(ops) or "none", "--kernels", "gelu,cross_entropy,adamw",
            "--warmup-steps", "1", "--steps", "1", "--out", str(out)]
    status = main(argv)
    (run_dir,) = out.iterdir()
    return status, run_dir, json.loads((run_dir / "results.json").read_text()), ops


def test_quick_run_writes_every_section(quick_run):
    status, run_dir, results, ops = quick_run
    assert set(results) >= {"schema_version", "quick", "disclaimer", "command", "environment", "ceilings", "ops",
                            "e2e", "plots"}
    assert results["quick"] is True and "not performance claims" in results["disclaimer"]
    env = results["environment"]
    for key in ("device_name", "driver", "torch", "triton", "git_commit", "date_utc"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["git_commit"]

    assert results["ceilings"]["copy_gbps"] > 0 and results["ceilings"]["matmul_tflops"]["float32"] > 0

    assert list(results["ops"]["modules"]) == ops
    for op, module in results["ops"]["modules"].items():
        assert module["status"] in ("ok", "error"), module
        rows = [row for row in results["ops"]["rows"] if row["op"] == op]
        if module["status"] == "ok":
            assert rows and module["rows"] == len(rows)
            for row in rows:
                assert {"case", "dtype", "pass", "impl", "median_ms", "p20_ms", "p80_ms"} <= set(row)
                assert row["median_ms"] > 0
                if row.get("gb_per_s") is not None:
                    assert row["fraction_of_copy_bw"] == pytest.approx(
                        row["gb_per_s"] / results["ceilings"]["copy_gbps"])

    section = results["e2e"]
    assert section["flops_per_token"] == e2e.flops_per_token(preset("tiny", **e2e.QUICK_OVERRIDES), 32)
    by_name = {row["name"]: row for row in section["rows"]}
    expected = {"eager (kernels off)", "eager + torch.compile", "kernels gelu,cross_entropy,adamw",
                "kernels gelu,cross_entropy,adamw + torch.compile", "only gelu", "only cross_entropy", "only adamw",
                "all but gelu", "all but cross_entropy", "all but adamw"}
    assert set(by_name) == expected
    for name, row in by_name.items():
        if row["compile"]:
            assert row["status"] == "skipped" and "CPU" in row["error"]
            continue
        assert row["status"] == "ok", row
        assert row["tokens_per_s"] == pytest.approx(section["tokens_per_step"] / (row["median_ms"] / 1e3))
        assert row["mfu_vs_measured_matmul"] > 0 and row["mfu_vs_datasheet"] is None
        assert row["first_step_s"] > 0 and row["warmup_s"] >= row["first_step_s"]
        # Triton runs on the CPU only in its interpreter (not on a GPU machine, where tests leave it off)
        expected_triton = set(row["kernels"].split(",")) - {"none"} if registry.triton_runs_on("cpu") else set()
        assert set(row["triton_ops"]) == expected_triton
    assert by_name["eager (kernels off)"]["speedup_vs_eager"] == 1.0
    assert status == (1 if any(m["status"] == "error" for m in results["ops"]["modules"].values()) else 0)


def test_quick_run_renders_table_and_plots(quick_run):
    _, run_dir, results, ops = quick_run
    assert "ablation.png" in results["plots"]
    ok_ops = [op for op, m in results["ops"]["modules"].items() if m["status"] == "ok"]
    assert {f"op_{op}.png" for op in ok_ops} <= set(results["plots"])
    for name in results["plots"]:
        assert (run_dir / name).read_bytes().startswith(b"\x89PNG")
    markdown = (run_dir / "results.md").read_text()
    assert "not performance claims" in markdown
    assert "| configuration | Triton kernels | tokens/s |" in markdown
    assert "![tokens/s per configuration](ablation.png)" in markdown
    for op in ops:
        assert f"### {op}" in markdown


def test_report_renders_the_chosen_run_and_refuses_quick_by_default(quick_run, tmp_path, capsys):
    _, run_dir, _, _ = quick_run
    markdown = tmp_path / "RESULTS.md"
    assert main(["report", "--results", str(run_dir.parent), "--markdown", str(markdown)]) == 2
    assert "--allow-quick" in capsys.readouterr().err
    assert main(["report", "--results", str(run_dir.parent), "--markdown", str(markdown), "--allow-quick"]) == 0
    text = markdown.read_text()
    assert "not performance claims" in text and "rendered by `python -m bench report`" in text
    links = [line[line.index("](") + 2:-1] for line in text.splitlines() if line.startswith("![")]
    assert links and all((markdown.parent / link).is_file() for link in links)


def test_python_m_bench_entry_point(tmp_path):
    """As CI calls it: a fresh process, TRITON_INTERPRET not set beforehand (bench sets it itself)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--ops", "none", "--ablation", "none",
                           "--out", str(tmp_path)], cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "not performance claims" in done.stdout
    if registry._interpreter_problem() is None:
        assert "Triton interpreter" in done.stdout  # the kernels table: the interpreter was on at import
    else:  # e.g. a GPU machine's numpy: the table says why the kernels run their references
        assert "numpy<2.4" in done.stdout
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["ops"] == {"rows": [], "modules": {}} and results["e2e"]["rows"] == []
    assert "Not run (`--ops none`)" in (run_dir / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--ops", "layernrom"], "unknown op 'layernrom'"),
    (["--quick", "--kernels", "gleu"], "unknown op 'gleu'"),
    (["--quick", "--seq-len", "64"], "exceeds the tiny model's block size 32"),
    (["--quick", "--dtype", "bfloat16", "--ops", "none"], "needs CUDA"),
])
def test_bad_options_fail_before_measuring(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------- counting


def test_gpt2_124m_flops_per_token():
    # N: 124,475,904 parameters with the padded vocabulary (50304·768 tied embedding), minus the
    # 1024·768 position embedding; attention: 6·L·T·C at L=12, T=1024, C=768.
    assert GPT2_FLOPS_PER_TOKEN_T1024 == 798_759_936
    assert e2e.flops_per_token(preset("gpt2"), 1024) == GPT2_FLOPS_PER_TOKEN_T1024


def test_throughput_and_mfu():
    # 16·1024 tokens in 50 ms = 327,680 tokens/s; times 798,759,936 FLOPs each = 261.7377 TFLOP/s.
    figures = e2e.throughput(16 * 1024, 50.0, GPT2_FLOPS_PER_TOKEN_T1024, matmul_tflops=700.0, datasheet_flops=989e12)
    assert figures["tokens_per_s"] == pytest.approx(327_680)
    assert figures["achieved_tflop_per_s"] == pytest.approx(261.73765582848, rel=1e-6)
    assert figures["mfu_vs_measured_matmul"] == pytest.approx(261.73765582848 / 700, rel=1e-6)
    assert figures["mfu_vs_datasheet"] == pytest.approx(261.73765582848 / 989, rel=1e-6)
    none = e2e.throughput(64, 1.0, 1000, matmul_tflops=None, datasheet_flops=None)
    assert none["mfu_vs_measured_matmul"] is None and none["mfu_vs_datasheet"] is None


def test_ceiling_counts():
    assert ceilings.copy_bytes(2**26, 4) == 512 * 2**20  # 256 MiB read + 256 MiB written
    assert ceilings.matmul_flops(8192, 8192, 8192) == 2 * 8192**3
    assert ceilings.matmul_flops(2, 3, 5) == 60


def test_ceilings_are_stored_on_the_context():
    ctx = BenchContext(device="cpu", quick=True)
    section = ceilings.measure_ceilings(ctx)
    assert ctx.copy_gbps == section["copy_gbps"] > 0
    assert set(ctx.matmul_tflops) == {"float32"} and ctx.matmul_tflops["float32"] > 0
    row = ctx.record(op="x", case="c", dtype=torch.float32, pass_="forward", impl="i",
                     timing=ctx.time(lambda: None), bytes_moved=1e6, flops=1e6)
    assert row["fraction_of_copy_bw"] is not None and row["fraction_of_matmul"] is not None


def _bench_module(op):
    if op not in runner.discover():
        pytest.skip(f"bench/bench_{op}.py does not exist yet")
    return importlib.import_module(f"bench.bench_{op}")


def test_gelu_bytes_at_gpt2_shape():
    bench = _bench_module("gelu")
    activation = 16384 * 3072 * 2  # (B·T, 4·C) in bf16
    assert bench.bytes_moved("forward", 16384, 3072, torch.bfloat16, False) == 2 * activation
    assert bench.bytes_moved("forward", 16384, 3072, torch.bfloat16, True) == 2 * activation + 3072 * 2
    assert bench.bytes_moved("backward", 16384, 3072, torch.bfloat16, False) == 3 * activation
    assert bench.bytes_moved("forward+backward", 16384, 3072, torch.bfloat16, False) == 5 * activation


def test_layernorm_bytes_at_gpt2_shape():
    bench = _bench_module("layernorm")
    m, params = 16384 * 768, 768 * 4
    fp32 = (torch.float32,) * 3
    assert bench.bytes_moved("forward", 16384, 768, fp32, False) == 2 * m * 4 + 2 * params
    assert bench.bytes_moved("backward", 16384, 768, fp32, False) == 3 * m * 4 + 3 * params


def test_cross_entropy_bytes_at_gpt2_shape():
    bench = _bench_module("cross_entropy")
    logits = 16384 * 50304 * 2
    assert bench.bytes_moved("forward", 16384, 50304, torch.bfloat16) == logits
    assert bench.bytes_moved("forward+backward", 16384, 50304, torch.bfloat16) == 2 * logits


def test_attention_flops_at_gpt2_shape():
    bench = _bench_module("attention")
    full = 4 * 16 * 12 * 1024 * 1024 * 64  # QKᵀ and PV: 2 matmuls of 2·T·T·D each, per (batch, head)
    assert bench.attention_flops("forward", 16, 12, 1024, 64, False) == full
    assert bench.attention_flops("forward", 16, 12, 1024, 64, True) == full / 2
    assert bench.attention_flops("backward", 16, 12, 1024, 64, False) == 2.5 * full
    assert bench.attention_flops("forward+backward", 16, 12, 1024, 64, True) == 3.5 * full / 2


def test_adamw_bytes_for_gpt2():
    bench = _bench_module("adamw")
    n = 124_475_904
    assert bench.bytes_moved(n, torch.float32, clip=False) == 28 * n  # p, g, m, v read; p, m, v written
    assert bench.bytes_moved(n, torch.float32, clip=True) == 32 * n  # plus one read of g for the norm


# ---------------------------------------------------------------------------------- the pieces


def test_ablation_configurations():
    configs = e2e.ablation(e2e.TRAINING_OPS, "full")
    names = [c.name for c in configs]
    assert names[:4] == ["eager (kernels off)", "eager + torch.compile", "all kernels", "all kernels + torch.compile"]
    assert len(configs) == 4 + 2 * len(e2e.TRAINING_OPS)
    assert "decode_attention" not in e2e.TRAINING_OPS
    by_name = {c.name: c for c in configs}
    assert by_name["only gelu"].spec == "gelu"
    assert by_name["all but gelu"].spec == \
        "layernorm,attention,cross_entropy,linear_cross_entropy,adamw,rmsnorm,rope,swiglu"
    assert by_name["eager + torch.compile"].spec == "none" and by_name["eager + torch.compile"].compile
    assert [c.name for c in e2e.ablation(e2e.TRAINING_OPS, "baselines")] == names[:4]
    # One kernel: 'only gelu' is the kernels-on row and 'all but gelu' is eager, so neither repeats.
    assert [c.spec for c in e2e.ablation(("gelu",), "full")] == ["none", "none", "gelu", "gelu"]
    assert e2e.ablation(e2e.TRAINING_OPS, "none") == []
    with pytest.raises(ValueError, match="--ablation"):
        e2e.ablation(e2e.TRAINING_OPS, "some")


def test_select_ops():
    available = {"gelu": "bench.bench_gelu", "attention": "bench.bench_attention", "extra": "bench.bench_extra"}
    everything = runner.select("all", available)
    assert list(everything)[-1] == "extra" and everything["layernorm"] is None  # no module: reported missing
    assert runner.select("none", available) == {}
    assert runner.select("gelu,attention", available) == {"attention": "bench.bench_attention",
                                                          "gelu": "bench.bench_gelu"}
    assert "gelu" not in runner.select("all,-gelu", available)
    with pytest.raises(ValueError, match="unknown op 'flash'"):
        runner.select("flash", available)


def test_discover_finds_the_op_modules():
    found = runner.discover()
    assert all(name == f"bench.bench_{op}" for op, name in found.items())
    assert "common" not in found


def test_missing_and_failing_modules_are_recorded_not_fatal(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_bench_boom.py").write_text(
        "def run(ctx):\n    print('about to fail')\n    raise RuntimeError('kaboom')\n")
    (tmp_path / "fake_bench_fine.py").write_text(
        "def run(ctx):\n    return [{'op': 'fine', 'case': 'c', 'dtype': 'float32', 'pass': 'forward',"
        " 'impl': 'eager', 'median_ms': 1.0, 'p20_ms': 1.0, 'p80_ms': 1.0}]\n")
    (tmp_path / "fake_bench_wrong.py").write_text("def run(ctx):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ctx = BenchContext(device="cpu", quick=True)
    section = runner.run_op_benchmarks(ctx, {"boom": "fake_bench_boom", "gone": None, "absent": "fake_bench_absent",
                                             "wrong": "fake_bench_wrong", "fine": "fake_bench_fine"})
    modules = section["modules"]
    assert modules["boom"]["status"] == "error" and modules["boom"]["error"] == "RuntimeError: kaboom"
    assert "raise RuntimeError('kaboom')" in modules["boom"]["traceback"]
    assert modules["boom"]["notes"] == ["about to fail"]
    assert modules["gone"]["status"] == "missing" and "bench/bench_gone.py" in modules["gone"]["error"]
    assert modules["absent"]["status"] == "error" and "ModuleNotFoundError" in modules["absent"]["error"]
    assert modules["wrong"]["status"] == "error" and "list of row dicts" in modules["wrong"]["error"]
    assert modules["fine"]["status"] == "ok" and [r["op"] for r in section["rows"]] == ["fine"]
    assert "about to fail" in capsys.readouterr().out


def test_jsonable():
    value = {"a": math.nan, "b": [1.0, math.inf], "c": torch.float32, "d": (1, "x"), 2: None}
    assert report.jsonable(value) == {"a": None, "b": [1.0, None], "c": "torch.float32", "d": [1, "x"], "2": None}


def _gpu_like_results() -> dict:
    """What a GPU run's results look like, to render the paths a CPU run never takes."""
    row = dict(case="(16384, 768)", dtype="bfloat16", p20_ms=0.09, p80_ms=0.11, peak_memory_mb=48.0)
    ops_rows = [
        {**row, "op": "layernorm", "pass": "forward", "impl": impl, "median_ms": ms, "gb_per_s": gbps,
         "fraction_of_copy_bw": gbps / 3000, "speedup_vs_eager": 0.1 / ms}
        for impl, ms, gbps in (("eager", 0.1, 500.0), ("triton", 0.02, 2500.0))
    ] + [
        BenchContext(device="cuda", quick=False).failure(
            op="layernorm", case="(16384, 768)", dtype="bfloat16", pass_="forward", impl="torch.compile",
            exc=RuntimeError("inductor: lowering failed")),
    ] + [
        {**row, "op": "attention", "case": "B16 H12 T1024 D64 causal", "pass": "forward", "impl": "triton",
         "median_ms": 1.0, "tflop_per_s": 400.0, "fraction_of_matmul": 0.6},
    ]
    settings = dataclasses.asdict(e2e.E2ESettings())
    e2e_rows = [
        dict(name="eager + torch.compile", kernels="none", compile=True, status="ok", median_ms=40.0, p20_ms=39.0,
             p80_ms=41.0, tokens_per_s=409_600.0, peak_memory_mb=30_000.0, notes=[]),
        dict(name="all kernels", kernels=e2e.settings_spec(settings), compile=False, status="ok", median_ms=28.0,
             p20_ms=27.5, p80_ms=28.5, tokens_per_s=585_142.9, peak_memory_mb=20_000.0, notes=[]),
        dict(name="only gelu", kernels="gelu", compile=False, status="error", error="OutOfMemoryError: ..."),
    ]
    e2e.add_speedups(e2e_rows)
    section = {"settings": settings, "model": {"preset": "gpt2", "toy_overrides": None, "config": {},
                                               "parameters": 124_475_904},
               "tokens_per_step": 16384, "flops_per_token": GPT2_FLOPS_PER_TOKEN_T1024,
               "flops_formula": e2e.FLOPS_FORMULA, "matmul_ceiling_dtype": "bfloat16", "datasheet_peak_tflops": 989.0,
               "method": "m", "rows": e2e_rows}
    section["headline"] = e2e.headline(section, "cuda")
    return {"schema_version": 1, "quick": False, "disclaimer": None, "command": "python -m bench",
            "environment": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "driver": "550.54",
                            "cuda": "12.4", "torch": "2.11", "triton": "3.6.0", "git_commit": "abc",
                            "git_dirty": False, "date_utc": "2030-01-01T00:00:00+00:00"},
            "ceilings": {"copy_gbps": 3000.0, "matmul_tflops": {"bfloat16": 700.0}, "method": "m"},
            "ops": {"rows": ops_rows, "modules": {"layernorm": {"status": "ok", "rows": 3, "seconds": 1.0},
                                                  "attention": {"status": "ok", "rows": 1, "seconds": 1.0},
                                                  "decode_attention": {"status": "missing", "error": "no module"}}},
            "e2e": section}


def test_headline_checks_the_targets_on_the_target_configuration():
    headline = _gpu_like_results()["e2e"]["headline"]
    assert headline["target_configuration"] is True
    assert headline["best"]["name"] == "all kernels"
    assert headline["targets"]["tokens_per_s_met"] is True  # 585K >= 560K
    assert headline["targets"]["speedup_vs_compile_met"] is True  # 40 / 28 = 1.43 >= 1.3
    assert headline["all_kernels"]["speedup_vs_compile"] == pytest.approx(40 / 28)


def test_gpu_results_render_with_rooflines_and_targets(tmp_path):
    results = _gpu_like_results()
    run_dir = report.write_run(results, tmp_path)
    assert run_dir.name == "20300101T000000Z-nvidia-h100-80gb-hbm3"
    assert set(results["plots"]) == {"op_layernorm.png", "op_attention.png", "ablation.png"}
    markdown = (run_dir / "results.md").read_text()
    assert "not performance claims" not in markdown
    assert "Targets: ≥ 560,000 tokens/s with all kernels on: 585,143 (met)" in markdown
    assert "≥ 1.3x eager + torch.compile: 1.429x (met)" in markdown
    assert "error: OutOfMemoryError" in markdown
    assert "**missing**: no module" in markdown
    assert "| GB/s | of copy BW | peak MiB | speedup_vs_eager | error |" in markdown
    assert "| forward | torch.compile | – | – | – | – | – | RuntimeError: inductor: lowering failed |" in markdown
    # "latest" is by date, and skips --quick runs unless asked for them.
    quick = {**_gpu_like_results(), "quick": True}
    quick["environment"]["date_utc"] = "2031-01-01T00:00:00+00:00"
    quick_dir = report.write_run(quick, tmp_path / "quick")
    assert report.find_results(tmp_path) == run_dir / "results.json"
    assert report.find_results(tmp_path, allow_quick=True) == quick_dir / "results.json"


def test_plot_roofline_lines(tmp_path, monkeypatch):
    drawn = []
    original = plots.plt.Axes.axhline

    def record(ax, y, *args, **kwargs):
        drawn.append((y, kwargs.get("label")))
        return original(ax, y, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "axhline", record)
    results = _gpu_like_results()
    plots.plot_op("layernorm", results["ops"]["rows"][:3], results["ceilings"], tmp_path / "ln.png")
    plots.plot_op("attention", results["ops"]["rows"][3:], results["ceilings"], tmp_path / "attn.png")
    assert drawn == [(3000.0, "roofline: copy 3,000 GB/s"), (700.0, "roofline: bfloat16 matmul 700 TFLOP/s")]
    assert Path(tmp_path / "attn.png").read_bytes().startswith(b"\x89PNG")


def test_partial_runs_merge_into_one_report(tmp_path):
    """A GPU session may run the op benchmarks and the ablation separately: report merges them."""
    ops_only = _gpu_like_results()
    ops_only["e2e"] = {**ops_only["e2e"], "rows": []}
    e2e_only = _gpu_like_results()
    e2e_only["ops"] = {"rows": [r for r in e2e_only["ops"]["rows"] if r["op"] == "attention"],
                       "modules": {"attention": {"status": "error", "error": "RuntimeError: later failure"}}}
    e2e_only["environment"]["date_utc"] = "2030-01-02T00:00:00+00:00"
    first, second = report.write_run(ops_only, tmp_path), report.write_run(e2e_only, tmp_path)
    markdown = tmp_path / "RESULTS.md"
    assert main(["report", "--results", str(first), "--results", str(second), "--markdown", str(markdown)]) == 0

    merged_file = report.find_results(tmp_path)
    assert merged_file.parent.name == "20300102T000000Z-nvidia-h100-80gb-hbm3-merged"
    merged = report.read_results(merged_file)
    assert merged["merged_from"] == ["2030-01-01T00:00:00+00:00", "2030-01-02T00:00:00+00:00"]
    assert merged["ops"]["modules"]["attention"]["status"] == "error"  # the later run wins
    assert merged["ops"]["modules"]["layernorm"]["status"] == "ok"
    assert [r["op"] for r in merged["ops"]["rows"]] == ["layernorm"] * 3 + ["attention"]
    assert len(merged["e2e"]["rows"]) == 3  # from the run that has them
    assert "merged from the runs of" in markdown.read_text()
    elsewhere = tmp_path / "elsewhere"  # e.g. when the parts lie in a read-only folder
    assert main(["report", "--results", str(first), "--results", str(second), "--markdown", str(markdown),
                 "--out", str(elsewhere)]) == 0
    assert [path.name for path in elsewhere.iterdir()] == [merged_file.parent.name]

    other = _gpu_like_results()
    other["environment"]["device_name"] = "NVIDIA H200"
    with pytest.raises(ValueError, match="different devices"):
        report.merge_results([ops_only, other])


def test_partial_end_to_end_runs_merge_per_configuration():
    """``--ablation baselines`` and ``--ablation each`` of the same step complete each other; a
    configuration a killed part left unfinished does not replace a finished one."""
    baselines = _gpu_like_results()
    baselines["e2e"]["settings"]["ablation"] = "baselines"
    each = _gpu_like_results()
    each["environment"]["date_utc"] = "2030-01-02T00:00:00+00:00"
    each["e2e"]["settings"]["ablation"] = "each"
    each["e2e"]["rows"] = [
        dict(name="only gelu", kernels="gelu", compile=False, status="ok", median_ms=35.0, p20_ms=35.0,
             p80_ms=35.0, tokens_per_s=468_114.3, peak_memory_mb=29_000.0, notes=[]),
        dict(name="all kernels", kernels=baselines["e2e"]["rows"][1]["kernels"], compile=False,
             status=UNFINISHED, error=UNFINISHED_ERROR),
    ]
    merged = report.merge_results([each, baselines])["e2e"]
    by_name = {row["name"]: row for row in merged["rows"]}
    assert [row["name"] for row in merged["rows"]] == ["eager + torch.compile", "all kernels", "only gelu"]
    assert by_name["all kernels"]["status"] == "ok"  # the unfinished rerun did not replace it
    assert by_name["only gelu"]["speedup_vs_compile"] == pytest.approx(40 / 35)
    assert merged["headline"]["targets"]["tokens_per_s_met"] is True

    other_step = copy.deepcopy(each)
    other_step["e2e"]["settings"]["batch_size"] = 8
    rows = report.merge_results([baselines, other_step])["e2e"]["rows"]
    assert [row["name"] for row in rows] == ["only gelu", "all kernels"]  # another step: the latest wins


def test_a_killed_run_keeps_what_it_finished(tmp_path, monkeypatch):
    """The results are saved after every module: a run stopped mid-way (here interrupted; a time limit
    kills it the same way) leaves a results.json that report renders and merges."""
    (tmp_path / "fake_bench_fine.py").write_text(
        "def run(ctx):\n    return [{'op': 'fine', 'case': 'c', 'dtype': 'float32', 'pass': 'forward',"
        " 'impl': 'eager', 'median_ms': 1.0, 'p20_ms': 1.0, 'p80_ms': 1.0}]\n")
    (tmp_path / "fake_bench_stop.py").write_text(  # killed after its first row
        "from bench.common import Timing\n"
        "def run(ctx):\n    ctx.record(op='stop', case='c', dtype='float32', pass_='forward', impl='eager',"
        " timing=Timing(2.0, 2.0, 2.0))\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(runner, "discover", lambda: {"fine": "fake_bench_fine", "stop": "fake_bench_stop"})
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        main(["--quick", "--ops", "fine,stop", "--ablation", "none", "--out", str(out)])
    (run_dir,) = out.iterdir()
    partial = report.read_results(run_dir / "results.json")
    assert partial["complete"] is False and partial["ceilings"]["copy_gbps"] > 0
    assert partial["ops"]["modules"]["fine"]["status"] == "ok"
    assert partial["ops"]["modules"]["stop"]["status"] == UNFINISHED
    assert [(row["op"], row["median_ms"]) for row in partial["ops"]["rows"]] == [("fine", 1.0), ("stop", 2.0)]

    markdown = tmp_path / "RESULTS.md"
    assert main(["report", "--results", str(run_dir), "--markdown", str(markdown), "--allow-quick"]) == 0
    text = markdown.read_text()
    assert "This run stopped before its end" in text and "**unfinished**" in text and "### fine" in text
    assert "Not reached: the run stopped first." in text  # the end-to-end section it never began

    # A later part that was itself killed while rerunning "fine" does not lose the finished figures.
    later = copy.deepcopy(partial)
    later["environment"]["date_utc"] = "2099-01-01T00:00:00+00:00"
    later["ops"] = {"rows": [], "modules": {"fine": {"status": UNFINISHED, "error": UNFINISHED_ERROR}}}
    merged = report.merge_results([partial, later])
    assert merged["ops"]["modules"]["fine"]["status"] == "ok"
    assert [row["op"] for row in merged["ops"]["rows"]] == ["fine", "stop"]
    assert [part["complete"] for part in merged["merged_parts"]] == [False, False]


def test_gpu_timing_asks_do_bench_for_the_median(monkeypatch):
    """The GPU path of BenchContext.time never runs on CPU CI: check its call binds to the installed
    triton.testing.do_bench and asks for the median (do_bench's default is the mean)."""
    import inspect

    import triton.testing

    signature = inspect.signature(triton.testing.do_bench)
    calls = []

    def fake_do_bench(*args, **kwargs):
        calls.append(signature.bind(*args, **kwargs).arguments)
        return [2.0, 1.5, 2.5]

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    timing = BenchContext(device="cuda", quick=False).time(lambda: None)
    assert (timing.median_ms, timing.p20_ms, timing.p80_ms) == (2.0, 1.5, 2.5)
    (arguments,) = calls
    assert arguments["return_mode"] == "median" and arguments["quantiles"] == [0.5, 0.2, 0.8]
    assert arguments["warmup"] > 0 and arguments["rep"] > 0


def test_each_ablation_and_the_warm_up_time():
    configs = e2e.ablation(("gelu", "attention", "adamw"), "each")
    assert [c.name for c in configs] == ["only gelu", "only attention", "only adamw", "all but gelu",
                                         "all but attention", "all but adamw"]
    assert BenchContext(device="cpu", quick=True).warm_up(lambda: sum(range(1000))) > 0


def test_a_failing_configuration_is_recorded_and_the_ablation_goes_on(monkeypatch):
    """run_e2e as on a GPU (where torch.compile is not skipped), with the step faked: a configuration
    whose compilation fails is a row with its error and traceback, and the others still run."""
    def fake_measure(config, settings, gpt_config, device):
        if config.compile and config.kernels:
            raise RuntimeError("inductor: lowering failed")
        return {"first_step_s": 1.0, "warmup_s": 1.0, "step_ms": [10.0], "median_ms": 10.0, "p20_ms": 10.0,
                "p80_ms": 10.0, "peak_memory_mb": 1.0, "triton_ops": sorted(config.kernels), "notes": []}

    monkeypatch.setattr(e2e, "measure", fake_measure)
    saved = []
    settings = e2e.settings_for(True, kernels="gelu,adamw", ablation="baselines")
    section = e2e.run_e2e(settings, "cuda", True, {"tfloat32": 100.0},
                          on_progress=lambda s: saved.append([row["status"] for row in s["rows"]]))
    by_name = {row["name"]: row for row in section["rows"]}
    failed = by_name["kernels gelu,adamw + torch.compile"]
    assert failed["status"] == "error" and failed["error"] == "RuntimeError: inductor: lowering failed"
    assert "fake_measure" in failed["traceback"]
    assert by_name["eager + torch.compile"]["status"] == "ok" and section["matmul_ceiling_dtype"] == "tfloat32"
    assert by_name["kernels gelu,adamw"]["mfu_vs_measured_matmul"] > 0
    assert saved == [[UNFINISHED], ["ok", UNFINISHED], ["ok", "ok", UNFINISHED], ["ok", "ok", "ok", UNFINISHED]]


def test_attempt_turns_an_exception_into_a_failure_row_but_not_an_interrupt():
    ctx = BenchContext(device="cpu", quick=True)
    key = dict(op="x", case="c", dtype=torch.bfloat16, pass_="forward", impl="i")
    rows = []
    measured = ctx.attempt(rows, lambda: ctx.measure(lambda: sum(range(1000))), **key)
    assert rows == [] and measured.first_call_s > 0 and measured.timing.median_ms > 0
    assert measured.peak_memory_mb is None  # no device memory to measure on the CPU

    def compile_fails():
        raise RuntimeError("inductor: lowering failed")

    assert ctx.attempt(rows, lambda: ctx.measure(compile_fails), **key) is None
    assert rows == [{"op": "x", "case": "c", "dtype": "bfloat16", "pass": "forward", "impl": "i", "median_ms": None,
                     "p20_ms": None, "p80_ms": None, "peak_memory_mb": None,
                     "error": "RuntimeError: inductor: lowering failed"}]

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ctx.attempt(rows, interrupted, **key)
    assert len(rows) == 1


def _fail_first_call(monkeypatch, bench, message: str, fails) -> None:
    """Make the bench module's steps for which ``fails(case, pass_, fn)`` raise ``message`` at their first call."""
    original_cases = bench.cases

    def cases(ctx):
        for case in original_cases(ctx):
            def step(pass_, fn, case=case, original=case.step):
                if fails(case, pass_, fn):
                    def first_call_fails():
                        raise RuntimeError(message)
                    return first_call_fails
                return original(pass_, fn)
            yield dataclasses.replace(case, step=step)

    monkeypatch.setattr(bench, "cases", cases)


def test_a_failing_implementation_costs_its_row_not_the_op(monkeypatch):
    """As torch.compile failing on one case on the GPU: the quick GELU run with eager's backward on the
    bias case raising at its first call. That row records the error; every other row is measured, with
    its first call's time, and the triton row beside it has no eager baseline to compare with."""
    bench = _bench_module("gelu")
    _fail_first_call(monkeypatch, bench, "inductor: lowering failed",
                     lambda case, pass_, fn: pass_ == "backward" and fn is bench.eager_gelu and "+bias" in case.name)
    rows, status = runner.run_module(BenchContext(device="cpu", quick=True), "gelu", "bench.bench_gelu")
    impls = 2 if registry.triton_runs_on("cpu") else 1  # eager, and triton where it runs on the CPU
    assert status["status"] == "ok" and status["rows"] == len(rows) == 2 * 3 * impls  # cases x passes x impls
    (failed,) = [row for row in rows if "error" in row]
    assert (failed["case"], failed["pass"], failed["impl"]) == ("(64, 384) +bias", "backward", "eager")
    assert failed["error"] == "RuntimeError: inductor: lowering failed" and failed["median_ms"] is None
    assert any("inductor: lowering failed" in note for note in status["notes"])
    for row in rows:
        if row is failed:
            continue
        assert row["median_ms"] > 0 and row["first_call_s"] > 0 and row["gb_per_s"] > 0
        beside_failed = (row["case"], row["pass"]) == (failed["case"], failed["pass"])
        assert (row["speedup_vs_eager"] is None) == beside_failed, row
    table = report._op_table(rows)
    assert "| first_call_s |" in table and "RuntimeError: inductor: lowering failed |" in table


@pytest.mark.parametrize("failing_impl, exit_code", [("eager", 0), ("triton", 1)])
def test_only_our_own_kernel_failing_fails_the_run(monkeypatch, tmp_path, failing_impl, exit_code):
    """A baseline that fails (torch.compile on the GPU, say) is recorded and the run is fine; a
    Triton kernel of ours that fails makes the run's exit status 1."""
    if failing_impl == "triton" and not registry.triton_runs_on("cpu"):
        pytest.skip("Triton does not run on the CPU here (no interpreter), so the quick run has no triton row")
    bench = _bench_module("gelu")
    failing_fn = bench.eager_gelu if failing_impl == "eager" else bench.gelu
    _fail_first_call(monkeypatch, bench, "kernel failed", lambda case, pass_, fn: fn is failing_fn and pass_ == "forward")
    assert main(["--quick", "--ops", "gelu", "--ablation", "none", "--out", str(tmp_path)]) == exit_code
