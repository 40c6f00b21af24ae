"""torch.compile(fullgraph=True) of IndRNN and of zoneout (LSTM, GRU, their LayerNorm forms, IndRNN)
on the CPU: each layer's recurrence is one registered operator (``fastrnn::indrnn_recurrence``,
``fastrnn::zoned_reference_layer``, the LayerNorm cells' per-direction operators), so the graph
is one, does not grow with ``T``, and equals eager.

The masks: zoneout's and DropConnect's are drawn in the traced graph (no operator draws), so under
one ``torch.manual_seed`` a compiled training call draws exactly what the eager call draws: same
outputs and gradients in float64, and the generator left in the same state. A different seed
changes the outputs (so the equality is the masks', not zoneout doing nothing).

Kept lean: the ``aot_eager`` backend (Dynamo and AOTAutograd trace the operators' fakes and
autograd formulas; inductor's code generation costs tens of seconds here), one compiled module per
case, a few steps and units.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.testing import assert_close

import fastrnn

F64 = dict(dtype=torch.float64)
KW = dict(bidirectional=True, batch_first=True, **F64)
LENGTHS = torch.tensor([6, 2, 4])

#: name -> (module factory, packed input?, initial state given?, masks drawn (training with zoneout/DropConnect)?)
CASES = {
    "indrnn-relu-packed-h0-clip": (lambda: fastrnn.IndRNN(3, 5, num_layers=2, grad_clip=0.05, **KW), True, True, False),
    "indrnn-tanh-zoneout-dropconnect-train": (lambda: fastrnn.IndRNN(3, 5, num_layers=2, nonlinearity="tanh", zoneout=0.3,
                                                                     recurrent_dropout=0.3, **KW), True, False, True),
    "indrnn-zoneout-eval": (lambda: fastrnn.IndRNN(3, 5, zoneout=0.3, **KW).eval(), False, False, False),
    "lstm-proj-zoneout-dropconnect-train": (lambda: fastrnn.LSTM(3, 5, num_layers=2, proj_size=2, zoneout=0.3,
                                                                 recurrent_dropout=0.2, grad_clip=0.5, **KW), True, True, True),
    "gru-zoneout-train": (lambda: fastrnn.GRU(3, 5, num_layers=2, zoneout=0.3, **KW), True, False, True),
    "gru-zoneout-eval": (lambda: fastrnn.GRU(3, 5, zoneout=0.3, **KW).eval(), False, True, False),
    "lnlstm-zoneout-dropconnect-train": (lambda: fastrnn.LayerNormLSTM(3, 5, zoneout=0.3, recurrent_dropout=0.2, **KW),
                                         True, True, True),
    "lngru-zoneout-train": (lambda: fastrnn.LayerNormGRU(3, 5, num_layers=2, zoneout=0.3, **KW), False, False, True),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _state(module, batch: int, cell: bool):
    shape = (module.num_layers * 2, batch, getattr(module, "proj_size", 0) or module.hidden_size)
    h0 = torch.randn(shape, **F64)
    return (h0, torch.randn(module.num_layers * 2, batch, module.hidden_size, **F64)) if cell else h0


def _run(fn, module, x, packed, hx, seed):
    """Outputs, final states and every gradient of one seeded call, and the generator's next draw."""
    torch.manual_seed(seed)
    inputs = pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False) if packed else x
    y, state = fn(inputs) if hx is None else fn(inputs, hx)
    y = y.data if packed else y
    outputs = [y, *(state if isinstance(state, tuple) else (state,))]
    loss = sum((t * torch.linspace(-1, 1, t.numel(), **F64).view_as(t)).sum() for t in outputs)
    grads = torch.autograd.grad(loss, [x, *module.parameters()])
    return [*outputs, *grads], torch.rand(4)


