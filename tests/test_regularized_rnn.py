"""``zoneout``, ``recurrent_dropout`` and ``forget_bias`` on fastrnn.LSTM and fastrnn.GRU, against
hand-written float64 torch.nn equations walked row by row, with the masks drawn in the order
:mod:`fastrnn.regularization` documents (1e-9: outputs, final states, every gradient)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from tests.conftest import assert_close


def lstm_cell(p, x, h, c, clip):
    gates = p["weight_ih"] @ x + p["bias_ih"] + p["weight_hh"] @ h + p["bias_hh"]
    if clip is not None and gates.requires_grad:
        gates.register_hook(lambda g: g.clamp(-clip, clip))
    i, f, g, o = gates.chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    m = torch.sigmoid(o) * torch.tanh(c)
    return (p["weight_hr"] @ m if "weight_hr" in p else m), c  # torch.nn's projection: h = W_hr m


def gru_cell(p, x, h, clip):
    H = len(h)
    a, b = p["weight_ih"] @ x + p["bias_ih"], p["weight_hh"] @ h + p["bias_hh"]
    r = torch.sigmoid(a[:H] + b[:H])
    z = torch.sigmoid(a[H:2 * H] + b[H:2 * H])
    n = torch.tanh(a[2 * H:] + r * b[2 * H:])
    return (1 - z) * n + z * h


def handwritten(module, x, lengths, h0, c0, seed, clip, lstm_step=lstm_cell, gru_step=gru_cell):
    """``module``'s layers walked row by row in float64, each row up to its length, with the masks
    of ``fastrnn.regularization`` drawn from ``seed`` (dropout between layers, DropConnect on
    ``W_hh``, zoneout on ``h`` and ``c``); a step is ``lstm_step(p, x, h, c, clip) -> (h, c)`` or
    ``gru_step(p, x, h, clip) -> h`` (``p``: one direction's parameters without the layer suffix).
    With ``proj_size`` (LSTM) ``h`` has ``P`` units, zoned by the mask's first ``P`` of the direction.
    ``x (T, B, I)``; returns ``y (T, B, D*K)`` (``K``: P or H; zero past a row's length), ``h_n``, ``c_n`` or None."""
    torch.manual_seed(seed)
    T, B, _ = x.shape
    H, D, pz = module.hidden_size, 2 if module.bidirectional else 1, module.zoneout
    finals = {}
    for layer in range(module.num_layers):
        if layer > 0 and module.dropout and module.training:
            x = torch.nn.functional.dropout(x, module.dropout, training=True)
        params = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            p = {name[:-len(sfx)]: w.double() for name, w in module.named_parameters() if name.endswith(sfx)}
            if module.recurrent_dropout and module.training:
                p["weight_hh"] = p["weight_hh"] * (torch.rand(p["weight_hh"].shape) >= module.recurrent_dropout) / (1 - module.recurrent_dropout)
            params.append(p)
        mask = (torch.rand(T, B, D * H) < pz).double() if pz and module.training else None
        out = {}
        for d, p in enumerate(params):
            for row in range(B):
                h, c = h0[layer * D + d, row], (None if c0 is None else c0[layer * D + d, row])
                steps = range(int(lengths[row]))
                for t in (reversed(steps) if d else steps):
                    h_new, c_new = lstm_step(p, x[t, row], h, c, clip) if c is not None else (gru_step(p, x[t, row], h, clip), None)
                    if pz:
                        keep = mask[t, row, d * H:(d + 1) * H] if mask is not None else pz
                        keep_h = keep[:len(h)] if mask is not None else pz
                        h_new = keep_h * h + (1 - keep_h) * h_new
                        c_new = None if c is None else keep * c + (1 - keep) * c_new
                    h, c = h_new, c_new
                    out[t, row, d] = h
                finals[layer * D + d, row] = (h, c)
        zero = x.new_zeros(getattr(module, "proj_size", 0) or H)
        x = torch.stack([torch.stack([torch.cat([out.get((t, r, d), zero) for d in range(D)]) for r in range(B)]) for t in range(T)])
    keys = range(module.num_layers * D)
    h_n = torch.stack([torch.stack([finals[k, r][0] for r in range(B)]) for k in keys])
    c_n = None if c0 is None else torch.stack([torch.stack([finals[k, r][1] for r in range(B)]) for k in keys])
    return x, h_n, c_n


def forward(module, x, lengths, h0, c0, packed):
    """``module`` on ``x (T, B, I)`` (packed by ``lengths``, unsorted, when ``packed``) from ``h0``
    (and ``c0`` for an LSTM): ``y`` padded to T, ``h_n``, ``c_n`` (None without ``c0``), and the
    leaves whose gradients the tests compare (``x``, ``h0``, ``c0``, every parameter)."""
    hx = h0 if c0 is None else (h0, c0)
    if packed:
        out, state = module(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        y, _ = pad_packed_sequence(out, total_length=x.shape[0])
    else:
        y, state = module(x, hx)
    h_n, c_n = (state, None) if c0 is None else state
    return y, h_n, c_n, [x, h0, *([] if c0 is None else [c0]), *module.parameters()]


def weighted_loss(y, h_n, c_n, w_y, w_h):
    """A loss weighing every element of ``y``, ``h_n`` and ``c_n`` (``c_n`` by ``w_h`` flipped; a
    projected ``h_n`` by its first ``P`` units), in float64."""
    return ((y.double() * w_y).sum() + (h_n.double() * w_h[..., :h_n.shape[-1]]).sum()
            + (0 if c_n is None else (c_n.double() * w_h.flip(0)).sum()))


def assert_matches_oracle(module, got, want, inputs, w_y, w_h, atol=1e-9):
    """``got`` and ``want`` (each ``(y, h_n, c_n or None)``) agree within ``atol``, and so do the
    gradients of :func:`weighted_loss` of each with respect to ``inputs`` (as :func:`forward`
    returns them: ``x``, ``h0``, ``c0``, then ``module``'s parameters, named in the message)."""
    grads = torch.autograd.grad(weighted_loss(*got, w_y, w_h), inputs)
    grads_ref = torch.autograd.grad(weighted_loss(*want, w_y, w_h), inputs)
    for name, a, e in zip(("y", "h_n", "c_n"), got, want):
        if e is not None:
            assert_close(a, e, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    names = ["x", "h0", "c0"][:len(inputs) - len(list(module.parameters()))] + [n for n, _ in module.named_parameters()]
    for name, g, g_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(g, g_ref, atol=atol, msg=lambda m, name=name: f"d {name}: {m}")


CASES = {
    "lstm-2layer-bidir-packed-zoneout-train": ("lstm", dict(num_layers=2, bidirectional=True, zoneout=0.3), True, True),
    "lstm-zoneout-eval-forget-bias": ("lstm", dict(zoneout=0.25, forget_bias=1.0), False, True),
    "lstm-dropconnect-dropout-clip": ("lstm", dict(num_layers=2, recurrent_dropout=0.4, dropout=0.3, grad_clip=0.02), True, False),
    "gru-bidir-packed-zoneout-train-dropconnect": ("gru", dict(bidirectional=True, zoneout=0.3, recurrent_dropout=0.3), True, True),
    "gru-zoneout-eval": ("gru", dict(zoneout=0.25), False, False),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_handwritten_float64(name):
    cell, kwargs, train, packed = CASES[name]
    torch.manual_seed(0)
    T, B, I, H = 5, 3, 4, 6
    module = (fastrnn.LSTM if cell == "lstm" else fastrnn.GRU)(I, H, dtype=torch.float64, **kwargs).train(train)
    D = 2 if module.bidirectional else 1
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(module.num_layers * D, B, H, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn_like(h0, requires_grad=True) if cell == "lstm" else None
    lengths = torch.tensor([5, 2, 4]) if packed else torch.full((B,), T)
    w_y, w_h = torch.randn(T, B, D * H, dtype=torch.float64), torch.randn_like(h0)
    torch.manual_seed(3)
    y, h_n, c_n, inputs = forward(module, x, lengths, h0, c0, packed)
    want = handwritten(module, x, lengths, h0, c0, 3, module.grad_clip)
    assert_matches_oracle(module, (y, h_n, c_n), want, inputs, w_y, w_h)


def test_forget_bias_keeps_the_torch_nn_contract():
    lstm = fastrnn.LSTM(3, 4, 2, forget_bias=1.0)
    assert (lstm.bias_ih_l1[4:8] == 1).all() and (lstm.bias_hh_l1[4:8] == 0).all()
    plain = torch.nn.LSTM(3, 4, 2)
    plain.load_state_dict(lstm.state_dict())
    x = torch.randn(5, 2, 3)
    assert_close(lstm(x)[0], plain(x)[0], atol=1e-6)
    lstm.reset_parameters()
    assert (lstm.bias_ih_l0[4:8] == 1).all()
    assert fastrnn.LSTM(3, 4).bias_hh_l0[4:8].abs().sum() > 0  # default: torch.nn's initialisation


def test_recurrent_dropout_is_off_in_eval_and_zoneout_needs_a_probability():
    torch.manual_seed(0)
    gru = fastrnn.GRU(3, 4, recurrent_dropout=0.5).eval()
    plain = torch.nn.GRU(3, 4)
    plain.load_state_dict(gru.state_dict())
    x = torch.randn(5, 2, 3)
    assert torch.equal(gru(x)[0], plain(x)[0])  # eval, no zoneout: the native path, bit for bit
    gru.train()
    assert not torch.allclose(gru(x)[0], plain(x)[0])
    with pytest.raises(ValueError, match="zoneout"):
        fastrnn.LSTM(3, 4, zoneout=-0.1)
