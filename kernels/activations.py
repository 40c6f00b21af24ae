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


# Elman nonlinearities by code (``fastrnn.ops.rnn.NONLINEARITIES`` maps names to codes):
# 0 tanh, 1 relu, 2 sigmoid, 3 hardtanh, 4 silu, 5 gelu (tanh approximation).
# Codes below NEEDS_PRE have a derivative that is a function of the output h; silu and gelu need
# the pre-activation, which the forward kernel then saves.
NEEDS_PRE = tl.constexpr(4)


@triton.jit
def elman_activation(pre, NONLINEARITY: tl.constexpr):
    """The Elman cell's nonlinearity of the pre-activation ``pre``. NaN stays NaN, as in torch."""
    if NONLINEARITY == 0:
        return tanh(pre)
    elif NONLINEARITY == 1:
        return tl.where(pre < 0, 0.0, pre)
    elif NONLINEARITY == 2:
        return sigmoid(pre)
    elif NONLINEARITY == 3:
        return tl.where(pre < -1.0, -1.0, tl.where(pre > 1.0, 1.0, pre))
    elif NONLINEARITY == 4:
        return pre * sigmoid(pre)
    else:
        return 0.5 * pre * (1.0 + tanh(0.7978845608028654 * (pre + 0.044715 * pre * pre * pre)))  # sqrt(2/pi)


@triton.jit
def elman_activation_grad(h, pre, NONLINEARITY: tl.constexpr):
    """Derivative of the nonlinearity at ``pre``, from the output ``h`` where that suffices
    (``pre`` is then unused and may be anything)."""
    if NONLINEARITY == 0:
        return 1.0 - h * h
    elif NONLINEARITY == 1:
        return tl.where(h <= 0, 0.0, 1.0)  # torch's threshold_backward
    elif NONLINEARITY == 2:
        return h * (1.0 - h)
    elif NONLINEARITY == 3:
        return tl.where((h > -1.0) & (h < 1.0), 1.0, 0.0)  # torch's hardtanh_backward
    elif NONLINEARITY == 4:
        s = sigmoid(pre)
        return s * (1.0 + pre * (1.0 - s))
    else:
        t = tanh(0.7978845608028654 * (pre + 0.044715 * pre * pre * pre))
        return 0.5 * (1.0 + t) + 0.5 * pre * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * pre * pre)
