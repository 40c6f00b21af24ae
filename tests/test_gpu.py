"""Checks that only a GPU can make: compiled kernels under torch.compile, bf16 on tensor cores,
bit-for-bit determinism on the device, and int64 addressing past 2**31 elements.

Skipped without CUDA (CI has none); ``bench/gpu_check.sh`` runs them on a lent GPU.
"""

import pytest
import torch

import fastrnn
from fastrnn.ops import step_graph
from fastrnn.ops.recurrence import LAUNCHES

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def kernels():
    """These tests are about the kernels: under ``auto`` a plain call on CUDA runs cuDNN."""
    with fastrnn.use_backend("triton"):
        yield

LAYERS = {
    "rnn": lambda **kw: fastrnn.RNN(32, 64, **kw),
    "gru": lambda **kw: fastrnn.GRU(32, 64, **kw),
    "lstm": lambda **kw: fastrnn.LSTM(32, 64, **kw),
    "lstm-proj": lambda **kw: fastrnn.LSTM(32, 64, proj_size=32, **kw),
}


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_fullgraph_matches_eager(name):
    """The kernels' registered operators compile with fullgraph=True, forward and backward."""
    torch.manual_seed(0)
    layer = LAYERS[name](num_layers=2, bidirectional=True, batch_first=True, device="cuda")
    x = torch.randn(4, 9, 32, device="cuda", requires_grad=True)

    def loss(inp):
        y, _ = layer(inp)
        return y.square().mean()

    eager = loss(x)
    (eager_grad,) = torch.autograd.grad(eager, x)
    compiled = torch.compile(loss, fullgraph=True)
    value = compiled(x)
    (grad,) = torch.autograd.grad(value, x)
    assert relative_error(value, eager) < 1e-5
    assert relative_error(grad, eager_grad) < 1e-4


