"""fastrnn.RNN / GRU / LSTM against torch.nn: the drop-in contract.

Parity runs in float64 at 1e-9 on both CPU backends that exist without a GPU:
``auto`` (PyTorch's native kernels) and ``reference`` (the plain loop of fastrnn.reference).
"""

from __future__ import annotations

import copy
import itertools
import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from conftest import assert_close

I, H, P = 5, 7, 3  # input size, hidden size, LSTM projection size
T, B = 5, 3  # steps, batch
ATOL = 1e-9  # float64 parity bar

#: cell id -> (torch.nn class, fastrnn class, extra constructor kwargs)
CELLS = {
    "rnn_tanh": (nn.RNN, fastrnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, fastrnn.RNN, {"nonlinearity": "relu"}),
    "gru": (nn.GRU, fastrnn.GRU, {}),
    "lstm": (nn.LSTM, fastrnn.LSTM, {}),
    "lstm_proj": (nn.LSTM, fastrnn.LSTM, {"proj_size": P}),
}
BACKENDS = ["auto", "reference"]
FORMS = ["unbatched", "batched", "packed_sorted", "packed_unsorted"]
#: lengths of the packed forms: sorted with a tie, and unsorted with a tie
LENGTHS = {"packed_sorted": [5, 3, 3], "packed_unsorted": [3, 5, 3]}

cell_param = pytest.mark.parametrize("cell", list(CELLS))
backend_param = pytest.mark.parametrize("backend", BACKENDS)


def is_lstm(cell: str) -> bool:
    return cell.startswith("lstm")


