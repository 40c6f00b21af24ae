"""The precision of the recurrent products: which ``INPUT_PRECISION`` each launch gets
(``fastrnn.ops.recurrence.input_precision``) under PyTorch's tf32 flags (the RNN, GRU and LSTM layer
kernels follow cuDNN's RNN flag, as ``nn.RNN``/``nn.GRU``/``nn.LSTM`` on CUDA; the kernels outside the
strategy table the matmul flag), and the split-tf32 product of ``fastrnn.kernels.precision`` against
the plain fp32 product.

Under Triton's interpreter ``tl.dot`` is numpy's fp32 product whatever the precision, so these
tests see the choice (captured at the launch) and the arithmetic of the stacked halves (a wrong
stacking gives a wrong product), not tf32 rounding: that needs a GPU. Each choice is tested with the
other flag set the opposite way, so a launch that read the wrong flag fails.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import fastrnn
from fastrnn.backend import triton_interpreting
from fastrnn.kernels import gru as gru_kernels
from fastrnn.kernels import lstm as lstm_kernels
from fastrnn.kernels import rnn as rnn_kernels
from fastrnn.kernels.precision import split_tf32, weight_product
from fastrnn.ops import persistent, recurrence

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreting()),
    reason="the Triton kernels need a CUDA device or TRITON_INTERPRET=1",
)

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"


@pytest.fixture
def tf32_flag():
    """``set_flag(value)``: the flag the layer kernels follow (cuDNN's RNN flag, every cell) set to
    ``value`` and ``torch.backends.cuda.matmul.allow_tf32`` to ``not value``; both restored afterwards."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def set_flag(value: bool) -> None:
        torch.backends.cudnn.allow_tf32 = value
        torch.backends.cuda.matmul.allow_tf32 = not value

    yield set_flag
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


#: cell -> (layer class, gates, expected fp32 persistent precision without / with tf32 allowed)
CELLS = {
    "lstm": (fastrnn.LSTM, 4, "tf32x4", "tf32"),
    "gru": (fastrnn.GRU, 3, "ieee", "tf32"),
    "rnn": (fastrnn.RNN, 1, "ieee", "tf32"),
}


@pytest.mark.parametrize("cell", list(CELLS))
def test_layer_kernels_follow_cudnn_rnn_flag(cell):
    """Each cell's layer kernels take tf32 from cuDNN's RNN flag, as ``nn.RNN``, ``nn.GRU`` and
    ``nn.LSTM`` do on CUDA (one cuDNN RNN descriptor for all three): on by default
    (``torch.backends.cudnn.allow_tf32`` is True), off through either PyTorch API (the legacy
    ``allow_tf32`` or the per-operator ``cudnn.rnn.fp32_precision``), whatever the matmul flag. At
    H256 (L5's) every cell plans persistent with tf32 products; with the flag off the LSTM's split
    form keeps the tiled strategy (NOT_PLANNED), the RNN's and GRU's FMA products stay persistent."""
    from fastrnn.ops.recurrence import cudnn_rnn_allows_tf32

    _, gates, off, _ = CELLS[cell]
    cudnn = torch.backends.cudnn
    previous = cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        cudnn.allow_tf32 = True
        assert cudnn_rnn_allows_tf32() and recurrence.input_precision(torch.float32, "persistent", gates) == "tf32"
        assert recurrence.input_precision(torch.float32, "resident", gates) == "tf32"
        assert recurrence.plan(gates, 256, torch.float32).strategy == "persistent"
        cudnn.allow_tf32 = False
        assert not cudnn_rnn_allows_tf32() and recurrence.input_precision(torch.float32, "persistent", gates) == off
        assert recurrence.plan(gates, 256, torch.float32).strategy == ("tiled" if gates == 4 else "persistent")
        torch.backends.cuda.matmul.allow_tf32 = True  # the matmul flag plays no part
        assert recurrence.input_precision(torch.float32, "tiled", gates) == "tf32x3"
        torch.backends.cuda.matmul.allow_tf32 = False
        cudnn.allow_tf32 = True
        if isinstance(getattr(cudnn.rnn, "fp32_precision", None), str):  # torch's per-operator API
            cudnn.rnn.fp32_precision = "ieee"
            try:
                assert not cudnn_rnn_allows_tf32()
                assert recurrence.input_precision(torch.float32, "resident", gates) == "tf32x3"
            finally:
                cudnn.rnn.fp32_precision = "tf32"
    finally:
        cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["tf32_off", "tf32_on"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_persistent_launch_gets_the_chosen_precision(monkeypatch, tf32_flag, cell, allow_tf32):
    """The fp32 persistent kernels, forward and backward, are launched with ``tf32x4`` (LSTM) or
    ``ieee`` (RNN, GRU) when the flag the cell follows does not allow tf32 and ``tf32`` when it
    does (captured at :func:`fastrnn.ops.persistent.launch`); the layer still matches torch.nn at
    fp32 tolerance."""
    layer, _, off, on = CELLS[cell]
    tf32_flag(allow_tf32)
    monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
    monkeypatch.setenv("FASTRNN_PERSISTENT_SLICE", "4")
    monkeypatch.setenv("FASTRNN_PERSISTENT_MODE", "per_step")
    seen = []
    launch = persistent.launch

    def recording_launch(name, kernel, args, meta, **kwargs):
        seen.append((name, meta["INPUT_PRECISION"]))
        return launch(name, kernel, args, meta, **kwargs)

    monkeypatch.setattr(persistent, "launch", recording_launch)
    torch.manual_seed(0)
    module = layer(8, 16, device=DEVICE)
    expected_module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](8, 16, device=DEVICE)
    expected_module.load_state_dict(module.state_dict())
    x = torch.randn(3, 2, 8, device=DEVICE)
    with fastrnn.use_backend("triton"):
        y, _ = module(x)
    y.sum().backward()
    want = on if allow_tf32 else off
    assert sorted(seen) == [(f"{cell}_bwd", want), (f"{cell}_fwd", want)]
    if not allow_tf32 or not torch.cuda.is_available():  # tf32 on a GPU is not fp32-accurate
        torch.testing.assert_close(y, expected_module(x)[0], atol=1e-5, rtol=1e-5)


class _RecordingKernel:
    """Stands in for a ``@triton.jit`` kernel: records each launch's ``(name, INPUT_PRECISION,
    maxnreg)``, then launches."""

    def __init__(self, kernel, name: str, seen: list):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.seen.append((self.name, meta["INPUT_PRECISION"], meta.get("maxnreg")))
            return self.kernel[grid](*args, **meta)
        return run


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["tf32_off", "tf32_on"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_resident_launch_gets_the_chosen_precision(monkeypatch, tf32_flag, cell, allow_tf32):
    """The fp32 resident kernels (H16), forward and backward, are launched with Triton's ``tf32x3``
    when cuDNN's RNN flag does not allow tf32 and ``tf32`` when it does (the matmul flag set the other
    way), the GRU backward's tf32 form with the register budget (``recurrence.RESIDENT_BUDGET``);
    fp32-exact on the CPU."""
    layer = CELLS[cell][0]
    kernels = {"lstm": lstm_kernels, "gru": gru_kernels, "rnn": rnn_kernels}[cell]
    tf32_flag(allow_tf32)
    seen = []
    for name in (f"{cell}_fwd_resident_kernel", f"{cell}_bwd_resident_kernel"):
        monkeypatch.setattr(kernels, name, _RecordingKernel(getattr(kernels, name), name, seen))
    torch.manual_seed(0)
    module = layer(8, 16, device=DEVICE)
    expected_module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](8, 16, device=DEVICE)
    expected_module.load_state_dict(module.state_dict())
    x = torch.randn(3, 2, 8, device=DEVICE)
    with fastrnn.use_backend("triton"):
        y, _ = module(x)
    y.sum().backward()
    want = "tf32" if allow_tf32 else "tf32x3"
    budget = recurrence.register_budget(4) if cell == "gru" and allow_tf32 else None  # H16: 4 warps
    assert seen == [(f"{cell}_fwd_resident_kernel", want, None), (f"{cell}_bwd_resident_kernel", want, budget)]
    if not allow_tf32 or not torch.cuda.is_available():
        torch.testing.assert_close(y, expected_module(x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["tf32_off", "tf32_on"])
def test_resident_and_16bit_precision(tf32_flag, allow_tf32):
    """The resident and tiled kernels run fp32 products as Triton's ``tf32x3`` unless the flag their
    cell follows allows tf32; 16-bit products are always ``ieee``; the persistent kernels' fp32
    choice is the split ``tf32x4`` for the cells in ``SPLIT_TF32_GATES``, ``ieee`` for the others;
    kernels outside the strategy table follow the matmul flag whatever the cell."""
    tf32_flag(allow_tf32)
    on = "tf32" if allow_tf32 else None
    matmul = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    for gates in (1, 3, 4):
        assert recurrence.input_precision(torch.float32, None, gates) == matmul  # kernels outside the strategy table
        split = "tf32x4" if gates in persistent.SPLIT_TF32_GATES else "ieee"
        assert recurrence.input_precision(torch.float32, "persistent", gates) == (on or split)
        for strategy in ("resident", "tiled"):
            assert recurrence.input_precision(torch.float32, strategy, gates) == (on or "tf32x3")
        for dtype in (torch.float16, torch.bfloat16):
            for strategy in ("resident", "tiled", "persistent", None):
                assert recurrence.input_precision(dtype, strategy, gates) == "ieee"


@triton.jit
def _product_kernel(w_ptr, x_ptr, out_ptr, hi_ptr, lo_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """``out (M, N) = w (M, K) @ x (K, N)`` by :func:`weight_product`; ``hi``, ``lo`` ``(M, K)``: :func:`split_tf32` of ``w``."""
    m = tl.arange(0, M)
    k = tl.arange(0, K)
    n = tl.arange(0, N)
    w = tl.load(w_ptr + m[:, None] * K + k[None, :])
    x = tl.load(x_ptr + k[:, None] * N + n[None, :])
    hi, lo = split_tf32(w)
    tl.store(hi_ptr + m[:, None] * K + k[None, :], hi)
    tl.store(lo_ptr + m[:, None] * K + k[None, :], lo)
    tl.store(out_ptr + m[:, None] * N + n[None, :], weight_product(w, x, INPUT_PRECISION))


def test_split_tf32_product_matches_fp32():
    """``split_tf32`` is exact (``hi + lo == w``, ``hi`` has the 13 low mantissa bits clear) and the
    ``tf32x4`` product of the stacked halves is ``w @ x`` (non-square: M, K, N all different)."""
    M, K, N = 32, 64, 16
    torch.manual_seed(0)
    w = torch.randn(M, K, device=DEVICE)
    x = torch.randn(K, N, device=DEVICE)
    out, hi, lo = (torch.full(s, float("nan"), device=DEVICE) for s in ((M, N), (M, K), (M, K)))
    _product_kernel[(1,)](w, x, out, hi, lo, M, K, N, "tf32x4")
    assert torch.equal(hi + lo, w)
    assert not (hi.view(torch.int32) & 0x1FFF).any()
    assert (lo.abs() < 2.0 ** -10 * w.abs()).all() and lo.abs().max() > 0
    expected = (w.double() @ x.double()).float()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
