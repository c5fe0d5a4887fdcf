"""The Triton AdamW against torch.optim.AdamW (foreach=False, the plain per-tensor loop).

On the CPU the kernels run in Triton's interpreter, so parameter sets are small and CHUNK is cut
to two blocks (``small_chunks``): tensors still span several chunks and end in ragged tails, as
GPT-2's do at full size. On a GPU the sets include GPT-2's real 768x2304 and 50304x768 matrices.

Tolerances: the update is torch's, operation for operation, in fp32 with IEEE sqrt and division;
what differs is contraction into fused multiply-adds (torch's lerp uses one; our step kernel none,
on the GPU as in the interpreter), a last-bit difference per operation. Over 50 steps parameters
and moments stay within ``STEP_RTOL`` (1e-6) of torch's, relative to each tensor's largest value,
as ``compare`` measures.
"""

import copy
import importlib
import io
import math
import re

import pytest
import torch

from conftest import DEVICE
from hopper import Build, compile_for_hopper, count
from gpt_kernels import registry
from gpt_kernels.adamw import AdamW, TorchAdamW
from gpt_kernels.registry import ops, use_kernels
from gpt_kernels.tolerances import ADAMW_STEP_RTOL as STEP_RTOL
from compare import RTOL, relative_error

adamw_module = importlib.import_module("gpt_kernels.adamw")  # the module, not the op

# GPT-2's awkward sizes: a scalar-like 1, 3, 1000, and (cut down on the CPU) c_attn's 768x2304 and
# the padded embedding's 50304x768. With CHUNK = 2 blocks of 1024 on the CPU, 37x71 is one full
# chunk plus a tail-only chunk, and 131x29 a full chunk plus a chunk of one block and a tail.
SHAPES = [(1,), (3,), (1000,), (37, 71), (131, 29)] + ([(768, 2304), (50304, 768)] if DEVICE == "cuda" else [])


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """CPU only: two blocks per chunk, so small tensors exercise multi-chunk tensors and ragged tails."""
    if DEVICE == "cpu":
        monkeypatch.setattr(adamw_module, "CHUNK", 2 * adamw_module.BLOCK)


