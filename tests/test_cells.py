"""fastrnn.RNNCell / GRUCell / LSTMCell against the torch.nn cells."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import fastrnn
from conftest import assert_close

I, H, B = 5, 7, 3
ATOL = 1e-9
F64 = torch.float64

#: cell id -> (torch.nn class, fastrnn class, extra constructor kwargs)
CELLS = {
    "rnn_tanh": (nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNNCell, fastrnn.RNNCell, {"nonlinearity": "relu"}),
    "gru": (nn.GRUCell, fastrnn.GRUCell, {}),
    "lstm": (nn.LSTMCell, fastrnn.LSTMCell, {}),
}
cell_param = pytest.mark.parametrize("cell", list(CELLS))


def make_pair(cell: str, dtype=F64, seed: int = 0, **kwargs):
    torch_cls, fast_cls, extra = CELLS[cell]
    torch.manual_seed(seed)
    ref = torch_cls(I, H, **extra, **kwargs, dtype=dtype)
    fast = fast_cls(I, H, **extra, **kwargs, dtype=dtype)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def as_list(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def unroll(module: nn.Module, xs: list[torch.Tensor], hx):
    """Run the cell over several steps, feeding its state back; every step's outputs, flattened."""
    outputs = []
    for x in xs:
        hx = module(x, hx)
        outputs.extend(as_list(hx))
    return outputs


