import subprocess
import sys
import warnings

import pytest
import torch

import gpt_kernels
from gpt_kernels import registry


def test_every_op_registered_and_exported():
    assert registry.OPS == (
        "layernorm", "attention", "gelu", "cross_entropy", "linear_cross_entropy", "adamw", "decode_attention",
        "rmsnorm", "rope", "swiglu",
    )
    # One name per op: the spec's, ops.<name>, gpt_kernels.<name> and <name>_reference.
    for name, (reference, triton) in registry.entry_points().items():
        assert getattr(gpt_kernels, f"{name}_reference") is reference
        assert getattr(gpt_kernels, name) is (triton or reference)
        assert callable(getattr(registry.ops, name)) and name in gpt_kernels.__all__
    assert set(registry.entry_points()) == set(registry.OPS) | {"attention_qkv"}


def test_ops_names_an_unknown_op():
    with pytest.raises(AttributeError, match="no op 'layer_norm'"):
        registry.ops.layer_norm


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", set(registry.OPS)),
        ("none", set()),
        ("", set(registry.OPS)),
        ("layernorm,attention", {"layernorm", "attention"}),
        (" LayerNorm , gelu ", {"layernorm", "gelu"}),
        ("all,-attention", set(registry.OPS) - {"attention"}),
        ("none,gelu", {"gelu"}),
    ],
)
def test_parse_kernels(spec, expected):
    assert registry.parse_kernels(spec) == expected


@pytest.mark.parametrize("spec", ["layernrom", "all,-flash", "-none"])
def test_parse_kernels_rejects_unknown_names(spec):
    with pytest.raises(ValueError, match="expected 'all', 'none'|means nothing"):
        registry.parse_kernels(spec)


def test_context_manager_restores_switches():
    before = registry.requested_kernels()
    with registry.use_kernels("none"):
        assert registry.requested_kernels() == frozenset()
        with registry.use_kernels("gelu"):
            assert registry.requested_kernels() == {"gelu"}
        assert registry.requested_kernels() == frozenset()
    assert registry.requested_kernels() == before


def test_switched_off_op_runs_reference():
    x = torch.randn(4, 8)
    with registry.use_kernels("none"):
        assert registry.implementation("layernorm", x.device) == ("torch", "switched off")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # switching off is no fallback: nothing to warn about
            out = registry.ops.layernorm(x, None, None)
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (8,)))


def test_report_names_every_op():
    table = registry.report("cpu")
    for op in registry.OPS:
        assert op in table


def test_environment_variable_sets_the_switches():
    code = "from gpt_kernels import registry; print(','.join(sorted(registry.requested_kernels())))"
    env = {"GPT_KERNELS": "attention,gelu", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "attention,gelu"


def test_triton_unavailable_on_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.setattr(registry, "TRITON_INTERPRETER", False)
    # Warnings go out once per (op, reason): on a GPU machine an earlier test running a CPU model has
    # already given this one, so start from none given.
    monkeypatch.setattr(registry, "_warned", set())
    monkeypatch.setitem(registry._entries, "gelu", registry._Entry(reference=lambda x, bias=None: "ref", triton=lambda x, bias=None: "triton"))
    with registry.use_kernels("gelu"):
        impl, why = registry.implementation("gelu", "cpu")
        assert impl == "torch" and "cannot run" in why
        with pytest.warns(UserWarning, match="runs its PyTorch reference"):
            assert registry.ops.gelu(torch.ones(2)) == "ref"
        assert registry.implementation("gelu", "cuda")[0] == "triton"


def test_interpreter_names_the_numpy_that_breaks_it(monkeypatch):
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    assert "numpy<2.4" in registry._interpreter_problem()
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert registry._interpreter_problem() is None


def test_optimizer_device_from_any_param_group_layout():
    param = torch.nn.Parameter(torch.ones(2))
    assert registry.params_device(([{"params": []}, {"params": param}],), {}).type == "cpu"
    with pytest.raises(ValueError, match="empty parameter list"):
        registry.params_device(([{"params": []}],), {})