@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_packed_bf16_autocast_no_graph_break_no_recompile(name):
    """On the Triton path: packed input under bf16 autocast compiles fullgraph (one graph, no
    break, one operator per layer), equals eager (output and input gradient), the kernels launch
    inside the compiled graph, and new T / batch sizes compile once after the first dynamic recompile."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LAYERS[name](num_layers=2, bidirectional=True, batch_first=True, device="cuda")

    def loss(packed):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(packed)
        return y.data.float().square().mean()

    def packed_input(batch, steps, x=None):
        x = torch.randn(batch, steps, 32, device="cuda", requires_grad=True) if x is None else x
        lengths = torch.arange(steps, steps - batch, -1).clamp_min(1)
        return x, pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)

    x, packed = packed_input(4, 9)
    explained = torch._dynamo.explain(loss)(packed)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager = loss(packed)
    (eager_grad,) = torch.autograd.grad(eager, x)
    calls = []

    def counting_inductor(gm, example_inputs):
        calls.append(1)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(loss, fullgraph=True, backend=counting_inductor)
    x, packed = packed_input(4, 9, x)
    before = sum(LAUNCHES.values())
    value = compiled(packed)
    (grad,) = torch.autograd.grad(value, x)
    assert sum(LAUNCHES.values()) - before == 4, "two layers, forward and backward, launched inside the graph"
    assert relative_error(value, eager) < 2e-2
    assert relative_error(grad, eager_grad) < 5e-2
    for batch, steps in [(4, 13), (4, 17), (6, 17), (5, 21)]:
        x, packed = packed_input(batch, steps)
        compiled(packed).backward()
    assert len(calls) == 3, f"compiles: first, T dynamic, B dynamic; got {len(calls)}"


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_on_tensor_cores(name, dtype):
    torch.manual_seed(0)
    layer = LAYERS[name](num_layers=2, bidirectional=True, device="cuda", dtype=dtype)
    x = torch.randn(12, 5, 32, device="cuda", dtype=dtype)
    before = sum(LAUNCHES.values())
    y, _ = layer(x)
    y.float().square().sum().backward()
    assert sum(LAUNCHES.values()) - before == 4, "the kernels run forward and backward per layer"
    grads = [p.grad.clone() for p in layer.parameters()]
    layer64 = layer.double()
    layer64.zero_grad()
    with fastrnn.use_backend("reference"):
        y64, _ = layer64(x.double())
    y64.square().sum().backward()
    assert relative_error(y, y64) < 2e-2
    for g, p in zip(grads, layer64.parameters()):
        assert relative_error(g, p.grad) < 5e-2


def _fp32_error_vs_float64(layer, x, allow_tf32: bool) -> float:
    """The LSTM's fp32 kernels follow cuDNN's RNN flag (``fastrnn.ops.recurrence.input_precision``)."""
    flag = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = allow_tf32
        y, _ = layer(x)
    finally:
        torch.backends.cudnn.allow_tf32 = flag
    with fastrnn.use_backend("reference"):
        y64, _ = layer.double()(x.double())
    layer.float()
    return relative_error(y, y64)


def test_fp32_persistent_lstm_on_tensor_cores_is_near_fp32(monkeypatch):
    """The fp32 persistent LSTM (forced, H256) with tf32 disallowed runs its products as ``tf32x4``
    (``fastrnn.kernels.precision``): within 1e-5 of float64, where allowing tf32 is visibly less
    exact (the same kernel with ``tf32`` products, what L5 plans by default: still within the
    project's tf32 bound, ``bench.accuracy.TF32_TOLERANCE``)."""
    monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
    torch.manual_seed(0)
    layer = fastrnn.LSTM(32, 256, device="cuda")
    x = torch.randn(16, 16, 32, device="cuda")
    split = _fp32_error_vs_float64(layer, x, allow_tf32=False)
    tf32 = _fp32_error_vs_float64(layer, x, allow_tf32=True)
    assert split < 1e-5 and 10 * split < tf32 < 1e-2, (split, tf32)


@pytest.mark.parametrize("name", list(LAYERS))
def test_bitwise_deterministic(name):
    torch.manual_seed(0)
    layer = LAYERS[name](num_layers=2, bidirectional=True, device="cuda")
    x = torch.randn(16, 33, 32, device="cuda")
    results = []
    for _ in range(2):
        layer.zero_grad()
        y, _ = layer(x)
        y.square().sum().backward()
        results.append([y.detach().clone()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_offsets_past_two_to_the_31():
    """T*B*H > 2**31: the last steps are written where they belong (int64 offsets)."""
    B, H = 256, 64
    T = 2**31 // (B * H) + 2
    torch.manual_seed(0)
    layer = fastrnn.RNN(8, H, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(T, B, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y, h_n = layer(x)
        gx = torch.nn.functional.linear(x[-1].float(), layer.weight_ih_l0.float(), (layer.bias_ih_l0 + layer.bias_hh_l0).float())
        expected = torch.tanh(gx + y[-2].float() @ layer.weight_hh_l0.float().T)
    assert relative_error(y[-1], expected) < 2e-2
    assert torch.equal(y[-1], h_n[0])


def test_auto_runs_cudnn_unless_only_the_kernels_can_or_the_table_says_so():
    """Under ``auto`` a plain call runs cuDNN (no kernel launch) unless the dispatch table measured
    the kernels faster for it; with ``grad_clip`` the kernels run (cuDNN cannot clip)."""
    torch.manual_seed(0)
    layer = fastrnn.LSTM(32, 64, device="cuda")
    x = torch.randn(12, 5, 32, device="cuda")
    with fastrnn.use_backend("auto"):
        route = fastrnn.routing.route(layer, x)
        assert route.path in ("cudnn", "triton") and route.path == fastrnn.explain(layer, x).split(":")[0]
        before = sum(LAUNCHES.values())
        layer(x)[0].square().sum().backward()
        assert sum(LAUNCHES.values()) - before == (2 if route.path == "triton" else 0)
        layer.grad_clip = 1.0
        assert fastrnn.explain(layer, x).startswith("triton: grad_clip")
        before = sum(LAUNCHES.values())
        layer(x)[0].square().sum().backward()
        assert sum(LAUNCHES.values()) - before == 2


# ------------------------------------------------- per_step mode in a CUDA graph (fastrnn.ops.step_graph)
# Written before any GPU ran them (2026-12-02); bench/gpu_check.sh runs them first. The sizes are
# those of the per_step cases of tests/test_persistent.py (RNN, GRU) and test_persistent_lstm.py
# ("packed_bi_2layers"), so the kernels they compile are the ones those tests launch.
#: cell -> (layer, hidden size, FASTRNN_PERSISTENT_SLICE): 4 programs per direction.
GRAPH_CELLS = {"rnn": (fastrnn.RNN, 32, 8), "gru": (fastrnn.GRU, 32, 8), "lstm": (fastrnn.LSTM, 16, 4)}
GRAPH_LENGTHS = (3, 5, 1)  # unsorted packed input, one full length


@pytest.fixture
def per_step(monkeypatch):
    """The persistent kernels forced in per_step mode, an empty graph cache before and after;
    yields ``(cell) -> layer``, which builds the cell's bidirectional layer and sets the slice."""
    monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
    monkeypatch.setenv("FASTRNN_PERSISTENT_MODE", "per_step")
    step_graph.CACHE.clear()

    def layer(cell):
        cls, hidden, slice_units = GRAPH_CELLS[cell]
        monkeypatch.setenv("FASTRNN_PERSISTENT_SLICE", str(slice_units))
        return cls(6, hidden, bidirectional=True, device="cuda")

    yield layer
    step_graph.CACHE.clear()


def test_per_step_cuda_graph_mechanics(per_step, monkeypatch):
    """``launch_steps`` on a miniature per_step kernel (``tests/test_step_graph.py``): plain
    launches at the first sighting, capture at the second, replays after that read the current
    contents of the same memory; new memory is another key; a replay from another stream is right;
    inside the caller's own capture the launches go into the caller's graph; ``FASTRNN_CUDA_GRAPH=0``
    launches."""
    from test_step_graph import prefix_sum_steps

    monkeypatch.delenv(step_graph.GRAPH_ENV, raising=False)
    torch.manual_seed(0)
    x = torch.randn(7, 100, device="cuda")
    out = torch.full_like(x, float("nan"))
    assert [prefix_sum_steps(x, out, on_gpu=True) for _ in range(3)] == ["launches", "captured", "replayed"]
    torch.testing.assert_close(out, x.cumsum(0))
    x.copy_(torch.randn_like(x))  # same memory, new values
    out.fill_(float("nan"))
    assert prefix_sum_steps(x, out, on_gpu=True) == "replayed"
    torch.testing.assert_close(out, x.cumsum(0))

    other = torch.randn(7, 100, device="cuda")
    other_out = torch.full_like(other, float("nan"))
    assert prefix_sum_steps(other, other_out, on_gpu=True) == "launches"  # a new key
    torch.testing.assert_close(other_out, other.cumsum(0))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x.copy_(torch.randn_like(x))
        assert prefix_sum_steps(x, out, on_gpu=True) == "replayed"
        expected = x.cumsum(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, expected)

    caller = torch.cuda.CUDAGraph()
    with torch.cuda.graph(caller):
        assert step_graph.why_not(on_gpu=True).startswith("the current stream is being captured")
        assert prefix_sum_steps(x, out, on_gpu=True) == "launches"
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    caller.replay()
    torch.testing.assert_close(out, x.cumsum(0))

    monkeypatch.setenv(step_graph.GRAPH_ENV, "0")
    x.copy_(torch.randn_like(x))
    assert prefix_sum_steps(x, out, on_gpu=True) == "launches"
    torch.testing.assert_close(out, x.cumsum(0))


def _graph_inputs(cell, layer):
    """Fresh packed input (lengths :data:`GRAPH_LENGTHS`) and initial states of ``layer``'s shape."""
    from torch.nn.utils.rnn import pack_sequence

    x = pack_sequence([torch.randn(n, layer.input_size, device="cuda") for n in GRAPH_LENGTHS], enforce_sorted=False)
    h0 = torch.randn(2, len(GRAPH_LENGTHS), layer.hidden_size, device="cuda")
    return x, (h0, torch.randn_like(h0)) if cell == "lstm" else (h0,)


def _train_step(layer, x, h0, backend="triton", dtype=None):
    """Outputs, final states and the gradients of the packed input, the initial states and every
    parameter of a loss weighing every output element differently (inputs cast to ``dtype``)."""
    from torch.nn.utils.rnn import PackedSequence

    layer.zero_grad()
    data = x.data.to(dtype or x.data.dtype).detach().requires_grad_(True)
    packed = PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    h0 = tuple(h.to(dtype or h.dtype).detach().requires_grad_(True) for h in h0)
    with fastrnn.use_backend(backend):
        y, states = layer(packed, h0 if len(h0) == 2 else h0[0])
        states = states if isinstance(states, tuple) else (states,)
        weights = torch.linspace(-1, 1, y.data.numel(), device=data.device, dtype=data.dtype).view_as(y.data)
        ((y.data * weights).sum() + sum(s.square().sum() for s in states)).backward()
    grads = (data.grad, *(h.grad for h in h0), *(p.grad for p in layer.parameters()))
    return [t.detach().clone() for t in (y.data, *states, *grads)]


@pytest.mark.parametrize("cell", list(GRAPH_CELLS))
def test_per_step_cuda_graph_matches_plain_launches_and_reference(cell, per_step, monkeypatch):
    """Every per_step call captured (at a key's first sighting here) or replayed: outputs, states and
    every gradient bit for bit those of the plain launches and within 1e-4 of the float64
    reference, for three calls with fresh inputs of one shape (a replay reads the new values where
    the allocator reused the memory; new memory is a new key, captured anew)."""
    import copy

    torch.manual_seed(0)
    layer = per_step(cell)
    reference = copy.deepcopy(layer).double()
    monkeypatch.setenv(step_graph.GRAPH_ENV, "0")
    _train_step(layer, *_graph_inputs(cell, layer))  # compiles every specialisation before any capture
    monkeypatch.setattr(step_graph.CACHE, "capture_on_sighting", 1)
    for call in range(3):
        x, h0 = _graph_inputs(cell, layer)
        monkeypatch.setenv(step_graph.GRAPH_ENV, "1")
        before = step_graph.EVENTS.copy()
        got = _train_step(layer, x, h0)
        events = step_graph.EVENTS - before
        assert events["captured"] + events["replayed"] == 2 and not events["launches"], (call, events)
        monkeypatch.setenv(step_graph.GRAPH_ENV, "0")
        plain = _train_step(layer, x, h0)
        for g, p in zip(got, plain):
            assert torch.equal(g, p), call
        want = _train_step(reference, x, h0, backend="reference", dtype=torch.float64)
        for g, w in zip(got, want):
            assert relative_error(g, w) < 1e-4, call


def test_per_step_cuda_graph_replays_in_a_training_loop(per_step, monkeypatch):
    """With the default policy (capture at a key's second sighting) a loop of training steps at one
    shape replays: the caching allocator hands the same addresses back each step, which is what
    keying on pointers (not copying into static buffers) relies on (``fastrnn.ops.step_graph``)."""
    torch.manual_seed(0)
    layer = per_step("lstm")
    monkeypatch.delenv(step_graph.GRAPH_ENV, raising=False)
    before = step_graph.EVENTS.copy()
    for _ in range(8):
        _train_step(layer, *_graph_inputs("lstm", layer))
    events = step_graph.EVENTS - before
    assert events["replayed"] >= 2, events  # forward and backward, at least once each


@pytest.mark.parametrize("name", ["indrnn", "lstm-zoneout", "gru-zoneout"])
def test_compiled_indrnn_and_zoneout_kernels_match_eager(name):
    """IndRNN's scan kernels and the resident zoneout kernels inside their registered operators
    (fastrnn/indrnn_op.py, fastrnn/ops/zoneout.py) under inductor, training with zoneout: with
    ``fallback_random`` inductor draws the masks with torch.rand as eager does, so compiled equals
    eager (output and every gradient); the kernels launch inside the compiled graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, zoneout=0.2, device="cuda")
    # H16: within the resident kernels' fp32 sizes (LSTM 16, GRU 32): the resident zoneout kernels
    layer = {"indrnn": lambda: fastrnn.IndRNN(32, 16, **kw), "lstm-zoneout": lambda: fastrnn.LSTM(32, 16, **kw),
             "gru-zoneout": lambda: fastrnn.GRU(32, 16, **kw)}[name]()
    x = torch.randn(4, 9, 32, device="cuda", requires_grad=True)

    def run(fn):
        torch.manual_seed(1)
        y, _ = fn(x)
        return [y, *torch.autograd.grad(y.square().mean(), [x, *layer.parameters()])]

    eager = run(layer)
    with torch._inductor.config.patch(fallback_random=True):
        before = sum(LAUNCHES.values())
        compiled = run(torch.compile(layer, fullgraph=True))
    assert sum(LAUNCHES.values()) - before == 6  # per layer: forward; forward again and backward
    for a, e in zip(compiled, eager, strict=True):
        assert relative_error(a, e) < 1e-4