@pytest.mark.parametrize("initial", ["hx", "none"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@cell_param
def test_parity_float64(cell, bias, batched, initial):
    """Three chained steps: outputs and gradients (input, initial state, every parameter) match torch.nn."""
    ref, fast = make_pair(cell, bias=bias)
    g = torch.Generator().manual_seed(1)
    lead = (B,) if batched else ()
    xs = [torch.randn(*lead, I, dtype=F64, generator=g).requires_grad_() for _ in range(3)]
    states = []
    hx = None
    if initial == "hx":
        states = [torch.randn(*lead, H, dtype=F64, generator=g).requires_grad_() for _ in range(2 if cell == "lstm" else 1)]
        hx = tuple(states) if cell == "lstm" else states[0]

    results = {}
    for key, module in (("torch", ref), ("fast", fast)):
        outputs = unroll(module, xs, hx)
        cot_gen = torch.Generator().manual_seed(2)
        loss = sum((o * torch.randn(o.shape, dtype=F64, generator=cot_gen)).sum() for o in outputs)
        params = [p for _, p in module.named_parameters()]
        grads = torch.autograd.grad(loss, [*xs, *states, *params])
        results[key] = (outputs, grads)

    (out_a, grads_a), (out_e, grads_e) = results["fast"], results["torch"]
    for a, e in zip(out_a, out_e, strict=True):
        assert a.shape == e.shape == (*lead, H)
        assert_close(a, e, atol=ATOL)
    names = [f"x{i}" for i in range(3)] + [f"hx{i}" for i in range(len(states))] + [n for n, _ in ref.named_parameters()]
    for name, a, e in zip(names, grads_a, grads_e, strict=True):
        assert_close(a, e, atol=ATOL, msg=f"grad of {name}")


@cell_param
def test_parity_float32(cell):
    ref, fast = make_pair(cell, dtype=torch.float32)
    x = torch.randn(B, I)
    for a, e in zip(as_list(fast(x)), as_list(ref(x)), strict=True):
        assert_close(a, e, atol=1e-6)


@cell_param
def test_empty_batch(cell):
    ref, fast = make_pair(cell)
    x = torch.randn(0, I, dtype=F64)
    for a, e in zip(as_list(fast(x)), as_list(ref(x)), strict=True):
        assert a.shape == e.shape == (0, H)


# ------------------------------------------------------------------------- parameters, state_dict
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@cell_param
def test_parameter_names_shapes_and_repr(cell, bias):
    ref, fast = make_pair(cell, bias=bias)
    assert [(n, p.shape) for n, p in fast.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert (fast.input_size, fast.hidden_size, fast.bias) == (ref.input_size, ref.hidden_size, ref.bias)
    assert repr(fast) == repr(ref)
    if not bias:
        assert fast.bias_ih is None and fast.bias_hh is None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@cell_param
def test_state_dict_both_ways(cell, bias):
    torch_cls, fast_cls, extra = CELLS[cell]
    kwargs = dict(bias=bias, dtype=F64, **extra)
    x = torch.randn(B, I, dtype=F64)

    torch.manual_seed(1)
    src = torch_cls(I, H, **kwargs)
    torch.manual_seed(2)
    dst = fast_cls(I, H, **kwargs)
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for a, e in zip(as_list(dst(x)), as_list(src(x)), strict=True):
        assert_close(a, e, atol=ATOL)

    torch.manual_seed(3)
    src = fast_cls(I, H, **kwargs)
    torch.manual_seed(4)
    dst = torch_cls(I, H, **kwargs)
    result = dst.load_state_dict(src.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for a, e in zip(as_list(src(x)), as_list(dst(x)), strict=True):
        assert_close(a, e, atol=ATOL)


@cell_param
def test_init_like_torch(cell):
    """Same seed, same initial weights as torch.nn; all within ±1/sqrt(hidden_size)."""
    torch_cls, fast_cls, extra = CELLS[cell]
    torch.manual_seed(5)
    ref = torch_cls(I, H, **extra)
    torch.manual_seed(5)
    fast = fast_cls(I, H, **extra)
    bound = H ** -0.5
    for (name, p), (_, q) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), name
        assert p.abs().max() <= bound


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@cell_param
def test_pickle_and_deepcopy_round_trip(cell, how):
    _, fast = make_pair(cell)
    clone = pickle.loads(pickle.dumps(fast)) if how == "pickle" else copy.deepcopy(fast)
    x = torch.randn(B, I, dtype=F64)
    for a, e in zip(as_list(clone(x)), as_list(fast(x)), strict=True):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------------------- errors
def _bad_calls(cell: str):
    """``id -> (input, hx, same_message)`` of calls torch.nn rejects (cell in float64)."""
    lstm = cell == "lstm"

    def hx(*shape, dtype=F64):
        h = torch.zeros(shape, dtype=dtype)
        return (h, h.clone()) if lstm else h

    cases = {
        "input_0d": (torch.randn((), dtype=F64), None, True),
        "input_3d": (torch.randn(1, B, I, dtype=F64), None, True),
        "input_size": (torch.randn(B, I + 1, dtype=F64), None, True),
        "input_size_unbatched": (torch.randn(I + 1, dtype=F64), None, True),
        "hx_3d": (torch.randn(B, I, dtype=F64), hx(1, B, H), True),
        "hx_0d": (torch.randn(B, I, dtype=F64), hx(), True),
        "hx_batch_size": (torch.randn(B, I, dtype=F64), hx(B + 1, H), True),
        "hx_hidden_size": (torch.randn(B, I, dtype=F64), hx(B, H + 1), True),
        "hx_hidden_size_unbatched": (torch.randn(I, dtype=F64), hx(H + 1), True),
        "hx_1d_for_batched": (torch.randn(B, I, dtype=F64), hx(H), True),
        "hx_2d_for_unbatched": (torch.randn(I, dtype=F64), hx(1, H), True),
        "input_dtype": (torch.randn(B, I), None, False),
        "hx_dtype": (torch.randn(B, I, dtype=F64), hx(B, H, dtype=torch.float32), False),
    }
    if lstm:
        h0 = torch.zeros(B, H, dtype=F64)
        cases.update({
            "c_hidden_size": (torch.randn(B, I, dtype=F64), (h0, torch.zeros(B, H + 1, dtype=F64)), True),
            "c_batch_size": (torch.randn(B, I, dtype=F64), (h0, torch.zeros(B + 1, H, dtype=F64)), True),
            "c_3d": (torch.randn(B, I, dtype=F64), (h0, torch.zeros(1, B, H, dtype=F64)), True),
            "hx_one_state": (torch.randn(B, I, dtype=F64), (h0,), True),
            "hx_three_states": (torch.randn(B, I, dtype=F64), (h0, h0, h0), True),
        })
    return cases


@pytest.mark.parametrize(
    "cell, case", [pytest.param(c, k, id=f"{c}-{k}") for c in CELLS for k in _bad_calls(c)]
)
def test_forward_errors(cell, case):
    ref, fast = make_pair(cell)
    x, hx, same_message = _bad_calls(cell)[case]
    with pytest.raises(Exception) as expected:
        ref(x, hx)
    with pytest.raises(expected.type) as actual:
        fast(x, hx)
    assert actual.type is expected.type
    if same_message:
        assert str(actual.value) == str(expected.value)
    else:
        assert "dtype" in str(actual.value)


def test_lstm_cell_state_dtype_mismatch_rejected():
    """torch.nn.LSTMCell silently promotes a float32 ``c`` next to float64 ``h``; fastrnn asks for
    matching dtypes (as it does for ``h``) with a clear RuntimeError instead."""
    _, fast = make_pair("lstm")
    x = torch.randn(B, I, dtype=F64)
    with pytest.raises(RuntimeError, match=r"hidden1 dtype \(torch.float32\) does not match input dtype"):
        fast(x, (torch.zeros(B, H, dtype=F64), torch.zeros(B, H)))


def test_rnn_cell_unknown_nonlinearity_fails_in_forward():
    """torch.nn.RNNCell accepts any nonlinearity string and fails at the first call; so does fastrnn."""
    ref = nn.RNNCell(I, H, nonlinearity="softsign")
    fast = fastrnn.RNNCell(I, H, nonlinearity="softsign")
    x = torch.randn(B, I)
    with pytest.raises(RuntimeError) as expected:
        ref(x)
    with pytest.raises(RuntimeError) as actual:
        fast(x)
    assert str(actual.value) == str(expected.value)


@pytest.mark.parametrize("kwargs", [dict(input_size=5.0), dict(hidden_size=7.0)], ids=["input_float", "hidden_float"])
@cell_param
def test_constructor_errors(cell, kwargs):
    torch_cls, fast_cls, extra = CELLS[cell]
    args = {"input_size": I, "hidden_size": H, **extra, **kwargs}
    with pytest.raises(Exception) as expected:
        torch_cls(**args)
    with pytest.raises(expected.type):
        fast_cls(**args)


# ------------------------------------------------------------------------------- double backward
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_gradgradcheck(cell):
    _, fast_cls, extra = CELLS[cell]
    torch.manual_seed(0)
    module = fast_cls(2, 3, dtype=F64, **extra)
    names = [n for n, _ in module.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for p in module.parameters()]
    x = torch.randn(2, 2, dtype=F64, requires_grad=True)
    states = [torch.randn(2, 3, dtype=F64, requires_grad=True) for _ in range(2 if cell == "lstm" else 1)]

    def fn(x, *rest):
        hx = tuple(rest[: len(states)]) if cell == "lstm" else rest[0]
        return torch.func.functional_call(module, dict(zip(names, rest[len(states) :])), (x, hx))

    assert torch.autograd.gradcheck(fn, (x, *states, *weights))
    assert torch.autograd.gradgradcheck(fn, (x, *states, *weights))
