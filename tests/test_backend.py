"""Backend selection: ``FASTRNN_BACKEND``, ``set_backend`` / ``use_backend``, and the path they lead a plain call to."""

from __future__ import annotations

import sys

import pytest
import torch

import fastrnn
from fastrnn import backend, dispatch, routing

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: no CUDA tensor is made
ORIGINAL_EMPTY = torch.empty  # captured at import, before the NaN-poisoning fixture patches it
PLAIN = routing.CallInfo(cell="lstm", dtype=torch.float32, hidden=4, batch=2)  # nothing only the kernels do


def resolve(device: torch.device) -> str:
    """The path of a plain float32 call on ``device`` with this process's backend, triton and
    compile state (a CUDA device is described as an H200 the dispatch table has not measured)."""
    info = routing.describe_device(device) if device.type == "cpu" else routing.DeviceInfo(
        "cuda", "NVIDIA H200", "9.0", triton=backend.triton_available(), interpreting=backend.triton_interpreting())
    return routing.decide(info, PLAIN, routing.empty_table(), backend.get_backend(), torch.compiler.is_compiling()).path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------ FASTRNN_BACKEND
def test_default_is_auto(clean_env):
    assert fastrnn.get_backend() == "auto"
    assert resolve(CPU) == "native"


@pytest.mark.parametrize("value, expected", [
    ("auto", "auto"), ("reference", "reference"), ("triton", "triton"),
    (" Reference ", "reference"), ("TRITON", "triton"), ("", "auto"),
])
def test_env_var_selects_backend(clean_env, value, expected):
    clean_env.setenv("FASTRNN_BACKEND", value)
    assert fastrnn.get_backend() == expected


def test_env_var_read_on_every_call(clean_env):
    clean_env.setenv("FASTRNN_BACKEND", "reference")
    assert resolve(CPU) == "reference"
    clean_env.setenv("FASTRNN_BACKEND", "auto")
    assert resolve(CPU) == "native"


@pytest.mark.parametrize("value", ["cuda", "native", "triton2", "ref"])
def test_env_var_invalid_name(clean_env, value):
    clean_env.setenv("FASTRNN_BACKEND", value)
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        fastrnn.get_backend()
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        resolve(CPU)
    layer = fastrnn.GRU(3, 4)
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        layer(torch.randn(2, 1, 3))


# ------------------------------------------------------------------------- set_backend, use_backend
def test_set_backend_overrides_env_and_none_restores(clean_env):
    clean_env.setenv("FASTRNN_BACKEND", "triton")
    fastrnn.set_backend("reference")
    assert fastrnn.get_backend() == "reference"
    assert resolve(CPU) == "reference"
    fastrnn.set_backend(None)
    assert fastrnn.get_backend() == "triton"


@pytest.mark.parametrize("name", ["cpu", "Reference", "", "none"])
def test_set_backend_invalid_name(clean_env, name):
    fastrnn.set_backend("reference")
    with pytest.raises(ValueError, match="choose one of auto, triton, reference"):
        fastrnn.set_backend(name)
    assert fastrnn.get_backend() == "reference"  # a failed call changes nothing


def test_use_backend_restores_previous(clean_env):
    assert fastrnn.get_backend() == "auto"
    with fastrnn.use_backend("reference"):
        assert fastrnn.get_backend() == "reference"
        with fastrnn.use_backend("triton"):
            assert fastrnn.get_backend() == "triton"
        assert fastrnn.get_backend() == "reference"
    assert fastrnn.get_backend() == "auto"

    fastrnn.set_backend("triton")
    with fastrnn.use_backend("auto"):
        assert fastrnn.get_backend() == "auto"
    assert fastrnn.get_backend() == "triton"


def test_use_backend_restores_on_exception(clean_env):
    fastrnn.set_backend("triton")
    with pytest.raises(KeyError, match="boom"):
        with fastrnn.use_backend("reference"):
            assert fastrnn.get_backend() == "reference"
            raise KeyError("boom")
    assert fastrnn.get_backend() == "triton"


def test_use_backend_invalid_name_leaves_state(clean_env):
    with fastrnn.use_backend("reference"):
        with pytest.raises(ValueError):
            with fastrnn.use_backend("gpu"):
                pass  # pragma: no cover - never entered
        assert fastrnn.get_backend() == "reference"
    assert fastrnn.get_backend() == "auto"


# -------------------------------------------------------------------------------------- resolve
def test_resolve_cpu(clean_env):
    with fastrnn.use_backend("auto"):
        assert resolve(CPU) == "native"
    with fastrnn.use_backend("reference"):
        assert resolve(CPU) == "reference"
        assert resolve(CUDA) == "reference"


def test_resolve_cuda_device_auto(clean_env):
    """A plain call on CUDA runs cuDNN (what torch.nn runs) until the table says otherwise."""
    with fastrnn.use_backend("auto"):
        assert resolve(CUDA) == "cudnn"
        assert resolve(CPU) == "native"
    clean_env.setattr(backend, "triton_available", lambda: False)
    with fastrnn.use_backend("auto"):
        assert resolve(CUDA) == "cudnn"


