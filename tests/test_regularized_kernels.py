"""Zoneout and DropConnect on the kernel path of ``fastrnn.LSTM`` and ``fastrnn.GRU``.

Each case runs one module on the Triton kernels (``FASTRNN_BACKEND=triton``: Triton's interpreter
on a CPU, ``tests/conftest.py``) and its float64 copy on the reference path
(``FASTRNN_BACKEND=reference``: :mod:`fastrnn.regularized_rnn`'s loop, which
``tests/test_regularized_rnn.py`` checks against hand-written float64 equations at 1e-9), both
under the same seed, so the zoneout and DropConnect masks are the same draws. Compared: outputs,
final states and the gradient of every input, initial state and parameter; fp32 at 1e-4
absolute, fp16/bf16 by the largest error over the largest value (as ``tests/test_kernels_lstm.py``).
Launch counts prove the kernels ran. Then :func:`fastrnn.routing.decide` for zoneout calls, the
loop where the size plans to kernels that take no mask (the tiled ones), and the persistent
kernels' zoneout (LSTM with and without projection, GRU) against the hand-written float64 cells.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn import routing
from fastrnn.backend import triton_interpreting
from fastrnn.ops.recurrence import LAUNCHES, plan
from tests.conftest import assert_close
from tests.test_persistent import H as PERSISTENT_H, harness, persistent_env  # noqa: F401 (persistent_env: a fixture)

#: Both paths run on one device (its generator draws the masks): a GPU's, else the CPU's (interpreter).
DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
I = 4  # input size
LENGTHS = [6, 2, 5]  # packed rows, unsorted


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (in float64)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def run(module, backend: str, x: torch.Tensor, h0, c0, packed: bool, seed: int = 3):
    """Forward and backward of ``module`` on ``backend``, masks drawn from ``seed``: ``[y, h_n,
    (c_n,) grads of x, h0, (c0,) and every parameter]`` and the kernel launches made."""
    x, h0 = x.detach().to(DEVICE).requires_grad_(), h0.detach().to(DEVICE).requires_grad_()
    c0 = None if c0 is None else c0.detach().to(DEVICE).requires_grad_()
    before = dict(LAUNCHES)
    torch.manual_seed(seed)
    with fastrnn.use_backend(backend):
        hx = h0 if c0 is None else (h0, c0)
        if packed:
            out, state = module(pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False), hx)
            y, _ = pad_packed_sequence(out, total_length=x.shape[0])
        else:
            y, state = module(x, hx)
        states = [state] if c0 is None else list(state)
        g = torch.Generator().manual_seed(1)
        outputs = [y, *states]
        loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)).sum() for t in outputs)
        inputs = [x, h0, *([] if c0 is None else [c0]), *module.parameters()]
        grads = torch.autograd.grad(loss, inputs)
    launches = {k: v - before.get(k, 0) for k, v in LAUNCHES.items() if v != before.get(k, 0)}
    return [t.cpu() for t in outputs + list(grads)], launches


def make(cell: str, dtype: torch.dtype, train: bool, H: int, *, layers=1, bidirectional=False, proj_size=0, **options):
    """The module in ``dtype``, its float64 copy, and inputs ``x (T, B, I)``, ``h0``, ``c0`` (float64)."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, dtype=dtype, device=DEVICE, **options)
    if proj_size:
        kwargs["proj_size"] = proj_size
    module = (fastrnn.LSTM if cell == "lstm" else fastrnn.GRU)(I, H, **kwargs).train(train)
    reference = copy.deepcopy(module).double()
    T, B, D = max(LENGTHS), len(LENGTHS), 2 if bidirectional else 1
    x = torch.randn(T, B, I, dtype=torch.float64).to(dtype)
    h0 = torch.randn(layers * D, B, proj_size or H, dtype=torch.float64).to(dtype)
    c0 = torch.randn(layers * D, B, H, dtype=torch.float64).to(dtype) if cell == "lstm" else None
    return module, reference, x, h0, c0


