"""Free-running generation with feedback: recurrence, output head and feedback in one launch.

The Elman kernels (``rnn_feedback_*``) are described here; the GRU (``gru_feedback_*``) and LSTM
(``lstm_feedback_*``) kernels below follow the same plan, their math and arguments in the comment
block above each pair.

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
from fastrnn.kernels.gru import gru_gates, gru_gates_grad
from fastrnn.kernels.lstm import lstm_cell_grad
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


# ------------------------------------------------------------------------------------------ GRU
@triton.jit(do_not_specialize=["T"])
def gru_feedback_fwd_kernel(
    x0_ptr, h0_ptr, w_ih_ptr, w_hh_ptr, b_ih_ptr, b_hh_ptr, w_out_ptr, b_out_ptr, y_ptr, h_ptr, saved_ptr,
    T, B, H, O,
    HEAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """GRU forward: ``T`` steps of recurrence, head and feedback. Writes ``y``, ``h``, ``saved``.

    Per step (``torch.nn.GRU``, gate order r, z, n; ``b_hn`` inside the reset product)::

        gx_q = x_t W_ih[q]^T + b_ih[q],  gh_q = h_{t-1} W_hh[q]^T + b_hh[q]      q in (r, z, n)
        r, z, n, h_t = gru_gates(...)                  (fastrnn.kernels.gru)
        y_t = out(h_t W_out^T + b_out),  x_{t+1} = y_t

    Arguments (contiguous): ``x0``: ``(B, O)``; ``h0``: ``(B, H)``; ``w_ih``: ``(3H, O)``;
    ``w_hh``: ``(3H, H)``; ``b_ih``, ``b_hh``: ``(3H,)``; ``w_out``: ``(O, H)``; ``b_out``: ``(O,)``;
    ``y``: ``(T, B, O)``; ``h``: ``(T, B, H)``, every step's state (``h_n = h[T-1]``); ``saved``:
    ``(T, B, 4H)``, ``[r, z, n, gh_n]`` of every step. ``HEAD``: 0 identity, 1 tanh, 2 sigmoid.
    Grid ``(cdiv(B, BLOCK_B),)``; the seven weight blocks (3 of ``W_ih``, 3 of ``W_hh``, ``W_out``)
    loaded on chip once; the state in fp32 registers."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows64 = rows.to(tl.int64)
    cols_h = tl.arange(0, BLOCK_H)
    cols_o = tl.arange(0, BLOCK_O)
    row_ok = rows < B
    h_ok = cols_h < H
    tile_h = row_ok[:, None] & h_ok[None, :]
    tile_o = row_ok[:, None] & (cols_o < O)[None, :]

    wi_r = _load_matrix(w_ih_ptr, cols_o, cols_h, H, O, True)  # (BLOCK_O, BLOCK_H)
    wi_z = _load_matrix(w_ih_ptr + H * O, cols_o, cols_h, H, O, True)
    wi_n = _load_matrix(w_ih_ptr + 2 * H * O, cols_o, cols_h, H, O, True)
    wh_r = _load_matrix(w_hh_ptr, cols_h, cols_h, H, H, True)  # (BLOCK_H, BLOCK_H)
    wh_z = _load_matrix(w_hh_ptr + H * H, cols_h, cols_h, H, H, True)
    wh_n = _load_matrix(w_hh_ptr + 2 * H * H, cols_h, cols_h, H, H, True)
    w_out_t = _load_matrix(w_out_ptr, cols_h, cols_o, O, H, True)  # (BLOCK_H, BLOCK_O)
    bi_r = tl.load(b_ih_ptr + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    bi_z = tl.load(b_ih_ptr + H + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    bi_n = tl.load(b_ih_ptr + 2 * H + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    bh_r = tl.load(b_hh_ptr + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    bh_z = tl.load(b_hh_ptr + H + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    bh_n = tl.load(b_hh_ptr + 2 * H + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    b_out = tl.load(b_out_ptr + cols_o, mask=cols_o < O, other=0.0).to(tl.float32)[None, :]

    offs_h = rows64[:, None] * H + cols_h[None, :]
    offs_o = rows64[:, None] * O + cols_o[None, :]
    offs_s = rows64[:, None] * (4 * H) + cols_h[None, :]
    x = tl.load(x0_ptr + offs_o, mask=tile_o, other=0.0).to(tl.float32)
    h = tl.load(h0_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    for t in range(T):
        step = tl.cast(t, tl.int64) * B
        x_w = x.to(wi_r.dtype)
        h_w = h.to(wh_r.dtype)
        gx_r = tl.dot(x_w, wi_r, input_precision=INPUT_PRECISION) + bi_r
        gx_z = tl.dot(x_w, wi_z, input_precision=INPUT_PRECISION) + bi_z
        gx_n = tl.dot(x_w, wi_n, input_precision=INPUT_PRECISION) + bi_n
        gh_r = tl.dot(h_w, wh_r, input_precision=INPUT_PRECISION) + bh_r
        gh_z = tl.dot(h_w, wh_z, input_precision=INPUT_PRECISION) + bh_z
        gh_n = tl.dot(h_w, wh_n, input_precision=INPUT_PRECISION) + bh_n
        r, z, n, h = gru_gates(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h)
        h = tl.where(tile_h, h, 0.0)
        saved = saved_ptr + step * (4 * H) + offs_s
        tl.store(saved, r.to(saved_ptr.dtype.element_ty), mask=tile_h)
        tl.store(saved + H, z.to(saved_ptr.dtype.element_ty), mask=tile_h)
        tl.store(saved + 2 * H, n.to(saved_ptr.dtype.element_ty), mask=tile_h)
        tl.store(saved + 3 * H, gh_n.to(saved_ptr.dtype.element_ty), mask=tile_h)
        tl.store(h_ptr + step * H + offs_h, h.to(h_ptr.dtype.element_ty), mask=tile_h)
        out = tl.dot(h.to(w_out_t.dtype), w_out_t, input_precision=INPUT_PRECISION) + b_out
        y = head_activation(out, HEAD).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + step * O + offs_o, y, mask=tile_o)
        x = tl.where(tile_o, y.to(tl.float32), 0.0)  # the next input is the output as stored


@triton.jit(do_not_specialize=["T"])
def gru_feedback_bwd_kernel(
    dy_ptr, dh_n_ptr, h0_ptr, y_ptr, h_ptr, saved_ptr, w_ih_ptr, w_hh_ptr, w_out_ptr,
    dz_ptr, dgx_ptr, dghn_ptr, dx0_ptr, dh0_ptr,
    T, B, H, O, grad_clip,
    HEAD: tl.constexpr, CLIP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """GRU backward through time and feedback. Writes ``dz``, ``dgx``, ``dghn``, ``dx0``, ``dh0``.

    Per step, in reverse: ``dz_t = (dy_t + dx_{t+1}) out'(y_t)`` (``dx_T = 0``), ``dh += dz_t W_out``,
    the gate gradients by ``gru_gates_grad`` (clamped with ``CLIP``), then
    ``dh_{t-1} = dh z + dr W_hh[r] + dz W_hh[z] + (dn r) W_hh[n]`` and
    ``dx_t = dr W_ih[r] + dz W_ih[z] + dn W_ih[n]``.

    Arguments (contiguous): ``dy``, ``y``, ``dz``: ``(T, B, O)``; ``dh_n``, ``h0``, ``dh0``:
    ``(B, H)``; ``h``: ``(T, B, H)`` and ``saved``: ``(T, B, 4H)`` from the forward; ``w_ih``:
    ``(3H, O)``; ``w_hh``: ``(3H, H)``; ``w_out``: ``(O, H)``; ``dgx``: ``(T, B, 3H)``,
    ``[dr_pre, dz_pre, dn_pre]`` (the gradient of ``gx`` and of ``b_ih``); ``dghn``: ``(T, B, H)``,
    ``dn_pre * r`` (of ``gh_n``: ``dgh = [dr_pre, dz_pre, dghn]``); ``dx0``: ``(B, O)``;
    ``grad_clip``: fp32 scalar, used with ``CLIP``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows64 = rows.to(tl.int64)
    cols_h = tl.arange(0, BLOCK_H)
    cols_o = tl.arange(0, BLOCK_O)
    row_ok = rows < B
    tile_h = row_ok[:, None] & (cols_h < H)[None, :]
    tile_o = row_ok[:, None] & (cols_o < O)[None, :]

    wi_r = _load_matrix(w_ih_ptr, cols_h, cols_o, H, O, False)  # (BLOCK_H, BLOCK_O)
    wi_z = _load_matrix(w_ih_ptr + H * O, cols_h, cols_o, H, O, False)
    wi_n = _load_matrix(w_ih_ptr + 2 * H * O, cols_h, cols_o, H, O, False)
    wh_r = _load_matrix(w_hh_ptr, cols_h, cols_h, H, H, False)  # (BLOCK_H, BLOCK_H)
    wh_z = _load_matrix(w_hh_ptr + H * H, cols_h, cols_h, H, H, False)
    wh_n = _load_matrix(w_hh_ptr + 2 * H * H, cols_h, cols_h, H, H, False)
    w_out = _load_matrix(w_out_ptr, cols_o, cols_h, O, H, False)  # (BLOCK_O, BLOCK_H)

    offs_h = rows64[:, None] * H + cols_h[None, :]
    offs_o = rows64[:, None] * O + cols_o[None, :]
    offs_s = rows64[:, None] * (4 * H) + cols_h[None, :]
    offs_g = rows64[:, None] * (3 * H) + cols_h[None, :]
    h0 = tl.load(h0_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    dh = tl.load(dh_n_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    dx = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for s in range(T):
        t = T - 1 - s
        step = tl.cast(t, tl.int64) * B
        y = tl.load(y_ptr + step * O + offs_o, mask=tile_o, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + step * O + offs_o, mask=tile_o, other=0.0).to(tl.float32)
        dz = (dy + dx) * head_activation_grad(y, HEAD)
        dz = tl.where(tile_o, dz, 0.0)
        tl.store(dz_ptr + step * O + offs_o, dz.to(dz_ptr.dtype.element_ty), mask=tile_o)
        dh += tl.dot(dz.to(w_out.dtype), w_out, input_precision=INPUT_PRECISION)

        saved = saved_ptr + step * (4 * H) + offs_s
        r = tl.load(saved, mask=tile_h, other=0.0).to(tl.float32)
        z = tl.load(saved + H, mask=tile_h, other=0.0).to(tl.float32)
        n = tl.load(saved + 2 * H, mask=tile_h, other=0.0).to(tl.float32)
        gh_n = tl.load(saved + 3 * H, mask=tile_h, other=0.0).to(tl.float32)
        prev = tl.cast(tl.maximum(t - 1, 0), tl.int64) * B
        h_prev = tl.load(h_ptr + prev * H + offs_h, mask=tile_h, other=0.0).to(tl.float32)
        h_prev = tl.where(t == 0, h0, h_prev)
        dr, dzg, dn, dgh_n, dh_direct = gru_gates_grad(dh, h_prev, r, z, n, gh_n, grad_clip, CLIP)
        dgx = dgx_ptr + step * (3 * H) + offs_g
        tl.store(dgx, dr.to(dgx_ptr.dtype.element_ty), mask=tile_h)
        tl.store(dgx + H, dzg.to(dgx_ptr.dtype.element_ty), mask=tile_h)
        tl.store(dgx + 2 * H, dn.to(dgx_ptr.dtype.element_ty), mask=tile_h)
        tl.store(dghn_ptr + step * H + offs_h, dgh_n.to(dghn_ptr.dtype.element_ty), mask=tile_h)

        dr_w = dr.to(wh_r.dtype)
        dz_w = dzg.to(wh_r.dtype)
        # Products accumulate in the dot (its ``acc``), one gate at a time (fewer live registers
        # than summing separate dot results).
        dh = tl.dot(dr_w, wh_r, dh_direct, input_precision=INPUT_PRECISION)
        dx = tl.dot(dr_w.to(wi_r.dtype), wi_r, input_precision=INPUT_PRECISION)
        dh = tl.dot(dz_w, wh_z, dh, input_precision=INPUT_PRECISION)
        dx = tl.dot(dz_w.to(wi_z.dtype), wi_z, dx, input_precision=INPUT_PRECISION)
        dh = tl.dot(dgh_n.to(wh_n.dtype), wh_n, dh, input_precision=INPUT_PRECISION)
        dx = tl.dot(dn.to(wi_n.dtype), wi_n, dx, input_precision=INPUT_PRECISION)
    tl.store(dh0_ptr + offs_h, dh.to(dh0_ptr.dtype.element_ty), mask=tile_h)
    tl.store(dx0_ptr + offs_o, dx.to(dx0_ptr.dtype.element_ty), mask=tile_o)


# ----------------------------------------------------------------------------------------- LSTM
@triton.jit(do_not_specialize=["T"])
def lstm_feedback_fwd_kernel(
    x0_ptr, h0_ptr, c0_ptr, w_ih_ptr, w_hh_ptr, b_ptr, w_out_ptr, b_out_ptr, y_ptr, h_ptr, c_ptr, gates_ptr,
    T, B, H, O,
    HEAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """LSTM forward: ``T`` steps of recurrence, head and feedback. Writes ``y``, ``h``, ``c``, ``gates``.

    Per step (``torch.nn.LSTM``, gate order i, f, g, o; ``b = b_ih + b_hh``)::

        pre_q = x_t W_ih[q]^T + h_{t-1} W_hh[q]^T + b[q]
        c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g),   h_t = sigmoid(o) tanh(c_t)
        y_t = out(h_t W_out^T + b_out),  x_{t+1} = y_t

    Arguments (contiguous): ``x0``: ``(B, O)``; ``h0``, ``c0``: ``(B, H)``; ``w_ih``: ``(4H, O)``;
    ``w_hh``: ``(4H, H)``; ``b``: ``(4H,)``; ``w_out``: ``(O, H)``; ``b_out``: ``(O,)``; ``y``:
    ``(T, B, O)``; ``h``, ``c``: ``(T, B, H)``, every step's states (``h_n = h[T-1]``,
    ``c_n = c[T-1]``); ``gates``: ``(T, B, 4H)``, the activated gates ``sigmoid(i), sigmoid(f),
    tanh(g), sigmoid(o)``. Grid ``(cdiv(B, BLOCK_B),)``; nine weight blocks on chip."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows64 = rows.to(tl.int64)
    cols_h = tl.arange(0, BLOCK_H)
    cols_o = tl.arange(0, BLOCK_O)
    row_ok = rows < B
    h_ok = cols_h < H
    tile_h = row_ok[:, None] & h_ok[None, :]
    tile_o = row_ok[:, None] & (cols_o < O)[None, :]

    wi_i = _load_matrix(w_ih_ptr, cols_o, cols_h, H, O, True)  # (BLOCK_O, BLOCK_H)
    wi_f = _load_matrix(w_ih_ptr + H * O, cols_o, cols_h, H, O, True)
    wi_g = _load_matrix(w_ih_ptr + 2 * H * O, cols_o, cols_h, H, O, True)
    wi_o = _load_matrix(w_ih_ptr + 3 * H * O, cols_o, cols_h, H, O, True)
    wh_i = _load_matrix(w_hh_ptr, cols_h, cols_h, H, H, True)  # (BLOCK_H, BLOCK_H)
    wh_f = _load_matrix(w_hh_ptr + H * H, cols_h, cols_h, H, H, True)
    wh_g = _load_matrix(w_hh_ptr + 2 * H * H, cols_h, cols_h, H, H, True)
    wh_o = _load_matrix(w_hh_ptr + 3 * H * H, cols_h, cols_h, H, H, True)
    w_out_t = _load_matrix(w_out_ptr, cols_h, cols_o, O, H, True)  # (BLOCK_H, BLOCK_O)
    b_i = tl.load(b_ptr + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    b_f = tl.load(b_ptr + H + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    b_g = tl.load(b_ptr + 2 * H + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    b_o = tl.load(b_ptr + 3 * H + cols_h, mask=h_ok, other=0.0).to(tl.float32)[None, :]
    b_out = tl.load(b_out_ptr + cols_o, mask=cols_o < O, other=0.0).to(tl.float32)[None, :]

    offs_h = rows64[:, None] * H + cols_h[None, :]
    offs_o = rows64[:, None] * O + cols_o[None, :]
    offs_g = rows64[:, None] * (4 * H) + cols_h[None, :]
    x = tl.load(x0_ptr + offs_o, mask=tile_o, other=0.0).to(tl.float32)
    h = tl.load(h0_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    for t in range(T):
        step = tl.cast(t, tl.int64) * B
        x_w = x.to(wi_i.dtype)
        h_w = h.to(wh_i.dtype)
        # Each gate's two products accumulate in the dot (its ``acc``), from the bias up.
        i = tl.dot(x_w, wi_i, tl.broadcast_to(b_i, (BLOCK_B, BLOCK_H)), input_precision=INPUT_PRECISION)
        i = sigmoid(tl.dot(h_w, wh_i, i, input_precision=INPUT_PRECISION))
        f = tl.dot(x_w, wi_f, tl.broadcast_to(b_f, (BLOCK_B, BLOCK_H)), input_precision=INPUT_PRECISION)
        f = sigmoid(tl.dot(h_w, wh_f, f, input_precision=INPUT_PRECISION))
        g = tl.dot(x_w, wi_g, tl.broadcast_to(b_g, (BLOCK_B, BLOCK_H)), input_precision=INPUT_PRECISION)
        g = tanh(tl.dot(h_w, wh_g, g, input_precision=INPUT_PRECISION))
        o = tl.dot(x_w, wi_o, tl.broadcast_to(b_o, (BLOCK_B, BLOCK_H)), input_precision=INPUT_PRECISION)
        o = sigmoid(tl.dot(h_w, wh_o, o, input_precision=INPUT_PRECISION))
        c = tl.where(tile_h, f * c + i * g, 0.0)
        h = o * tanh(c)
        gates = gates_ptr + step * (4 * H) + offs_g
        tl.store(gates, i.to(gates_ptr.dtype.element_ty), mask=tile_h)
        tl.store(gates + H, f.to(gates_ptr.dtype.element_ty), mask=tile_h)
        tl.store(gates + 2 * H, g.to(gates_ptr.dtype.element_ty), mask=tile_h)
        tl.store(gates + 3 * H, o.to(gates_ptr.dtype.element_ty), mask=tile_h)
        tl.store(c_ptr + step * H + offs_h, c.to(c_ptr.dtype.element_ty), mask=tile_h)
        tl.store(h_ptr + step * H + offs_h, h.to(h_ptr.dtype.element_ty), mask=tile_h)
        out = tl.dot(h.to(w_out_t.dtype), w_out_t, input_precision=INPUT_PRECISION) + b_out
        y = head_activation(out, HEAD).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + step * O + offs_o, y, mask=tile_o)
        x = tl.where(tile_o, y.to(tl.float32), 0.0)  # the next input is the output as stored


@triton.jit(do_not_specialize=["T"])
def lstm_feedback_bwd_kernel(
    dy_ptr, dh_n_ptr, dc_n_ptr, c0_ptr, y_ptr, c_ptr, gates_ptr, w_ih_ptr, w_hh_ptr, w_out_ptr,
    dz_ptr, dgates_ptr, dx0_ptr, dh0_ptr, dc0_ptr,
    T, B, H, O, grad_clip,
    HEAD: tl.constexpr, CLIP: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_O: tl.constexpr,
):
    """LSTM backward through time and feedback. Writes ``dz``, ``dgates``, ``dx0``, ``dh0``, ``dc0``.

    Per step, in reverse: ``dz_t = (dy_t + dx_{t+1}) out'(y_t)``, ``dh += dz_t W_out``, the gate
    gradients and ``dc_{t-1}`` by ``fastrnn.kernels.lstm.lstm_cell_grad`` (clamped with ``CLIP``),
    ``dh_{t-1} = sum_q dq W_hh[q]``, ``dx_t = sum_q dq W_ih[q]``.

    Arguments (contiguous): ``dy``, ``y``, ``dz``: ``(T, B, O)``; ``dh_n``, ``dc_n``, ``c0``,
    ``dh0``, ``dc0``: ``(B, H)``; ``c``: ``(T, B, H)`` and ``gates``: ``(T, B, 4H)`` from the
    forward; ``w_ih``: ``(4H, O)``; ``w_hh``: ``(4H, H)``; ``w_out``: ``(O, H)``; ``dgates``:
    ``(T, B, 4H)``, the gate pre-activation gradients (clamped; of ``gx``, ``b_ih``, ``b_hh``);
    ``dx0``: ``(B, O)``; ``grad_clip``: fp32 scalar, used with ``CLIP``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rows64 = rows.to(tl.int64)
    cols_h = tl.arange(0, BLOCK_H)
    cols_o = tl.arange(0, BLOCK_O)
    row_ok = rows < B
    tile_h = row_ok[:, None] & (cols_h < H)[None, :]
    tile_o = row_ok[:, None] & (cols_o < O)[None, :]

    wi_i = _load_matrix(w_ih_ptr, cols_h, cols_o, H, O, False)  # (BLOCK_H, BLOCK_O)
    wi_f = _load_matrix(w_ih_ptr + H * O, cols_h, cols_o, H, O, False)
    wi_g = _load_matrix(w_ih_ptr + 2 * H * O, cols_h, cols_o, H, O, False)
    wi_o = _load_matrix(w_ih_ptr + 3 * H * O, cols_h, cols_o, H, O, False)
    wh_i = _load_matrix(w_hh_ptr, cols_h, cols_h, H, H, False)  # (BLOCK_H, BLOCK_H)
    wh_f = _load_matrix(w_hh_ptr + H * H, cols_h, cols_h, H, H, False)
    wh_g = _load_matrix(w_hh_ptr + 2 * H * H, cols_h, cols_h, H, H, False)
    wh_o = _load_matrix(w_hh_ptr + 3 * H * H, cols_h, cols_h, H, H, False)
    w_out = _load_matrix(w_out_ptr, cols_o, cols_h, O, H, False)  # (BLOCK_O, BLOCK_H)

    offs_h = rows64[:, None] * H + cols_h[None, :]
    offs_o = rows64[:, None] * O + cols_o[None, :]
    offs_g = rows64[:, None] * (4 * H) + cols_h[None, :]
    c0 = tl.load(c0_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    dh = tl.load(dh_n_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    dc = tl.load(dc_n_ptr + offs_h, mask=tile_h, other=0.0).to(tl.float32)
    dx = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for s in range(T):
        t = T - 1 - s
        step = tl.cast(t, tl.int64) * B
        y = tl.load(y_ptr + step * O + offs_o, mask=tile_o, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + step * O + offs_o, mask=tile_o, other=0.0).to(tl.float32)
        dz = (dy + dx) * head_activation_grad(y, HEAD)
        dz = tl.where(tile_o, dz, 0.0)
        tl.store(dz_ptr + step * O + offs_o, dz.to(dz_ptr.dtype.element_ty), mask=tile_o)
        dh += tl.dot(dz.to(w_out.dtype), w_out, input_precision=INPUT_PRECISION)

        gates = gates_ptr + step * (4 * H) + offs_g
        i = tl.load(gates, mask=tile_h, other=0.0).to(tl.float32)
        f = tl.load(gates + H, mask=tile_h, other=0.0).to(tl.float32)
        g = tl.load(gates + 2 * H, mask=tile_h, other=0.0).to(tl.float32)
        o = tl.load(gates + 3 * H, mask=tile_h, other=0.0).to(tl.float32)
        c_t = tl.load(c_ptr + step * H + offs_h, mask=tile_h, other=0.0).to(tl.float32)
        prev = tl.cast(tl.maximum(t - 1, 0), tl.int64) * B
        c_prev = tl.load(c_ptr + prev * H + offs_h, mask=tile_h, other=0.0).to(tl.float32)
        c_prev = tl.where(t == 0, c0, c_prev)
        di, df, dg, do, dc = lstm_cell_grad(dh, dc, i, f, g, o, c_t, c_prev, grad_clip, CLIP)
        dgates = dgates_ptr + step * (4 * H) + offs_g
        tl.store(dgates, di.to(dgates_ptr.dtype.element_ty), mask=tile_h)
        tl.store(dgates + H, df.to(dgates_ptr.dtype.element_ty), mask=tile_h)
        tl.store(dgates + 2 * H, dg.to(dgates_ptr.dtype.element_ty), mask=tile_h)
        tl.store(dgates + 3 * H, do.to(dgates_ptr.dtype.element_ty), mask=tile_h)

        di_w = di.to(wh_i.dtype)
        df_w = df.to(wh_i.dtype)
        dg_w = dg.to(wh_i.dtype)
        do_w = do.to(wh_i.dtype)
        # Products accumulate in the dot (its ``acc``), one gate at a time: summing separate dot
        # results keeps every product live at once (fp32 (32, 32): 255 registers and a stack).
        dh = tl.dot(di_w, wh_i, input_precision=INPUT_PRECISION)
        dx = tl.dot(di_w.to(wi_i.dtype), wi_i, input_precision=INPUT_PRECISION)
        dh = tl.dot(df_w, wh_f, dh, input_precision=INPUT_PRECISION)
        dx = tl.dot(df_w.to(wi_f.dtype), wi_f, dx, input_precision=INPUT_PRECISION)
        dh = tl.dot(dg_w, wh_g, dh, input_precision=INPUT_PRECISION)
        dx = tl.dot(dg_w.to(wi_g.dtype), wi_g, dx, input_precision=INPUT_PRECISION)
        dh = tl.dot(do_w, wh_o, dh, input_precision=INPUT_PRECISION)
        dx = tl.dot(do_w.to(wi_o.dtype), wi_o, dx, input_precision=INPUT_PRECISION)
    tl.store(dh0_ptr + offs_h, dh.to(dh0_ptr.dtype.element_ty), mask=tile_h)
    tl.store(dc0_ptr + offs_h, dc.to(dc0_ptr.dtype.element_ty), mask=tile_h)
    tl.store(dx0_ptr + offs_o, dx.to(dx0_ptr.dtype.element_ty), mask=tile_o)
