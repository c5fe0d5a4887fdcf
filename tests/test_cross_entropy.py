"""The Triton cross-entropy against float64 PyTorch (``cross_entropy_reference``, ``F.cross_entropy``).

The launcher is tested with NaN-poisoned buffers (per-row losses, z-losses, gradient), so a row
or column the kernel skips fails; the custom op through autograd (every reduction, a non-uniform
upstream gradient for 'none'), opcheck, torch.compile and the GPT model. The interpreter runs
about 10 ms per program, so the CPU grid keeps N small except in one case per vocabulary kind;
the GPU adds bf16 and GPT-2-sized N.
"""

import importlib
import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from hopper import run_compile_script
from gpt_kernels.cross_entropy import cross_entropy, cross_entropy_forward, cross_entropy_reference
from model_parity import gpt2_width_losses_and_peaks
from gpt_kernels.tolerances import LOSS_FACTOR
from compare import FLOAT_DTYPES, assert_close, poisoned_like

# The module, not the function of the same name that gpt_kernels/__init__ exports (which
# `import gpt_kernels.cross_entropy as ...` would give).
ce_module = importlib.import_module("gpt_kernels.cross_entropy")

OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"lse_square_scale": 1e-3},
    "softcap": {"softcap": 15.0},
    "all": {"label_smoothing": 0.2, "lse_square_scale": 1e-2, "softcap": 5.0},
}
# (V, N, option) for the launcher test, each run in every dtype: every option at V = 5 and 1000,
# GPT-2's 50257 (not a multiple of the block) and padded 50304 with the model's options and all of
# them, N = 256 once per small vocabulary (a full grid is too slow for the interpreter).
LAUNCHER_CASES = [
    (5, 7, "plain"), (5, 256, "all"), (5, 1, "smoothing"),
    (1000, 7, "smoothing"), (1000, 7, "z_loss"), (1000, 7, "softcap"), (1000, 1, "plain"), (1000, 256, "plain"),
    (50257, 3, "plain"), (50257, 2, "all"), (50304, 1, "plain"), (50304, 2, "all"),
] + ([(50257, 4096, "plain"), (50304, 1024, "all"), (32000, 777, "z_loss")] if DEVICE == "cuda" else [])


def make_inputs(n_rows, n_cols, dtype, scale=4.0, n_ignored=1):
    """Logits spread like a trained model's (std 4) and targets with ``n_ignored`` rows set to -100."""
    logits = (torch.randn(n_rows, n_cols, device=DEVICE) * scale).to(dtype)
    targets = torch.randint(0, n_cols, (n_rows,), device=DEVICE)
    targets[torch.randperm(n_rows, device=DEVICE)[: min(n_ignored, n_rows - 1)]] = -100
    return logits, targets


def expected(logits, targets, upstream=None, **kwargs):
    """(loss, z_loss, d loss/d logits · upstream) from the reference in float64."""
    x = logits.detach().double().requires_grad_()
    loss, z_loss = cross_entropy_reference(x, targets, return_z_loss=True, **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.double())
    return loss.detach(), z_loss, x.grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n_cols, n_rows, option", LAUNCHER_CASES, ids=lambda v: str(v))
