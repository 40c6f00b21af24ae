"""``@triton.jit`` helpers every cell's kernels share: the walk through time and the gradient
controls of the backward pass."""

import triton
import triton.language as tl


@triton.jit
def program_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The tile program ``(i, d)`` of the grid ``(cdiv(B, BLOCK_B), D)`` owns: its direction, the
    batch rows ``i*BLOCK_B ...`` (also as int64 for addressing), the state columns ``0..BLOCK_H``,
    and their in-bounds masks (rows, columns, the row x column tile)."""
    direction = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_H)
    row_ok = rows < B
    col_ok = cols < H
    return direction, rows, rows.to(tl.int64), row_ok, cols, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def copy_rows(src, dst, row_ok, H, BLOCK_H: tl.constexpr):
    """Copy ``H`` elements of each of a tile's rows from ``src`` to ``dst`` (``(BLOCK_B, 1)`` blocks
    of row pointers), ``BLOCK_H`` columns at a time, converting to ``dst``'s dtype: how the tiled
    kernels fill their fp32 ping-pong state and hand the final state back."""
    for n0 in range(0, H, BLOCK_H):
        cols = n0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < H)[None, :]
        values = tl.load(src + cols[None, :], mask=ok, other=0.0)
        tl.store(dst + cols[None, :], values.to(dst.dtype.element_ty), mask=ok)


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
