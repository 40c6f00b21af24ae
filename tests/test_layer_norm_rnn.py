"""LayerNormLSTM and LayerNormGRU against hand-written float64 versions of haste's equations.

The oracle here walks every row alone up to its length, with its own layer norm of one vector
(``(v - mean) / sqrt(biased var + 1e-5) * gain + bias``), zoneout (Krueger et al. 2016) on ``h``
(and ``c``) and DropConnect drawn in the order :mod:`fastrnn.regularization` documents. Both
fastrnn paths are held to it at 1e-9 in float64: the reference backend (the autograd loop) and
the default path (the hand-written backward through time): outputs, final states and the
gradients of the input, the initial states and every parameter.
"""

from __future__ import annotations

import pytest
import torch

import fastrnn
from tests.conftest import assert_close
from tests.test_regularized_rnn import assert_matches_oracle, forward
from tests.test_regularized_rnn import handwritten as walk_rows


def layer_norm(v, gain, bias=None):
    mean = v.mean()
    var = ((v - mean) ** 2).mean()
    out = (v - mean) / torch.sqrt(var + 1e-5) * gain
    return out if bias is None else out + bias


def lstm_step(p, x, h, c, clip):
    gates = layer_norm(p["weight_ih"] @ x, p["gain_ih"]) + layer_norm(p["weight_hh"] @ h, p["gain_hh"]) + p["bias_ih"] + p["bias_hh"]
    if clip is not None and gates.requires_grad:
        gates.register_hook(lambda g: g.clamp(-clip, clip))
    i, f, g, o = gates.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(layer_norm(c, p["gain_cell"], p["bias_cell"])), c


def gru_step(p, x, h, clip):
    a = layer_norm(p["weight_ih"] @ x, p["gain_ih"]) + p["bias_ih"]
    b = layer_norm(p["weight_hh"] @ h, p["gain_hh"]) + p["bias_hh"]

    def clipped(v):
        if clip is not None and v.requires_grad:
            v.register_hook(lambda g: g.clamp(-clip, clip))
        return v

    r = torch.sigmoid(clipped(a[:len(h)] + b[:len(h)]))
    z = torch.sigmoid(clipped(a[len(h):2 * len(h)] + b[len(h):2 * len(h)]))
    n = torch.tanh(clipped(a[2 * len(h):] + r * b[2 * len(h):]))
    return (1 - z) * n + z * h


def handwritten(module, x, lengths, h0, c0, seed, clip):
    """The LayerNorm steps above walked row by row (``tests.test_regularized_rnn.handwritten``'s
    walk: masks, lengths, directions, layers). ``x (T, B, I)``; returns ``y (T, B, D*H)`` (zero
    past a row's length), ``h_n``, ``c_n`` or None."""
    return walk_rows(module, x, lengths, h0, c0, seed, clip, lstm_step=lstm_step, gru_step=gru_step)


CASES = {
    "lstm-2layer-bidir-packed-zoneout-train": ("lstm", dict(num_layers=2, bidirectional=True, zoneout=0.3), True, True),
    "lstm-zoneout-eval-forget-bias": ("lstm", dict(zoneout=0.25, forget_bias=1.0), False, True),
    "lstm-dropconnect-dropout-clip": ("lstm", dict(num_layers=2, recurrent_dropout=0.4, dropout=0.3, grad_clip=0.02), True, False),
    "gru-2layer-bidir-packed-zoneout-train": ("gru", dict(num_layers=2, bidirectional=True, zoneout=0.3), True, True),
    "gru-zoneout-eval-bidir": ("gru", dict(bidirectional=True, zoneout=0.25), False, True),
    "gru-dropconnect-clip": ("gru", dict(recurrent_dropout=0.4, grad_clip=0.02), True, False),
}