def test_launcher_rows_and_gradient(n_cols, n_rows, option, dtype):
    logits, targets = make_inputs(n_rows, n_cols, dtype)
    kwargs = OPTIONS[option]
    loss_rows, z_loss_rows, grad = cross_entropy_forward(
        logits, targets, grad_scale=torch.ones(1, device=DEVICE), grad=poisoned_like(logits),
        loss_rows=poisoned_like(torch.empty(n_rows, device=DEVICE)),
        z_loss_rows=poisoned_like(torch.empty(n_rows, device=DEVICE)), **kwargs,
    )
    loss_ref, z_loss_ref, grad_ref = expected(logits, targets, reduction="none", **kwargs)
    assert loss_rows.dtype == torch.float32 and grad.dtype == dtype
    # The loss is fp32 from the logits as given: only the fp32 math's rounding, whatever the dtype.
    assert_close(loss_rows, loss_ref, torch.float32, "loss rows", factor=LOSS_FACTOR)
    assert_close(z_loss_rows, z_loss_ref, torch.float32, "z-loss rows", factor=LOSS_FACTOR)
    assert_close(grad, grad_ref, dtype, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_autograd_every_reduction(reduction, dtype):
    logits, targets = make_inputs(9, 1000, dtype, n_ignored=2)
    x = logits.clone().requires_grad_()
    loss = cross_entropy(x, targets, reduction=reduction, **OPTIONS["all"])
    # 'none' gets a non-uniform upstream gradient; the others 0.37, which the in-place scaling must apply.
    upstream = torch.rand(9, device=DEVICE) + 0.5 if reduction == "none" else torch.tensor(0.37, device=DEVICE)
    loss.backward(upstream)
    loss_ref, _, grad_ref = expected(logits, targets, upstream, reduction=reduction, **OPTIONS["all"])
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert_close(loss, loss_ref, torch.float32, "loss", factor=LOSS_FACTOR)
    assert_close(x.grad, grad_ref, dtype, "grad")


def test_matches_torch_cross_entropy():
    """The op, and the reference, against F.cross_entropy itself where it has the option."""
    logits, targets = make_inputs(7, 1000, torch.float32, n_ignored=2)
    for kwargs in ({}, {"label_smoothing": 0.1}):
        for reduction in ("mean", "sum", "none"):
            x, x64 = logits.clone().requires_grad_(), logits.double().requires_grad_()
            loss = cross_entropy(x, targets, reduction=reduction, **kwargs)
            loss_torch = F.cross_entropy(x64, targets, reduction=reduction, **kwargs)
            torch.autograd.backward((loss, loss_torch), (torch.ones_like(loss), torch.ones_like(loss_torch)))
            assert_close(loss, loss_torch, torch.float32, f"loss {reduction} {kwargs}")
            assert_close(x.grad, x64.grad, torch.float32, f"grad {reduction} {kwargs}")
            assert_close(cross_entropy_reference(logits.double(), targets, reduction=reduction, **kwargs),
                         loss_torch.detach(), torch.float64, "reference")


@pytest.mark.gpu_smoke
def test_padded_vocabulary_view_is_read_in_place():
    """The model's call: a [:, :50257] view of (N, 50304) logits. The padding columns hold NaN, so a
    kernel reading past the view's columns would return NaN."""
    full = torch.randn(3, 50304, device=DEVICE) * 4
    full[:, 50257:] = float("nan")
    logits = full[:, :50257]
    targets = torch.tensor([5, 50256, -100], device=DEVICE)
    x = logits.clone().requires_grad_()  # the reference's gradient, from the same values
    view = full.clone().requires_grad_()
    loss = cross_entropy(view[:, :50257], targets)
    loss.backward()
    loss_ref, _, grad_ref = expected(x, targets)
    assert_close(loss, loss_ref, torch.float32, "loss")
    assert_close(view.grad[:, :50257], grad_ref, torch.float32, "grad")
    assert torch.equal(view.grad[:, 50257:], torch.zeros(3, 47, device=DEVICE))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_extreme_logits(dtype):
    """±1e4 logits (within every dtype's range): no overflow, no NaN. A row with one dominant logit
    costs 0 on it, a flat row log V, and the least likely target about 2e4."""
    n_cols = 1000
    logits = (torch.rand(6, n_cols, device=DEVICE) * 2 - 1) * 1e4
    logits[0] = -1e4
    logits[0, 17] = 1e4
    logits[1] = 1e4
    logits = logits.to(dtype)
    targets = torch.tensor([17, 3, 5, 999, 0, int(logits[5].float().argmin())], device=DEVICE)
    for name in ("plain", "all"):
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, targets, reduction="none", **OPTIONS[name])
        loss.backward(torch.ones_like(loss))
        loss_ref, _, grad_ref = expected(logits, targets, reduction="none", **OPTIONS[name])
        assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
        assert_close(loss, loss_ref, torch.float32, f"loss {name}")
        assert_close(x.grad, grad_ref, dtype, f"grad {name}")
        if name == "plain":
            assert loss[0] < 1e-3 and abs(loss[1].item() - torch.log(torch.tensor(1000.0)).item()) < 1e-5
            assert loss[5] > 1e4


