"""Shared test fixtures.

* Every test runs with fresh allocations poisoned: ``torch.empty``, ``torch.empty_like``,
  ``torch.empty_strided`` and ``Tensor.new_empty`` return floating-point tensors filled with NaN, so
  an output a kernel or a Python path forgot to write fails loudly instead of passing on whatever
  memory happened to hold. A test that cannot run under it opts out with
  ``@pytest.mark.no_nan_poison``.
* Every test starts and ends with no backend override (``fastrnn.set_backend(None)``).
* :func:`assert_close` compares with explicit tolerances and never treats NaN as equal.
* On a GPU, cuDNN's RNN tf32 flag is off for the session (``torch.backends.cudnn.allow_tf32``, on by
  default): the fp32 RNN, GRU and LSTM kernels follow it as ``torch.nn``'s cuDNN RNNs do
  (``fastrnn.ops.recurrence.input_precision``), and the fp32 tests compare at fp32 tolerances; a test
  of the tf32 choice sets the flag itself.
* Without a GPU, Triton's interpreter is switched on before anything imports ``triton`` (it is
  read when ``@triton.jit`` decorates), so the kernel tests run the real kernels on the CPU.
"""

from __future__ import annotations

import functools
import os
import sys

import torch

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastrnn


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "no_nan_poison: run without the NaN poisoning of torch.empty / empty_like / new_empty"
    )


def _poisoned(original):
    @functools.wraps(original)
    def allocate(*args, **kwargs):
        result = original(*args, **kwargs)
        if isinstance(result, torch.Tensor) and result.is_floating_point():
            with torch.no_grad():
                result.fill_(float("nan"))
        return result

    return allocate


@pytest.fixture(autouse=True)
def nan_poison(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Fill fresh floating-point allocations with NaN (unless the test is marked ``no_nan_poison``)."""
    if request.node.get_closest_marker("no_nan_poison") is None:
        for name in ("empty", "empty_like", "empty_strided"):
            monkeypatch.setattr(torch, name, _poisoned(getattr(torch, name)))
        monkeypatch.setattr(torch.Tensor, "new_empty", _poisoned(torch.Tensor.new_empty))
    yield


@pytest.fixture(autouse=True, scope="session")
def fp32_exact_cudnn_rnn():
    """On a GPU: cuDNN's RNN tf32 flag off for the session, restored afterwards (see the module docstring)."""
    if not torch.cuda.is_available():
        yield
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = previous


@pytest.fixture(autouse=True)
def no_backend_override():
    """No test leaks a ``set_backend`` override into the next one."""
    fastrnn.set_backend(None)
    yield
    fastrnn.set_backend(None)


def assert_close(actual, expected, atol: float, rtol: float = 0.0, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` with explicit tolerances, dtypes checked, NaN never equal."""
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=False, check_dtype=True, msg=msg)