def make_pair(cell: str, dtype=torch.float64, seed: int = 0, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A torch.nn layer and a fastrnn layer holding the same weights (loaded strictly)."""
    torch_cls, fast_cls, extra = CELLS[cell]
    torch.manual_seed(seed)
    ref = torch_cls(I, H, **extra, **kwargs, dtype=dtype)
    fast = fast_cls(I, H, **extra, **kwargs, dtype=dtype)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def out_size(cell: str) -> int:
    return P if cell == "lstm_proj" else H


def make_state(cell: str, layers: int, directions: int, batch: int | None, dtype=torch.float64, generator=None):
    """Random ``hx`` (``h0`` or ``(h0, c0)``), leaves requiring grad; ``batch=None``: unbatched."""
    lead = (layers * directions,) if batch is None else (layers * directions, batch)

    def rand(size: int) -> torch.Tensor:
        return torch.randn(*lead, size, dtype=dtype, generator=generator).requires_grad_()

    h0 = rand(out_size(cell))
    return (h0, rand(H)) if is_lstm(cell) else h0


def make_input(form: str, batch_first: bool, dtype=torch.float64, generator=None):
    """``(leaf, module_input)``: the leaf gradients are taken of, and what the layer is called with."""
    if form == "unbatched":
        x = torch.randn(T, I, dtype=dtype, generator=generator).requires_grad_()
        return x, x
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(*shape, dtype=dtype, generator=generator).requires_grad_()
    if form == "batched":
        return x, x
    lengths = torch.tensor(LENGTHS[form])
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=form == "packed_sorted")
    return x, packed


def flat_outputs(result) -> list[torch.Tensor]:
    """``(output, hx)`` of a layer as a list of float tensors (packed output: its data)."""
    output, hx = result
    data = output.data if isinstance(output, PackedSequence) else output
    return [data, *(hx if isinstance(hx, tuple) else (hx,))]


def assert_same_result(actual, expected, atol: float = ATOL) -> None:
    out_a, hx_a = actual
    out_e, hx_e = expected
    assert type(out_a) is type(out_e)
    if isinstance(out_e, PackedSequence):
        assert torch.equal(out_a.batch_sizes, out_e.batch_sizes)
        for name in ("sorted_indices", "unsorted_indices"):
            a, e = getattr(out_a, name), getattr(out_e, name)
            assert (a is None) == (e is None), name
            if e is not None:
                assert torch.equal(a, e), name
    assert type(hx_a) is type(hx_e)
    for a, e in zip(flat_outputs(actual), flat_outputs(expected), strict=True):
        assert a.shape == e.shape
        assert_close(a, e, atol=atol)


def run_and_grad(module: nn.Module, module_input, hx, leaves: list[torch.Tensor], cotangents=None):
    """Forward, then the gradients of a random linear functional of every output w.r.t. ``leaves``
    and every parameter. Returns ``(result, cotangents, leaf_grads, {param name: grad})``."""
    result = module(module_input, hx)
    outputs = flat_outputs(result)
    if cotangents is None:
        g = torch.Generator().manual_seed(1234)
        cotangents = [torch.randn(o.shape, dtype=o.dtype, generator=g) for o in outputs]
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents, strict=True))
    names, params = zip(*module.named_parameters())
    grads = torch.autograd.grad(loss, [*leaves, *params], retain_graph=True)  # packed input is reused
    return result, cotangents, list(grads[: len(leaves)]), dict(zip(names, grads[len(leaves) :], strict=True))


# ----------------------------------------------------------------------------------------- parity
@backend_param
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@cell_param
def test_parity_float64(cell, num_layers, bidirectional, batch_first, bias, form, backend):
    """Outputs, final states and gradients (input, initial states, every parameter) match torch.nn."""
    ref, fast = make_pair(cell, num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    g = torch.Generator().manual_seed(7)
    leaf, module_input = make_input(form, batch_first, generator=g)
    hx = make_state(cell, num_layers, 2 if bidirectional else 1, None if form == "unbatched" else B, generator=g)
    states = list(hx) if isinstance(hx, tuple) else [hx]
    leaves = [leaf, *states]

    expected, cot, leaf_grads_e, param_grads_e = run_and_grad(ref, module_input, hx, leaves)
    with fastrnn.use_backend(backend):
        actual, _, leaf_grads_a, param_grads_a = run_and_grad(fast, module_input, hx, leaves, cot)

    assert_same_result(actual, expected)
    for name, a, e in zip(["input", "h0", "c0"], leaf_grads_a, leaf_grads_e):
        assert_close(a, e, atol=ATOL, msg=f"grad of {name}")
    assert list(param_grads_a) == list(param_grads_e)
    for name in param_grads_e:
        assert_close(param_grads_a[name], param_grads_e[name], atol=ATOL, msg=f"grad of {name}")


@backend_param
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@cell_param
def test_parity_without_initial_state(cell, bidirectional, form, backend):
    """``hx=None`` means zero initial states, like torch.nn; input and parameter gradients agree."""
    ref, fast = make_pair(cell, num_layers=2, bidirectional=bidirectional, batch_first=True)
    leaf, module_input = make_input(form, batch_first=True, generator=torch.Generator().manual_seed(3))
    expected, cot, leaf_grads_e, param_grads_e = run_and_grad(ref, module_input, None, [leaf])
    with fastrnn.use_backend(backend):
        actual, _, leaf_grads_a, param_grads_a = run_and_grad(fast, module_input, None, [leaf], cot)
    assert_same_result(actual, expected)
    assert_close(leaf_grads_a[0], leaf_grads_e[0], atol=ATOL)
    for name in param_grads_e:
        assert_close(param_grads_a[name], param_grads_e[name], atol=ATOL, msg=f"grad of {name}")


@backend_param
@cell_param
def test_parity_float32(cell, backend):
    """The same contract in float32 (looser, float32-sized tolerance)."""
    ref, fast = make_pair(cell, dtype=torch.float32, num_layers=2, bidirectional=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(T, B, I, generator=g)
    hx = make_state(cell, 2, 2, B, dtype=torch.float32, generator=g)
    expected = ref(x, hx)
    with fastrnn.use_backend(backend):
        actual = fast(x, hx)
    assert_same_result(actual, expected, atol=1e-5)


@backend_param
@cell_param
def test_empty_batch(cell, backend):
    """A batch of size 0 gives empty outputs of torch.nn's shapes."""
    ref, fast = make_pair(cell, num_layers=2, bidirectional=True)
    x = torch.randn(T, 0, I, dtype=torch.float64)
    expected = ref(x)
    with fastrnn.use_backend(backend):
        actual = fast(x)
    assert_same_result(actual, expected)
    assert actual[0].shape == (T, 0, 2 * out_size(cell))


@backend_param
@pytest.mark.parametrize("cell", ["gru", "lstm_proj"])
def test_noncontiguous_input(cell, backend):
    """A transposed (non-contiguous) input and state give the same result as contiguous ones."""
    ref, fast = make_pair(cell, batch_first=True, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64).transpose(0, 1)
    assert not x.is_contiguous()
    expected = ref(x)
    with fastrnn.use_backend(backend):
        actual = fast(x)
    assert_same_result(actual, expected)


@backend_param
def test_reference_and_auto_agree(backend):
    """Sanity on the harness: the two backends really are different code paths giving one answer."""
    ref, fast = make_pair("lstm", num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with fastrnn.use_backend(backend):
        out, (h, c) = fast(x)
    assert_close(out, ref(x)[0], atol=ATOL)
    assert torch.isfinite(out).all() and torch.isfinite(h).all() and torch.isfinite(c).all()


# ------------------------------------------------------------------------- parameters, state_dict
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@cell_param
def test_parameter_names_shapes_and_order(cell, num_layers, bidirectional, bias):
    ref, fast = make_pair(cell, num_layers=num_layers, bidirectional=bidirectional, bias=bias)
    assert [(n, p.shape) for n, p in fast.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert fast._flat_weights_names == ref._flat_weights_names
    assert [[w.shape for w in ws] for ws in fast.all_weights] == [[w.shape for w in ws] for ws in ref.all_weights]
    for attr in ("mode", "input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout",
                 "bidirectional", "proj_size"):
        assert getattr(fast, attr) == getattr(ref, attr), attr
    assert repr(fast) == repr(ref)


@pytest.mark.parametrize("num_layers", [1, 2], ids=["L1", "L2"])
@cell_param
def test_state_dict_both_ways(cell, num_layers):
    """torch.nn -> fastrnn and fastrnn -> torch.nn, strict, and the layers then compute the same."""
    torch_cls, fast_cls, extra = CELLS[cell]
    kwargs = dict(num_layers=num_layers, bidirectional=True, dtype=torch.float64, **extra)
    x = torch.randn(T, B, I, dtype=torch.float64)

    torch.manual_seed(1)
    src_torch = torch_cls(I, H, **kwargs)
    torch.manual_seed(2)
    dst_fast = fast_cls(I, H, **kwargs)
    result = dst_fast.load_state_dict(src_torch.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in src_torch.state_dict().items():
        assert torch.equal(dst_fast.state_dict()[name], value), name
    assert_same_result(dst_fast(x), src_torch(x))

    torch.manual_seed(3)
    src_fast = fast_cls(I, H, **kwargs)
    torch.manual_seed(4)
    dst_torch = torch_cls(I, H, **kwargs)
    result = dst_torch.load_state_dict(src_fast.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in src_fast.state_dict().items():
        assert torch.equal(dst_torch.state_dict()[name], value), name
    assert_same_result(src_fast(x), dst_torch(x))


@cell_param
def test_init_uniform_within_bound(cell):
    """Every parameter is drawn from U(-1/sqrt(H), 1/sqrt(H)), like torch.nn."""
    torch_cls, fast_cls, extra = CELLS[cell]
    hidden = 64
    extra = {**extra, "proj_size": 16} if "proj_size" in extra else extra
    layer = fast_cls(32, hidden, num_layers=2, bidirectional=True, **extra)
    bound = 1 / math.sqrt(hidden)
    values = torch.cat([p.detach().flatten() for p in layer.parameters()])
    assert torch.isfinite(values).all()
    assert values.abs().max() <= bound
    assert values.min() < -0.95 * bound and values.max() > 0.95 * bound  # fills the interval
    assert abs(values.mean().item()) < 0.02 * bound  # centred
    assert abs(values.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # std of U(-b, b)
    for p in layer.parameters():
        assert p.abs().max() <= bound and p.std() > 0


@cell_param
def test_init_matches_torch_under_same_seed(cell):
    """Same seed, same constructor arguments: the very same initial weights as torch.nn."""
    torch_cls, fast_cls, extra = CELLS[cell]
    torch.manual_seed(11)
    ref = torch_cls(I, H, num_layers=2, bidirectional=True, **extra)
    torch.manual_seed(11)
    fast = fast_cls(I, H, num_layers=2, bidirectional=True, **extra)
    for (name, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_rnn_positional_nonlinearity():
    """RNN takes ``nonlinearity`` as the 4th positional argument, like torch.nn.RNN."""
    torch.manual_seed(0)
    ref = nn.RNN(I, H, 2, "relu", False, True)
    torch.manual_seed(0)
    fast = fastrnn.RNN(I, H, 2, "relu", False, True)
    assert (fast.nonlinearity, fast.mode, fast.num_layers, fast.bias, fast.batch_first) == (
        "relu", "RNN_RELU", 2, False, True)
    x = torch.randn(B, T, I)
    assert_same_result(fast(x), ref(x), atol=1e-6)


@backend_param
def test_module_to_dtype(backend):
    """``.double()`` converts the parameters and the layer runs in float64 afterwards."""
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, proj_size=P)
    torch.manual_seed(0)
    fast = fastrnn.LSTM(I, H, proj_size=P)
    ref.double()
    fast.double()
    assert all(p.dtype == torch.float64 for p in fast.parameters())
    assert all(w.dtype == torch.float64 for w in fast._flat_weights)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with fastrnn.use_backend(backend):
        assert_same_result(fast(x), ref(x))


@backend_param
def test_functional_call_uses_given_parameters(backend):
    """``torch.func.functional_call`` with substituted weights computes with those weights."""
    ref, fast = make_pair("gru", num_layers=2)
    torch.manual_seed(9)
    other = {n: torch.randn_like(p) * 0.3 for n, p in ref.named_parameters()}
    x = torch.randn(T, B, I, dtype=torch.float64)
    expected = torch.func.functional_call(ref, other, (x,))
    with fastrnn.use_backend(backend):
        actual = torch.func.functional_call(fast, other, (x,))
    assert_same_result(actual, expected)
    assert not torch.allclose(actual[0], fast(x)[0])


# ----------------------------------------------------------------------------- error conformance
def assert_same_error(torch_call, fast_call, same_message: bool = True) -> None:
    """torch.nn raises; fastrnn raises the same class (and, when asked, the same message)."""
    with pytest.raises(Exception) as expected:
        torch_call()
    with pytest.raises(expected.type) as actual:
        fast_call()
    assert actual.type is expected.type, (actual.type, expected.type)
    if same_message:
        assert str(actual.value) == str(expected.value)


CONSTRUCTOR_ERRORS = [
    pytest.param("lstm", dict(dropout=1.5), id="dropout_gt1"),
    pytest.param("gru", dict(dropout=-0.1), id="dropout_negative"),
    pytest.param("lstm", dict(dropout=True), id="dropout_bool"),
    pytest.param("rnn_tanh", dict(dropout="0.2"), id="dropout_str"),
    pytest.param("lstm", dict(bias=1), id="bias_int"),
    pytest.param("gru", dict(bias="yes"), id="bias_str"),
    pytest.param("lstm", dict(batch_first=1), id="batch_first_int"),
    pytest.param("rnn_tanh", dict(batch_first=None), id="batch_first_none"),
    pytest.param("lstm", dict(input_size=5.0), id="input_size_float"),
    pytest.param("gru", dict(input_size=0), id="input_size_zero"),
    pytest.param("lstm", dict(input_size=-2), id="input_size_negative"),
    pytest.param("lstm", dict(hidden_size=7.0), id="hidden_size_float"),
    pytest.param("rnn_tanh", dict(hidden_size=0), id="hidden_size_zero"),
    pytest.param("gru", dict(hidden_size=-1), id="hidden_size_negative"),
    pytest.param("lstm", dict(num_layers=0), id="num_layers_zero"),
    pytest.param("gru", dict(num_layers=-1), id="num_layers_negative"),
    pytest.param("lstm", dict(num_layers=2.0), id="num_layers_float"),
    pytest.param("lstm", dict(proj_size=-1), id="proj_size_negative"),
    pytest.param("lstm", dict(proj_size=H), id="proj_size_eq_hidden"),
    pytest.param("lstm", dict(proj_size=H + 3), id="proj_size_gt_hidden"),
    pytest.param("lstm", dict(proj_size=1.5), id="proj_size_float"),
    pytest.param("rnn_tanh", dict(proj_size=2), id="proj_size_rnn"),
    pytest.param("gru", dict(proj_size=2), id="proj_size_gru"),
    pytest.param("gru", dict(proj_size=0), id="proj_size_zero_gru"),
]


@pytest.mark.parametrize("cell, kwargs", CONSTRUCTOR_ERRORS)
def test_constructor_errors(cell, kwargs):
    torch_cls, fast_cls, extra = CELLS[cell]
    args = {"input_size": I, "hidden_size": H, **extra, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert_same_error(lambda: torch_cls(**args), lambda: fast_cls(**args))


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
@pytest.mark.parametrize("name", ["softsign", "Tanh", ""])
def test_rnn_unknown_nonlinearity(name, positional):
    """Same class as torch.nn; the message lists fastrnn's (longer) list of choices."""
    def build(cls):
        return cls(I, H, 1, name) if positional else cls(I, H, nonlinearity=name)

    assert_same_error(lambda: build(nn.RNN), lambda: build(fastrnn.RNN), same_message=False)
    with pytest.raises(ValueError, match=f"Unknown nonlinearity '{name}'. Select from 'tanh', 'relu'"):
        build(fastrnn.RNN)


def _bad_inputs(cell: str):
    """``id -> (input, hx)`` of calls torch.nn rejects (module: 1 layer, unidirectional, float64)."""
    f64 = torch.float64

    def hx(batch: int | None, h: int | None = None, c: int | None = None, lead: int = 1, dtype=f64):
        shape = (lead,) if batch is None else (lead, batch)
        h0 = torch.zeros(*shape, h or out_size(cell), dtype=dtype)
        return (h0, torch.zeros(*shape, c or H, dtype=dtype)) if is_lstm(cell) else h0

    cases = {
        "input_1d": (torch.randn(I, dtype=f64), None),
        "input_4d": (torch.randn(T, B, 1, I, dtype=f64), None),
        "input_feature_size": (torch.randn(T, B, I + 1, dtype=f64), None),
        "input_feature_size_unbatched": (torch.randn(T, I - 1, dtype=f64), None),
        "zero_length": (torch.randn(0, B, I, dtype=f64), None),
        "zero_length_unbatched": (torch.randn(0, I, dtype=f64), None),
        "input_dtype": (torch.randn(T, B, I, dtype=torch.float32), None),
        "input_dtype_unbatched": (torch.randn(T, I, dtype=torch.float32), None),
        "h0_batch_size": (torch.randn(T, B, I, dtype=f64), hx(B + 1)),
        "h0_layers": (torch.randn(T, B, I, dtype=f64), hx(B, lead=2)),
        "h0_features": (torch.randn(T, B, I, dtype=f64), hx(B, h=out_size(cell) + 1)),
        "h0_unbatched_features": (torch.randn(T, I, dtype=f64), hx(None, h=out_size(cell) + 1)),
        "h0_2d_for_batched": (torch.randn(T, B, I, dtype=f64), hx(None)),
        "h0_3d_for_unbatched": (torch.randn(T, I, dtype=f64), hx(1)),
        # Several things wrong at once: the state's rank is reported first, as in torch.nn.
        "input_dtype_and_h0_rank": (torch.randn(T, B, I), hx(None)),
        "input_feature_size_and_h0_rank_unbatched": (torch.randn(T, I + 1, dtype=f64), hx(1)),
    }
    if is_lstm(cell):
        h0 = torch.zeros(1, B, out_size(cell), dtype=f64)
        cases.update({
            "c0_batch_size": (torch.randn(T, B, I, dtype=f64), (h0, torch.zeros(1, B + 1, H, dtype=f64))),
            "c0_features": (torch.randn(T, B, I, dtype=f64), (h0, torch.zeros(1, B, H + 1, dtype=f64))),
            "c0_rank": (torch.randn(T, B, I, dtype=f64), (h0, torch.zeros(B, H, dtype=f64))),
            "c0_rank_unbatched": (torch.randn(T, I, dtype=f64), (h0[:, 0], torch.zeros(1, 1, H, dtype=f64))),
        })
    else:
        packed = pack_padded_sequence(torch.randn(T, B, I, dtype=f64), torch.tensor([5, 3, 3]))
        cases.update({
            "packed_h0_batch_size": (packed, hx(B + 1)),
            "packed_h0_2d": (packed, hx(None)),
            "packed_input_dtype": (pack_padded_sequence(torch.randn(T, B, I), torch.tensor([5, 3, 3])), None),
        })
    return cases


BAD_INPUT_CASES = [
    pytest.param(cell, case, id=f"{cell}-{case}") for cell in CELLS for case in _bad_inputs(cell)
]


@backend_param
@pytest.mark.parametrize("cell, case", BAD_INPUT_CASES)
def test_forward_errors(cell, case, backend):
    """Same exception class and the same message as torch.nn."""
    ref, fast = make_pair(cell)
    torch.manual_seed(0)
    x, hx = _bad_inputs(cell)[case]
    with fastrnn.use_backend(backend):
        assert_same_error(lambda: ref(x, hx), lambda: fast(x, hx))


@backend_param
@pytest.mark.parametrize("form", ["batched", "unbatched", "packed"])
@cell_param
def test_hidden_dtype_mismatch(cell, form, backend):
    """torch.nn fails inside its kernel with a RuntimeError; fastrnn raises a RuntimeError of its own."""
    ref, fast = make_pair(cell, dtype=torch.float32)
    batch = None if form == "unbatched" else B
    hx = make_state(cell, 1, 1, batch, dtype=torch.float64)
    if form == "packed":
        x = pack_padded_sequence(torch.randn(T, B, I), torch.tensor([5, 3, 3]))
    else:
        x = torch.randn(T, I) if batch is None else torch.randn(T, B, I)
    with fastrnn.use_backend(backend):
        assert_same_error(lambda: ref(x, hx), lambda: fast(x, hx), same_message=False)
        with pytest.raises(RuntimeError, match="hidden state dtype"):
            fast(x, hx)


@backend_param
@pytest.mark.parametrize("cell", ["lstm", "lstm_proj"])
def test_lstm_packed_bad_state_shape_rejected(cell, backend):
    """torch.nn.LSTM does not check packed states itself (its kernel fails with a RuntimeError);
    fastrnn checks them and raises RuntimeError with torch.nn's unpacked message."""
    ref, fast = make_pair(cell)
    packed = pack_padded_sequence(torch.randn(T, B, I, dtype=torch.float64), torch.tensor([5, 3, 3]))
    hx = make_state(cell, 1, 1, B + 1)
    with fastrnn.use_backend(backend):
        assert_same_error(lambda: ref(packed, hx), lambda: fast(packed, hx), same_message=False)
        with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(1, 3, "):
            fast(packed, hx)


@backend_param
def test_lstm_cell_state_dtype_mismatch_rejected(backend):
    """torch.nn.LSTM in float64 silently promotes a float32 ``c0``; fastrnn asks for matching dtypes
    with a clear RuntimeError (as for ``h0``)."""
    _, fast = make_pair("lstm")
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = (torch.zeros(1, B, H, dtype=torch.float64), torch.zeros(1, B, H))
    with fastrnn.use_backend(backend), pytest.raises(RuntimeError, match="hidden state dtype"):
        fast(x, hx)


@backend_param
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_packed_unsorted_state_batch_size_checked(cell, backend):
    """Unsorted packed input: a state with too few rows fails in torch.nn (RuntimeError, inside its
    permutation); fastrnn raises RuntimeError too. With too many rows torch.nn silently drops the
    extra rows; fastrnn checks the size before permuting and rejects it."""
    ref, fast = make_pair(cell)
    packed = pack_padded_sequence(torch.randn(T, B, I, dtype=torch.float64), torch.tensor([3, 5, 3]),
                                  enforce_sorted=False)
    with fastrnn.use_backend(backend):
        small = make_state(cell, 1, 1, B - 1)
        assert_same_error(lambda: ref(packed, small), lambda: fast(packed, small), same_message=False)
        with pytest.raises(RuntimeError, match=r"Expected hidden(\[0\])? size \(1, 3, 7\), got \[1, 4, 7\]"):
            fast(packed, make_state(cell, 1, 1, B + 1))


# ---------------------------------------------------------------------------------------- dropout
@backend_param
@cell_param
def test_dropout_eval_mode_is_identity(cell, backend):
    ref, fast = make_pair(cell, num_layers=2, dropout=0.5, bidirectional=True)
    ref.eval()
    fast.eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    with fastrnn.use_backend(backend):
        actual = fast(x)
    assert_same_result(actual, ref(x))
    _, no_dropout = make_pair(cell, num_layers=2, bidirectional=True)
    no_dropout.load_state_dict(fast.state_dict())
    with fastrnn.use_backend(backend):
        assert_same_result(actual, no_dropout(x))


@backend_param
@pytest.mark.parametrize("p", [0.5, 1.0])
@cell_param
def test_dropout_train_mode(cell, p, backend):
    """In training, dropout between layers changes the output, which stays finite, and is
    reproducible under the same seed."""
    _, fast = make_pair(cell, num_layers=2, dropout=p, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    with fastrnn.use_backend(backend):
        fast.eval()
        eval_out = flat_outputs(fast(x))
        fast.train()
        torch.manual_seed(123)
        train_a = flat_outputs(fast(x))
        torch.manual_seed(123)
        train_b = flat_outputs(fast(x))
        torch.manual_seed(321)
        train_c = flat_outputs(fast(x))
    for a in train_a:
        assert torch.isfinite(a).all()
    assert not torch.allclose(train_a[0], eval_out[0])
    for a, b in zip(train_a, train_b, strict=True):
        assert torch.equal(a, b)
    if p < 1:
        assert not torch.equal(train_a[0], train_c[0])
    else:
        # Everything dropped: layer 2 sees zeros whatever the seed.
        for a, c in zip(train_a, train_c, strict=True):
            assert torch.equal(a, c)
    # Layer 1's final states are not affected by dropout (it only acts between layers).
    for a, e in zip(train_a[1:], eval_out[1:]):
        assert torch.equal(a[:2], e[:2])


@backend_param
@pytest.mark.parametrize("p", [0.5, 1.0])
@cell_param
def test_dropout_train_mode_matches_torch_same_seed(cell, p, backend):
    """On padded (not packed) input both CPU paths draw torch.nn's dropout masks under the same seed
    (one mask of the layer output's shape between consecutive layers)."""
    ref, fast = make_pair(cell, num_layers=3, dropout=p, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.manual_seed(5)
    expected = ref(x)
    torch.manual_seed(5)
    with fastrnn.use_backend(backend):
        actual = fast(x)
    assert_same_result(actual, expected)


@cell_param
def test_dropout_single_layer_warns_like_torch(cell):
    torch_cls, fast_cls, extra = CELLS[cell]
    with pytest.warns(UserWarning) as expected:
        torch_cls(I, H, dropout=0.3, **extra)
    with pytest.warns(UserWarning) as actual:
        fast_cls(I, H, dropout=0.3, **extra)
    assert [str(w.message) for w in actual] == [str(w.message) for w in expected]
    assert "dropout option adds dropout after all but last recurrent layer" in str(actual[0].message)
    assert actual[0].filename == __file__  # points at the caller


@cell_param
def test_no_dropout_warning_when_meaningful(cell):
    _, fast_cls, extra = CELLS[cell]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast_cls(I, H, num_layers=2, dropout=0.3, **extra)
        fast_cls(I, H, dropout=0.0, **extra)


# ------------------------------------------------------------------------------ pickle, deepcopy
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@cell_param
def test_pickle_and_deepcopy_round_trip(cell, how):
    _, fast = make_pair(cell, num_layers=2, bidirectional=True, batch_first=True)
    clone = pickle.loads(pickle.dumps(fast)) if how == "pickle" else copy.deepcopy(fast)
    assert type(clone) is type(fast)
    assert repr(clone) == repr(fast)
    assert list(clone.state_dict()) == list(fast.state_dict())
    for (name, p), (_, q) in zip(clone.named_parameters(), fast.named_parameters(), strict=True):
        assert torch.equal(p, q), name
        assert p.data_ptr() != q.data_ptr()
    x = torch.randn(B, T, I, dtype=torch.float64)
    for backend in BACKENDS:
        with fastrnn.use_backend(backend):
            a, e = flat_outputs(clone(x)), flat_outputs(fast(x))
        for u, v in zip(a, e, strict=True):
            assert torch.equal(u, v)
    # The clone's weights are its own: training it leaves the original untouched.
    with torch.no_grad():
        clone.weight_ih_l0.add_(1.0)
    assert not torch.equal(clone.weight_ih_l0, fast.weight_ih_l0)
    assert not torch.equal(clone(x)[0], fast(x)[0])


# --------------------------------------------------------------------------------- torch.compile
class _Head(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(rnn.hidden_size, 2)

    def forward(self, x):
        y, hx = self.rnn(x)
        h = hx[0] if isinstance(hx, tuple) else hx
        return self.head(y), h


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_torch_compile_fullgraph(cell):
    """``torch.compile(fullgraph=True)`` traces the layer on CPU (one native-bptt operator per layer) and matches eager,
    forward and backward."""
    torch._dynamo.reset()
    _, fast_cls, _ = CELLS[cell]
    torch.manual_seed(0)
    model = _Head(fast_cls(I, H, batch_first=True))
    x = torch.randn(2, 3, I)

    eager_out = model(x)
    eager_grads = torch.autograd.grad(sum(o.square().sum() for o in eager_out), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(sum(o.square().sum() for o in out), list(model.parameters()))

    for a, e in zip(out, eager_out, strict=True):
        assert_close(a, e, atol=1e-6)
    for (name, _), a, e in zip(model.named_parameters(), grads, eager_grads, strict=True):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, atol=1e-5, msg=f"grad of {name}")
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ double backward
@pytest.mark.parametrize("bidirectional", [False, True], ids=["unidir", "bidir"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "lstm_proj"])
def test_gradcheck_and_gradgradcheck_reference(cell, bidirectional):
    """First and second derivatives of the reference path, w.r.t. input, states and weights."""
    torch_cls, fast_cls, extra = CELLS[cell]
    extra = {**extra, "proj_size": 1} if "proj_size" in extra else extra
    torch.manual_seed(0)
    layer = fast_cls(2, 3, bidirectional=bidirectional, dtype=torch.float64, **extra)
    directions = 2 if bidirectional else 1
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h_size = 1 if "proj_size" in extra else 3
    h0 = torch.randn(directions, 2, h_size, dtype=torch.float64, requires_grad=True)

    if is_lstm(cell):
        states = (h0, torch.randn(directions, 2, 3, dtype=torch.float64, requires_grad=True))
    else:
        states = (h0,)

    def fn(x, *rest):
        hx = rest[: len(states)]
        weights = rest[len(states) :]
        out, hn = torch.func.functional_call(layer, dict(zip(names, weights)), (x, hx if is_lstm(cell) else hx[0]))
        return (out, *hn) if isinstance(hn, tuple) else (out, hn)

    inputs = (x, *states, *params)
    with fastrnn.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("cell", ["lstm", "rnn_tanh"])
def test_gradgradcheck_reference_packed(cell):
    """Double backward through the length-masked (packed, unsorted) reference path."""
    torch_cls, fast_cls, extra = CELLS[cell]
    torch.manual_seed(0)
    layer = fast_cls(2, 3, bidirectional=True, dtype=torch.float64, **extra)
    names = [n for n, _ in layer.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([2, 3, 2])

    def fn(x, *weights):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, hn = torch.func.functional_call(layer, dict(zip(names, weights)), (packed,))
        return (out.data, *hn) if isinstance(hn, tuple) else (out.data, hn)

    with fastrnn.use_backend("reference"):
        assert torch.autograd.gradcheck(fn, (x, *weights))
        assert torch.autograd.gradgradcheck(fn, (x, *weights), fast_mode=True)


# ------------------------------------------------------------------------------------ misc forms
@backend_param
def test_unbatched_batch_first_ignored(backend):
    """``batch_first`` does not apply to unbatched input (as in torch.nn)."""
    ref, fast = make_pair("lstm", batch_first=True, num_layers=2)
    x = torch.randn(T, I, dtype=torch.float64)
    with fastrnn.use_backend(backend):
        actual = fast(x)
    assert_same_result(actual, ref(x))
    assert actual[0].shape == (T, H)


@backend_param
@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_all_equal_lengths_and_single_step(cell, backend):
    """Edge lengths: every row full, and a sequence of one step."""
    ref, fast = make_pair(cell, bidirectional=True, num_layers=2)
    for steps, lengths in itertools.product([1, 4], [None, "full"]):
        x = torch.randn(steps, B, I, dtype=torch.float64)
        inp = x if lengths is None else pack_padded_sequence(x, torch.full((B,), steps), enforce_sorted=False)
        with fastrnn.use_backend(backend):
            actual = fast(inp)
        assert_same_result(actual, ref(inp))
