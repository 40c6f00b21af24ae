"""Free-running Elman generation with feedback: recurrence, output head and feedback in one launch.

Per step ``t = 0 .. T-1`` (``x_0`` given, ``I == O``)::

    pre_t = x_t W_ih^T + h_{t-1} W_hh^T + b          b = b_ih + b_hh
    h_t   = act(pre_t)                               act: the Elman nonlinearity
    y_t   = out(h_t W_out^T + b_out)                 out: identity, tanh or sigmoid
    x_{t+1} = y_t                                    the feedback edge

The backward kernel walks time in reverse carrying two gradients: ``dh`` (to ``h_{t-1}`` through
``W_hh``) and ``dx`` (to ``x_t = y_{t-1}`` through ``W_ih``, the feedback edge)::

    dz_t = (dy_t + dx_{t+1}) * out'(y_t)             dx_T = 0
    g_t  = clip((dh_t + dz_t W_out) * act'(h_t))     dh_{T-1} = dh_n
    dh_{t-1} = g_t W_hh,   dx_t = g_t W_ih

and writes ``dz`` and ``g`` of every step; the weight gradients are GEMMs over them on the host
(``fastrnn.ops.feedback``).

Arguments (contiguous; ``B`` rows, ``H`` hidden units, ``O`` output = input features):

* ``x0``, ``dx0``: ``(B, O)``; ``h0``, ``h_n``, ``dh_n``, ``dh0``: ``(B, H)``.
* ``w_ih``: ``(H, O)``; ``w_hh``: ``(H, H)``; ``w_out``: ``(O, H)`` (``nn.Linear`` layout,
  ``w[n, k]`` weighs input unit ``k`` into output unit ``n``); ``b``: ``(H,)``; ``b_out``: ``(O,)``.
* ``y``, ``dy``, ``dz``: ``(T, B, O)``; ``h``, ``g``: ``(T, B, H)`` (every step's state and
  pre-activation gradient); ``pre``: ``(T, B, H)``, written and read only when the nonlinearity's
  derivative needs the pre-activation (``SAVE_PRE``; silu, gelu), else a dummy pointer.
* ``grad_clip``: fp32 scalar, used with ``CLIP``.
* ``NONLINEARITY``: code of ``fastrnn.kernels.activations``; ``HEAD``: 0 identity, 1 tanh,
  2 sigmoid.

Grid: ``(cdiv(B, BLOCK_B),)``; a program owns ``BLOCK_B`` rows for the whole sequence, its three
weight matrices loaded on chip once (``BLOCK_H >= H``, ``BLOCK_O >= O``, both at least 16 for
``tl.dot``), state and carried gradients in fp32 registers.
"""

import triton
import triton.language as tl

from fastrnn.kernels.activations import elman_activation, elman_activation_grad, sigmoid, tanh
from fastrnn.kernels.recurrence import clamp_grad


@triton.jit
def head_activation(z, HEAD: tl.constexpr):
    """The output head's activation: 0 identity, 1 tanh, 2 sigmoid."""
    if HEAD == 1:
        return tanh(z)
    elif HEAD == 2:
        return sigmoid(z)
    else:
        return z


@triton.jit
def head_activation_grad(y, HEAD: tl.constexpr):
    """Its derivative, from the output ``y``."""
    if HEAD == 1:
        return 1.0 - y * y
    elif HEAD == 2:
        return y * (1.0 - y)
    else:
        return tl.full(y.shape, 1.0, tl.float32)


@triton.jit
def _load_matrix(ptr, rows, cols, n_rows, n_cols, TRANSPOSE: tl.constexpr):
    """A ``(len(rows), len(cols))`` tile of the row-major ``(n_rows, n_cols)`` matrix at ``ptr``
    (``TRANSPOSE``: of its transpose), zero outside it."""
    if TRANSPOSE:
        offs = cols[None, :] * n_cols + rows[:, None]
        ok = (rows < n_cols)[:, None] & (cols < n_rows)[None, :]
    else:
        offs = rows[:, None] * n_cols + cols[None, :]
        ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    return tl.load(ptr + offs, mask=ok, other=0.0)