@pytest.mark.parametrize("name", CASES)
def test_compiled_fullgraph_equals_eager_and_draws_the_same_masks(name):
    make, packed, with_state, masks = CASES[name]
    torch.manual_seed(0)
    module = make()
    assert masks == (module.training and bool(module.zoneout or module.recurrent_dropout))
    x = torch.randn(3, 6, 3, requires_grad=True, **F64)
    hx = _state(module, 3, isinstance(module, (fastrnn.LSTM, fastrnn.LayerNormLSTM))) if with_state else None
    eager, eager_next = _run(module, module, x, packed, hx, seed=1)
    compiled, compiled_next = _run(torch.compile(module, fullgraph=True, backend="aot_eager"), module, x, packed, hx, seed=1)
    names = ["y", "state", "cell state"][:len(eager) - 1 - len(list(module.parameters()))]
    names += ["grad x"] + [f"grad {n}" for n, _ in module.named_parameters()]
    for what, a, e in zip(names, compiled, eager, strict=True):
        assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"{what}: {m}")
    assert torch.equal(compiled_next, eager_next), "the compiled call consumed torch's generator differently"
    if masks:  # the masks matter: another seed, other outputs
        other, _ = _run(module, module, x, packed, hx, seed=2)
        assert not torch.allclose(other[0], eager[0])


def _graph(module, steps: int, dtype=torch.float64):
    explained = torch._dynamo.explain(lambda x: module(x)[0])(torch.randn(2, steps, module.input_size, dtype=dtype))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    nodes = [n for g in explained.graphs for n in g.graph.nodes]
    return len(nodes), [n.target for n in nodes if n.op == "call_function"]


@pytest.mark.parametrize("name, operator, count", [
    ("indrnn-relu-packed-h0-clip", "indrnn_recurrence", 2),
    ("lstm-proj-zoneout-dropconnect-train", "zoned_reference_layer", 2),
    ("lngru-zoneout-train", "layer_norm_gru_direction", 4),
])
def test_one_graph_one_operator_per_layer_whatever_T(name, operator, count):
    """``torch._dynamo.explain``: one graph, no break; the layers are the operator (per layer, or per
    layer and direction), and the graph has as many nodes at T=9 as at T=4 (no unrolled loop)."""
    module = CASES[name][0]()
    nodes, targets = _graph(module, 4)
    assert targets.count(getattr(torch.ops.fastrnn, operator).default) == count
    torch._dynamo.reset()
    assert _graph(module, 9)[0] == nodes


def test_compiled_call_inside_record_gradient_flow_records_nothing():
    """As for the other layers (README): a compiled call runs as if no record were open (it used to
    fail to compile for the LayerNorm cells); the eager call records."""
    for make in (lambda: fastrnn.IndRNN(3, 4, **F64), lambda: fastrnn.LayerNormLSTM(3, 4, zoneout=0.2, **F64)):
        module = make()
        x = torch.randn(5, 2, 3, **F64)
        with fastrnn.record_gradient_flow() as flow:
            torch.compile(module, fullgraph=True, backend="aot_eager")(x)[0].sum().backward()
        assert flow.records == []
        with fastrnn.record_gradient_flow() as flow:
            module(x)[0].sum().backward()
        assert len(flow.records) == 1 and (flow.records[0].norms > 0).all()
        torch._dynamo.reset()


def test_operators_pass_opcheck():
    """Fakes match the real outputs (shapes, strides), the autograd formulas are registered, the
    schemas hold: IndRNN's recurrence (lengths, a zoneout mask) and the zoned GRU loop (no biases)."""
    import fastrnn.zoneout_op  # noqa: F401  (registers the loop's operator: alone, nothing else here has imported it)

    torch.manual_seed(0)
    T, B, D, H = 4, 2, 2, 3
    gx = torch.randn(T, B, D * H, **F64, requires_grad=True)
    u = torch.rand(D, H, **F64, requires_grad=True)
    h0 = torch.randn(D, B, H, **F64, requires_grad=True)
    keep = (torch.rand(T, B, D * H) < 0.3).double()
    torch.library.opcheck(torch.ops.fastrnn.indrnn_recurrence.default,
                          (gx, u, h0, torch.tensor([4, 2]), keep, 0.3, "tanh", 0.5, False))
    weights = [torch.randn(3 * H, 3, **F64, requires_grad=True) if i % 2 == 0 else
               torch.randn(3 * H, H, **F64, requires_grad=True) for i in range(2 * D)]
    x = torch.randn(B, T, 3, **F64).transpose(0, 1).requires_grad_()  # a time-major view of batch-first data
    torch.library.opcheck(torch.ops.fastrnn.zoned_reference_layer.default,
                          ("gru", x, h0, None, weights, [0, 1, 5, 6], None, None, 0.3, None))