#: id -> (cell, train, packed, module options): every option the kernels take, tiny sizes.
CASES = {
    "lstm-zoneout-train": ("lstm", True, False, dict(H=16, zoneout=0.3)),
    "lstm-zoneout-eval": ("lstm", False, False, dict(H=16, zoneout=0.3)),
    "lstm-zoneout-train-packed-bidir-2layers": ("lstm", True, True, dict(H=12, zoneout=0.4, bidirectional=True, layers=2)),
    "lstm-zoneout-eval-packed-proj-bidir": ("lstm", False, True, dict(H=16, zoneout=0.25, bidirectional=True, proj_size=5)),
    "lstm-zoneout-train-packed-proj-dropconnect-clip": (
        "lstm", True, True, dict(H=16, zoneout=0.3, proj_size=7, recurrent_dropout=0.3, grad_clip=0.05)),
    "lstm-dropconnect-2layers-dropout": ("lstm", True, False, dict(H=16, recurrent_dropout=0.4, layers=2, dropout=0.3)),
    "gru-zoneout-train": ("gru", True, False, dict(H=16, zoneout=0.3)),
    "gru-zoneout-eval-packed-bidir": ("gru", False, True, dict(H=16, zoneout=0.3, bidirectional=True)),
    "gru-zoneout-train-packed-bidir-2layers-dropconnect": (
        "gru", True, True, dict(H=20, zoneout=0.3, bidirectional=True, layers=2, recurrent_dropout=0.3)),
    "gru-dropconnect-packed-bidir-clip": ("gru", True, True, dict(H=16, recurrent_dropout=0.3, bidirectional=True, grad_clip=0.05)),
}


def expected_launches(cell: str, layers: int) -> dict:
    return {f"{cell}_fwd_resident": layers, f"{cell}_bwd_resident": layers}


@pytest.mark.parametrize("name", CASES)
def test_kernels_match_the_float64_reference(name):
    cell, train, packed, options = CASES[name]
    module, reference, x, h0, c0 = make(cell, torch.float32, train, **options)
    actual, launches = run(module, "triton", x, h0, c0, packed)
    expected, reference_launches = run(reference, "reference", x.double(), h0.double(), None if c0 is None else c0.double(), packed)
    assert launches == expected_launches(cell, options.get("layers", 1))
    assert reference_launches == {}
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a.double(), e, atol=1e-4, msg=lambda m, i=index: f"tensor {i}: {m}")


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["lstm-zoneout-train-packed-proj-dropconnect-clip", "gru-zoneout-eval-packed-bidir"])
def test_half_precision_vs_float64(name, dtype, tol):
    """16-bit weights and inputs, fp32 state in the kernels: against the float64 reference of the
    same (rounded) weights and inputs, the same masks."""
    cell, train, packed, options = CASES[name]
    module, reference, x, h0, c0 = make(cell, dtype, train, **options)
    actual, launches = run(module, "triton", x, h0, c0, packed)
    expected, _ = run(reference, "reference", x.double(), h0.double(), None if c0 is None else c0.double(), packed)
    assert launches == expected_launches(cell, 1)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == dtype and torch.isfinite(a).all(), index
        assert rel_err(a, e) < tol, f"tensor {index}: rel err {rel_err(a, e):.3g}"


def test_masks_follow_the_seed_and_zoneout_changes_the_result():
    """Same seed, same result (bit for bit); another seed draws other masks; zoneout 0 differs."""
    module, _, x, h0, c0 = make("lstm", torch.float32, True, H=16, zoneout=0.5, recurrent_dropout=0.3)
    first, _ = run(module, "triton", x, h0, c0, False, seed=3)
    again, _ = run(module, "triton", x, h0, c0, False, seed=3)
    other, _ = run(module, "triton", x, h0, c0, False, seed=4)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.allclose(first[0], other[0])
    module.zoneout, module.recurrent_dropout = 0.0, 0.0
    plain, _ = run(module, "triton", x, h0, c0, False, seed=3)
    assert not torch.allclose(first[0], plain[0])


