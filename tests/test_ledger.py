"""The step ledger (bench/ledger.py): its counts against a count by hand, CUDA autocast's casts, and
the GPT-2 step's ledger on a tiny config (fake tensors: seconds, nothing allocated)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from bench import ledger
from gpt.config import preset

BF16, F32 = 2, 4


def _tiny_step():
    """x (4, 8) @ w (16, 8)ᵀ under bf16 autocast, a LayerNorm (fp32 under autocast) with a bias, then
    sum(y²): every op's bytes are easy to count by hand."""
    w = torch.nn.Parameter(torch.zeros(16, 8))
    b = torch.nn.Parameter(torch.zeros(16))
    x = torch.zeros(4, 8)

    def step():
        h = F.linear(x, w)
        y = F.layer_norm(h, (16,), None, b)
        return y.square().sum()

    return step, [w, b]


def test_tiny_step_matches_a_count_by_hand():
    with ledger.fake_mode():
        step, params = _tiny_step()
        ops = ledger.record_micro_step(step, params, torch.bfloat16, grad_accum=2)
    x, w, h = 4 * 8, 16 * 8, 4 * 16  # elements
    expected = [  # (op, bytes read, bytes written, FLOPs)
        ("aten._to_copy", x * F32, x * BF16, 0),              # autocast: x to bf16
        ("aten._to_copy", w * F32, w * BF16, 0),              # autocast: w to bf16 (the leaf's cached cast)
        ("aten.mm", (x + w) * BF16, h * BF16, 2 * 4 * 8 * 16),
        ("aten._to_copy", h * BF16, h * F32, 0),              # layer_norm is an fp32 op under autocast
        ("aten.native_layer_norm", h * F32 + 16 * F32, h * F32 + 2 * 4 * F32, 0),  # y, mean, rstd
        ("aten.pow", h * F32, h * F32, 0),
        ("aten.sum", h * F32, F32, 0),
        # backward: loss / grad_accum, its gradient seeded with ones, then back through each op
        ("aten.div", F32, F32, 0),
        ("aten.ones_like", 0, F32, 0),
        ("aten.div", F32, F32, 0),
        ("aten.pow", h * F32, h * F32, 0),                    # d(y²) = 2y: y¹
        ("aten.mul", h * F32, h * F32, 0),                    # 2·y
        ("aten.mul", h * F32 + F32, h * F32, 0),              # times the broadcast (stride 0) upstream scalar
        ("aten.native_layer_norm_backward", 2 * h * F32 + 2 * 4 * F32 + 16 * F32, h * F32 + 16 * F32, 0),
        ("aten.add_", 2 * 16 * F32, 16 * F32, 0),             # b.grad += db, written once
        ("aten._to_copy", h * F32, h * BF16, 0),              # the cast's backward
        ("aten.mm", (h + x) * BF16, w * BF16, 2 * 4 * 8 * 16),  # dW (x needs no gradient)
        ("aten._to_copy", w * BF16, w * F32, 0),              # the weight cast's backward
        ("aten.add_", 2 * w * F32, w * F32, 0),               # w.grad += dW
    ]
    assert [(op.name, op.bytes_read, op.bytes_written, op.flops) for op in ops] == expected
    totals = ledger.summarize(ops, ledger.H100_SXM)
    assert totals["bytes_read"] == sum(e[1] for e in expected)
    assert totals["bytes_written"] == sum(e[2] for e in expected)
    assert totals["flops"] == 2 * 2 * 4 * 8 * 16


def test_views_are_free_and_broadcasts_count_once():
    with ledger.fake_mode():
        a = torch.zeros(8, 16)
        bias = torch.zeros(16)
        recorder = ledger.Recorder()
        with recorder:
            view = a.t().reshape(-1)[:4]  # a transpose (free), a copy (flattening a transpose), a slice (free)
            total = a + bias  # bias broadcast: read once
            total.add_(1.0)  # in place: read and written once
    names = [(op.name, op.bytes_read, op.bytes_written) for op in recorder.ops]
    assert names == [("aten.clone", 8 * 16 * 4, 8 * 16 * 4), ("aten.add", (8 * 16 + 16) * 4, 8 * 16 * 4),
                     ("aten.add_", 8 * 16 * 4, 8 * 16 * 4)]
    assert view.shape == (4,)


BATCH, SEQ = 2, 32  # B·T = 64 rows: no activation shape starts like a weight's (128, 384, 512, 50304 rows)


def _gpt_ledger(configs):
    config = preset("tiny", n_layer=2, block_size=64)
    return ledger.run_ledger(config, batch_size=BATCH, seq_len=SEQ, grad_accum=4, configs=configs)


def _activation(shape) -> bool:
    return shape[:2] == [BATCH, SEQ] or shape[:1] == [BATCH * SEQ]