def _indrnn_output(gx):
    return torch.ops.fastrnn.indrnn_recurrence(gx, torch.rand(1, 3, **F64), torch.zeros(1, 2, 3, **F64), None, None, 0.0,
                                               "relu", None, False)[0]


def _zoned_loop_output(x):
    import fastrnn.zoneout_op  # noqa: F401  (registers the operator; fastrnn.regularized_rnn imports it too)

    weights = [torch.randn(9, 3, **F64), torch.randn(9, 3, **F64)]
    return torch.ops.fastrnn.zoned_reference_layer("gru", x, torch.zeros(1, 2, 3, **F64), None, weights, [0, 1], None,
                                                   None, 0.0, None)[0]


def _zoneout_kernel_output(gx):
    """The resident GRU kernels under the interpreter (fp32: the kernels' dtypes)."""
    gx = gx.float()
    return torch.ops.fastrnn.gru_zoneout_recurrence(gx, torch.randn(1, 9, 3), None, torch.zeros(1, 2, 3), None, None,
                                                    0.0, None)[0]


@pytest.mark.parametrize("through, output, input_size", [
    ("fastrnn::indrnn_recurrence", _indrnn_output, 3),
    ("fastrnn::zoned_reference_layer", _zoned_loop_output, 3),
    ("fastrnn's zoneout kernels", _zoneout_kernel_output, 9),
], ids=["indrnn", "zoned-loop", "zoneout-kernels"])
def test_double_backward_through_the_operator_says_where_it_works(through, output, input_size):
    """Called directly (torch.compile's aot_autograd refuses double backward before it gets there):
    each backward operator's refusal names it and the twice-differentiable path."""
    if output is _zoneout_kernel_output:
        pytest.importorskip("triton")
        import fastrnn.ops.zoneout  # noqa: F401  (registers the kernels' operators)
    x = torch.randn(4, 2, input_size, **F64, requires_grad=True)
    (grad,) = torch.autograd.grad(output(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"^double backward is not supported through {through}.*FASTRNN_BACKEND=reference$"):
        grad.sum().backward()


def test_indrnn_scan_kernel_runs_inside_the_operator_under_the_interpreter():
    """FASTRNN_BACKEND=triton on CPU tensors (Triton's interpreter): the compiled IndRNN runs the scan
    kernels inside its operator (per layer: the forward, and in backward the forward again and the
    backward scan), with zoneout masks and lengths; results equal eager's kernel path."""
    from fastrnn.ops.recurrence import LAUNCHES

    torch.manual_seed(0)
    module = fastrnn.IndRNN(4, 6, num_layers=2, zoneout=0.25, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 4, requires_grad=True)
    lengths = torch.tensor([5, 2, 4])

    def run(fn):
        torch.manual_seed(3)
        y, h_n = fn(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
        loss = (y.data * torch.linspace(-1, 1, y.data.numel()).view_as(y.data)).sum() + (h_n * h_n).sum()
        return [y.data, h_n, *torch.autograd.grad(loss, [x, *module.parameters()])]

    with fastrnn.use_backend("triton"):
        before = LAUNCHES.copy()
        eager = run(module)
        assert LAUNCHES["indrnn_fwd"] - before["indrnn_fwd"] == 2 and LAUNCHES["indrnn_bwd"] - before["indrnn_bwd"] == 2
        before = LAUNCHES.copy()
        compiled = run(torch.compile(module, fullgraph=True, backend="aot_eager"))
    assert (LAUNCHES["indrnn_fwd"] - before["indrnn_fwd"], LAUNCHES["indrnn_bwd"] - before["indrnn_bwd"]) == (4, 2)
    for a, e in zip(compiled, eager, strict=True):
        assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm-proj", "gru"])
def test_zoneout_kernels_run_inside_their_operators_under_the_interpreter(cell):
    """FASTRNN_BACKEND=triton on CPU tensors: a compiled zoneout LSTM (with projection) / GRU runs the
    resident kernels inside ``fastrnn::lstm_zoneout_recurrence`` / ``gru_zoneout_recurrence`` (per
    layer: the forward launch, and in backward the forward again and the backward), masks drawn as
    eager draws them; results equal eager's kernel path."""
    from fastrnn.ops.recurrence import LAUNCHES

    torch.manual_seed(0)
    kw = dict(bidirectional=True, batch_first=True, zoneout=0.25)
    module = fastrnn.LSTM(4, 6, proj_size=3, **kw) if cell == "lstm-proj" else fastrnn.GRU(4, 6, **kw)
    x = torch.randn(3, 5, 4, requires_grad=True)

    def run(fn):
        torch.manual_seed(3)
        y, _ = fn(pack_padded_sequence(x, torch.tensor([5, 2, 4]), batch_first=True, enforce_sorted=False))
        loss = (y.data * torch.linspace(-1, 1, y.data.numel()).view_as(y.data)).sum()
        return [y.data, *torch.autograd.grad(loss, [x, *module.parameters()])]

    with fastrnn.use_backend("triton"):
        assert fastrnn.explain(module, x).startswith("triton")
        before = sum(LAUNCHES.values())
        eager = run(module)
        assert sum(LAUNCHES.values()) - before == 2
        _, targets = _graph(module, 5, torch.float32)  # the operators are registered once fastrnn.ops.zoneout is imported
        name = "lstm_zoneout_recurrence" if cell == "lstm-proj" else "gru_zoneout_recurrence"
        assert targets.count(getattr(torch.ops.fastrnn, name).default) == 1
        torch._dynamo.reset()
        before = sum(LAUNCHES.values())
        compiled = run(torch.compile(module, fullgraph=True, backend="aot_eager"))
    assert sum(LAUNCHES.values()) - before == 3
    for a, e in zip(compiled, eager, strict=True):
        assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda: fastrnn.IndRNN(3, 4, num_layers=2, zoneout=0.3, recurrent_dropout=0.2, **KW),
    lambda: fastrnn.LayerNormLSTM(3, 4, zoneout=0.3, **KW),
], ids=["indrnn", "lnlstm"])
def test_forward_lengths_is_forward_on_the_packed_input(make):
    """What the topologies run while compiling: padded input with lengths gives the packed call's
    outputs (padded again) and final states, masks and all, under one seed (eager, no compile)."""
    torch.manual_seed(0)
    module = make()
    x = torch.randn(3, 6, 3, **F64)
    torch.manual_seed(1)
    y_packed, state_packed = module(pack_padded_sequence(x, LENGTHS, batch_first=True, enforce_sorted=False))
    torch.manual_seed(1)
    y, state = module.forward_lengths(x, LENGTHS)
    padded, _ = torch.nn.utils.rnn.pad_packed_sequence(y_packed, batch_first=True, total_length=6)
    assert_close(y, padded, rtol=1e-12, atol=1e-12)
    for a, e in zip(state if isinstance(state, tuple) else (state,), state_packed if isinstance(state, tuple) else (state_packed,)):
        assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cell", ["indrnn", "lngru"])