def test_sizes_on_the_tiled_kernels_run_the_loop(monkeypatch):
    """fp32 LSTM at H 20 planned to the tiled kernels (forced: with cuDNN's tf32 flag on, the
    default, it plans persistent, which zones out; ``fastrnn.ops.recurrence.input_precision``), which
    take no mask: the zoneout loop runs (no launch) and fastrnn.explain says why; DropConnect alone
    still runs the kernels it plans to."""
    monkeypatch.setenv("FASTRNN_STRATEGY", "tiled")
    module, reference, x, h0, c0 = make("lstm", torch.float32, True, H=20, zoneout=0.3)
    with fastrnn.use_backend("triton"):
        reason = fastrnn.explain(module, x.to(DEVICE))
    assert reason.startswith("reference: FASTRNN_BACKEND=triton, but zoneout runs on the LSTM's and the GRU's resident and persistent kernels")
    actual, launches = run(module, "triton", x, h0, c0, False)
    expected, _ = run(reference, "reference", x.double(), h0.double(), c0.double(), False)
    assert launches == {}
    for a, e in zip(actual, expected):
        assert_close(a.double(), e, atol=1e-4)
    module.zoneout, module.recurrent_dropout = 0.0, 0.3
    with fastrnn.use_backend("triton"):
        assert fastrnn.explain(module, x.to(DEVICE)).startswith("triton: recurrent_dropout: W_hh masked on the host")
    _, launches = run(module, "triton", x, h0, c0, False)
    assert launches == {"lstm_fwd_tiled": 1, "lstm_bwd_tiled": 1}


CUDA = routing.DeviceInfo("cuda", "NVIDIA H200", "9.0")
CPU = routing.DeviceInfo("cpu")


def zoneout_call(fits: bool = True, dtype: torch.dtype = torch.bfloat16) -> routing.CallInfo:
    return routing.CallInfo(cell="lstm", dtype=dtype, hidden=64, batch=16, zoneout=True, zoneout_fits=fits)


def test_decide_sends_zoneout_to_the_resident_kernels_on_cuda_only():
    table = routing.empty_table()
    assert routing.decide(CUDA, zoneout_call(), table).path == "triton"
    assert "cuDNN cannot zone out" in routing.decide(CUDA, zoneout_call(), table).reason
    assert routing.decide(CUDA, zoneout_call(fits=False), table).path == "reference"
    assert routing.decide(CUDA, zoneout_call(dtype=torch.float64), table).path == "reference"
    assert routing.decide(dataclasses.replace(CUDA, triton=False), zoneout_call(), table).path == "reference"
    assert routing.decide(CUDA, zoneout_call(), table, compiling=True).path == "triton"  # the kernels' operators
    assert routing.decide(CPU, zoneout_call(), table).path == "reference"
    assert "regularized_rnn" in routing.decide(CPU, zoneout_call(), table).reason
    assert routing.decide(CUDA, zoneout_call(), table, requested="reference").path == "reference"
    assert routing.decide(CUDA, zoneout_call(), table, requested="triton").path == "triton"
    assert routing.decide(CUDA, zoneout_call(fits=False), table, requested="triton").path == "reference"


def test_explain_on_the_cpu():
    x = torch.randn(5, 2, I)
    assert fastrnn.explain(fastrnn.GRU(I, 8, zoneout=0.1), x).startswith("reference: zoneout on the CPU")
    if triton_interpreting():  # the kernels on CPU tensors
        with fastrnn.use_backend("triton"):
            assert fastrnn.explain(fastrnn.GRU(I, 8, zoneout=0.1), x).startswith("triton: FASTRNN_BACKEND=triton")
    assert fastrnn.explain(fastrnn.LSTM(I, 8, recurrent_dropout=0.2), x).startswith(
        "native: recurrent_dropout: W_hh masked on the host")


