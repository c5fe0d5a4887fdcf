"""The fused lm_head + cross-entropy against ``F.cross_entropy(hidden @ weight.T)`` in float64.

Loss, ``d_hidden`` and ``d_weight`` for chunk sizes that do and do not divide N, every reduction
(a non-uniform upstream gradient for 'none', whose backward recomputes the chunks), the options,
bf16 autocast (on the CPU too: the interpreter's ``tl.dot`` takes the bf16 operands widened to
fp32, the same products), frozen inputs, buffers poisoned before the kernels run, and the GEMMs'
sm_90 builds. The contract table adds opcheck, torch.compile and the GPT model; the GPU adds GPT-2
sizes and peak memory. Every numerical test runs both variants (the logits stored once, or recomputed
in the backward with atomics).
"""


import contextlib
import importlib
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE
from gpt_kernels import registry
from gpt_kernels.linear_cross_entropy import choose_chunk_rows, linear_cross_entropy, linear_cross_entropy_reference
from hopper import ASYNC_VECTOR_COPY, Build, compile_for_hopper, count
from model_parity import gpt2_width_losses_and_peaks
from gpt_kernels.tolerances import LONG_SUM_FACTOR as LONG_SUM, LOSS_FACTOR
from compare import FLOAT_DTYPES, assert_close

# The module, not the function of the same name that gpt_kernels/__init__ exports (which
# `import gpt_kernels.linear_cross_entropy as ...` would give).
lce_module = importlib.import_module("gpt_kernels.linear_cross_entropy")

ALL_OPTIONS = {"label_smoothing": 0.1, "lse_square_scale": 1e-3, "softcap": 20.0}


@pytest.fixture(params=lce_module.VARIANTS)
def variant(request):
    """Each variant of the op (GPT_LINEAR_CROSS_ENTROPY): the logits stored once, or recomputed."""
    with lce_module.use_variant(request.param):
        yield request.param


def make_inputs(n_rows, width, n_classes, dtype, n_ignored=1):
    hidden = torch.randn(n_rows, width, device=DEVICE).to(dtype)
    weight = (torch.randn(n_classes, width, device=DEVICE) / width**0.5 * 3).to(dtype)
    targets = torch.randint(0, n_classes, (n_rows,), device=DEVICE)
    targets[torch.randperm(n_rows, device=DEVICE)[: min(n_ignored, n_rows - 1)]] = -100
    return hidden, weight, targets


