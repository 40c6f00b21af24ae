"""Numerically stable activations and their derivatives, shared by every cell's kernels.

Extreme pre-activations saturate (``exp`` only ever sees ``-|x|``, so it never overflows) and
NaN propagates, as in PyTorch.
"""

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    """``1 / (1 + exp(-x))`` computed from ``exp(-|x|)``."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(x):
    """``tanh(x)`` computed from ``exp(-2|x|)``; odd symmetry restores the sign."""
    e = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, magnitude, -magnitude)


# Elman nonlinearities by code (the launcher maps names to these codes).
TANH: tl.constexpr = 0
RELU: tl.constexpr = 1


@triton.jit
def elman_activation(pre, NONLINEARITY: tl.constexpr):
    """The Elman cell's nonlinearity of the pre-activation ``pre``."""
    if NONLINEARITY == 0:
        return tanh(pre)
    else:
        return tl.where(pre < 0, 0.0, pre)  # NaN stays NaN, like torch.relu


@triton.jit
def elman_activation_grad(h, NONLINEARITY: tl.constexpr):
    """Derivative of the nonlinearity, written in terms of its output ``h``."""
    if NONLINEARITY == 0:
        return 1.0 - h * h
    else:
        return tl.where(h <= 0, 0.0, 1.0)  # torch's threshold_backward