def test_gradient_flow_record_matches_the_reference():
    """``||dL/dh_t||`` per layer, direction and step, recorded by the zoneout kernels (packed rows)."""
    module, reference, x, h0, c0 = make("gru", torch.float32, True, H=16, zoneout=0.3, bidirectional=True, layers=2)
    recorded = {}
    for m, dtype, backend in ((module, torch.float32, "triton"), (reference, torch.float64, "reference")):
        with fastrnn.record_gradient_flow() as flow:
            _, launches = run(m, backend, x.to(dtype), h0.to(dtype), None, True)
        recorded[backend] = flow.norms(), launches
    (norms, launches), (expected, _) = recorded["triton"], recorded["reference"]
    assert launches == expected_launches("gru", 2)
    assert norms.shape == (4, max(LENGTHS)) and expected.abs().min() > 0
    assert_close(norms.double(), expected.double(), atol=1e-4)


# --------------------------------------------------------- zoneout on the persistent kernels (LSTM, GRU)
# The setting of tests/test_persistent.py (imported above): H 32 with 8 units per program, 4 programs per
# direction (grid (4, 1, 2)); its fixture ``persistent_env`` forces it, its ``harness`` runs barrier mode
# with one thread per program.
needs_interpreter = pytest.mark.skipif(DEVICE != "cpu", reason="the hand-written oracle draws its masks on the CPU")
#: The LSTM's projection in these cases: 10 units over 4 programs (3, 3, 3 and 1 projected units).
PERSISTENT_P = 10


#: id -> (cell, mode, train, proj_size): one layer, packed unsorted lengths and both directions in
#: each. The LSTM without projection in eval: ``test_persistent_zoneout_grad_clip_and_flow_record``.
PERSISTENT_CASES = {
    "gru-per_step-train": ("gru", "per_step", True, 0),
    "gru-per_step-eval": ("gru", "per_step", False, 0),
    "gru-barrier-train": ("gru", "barrier", True, 0),
    "lstm-per_step-train": ("lstm", "per_step", True, 0),
    "lstm-per_step-eval-proj": ("lstm", "per_step", False, PERSISTENT_P),
    "lstm-barrier-train-proj": ("lstm", "barrier", True, PERSISTENT_P),
}


@needs_interpreter
@pytest.mark.parametrize("name", PERSISTENT_CASES)
def test_persistent_zoneout_matches_handwritten_float64(name, persistent_env):
    """The persistent kernels zone out (fp32, 1e-4) as the hand-written float64 LSTM and GRU of
    ``tests/test_regularized_rnn.py`` do, masks from the same seed: outputs, final states and the
    gradients of the input, ``h0``, ``c0`` and every parameter (``weight_hr`` projecting)."""
    from tests.test_regularized_rnn import assert_matches_oracle, forward, handwritten

    cell, mode, train, proj = PERSISTENT_CASES[name]
    persistent_env(mode)
    torch.manual_seed(0)
    T, B, H = 5, 3, PERSISTENT_H
    options = dict(proj_size=proj) if proj else {}
    module = (fastrnn.LSTM if cell == "lstm" else fastrnn.GRU)(I, H, bidirectional=True, zoneout=0.3, **options).train(train)
    x = torch.randn(T, B, I, requires_grad=True)
    h0 = torch.randn(2, B, proj or H, requires_grad=True)
    c0 = torch.randn(2, B, H, requires_grad=True) if cell == "lstm" else None
    lengths = torch.tensor([5, 2, 4])
    w_y, w_h = torch.randn(T, B, 2 * (proj or H), dtype=torch.float64), torch.randn(2, B, H, dtype=torch.float64)
    before = dict(LAUNCHES)
    torch.manual_seed(3)
    with fastrnn.use_backend("triton"), harness(mode, seed=5):
        y, h_n, c_n, inputs = forward(module, x, lengths, h0, c0, packed=True)
        want = handwritten(module, x.double(), lengths, h0.double(), None if c0 is None else c0.double(), 3, None)
        got = (y.double(), h_n.double(), None if c_n is None else c_n.double())
        assert_matches_oracle(module, got, want, inputs, w_y, w_h, atol=1e-4)
    launches = {k: v - before.get(k, 0) for k, v in LAUNCHES.items() if v != before.get(k, 0)}
    assert launches == {f"{cell}_fwd_persistent": 1, f"{cell}_bwd_persistent": 1}


