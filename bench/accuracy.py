"""The check every row passes before it is timed: outputs and gradients against float64.

The oracle is the row's own ``fastrnn`` layer copied to float64 and run on the reference backend
(the plain PyTorch loop of :mod:`fastrnn.reference`). The error of a tensor is the relative norm
``||a - b|| / ||b||``; a row's error is the largest over output, final states, input gradient and
every parameter gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bench.workload import Sample, converted, outputs_and_grads, samples_as

#: Largest relative error a row may show, by dtype (fp32 with TF32 matmuls gets the TF32 bound).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 2e-2, "float64": 1e-10}
TF32_TOLERANCE = 1e-2


def tf32_enabled(device: torch.device) -> bool:
    """True when float32 matrix products on ``device`` may run in TF32: PyTorch's GEMMs by the matmul
    flag, cuDNN's RNNs and fastrnn's layer kernels by cuDNN's RNN flag
    (``fastrnn.ops.recurrence.cudnn_rnn_allows_tf32``)."""
    if device.type != "cuda":
        return False
    from fastrnn.ops.recurrence import cudnn_rnn_allows_tf32

    return bool(torch.backends.cuda.matmul.allow_tf32) or cudnn_rnn_allows_tf32()


def tolerance(dtype: str, device: torch.device) -> float:
    """The bound for a row of ``dtype`` on ``device``."""
    if dtype == "float32" and tf32_enabled(device):
        return TF32_TOLERANCE
    return TOLERANCE[dtype]


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (absolute norm when ``expected`` is 0;
    ``inf`` when shapes differ or ``actual`` is not finite)."""
    if actual.shape != expected.shape:
        return math.inf
    a, b = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(a).all():
        return math.inf
    denominator = b.norm().item()
    difference = (a - b).norm().item()
    return difference / denominator if denominator > 0 else difference


def compare(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> dict[str, float]:
    """Relative error of each tensor of ``expected`` (missing in ``actual``: ``inf``)."""
    return {name: relative_error(actual[name], ref) if name in actual else math.inf for name, ref in expected.items()}


def check(module: nn.Module, sample: Sample, tol: float, backend: str | None = None,
          others: dict[str, nn.Module] | None = None) -> dict:
    """Compare ``module`` (run under ``backend``, default: whatever is active) with its float64
    reference on ``sample``; ``others`` (e.g. ``torch.nn`` in the same dtype) are measured the same
    way for context, never judged.

    Returns ``{"passed", "tolerance", "max_rel_err", "worst", "errors": {tensor: err}, "others": {...}}``.
    """
    oracle = converted(module, torch.float64)  # the very same weights, widened
    expected = outputs_and_grads(oracle, samples_as([sample], torch.float64)[0], backend="reference")
    errors = compare(outputs_and_grads(module, sample, backend=backend), expected)
    worst = max(errors, key=errors.get)
    result = {
        "passed": errors[worst] <= tol,
        "tolerance": tol,
        "max_rel_err": errors[worst],
        "worst": worst,
        "errors": errors,
        "others": {},
    }
    for name, other in (others or {}).items():
        other_sample = samples_as([sample], next(other.parameters()).dtype)[0]
        other_errors = compare(outputs_and_grads(other, other_sample), expected)
        result["others"][name] = max(other_errors.values())
    return result
