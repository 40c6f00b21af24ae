"""The GRU kernels (``fastrnn.kernels.gru`` via ``fastrnn.ops.gru``) against the reference path.

Every case runs the same ``fastrnn.GRU`` module under ``use_backend("triton")`` and under the
oracle (``use_backend("reference")``; for 16-bit dtypes, the float64 reference of the same
weights), then compares the output, ``h_n`` and the gradients of the input, ``h0`` and every
parameter, asserts every element finite, and checks the launch counter to prove the kernels ran.

Runs on CUDA, or on the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` set before
``triton`` is imported, e.g. ``TRITON_INTERPRET=1 python -m pytest tests/test_kernels_gru.py``);
skipped otherwise. Sizes are tiny because the interpreter copies every tensor per launch.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import fastrnn
import fastrnn.backend
from conftest import assert_close
from fastrnn.ops import recurrence

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or fastrnn.backend.triton_interpreting()),
    reason="the Triton kernels need CUDA or TRITON_INTERPRET=1 (set before triton is imported)",
)

DEVICE = "cuda" if torch.cuda.is_available() and not fastrnn.backend.triton_interpreting() else "cpu"
I = 5  # input size
FP32_TOL = 1e-5  # max |triton - reference| / max |reference|, fp32 against the fp32 reference


def make_module(H: int, layers: int, bidirectional: bool, bias: bool, seed: int, scale: float = 1.0):
    torch.manual_seed(seed)
    module = fastrnn.GRU(I, H, num_layers=layers, bidirectional=bidirectional, bias=bias)
    if scale != 1.0:
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(scale)
    return module.to(DEVICE)


def make_inputs(H: int, layers: int, directions: int, B: int, T: int, packed: bool, seed: int):
    """Float32 ``(x, lengths, h0, cotangents)``; ``lengths`` unsorted with a tie and a 1 when packed."""
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, B, I, generator=g)
    lengths = None
    if packed:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[B // 2] = T
        lengths[-1] = 1
        if B > 2:
            lengths[0] = lengths[1]
    h0 = torch.randn(layers * directions, B, H, generator=g)
    gy = torch.randn(T, B, directions * H, generator=g)
    gh = torch.randn(layers * directions, B, H, generator=g)
    return x, lengths, h0, (gy, gh)


def run(module, backend: str, x, lengths, h0, cotangents, dtype: torch.dtype):
    """Forward and backward on ``backend`` in ``dtype``: ``{name: tensor}`` of outputs and gradients."""
    module = module.to(dtype)
    module.zero_grad(set_to_none=True)
    h0 = h0.to(DEVICE, dtype).clone().requires_grad_()
    gy, gh = (c.to(DEVICE, torch.float64) for c in cotangents)
    if lengths is None:
        xs = x.to(DEVICE, dtype).clone().requires_grad_()
        leaves = [xs]
        mask = 1.0
    else:
        leaves = [x[: int(n), b].to(DEVICE, dtype).clone().requires_grad_() for b, n in enumerate(lengths)]
        xs = pack_sequence(leaves, enforce_sorted=False)
        mask = (torch.arange(x.shape[0])[:, None] < lengths[None, :]).to(DEVICE)[..., None]
    with fastrnn.use_backend(backend):
        y, h_n = module(xs, h0)
    if isinstance(y, PackedSequence):
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y, total_length=x.shape[0])
    loss = (y.double() * gy * mask).sum() + (h_n.double() * gh).sum()
    loss.backward()
    result = {"y": y.detach(), "h_n": h_n.detach(), "dh0": h0.grad}
    result["dx"] = torch.cat([leaf.grad.reshape(-1) for leaf in leaves])
    for name, p in module.named_parameters():
        result[f"d{name}"] = p.grad
    return result


def assert_all_close(actual: dict, expected: dict, tol: float):
    """Every tensor finite and ``max |a - e| <= tol * max |e|`` (compared in float64)."""
    assert actual.keys() == expected.keys()
    for name, a in actual.items():
        e = expected[name].double()
        assert a is not None, f"{name}: no gradient"
        assert torch.isfinite(a).all(), f"{name}: non-finite values from the kernels"
        scale = max(e.abs().max().item(), 1e-30)
        assert_close(a.double(), e, atol=tol * scale, msg=lambda m, name=name: f"{name}: {m}")


class launches:
    """Asserts that the block launched ``gru_fwd_<strategy>`` and ``gru_bwd_<strategy>`` ``count`` times each."""

    def __init__(self, strategy: str, count: int):
        self.strategy, self.count = strategy, count

    def __enter__(self):
        self.before = collections.Counter(recurrence.LAUNCHES)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            for phase in ("fwd", "bwd"):
                name = f"gru_{phase}_{self.strategy}"
                ran = recurrence.LAUNCHES[name] - self.before[name]
                assert ran == self.count, f"{name} launched {ran} times, expected {self.count}"


# (layers, bidirectional, H, B, T, packed, bias)
FP32_CASES = {
    "one_layer": (1, False, 16, 3, 5, False, True),
    "odd_sizes_T1": (2, True, 33, 17, 1, False, True),  # B > BLOCK_B: two batch tiles
    "odd_sizes_packed": (1, True, 17, 17, 3, True, True),
    "packed_bidirectional": (2, True, 20, 5, 6, True, True),
    "packed_no_bias": (1, True, 12, 4, 5, True, False),
    "tiled": (1, True, 70, 3, 4, True, True),  # forced "tiled": two 64-wide tiles, one partial
    "persistent": (1, True, 70, 3, 4, True, True),  # plan() picks "persistent" (per_step on CPU)
}


def test_fp32_cases_cover_both_strategies():
    assert {recurrence.plan(3, case[2], torch.float32).strategy for case in FP32_CASES.values()} == {"resident", "persistent"}


@pytest.mark.parametrize("case", list(FP32_CASES))
def test_fp32_matches_reference(case, monkeypatch):
    if case == "tiled":
        monkeypatch.setenv("FASTRNN_STRATEGY", "tiled")
    layers, bidirectional, H, B, T, packed, bias = FP32_CASES[case]
    directions = 2 if bidirectional else 1
    module = make_module(H, layers, bidirectional, bias, seed=len(case))
    inputs = make_inputs(H, layers, directions, B, T, packed, seed=len(case))
    expected = run(module, "reference", *inputs, torch.float32)
    strategy = recurrence.plan(3, H, torch.float32).strategy
    if case == "tiled":
        assert strategy == "tiled"
    with launches(strategy, layers):
        actual = run(module, "triton", *inputs, torch.float32)
    assert_all_close(actual, expected, FP32_TOL)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-2), (torch.bfloat16, 5e-2)], ids=["fp16", "bf16"])
def test_half_precision_matches_float64_reference(dtype, tol):
    layers, H, B, T = 2, 24, 5, 5
    module = make_module(H, layers, True, True, seed=3)
    inputs = make_inputs(H, layers, 2, B, T, True, seed=3)
    expected = run(copy.deepcopy(module), "reference", *inputs, torch.float64)
    with launches(recurrence.plan(3, H, dtype).strategy, layers):
        actual = run(module, "triton", *inputs, dtype)
    assert all(t.dtype == dtype for t in actual.values())
    assert_all_close(actual, expected, tol)


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, FP32_TOL), (torch.float16, 2e-2)], ids=["fp32", "fp16"])
def test_tiled_strategy_with_partial_tiles(monkeypatch, dtype, tol):
    """The tiled kernels at a small ``H`` (forced 16-wide tiles: three per gate, the last partial)."""
    real_plan = recurrence.plan

    def small_tiles(gates, hidden, dt):
        return dataclasses.replace(real_plan(gates, hidden, dt), strategy="tiled", block_h=16)

    monkeypatch.setattr(recurrence, "plan", small_tiles)
    layers, H, B, T = 1, 33, 4, 4
    module = make_module(H, layers, True, True, seed=5)
    inputs = make_inputs(H, layers, 2, B, T, True, seed=5)
    expected = run(copy.deepcopy(module), "reference", *inputs, torch.float32 if dtype == torch.float32 else torch.float64)
    with launches("tiled", layers):
        actual = run(module, "triton", *inputs, dtype)
    assert_all_close(actual, expected, tol)


@pytest.mark.parametrize("tiled", [False, True], ids=["plan", "forced_tiled"])
def test_layer_with_lengths_ignores_gradient_on_padding(monkeypatch, tiled):
    """``gru_layer`` called directly with unsorted lengths and a cotangent on the padded outputs too:
    the outputs there are constant zeros, so that cotangent must not leak into any gradient."""
    import fastrnn.ops.gru as gru_ops
    from fastrnn.reference import reference_layer

    if tiled:
        real_plan = recurrence.plan
        monkeypatch.setattr(recurrence, "plan", lambda g, h, dt: dataclasses.replace(real_plan(g, h, dt), strategy="tiled", block_h=16))
    H, B, T = 20, 4, 5
    module = make_module(H, 1, True, True, seed=11)
    (params,) = module._layer_params()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, B, I, generator=g).to(DEVICE)
    h0 = torch.randn(2, B, H, generator=g).to(DEVICE)
    lengths = torch.tensor([2, 5, 1, 3], device=DEVICE)
    gy = torch.randn(T, B, 2 * H, generator=g).to(DEVICE)
    gh = torch.randn(2, B, H, generator=g).to(DEVICE)
    results = []
    for layer in (reference_layer, gru_ops.gru_layer):
        module.zero_grad(set_to_none=True)
        xs, hs = x.clone().requires_grad_(), h0.clone().requires_grad_()
        y, h_n, c_n = layer("gru", xs, hs, None, params, lengths, "tanh")
        assert c_n is None
        ((y * gy).sum() + (h_n * gh).sum()).backward()
        results.append({"y": y.detach(), "h_n": h_n.detach(), "dx": xs.grad, "dh0": hs.grad} | {f"d{n}": p.grad for n, p in module.named_parameters()})
    expected, actual = results
    assert_all_close(actual, expected, FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_saturated_gates_stay_finite(dtype):
    """Weights * 1e4: every gate saturates; no NaN/inf where the reference (same dtype) has none."""
    layers, H, B, T = 2, 20, 3, 4
    module = make_module(H, layers, True, True, seed=7, scale=1e4)
    inputs = make_inputs(H, layers, 2, B, T, True, seed=7)
    expected = run(copy.deepcopy(module), "reference", *inputs, dtype)
    with launches(recurrence.plan(3, H, dtype).strategy, layers):
        actual = run(module, "triton", *inputs, dtype)
    for name, e in expected.items():
        finite = torch.isfinite(e)
        assert finite.any(), f"{name}: the reference itself overflowed; the test proves nothing"
        assert torch.isfinite(actual[name][finite]).all(), f"{name}: non-finite where the reference is finite"
    if dtype == torch.float32:
        for name in ("y", "h_n"):
            assert_close(actual[name], expected[name], atol=FP32_TOL)


def test_empty_batch_launches_nothing():
    module = make_module(8, 1, True, True, seed=0)
    x = torch.randn(3, 0, I, device=DEVICE, requires_grad=True)
    h0 = torch.randn(2, 0, 8, device=DEVICE, requires_grad=True)
    before = collections.Counter(recurrence.LAUNCHES)
    with fastrnn.use_backend("triton"):
        y, h_n = module(x, h0)
    (y.sum() + h_n.sum()).backward()
    assert y.shape == (3, 0, 16) and h_n.shape == (2, 0, 8)
    assert recurrence.LAUNCHES == before
    for p in module.parameters():
        assert_close(p.grad, torch.zeros_like(p), atol=0.0)
