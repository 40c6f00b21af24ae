"""``@triton.jit`` helpers every cell's kernels share: the walk through time and the gradient
controls of the backward pass."""

import triton
import triton.language as tl


@triton.jit
def step_time(s, T, direction):
    """Position of step ``s`` in time: forward (``direction`` 0) walks ``0..T-1``, reverse ``T-1..0``.
    A backward kernel walks the forward's order reversed: ``step_time(s, T, 1 - direction)``."""
    return s + direction * (T - 1 - 2 * s)


@triton.jit
def clamp_grad(g, grad_clip):
    """Clamp a gradient to ``[-grad_clip, grad_clip]`` (NaN passes through, as with torch.clamp)."""
    return tl.where(g > grad_clip, grad_clip, tl.where(g < -grad_clip, -grad_clip, g))


@triton.jit
def squared_row_norm(d_state, valid):
    """Per row, ``sum_j d_state[:, j]^2`` where ``valid`` (a step inside the row's length), else 0."""
    return tl.sum(tl.where(valid, d_state * d_state, 0.0), axis=1)
