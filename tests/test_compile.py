"""torch.compile on the CPU: every layer is one registered operator (``fastrnn::native_bptt_layer``:
PyTorch's native forward inside, fastrnn's hand-written backward), so Dynamo traces a layer as
one node whatever T is, without graph breaks, and a new T or batch size does not recompile once
automatic dynamic shapes have kicked in.

Kept few and small: each compile costs seconds on a 2-core machine. Float64 throughout, so that
compiled and eager agree to rounding (eager runs torch's native backward, compiled fastrnn's).
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.testing import assert_close
from torch.utils._pytree import tree_leaves

import fastrnn

F64 = dict(dtype=torch.float64)

LAYERS = {
    "lstm-proj": lambda: fastrnn.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2, batch_first=True, **F64),
    "gru": lambda: fastrnn.GRU(3, 5, num_layers=2, bidirectional=True, batch_first=True, **F64),
    "rnn": lambda: fastrnn.RNN(3, 5, num_layers=2, bidirectional=True, batch_first=True, **F64),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def outputs_and_grads(fn, params, make_args, wrt):
    """Every tensor ``fn(*make_args())`` returns, and the gradients of a loss on all of them."""
    outputs = [t for t in tree_leaves(fn(*make_args())) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    loss = sum((t * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view_as(t)).sum() for t in outputs)
    return outputs, torch.autograd.grad(loss, [*params, *wrt])


def assert_compiled_matches_eager(module, fn, make_args, wrt):
    params = list(module.parameters())
    eager, eager_grads = outputs_and_grads(fn, params, make_args, wrt)
    compiled, compiled_grads = outputs_and_grads(torch.compile(fn, fullgraph=True), params, make_args, wrt)
    assert len(compiled) == len(eager)
    for a, e in zip(compiled, eager):
        assert_close(a, e, rtol=1e-10, atol=1e-10)
    names = [n for n, _ in module.named_parameters()] + [f"input {i}" for i in range(len(wrt))]
    for name, a, e in zip(names, compiled_grads, eager_grads, strict=True):
        assert_close(a, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_on_packed_input_compiles_fullgraph_and_matches_eager(name):
    """Two layers, bidirectional (LSTM with projection), a PackedSequence in: compiled output,
    final states and every gradient equal eager's."""
    torch.manual_seed(0)
    layer = LAYERS[name]()
    x = torch.randn(3, 6, 3, requires_grad=True, **F64)

    def run(p):
        y, state = layer(p)
        return y.data, state

    def make_args():
        return (pack_padded_sequence(x, torch.tensor([6, 2, 4]), batch_first=True, enforce_sorted=False),)

    assert_compiled_matches_eager(layer, run, make_args, [x])


TOPOLOGIES = {
    "many-to-many": (lambda: fastrnn.ManyToMany(3, 4, 2, cell="gru", bidirectional=True, **F64), lambda x, n: (x, n)),
    "many-to-one": (lambda: fastrnn.ManyToOne(3, 4, 2, cell="lstm", num_layers=2, **F64), lambda x, n: (x, n)),
    "one-to-many": (lambda: fastrnn.OneToMany(3, 4, 3, cell="rnn", feedback=True, **F64), lambda x, n: (x[:, 0], 4)),
    "seq2seq": (lambda: fastrnn.Seq2Seq(3, 4, 3, cell="lstm", **F64), lambda x, n: (x, x[:, :3].flip(1), n)),
    "one-to-one": (lambda: fastrnn.OneToOne(3, 4, 2, cell="lstm", **F64), lambda x, n: (x[:, 0],)),
}


@pytest.mark.parametrize("name", list(TOPOLOGIES))
def test_topology_compiles_fullgraph_and_matches_eager(name):
    """The five modules, with lengths where they take them: compiled equals eager, gradients too."""
    make, arguments = TOPOLOGIES[name]
    torch.manual_seed(0)
    module = make()
    x = torch.randn(3, 5, 3, requires_grad=True, **F64)
    assert_compiled_matches_eager(module, lambda *a: module(*a), lambda: arguments(x, torch.tensor([5, 2, 4])), [x])


def test_no_graph_break_one_graph_one_op_per_layer():
    """torch._dynamo.explain: one graph, no break, for packed input through a 2-layer GRU and for
    ManyToOne with lengths; the layers are the registered operator, one call each."""
    gru = LAYERS["gru"]()
    x = torch.randn(3, 6, 3, **F64)
    packed = pack_padded_sequence(x, torch.tensor([6, 2, 4]), batch_first=True, enforce_sorted=False)
    explained = torch._dynamo.explain(lambda p: gru(p)[0].data)(packed)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.fastrnn.native_bptt_layer.default) == 2

    classifier = fastrnn.ManyToOne(3, 4, 2, cell="lstm", **F64)
    explained = torch._dynamo.explain(classifier)(x, torch.tensor([6, 2, 4]))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_new_sequence_length_or_batch_compiles_once_after_the_first_dynamic_recompile():
    """Automatic dynamic shapes (torch.compile's default ``dynamic=None``): the second T recompiles
    with T symbolic; further T do not. The same for the batch size. Counted two ways: frames
    Dynamo compiled (``torch._dynamo.utils.counters``) and calls of the compiler backend."""
    lstm = fastrnn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, **F64)
    backend_calls = []

    def counting_backend(graph_module, example_inputs):
        backend_calls.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return graph_module.forward

    compiled = torch.compile(lstm, fullgraph=True, backend=counting_backend)
    torch._dynamo.utils.counters.clear()
    with fastrnn.record_gradient_flow() as flow:
        for batch, steps in [(2, 3), (2, 5), (2, 7), (2, 9), (3, 9), (4, 6), (5, 11)]:
            y, _ = compiled(torch.randn(batch, steps, 3, **F64))
            assert y.shape == (batch, steps, 8)
            y.sum().backward()
    # (2, 3): first compile, static. (2, 5): T turns dynamic. (3, 9): B turns dynamic. None after.
    assert len(backend_calls) == 3, backend_calls
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
    assert flow.records == [], "under torch.compile the gradient flow is not recorded (documented)"


@pytest.mark.parametrize("cell", ["lstm-proj", "gru"])
def test_triton_path_compiles_fullgraph_under_the_interpreter(cell):
    """The kernel path's registered operators under torch.compile, on CPU tensors through Triton's
    interpreter: Dynamo traces the fakes, the launchers run inside the operators (so the launch
    counter still counts: two layers, forward and backward), results equal eager's."""
    from fastrnn.ops.recurrence import LAUNCHES

    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, batch_first=True)
    layer = fastrnn.LSTM(4, 6, proj_size=3, **kw) if cell == "lstm-proj" else fastrnn.GRU(4, 6, **kw)
    x = torch.randn(3, 5, 4, requires_grad=True)

    def make_args():
        return (pack_padded_sequence(x, torch.tensor([5, 2, 4]), batch_first=True, enforce_sorted=False),)

    def run(p):
        return layer(p)[0].data

    params = list(layer.parameters())
    with fastrnn.use_backend("triton"):
        eager, eager_grads = outputs_and_grads(run, params, make_args, [x])
        before = sum(LAUNCHES.values())
        compiled, grads = outputs_and_grads(torch.compile(run, fullgraph=True), params, make_args, [x])
    assert sum(LAUNCHES.values()) - before == 4
    assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, e in zip(grads, eager_grads, strict=True):
        assert_close(a, e, rtol=1e-5, atol=1e-5)