def test_masked_logits_anywhere_in_the_row(monkeypatch):
    """-inf logits (masked classes) add nothing, even when a whole vocabulary block is masked before
    the row's first finite logit (the online log-sum-exp must not compute exp(-inf - -inf))."""
    monkeypatch.setattr(ce_module, "MAX_BLOCK_V", 64)  # 4 blocks per row of 200
    logits, _ = make_inputs(3, 200, torch.float32)
    logits[0, :130] = float("-inf")  # the first two blocks
    logits[1, 150:] = float("-inf")  # the tail
    targets = torch.tensor([140, 7, 199], device=DEVICE)
    for name in ("plain", "z_loss", "softcap"):
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, targets, reduction="none", **OPTIONS[name])
        loss.backward(torch.ones_like(loss))
        loss_ref, _, grad_ref = expected(logits, targets, reduction="none", **OPTIONS[name])
        assert_close(loss, loss_ref, torch.float32, f"loss {name}")
        assert_close(x.grad, grad_ref, torch.float32, f"grad {name}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    logits, _ = make_inputs(4, 50, torch.float32)
    targets = torch.full((4,), -1, device=DEVICE)
    x = logits.clone().requires_grad_()
    loss, z_loss = cross_entropy(x, targets, ignore_index=-1, reduction=reduction, lse_square_scale=0.1,
                                 return_z_loss=True)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(z_loss, torch.zeros_like(z_loss))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(cross_entropy_reference(logits, targets, ignore_index=-1, reduction=reduction), loss)


def _by_formula(logits, targets, ignore_index, reduction, lse_square_scale):
    """Cross-entropy with z-loss written out row by row in float64, independent of F.cross_entropy,
    torch.logsumexp and the op's reduce_rows: lse = m + log Σ exp(z - m), loss = lse - z[target]
    + s·lse², ignored rows 0; mean over the rows not ignored, and 0 (not NaN) when every row is."""
    rows, z_rows = [], []
    for z, target in zip(logits.double().cpu(), targets.cpu().tolist()):
        if target == ignore_index:
            rows.append(0.0)
            z_rows.append(0.0)
            continue
        m = z.max().item()
        lse = m + math.log(sum(math.exp(v - m) for v in z.tolist()))
        z_rows.append(lse_square_scale * lse * lse)
        rows.append(lse - z[target].item() + z_rows[-1])
    n_valid = sum(t != ignore_index for t in targets.tolist())
    if reduction == "none":
        return torch.tensor(rows, dtype=torch.float64), torch.tensor(z_rows, dtype=torch.float64)
    if reduction == "sum":
        return torch.tensor(math.fsum(rows), dtype=torch.float64), torch.tensor(math.fsum(z_rows), dtype=torch.float64)
    denominator = max(n_valid, 1)
    return (torch.tensor(math.fsum(rows) / denominator, dtype=torch.float64),
            torch.tensor(math.fsum(z_rows) / denominator, dtype=torch.float64))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignored", ["some", "every"])
def test_z_loss_and_ignored_rows_match_the_formula(reduction, ignored):
    """The reference and the op against _by_formula: an independent check of the z-loss and of
    every row ignored (the reference's own reduce_rows is what the op shares, so it cannot be the judge)."""
    logits, targets = make_inputs(6, 37, torch.float32, n_ignored=2)
    if ignored == "every":
        targets = torch.full_like(targets, -100)
    want_loss, want_z = _by_formula(logits, targets, -100, reduction, 1e-2)
    for name, fn in (("reference", cross_entropy_reference), ("triton", cross_entropy)):
        loss, z_loss = fn(logits, targets, reduction=reduction, lse_square_scale=1e-2, return_z_loss=True)
        assert torch.isfinite(loss).all() and torch.isfinite(z_loss).all(), name
        torch.testing.assert_close(loss.double().cpu(), want_loss, rtol=1e-5, atol=1e-6, msg=f"{name} loss")
        torch.testing.assert_close(z_loss.double().cpu(), want_z, rtol=1e-5, atol=1e-6, msg=f"{name} z-loss")


def test_z_loss_is_returned_for_logging():
    logits, targets = make_inputs(7, 300, torch.float32, n_ignored=2)
    x = logits.clone().requires_grad_()
    loss, z_loss = cross_entropy(x, targets, lse_square_scale=1e-2, return_z_loss=True)
    assert not z_loss.requires_grad and z_loss.dtype == torch.float32 and z_loss > 0
    plain = cross_entropy(logits, targets)
    assert_close(loss, plain + z_loss, torch.float32, "loss = plain loss + z-loss")
    _, z_ref, _ = expected(logits, targets, lse_square_scale=1e-2)
    assert_close(z_loss, z_ref, torch.float32, "z-loss")
    assert cross_entropy(logits, targets, lse_square_scale=1e-2).shape == ()  # the default: the loss alone


def test_int32_and_strided_targets_and_empty_batch():
    """int32 targets, and targets with a stride (every other entry of a longer tensor): the same loss
    and gradient as contiguous int64 ones."""
    logits, targets = make_inputs(5, 64, torch.float32)
    loss_ref, _, grad_ref = expected(logits, targets)

    def every_other(t):
        return torch.stack([t, torch.zeros_like(t)], dim=1).reshape(-1)[::2]

    cases = {"int32": targets.int(), "strided": every_other(targets), "strided int32": every_other(targets.int())}
    for name, t in cases.items():
        assert t.is_contiguous() != name.startswith("strided")
        x = logits.clone().requires_grad_()
        loss = cross_entropy(x, t)
        loss.backward()
        assert_close(loss, loss_ref, torch.float32, f"{name} targets: loss")
        assert_close(x.grad, grad_ref, torch.float32, f"{name} targets: grad")
    empty = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    targets = torch.empty(0, dtype=torch.long, device=DEVICE)
    loss = cross_entropy(empty, targets)
    loss.backward()
    assert loss.item() == 0.0 and empty.grad.shape == (0, 64)
    assert cross_entropy(empty, targets, reduction="none").shape == (0,)


def test_no_gradient_pass_without_grad():
    """Logits that need no gradient (inference, evaluation) skip the kernel's second walk."""
    logits, targets = make_inputs(4, 100, torch.float32)
    with torch.no_grad():
        loss = cross_entropy(logits.clone().requires_grad_(), targets)
    assert_close(loss, expected(logits, targets)[0], torch.float32, "loss")
    assert not loss.requires_grad and not cross_entropy(logits, targets).requires_grad


def test_upstream_gradient_of_one_is_free_and_others_apply():
    """The backward skips tiles whose factor is exactly 1; any other factor, scalar or per row, is applied."""
    grad = torch.randn(37, 300, device=DEVICE)
    untouched = ce_module.scale_rows_(grad.clone(), torch.ones(1, device=DEVICE))
    assert torch.equal(untouched, grad)
    per_row = torch.rand(37, device=DEVICE)
    per_row[::3] = 1.0
    assert_close(ce_module.scale_rows_(grad.clone(), per_row), grad * per_row[:, None], torch.float32, "per row")
    assert_close(ce_module.scale_rows_(grad.clone(), torch.tensor([2.5], device=DEVICE)), grad * 2.5,
                 torch.float32, "scalar")


def test_fp16_mean_gradient_survives_a_grad_scaler():
    """fp16 cannot hold softmax/n for small probabilities: the mean's 1/n is applied in the backward,
    together with a GradScaler-sized upstream factor, so small entries keep their precision."""
    n_rows, n_cols = 7, 2000
    logits = (torch.randn(n_rows, n_cols, device=DEVICE) * 2).to(torch.float16)
    logits[:, :1000] -= 8  # probabilities near 1e-8: the mean's gradient p/n is below fp16's subnormals
    targets = torch.randint(1000, n_cols, (n_rows,), device=DEVICE)
    x = logits.clone().requires_grad_()
    upstream = torch.tensor(2.0**16, device=DEVICE)
    cross_entropy(x, targets).backward(upstream)
    _, _, grad_ref = expected(logits, targets, upstream)
    small = grad_ref[:, :1000]
    assert small.abs().max() < 0.1 * grad_ref.abs().max()
    assert_close(x.grad[:, :1000], small, torch.float16, "small entries")


def test_logits_are_never_overwritten():
    """The gradient goes to a buffer of the op's own: logits that are a view of a leaf, and that
    another op saved for its backward, keep their values, and that op's gradient stays right."""
    logits, targets = make_inputs(4, 60, torch.float32)
    leaf = logits.clone().requires_grad_()
    view = leaf[:, :50]
    loss = cross_entropy(view, targets.clamp_max(49)) + 0.5 * view.square().sum()  # square saves the view
    loss.backward()
    assert torch.equal(leaf.detach(), logits)
    _, _, grad_ref = expected(logits[:, :50], targets.clamp_max(49))
    assert_close(leaf.grad[:, :50], grad_ref + logits[:, :50], torch.float32, "grad")
    assert torch.equal(leaf.grad[:, 50:], torch.zeros(4, 10, device=DEVICE))


def test_second_backward_through_the_graph_is_refused():
    """The backward scales the forward's gradient in place; a second backward must not scale it twice."""
    logits, targets = make_inputs(3, 40, torch.float32)
    loss = cross_entropy(logits.clone().requires_grad_(), targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_unchecked_bad_target_gives_nan_not_a_crash():
    logits, _ = make_inputs(3, 40, torch.float32)
    targets = torch.tensor([1, 40, -7], device=DEVICE)
    loss = cross_entropy(logits, targets, reduction="none", check_targets=False)
    assert torch.isfinite(loss[0]) and torch.isnan(loss[1:]).all()


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="GPT-2-sized logits and peak memory need CUDA")
def test_bf16_model_logits_loss_and_memory():
    """The model's training call in bf16 at GPT-2 size: the loss is fp32 and agrees with the reference,
    and the forward+backward peak is below the reference's (which keeps an fp32 softmax)."""
    logits, targets = make_inputs(8192, 50304, torch.bfloat16)
    targets = targets.clamp_max(50256)

    def peak(fn):
        x = logits.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = fn(x[:, :50257], targets)
        loss.backward()
        torch.cuda.synchronize()
        return loss.detach(), x.grad, torch.cuda.max_memory_allocated() - before

    loss, grad, ours = peak(cross_entropy)
    loss_ref, grad_ref, eager = peak(cross_entropy_reference)
    assert loss.dtype == torch.float32
    assert_close(loss, loss_ref, torch.float32, "loss", factor=10)
    assert_close(grad, grad_ref, torch.bfloat16, "grad")
    assert ours < eager, (ours, eager)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="GPT-2-sized activations and peak memory need CUDA")
