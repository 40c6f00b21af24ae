"""The CPU path for grad_clip and gradient-flow recording (:mod:`fastrnn.native_bptt`): native
forward, hand-written backward, held to the reference path at 1e-9 in float64 (outputs, final
states, flow norms and every gradient), with lengths, both directions and projection."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import fastrnn
from fastrnn import dispatch
from fastrnn.native_bptt import native_bptt_layer
from fastrnn.reference import GATES, reference_layer

F64 = torch.float64

# cell, nonlinearity, directions, proj, lengths, grad_clip, bias
CASES = [
    ("rnn", "tanh", 1, 0, False, None, True),
    ("rnn", "relu", 2, 0, True, 0.1, True),
    ("rnn", "gelu", 2, 0, True, 0.05, True),
    ("rnn", "sigmoid", 1, 0, False, 0.2, False),
    ("gru", None, 1, 0, False, None, True),
    ("gru", None, 2, 0, True, 0.05, True),
    ("gru", None, 2, 0, False, 0.1, False),
    ("lstm", None, 1, 0, False, None, True),
    ("lstm", None, 2, 0, True, 0.02, True),
    ("lstm", None, 2, 3, True, 0.02, True),
    ("lstm", None, 1, 3, False, None, False),
]


def _params(cell, inputs, hidden, directions, proj, bias):
    rows, out = GATES[cell] * hidden, proj or hidden
    params = []
    for _ in range(directions):
        p = {
            "w_ih": torch.randn(rows, inputs, dtype=F64) * 0.5,
            "w_hh": torch.randn(rows, out, dtype=F64) * 0.5,
            "b_ih": torch.randn(rows, dtype=F64) if bias else None,
            "b_hh": torch.randn(rows, dtype=F64) if bias else None,
            "w_hr": torch.randn(proj, hidden, dtype=F64) * 0.5 if proj else None,
        }
        params.append({k: None if v is None else v.requires_grad_() for k, v in p.items()})
    return params


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_layer_matches_reference_float64(case):
    cell, nonlinearity, directions, proj, use_lengths, grad_clip, bias = case
    torch.manual_seed(0)
    steps, batch, inputs, hidden = 7, 4, 3, 5
    params = _params(cell, inputs, hidden, directions, proj, bias)
    x = torch.randn(steps, batch, inputs, dtype=F64, requires_grad=True)
    h0 = torch.randn(directions, batch, proj or hidden, dtype=F64, requires_grad=True)
    c0 = torch.randn(directions, batch, hidden, dtype=F64, requires_grad=True) if cell == "lstm" else None
    lengths = torch.tensor([7, 3, 5, 1]) if use_lengths else None
    leaves = [x, h0] + ([c0] if c0 is not None else []) + [v for p in params for v in p.values() if v is not None]
    weights = torch.randn(steps, batch, directions * (proj or hidden), dtype=F64)

    results = []
    for layer in (reference_layer, native_bptt_layer):
        record = torch.zeros(directions, steps)
        y, h_n, c_n = layer(cell, x, h0, c0, params, lengths, nonlinearity or "tanh", grad_clip=grad_clip, flow_record=record)
        loss = (y * weights).sum() + h_n.square().sum() + (c_n.sin().sum() if c_n is not None else 0)
        results.append([y, h_n, *([c_n] if c_n is not None else []), record, *torch.autograd.grad(loss, leaves)])
    expected, actual = results
    assert expected[-len(leaves) - 1].abs().sum() > 0, "the flow record was filled"
    for a, e in zip(actual, expected, strict=True):
        assert_close(a.double(), e.double(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
def test_auto_on_cpu_routes_clip_and_recording_to_native_bptt(cls, monkeypatch):
    """``grad_clip`` or a record on the CPU under auto runs the native-bptt op per layer (not the
    reference loop), with the reference's results; without either, the native stack as before."""
    calls = []
    monkeypatch.setattr(dispatch, "native_bptt_layer", lambda *a, **k: calls.append(a[0]) or native_bptt_layer(*a, **k))
    torch.manual_seed(0)
    layer = cls(3, 4, num_layers=2, bidirectional=True, dtype=F64, grad_clip=0.05)
    x = torch.randn(6, 2, 3, dtype=F64)
    grads = []
    for backend in ("auto", "reference"):
        layer.zero_grad(set_to_none=True)
        with fastrnn.use_backend(backend), fastrnn.record_gradient_flow() as flow:
            y, _ = layer(x)
            y.square().sum().backward()
        grads.append([y.detach(), flow.norms(), *[p.grad for p in layer.parameters()]])
    assert len(calls) == 2, "one op call per layer under auto, none under reference"
    for a, e in zip(*grads, strict=True):
        assert_close(a, e, rtol=1e-9, atol=1e-9)
    layer.grad_clip = None
    calls.clear()
    layer(x)
    assert calls == [], "a plain layer runs the native stack"


def test_double_backward_is_refused_with_a_clear_error():
    """The hand-written backward is not differentiable again: create_graph through it raises
    (the reference backend is the twice-differentiable path)."""
    layer = fastrnn.GRU(3, 4, dtype=F64, grad_clip=1.0)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="^double backward is not supported through fastrnn's hand-written CPU backward .*"
                                           "the twice-differentiable path is FASTRNN_BACKEND=reference$"):
        grad.sum().backward()