@triton.jit(do_not_specialize=["T"])
def rnn_feedback_fwd_kernel(
    x0_ptr, h0_ptr, w_ih_ptr, w_hh_ptr, b_ptr, w_out_ptr, b_out_ptr, y_ptr, h_ptr, pre_ptr, h_n_ptr,
    T, B, H, O,
    NONLINEARITY: tl.constexpr, HEAD: tl.constexpr, SAVE_PRE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Forward: ``T`` steps of recurrence, head and feedback. Writes ``y``, ``h``, ``h_n`` (and ``pre``)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows64 = rows.to(tl.int64)
    cols_h = tl.arange(0, BLOCK_H)
    cols_o = tl.arange(0, BLOCK_O)
    row_ok = rows < B
    tile_h = row_ok[:, None] & (cols_h < H)[None, :]
    tile_o = row_ok[:, None] & (cols_o < O)[None, :]

    # Transposed weights: each product is state @ w_t.
    w_ih_t = _load_matrix(w_ih_ptr, cols_o, cols_h, H, O, True)  # (BLOCK_O, BLOCK_H)
    w_hh_t = _load_matrix(w_hh_ptr, cols_h, cols_h, H, H, True)  # (BLOCK_H, BLOCK_H)
    w_out_t = _load_matrix(w_out_ptr, cols_h, cols_o, O, H, True)  # (BLOCK_H, BLOCK_O)
    b = tl.load(b_ptr + cols_h, mask=cols_h < H, other=0.0).to(tl.float32)
    b_out = tl.load(b_out_ptr + cols_o, mask=cols_o < O, other=0.0).to(tl.float32)

    offs_h = rows64[:, None] * H + cols_h[None, :]
    offs_o = rows64[:, None] * O + cols_o[None, :]
    x = tl.load(x0_ptr + offs_o, mask=tile_o, other=0.0).to(tl.float32)
    h = tl.load(h0_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    for t in range(T):
        step = tl.cast(t, tl.int64) * B
        pre = tl.dot(x.to(w_ih_t.dtype), w_ih_t, input_precision=INPUT_PRECISION)
        pre += tl.dot(h.to(w_hh_t.dtype), w_hh_t, input_precision=INPUT_PRECISION)
        pre += b[None, :]
        h = elman_activation(pre, NONLINEARITY)
        tl.store(h_ptr + step * H + offs_h, h.to(h_ptr.dtype.element_ty), mask=tile_h)
        if SAVE_PRE:
            tl.store(pre_ptr + step * H + offs_h, pre.to(pre_ptr.dtype.element_ty), mask=tile_h)
        z = tl.dot(h.to(w_out_t.dtype), w_out_t, input_precision=INPUT_PRECISION) + b_out[None, :]
        y = head_activation(z, HEAD).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + step * O + offs_o, y, mask=tile_o)
        x = y.to(tl.float32)  # the next input is the output as stored
    tl.store(h_n_ptr + offs_h, h.to(h_n_ptr.dtype.element_ty), mask=tile_h)


@triton.jit(do_not_specialize=["T"])
def rnn_feedback_bwd_kernel(
    dy_ptr, dh_n_ptr, y_ptr, h_ptr, pre_ptr, w_ih_ptr, w_hh_ptr, w_out_ptr, dz_ptr, g_ptr, dx0_ptr, dh0_ptr,
    T, B, H, O, grad_clip,
    NONLINEARITY: tl.constexpr, HEAD: tl.constexpr, SAVE_PRE: tl.constexpr, CLIP: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """Backward through time and through the feedback edge. Writes ``dz``, ``g``, ``dx0``, ``dh0``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows64 = rows.to(tl.int64)
    cols_h = tl.arange(0, BLOCK_H)
    cols_o = tl.arange(0, BLOCK_O)
    row_ok = rows < B
    tile_h = row_ok[:, None] & (cols_h < H)[None, :]
    tile_o = row_ok[:, None] & (cols_o < O)[None, :]

    # The weights as stored: each gradient product is grad @ w.
    w_ih = _load_matrix(w_ih_ptr, cols_h, cols_o, H, O, False)  # (BLOCK_H, BLOCK_O)
    w_hh = _load_matrix(w_hh_ptr, cols_h, cols_h, H, H, False)  # (BLOCK_H, BLOCK_H)
    w_out = _load_matrix(w_out_ptr, cols_o, cols_h, O, H, False)  # (BLOCK_O, BLOCK_H)

    offs_h = rows64[:, None] * H + cols_h[None, :]
    offs_o = rows64[:, None] * O + cols_o[None, :]
    dh = tl.load(dh_n_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    dx = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for s in range(T):
        step = tl.cast(T - 1 - s, tl.int64) * B
        y = tl.load(y_ptr + step * O + offs_o, mask=tile_o, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + step * O + offs_o, mask=tile_o, other=0.0).to(tl.float32)
        dz = (dy + dx) * head_activation_grad(y, HEAD)
        dz = tl.where(tile_o, dz, 0.0)
        tl.store(dz_ptr + step * O + offs_o, dz.to(dz_ptr.dtype.element_ty), mask=tile_o)
        h = tl.load(h_ptr + step * H + offs_h, mask=tile_h, other=0.0).to(tl.float32)
        if SAVE_PRE:
            pre = tl.load(pre_ptr + step * H + offs_h, mask=tile_h, other=0.0).to(tl.float32)
        else:
            pre = h  # unused by the derivative
        dh += tl.dot(dz.to(w_out.dtype), w_out, input_precision=INPUT_PRECISION)
        g = dh * elman_activation_grad(h, pre, NONLINEARITY)
        if CLIP:
            g = clamp_grad(g, grad_clip)
        tl.store(g_ptr + step * H + offs_h, g.to(g_ptr.dtype.element_ty), mask=tile_h)
        dh = tl.dot(g.to(w_hh.dtype), w_hh, input_precision=INPUT_PRECISION)
        dx = tl.dot(g.to(w_ih.dtype), w_ih, input_precision=INPUT_PRECISION)
    tl.store(dh0_ptr + offs_h, dh.to(dh0_ptr.dtype.element_ty), mask=tile_h)
    tl.store(dx0_ptr + offs_o, dx.to(dx0_ptr.dtype.element_ty), mask=tile_o)
