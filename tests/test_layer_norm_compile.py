"""torch.compile of LayerNormLSTM / LayerNormGRU on the CPU: each direction of each layer is one
registered operator (``fastrnn::layer_norm_lstm_direction``, ``fastrnn::layer_norm_gru_direction``,
:mod:`fastrnn.layer_norm_op`), so ``fullgraph=True`` traces a whole layer stack as one graph.

Kept lean: the compiled runs use the ``aot_eager`` backend (Dynamo and AOTAutograd trace the
operators' fakes and autograd formulas; no inductor code generation, which costs a minute here),
and ``torch.library.opcheck`` holds the fakes (shapes, strides) and the autograd registration to
the real operators. Float64: compiled and eager run the same code, so they agree exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

F64 = dict(dtype=torch.float64)
CASES = {
    "lstm-packed-clip": (lambda: fastrnn.LayerNormLSTM(3, 5, num_layers=2, bidirectional=True, batch_first=True,
                                                       grad_clip=0.05, **F64), True),
    "gru-zoneout-eval": (lambda: fastrnn.LayerNormGRU(3, 5, num_layers=2, bidirectional=True, batch_first=True,
                                                      zoneout=0.2, **F64).eval(), False),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _outputs_and_grads(fn, module, x, packed):
    inputs = pack_padded_sequence(x, torch.tensor([6, 2, 4]), batch_first=True, enforce_sorted=False) if packed else x
    y, state = fn(inputs)
    y = y.data if packed else y
    outputs = [y, *(state if isinstance(state, tuple) else (state,))]
    loss = sum((t * torch.linspace(-1, 1, t.numel(), **F64).view_as(t)).sum() for t in outputs)
    return outputs, torch.autograd.grad(loss, [x, *module.parameters()])


@pytest.mark.parametrize("name", CASES)
def test_compiled_fullgraph_equals_eager_in_float64(name):
    make, packed = CASES[name]
    torch.manual_seed(0)
    module = make()
    x = torch.randn(3, 6, 3, requires_grad=True, **F64)
    eager, eager_grads = _outputs_and_grads(module, module, x, packed)
    compiled, grads = _outputs_and_grads(torch.compile(module, fullgraph=True, backend="aot_eager"), module, x, packed)
    for a, e in zip([*compiled, *grads], [*eager, *eager_grads], strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


def test_one_graph_one_operator_per_direction_and_layer():
    lstm, _ = CASES["lstm-packed-clip"]
    module = lstm()
    explained = torch._dynamo.explain(lambda x: module(x)[0])(torch.randn(3, 6, 3, **F64))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fastrnn.layer_norm_lstm_direction.default) == 4  # 2 layers x 2 directions


def _operator_and_args(cell):
    """One direction's operator and its arguments: lengths and reverse (LSTM), zoneout and clip (GRU)."""
    torch.manual_seed(0)
    T, B, I, H = 4, 2, 3, 5
    G = 4 if cell == "lstm" else 3
    x = torch.randn(B, T, I, **F64).transpose(0, 1).requires_grad_()  # time-major view of batch-first data
    w = dict(w_ih=torch.randn(G * H, I, **F64), gain_ih=1 + 0.1 * torch.randn(G * H, **F64), bias=torch.randn(G * H, **F64),
             w_hh=torch.randn(G * H, H, **F64), gain_hh=1 + 0.1 * torch.randn(G * H, **F64))
    w = {k: v.requires_grad_() for k, v in w.items()}
    h0 = torch.randn(B, H, **F64, requires_grad=True)
    if cell == "lstm":
        args = (x, w["w_ih"], w["gain_ih"], w["bias"], w["w_hh"], w["gain_hh"], torch.ones(H, **F64, requires_grad=True),
                torch.zeros(H, **F64, requires_grad=True), h0, torch.randn(B, H, **F64, requires_grad=True),
                torch.tensor([4, 2]), True, None, 0.0, None, None)
        return torch.ops.fastrnn.layer_norm_lstm_direction.default, args
    args = (x, w["w_ih"], w["gain_ih"], w["bias"], w["w_hh"], w["gain_hh"], torch.randn(G * H, **F64, requires_grad=True),
            h0, None, False, None, 0.3, 0.5, None)
    return torch.ops.fastrnn.layer_norm_gru_direction.default, args


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_operators_pass_opcheck(cell):
    """Fakes match the real outputs (shapes and strides, a non-contiguous input included), the
    autograd formula is registered, the schema holds."""
    torch.library.opcheck(*_operator_and_args(cell))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_double_backward_through_the_operator_says_where_it_works(cell):
    """The backward operator is not differentiable again: its refusal names the hand-written
    LayerNorm backward and the twice-differentiable path."""
    operator, args = _operator_and_args(cell)
    x = args[0]
    (grad,) = torch.autograd.grad(operator(*args)[0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="^double backward is not supported through fastrnn's hand-written LayerNorm "
                                           r"backward \(torch.compile\).*FASTRNN_BACKEND=reference$"):
        grad.sum().backward()