def make_params(shapes=SHAPES, dtype=torch.float32):
    return [torch.nn.Parameter((torch.randn(s, device=DEVICE) * 0.5).to(dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def optimizer_pair(n_shapes: int = 4):
    """Parameters, their copies, our AdamW over the first and torch's (``torch_adamw``) over the copies."""
    params = make_params(SHAPES[:n_shapes])
    ref_params = clone_params(params)
    return params, ref_params, AdamW(params), torch_adamw(ref_params)


def three_groups(params):
    """Groups with their own lr, weight decay, betas and eps (every other hyperparameter path)."""
    return [
        {"params": params[0::3], "weight_decay": 0.1},
        {"params": params[1::3], "weight_decay": 0.0, "lr": 3e-3, "betas": (0.8, 0.999), "eps": 1e-6},
        {"params": params[2::3], "weight_decay": 0.05, "lr": 5e-4},
    ]


def set_grads(param_lists, step=0, skip_every=None):
    """The same fresh random gradient on each list's i-th parameter, of a different scale per tensor.
    With ``skip_every``, the last parameter has no gradient on every ``skip_every``-th step."""
    for i in range(len(param_lists[0])):
        skip = skip_every is not None and i == len(param_lists[0]) - 1 and step % skip_every == 0
        g = None if skip else torch.randn_like(param_lists[0][i]) * (0.1 + i)
        for params in param_lists:
            params[i].grad = None if g is None else g.clone()


def set_lr(optimizers, step):
    """A schedule that changes every group's lr on every step, as the cosine schedule does."""
    for opt in optimizers:
        for j, group in enumerate(opt.param_groups):
            group["lr"] = (1e-3 * (j + 1)) * (0.5 + 0.5 * math.cos(step / 7.0 + j))


def torch_adamw(params, **options):
    """torch.optim.AdamW with our defaults (its own weight decay default is 0.01) and its plain loop."""
    return torch.optim.AdamW(params, **{"lr": 6e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1,
                                        "foreach": False, **options})


def error(actual, expected):
    """compare.relative_error, and 0 for empty tensors (which have no largest value)."""
    assert actual.shape == expected.shape
    return relative_error(actual, expected) if expected.numel() else 0.0


def assert_same_state(opt, ref, params, ref_params, rtol=STEP_RTOL):
    for i, (p, q) in enumerate(zip(params, ref_params)):
        err = error(p.detach(), q.detach())
        assert err <= rtol, f"param {i} {tuple(p.shape)}: relative error {err:.2e}"
        ours, theirs = opt.state[p], ref.state[q]
        assert ours.keys() == theirs.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert ours["step"].item() == theirs["step"].item(), f"param {i}: step"
        for key in ("exp_avg", "exp_avg_sq"):
            err = error(ours[key], theirs[key].float())
            assert err <= rtol, f"param {i} {key}: relative error {err:.2e}"


@pytest.mark.gpu_smoke
def test_50_steps_match_torch_adamw():
    params = make_params()
    ref_params = clone_params(params)
    opt = AdamW(three_groups(params), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch_adamw(three_groups(ref_params), lr=1e-3)
    for step in range(50):
        set_grads([params, ref_params], step, skip_every=3)  # a parameter without a gradient is skipped
        set_lr([opt, ref], step)
        opt.step()
        ref.step()
    assert_same_state(opt, ref, params, ref_params)
    assert opt.state[params[-1]]["step"].item() == 33  # its step advanced only when it had a gradient


def test_fused_clipping_matches_clip_grad_norm_then_step():
    params = make_params()
    ref_params = clone_params(params)
    opt = AdamW(three_groups(params))
    ref = torch_adamw(three_groups(ref_params))
    max_norms = [1.0, 1e6, 5.0, 0.5, 1e6, 2.0]  # some steps clip, some do not
    for step, max_norm in enumerate(max_norms):
        set_grads([params, ref_params])
        grads_before = [p.grad.clone() for p in params]
        norm = opt.clip_grad_norm_(max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        assert norm.dtype == torch.float32 and norm.shape == () and norm.device.type == DEVICE
        assert relative_error(norm, ref_norm) <= STEP_RTOL
        # The scale is deferred into the step: the gradients themselves are left as they were.
        assert all(torch.equal(p.grad, g) for p, g in zip(params, grads_before))
        opt.step()
        ref.step()
    # The norms are summed in another order (a few fp32 ulps apart); the moments see the scale once
    # (exp_avg) or squared (exp_avg_sq), so their agreement is looser than an unclipped step's.
    assert_same_state(opt, ref, params, ref_params, rtol=4 * STEP_RTOL)


def test_clip_without_max_norm_only_measures():
    params, ref_params, opt, ref = optimizer_pair()
    set_grads([params, ref_params])
    for max_norm in (None, 0.0):
        norm = opt.clip_grad_norm_(max_norm)
        assert relative_error(norm, torch.nn.utils.get_total_norm([p.grad for p in ref_params])) <= STEP_RTOL
    opt.step()
    ref.step()
    assert_same_state(opt, ref, params, ref_params)


def test_no_gradients_give_a_zero_norm_and_no_update():
    params = make_params(SHAPES[:3]) + [torch.nn.Parameter(torch.randn(0, device=DEVICE))]
    before = [p.detach().clone() for p in params]
    opt = AdamW(params)
    params[-1].grad = torch.randn(0, device=DEVICE)  # an empty gradient is no gradient to the norm
    norm = opt.clip_grad_norm_(1.0)
    assert norm.item() == 0.0 and norm.dtype == torch.float32
    params[-1].grad = None
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and len(opt.state) == 0


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
def test_non_finite_gradients_are_reported_and_the_step_skipped(bad):
    params = make_params(SHAPES[:4])
    ref_params = clone_params(params)
    opt = AdamW(params)
    ref = TorchAdamW(ref_params, foreach=False)  # the reference has our defaults
    for step in range(3):
        set_grads([params, ref_params])
        if step == 1:
            params[2].grad[17] = bad
        # The training loop, verbatim: a non-finite norm skips the step.
        norm = opt.clip_grad_norm_(1.0)
        if torch.isfinite(norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(norm) == (step != 1)
        if step != 1:
            ref.clip_grad_norm_(1.0)
            ref.step()
        ref.zero_grad(set_to_none=True)
    assert_same_state(opt, ref, params, ref_params, rtol=4 * STEP_RTOL)


def test_zero_grad_drops_a_pending_clip_scale():
    params, ref_params, opt, ref = optimizer_pair()
    set_grads([params])
    opt.clip_grad_norm_(1e-3)  # a tiny max_norm: a stale scale would shrink the next step's gradients
    opt.zero_grad(set_to_none=True)
    set_grads([params, ref_params])
    opt.step()  # a plain step, no clipping asked
    ref.step()
    assert_same_state(opt, ref, params, ref_params)


def _train(opt, params, steps, first_step=0):
    for step in range(first_step, first_step + steps):
        set_grads([params], step)
        set_lr([opt], step)
        opt.step()


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_moves_between_torch_and_ours(direction):
    """Train 3 steps with one optimizer, save (through bytes, as a checkpoint does), resume 3 steps
    with the other; a run that never switched gives the same state."""
    torch.manual_seed(1)
    params = make_params(SHAPES[:4])
    straight_params = clone_params(params)
    kinds = {"ours": lambda ps: AdamW(three_groups(ps)),
             "torch": lambda ps: torch_adamw(three_groups(ps))}
    first, second = direction.split("_to_")
    opt = kinds[first](params)
    straight = torch_adamw(three_groups(straight_params))
    for o, ps in ((opt, params), (straight, straight_params)):
        torch.manual_seed(2)
        _train(o, ps, 3)

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    step = saved["state"][0]["step"]
    assert step.dtype == torch.float32 and step.shape == () and step.device.type == "cpu" and step.item() == 3
    resumed = kinds[second](params)
    resumed.load_state_dict(saved)
    loaded = resumed.state[params[0]]["step"]  # torch.optim.AdamW's layout whichever side loaded it
    assert loaded.dtype == torch.float32 and loaded.shape == () and loaded.device.type == "cpu" and loaded.item() == 3
    for o, ps in ((resumed, params), (straight, straight_params)):
        torch.manual_seed(3)
        _train(o, ps, 3, first_step=3)
    assert_same_state(resumed, straight, params, straight_params)


def test_load_state_dict_copies_and_keeps_fp32_moments():
    params = make_params(SHAPES[:3], dtype=torch.bfloat16)
    opt = AdamW(params)
    set_grads([params])
    opt.step()
    saved = opt.state_dict()
    resumed = AdamW(params)
    resumed.load_state_dict(saved)
    for p in params:
        state, original = resumed.state[p], opt.state[p]
        assert state["exp_avg"].dtype == torch.float32  # torch.optim would cast them to bf16
        assert torch.equal(state["exp_avg"], original["exp_avg"])
        assert state["exp_avg"].data_ptr() != original["exp_avg"].data_ptr()  # a copy, never shared


def _emulated_low_precision_step(p, g, m, v, group, step):
    """One AdamW step on a bf16/fp16 parameter with fp32 moments, in float64, rounded as ours stores it."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    p64, g64, m64, v64 = p.double(), g.double(), m.double(), v.double()
    p64 = p64 * (1 - lr * wd)
    m64 = m64 + (1 - beta1) * (g64 - m64)
    v64 = v64 * beta2 + (1 - beta2) * g64 * g64
    denom = v64.sqrt() / math.sqrt(1 - beta2**step) + eps
    p64 = p64 - lr / (1 - beta1**step) * m64 / denom
    return p64.to(p.dtype), m64, v64


@pytest.mark.gpu_smoke
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_params_with_fp32_moments(dtype):
    """Each step against a float64 emulation started from our own state: moments to fp32 precision,
    parameters to one rounding of their dtype."""
    params = make_params(SHAPES, dtype=dtype)
    opt = AdamW(three_groups(params))
    for step in range(1, 4):
        set_grads([params])
        before = {p: (p.detach().clone(), p.grad.clone(), opt.state[p]["exp_avg"].clone() if opt.state[p] else None,
                      opt.state[p]["exp_avg_sq"].clone() if opt.state[p] else None) for p in params}
        opt.step()
        for group in opt.param_groups:
            for p in group["params"]:
                p0, g, m0, v0 = before[p]
                m0 = torch.zeros_like(p0, dtype=torch.float32) if m0 is None else m0
                v0 = torch.zeros_like(p0, dtype=torch.float32) if v0 is None else v0
                p_ref, m_ref, v_ref = _emulated_low_precision_step(p0, g, m0, v0, group, step)
                state = opt.state[p]
                assert p.dtype == dtype and state["exp_avg"].dtype == torch.float32
                assert relative_error(state["exp_avg"], m_ref) <= STEP_RTOL
                assert relative_error(state["exp_avg_sq"], v_ref) <= STEP_RTOL
                assert relative_error(p.detach(), p_ref) <= RTOL[dtype]


def test_capturable_keeps_step_and_lr_on_the_device():
    """Bias corrections in fp32 on the device (as torch's capturable mode): close to, not exactly,
    the float64 host path; lr as a device tensor updated in place, or a float changed every step."""
    params = make_params(SHAPES[:4])
    ref_params = clone_params(params)
    lr = torch.tensor(1e-3, device=DEVICE)
    opt = AdamW([{"params": params[:2], "lr": lr}, {"params": params[2:], "weight_decay": 0.0}], capturable=True)
    ref = torch_adamw([{"params": ref_params[:2]}, {"params": ref_params[2:], "weight_decay": 0.0}], lr=1e-3)
    for step in range(4):
        set_grads([params, ref_params])
        new_lr = 1e-3 * (1 + step)
        lr.fill_(new_lr)
        opt.param_groups[1]["lr"] = ref.param_groups[1]["lr"] = 2 * new_lr
        ref.param_groups[0]["lr"] = new_lr
        opt.clip_grad_norm_(1.0)
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        opt.step()
        ref.step()
    assert all(opt.state[p]["step"].device == p.device for p in params)
    assert_same_state(opt, ref, params, ref_params, rtol=1e-5)


def test_capturable_steps_after_warm_up_copy_nothing_to_the_device(monkeypatch):
    """What lets a CUDA graph capture a step: once warmed up, no table is built or copied again,
    with several launches per step (fp32, bf16, and an unaligned view) and a device lr."""
    storage = torch.randn(301, device=DEVICE)
    params = make_params(SHAPES[:3]) + make_params(SHAPES[3:4], torch.bfloat16) + [torch.nn.Parameter(storage[1:])]
    opt = AdamW([{"params": params[:2], "lr": torch.tensor(1e-3, device=DEVICE)}, {"params": params[2:]}],
                capturable=True)
    set_grads([params])
    for _ in range(2):
        opt.clip_grad_norm_(1.0)
        opt.step()

    def refuse(*args, **kwargs):
        raise AssertionError("a table was rebuilt after the warm-up")

    monkeypatch.setattr(adamw_module, "_to_device", refuse)
    monkeypatch.setattr(adamw_module, "_chunk_table", refuse)
    for _ in range(2):
        opt.clip_grad_norm_(1.0)
        opt.step()
    assert all(opt.state[p]["step"].item() == 4 for p in params)


@pytest.mark.gpu_smoke
@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_capturable_step_replays_in_a_cuda_graph():
    params = make_params(SHAPES[:5])
    ref_params = clone_params(params)
    lr = torch.tensor(1e-3, device=DEVICE)
    opt = AdamW(params, lr=lr, capturable=True)
    ref = torch_adamw(ref_params, lr=1e-3)
    static_grads = [torch.randn_like(p) for p in params]
    for p, g in zip(params, static_grads):
        p.grad = g

    def reference_step(new_lr):
        for q, g in zip(ref_params, static_grads):
            q.grad = g.clone()
        ref.param_groups[0]["lr"] = new_lr
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels and builds every table
        for _ in range(3):
            opt.clip_grad_norm_(1.0)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for _ in range(3):
        reference_step(1e-3)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_norm = opt.clip_grad_norm_(1.0)
        opt.step()
    for step in range(4):
        for g in static_grads:
            g.copy_(torch.randn_like(g))
        expected_norm = torch.nn.utils.get_total_norm(static_grads)
        lr.fill_(1e-3 / (step + 1))
        graph.replay()
        assert relative_error(static_norm, expected_norm) <= STEP_RTOL  # the replay read this step's gradients
        reference_step(1e-3 / (step + 1))
    torch.cuda.synchronize()
    assert_same_state(opt, ref, params, ref_params, rtol=1e-5)


def test_no_table_is_built_inside_cuda_graph_capture(monkeypatch):
    """A copy captured into a graph would replay from a freed host buffer: building a table while a
    capture is under way (a non-capturable optimizer, or tensors moved since the warm-up) is refused."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        adamw_module._to_device(torch.zeros(3, dtype=torch.int64), torch.device("cuda"))


def test_unaligned_empty_params_and_strided_grads():
    """A parameter that is a view at an odd offset takes the launch without alignment hints; a
    gradient that is not contiguous is read through a contiguous copy; an empty parameter is no work."""
    storage = torch.randn(2 * 1500 + 1, device=DEVICE)
    params = [torch.nn.Parameter(storage[1:1501]), torch.nn.Parameter(torch.randn(40, 30, device=DEVICE)),
              torch.nn.Parameter(torch.randn(0, 5, device=DEVICE))]
    assert params[0].data_ptr() % 16 != 0
    ref_params = clone_params(params)
    opt = AdamW(params)
    ref = torch_adamw(ref_params)
    for _ in range(2):
        set_grads([params, ref_params])
        params[1].grad = params[1].grad.t().contiguous().t()  # same values, column-major strides
        opt.step()
        ref.step()
    assert_same_state(opt, ref, params, ref_params)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=-1e-3), "invalid learning rate -0.001"),
        (dict(lr=float("nan")), "invalid learning rate nan"),
        (dict(betas=(1.0, 0.95)), "invalid beta parameter at index 0"),
        (dict(betas=(0.9, -0.1)), "invalid beta parameter at index 1"),
        (dict(betas=(0.9,)), "betas must be a pair"),
        (dict(eps=0.0), "invalid epsilon value 0.0: expected eps > 0"),
        (dict(eps=-1e-8), "invalid epsilon value"),
        (dict(weight_decay=-0.1), "invalid weight_decay value"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    params = make_params(SHAPES[:2])
    with pytest.raises(ValueError, match=re.escape(message)):
        AdamW(params, **kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):  # in a group of its own, too
        AdamW([{"params": params[:1]}, {"params": params[1:], **kwargs}])


def test_bad_lr_from_a_schedule_raises_at_the_step():
    params = make_params(SHAPES[:2])
    opt = AdamW(params)
    set_grads([params])
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="invalid learning rate -1.0"):
        opt.step()


def test_cached_tables_follow_replaced_parameters_and_state():
    """The pointer tables are cached by the tensors' addresses: a parameter whose ``.data`` is
    replaced, or moments replaced by ``load_state_dict``, are updated where they now live."""
    params, ref_params, opt, ref = optimizer_pair()
    for step in range(3):
        set_grads([params, ref_params])
        if step == 1:
            for p in params:
                p.data = p.data.clone()
        if step == 2:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt.step()
        ref.step()
    assert_same_state(opt, ref, params, ref_params)


def test_sizes_that_do_not_match_raise_value_error():
    """The kernel trusts the sizes it is given: a parameter replaced by one of another size, or a
    state dict of another model, is refused before it could read or write out of bounds."""
    params = make_params(SHAPES[:2])
    opt = AdamW(params)
    set_grads([params])
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    params[1].data = torch.randn(5, device=DEVICE)
    params[1].grad = torch.randn(5, device=DEVICE)
    with pytest.raises(ValueError, match=r"moments of shape \(3,\); they must all match"):
        opt.step()
    resumed = AdamW(params)
    with pytest.raises(ValueError, match=r"moments of shape \(3,\) for a parameter of shape \(5,\)"):
        resumed.load_state_dict(saved)
    assert len(resumed.state) == 0  # left as it was


@pytest.mark.parametrize("option", ["amsgrad", "maximize"])
def test_state_dicts_of_unsupported_torch_options_are_refused(option):
    params = make_params(SHAPES[:2])
    theirs = torch_adamw(params, **{option: True})
    set_grads([params])
    theirs.step()
    ours = AdamW(params)
    with pytest.raises(ValueError, match=f"{option}=True is not supported"):
        ours.load_state_dict(theirs.state_dict())
    assert len(ours.state) == 0 and ours.param_groups[0].get(option) is None  # left as it was


def test_registry_picks_the_triton_optimizer():
    params = make_params(SHAPES[:2])
    with use_kernels("adamw"):
        assert isinstance(ops.adamw(params, lr=1e-3), AdamW)
    with use_kernels("none"):
        opt = ops.adamw(params, lr=1e-3)
        assert type(opt) is TorchAdamW


def test_tiny_gpt_trains_the_same_with_ours_and_torchs():
    """20 steps of the training loop (decay/no-decay groups, cosine lr, clipping) on a tiny GPT whose
    ops all run their references: only the optimizer differs, and the loss curves match."""
    from gpt.model import GPT, GPTConfig
    from gpt.training import cosine_lr, make_optimizer

    config = GPTConfig(block_size=16, vocab_size=96, n_layer=1, n_head=2, n_embd=32)
    torch.manual_seed(0)
    initial = GPT(config).to(DEVICE)
    # Runs of consecutive token ids from random starts: a bigram rule the model picks up in a few steps.
    starts = torch.randint(0, config.vocab_size, (20, 4, 1), device=DEVICE)
    data = (starts + torch.arange(config.block_size + 1, device=DEVICE)) % config.vocab_size
    curves = {}
    for spec in ("adamw", "none"):
        model = copy.deepcopy(initial)
        with use_kernels(spec):
            opt = make_optimizer(model, lr=3e-3, weight_decay=0.1)
            assert isinstance(opt, AdamW) == (spec == "adamw")
            losses = []
            with use_kernels("none"):  # the model's own ops on their references, in both runs
                for step in range(20):
                    lr = cosine_lr(step, 3e-3, 3e-4, warmup_steps=3, max_steps=20)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    _, loss = model(data[step, :, :-1].contiguous(), data[step, :, 1:].contiguous())
                    loss.backward()
                    if torch.isfinite(opt.clip_grad_norm_(1.0)):
                        opt.step()
                    opt.zero_grad(set_to_none=True)
                    losses.append(loss.item())
        curves[spec] = torch.tensor(losses)
    assert curves["none"][-1] < curves["none"][0] - 0.5  # it learns
    assert relative_error(curves["adamw"], curves["none"]) <= 1e-5, (curves["adamw"], curves["none"])


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_hopper_with_vector_loads():
    """Full blocks use 16-byte vector loads and stores (the hints work through the pointer table),
    sqrt and division are IEEE-rounded, as torch's are, and the step has no fused multiply-add (see
    ``STEP_LAUNCH_OPTIONS``)."""
    import triton.language as tl

    am = adamw_module
    tables = ["chunk_table_ptr", "tensor_table_ptr", "step_table_ptr", "clip_scale_ptr"]
    step = dict(ALIGNED=True, CAPTURABLE=False, HAS_CLIP_SCALE=True, STEP_ROW=am._STEP_ROW, COEF_ROW=am._COEF_ROW,
                BLOCK=am.BLOCK)
    # Pointers are int64 table entries, but for the fp32 scalars the kernels read directly.
    types = {r"coef_ptr|clip_scale_ptr|partials_ptr|norm_ptr": "*fp32", "n_partials": "i32", "max_norm": "fp32"}
    warps = dict(num_warps=am.NUM_WARPS)
    built = compile_for_hopper({
        "step fp32": Build("gpt_kernels.adamw", "_adamw_kernel", dict(step, PARAM_DTYPE=tl.float32), types, tables,
                           am.STEP_LAUNCH_OPTIONS, "*i64"),
        "step bf16 capturable": Build("gpt_kernels.adamw", "_adamw_kernel",
                                      dict(step, PARAM_DTYPE=tl.bfloat16, CAPTURABLE=True), types, tables,
                                      am.STEP_LAUNCH_OPTIONS, "*i64"),
        "sum of squares": Build("gpt_kernels.adamw", "_grad_sum_squares_kernel",
                                dict(GRAD_DTYPE=tl.float32, BLOCK=am.BLOCK), types,
                                ["chunk_table_ptr", "grad_table_ptr", "partials_ptr"], warps, "*i64"),
        "finalize": Build("gpt_kernels.adamw", "_finalize_norm_kernel", dict(HAS_MAX_NORM=True, BLOCK=am.FINALIZE_BLOCK),
                          types, [], warps, "*i64"),
    })
    counts = {name: {op: count(re.escape(op), result["ptx"])
                     for op in ("ld.global.v4", "st.global.v4", "div.rn.f32", "sqrt.rn.f32", "fma.rn.f32")}
              for name, result in built.items()}
    for name in ("step fp32", "step bf16 capturable"):
        assert counts[name]["ld.global.v4"] >= 4 and counts[name]["st.global.v4"] >= 3, (name, counts[name])
        assert counts[name]["div.rn.f32"] > 0 and counts[name]["sqrt.rn.f32"] > 0, (name, counts[name])
        assert counts[name]["fma.rn.f32"] == 0, (name, counts[name])
    assert counts["sum of squares"]["ld.global.v4"] >= 1, counts["sum of squares"]
    assert counts["finalize"]["div.rn.f32"] > 0 and counts["finalize"]["sqrt.rn.f32"] > 0, counts["finalize"]


def test_reference_is_torchs_fused_adamw_on_cuda():
    """The ablations' "adamw off" baseline is torch's fastest AdamW where it exists."""
    param = torch.nn.Parameter(torch.randn(3, device=DEVICE))
    reference = TorchAdamW([{"params": [param]}, {"params": [], "weight_decay": 0.0}])
    assert bool(reference.defaults["fused"]) == (DEVICE == "cuda")
    assert TorchAdamW([param], foreach=False).defaults["fused"] in (None, False)