@pytest.mark.parametrize("path", ["reference", "auto"])
@pytest.mark.parametrize("name", CASES)
def test_matches_handwritten_float64(name, path):
    cell, kwargs, train, packed = CASES[name]
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 4, 6
    cls = fastrnn.LayerNormLSTM if cell == "lstm" else fastrnn.LayerNormGRU
    module = cls(I, H, dtype=torch.float64, **kwargs).train(train)
    with torch.no_grad():  # gains and the cell norm's bias away from their initial ones and zeros
        for pname, w in module.named_parameters():
            if pname.startswith(("gain", "bias_cell")):
                w.add_(0.3 * torch.randn_like(w))
    D = 2 if module.bidirectional else 1
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(module.num_layers * D, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn_like(h0, requires_grad=True) if cell == "lstm" else None
    lengths = torch.tensor([5, 2, 4]) if packed else torch.full((B,), T)
    w_y, w_h = torch.randn(T, B, D * H, dtype=torch.float64), torch.randn_like(h0)
    with fastrnn.use_backend(path):
        torch.manual_seed(7)
        y, h_n, c_n, inputs = forward(module, x, lengths, h0, c0, packed)
    want = handwritten(module, x, lengths, h0, c0, 7, module.grad_clip)
    assert_matches_oracle(module, (y, h_n, c_n), want, inputs, w_y, w_h)


@pytest.mark.parametrize("name", CASES)
def test_time_chunks_match_handwritten_float64(name, monkeypatch):
    """The hand-written path walks time in chunks (:data:`fastrnn.layer_norm_rnn.CHUNK_ELEMENTS`):
    with chunks of two steps (T=5: two full chunks and one of one step, in both directions) it
    still matches the oracle, gradients summed across chunks included."""
    import fastrnn.layer_norm_rnn

    cell = CASES[name][0]
    monkeypatch.setattr(fastrnn.layer_norm_rnn, "CHUNK_ELEMENTS", 2 * 3 * (4 if cell == "lstm" else 3) * 6)  # B3 H6
    test_matches_handwritten_float64(name, "auto")


def test_forget_bias_and_forms():
    lstm = fastrnn.LayerNormLSTM(3, 4, 2, batch_first=True, forget_bias=1.5)
    for layer in range(2):
        b_ih, b_hh = getattr(lstm, f"bias_ih_l{layer}"), getattr(lstm, f"bias_hh_l{layer}")
        assert (b_ih[4:8] == 1.5).all() and (b_hh[4:8] == 0).all() and not (b_ih[:4] == 1.5).any()
    assert (lstm.gain_ih_l0 == 1).all() and (lstm.bias_cell_l1 == 0).all()
    y, (h, c) = lstm(torch.randn(2, 5, 3))
    assert y.shape == (2, 5, 4) and h.shape == c.shape == (2, 2, 4)
    y1, (h1, c1) = lstm(torch.randn(5, 3))  # unbatched
    assert y1.shape == (5, 4) and h1.shape == (2, 4)
    gru = fastrnn.LayerNormGRU(3, 4)
    assert gru(torch.randn(5, 2, 3))[0].shape == (5, 2, 4)
    with pytest.raises(ValueError, match="forget_bias needs bias=True"):
        fastrnn.LayerNormLSTM(3, 4, bias=False, forget_bias=1.0)
    with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size"):
        lstm(torch.randn(2, 5, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 3, 4)))


def test_gradient_flow_is_recorded_on_both_paths():
    torch.manual_seed(0)
    module = fastrnn.LayerNormGRU(3, 5, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    norms = {}
    for path in ("reference", "auto"):
        with fastrnn.use_backend(path), fastrnn.record_gradient_flow() as flow:
            y, _ = module(x)
            y[-1].sum().backward()
        norms[path] = flow.norms()
    assert (norms["auto"][0] > 0).all()
    assert_close(norms["auto"], norms["reference"], atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_half_precision_runs_in_float32_on_the_handwritten_path(cell):
    """bf16 layers on the hand-written path keep states and sums in float32: outputs and gradients
    within 1% (relative norm) of the float64 oracle on the same bf16 weights and input (computed
    in bf16 throughout, the weight gradients are 3-7% off)."""
    torch.manual_seed(0)
    cls = fastrnn.LayerNormLSTM if cell == "lstm" else fastrnn.LayerNormGRU
    half = cls(8, 16, bidirectional=True, dtype=torch.bfloat16)
    x = torch.randn(12, 3, 8, dtype=torch.bfloat16)
    module = cls(8, 16, bidirectional=True, dtype=torch.float64)
    module.load_state_dict(half.state_dict())
    with fastrnn.use_backend("reference"):
        expected = module(x.double())[0]
    grads_expected = torch.autograd.grad(expected.sum(), list(module.parameters()))
    y = half(x)[0]
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y.float().sum(), list(half.parameters()))
    for actual, wanted in zip([y, *grads], [expected, *grads_expected]):
        assert actual.dtype == torch.bfloat16
        assert ((actual.double() - wanted).norm() / wanted.norm()).item() < 1e-2
