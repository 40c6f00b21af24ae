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


@triton.jit
def row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS: tl.constexpr):
    """Each row's length (``lengths (B,)`` int32) with ``HAS_LENGTHS``, else ``T`` (every row full)."""
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    else:
        length = T
    return length


@triton.jit
def feature_offsets(step, direction, G: tl.constexpr, H, D, cols):
    """Offsets of a ``(T, B, D*G*H)`` tensor's ``(BLOCK_B, BLOCK_H)`` tile at the rows ``step = t*B +
    row`` (int64), direction ``direction``'s block, gate 0's columns ``cols`` (``G = 1``: a layer
    output or state sequence ``(T, B, D*H)``); gate ``q`` lies ``q*H`` further (:func:`load_gate`)."""
    return step[:, None] * (D * G * H) + direction * G * H + cols[None, :]


@triton.jit
def load_gate(ptr, offs, q: tl.constexpr, H, ok):
    """Gate ``q``'s block (fp32, zero outside ``ok``) of a tile laid out gate after gate, ``H``
    columns each, from the offsets ``offs`` of gate 0 (:func:`feature_offsets`)."""
    return tl.load(ptr + offs + q * H, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def store_gate(ptr, offs, q: tl.constexpr, H, value, ok):
    """Store ``value`` (converted to ``ptr``'s dtype) as gate ``q``'s block: :func:`load_gate`'s inverse."""
    tl.store(ptr + offs + q * H, value.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def advance_state(new, old, t, length, HAS_LENGTHS: tl.constexpr):
    """The state after step ``t`` and the step's output: ``new`` for both where the step is inside
    the row's length (``t < length``, with ``HAS_LENGTHS``); past it the ``old`` state is kept and
    the output is zero."""
    if HAS_LENGTHS:
        valid = (t < length)[:, None]
        state = tl.where(valid, new, old)
        out = tl.where(valid, new, 0.0)
    else:
        state = new
        out = new
    return state, out


@triton.jit
def live_rows(t, length, row_ok, HAS_LENGTHS: tl.constexpr):
    """``(BLOCK_B, 1)`` mask of the rows step ``t`` updates: inside the batch and, with
    ``HAS_LENGTHS``, inside the row's length (``t < length``)."""
    if HAS_LENGTHS:
        valid = (t < length)[:, None] & row_ok[:, None]
    else:
        valid = row_ok[:, None]
    return valid


@triton.jit
def step_grad(dy_ptr, offs, carried, valid, ok):
    """The total gradient reaching a step's output state: ``dy[offs] + carried`` (fp32) where
    ``valid``, zero elsewhere (past a row's length the step has no gradient)."""
    return tl.where(valid, tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32) + carried, 0.0)


@triton.jit
def persistent_tile(B, H, SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """What program ``(s, g, d)`` of a persistent grid ``(slices, batch_groups, D)`` owns: its
    direction, slice index ``s``, hidden units ``s*SLICE + 0..BLOCK_S`` (``unit_ok``: inside the
    slice and ``< H``), batch rows ``g*BLOCK_B ...`` (also int64), all ``BLOCK_K`` state columns
    ``k`` (``k_ok``: ``< H``), and the ``(BLOCK_S, BLOCK_B)`` mask of its units x rows tile.
    Persistent kernels hold their own state transposed: ``(units, batch rows)`` tiles."""
    index = tl.program_id(0)
    direction = tl.program_id(2)
    lanes = tl.arange(0, BLOCK_S)
    units = index * SLICE + lanes
    unit_ok = (lanes < SLICE) & (units < H)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < H
    return direction, index, units, unit_ok, rows, rows.to(tl.int64), row_ok, ks, k_ok, unit_ok[:, None] & row_ok[None, :]


@triton.jit
def group_flags(flags_ptr, slices, BLOCK_FLAGS: tl.constexpr):
    """The flags of this program's group (same batch group and direction; ``flags`` int32
    ``(D, batch_groups, slices)``) and this program's own flag."""
    group = flags_ptr + (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * slices
    return group, group + tl.program_id(0)


@triton.jit
def load_rows(src, row_stride, rows64, row_ok, ks, k_ok, dtype):
    """All ``H`` state columns of a group's rows: the ``(BLOCK_B, BLOCK_K)`` tile
    ``src[rows * row_stride + k]`` in ``dtype`` (zero outside ``k < H``, ``row < B``): the
    gathered operand of a persistent step's product ``rows @ W_slice^T``. (Loaded in this
    orientation, not transposed after the load: a ``tl.trans`` of a freshly loaded operand made
    the fp32 products spill kilobytes of stack on sm_90.)"""
    tile = tl.load(src + rows64[:, None] * row_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    return tile.to(dtype)


@triton.jit
def load_rows_split(src, row_stride, rows64, row_ok, H, SPLIT: tl.constexpr, CHUNK: tl.constexpr, dtype):
    """:func:`load_rows` with the ``k`` side cut into ``SPLIT`` chunks of ``CHUNK`` columns: the
    ``(SPLIT, BLOCK_B, CHUNK)`` tile ``src[rows * row_stride + c*CHUNK + k]`` in ``dtype`` (zero
    outside ``< H`` and ``row < B``), the left operand of :func:`split_product`."""
    k = tl.arange(0, SPLIT)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]
    tile = tl.load(src + rows64[None, :, None] * row_stride + k, mask=row_ok[None, :, None] & (k < H), other=0.0)
    return tile.to(dtype)


@triton.jit
def load_weight_split(w_ptr, k_stride, unit_stride, H, units, unit_ok, SPLIT: tl.constexpr, CHUNK: tl.constexpr):
    """A weight slice cut as :func:`load_rows_split` cuts ``h``: the ``(SPLIT, CHUNK, BLOCK_S)``
    tile ``w[c, k, i] = w_ptr[(c*CHUNK + k) * k_stride + units[i] * unit_stride]`` (zero outside
    ``unit_ok`` and ``< H``): ``k_stride = 1, unit_stride = H`` takes the rows ``units`` of a
    row-major ``(H', H)`` block (a forward's slice), ``k_stride = H, unit_stride = 1`` its columns
    (a backward's)."""
    k = tl.arange(0, SPLIT)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, :, None]
    return tl.load(w_ptr + k * k_stride + units[None, None, :] * unit_stride, mask=(k < H) & unit_ok[None, None, :], other=0.0)


@triton.jit
def split_product(h_split, w_split, INPUT_PRECISION: tl.constexpr):
    """``h @ W_slice^T`` from the split operands: ``sum_c h_split[c] @ w_split[c]``, fp32
    ``(BLOCK_B, BLOCK_S)``. One batched (3-D) dot whose batch side is the ``k`` chunks: the warps
    of a program share the reduction, each holding its chunks of ``h``, where a 2-D dot with
    ``M = N = 16`` replicates all of ``h`` in every warp (measured on sm_90, GRU forward bf16 at
    H 512: 255 registers and a 16-80 B stack frame that way)."""
    return tl.sum(tl.dot(h_split, w_split, input_precision=INPUT_PRECISION), axis=0)


@triton.jit
def gather_rows(src, row_stride, rows64, row_ok, ks, k_ok, H, dtype, SPLIT_K: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr):
    """The gathered operand of a persistent step: :func:`load_rows_split` with ``SPLIT_K``, else
    :func:`load_rows`; its product with a weight slice is :func:`slice_product`."""
    if SPLIT_K:
        tile = load_rows_split(src, row_stride, rows64, row_ok, H, SPLIT, CHUNK, dtype)
    else:
        tile = load_rows(src, row_stride, rows64, row_ok, ks, k_ok, dtype)
    return tile


@triton.jit
def slice_product(h, w, INPUT_PRECISION: tl.constexpr, SPLIT_K: tl.constexpr):
    """``h @ W_slice^T`` (fp32 ``(BLOCK_B, BLOCK_S)``) of :func:`gather_rows`' operand: the split
    product with ``SPLIT_K``, else one 2-D dot."""
    if SPLIT_K:
        out = split_product(h, w, INPUT_PRECISION)
    else:
        out = tl.dot(h, w, input_precision=INPUT_PRECISION)
    return out