def test_all_on_casts_only_weights():
    """With every kernel on, no cat or stack, and the only casts left are autocast's one cast of each weight and bias to bf16
    (and its gradient's back to fp32): none of an activation, none beside a LayerNorm (its y is
    written in bf16 and its backward reads the bf16 dy)."""
    ops = _gpt_ledger([("all on", "all")])["configs"][0]["ops"]
    casts = [op for op in ops if op["name"] == "aten._to_copy"]
    assert casts and not [op for op in casts if _activation(op["inputs"][0]["shape"])]
    # Attention takes c_attn's output whole and writes its gradient as one tensor: nothing to concatenate.
    assert not [op for op in ops if op["name"] in ("aten.cat", "aten.stack")]
    for i, op in enumerate(ops):
        if op["name"].startswith("gpt_triton.layer_norm"):
            for neighbour in ops[max(0, i - 1):i] + ops[i + 1:i + 2]:
                assert not (neighbour["name"] == "aten._to_copy" and _activation(neighbour["inputs"][0]["shape"]))


def test_gpt_step_ledger_totals_add_up_and_kernels_move_less():
    results = _gpt_ledger(ledger.configurations("none,all"))
    off, on = results["configs"]
    for row in (off, on):
        step = row["micro_step"]
        assert step["bytes"] == sum(op["bytes_read"] + op["bytes_written"] for op in row["ops"])
        assert step["bytes"] == sum(r["bytes_read"] + r["bytes_written"] for r in step["by_name"].values())
        assert step["flops"] > 0 and row["predicted_tokens_per_s_upper_bound"] > 0
    # The same model: the same matmul and attention FLOPs whichever implementation runs them.
    assert on["micro_step"]["flops"] == pytest.approx(off["micro_step"]["flops"], rel=0.02)
    assert results["ideal"]["bytes"] < on["micro_step"]["bytes"]
    names = {op["name"] for op in on["ops"]}
    assert {"gpt_triton.layer_norm_residual", "gpt_triton.attention_qkv", "gpt_triton.gelu",
            "gpt_triton.linear_cross_entropy"} <= names
    assert "aten._scaled_dot_product_flash_attention_for_cpu" not in names


def test_recomputed_loss_moves_less_and_computes_more():
    """'all:recompute' runs the fused loss's recompute variant: no (N, V) tile stored (6 bytes per
    logit in bf16: written, read twice), one more GEMM, and fp32 atomics into gradient accumulators
    (V x C zeroed, read and written: 8 bytes per weight element more than writing it once). With more
    rows than 4/3 of the width it moves less: here 512 rows of width 128."""
    configs = ledger.configurations("all,all:recompute")
    assert [label for label, _ in configs] == ["all on", "all on, loss recomputed"]
    config = preset("tiny", n_layer=2, block_size=64)
    results = ledger.run_ledger(config, batch_size=8, seq_len=64, grad_accum=4, configs=configs)
    stored, recomputed = (row["micro_step"] for row in results["configs"])
    n, v, c = 8 * 64, config.padded_vocab_size, config.n_embd
    assert recomputed["flops"] - stored["flops"] == pytest.approx(2 * n * v * c, rel=0.01)
    assert recomputed["bytes"] < stored["bytes"] - (6 * n - 8 * c) * v * 0.9
    with pytest.raises(ValueError, match="GPT_LINEAR_CROSS_ENTROPY"):
        ledger.configurations("all:nonsense")


def test_ledger_command_writes_json_markdown_and_plots(tmp_path):
    out = tmp_path / "ledger"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "ledger", "--preset", "tiny", "--batch-size", "2", "--seq-len", "32",
         "--configs", "none,gelu", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "ledger.json").read_text())
    assert [row["label"] for row in data["configs"]] == ["all off", "gelu only"]
    assert "ideal" in (out / "ledger.md").read_text()
    assert sorted(p.name for p in out.glob("*.png")) == ["ledger-all-off.png", "ledger-gelu-only.png"]
    bad = subprocess.run([sys.executable, "-m", "bench", "ledger", "--configs", "nonsense", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def _casts(ops):
    return [(tuple(op["inputs"][0]["shape"]), op["inputs"][0]["dtype"], op["outputs"][0]["dtype"])
            for op in ops if op["name"] == "aten._to_copy"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: compares with real CUDA autocast")
def test_autocast_policy_matches_cuda():
    """The casts the ledger's CUDA-autocast emulation makes, forward and backward, are those a real CUDA
    run of the same step makes (reference ops: the casts autocast inserts are all there is to compare)."""
    from gpt.model import GPT
    from gpt_kernels.registry import use_kernels

    config = preset("tiny", n_layer=2, block_size=64)
    fake = _gpt_ledger([("all off", "none")])["configs"][0]["ops"]

    torch.manual_seed(0)
    model = GPT(config).cuda()
    idx = torch.randint(0, config.vocab_size, (2, 64), device="cuda")
    params = [p for p in model.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    recorder = ledger.Recorder()
    with use_kernels("none"), recorder:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, idx, check_inputs=False)[1]
        (loss / 4).backward()
    real = [vars(op) for op in recorder.ops]
    assert _casts(fake) == _casts(real)


def test_host_overhead_stubs_launches_and_restores_them():
    from triton.runtime import interpreter, jit

    saved = jit.JITFunction.run, interpreter.InterpretedFunction.run
    result = ledger.host_overhead(preset("tiny", n_layer=2), repeat=2)
    assert (jit.JITFunction.run, interpreter.InterpretedFunction.run) == saved
    assert result["launches_per_micro_step"] > 0 and result["micro_step_us"] > 0
    assert set(result["per_call_us"]) >= {"layernorm (+ residual)", "attention_qkv", "gelu", "linear_cross_entropy"}