def test_topology_with_lengths_on_the_new_cells_compiles_fullgraph(cell):
    """ManyToOne with lengths on IndRNN / LayerNormGRU: one graph, no break, equal to eager."""
    torch.manual_seed(0)
    module = fastrnn.ManyToOne(3, 4, 2, cell=cell, num_layers=2, bidirectional=True, **F64)
    x = torch.randn(3, 6, 3, **F64)
    explained = torch._dynamo.explain(module)(x, LENGTHS)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")(x, LENGTHS)
    assert_close(compiled, module(x, LENGTHS), rtol=1e-10, atol=1e-10)


def test_new_sequence_length_or_batch_compiles_once_after_the_first_dynamic_recompile():
    """As tests/test_compile.py counts it for the LSTM: static first, then T symbolic, then B
    symbolic, and no compile after, for IndRNN and a zoneout GRU (calls of the compiler backend)."""
    for module in (fastrnn.IndRNN(3, 4, num_layers=2, **KW), fastrnn.GRU(3, 4, zoneout=0.2, batch_first=True, **F64)):
        torch._dynamo.reset()
        backend_calls = []

        def counting_backend(graph_module, example_inputs):
            backend_calls.append(len(example_inputs))
            return graph_module.forward

        compiled = torch.compile(module, fullgraph=True, backend=counting_backend)
        for batch, steps in [(2, 3), (2, 5), (2, 7), (3, 7), (4, 6)]:  # (2, 5): T symbolic; (3, 7): B symbolic
            y, _ = compiled(torch.randn(batch, steps, 3, **F64))
            y.sum().backward()
        assert len(backend_calls) == 3, (type(module).__name__, backend_calls)