def test_resolve_auto_while_compiling_uses_native_bptt(clean_env):
    """Under torch.compile a CPU layer is one native-bptt operator (native forward inside), not the unrolled loop."""
    clean_env.setattr(torch.compiler, "is_compiling", lambda: True)
    with fastrnn.use_backend("auto"):
        assert resolve(CPU) == "native-bptt"


def test_triton_on_cpu_without_interpreter_raises(clean_env):
    """No silent fallback: the error says what to set."""
    with fastrnn.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve(CPU)
    clean_env.setenv("TRITON_INTERPRET", "0")
    with fastrnn.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve(CPU)


def test_triton_on_cpu_without_interpreter_raises_in_forward(clean_env):
    clean_env.setenv("FASTRNN_BACKEND", "triton")
    layer = fastrnn.LSTM(3, 4, batch_first=True)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        layer(torch.randn(2, 5, 3))
    with fastrnn.use_backend("reference"):  # override beats the env var
        out, _ = layer(torch.randn(2, 5, 3))
    assert out.shape == (2, 5, 4) and torch.isfinite(out).all()


def test_triton_with_interpreter_resolves_to_triton(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "1")
    assert backend.triton_interpreting()
    with fastrnn.use_backend("triton"):
        assert resolve(CPU) == "triton"
        assert resolve(CUDA) == "triton"


def test_triton_not_installed(clean_env):
    clean_env.setattr(backend, "triton_available", lambda: False)
    with fastrnn.use_backend("triton"):
        with pytest.raises(RuntimeError, match=r"not installed: pip install 'fastrnn\[triton\]'"):
            resolve(CUDA)


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.0", True), ("3.6.0", "2.2.6", False), ("3.7.0", "2.4.6", False), ("3.9.0", "2.4.6", False),
])
def test_interpreter_refuses_the_numpy_its_triton_cannot_use(monkeypatch, triton_version, numpy_version, refused):
    """Triton 3.6's interpreter fails in every loop with numpy >= 2.3: fastrnn says what to install instead."""
    versions = {"triton": triton_version, "numpy": numpy_version}
    monkeypatch.setattr(backend.importlib.metadata, "version", versions.__getitem__)
    problem = backend._interpreter_problem.__wrapped__()
    if refused:
        assert f"Triton {triton_version}'s interpreter fails with numpy {numpy_version}: pip install 'numpy<2.3'" in problem
    else:
        assert problem is None


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'fastrnn\[plot\]'"):
        fastrnn.plot_gradient_flow(fastrnn.GradientFlow())


@pytest.mark.parametrize("value, expected", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_triton_interpreting(clean_env, value, expected):
    clean_env.setenv("TRITON_INTERPRET", value)
    assert backend.triton_interpreting() is expected


def test_triton_interpreting_unset(clean_env):
    assert backend.triton_interpreting() is False


# ------------------------------------------------------------------- which path a layer really runs
@pytest.mark.parametrize("name, expected", [("auto", "native"), ("reference", "reference")])
def test_layer_runs_selected_path(clean_env, name, expected):
    calls: list[str] = []
    native, reference_layer = dispatch._native_stack, dispatch.reference_layer

    def spy_native(*args, **kwargs):
        calls.append("native")
        return native(*args, **kwargs)

    def spy_reference(*args, **kwargs):
        calls.append("reference")
        return reference_layer(*args, **kwargs)

    clean_env.setattr(dispatch, "_native_stack", spy_native)
    clean_env.setattr(dispatch, "reference_layer", spy_reference)
    clean_env.setenv("FASTRNN_BACKEND", name)
    layer = fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True)
    layer(torch.randn(5, 2, 3))
    assert calls == ([expected] if expected == "native" else ["reference"] * 2)  # one call per layer


# ----------------------------------------------------------------------------- the test harness
def test_nan_poisoning_active():
    """conftest fills fresh floating-point allocations with NaN."""
    assert torch.isnan(torch.empty(4)).all()
    assert torch.isnan(torch.empty(2, 3, dtype=torch.float64)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(3))).all()
    assert torch.isnan(torch.empty_strided((2, 2), (1, 2))).all()
    assert torch.isnan(torch.zeros(3).new_empty((5,))).all()
    assert torch.empty(3, dtype=torch.int64).shape == (3,)  # integer tensors are left alone
    t = torch.empty(3, requires_grad=True)  # leaves that require grad still work
    assert t.requires_grad and t.is_leaf and torch.isnan(t).all()
    assert torch.empty is not ORIGINAL_EMPTY


@pytest.mark.no_nan_poison
def test_nan_poisoning_opt_out():
    assert torch.empty is ORIGINAL_EMPTY


def test_forced_triton_rejects_float64_with_a_clear_error(monkeypatch):
    """The kernels keep fp32 state: a float64 layer forced onto them is refused, not silently
    rounded; under auto, float64 on the kernel path's device goes to an exact path instead."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = fastrnn.GRU(3, 4, dtype=torch.float64)
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    with fastrnn.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        module(x)