def expected(hidden, weight, targets, upstream=None, **kwargs):
    """(loss, d_hidden, d_weight) of F.cross_entropy-based reference on float64 logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    loss = linear_cross_entropy_reference(h, w, targets, **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream.double())
    return loss.detach(), h.grad, w.grad


def run_ours(hidden, weight, targets, upstream=None, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy(h, w, targets, **kwargs)
    loss.backward(torch.ones_like(loss) if upstream is None else upstream)
    return loss.detach(), h.grad, w.grad


def assert_all_close(ours, reference, dtype, loss_dtype=torch.float32):
    """The loss is fp32 math on the logits; against float64 logits it carries their rounding to
    ``loss_dtype``. The gradients are in ``dtype``."""
    for name, actual, want in zip(("loss", "d_hidden", "d_weight"), ours, reference):
        assert_close(actual, want, loss_dtype if name == "loss" else dtype, name, factor=LOSS_FACTOR if name == "loss" else LONG_SUM)


# (N, C, V, chunk_size): chunks that divide N, that do not, one row each, all rows in one; rows and
# a width over several of the interpreter's tiles; GPT-2's vocabulary (a ragged last tile of classes).
CHUNK_CASES = [(8, 32, 1000, 4), (7, 32, 1000, 3), (5, 16, 1000, 1), (7, 32, 1000, None), (40, 72, 600, None),
               (5, 16, 50257, None)] + (
    [(4096, 768, 50257, 1000), (4096, 768, 50257, None)] if DEVICE == "cuda" else []
)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("n_rows, width, n_classes, chunk_size", CHUNK_CASES, ids=str)
def test_chunks_match_full_logits(n_rows, width, n_classes, chunk_size, dtype, variant):
    hidden, weight, targets = make_inputs(n_rows, width, n_classes, dtype)
    ours = run_ours(hidden, weight, targets, chunk_size=chunk_size)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == dtype
    # Against F.cross_entropy itself for the plain case.
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss_torch = F.cross_entropy(h @ w.T, targets)
    loss_torch.backward()
    # In fp16 the logits are rounded to fp16 before the loss (as in hidden @ weight.T); here they are not.
    assert_all_close(ours, (loss_torch.detach(), h.grad, w.grad), dtype, loss_dtype=dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", ["plain", "all"])
def test_every_reduction_and_option(reduction, options, variant):
    hidden, weight, targets = make_inputs(7, 24, 500, torch.float32, n_ignored=2)
    kwargs = dict(reduction=reduction, **(ALL_OPTIONS if options == "all" else {}))
    upstream = torch.rand(7, device=DEVICE) + 0.5 if reduction == "none" else torch.tensor(0.37, device=DEVICE)
    ours = run_ours(hidden, weight, targets, upstream, chunk_size=3, **kwargs)
    assert_all_close(ours, expected(hidden, weight, targets, upstream, **kwargs), torch.float32)


def test_z_loss_is_returned_for_logging():
    hidden, weight, targets = make_inputs(6, 16, 300, torch.float32)
    loss, z_loss = linear_cross_entropy(hidden, weight, targets, lse_square_scale=1e-2, return_z_loss=True, chunk_size=4)
    loss_ref, z_ref = linear_cross_entropy_reference(hidden.double(), weight.double(), targets, lse_square_scale=1e-2,
                                                     return_z_loss=True)
    assert not z_loss.requires_grad and z_loss > 0
    assert_close(loss, loss_ref, torch.float32, "loss", factor=2)
    assert_close(z_loss, z_ref, torch.float32, "z-loss", factor=2)


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bf16_autocast(reduction, variant):
    """The model's training call: fp32 hidden and weight under bf16 autocast. The matmuls run in bf16
    (like ``hidden @ weight.T`` under autocast), the loss is fp32, each gradient has its input's dtype."""
    hidden, weight, targets = make_inputs(9, 64, 1000, torch.float32)
    upstream = torch.rand(9, device=DEVICE) + 0.5 if reduction == "none" else None
    results = {}
    for name, fn in (("ours", linear_cross_entropy), ("reference", linear_cross_entropy_reference)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = fn(h, w, targets, reduction=reduction)
        loss.backward(torch.ones_like(loss) if upstream is None else upstream)
        assert (loss.dtype, h.grad.dtype, w.grad.dtype) == (torch.float32,) * 3, name
        results[name] = (loss.detach(), h.grad, w.grad)
    # Both round the same bf16 logits; their gradients differ by bf16 roundings of dlogits.
    for name, ours, ref in zip(("loss", "d_hidden", "d_weight"), results["ours"], results["reference"]):
        assert_close(ours, ref, torch.bfloat16, name)


def test_frozen_inputs_and_no_grad(variant):
    hidden, weight, targets = make_inputs(6, 16, 200, torch.float32)
    loss_ref, dh_ref, dw_ref = expected(hidden, weight, targets)
    h = hidden.clone().requires_grad_()
    linear_cross_entropy(h, weight, targets).backward()  # a frozen head: d_hidden only
    assert_close(h.grad, dh_ref, torch.float32, "d_hidden", factor=LONG_SUM)
    w = weight.clone().requires_grad_()
    linear_cross_entropy(hidden, w, targets).backward()  # frozen features: d_weight only
    assert_close(w.grad, dw_ref, torch.float32, "d_weight", factor=LONG_SUM)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden.clone().requires_grad_(), w, targets)
    assert not loss.requires_grad
    assert_close(loss, loss_ref, torch.float32, "loss", factor=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_loss_alone_rounds_the_logits_as_training_does(dtype, variant):
    """Without gradients nothing is stored, and the loss is still that of the logits rounded to the
    compute dtype, bit for bit the training call's (bf16 under autocast: widened operands in the
    interpreter)."""
    hidden, weight, targets = make_inputs(9, 32, 700, torch.float32)
    autocast = torch.autocast(DEVICE, dtype=dtype) if dtype == torch.bfloat16 else contextlib.nullcontext()
    if dtype != torch.bfloat16:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    with autocast:
        trained = linear_cross_entropy(hidden.clone().requires_grad_(), weight, targets, label_smoothing=0.1)
        with torch.no_grad():
            evaluated = linear_cross_entropy(hidden, weight, targets, label_smoothing=0.1)
    assert torch.equal(trained.detach(), evaluated)


def test_all_rows_ignored_and_empty_batch(variant):
    hidden, weight, targets = make_inputs(5, 16, 100, torch.float32)
    for reduction in ("mean", "sum", "none"):
        loss, dh, dw = run_ours(hidden, weight, torch.full_like(targets, -100), reduction=reduction, chunk_size=2)
        assert torch.equal(loss, torch.zeros_like(loss))
        assert torch.equal(dh, torch.zeros_like(dh)) and torch.equal(dw, torch.zeros_like(dw))
    loss, dh, dw = run_ours(hidden[:0], weight, targets[:0])
    assert loss.item() == 0.0 and dh.shape == (0, 16) and torch.equal(dw, torch.zeros_like(dw))


def test_model_weight_slice_int32_and_strided_targets():
    """The model passes ``lm_head.weight[:V]``, a row slice of the padded (50304-style) table; targets
    may be int32 and strided (here every other entry of a longer tensor)."""
    hidden, padded, targets = make_inputs(6, 16, 1024, torch.float32)
    weight = padded[:1000]
    targets = targets.clamp_max(999)
    strided = torch.stack([targets, torch.zeros_like(targets)], dim=1).reshape(-1)[::2]
    reference = expected(hidden, weight, targets)
    assert_all_close(run_ours(hidden, weight, targets.int(), chunk_size=4), reference, torch.float32)
    assert_all_close(run_ours(hidden, weight, strided, chunk_size=4), reference, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_padding_rows_masked(reduction, variant):
    """The model passes its whole padded table with ``n_classes``: the padding rows' logits stay out
    of the loss and their gradient is exactly zero; the rest equals the loss over ``weight[:n_classes]``."""
    hidden, padded, targets = make_inputs(7, 16, 1024, torch.float32)
    targets = targets.clamp_max(999)
    upstream = torch.rand(7, device=DEVICE) if reduction == "none" else None
    reference = expected(hidden, padded, targets, upstream, reduction=reduction, n_classes=1000)
    ours = run_ours(hidden, padded, targets, upstream, reduction=reduction, n_classes=1000, chunk_size=3)
    assert_all_close(ours, reference, torch.float32)
    assert torch.equal(ours[2][1000:], torch.zeros_like(ours[2][1000:]))
    with pytest.raises(ValueError, match="n_classes"):
        linear_cross_entropy(hidden, padded, targets, n_classes=1025)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_scale_folded_into_the_forward(dtype, reduction, variant):
    """``loss_scale`` returns the scaled loss with the scaled gradients (folded into the forward's
    gradients; in fp16 applied by the backward, like the mean's 1/n), as ``loss * loss_scale`` would."""
    hidden, weight, targets = make_inputs(7, 16, 300, dtype)
    upstream = torch.rand(7, device=DEVICE) if reduction == "none" else None
    reference = expected(hidden, weight, targets, upstream, reduction=reduction, loss_scale=0.25)
    unscaled = expected(hidden, weight, targets, upstream, reduction=reduction)
    assert torch.allclose(reference[0], unscaled[0] * 0.25) and torch.allclose(reference[1], unscaled[1] * 0.25)
    ours = run_ours(hidden, weight, targets, upstream, reduction=reduction, loss_scale=0.25, chunk_size=3)
    assert_all_close(ours, reference, dtype, loss_dtype=dtype)  # fp16 logits carry their rounding into the loss
    for bad in (0.0, -1.0, float("nan"), "0.5"):
        with pytest.raises(ValueError, match="loss_scale"):
            linear_cross_entropy(hidden, weight, targets, loss_scale=bad)


def test_choose_chunk_rows():
    # GPT-2 at 16·1024 tokens in bf16: one chunk (1.6 GB of logits); fp32 needs two, 32·1024 tokens too.
    assert choose_chunk_rows(16384, 50257, torch.bfloat16, torch.device("cpu")) == 16384
    assert choose_chunk_rows(16384, 50257, torch.float32, torch.device("cpu")) == 8192
    assert choose_chunk_rows(32768, 50257, torch.bfloat16, torch.device("cpu")) == 16384
    assert choose_chunk_rows(7, 50257, torch.bfloat16, torch.device("cpu")) == 7
    assert choose_chunk_rows(0, 50257, torch.bfloat16, torch.device("cpu")) == 1


def test_chunk_count_follows_the_budget(monkeypatch):
    """With a budget of 3 rows of logits, 7 rows run as 3 chunks (the multiple of 1 keeps them even)."""
    monkeypatch.setattr(lce_module, "CHUNK_LOGITS_BYTES", 3 * 100 * 4)
    monkeypatch.setattr(lce_module, "CHUNK_ROW_MULTIPLE", 1)
    assert choose_chunk_rows(7, 100, torch.float32, torch.device("cpu")) == 3
    hidden, weight, targets = make_inputs(7, 16, 100, torch.float32)
    assert_all_close(run_ours(hidden, weight, targets), expected(hidden, weight, targets), torch.float32)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="GPT-2-sized logits and peak memory need CUDA")
def test_gpt2_loss_stage_memory_and_values(variant):
    """At GPT-2's loss stage (16·1024 tokens, C = 768, V = 50257, bf16 autocast): the values agree
    with lm_head + F.cross_entropy, and the peak memory is at least 4x lower."""
    hidden, weight, targets = make_inputs(16384, 768, 50257, torch.float32)

    def peak(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fn(h, w, targets)
        loss.backward()
        torch.cuda.synchronize()
        return (loss.detach(), h.grad, w.grad), torch.cuda.max_memory_allocated() - before

    ours, ours_peak = peak(linear_cross_entropy)
    ref, ref_peak = peak(linear_cross_entropy_reference)
    for name, actual, want in zip(("loss", "d_hidden", "d_weight"), ours, ref):
        assert_close(actual, want, torch.bfloat16, name)
    assert 4 * ours_peak <= ref_peak, (ours_peak / 2**20, ref_peak / 2**20)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="GPT-2-sized activations and peak memory need CUDA")
def test_gpt_model_peak_memory_lower_with_the_fused_loss():
    """A 2-layer GPT-2-width model at 8·1024 tokens under bf16 autocast: the same loss with the fused
    op on (the model skips the full logits) as with the references, and a lower peak."""
    (fused_loss, fused_peak), (loss, peak) = gpt2_width_losses_and_peaks("linear_cross_entropy", "none")
    assert_close(fused_loss, loss, torch.bfloat16, "loss")
    assert fused_peak < peak, (fused_peak / 2**20, peak / 2**20)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fresh_buffers_poisoned(monkeypatch, chunk_size, variant):
    """Every buffer the op allocates starts as NaN (logits, per-tile statistics, gradient factors and
    both gradients): the kernels must write every element they return, padding rows and ignored rows
    included, and read nothing they did not write."""
    hidden, padded, targets = make_inputs(7, 24, 600, torch.float32, n_ignored=2)
    targets = targets.clamp_max(499)
    reference = expected(hidden, padded, targets, n_classes=500, label_smoothing=0.1, lse_square_scale=1e-3)
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    ours = run_ours(hidden, padded, targets, n_classes=500, chunk_size=chunk_size, label_smoothing=0.1,
                    lse_square_scale=1e-3)
    monkeypatch.undo()
    assert_all_close(ours, reference, torch.float32)
    assert torch.equal(ours[2][500:], torch.zeros_like(ours[2][500:]))


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_gemms_compile_for_hopper_pipelined_without_spills():
    """The Hopper tiles of the GEMMs build for sm_90a as warpgroup MMAs (wgmma) fed by 16-byte
    cp.async copies (software-pipelined loads), without spilling registers: bf16 and fp32 (TF32), with
    and without a soft cap (the largest epilogue). The recompute variant's atomics are vector
    adds (atom.global...add.v4.f32), not one per element. The row statistics build too."""
    kernels = {"logits": "_logits_kernel", "grad_hidden": "_grad_hidden_kernel", "grad_weight": "_grad_weight_kernel",
               "recompute": "_recomputed_grads_kernel"}
    scalars = {"softcap|label_smoothing|lse_square_scale": "fp32"}
    builds = {}
    for dtype, operand in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        for softcap in (False, True):
            tiles = lce_module.hopper_tiles(dtype)
            for name, kernel in kernels.items():
                tile = getattr(tiles, name)
                constexprs = dict(DOT_PRECISION="tf32", UPCAST_DOT=False, HAS_SOFTCAP=softcap, BLOCK_M=tile.block_m,
                                  BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, NUM_STAGES=tile.num_stages)
                constexprs.update({"logits": dict(HAS_SMOOTHING=softcap, STORE_LOGITS=True),
                                   "grad_weight": dict(ACCUMULATE=softcap, LOGITS_TILE=tiles.logits.block_n),
                                   "grad_hidden": dict(LOGITS_TILE=tiles.logits.block_n),
                                   "recompute": dict(WANT_HIDDEN=True, WANT_WEIGHT=True,
                                                     BLOCK_C=lce_module.RECOMPUTE_COLUMNS)}[name])
                types = {"h_ptr|w_ptr|logits_ptr|grad_h_ptr": operand, "targets_ptr": "*i64", ".*_ptr": "*fp32", **scalars}
                builds[f"{name} {dtype} softcap={softcap} {tile}"] = Build(
                    "gpt_kernels.linear_cross_entropy", kernel, constexprs, types, [".*_ptr", "stride_.*row", "width", "n_columns"],
                    dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
    builds["row statistics"] = Build(
        "gpt_kernels.linear_cross_entropy", "_row_statistics_kernel",
        dict(HAS_SMOOTHING=True, HAS_Z_LOSS=True, COMPUTE_GRAD=True, TILE_SCALES=True, BLOCK_T=1024),
        {"targets_ptr": "*i64", ".*_ptr": "*fp32", **scalars}, [".*_ptr"], dict(num_warps=4))
    for name, result in compile_for_hopper(builds).items():
        assert result["stack_frame"] == result["spill_stores"] == 0, (name, result["registers"])
        if name != "row statistics":
            assert count(r"wgmma\.mma_async", result["ptx"]) > 0, name
            assert count(ASYNC_VECTOR_COPY, result["ptx"]) > 0, (name, sorted(set(re.findall(r"cp\.async[^;]*", result["ptx"])))[:3])
        if name.startswith("recompute"):
            assert count(r"(?:red|atom)\.global[^;]*\.add\.v[24]\.f32", result["ptx"]) > 0, name


def test_registered_as_the_triton_op():
    assert registry.resolve("linear_cross_entropy", DEVICE) is linear_cross_entropy
    with registry.use_kernels("none"):
        assert registry.resolve("linear_cross_entropy", DEVICE) is linear_cross_entropy_reference