@pytest.mark.parametrize(("cell", "train"), [("gru", True), ("lstm", False)], ids=["gru-train", "lstm-eval"])
def test_persistent_zoneout_grad_clip_and_flow_record(cell, train, persistent_env):
    """``grad_clip`` (it binds) and the gradient-flow record through the zoning persistent kernels
    (per_step, packed, both directions), against the float64 reference path, same masks."""
    persistent_env("per_step")
    module, reference, x, h0, c0 = make(cell, torch.float32, train, PERSISTENT_H, zoneout=0.3, bidirectional=True, grad_clip=0.05)
    recorded = {}
    for m, dtype, backend in ((module, torch.float32, "triton"), (reference, torch.float64, "reference")):
        with fastrnn.record_gradient_flow() as flow:
            tensors, launches = run(m, backend, x.to(dtype), h0.to(dtype), None if c0 is None else c0.to(dtype), True)
        recorded[backend] = tensors, flow.norms(), launches
    (got, norms, launches), (want, expected, _) = recorded["triton"], recorded["reference"]
    assert launches == {f"{cell}_fwd_persistent": 1, f"{cell}_bwd_persistent": 1}
    for index, (a, e) in enumerate(zip(got, want)):
        assert_close(a.double(), e, atol=1e-4, msg=lambda m, i=index: f"tensor {i}: {m}")
    assert_close(norms.double(), expected.double(), atol=1e-4)
    reference.grad_clip = None
    unclipped, _ = run(reference, "reference", x.double(), h0.double(), None if c0 is None else c0.double(), True)
    w_hh = len(want) - len(list(reference.parameters())) + [n for n, _ in reference.named_parameters()].index("weight_hh_l0")
    assert not torch.allclose(unclipped[w_hh], want[w_hh]), "the clip must bind in this test (d weight_hh_l0)"


def test_zoneout_routes_to_the_persistent_kernels(monkeypatch):
    """An LSTM or GRU zoneout call that plans persistent runs the kernels; the tiled kernels take
    no mask (a call that plans to them runs the loop)."""
    from fastrnn.ops.zoneout import zoneout_fits

    for cell, gates in (("lstm", 4), ("gru", 3)):
        persistent = [h for h in (96, 128, 256, 512, 1024) if plan(gates, h, torch.bfloat16).strategy == "persistent"]
        assert persistent, f"the {cell} plans persistent at some 16-bit size past the resident kernels"
        assert all(zoneout_fits(cell, h, torch.bfloat16) for h in persistent)
    monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
    x = torch.randn(5, 2, I, device=DEVICE)
    with fastrnn.use_backend("triton"):
        for module in (fastrnn.GRU(I, PERSISTENT_H, zoneout=0.1, device=DEVICE),
                       fastrnn.LSTM(I, PERSISTENT_H, zoneout=0.1, device=DEVICE),
                       fastrnn.LSTM(I, PERSISTENT_H, zoneout=0.1, proj_size=PERSISTENT_P, device=DEVICE)):
            assert fastrnn.explain(module, x).startswith("triton: "), module
    monkeypatch.setenv("FASTRNN_STRATEGY", "tiled")
    assert not zoneout_fits("gru", 128, torch.bfloat16) and not zoneout_fits("lstm", 128, torch.bfloat16)
    with fastrnn.use_backend("triton"):
        assert fastrnn.explain(fastrnn.LSTM(I, PERSISTENT_H, zoneout=0.1, device=DEVICE), x).startswith(
            "reference: FASTRNN_BACKEND=triton, but zoneout runs on the LSTM's and the GRU's resident and persistent kernels only")