def test_gpt_model_peak_memory_lower_with_the_triton_loss():
    """A 2-layer GPT-2-width model at 8·1024 tokens under bf16 autocast, the Triton loss on its logits
    (the fused linear_cross_entropy off) vs every op on its reference: the same loss, a lower peak."""
    (triton_loss, triton_peak), (loss, peak) = gpt2_width_losses_and_peaks("cross_entropy", "none")
    assert_close(triton_loss, loss, torch.bfloat16, "loss")
    assert triton_peak < peak, (triton_peak / 2**20, peak / 2**20)


# Compiles the kernels for an H100 (sm_90) without one, in a subprocess (this one decorated them for
# the interpreter): every variant the GPU tests launch must build, and with 16-element-aligned rows
# the logits are read and the gradient written with 16-byte vector accesses, which bandwidth needs,
# also for GPT-2's 50257 columns (Triton sees no alignment in n_cols; only the tail block is masked).
HOPPER_PTX = r"""
import collections, importlib, json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
ce = importlib.import_module("gpt_kernels.cross_entropy")

def accesses(fn, signature, constexprs, aligned, num_warps):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else signature.get(n, "i32") for n in names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]
    counts = collections.Counter(re.findall(r"(?:ld|st)\.global\.v4", ptx))
    counts["cp.async 16 bytes"] = len(re.findall(r"cp\.async\.\w+\.shared\.global[^;]*, 0x10,", ptx))
    return counts

floats = {"grad_scale_ptr": "*fp32", "loss_ptr": "*fp32", "z_loss_ptr": "*fp32",
          "label_smoothing": "fp32", "lse_square_scale": "fp32", "softcap": "fp32"}
rows = ["logits_ptr", "grad_ptr", "stride_logits_row", "stride_grad_row"]
options = dict(HAS_SMOOTHING=False, HAS_Z_LOSS=False, HAS_SOFTCAP=False, COMPUTE_GRAD=True, BLOCK_V=ce.MAX_BLOCK_V,
               NUM_STAGES=ce.PIPELINE_STAGES)
everything = dict(options, HAS_SMOOTHING=True, HAS_Z_LOSS=True, HAS_SOFTCAP=True)
warps = ce._num_warps(ce.MAX_BLOCK_V)
out = {}
for name, dtype, targets, constexprs, aligned in (
        ("bf16 every option", "*bf16", "*i32", everything, rows + ["n_cols"]),
        ("bf16 50257 columns", "*bf16", "*i64", options, rows),
        ("fp16 plain", "*fp16", "*i64", options, rows + ["n_cols"]),
        ("fp32 loss only", "*fp32", "*i64", dict(options, COMPUTE_GRAD=False), rows)):
    signature = dict(floats, logits_ptr=dtype, grad_ptr=dtype, targets_ptr=targets)
    out[name] = accesses(ce._cross_entropy_kernel, signature, constexprs, aligned, warps)
out["scale bf16"] = accesses(ce._scale_rows_kernel, {"x_ptr": "*bf16", "scale_ptr": "*fp32"},
                             dict(BLOCK_M=4, BLOCK_N=ce.SCALE_MAX_BLOCK_N), ["x_ptr", "stride_x_row", "n_cols"], 16)
print(json.dumps(out))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_hopper_with_vector_accesses():
    """16-byte accesses everywhere; the loss kernel's walks over a row are software-pipelined (its
    whole blocks arrive by 16-byte cp.async copies, the masked last block peeled out of the loop)."""
    counts = run_compile_script(HOPPER_PTX)
    for name in ("bf16 every option", "bf16 50257 columns", "fp16 plain", "fp32 loss only"):
        assert counts[name]["cp.async 16 bytes"] > 0, (name, counts[name])
    for name in ("bf16 every option", "bf16 50257 columns", "fp16 plain"):
        assert counts[name].get("st.global.v4", 0) > 0, (name, counts[name])
    assert "st.global.v4" not in counts["fp32 loss only"], counts
    assert counts["scale bf16"].get("ld.global.v4", 0) > 0 and counts["scale bf16"].get("st.global.v4", 0) > 0, counts

