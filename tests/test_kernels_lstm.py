"""The LSTM kernels (``fastrnn.ops.lstm``) against the reference path, forward and backward.

Runs on CUDA, or on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` before ``triton`` is
imported; ``tests/conftest.py`` sets it without a GPU). Every case runs the same ``fastrnn.LSTM``
under ``use_backend("triton")`` and under the oracle (``use_backend("reference")``; for 16-bit
dtypes the float64 reference of the same weights) and compares outputs, ``h_n``, ``c_n`` and the
gradients of the input, ``h0``, ``c0`` and every parameter, asserts every element finite, and
checks the launch counter to prove the kernels ran (resident and tiled, with and without
projection; sizes beyond the resident kernels are forced to the tiled kernels here, the persistent
ones have ``test_persistent_lstm.py``). Also: gradient clipping and the gradient-flow record, saturation, empty batch.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from fastrnn.backend import triton_interpreting
from fastrnn.ops.lstm import lstm_layer, lstm_plan
from fastrnn.ops.recurrence import LAUNCHES

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreting()),
    reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
I = 5  # input size


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (in float64)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def make_inputs(T, B, H, P, L, D, packed, dtype, seed=0):
    """Inputs (a tensor, or the sequences of an unsorted PackedSequence), h0, c0, all leaves."""
    g = torch.Generator().manual_seed(seed)
    k = P or H
    if packed:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[B // 2] = T  # the longest row is not the first: unsorted
        xs = [torch.randn(int(n), I, generator=g, dtype=torch.float64) for n in lengths]
    else:
        xs = [torch.randn(T, B, I, generator=g, dtype=torch.float64)]
    h0 = torch.randn(L * D, B, k, generator=g, dtype=torch.float64)
    c0 = torch.randn(L * D, B, H, generator=g, dtype=torch.float64)
    return [x.to(DEVICE, dtype) for x in xs], h0.to(DEVICE, dtype), c0.to(DEVICE, dtype)


def run(module, backend, xs, h0, c0, packed):
    """Forward and backward of ``module`` on ``backend``: ``[y, h_n, c_n, *grads]`` (inputs, h0, c0, params)."""
    xs = [x.detach().requires_grad_() for x in xs]
    h0 = h0.detach().requires_grad_()
    c0 = c0.detach().requires_grad_()
    module.zero_grad(set_to_none=True)
    with fastrnn.use_backend(backend):
        x = pack_sequence(xs, enforce_sorted=False) if packed else xs[0]
        y, (h_n, c_n) = module(x, (h0, c0))
        y = y.data if packed else y
        g = torch.Generator().manual_seed(1)
        weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype) for t in (y, h_n, c_n)]
        loss = sum((t * w).sum() for t, w in zip((y, h_n, c_n), weights))
        loss.backward()
    grads = [x.grad for x in xs] + [h0.grad, c0.grad] + [p.grad for p in module.parameters()]
    return [y, h_n, c_n] + grads


def check(actual, expected, tol):
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None and e is not None, index
        assert a.shape == e.shape, index
        assert torch.isfinite(a).all(), f"tensor {index} not finite"
        assert rel_err(a, e) < tol, f"tensor {index}: rel err {rel_err(a, e):.3g}"


def check_against_float64(T, B, H, P, L, dtype, tol, within=None) -> dict:
    """A bidirectional ``fastrnn.LSTM`` in ``dtype`` (seed 0) on unsorted packed input, run on the
    triton backend (inside the context manager ``within``, if given) against the float64 reference
    of the same weights: every output and state stays in ``dtype``, every tensor within ``tol``.
    Returns the LSTM launch counts of the triton run."""
    torch.manual_seed(0)
    module = fastrnn.LSTM(I, H, num_layers=L, bidirectional=True, proj_size=P, device=DEVICE, dtype=dtype)
    reference = copy.deepcopy(module).double()
    xs, h0, c0 = make_inputs(T, B, H, P, L, 2, True, dtype)
    expected = run(reference, "reference", [x.double() for x in xs], h0.double(), c0.double(), True)
    actual = []
    with within or contextlib.nullcontext():
        counts = launched(lambda: actual.extend(run(module, "triton", xs, h0, c0, True)))
    assert all(t.dtype == dtype for t in actual)
    check(actual, expected, tol)
    return counts


def tiled_beyond_resident(monkeypatch, H: int, dtype: torch.dtype) -> None:
    """Sizes beyond the resident kernels plan to the persistent strategy (tested in
    ``test_persistent_lstm.py``); here they run the tiled kernels (``FASTRNN_STRATEGY=tiled``), which
    serve any size while they exist."""
    if lstm_plan(H, 0, dtype).strategy != "resident":
        monkeypatch.setenv("FASTRNN_STRATEGY", "tiled")


def launched(fn):
    """Run ``fn`` and return the LSTM launch counts it made."""
    before = dict(LAUNCHES)
    fn()
    return {k: v - before.get(k, 0) for k, v in LAUNCHES.items() if k.startswith("lstm_") and v != before.get(k, 0)}


#: id -> (T, B, H, P, num_layers, bidirectional, packed, bias)
CASES = {
    "uni": (5, 3, 16, 0, 1, False, False, True),
    "bi_2layers": (6, 4, 20, 0, 2, True, False, True),
    "proj_bi_2layers": (6, 4, 20, 7, 2, True, False, True),
    "odd_resident": (3, 17, 31, 0, 1, True, False, True),
    "odd_T1": (1, 17, 33, 0, 1, True, False, True),
    "proj_odd": (4, 3, 33, 17, 1, True, False, True),
    "packed_bi": (6, 5, 20, 0, 2, True, True, True),
    "packed_proj": (6, 5, 20, 7, 2, True, True, True),
    "no_bias_proj_packed": (4, 3, 16, 5, 1, True, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_fp32(monkeypatch, case):
    T, B, H, P, L, bi, packed, bias = CASES[case]
    tiled_beyond_resident(monkeypatch, H, torch.float32)
    torch.manual_seed(0)
    module = fastrnn.LSTM(I, H, num_layers=L, bidirectional=bi, proj_size=P, bias=bias, device=DEVICE)
    xs, h0, c0 = make_inputs(T, B, H, P, L, 2 if bi else 1, packed, torch.float32)
    expected = run(module, "reference", xs, h0, c0, packed)
    result = {}
    counts = launched(lambda: result.setdefault("out", run(module, "triton", xs, h0, c0, packed)))
    check(result["out"], expected, 1e-5)
    strategy = lstm_plan(H, P, torch.float32).strategy
    assert counts == {f"lstm_fwd_{strategy}": L, f"lstm_bwd_{strategy}": L}


#: id -> (T, B, H, P, bidirectional, packed): sizes beyond the resident kernels in fp32 (forced tiled).
TILED = {
    "tiled": (3, 3, 80, 0, True, True),
    "tiled_proj": (3, 2, 80, 70, True, True),
    "tiled_proj_small_p": (2, 2, 100, 20, False, False),
}


@pytest.mark.parametrize("case", list(TILED))
def test_tiled_matches_reference(monkeypatch, case):
    T, B, H, P, bi, packed = TILED[case]
    tiled_beyond_resident(monkeypatch, H, torch.float32)
    assert lstm_plan(H, P, torch.float32).strategy == "tiled"
    torch.manual_seed(0)
    module = fastrnn.LSTM(I, H, bidirectional=bi, proj_size=P, device=DEVICE)
    xs, h0, c0 = make_inputs(T, B, H, P, 1, 2 if bi else 1, packed, torch.float32)
    expected = run(module, "reference", xs, h0, c0, packed)
    result = {}
    counts = launched(lambda: result.setdefault("out", run(module, "triton", xs, h0, c0, packed)))
    check(result["out"], expected, 1e-5)
    assert counts == {"lstm_fwd_tiled": 1, "lstm_bwd_tiled": 1}


@pytest.mark.parametrize(
    ("dtype", "tol"),
    [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)],
    ids=["fp16", "bf16"],
)
@pytest.mark.parametrize(
    ("H", "P", "L", "T"),
    [(24, 0, 2, 5), (24, 7, 2, 5), (80, 0, 1, 3), (80, 70, 1, 3)],
    ids=["resident", "resident_proj", "tiled", "tiled_proj"],
)
def test_half_precision_vs_float64(monkeypatch, dtype, tol, H, P, L, T):
    """16-bit weights and inputs, fp32 state: against the float64 reference of the same weights."""
    tiled_beyond_resident(monkeypatch, H, dtype)
    counts = check_against_float64(T, 4, H, P, L, dtype, tol)
    strategy = lstm_plan(H, P, dtype).strategy
    assert counts == {f"lstm_fwd_{strategy}": L, f"lstm_bwd_{strategy}": L}


@pytest.mark.parametrize("P", [0, 7], ids=["no_proj", "proj"])
@pytest.mark.parametrize("H", [20, 80], ids=["resident", "tiled"])
def test_saturation_stays_finite(monkeypatch, H, P):
    """Huge pre-activations (weights * 1e4) saturate the gates: no NaN/inf where the reference has none."""
    tiled_beyond_resident(monkeypatch, H, torch.float32)
    T, B = 4, 3
    torch.manual_seed(0)
    module = fastrnn.LSTM(I, H, bidirectional=True, proj_size=P, device=DEVICE)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1e4)
    xs, h0, c0 = make_inputs(T, B, H, P, 1, 2, True, torch.float32)
    expected = run(module, "reference", xs, h0, c0, True)
    assert all(torch.isfinite(t).all() for t in expected)
    actual = run(module, "triton", xs, h0, c0, True)
    for a in actual:
        assert torch.isfinite(a).all()
    # The state is saturated: c and h agree with the reference up to flips of gates that sit at 0.
    assert rel_err(actual[2], expected[2]) < 1e-3


@pytest.mark.parametrize("P", [0, 3], ids=["no_proj", "proj"])
def test_empty_batch(P):
    H, T, D = 8, 3, 2
    torch.manual_seed(0)
    module = fastrnn.LSTM(I, H, bidirectional=True, proj_size=P, device=DEVICE)
    params = module._layer_params()[0]
    x = torch.randn(T, 0, I, device=DEVICE, requires_grad=True)
    h0 = torch.zeros(D, 0, P or H, device=DEVICE, requires_grad=True)
    c0 = torch.zeros(D, 0, H, device=DEVICE, requires_grad=True)
    out = {}

    def go():
        y, h_n, c_n = lstm_layer("lstm", x, h0, c0, params, None, "tanh")
        (y.sum() + h_n.sum() + c_n.sum()).backward()
        out["shapes"] = (y.shape, h_n.shape, c_n.shape)

    assert launched(go) == {}
    assert out["shapes"] == ((T, 0, D * (P or H)), (D, 0, P or H), (D, 0, H))
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and (p.grad == 0).all() for p in module.parameters())


@pytest.mark.parametrize("P", [0, 7], ids=["no_proj", "proj"])
@pytest.mark.parametrize("H", [16, 72], ids=["resident", "tiled"])
def test_clip_and_flow_match_reference(monkeypatch, H, P):
    """``grad_clip`` clamps the gate pre-activation gradients; the flow record holds ``||dL/dh_t||``."""
    tiled_beyond_resident(monkeypatch, H, torch.float32)
    torch.manual_seed(0)
    layers = 2 if H < 64 else 1
    module = fastrnn.LSTM(I, H, layers, bidirectional=True, proj_size=P, grad_clip=0.02, device=DEVICE)
    xs, h0, c0 = make_inputs(6, 4, H, P, layers, 2, True, torch.float32)

    def step(backend):
        with fastrnn.record_gradient_flow() as flow:
            out = run(module, backend, xs, h0, c0, True)
        return out + [flow.norms()]

    expected = step("reference")
    counts = launched(lambda: expected.append(step("triton")))
    actual = expected.pop()
    check(actual, expected, 1e-5)
    strategy = lstm_plan(H, P, torch.float32).strategy
    assert counts == {f"lstm_fwd_{strategy}": layers, f"lstm_bwd_{strategy}": layers}
    module.grad_clip = None
    unclipped = run(module, "triton", xs, h0, c0, True)
    assert any(not torch.allclose(a, b) for a, b in zip(unclipped[3:], actual[3:])), "the clip must bind"


def test_huge_clip_is_bit_identical_to_no_clip():
    """A clip that never binds changes nothing, bit for bit (and the kernels are deterministic)."""
    torch.manual_seed(0)
    module = fastrnn.LSTM(I, 12, bidirectional=True, proj_size=5, device=DEVICE)
    xs, h0, c0 = make_inputs(5, 3, 12, 5, 1, 2, True, torch.float32)
    plain = run(module, "triton", xs, h0, c0, True)
    module.grad_clip = 1e30
    clipped = run(module, "triton", xs, h0, c0, True)
    for a, b in zip(plain, clipped):
        assert torch.equal(a, b)
