"""LayerNormLSTM and LayerNormGRU kernels: one layer (every direction) over the whole sequence in
one launch, forward and backward through time. The equations are :mod:`fastrnn.layer_norm_rnn`'s
(haste's definitions, torch.nn's gate order); ``LN(v; g)`` normalises each row over its whole
width with the biased variance and ``EPS = 1e-5``.

What the kernels do, per step of a row (``G`` gates: 4 LSTM, 3 GRU)::

    r_t   = W_hh h_{t-1}                    (G*H wide; the product of this kernel)
    rhat  = (r_t - mean(r_t)) * rstd_r      (mean and variance over all G*H: a whole row is local)
    LSTM: i, f, g, o = ax_t + rhat * gain_hh
          c_new = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)
          chat  = (c_new - mean(c_new)) * rstd_c
          h_new = sigmoid(o) tanh(chat * gain_cell + bias_cell)
    GRU:  b_t = rhat * gain_hh + b_hh;  r, z, n, h_new as ``fastrnn.kernels.gru.gru_gates``

then zoneout and the row's length: ``s_t = keep * s_{t-1} + (1 - keep) * s_new`` (``h``, and ``c``
with the same mask), and past a row's length the state is kept and the output is zero. The
input side ``ax = LN(W_ih x; gain_ih) + b_ih (+ b_hh for the LSTM)`` is one pass over all steps on
the host before the launch; its backward is autograd's.

Strategies. One program per ``(batch tile, direction)``, grid ``(cdiv(B, BLOCK_B), D)``, so a
row's layer-norm statistics over its ``G*H`` pre-activations are a reduction inside the program,
fused in the step. ``*_kernel`` (resident): all ``G`` blocks of ``W_hh`` on chip (``BLOCK_H >= H``,
as the resident kernels of ``fastrnn.kernels.lstm`` / ``gru``) and the state in fp32 registers.
``*_tiled_kernel`` (any ``H``): ``W_hh`` re-read every step (from L2) in ``BLOCK_H x REDUCE_TILE``
tiles, the fp32 state and the raw products in scratch, block barriers between the phases of a step
(their docstrings); they take the resident kernels' arguments, then their scratch. The cell step math is the plain cells' (``lstm_cell``, ``gru_gates``, ``gru_gates_grad``).

Layouts (contiguous; ``D`` directions; direction ``d``, gate ``q``, unit ``j`` at feature
``d*G*H + q*H + j``; "compute dtype" is the dtype of ``ax``):

* ``ax``, ``d_ax``, ``r_hat``, ``d_r``: ``(T, B, D*G*H)`` compute dtype. ``r_hat`` (forward output,
  saved) is ``rhat`` above; ``d_ax`` (backward) the gradient of the gate pre-activations' input
  side (LSTM: of ``i, f, g, o``, clamped with ``CLIP``; GRU: ``dr_pre, dz_pre, dn_pre``); ``d_r``
  the gradient of ``r_t = W_hh h_{t-1}`` (the host takes ``dW_hh = sum_t d_r_t^T h_{t-1}``).
* ``w_hh``: ``(D, G*H, H)``, ``w_hh[d, q*H + n, k]`` weighs unit ``k`` of ``h`` into gate ``q``
  unit ``n`` (bf16 widened to fp32 under Triton's interpreter; a dot casts its left operand to
  the weight's dtype). ``gain_hh`` ``(D, G*H)``; LSTM ``gain_cell``, ``bias_cell`` ``(D, H)``; GRU
  ``b_hh`` ``(D, 3H)`` (zeros without bias).
* ``h0``, ``c0``, ``h_n``, ``dh_n``, ``dc_n``, ``dh0``, ``dc0``: ``(D, B, H)``. ``lengths``: ``(B,)``
  int32 (``HAS_LENGTHS``; else any pointer, never read).
* ``keep``: ``(T, B, D*H)`` the zoneout mask (1: keep the previous state) with ``ZONEOUT == 1``;
  ``ZONEOUT == 2`` is eval, ``keep = zoneout_p`` everywhere; 0 is off (``keep`` never read).
* ``y``, ``dy``: ``(T, B, D*H)`` the layer output (zero past a row's length).
* Saved by the LSTM forward: ``gates (T, B, D*4H)`` the activated ``sigmoid(i), sigmoid(f),
  tanh(g), sigmoid(o)``; ``c (T, B, D*H)`` the cell state after each step (zoneout and lengths
  applied; ``c_n`` is sliced from it on the host); ``c_hat (T, B, D*H)`` ``chat`` above;
  ``stats (T, B, D, 2)`` fp32 ``rstd_r, rstd_c``.
* Saved by the GRU forward: ``gates (T, B, D*4H)`` ``r, z, n, b_n``; ``stats (T, B, D)`` fp32 ``rstd_r``.
  The state a step read is ``y`` at the step before in the walk, or ``h0`` where a row's walk starts.
* ``d_norm`` (backward output): ``(D, cdiv(B, BLOCK_B), 6, H)`` fp32, each program's partial sums
  over its rows and all steps (the host sums the tiles: deterministic, no atomics). LSTM: the
  gradients of ``gain_hh`` (slots 0-3, gates i f g o), ``gain_cell`` (4), ``bias_cell`` (5); GRU:
  of ``gain_hh`` (0-2, gates r z n) and ``b_hh`` (3-5).
* ``flow`` (``RECORD_FLOW``; else any pointer, never written): ``(D, T, B)`` fp32,
  ``||dL/dh_t||^2`` of each row (0 past its length). ``grad_clip``, ``zoneout_p``: fp32 scalars.

Direction 1 walks time backwards, so the reverse direction starts each row at its own last valid
step. Offsets are int64; ``T`` is not specialised (the launchers never launch ``T = 0``). The final
state (``h_n``; backward ``dh0``, ``dc0``) is stored inside the time loop, masked to its last step:
stored after the loop, its address stays live across the loop and ptxas parks it in an 8-byte
stack frame on sm_90 in several forms (measured by the compile gate, triton 3.9).
"""

import triton
import triton.language as tl

from fastrnn.kernels.activations import tanh
from fastrnn.kernels.gru import _previous_time, gru_gates, gru_gates_grad
from fastrnn.kernels.lstm import REDUCE_TILE, lstm_cell
from fastrnn.kernels.recurrence import clamp_grad, copy_rows, program_tile, squared_row_norm, step_time
from fastrnn.kernels.zoneout import zoneout_keep

EPS = tl.constexpr(1e-5)


# ------------------------------------------------------------------------- shared step pieces
@triton.jit
def masked_row_sum(x, col_ok):
    """``sum_j x[:, j]`` over the real columns (``col_ok``) of a ``(BLOCK_B, BLOCK_H)`` tile."""
    return tl.sum(tl.where(col_ok[None, :], x, 0.0), axis=1)


@triton.jit
def centred(x, mean, col_ok):
    """``x - mean`` per row, zero in the padding columns."""
    return tl.where(col_ok[None, :], x - mean[:, None], 0.0)


@triton.jit
def reciprocal_std(square_sum, width):
    """``1 / sqrt(var + EPS)`` from the rows' sum of centred squares over ``width`` values."""
    return 1.0 / tl.sqrt(square_sum / width + EPS)


@triton.jit
def norm_input_grad(d_hat, x_hat, mean_d, mean_dx, rstd, col_ok):
    """The gradient reaching a layer norm's input from ``d_hat = dL/dxhat`` (the gain applied):
    ``rstd * (d_hat - mean(d_hat) - xhat * mean(d_hat * xhat))``, zero in the padding columns."""
    return tl.where(col_ok[None, :], rstd[:, None] * (d_hat - mean_d[:, None] - x_hat * mean_dx[:, None]), 0.0)


@triton.jit
def load_row_vector(ptr, cols, col_ok):
    """A ``(1, BLOCK_H)`` fp32 row of a per-unit parameter (zero in the padding columns)."""
    return tl.load(ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]


@triton.jit
def at_last_step(tile_ok, s, T):
    """``tile_ok`` at the walk's last step ``s == T - 1``, all false before (built as a tensor:
    under Triton's interpreter ``s`` and ``T`` are Python ints, and a mask must be an array)."""
    return tile_ok & ((tl.zeros_like(tile_ok.to(tl.int32)) + s) == T - 1)


@triton.jit
def store_norm_partials(d_norm_ptr, a, b, c, d, e, f, H, cols, col_ok):
    """This program's six ``(BLOCK_H,)`` partial sums into its plane of ``d_norm``."""
    base = d_norm_ptr + ((tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)) * 6).to(tl.int64) * H + cols
    tl.store(base, a, mask=col_ok)
    tl.store(base + H, b, mask=col_ok)
    tl.store(base + 2 * H, c, mask=col_ok)
    tl.store(base + 3 * H, d, mask=col_ok)
    tl.store(base + 4 * H, e, mask=col_ok)
    tl.store(base + 5 * H, f, mask=col_ok)


# ------------------------------------------------------------------------------- LayerNormLSTM
@triton.jit(do_not_specialize=["T"])
def layer_norm_lstm_fwd_kernel(
    ax_ptr, w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, h0_ptr, c0_ptr, lengths_ptr, keep_ptr,
    y_ptr, h_n_ptr, gates_ptr, r_hat_ptr, c_ptr, c_hat_ptr, stats_ptr,
    T, B, H, D, zoneout_p,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward. Writes ``y``, ``h_n`` and the saved ``gates``, ``r_hat``, ``c``, ``c_hat``, ``stats``."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = program_tile(B, H, BLOCK_B, BLOCK_H)
    d64 = direction.to(tl.int64)
    # w_q[k, n] = W_hh[d, q*H + n, k]: gate q's recurrent product is h @ w_q.
    w_base = w_hh_ptr + d64 * 4 * H * H
    w_offs = cols[None, :] * H + cols[:, None]
    w_ok = col_ok[:, None] & col_ok[None, :]
    w_i = tl.load(w_base + w_offs, mask=w_ok, other=0.0)
    w_f = tl.load(w_base + H * H + w_offs, mask=w_ok, other=0.0)
    w_g = tl.load(w_base + 2 * H * H + w_offs, mask=w_ok, other=0.0)
    w_o = tl.load(w_base + 3 * H * H + w_offs, mask=w_ok, other=0.0)
    gain = gain_hh_ptr + d64 * 4 * H
    gain_i = load_row_vector(gain, cols, col_ok)
    gain_f = load_row_vector(gain + H, cols, col_ok)
    gain_g = load_row_vector(gain + 2 * H, cols, col_ok)
    gain_o = load_row_vector(gain + 3 * H, cols, col_ok)
    gain_c = load_row_vector(gain_c_ptr + d64 * H, cols, col_ok)
    bias_c = load_row_vector(bias_c_ptr + d64 * H, cols, col_ok)

    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        step = t * B + rows64
        g_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
        u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
        stats_offs = (step * D + direction) * 2
        hw = h.to(w_i.dtype)
        r_i = tl.dot(hw, w_i, input_precision=INPUT_PRECISION)
        r_f = tl.dot(hw, w_f, input_precision=INPUT_PRECISION)
        r_g = tl.dot(hw, w_g, input_precision=INPUT_PRECISION)
        r_o = tl.dot(hw, w_o, input_precision=INPUT_PRECISION)
        mean = (masked_row_sum(r_i, col_ok) + masked_row_sum(r_f, col_ok) + masked_row_sum(r_g, col_ok)
                + masked_row_sum(r_o, col_ok)) / (4 * H)
        r_i = centred(r_i, mean, col_ok)
        r_f = centred(r_f, mean, col_ok)
        r_g = centred(r_g, mean, col_ok)
        r_o = centred(r_o, mean, col_ok)
        rstd = reciprocal_std(tl.sum(r_i * r_i, axis=1) + tl.sum(r_f * r_f, axis=1) + tl.sum(r_g * r_g, axis=1)
                              + tl.sum(r_o * r_o, axis=1), 4 * H)
        r_i = r_i * rstd[:, None]
        r_f = r_f * rstd[:, None]
        r_g = r_g * rstd[:, None]
        r_o = r_o * rstd[:, None]
        i = tl.load(ax_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32) + r_i * gain_i
        f = tl.load(ax_ptr + g_offs + H, mask=tile_ok, other=0.0).to(tl.float32) + r_f * gain_f
        g = tl.load(ax_ptr + g_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32) + r_g * gain_g
        o = tl.load(ax_ptr + g_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32) + r_o * gain_o
        i, f, g, o, c_new, _ = lstm_cell(i, f, g, o, c, row_ok[:, None], False)
        c_mean = masked_row_sum(c_new, col_ok) / H
        c_hat = centred(c_new, c_mean, col_ok)
        c_rstd = reciprocal_std(tl.sum(c_hat * c_hat, axis=1), H)
        c_hat = c_hat * c_rstd[:, None]
        h_new = o * tanh(c_hat * gain_c + bias_c)
        if ZONEOUT != 0:
            keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
            h_new = keep * h + (1.0 - keep) * h_new
            c_new = keep * c + (1.0 - keep) * c_new
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
            h = tl.where(valid, h_new, h)
            c = tl.where(valid, c_new, c)
            out = tl.where(valid, h_new, 0.0)
        else:
            h = h_new
            c = c_new
            out = h_new
        tl.store(y_ptr + u_offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(gates_ptr + g_offs, i.to(gates_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(gates_ptr + g_offs + H, f.to(gates_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(gates_ptr + g_offs + 2 * H, g.to(gates_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(gates_ptr + g_offs + 3 * H, o.to(gates_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(r_hat_ptr + g_offs, r_i.to(r_hat_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(r_hat_ptr + g_offs + H, r_f.to(r_hat_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(r_hat_ptr + g_offs + 2 * H, r_g.to(r_hat_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(r_hat_ptr + g_offs + 3 * H, r_o.to(r_hat_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(c_ptr + u_offs, c.to(c_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(c_hat_ptr + u_offs, c_hat.to(c_hat_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(stats_ptr + stats_offs, rstd, mask=row_ok)
        tl.store(stats_ptr + stats_offs + 1, c_rstd, mask=row_ok)
        tl.store(h_n_ptr + state_offs, h.to(h_n_ptr.dtype.element_ty), mask=at_last_step(tile_ok, s, T))  # the final state: module docstring


@triton.jit(do_not_specialize=["T"])
def layer_norm_lstm_bwd_kernel(
    dy_ptr, dh_n_ptr, dc_n_ptr, gates_ptr, r_hat_ptr, c_ptr, c_hat_ptr, stats_ptr, c0_ptr, keep_ptr,
    w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, lengths_ptr,
    d_ax_ptr, d_r_ptr, dh0_ptr, dc0_ptr, d_norm_ptr, flow_ptr,
    T, B, H, D, zoneout_p, grad_clip,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward through time, the forward's walk reversed; ``dh``, ``dc`` carried in fp32 registers.

    Per step, with ``dh_t = dy_t + dh`` and ``dc`` the carried gradients (zero past a row's length)
    and ``k`` the zoneout keep: ``dm = (1 - k) dh_t``; the cell norm's backward gives ``dc_new =
    (1 - k) dc + LN'(dm * sigmoid(o) * tanh'(.))``; the gate gradients are ``lstm_cell_grad``'s
    (``dm`` and the normalised cell's ``tanh`` standing in for ``tanh(c_t)``), clamped with
    ``CLIP``, into ``d_ax``; the recurrent norm's backward gives ``d_r``; ``dh_{t-1} = d_r W_hh + k
    dh_t``, ``dc_{t-1} = dc_new sigmoid(f) + k dc``. Past a row's length ``dh``, ``dc`` pass
    through and the step's gradients are zero."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = program_tile(B, H, BLOCK_B, BLOCK_H)
    d64 = direction.to(tl.int64)
    # w_q[n, k] = W_hh[d, q*H + n, k]: the gradient to h_{t-1} is sum_q d_r_q @ w_q.
    w_base = w_hh_ptr + d64 * 4 * H * H
    w_offs = cols[:, None] * H + cols[None, :]
    w_ok = col_ok[:, None] & col_ok[None, :]
    w_i = tl.load(w_base + w_offs, mask=w_ok, other=0.0)
    w_f = tl.load(w_base + H * H + w_offs, mask=w_ok, other=0.0)
    w_g = tl.load(w_base + 2 * H * H + w_offs, mask=w_ok, other=0.0)
    w_o = tl.load(w_base + 3 * H * H + w_offs, mask=w_ok, other=0.0)
    gain = gain_hh_ptr + d64 * 4 * H
    gain_i = load_row_vector(gain, cols, col_ok)
    gain_f = load_row_vector(gain + H, cols, col_ok)
    gain_g = load_row_vector(gain + 2 * H, cols, col_ok)
    gain_o = load_row_vector(gain + 3 * H, cols, col_ok)
    gain_c = load_row_vector(gain_c_ptr + d64 * H, cols, col_ok)
    bias_c = load_row_vector(bias_c_ptr + d64 * H, cols, col_ok)

    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    dh = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    dc = tl.load(dc_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    c_init = tl.load(c0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    d_gain_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_gain_f = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_gain_g = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_gain_o = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_gain_c = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_bias_c = tl.zeros((BLOCK_H,), dtype=tl.float32)

    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        # The step the forward walk took just before t (clamped; c0 replaces it at the walk's start;
        # in reverse, past a row's length the saved c is the kept c0).
        t_prev = t - 1 + 2 * direction
        first = (t_prev < 0) | (t_prev >= T)
        t_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1)
        step = t * B + rows64
        g_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
        u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
        stats_offs = (step * D + direction) * 2
        if HAS_LENGTHS:
            valid = (t < length)[:, None] & row_ok[:, None]
        else:
            valid = row_ok[:, None]
        d_state_h = tl.where(valid, tl.load(dy_ptr + u_offs, mask=tile_ok, other=0.0).to(tl.float32) + dh, 0.0)
        d_state_c = tl.where(valid, dc, 0.0)
        if RECORD_FLOW:
            tl.store(flow_ptr + (direction * T + t) * B + rows64, squared_row_norm(d_state_h, valid), mask=row_ok)
        if ZONEOUT != 0:  # the part kept from the previous state goes straight to it
            keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
            carried_h = keep * d_state_h
            carried_c = keep * d_state_c
            d_h_new = d_state_h - carried_h
            d_c_zoned = d_state_c - carried_c
        else:
            d_h_new = d_state_h
            d_c_zoned = d_state_c

        i = tl.load(gates_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32)
        f = tl.load(gates_ptr + g_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
        g = tl.load(gates_ptr + g_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
        o = tl.load(gates_ptr + g_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
        c_hat = tl.load(c_hat_ptr + u_offs, mask=tile_ok, other=0.0).to(tl.float32)
        rstd = tl.load(stats_ptr + stats_offs, mask=row_ok, other=0.0)
        c_rstd = tl.load(stats_ptr + stats_offs + 1, mask=row_ok, other=0.0)
        c_prev = tl.load(c_ptr + (t_prev * B + rows64)[:, None] * (D * H) + direction * H + cols[None, :], mask=tile_ok, other=0.0)
        c_prev = tl.where(first, c_init, c_prev.to(tl.float32))

        # The cell norm: h_new = o * tanh(u), u = chat * gain_c + bias_c.
        tanh_u = tanh(c_hat * gain_c + bias_c)
        d_u = d_h_new * o * (1.0 - tanh_u * tanh_u)
        d_gain_c += tl.sum(d_u * c_hat, axis=0)
        d_bias_c += tl.sum(d_u, axis=0)
        d_chat = d_u * gain_c
        d_c_norm = norm_input_grad(d_chat, c_hat, tl.sum(d_chat, axis=1) / H, tl.sum(d_chat * c_hat, axis=1) / H, c_rstd, col_ok)
        # The gate gradients of ``fastrnn.kernels.lstm.lstm_cell_grad``, whose ``dc + dm*o*(1 - tanh(c)^2)``
        # becomes ``d_c_zoned + d_c_norm`` here (the cell norm sits between c and the tanh).
        d_c_new = d_c_zoned + d_c_norm
        di = d_c_new * g * i * (1.0 - i)
        df = d_c_new * c_prev * f * (1.0 - f)
        dg = d_c_new * i * (1.0 - g * g)
        do = d_h_new * tanh_u * o * (1.0 - o)
        if CLIP:
            di = clamp_grad(di, grad_clip)
            df = clamp_grad(df, grad_clip)
            dg = clamp_grad(dg, grad_clip)
            do = clamp_grad(do, grad_clip)
        tl.store(d_ax_ptr + g_offs, di.to(d_ax_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_ax_ptr + g_offs + H, df.to(d_ax_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_ax_ptr + g_offs + 2 * H, dg.to(d_ax_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_ax_ptr + g_offs + 3 * H, do.to(d_ax_ptr.dtype.element_ty), mask=tile_ok)

        # The recurrent norm over all four gates.
        r_i = tl.load(r_hat_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32)
        r_f = tl.load(r_hat_ptr + g_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
        r_g = tl.load(r_hat_ptr + g_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
        r_o = tl.load(r_hat_ptr + g_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
        d_gain_i += tl.sum(di * r_i, axis=0)
        d_gain_f += tl.sum(df * r_f, axis=0)
        d_gain_g += tl.sum(dg * r_g, axis=0)
        d_gain_o += tl.sum(do * r_o, axis=0)
        e_i = di * gain_i
        e_f = df * gain_f
        e_g = dg * gain_g
        e_o = do * gain_o
        mean_d = (tl.sum(e_i, axis=1) + tl.sum(e_f, axis=1) + tl.sum(e_g, axis=1) + tl.sum(e_o, axis=1)) / (4 * H)
        mean_dx = (tl.sum(e_i * r_i, axis=1) + tl.sum(e_f * r_f, axis=1) + tl.sum(e_g * r_g, axis=1)
                   + tl.sum(e_o * r_o, axis=1)) / (4 * H)
        e_i = norm_input_grad(e_i, r_i, mean_d, mean_dx, rstd, col_ok)
        e_f = norm_input_grad(e_f, r_f, mean_d, mean_dx, rstd, col_ok)
        e_g = norm_input_grad(e_g, r_g, mean_d, mean_dx, rstd, col_ok)
        e_o = norm_input_grad(e_o, r_o, mean_d, mean_dx, rstd, col_ok)
        tl.store(d_r_ptr + g_offs, e_i.to(d_r_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_r_ptr + g_offs + H, e_f.to(d_r_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_r_ptr + g_offs + 2 * H, e_g.to(d_r_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_r_ptr + g_offs + 3 * H, e_o.to(d_r_ptr.dtype.element_ty), mask=tile_ok)
        dh_prev = tl.dot(e_i.to(w_i.dtype), w_i, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(e_f.to(w_f.dtype), w_f, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(e_g.to(w_g.dtype), w_g, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(e_o.to(w_o.dtype), w_o, input_precision=INPUT_PRECISION)
        if ZONEOUT != 0:
            dh_prev += carried_h
            dc_prev = tl.fma(d_c_new, f, carried_c)  # as a multiply then an add, LLVM's SLP vectorizer asserts (triton 3.9, sm_90)
        else:
            dc_prev = d_c_new * f
        dh = tl.where(valid, dh_prev, dh)
        dc = tl.where(valid, dc_prev, dc)
        last = at_last_step(tile_ok, s, T)  # the final gradients: module docstring
        tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=last)
        tl.store(dc0_ptr + state_offs, dc.to(dc0_ptr.dtype.element_ty), mask=last)
    store_norm_partials(d_norm_ptr, d_gain_i, d_gain_f, d_gain_g, d_gain_o, d_gain_c, d_bias_c, H, cols, col_ok)


# -------------------------------------------------------------------------------- LayerNormGRU
@triton.jit(do_not_specialize=["T"])
def layer_norm_gru_fwd_kernel(
    ax_ptr, w_hh_ptr, gain_hh_ptr, b_hh_ptr, h0_ptr, lengths_ptr, keep_ptr,
    y_ptr, h_n_ptr, gates_ptr, r_hat_ptr, stats_ptr,
    T, B, H, D, zoneout_p,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward. Writes ``y``, ``h_n`` and the saved ``gates`` (``r, z, n, b_n``), ``r_hat``, ``stats``."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = program_tile(B, H, BLOCK_B, BLOCK_H)
    d64 = direction.to(tl.int64)
    # w_q[k, n] = W_hh[d, q*H + n, k]: gate q's recurrent product is h @ w_q.
    w_base = w_hh_ptr + d64 * 3 * H * H
    w_offs = cols[None, :] * H + cols[:, None]
    w_ok = col_ok[:, None] & col_ok[None, :]
    w_r = tl.load(w_base + w_offs, mask=w_ok, other=0.0)
    w_z = tl.load(w_base + H * H + w_offs, mask=w_ok, other=0.0)
    w_n = tl.load(w_base + 2 * H * H + w_offs, mask=w_ok, other=0.0)
    gain = gain_hh_ptr + d64 * 3 * H
    gain_r = load_row_vector(gain, cols, col_ok)
    gain_z = load_row_vector(gain + H, cols, col_ok)
    gain_n = load_row_vector(gain + 2 * H, cols, col_ok)
    bias = b_hh_ptr + d64 * 3 * H
    bias_r = load_row_vector(bias, cols, col_ok)
    bias_z = load_row_vector(bias + H, cols, col_ok)
    bias_n = load_row_vector(bias + 2 * H, cols, col_ok)

    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        step = t * B + rows64
        g_offs = step[:, None] * (D * 3 * H) + direction * 3 * H + cols[None, :]
        saved_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
        u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
        hw = h.to(w_r.dtype)
        r_r = tl.dot(hw, w_r, input_precision=INPUT_PRECISION)
        r_z = tl.dot(hw, w_z, input_precision=INPUT_PRECISION)
        r_n = tl.dot(hw, w_n, input_precision=INPUT_PRECISION)
        mean = (masked_row_sum(r_r, col_ok) + masked_row_sum(r_z, col_ok) + masked_row_sum(r_n, col_ok)) / (3 * H)
        r_r = centred(r_r, mean, col_ok)
        r_z = centred(r_z, mean, col_ok)
        r_n = centred(r_n, mean, col_ok)
        rstd = reciprocal_std(tl.sum(r_r * r_r, axis=1) + tl.sum(r_z * r_z, axis=1) + tl.sum(r_n * r_n, axis=1), 3 * H)
        r_r = r_r * rstd[:, None]
        r_z = r_z * rstd[:, None]
        r_n = r_n * rstd[:, None]
        b_n = r_n * gain_n + bias_n
        r, z, n, h_new = gru_gates(
            tl.load(ax_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32),
            tl.load(ax_ptr + g_offs + H, mask=tile_ok, other=0.0).to(tl.float32),
            tl.load(ax_ptr + g_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32),
            r_r * gain_r + bias_r, r_z * gain_z + bias_z, b_n, h,
        )
        if ZONEOUT != 0:
            keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
            h_new = keep * h + (1.0 - keep) * h_new
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
            h = tl.where(valid, h_new, h)
            out = tl.where(valid, h_new, 0.0)
        else:
            h = h_new
            out = h_new
        tl.store(y_ptr + u_offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(gates_ptr + saved_offs, r.to(gates_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(gates_ptr + saved_offs + H, z.to(gates_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(gates_ptr + saved_offs + 2 * H, n.to(gates_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(gates_ptr + saved_offs + 3 * H, b_n.to(gates_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(r_hat_ptr + g_offs, r_r.to(r_hat_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(r_hat_ptr + g_offs + H, r_z.to(r_hat_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(r_hat_ptr + g_offs + 2 * H, r_n.to(r_hat_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(stats_ptr + step * D + direction, rstd, mask=row_ok)
        tl.store(h_n_ptr + state_offs, h.to(h_n_ptr.dtype.element_ty), mask=at_last_step(tile_ok, s, T))  # the final state: module docstring


@triton.jit(do_not_specialize=["T"])
def layer_norm_gru_bwd_kernel(
    dy_ptr, dh_n_ptr, y_ptr, gates_ptr, r_hat_ptr, stats_ptr, h0_ptr, keep_ptr, w_hh_ptr, gain_hh_ptr, lengths_ptr,
    d_ax_ptr, d_r_ptr, dh0_ptr, d_norm_ptr, flow_ptr,
    T, B, H, D, zoneout_p, grad_clip,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward through time, the forward's walk reversed; ``dh`` carried in fp32 registers.

    Per step, with ``dh_t = dy_t + dh`` (zero past a row's length) and ``k`` the zoneout keep:
    ``gru_gates_grad`` of ``(1 - k) dh_t`` gives ``d_ax`` and ``d_b = (dr_pre, dz_pre, dn_pre * r)``,
    the gradient of ``b_t``; the recurrent norm's backward gives ``d_r``; ``dh_{t-1} = (1 - k) dh_t
    z + d_r W_hh + k dh_t``. Past a row's length ``dh`` passes through and the gradients are zero."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = program_tile(B, H, BLOCK_B, BLOCK_H)
    d64 = direction.to(tl.int64)
    # w_q[n, k] = W_hh[d, q*H + n, k]: the gradient to h_{t-1} is sum_q d_r_q @ w_q.
    w_base = w_hh_ptr + d64 * 3 * H * H
    w_offs = cols[:, None] * H + cols[None, :]
    w_ok = col_ok[:, None] & col_ok[None, :]
    w_r = tl.load(w_base + w_offs, mask=w_ok, other=0.0)
    w_z = tl.load(w_base + H * H + w_offs, mask=w_ok, other=0.0)
    w_n = tl.load(w_base + 2 * H * H + w_offs, mask=w_ok, other=0.0)
    gain = gain_hh_ptr + d64 * 3 * H
    gain_r = load_row_vector(gain, cols, col_ok)
    gain_z = load_row_vector(gain + H, cols, col_ok)
    gain_n = load_row_vector(gain + 2 * H, cols, col_ok)

    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    dh = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    h0 = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = T
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    d_gain_r = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_gain_z = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_gain_n = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_bias_r = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_bias_z = tl.zeros((BLOCK_H,), dtype=tl.float32)
    d_bias_n = tl.zeros((BLOCK_H,), dtype=tl.float32)

    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        step = t * B + rows64
        g_offs = step[:, None] * (D * 3 * H) + direction * 3 * H + cols[None, :]
        saved_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
        u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
        if HAS_LENGTHS:
            valid = (t < length)[:, None] & row_ok[:, None]
        else:
            valid = row_ok[:, None]
        t_prev, start = _previous_time(t, direction, T, length, HAS_LENGTHS)
        h_prev = tl.load(y_ptr + (t_prev * B + rows64)[:, None] * (D * H) + direction * H + cols[None, :], mask=tile_ok, other=0.0)
        h_prev = tl.where(start, h0, h_prev.to(tl.float32))
        d_state = tl.where(valid, tl.load(dy_ptr + u_offs, mask=tile_ok, other=0.0).to(tl.float32) + dh, 0.0)
        if RECORD_FLOW:
            tl.store(flow_ptr + (direction * T + t) * B + rows64, squared_row_norm(d_state, valid), mask=row_ok)
        if ZONEOUT != 0:
            keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
            d_h_new = (1.0 - keep) * d_state
        else:
            d_h_new = d_state
        r = tl.load(gates_ptr + saved_offs, mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.load(gates_ptr + saved_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
        n = tl.load(gates_ptr + saved_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
        b_n = tl.load(gates_ptr + saved_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
        dr_pre, dz_pre, dn_pre, db_n, direct = gru_gates_grad(d_h_new, h_prev, r, z, n, b_n, grad_clip, CLIP)
        tl.store(d_ax_ptr + g_offs, dr_pre.to(d_ax_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_ax_ptr + g_offs + H, dz_pre.to(d_ax_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_ax_ptr + g_offs + 2 * H, dn_pre.to(d_ax_ptr.dtype.element_ty), mask=tile_ok)

        # The recurrent norm over all three gates; d_b = (dr_pre, dz_pre, db_n) reaches b_hh as is.
        rstd = tl.load(stats_ptr + step * D + direction, mask=row_ok, other=0.0)
        r_r = tl.load(r_hat_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32)
        r_z = tl.load(r_hat_ptr + g_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
        r_n = tl.load(r_hat_ptr + g_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
        d_gain_r += tl.sum(dr_pre * r_r, axis=0)
        d_gain_z += tl.sum(dz_pre * r_z, axis=0)
        d_gain_n += tl.sum(db_n * r_n, axis=0)
        d_bias_r += tl.sum(dr_pre, axis=0)
        d_bias_z += tl.sum(dz_pre, axis=0)
        d_bias_n += tl.sum(db_n, axis=0)
        e_r = dr_pre * gain_r
        e_z = dz_pre * gain_z
        e_n = db_n * gain_n
        mean_d = (tl.sum(e_r, axis=1) + tl.sum(e_z, axis=1) + tl.sum(e_n, axis=1)) / (3 * H)
        mean_dx = (tl.sum(e_r * r_r, axis=1) + tl.sum(e_z * r_z, axis=1) + tl.sum(e_n * r_n, axis=1)) / (3 * H)
        e_r = norm_input_grad(e_r, r_r, mean_d, mean_dx, rstd, col_ok)
        e_z = norm_input_grad(e_z, r_z, mean_d, mean_dx, rstd, col_ok)
        e_n = norm_input_grad(e_n, r_n, mean_d, mean_dx, rstd, col_ok)
        tl.store(d_r_ptr + g_offs, e_r.to(d_r_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_r_ptr + g_offs + H, e_z.to(d_r_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(d_r_ptr + g_offs + 2 * H, e_n.to(d_r_ptr.dtype.element_ty), mask=tile_ok)
        dh_prev = direct
        dh_prev += tl.dot(e_r.to(w_r.dtype), w_r, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(e_z.to(w_z.dtype), w_z, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(e_n.to(w_n.dtype), w_n, input_precision=INPUT_PRECISION)
        if ZONEOUT != 0:
            dh_prev += keep * d_state
        dh = tl.where(valid, dh_prev, dh)
        tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=at_last_step(tile_ok, s, T))  # the final gradient: module docstring
    store_norm_partials(d_norm_ptr, d_gain_r, d_gain_z, d_gain_n, d_bias_r, d_bias_z, d_bias_n, H, cols, col_ok)


# ------------------------------------------------------------------ LayerNormLSTM, W_hh streamed
@triton.jit
def _tiled_row_product(src_ptr, src_stride_rows, w_ptr, row_ok, cols_n, n_ok, K, W_ROW_STRIDE, W_COL_STRIDE,
                       INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """``src @ W`` for the output columns ``cols_n``: ``src`` fp32 rows (``(BLOCK_B, 1)`` row
    offsets ``src_stride_rows`` from ``src_ptr``, ``K`` wide) times ``W[k, n]`` at ``w_ptr + k *
    W_ROW_STRIDE + n * W_COL_STRIDE``, reduced ``REDUCE_TILE`` columns at a time (unpipelined)."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in tl.range(0, K, REDUCE_TILE, num_stages=1):
        cols_k = k0 + tl.arange(0, REDUCE_TILE)
        k_ok = cols_k < K
        src = tl.load(src_ptr + src_stride_rows + cols_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols_k[:, None] * W_ROW_STRIDE + cols_n[None, :] * W_COL_STRIDE, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(src.to(w.dtype), w, input_precision=INPUT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["T"])
def layer_norm_lstm_fwd_tiled_kernel(
    ax_ptr, w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, h0_ptr, c0_ptr, lengths_ptr, keep_ptr,
    y_ptr, h_n_ptr, gates_ptr, r_hat_ptr, c_ptr, c_hat_ptr, stats_ptr,
    h_state_ptr, c_state_ptr, pre_ptr, cell_ptr,
    T, B, H, D, zoneout_p,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward for any ``H``: the resident kernel's step with ``W_hh`` re-read (from L2) every step
    in ``BLOCK_H x REDUCE_TILE`` tiles, in three phases per step separated by block barriers:
    (1) ``r = h_{t-1} W_hh^T`` tile by tile over all ``4H`` outputs into ``pre``, with each row's
    sum and sum of squares; (2) per ``BLOCK_H`` units, the normalised ``rhat``, the gates and
    ``c_new`` (into ``cell``), with the cell's moments; (3) the cell norm, ``h_t``, zoneout,
    lengths, the outputs and the state. fp32 scratch (each element written before it is read):
    ``h_state (2, D, B, H)`` ping-pong (step ``s`` reads slot ``s % 2``), ``c_state (D, B, H)``,
    ``pre (D, B, 4H)``, ``cell (D, B, H)``. The variance is ``E[v^2] - mean^2`` in fp32."""
    direction = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    d64 = direction.to(tl.int64)
    state_rows = ((direction * B + rows64) * H)[:, None]
    pre_rows = ((direction * B + rows64) * 4 * H)[:, None]
    slot = D * B * H
    w_base = w_hh_ptr + d64 * 4 * H * H
    gain = gain_hh_ptr + d64 * 4 * H
    copy_rows(h0_ptr + state_rows, h_state_ptr + state_rows, row_ok, H, BLOCK_H)
    copy_rows(c0_ptr + state_rows, c_state_ptr + state_rows, row_ok, H, BLOCK_H)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    tl.debug_barrier()

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        step = t * B + rows64
        h_read = h_state_ptr + (s % 2) * slot
        h_write = h_state_ptr + ((s + 1) % 2) * slot
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        else:
            valid = row_ok[:, None]

        # (1) the recurrent product over all 4H outputs, and each row's moments.
        total = tl.zeros((BLOCK_B,), dtype=tl.float32)
        square = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for n0 in range(0, 4 * H, BLOCK_H):
            cols_n = n0 + tl.arange(0, BLOCK_H)
            n_ok = cols_n < 4 * H
            acc = _tiled_row_product(h_read, state_rows, w_base, row_ok, cols_n, n_ok, H, 1, H, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            tl.store(pre_ptr + pre_rows + cols_n[None, :], acc, mask=row_ok[:, None] & n_ok[None, :])
            total += tl.sum(acc, axis=1)
            square += tl.sum(acc * acc, axis=1)
        mean = total / (4 * H)
        rstd = 1.0 / tl.sqrt(tl.maximum(square / (4 * H) - mean * mean, 0.0) + EPS)
        tl.debug_barrier()

        # (2) the normalised product, the gates and the new cell, unit tile by unit tile.
        c_total = tl.zeros((BLOCK_B,), dtype=tl.float32)
        c_square = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for u0 in range(0, H, BLOCK_H):
            cols = u0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            ok = row_ok[:, None] & col_ok[None, :]
            g_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
            pre = pre_ptr + pre_rows + cols[None, :]
            r_i = (tl.load(pre, mask=ok, other=0.0) - mean[:, None]) * rstd[:, None]
            r_f = (tl.load(pre + H, mask=ok, other=0.0) - mean[:, None]) * rstd[:, None]
            r_g = (tl.load(pre + 2 * H, mask=ok, other=0.0) - mean[:, None]) * rstd[:, None]
            r_o = (tl.load(pre + 3 * H, mask=ok, other=0.0) - mean[:, None]) * rstd[:, None]
            i = tl.load(ax_ptr + g_offs, mask=ok, other=0.0).to(tl.float32) + r_i * load_row_vector(gain, cols, col_ok)
            f = tl.load(ax_ptr + g_offs + H, mask=ok, other=0.0).to(tl.float32) + r_f * load_row_vector(gain + H, cols, col_ok)
            g = tl.load(ax_ptr + g_offs + 2 * H, mask=ok, other=0.0).to(tl.float32) + r_g * load_row_vector(gain + 2 * H, cols, col_ok)
            o = tl.load(ax_ptr + g_offs + 3 * H, mask=ok, other=0.0).to(tl.float32) + r_o * load_row_vector(gain + 3 * H, cols, col_ok)
            c_prev = tl.load(c_state_ptr + state_rows + cols[None, :], mask=ok, other=0.0)
            i, f, g, o, c_new, _ = lstm_cell(i, f, g, o, c_prev, row_ok[:, None], False)
            c_new = tl.where(ok, c_new, 0.0)
            tl.store(cell_ptr + state_rows + cols[None, :], c_new, mask=ok)
            c_total += tl.sum(c_new, axis=1)
            c_square += tl.sum(c_new * c_new, axis=1)
            tl.store(r_hat_ptr + g_offs, r_i.to(r_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(r_hat_ptr + g_offs + H, r_f.to(r_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(r_hat_ptr + g_offs + 2 * H, r_g.to(r_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(r_hat_ptr + g_offs + 3 * H, r_o.to(r_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(gates_ptr + g_offs, i.to(gates_ptr.dtype.element_ty), mask=ok)
            tl.store(gates_ptr + g_offs + H, f.to(gates_ptr.dtype.element_ty), mask=ok)
            tl.store(gates_ptr + g_offs + 2 * H, g.to(gates_ptr.dtype.element_ty), mask=ok)
            tl.store(gates_ptr + g_offs + 3 * H, o.to(gates_ptr.dtype.element_ty), mask=ok)
        c_mean = c_total / H
        c_rstd = 1.0 / tl.sqrt(tl.maximum(c_square / H - c_mean * c_mean, 0.0) + EPS)
        tl.debug_barrier()

        # (3) the cell norm, h_t, zoneout and lengths; outputs and the state.
        for u0 in range(0, H, BLOCK_H):
            cols = u0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            ok = row_ok[:, None] & col_ok[None, :]
            g_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
            u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
            c_new = tl.load(cell_ptr + state_rows + cols[None, :], mask=ok, other=0.0)
            o = tl.load(gates_ptr + g_offs + 3 * H, mask=ok, other=0.0).to(tl.float32)
            c_hat = (c_new - c_mean[:, None]) * c_rstd[:, None]
            h_new = o * tanh(c_hat * load_row_vector(gain_c_ptr + d64 * H, cols, col_ok) + load_row_vector(bias_c_ptr + d64 * H, cols, col_ok))
            h_prev = tl.load(h_read + state_rows + cols[None, :], mask=ok, other=0.0)
            c_prev = tl.load(c_state_ptr + state_rows + cols[None, :], mask=ok, other=0.0)
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)
                h_new = keep * h_prev + (1.0 - keep) * h_new
                c_new = keep * c_prev + (1.0 - keep) * c_new
            h = tl.where(valid, h_new, h_prev)
            c = tl.where(valid, c_new, c_prev)
            tl.store(y_ptr + u_offs, tl.where(valid, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(c_ptr + u_offs, c.to(c_ptr.dtype.element_ty), mask=ok)
            tl.store(c_hat_ptr + u_offs, c_hat.to(c_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(h_write + state_rows + cols[None, :], h, mask=ok)
            tl.store(c_state_ptr + state_rows + cols[None, :], c, mask=ok)
            tl.store(h_n_ptr + state_rows + cols[None, :], h.to(h_n_ptr.dtype.element_ty), mask=at_last_step(ok, s, T))
        stats_offs = (step * D + direction) * 2
        tl.store(stats_ptr + stats_offs, rstd, mask=row_ok)
        tl.store(stats_ptr + stats_offs + 1, c_rstd, mask=row_ok)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["T"])
def layer_norm_lstm_bwd_tiled_kernel(
    dy_ptr, dh_n_ptr, dc_n_ptr, gates_ptr, r_hat_ptr, c_ptr, c_hat_ptr, stats_ptr, c0_ptr, keep_ptr,
    w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, lengths_ptr,
    d_ax_ptr, d_r_ptr, dh0_ptr, dc0_ptr, d_norm_ptr, flow_ptr,
    dh_state_ptr, dc_state_ptr, d_chat_ptr, d_pre_ptr,
    T, B, H, D, zoneout_p, grad_clip,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward for any ``H``: the resident backward's step in four phases per step, ``W_hh``
    re-read in tiles: (1) per unit tile, ``dL/dchat`` into ``d_chat`` and its rows' moments; (2)
    the cell norm's input gradient, the gate gradients (``d_ax``), ``dc_{t-1}``, and ``e = dgates *
    gain_hh`` into ``d_pre`` with its moments; (3) ``d_r`` over all ``4H`` (into ``d_r`` and, fp32,
    back into ``d_pre``); (4) ``dh_{t-1} = d_r W_hh`` plus the zoneout carry. fp32 scratch:
    ``dh_state (2, D, B, H)`` ping-pong, ``dc_state (D, B, H)``, ``d_chat (D, B, H)``, ``d_pre (D,
    B, 4H)``. ``d_norm`` must be zeroed by the launcher: each program adds into its plane."""
    direction = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    d64 = direction.to(tl.int64)
    state_rows = ((direction * B + rows64) * H)[:, None]
    pre_rows = ((direction * B + rows64) * 4 * H)[:, None]
    slot = D * B * H
    w_base = w_hh_ptr + d64 * 4 * H * H
    gain = gain_hh_ptr + d64 * 4 * H
    norm_plane = d_norm_ptr + ((direction * tl.num_programs(0) + tl.program_id(0)) * 6).to(tl.int64) * H
    copy_rows(dh_n_ptr + state_rows, dh_state_ptr + state_rows, row_ok, H, BLOCK_H)
    copy_rows(dc_n_ptr + state_rows, dc_state_ptr + state_rows, row_ok, H, BLOCK_H)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    tl.debug_barrier()

    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        t_prev = t - 1 + 2 * direction
        first = (t_prev < 0) | (t_prev >= T)
        t_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1)
        step = t * B + rows64
        dh_read = dh_state_ptr + (s % 2) * slot
        dh_write = dh_state_ptr + ((s + 1) % 2) * slot
        if HAS_LENGTHS:
            valid = (t < length)[:, None] & row_ok[:, None]
        else:
            valid = row_ok[:, None]
        stats_offs = (step * D + direction) * 2
        rstd = tl.load(stats_ptr + stats_offs, mask=row_ok, other=0.0)
        c_rstd = tl.load(stats_ptr + stats_offs + 1, mask=row_ok, other=0.0)

        # (1) dL/dchat of the cell norm, its moments, the cell norm's parameter gradients.
        mean_d = tl.zeros((BLOCK_B,), dtype=tl.float32)
        mean_dx = tl.zeros((BLOCK_B,), dtype=tl.float32)
        flow = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for u0 in range(0, H, BLOCK_H):
            cols = u0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            ok = row_ok[:, None] & col_ok[None, :]
            g_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
            u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
            d_state_h = tl.where(valid, tl.load(dy_ptr + u_offs, mask=ok, other=0.0).to(tl.float32)
                                 + tl.load(dh_read + state_rows + cols[None, :], mask=ok, other=0.0), 0.0)
            if RECORD_FLOW:
                flow += tl.sum(d_state_h * d_state_h, axis=1)
            if ZONEOUT != 0:
                d_state_h = (1.0 - zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)) * d_state_h
            o = tl.load(gates_ptr + g_offs + 3 * H, mask=ok, other=0.0).to(tl.float32)
            c_hat = tl.load(c_hat_ptr + u_offs, mask=ok, other=0.0).to(tl.float32)
            gain_c = load_row_vector(gain_c_ptr + d64 * H, cols, col_ok)
            tanh_u = tanh(c_hat * gain_c + load_row_vector(bias_c_ptr + d64 * H, cols, col_ok))
            d_u = d_state_h * o * (1.0 - tanh_u * tanh_u)
            tl.store(norm_plane + 4 * H + cols, tl.load(norm_plane + 4 * H + cols, mask=col_ok, other=0.0) + tl.sum(d_u * c_hat, axis=0), mask=col_ok)
            tl.store(norm_plane + 5 * H + cols, tl.load(norm_plane + 5 * H + cols, mask=col_ok, other=0.0) + tl.sum(d_u, axis=0), mask=col_ok)
            d_chat = d_u * gain_c
            tl.store(d_chat_ptr + state_rows + cols[None, :], d_chat, mask=ok)
            mean_d += tl.sum(d_chat, axis=1)
            mean_dx += tl.sum(d_chat * c_hat, axis=1)
        if RECORD_FLOW:
            tl.store(flow_ptr + (direction * T + t) * B + rows64, flow, mask=row_ok)
        mean_d = mean_d / H
        mean_dx = mean_dx / H
        tl.debug_barrier()

        # (2) the gate gradients, dc_{t-1}, and e = dgates * gain_hh with its moments.
        e_mean = tl.zeros((BLOCK_B,), dtype=tl.float32)
        e_mean_x = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for u0 in range(0, H, BLOCK_H):
            cols = u0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            ok = row_ok[:, None] & col_ok[None, :]
            g_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
            u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
            d_state_h = tl.where(valid, tl.load(dy_ptr + u_offs, mask=ok, other=0.0).to(tl.float32)
                                 + tl.load(dh_read + state_rows + cols[None, :], mask=ok, other=0.0), 0.0)
            dc = tl.load(dc_state_ptr + state_rows + cols[None, :], mask=ok, other=0.0)
            d_state_c = tl.where(valid, dc, 0.0)
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)
                carried_c = keep * d_state_c
                d_h_new = d_state_h - keep * d_state_h
                d_c_zoned = d_state_c - carried_c
            else:
                d_h_new = d_state_h
                d_c_zoned = d_state_c
            c_hat = tl.load(c_hat_ptr + u_offs, mask=ok, other=0.0).to(tl.float32)
            d_chat = tl.load(d_chat_ptr + state_rows + cols[None, :], mask=ok, other=0.0)
            d_c_new = d_c_zoned + norm_input_grad(d_chat, c_hat, mean_d, mean_dx, c_rstd, col_ok)
            i = tl.load(gates_ptr + g_offs, mask=ok, other=0.0).to(tl.float32)
            f = tl.load(gates_ptr + g_offs + H, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(gates_ptr + g_offs + 2 * H, mask=ok, other=0.0).to(tl.float32)
            o = tl.load(gates_ptr + g_offs + 3 * H, mask=ok, other=0.0).to(tl.float32)
            c_prev = tl.load(c_ptr + (t_prev * B + rows64)[:, None] * (D * H) + direction * H + cols[None, :], mask=ok, other=0.0)
            c_prev = tl.where(first, tl.load(c0_ptr + state_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32), c_prev.to(tl.float32))
            tanh_u = tanh(c_hat * load_row_vector(gain_c_ptr + d64 * H, cols, col_ok) + load_row_vector(bias_c_ptr + d64 * H, cols, col_ok))
            di = d_c_new * g * i * (1.0 - i)
            df = d_c_new * c_prev * f * (1.0 - f)
            dg = d_c_new * i * (1.0 - g * g)
            do = d_h_new * tanh_u * o * (1.0 - o)
            if CLIP:
                di = clamp_grad(di, grad_clip)
                df = clamp_grad(df, grad_clip)
                dg = clamp_grad(dg, grad_clip)
                do = clamp_grad(do, grad_clip)
            if ZONEOUT != 0:
                dc_prev = tl.fma(d_c_new, f, carried_c)  # as the resident backward
            else:
                dc_prev = d_c_new * f
            dc = tl.where(valid, dc_prev, dc)
            tl.store(dc_state_ptr + state_rows + cols[None, :], dc, mask=ok)
            tl.store(dc0_ptr + state_rows + cols[None, :], dc.to(dc0_ptr.dtype.element_ty), mask=at_last_step(ok, s, T))
            tl.store(d_ax_ptr + g_offs, di.to(d_ax_ptr.dtype.element_ty), mask=ok)
            tl.store(d_ax_ptr + g_offs + H, df.to(d_ax_ptr.dtype.element_ty), mask=ok)
            tl.store(d_ax_ptr + g_offs + 2 * H, dg.to(d_ax_ptr.dtype.element_ty), mask=ok)
            tl.store(d_ax_ptr + g_offs + 3 * H, do.to(d_ax_ptr.dtype.element_ty), mask=ok)
            for q in tl.static_range(4):
                if q == 0:
                    dq = di
                elif q == 1:
                    dq = df
                elif q == 2:
                    dq = dg
                else:
                    dq = do
                r_q = tl.load(r_hat_ptr + g_offs + q * H, mask=ok, other=0.0).to(tl.float32)
                partial = norm_plane + q * H + cols
                tl.store(partial, tl.load(partial, mask=col_ok, other=0.0) + tl.sum(dq * r_q, axis=0), mask=col_ok)
                e_q = dq * load_row_vector(gain + q * H, cols, col_ok)
                tl.store(d_pre_ptr + pre_rows + q * H + cols[None, :], e_q, mask=ok)
                e_mean += tl.sum(e_q, axis=1)
                e_mean_x += tl.sum(e_q * r_q, axis=1)
        e_mean = e_mean / (4 * H)
        e_mean_x = e_mean_x / (4 * H)
        tl.debug_barrier()

        # (3) d_r, the gradient of W_hh h_{t-1}, over all 4H.
        for n0 in range(0, 4 * H, BLOCK_H):
            cols_n = n0 + tl.arange(0, BLOCK_H)
            n_ok = cols_n < 4 * H
            ok = row_ok[:, None] & n_ok[None, :]
            r_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols_n[None, :]
            e = tl.load(d_pre_ptr + pre_rows + cols_n[None, :], mask=ok, other=0.0)
            d_r = norm_input_grad(e, tl.load(r_hat_ptr + r_offs, mask=ok, other=0.0).to(tl.float32), e_mean, e_mean_x, rstd, n_ok)
            tl.store(d_r_ptr + r_offs, d_r.to(d_r_ptr.dtype.element_ty), mask=ok)
            tl.store(d_pre_ptr + pre_rows + cols_n[None, :], d_r, mask=ok)
        tl.debug_barrier()

        # (4) dh_{t-1} = d_r W_hh + the zoneout carry; passed through past a row's length.
        for u0 in range(0, H, BLOCK_H):
            cols = u0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            ok = row_ok[:, None] & col_ok[None, :]
            u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
            dh_prev = _tiled_row_product(d_pre_ptr, pre_rows, w_base, row_ok, cols, col_ok, 4 * H, H, 1, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            dh = tl.load(dh_read + state_rows + cols[None, :], mask=ok, other=0.0)
            if ZONEOUT != 0:
                d_state_h = tl.where(valid, tl.load(dy_ptr + u_offs, mask=ok, other=0.0).to(tl.float32) + dh, 0.0)
                dh_prev += zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT) * d_state_h
            dh = tl.where(valid, dh_prev, dh)
            tl.store(dh_write + state_rows + cols[None, :], dh, mask=ok)
            tl.store(dh0_ptr + state_rows + cols[None, :], dh.to(dh0_ptr.dtype.element_ty), mask=at_last_step(ok, s, T))
        tl.debug_barrier()


# ------------------------------------------------------------------- LayerNormGRU, W_hh streamed
@triton.jit(do_not_specialize=["T"])
def layer_norm_gru_fwd_tiled_kernel(
    ax_ptr, w_hh_ptr, gain_hh_ptr, b_hh_ptr, h0_ptr, lengths_ptr, keep_ptr,
    y_ptr, h_n_ptr, gates_ptr, r_hat_ptr, stats_ptr,
    h_state_ptr, pre_ptr,
    T, B, H, D, zoneout_p,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward for any ``H``, ``W_hh`` re-read every step in tiles, two phases per step: (1) ``r =
    h_{t-1} W_hh^T`` over all ``3H`` outputs into ``pre`` with each row's moments; (2) per unit
    tile, ``rhat``, ``b_t``, the gates, zoneout, lengths, the outputs and the state. fp32 scratch:
    ``h_state (2, D, B, H)`` ping-pong (step ``s`` reads slot ``s % 2``), ``pre (D, B, 3H)``."""
    direction = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    d64 = direction.to(tl.int64)
    state_rows = ((direction * B + rows64) * H)[:, None]
    pre_rows = ((direction * B + rows64) * 3 * H)[:, None]
    slot = D * B * H
    w_base = w_hh_ptr + d64 * 3 * H * H
    gain = gain_hh_ptr + d64 * 3 * H
    bias = b_hh_ptr + d64 * 3 * H
    copy_rows(h0_ptr + state_rows, h_state_ptr + state_rows, row_ok, H, BLOCK_H)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    tl.debug_barrier()

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        step = t * B + rows64
        h_read = h_state_ptr + (s % 2) * slot
        h_write = h_state_ptr + ((s + 1) % 2) * slot
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        else:
            valid = row_ok[:, None]

        # (1) the recurrent product over all 3H outputs, and each row's moments.
        total = tl.zeros((BLOCK_B,), dtype=tl.float32)
        square = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for n0 in range(0, 3 * H, BLOCK_H):
            cols_n = n0 + tl.arange(0, BLOCK_H)
            n_ok = cols_n < 3 * H
            acc = _tiled_row_product(h_read, state_rows, w_base, row_ok, cols_n, n_ok, H, 1, H, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            tl.store(pre_ptr + pre_rows + cols_n[None, :], acc, mask=row_ok[:, None] & n_ok[None, :])
            total += tl.sum(acc, axis=1)
            square += tl.sum(acc * acc, axis=1)
        mean = total / (3 * H)
        rstd = 1.0 / tl.sqrt(tl.maximum(square / (3 * H) - mean * mean, 0.0) + EPS)
        tl.debug_barrier()

        # (2) the normalised product, the gates, h_t; outputs and the state.
        for u0 in range(0, H, BLOCK_H):
            cols = u0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            ok = row_ok[:, None] & col_ok[None, :]
            g_offs = step[:, None] * (D * 3 * H) + direction * 3 * H + cols[None, :]
            saved_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
            u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
            pre = pre_ptr + pre_rows + cols[None, :]
            r_r = (tl.load(pre, mask=ok, other=0.0) - mean[:, None]) * rstd[:, None]
            r_z = (tl.load(pre + H, mask=ok, other=0.0) - mean[:, None]) * rstd[:, None]
            r_n = (tl.load(pre + 2 * H, mask=ok, other=0.0) - mean[:, None]) * rstd[:, None]
            b_n = r_n * load_row_vector(gain + 2 * H, cols, col_ok) + load_row_vector(bias + 2 * H, cols, col_ok)
            h_prev = tl.load(h_read + state_rows + cols[None, :], mask=ok, other=0.0)
            r, z, n, h_new = gru_gates(
                tl.load(ax_ptr + g_offs, mask=ok, other=0.0).to(tl.float32),
                tl.load(ax_ptr + g_offs + H, mask=ok, other=0.0).to(tl.float32),
                tl.load(ax_ptr + g_offs + 2 * H, mask=ok, other=0.0).to(tl.float32),
                r_r * load_row_vector(gain, cols, col_ok) + load_row_vector(bias, cols, col_ok),
                r_z * load_row_vector(gain + H, cols, col_ok) + load_row_vector(bias + H, cols, col_ok), b_n, h_prev,
            )
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)
                h_new = keep * h_prev + (1.0 - keep) * h_new
            h = tl.where(valid, h_new, h_prev)
            tl.store(y_ptr + u_offs, tl.where(valid, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(gates_ptr + saved_offs, r.to(gates_ptr.dtype.element_ty), mask=ok)
            tl.store(gates_ptr + saved_offs + H, z.to(gates_ptr.dtype.element_ty), mask=ok)
            tl.store(gates_ptr + saved_offs + 2 * H, n.to(gates_ptr.dtype.element_ty), mask=ok)
            tl.store(gates_ptr + saved_offs + 3 * H, b_n.to(gates_ptr.dtype.element_ty), mask=ok)
            tl.store(r_hat_ptr + g_offs, r_r.to(r_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(r_hat_ptr + g_offs + H, r_z.to(r_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(r_hat_ptr + g_offs + 2 * H, r_n.to(r_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(h_write + state_rows + cols[None, :], h, mask=ok)
            tl.store(h_n_ptr + state_rows + cols[None, :], h.to(h_n_ptr.dtype.element_ty), mask=at_last_step(ok, s, T))
        tl.store(stats_ptr + step * D + direction, rstd, mask=row_ok)
        tl.debug_barrier()


@triton.jit(do_not_specialize=["T"])
def layer_norm_gru_bwd_tiled_kernel(
    dy_ptr, dh_n_ptr, y_ptr, gates_ptr, r_hat_ptr, stats_ptr, h0_ptr, keep_ptr, w_hh_ptr, gain_hh_ptr, lengths_ptr,
    d_ax_ptr, d_r_ptr, dh0_ptr, d_norm_ptr, flow_ptr,
    dh_state_ptr, d_pre_ptr,
    T, B, H, D, zoneout_p, grad_clip,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward for any ``H``, three phases per step: (1) per unit tile, the gate gradients
    (``d_ax``), ``e = d_b * gain_hh`` into ``d_pre`` with its moments, the norm's parameter
    gradients; (2) ``d_r`` over all ``3H`` (into ``d_r`` and, fp32, back into ``d_pre``); (3)
    ``dh_{t-1} = (1 - k) dh_t z + d_r W_hh + k dh_t``. fp32 scratch: ``dh_state (2, D, B, H)``
    ping-pong, ``d_pre (D, B, 3H)``. ``d_norm`` must be zeroed by the launcher."""
    direction = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    d64 = direction.to(tl.int64)
    state_rows = ((direction * B + rows64) * H)[:, None]
    pre_rows = ((direction * B + rows64) * 3 * H)[:, None]
    slot = D * B * H
    w_base = w_hh_ptr + d64 * 3 * H * H
    gain = gain_hh_ptr + d64 * 3 * H
    norm_plane = d_norm_ptr + ((direction * tl.num_programs(0) + tl.program_id(0)) * 6).to(tl.int64) * H
    copy_rows(dh_n_ptr + state_rows, dh_state_ptr + state_rows, row_ok, H, BLOCK_H)
    length = T
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    tl.debug_barrier()

    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        step = t * B + rows64
        dh_read = dh_state_ptr + (s % 2) * slot
        dh_write = dh_state_ptr + ((s + 1) % 2) * slot
        if HAS_LENGTHS:
            valid = (t < length)[:, None] & row_ok[:, None]
        else:
            valid = row_ok[:, None]
        t_prev, start = _previous_time(t, direction, T, length, HAS_LENGTHS)
        rstd = tl.load(stats_ptr + step * D + direction, mask=row_ok, other=0.0)

        # (1) the gate gradients, e = d_b * gain_hh and its moments.
        e_mean = tl.zeros((BLOCK_B,), dtype=tl.float32)
        e_mean_x = tl.zeros((BLOCK_B,), dtype=tl.float32)
        flow = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for u0 in range(0, H, BLOCK_H):
            cols = u0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            ok = row_ok[:, None] & col_ok[None, :]
            g_offs = step[:, None] * (D * 3 * H) + direction * 3 * H + cols[None, :]
            saved_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
            u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
            h_prev = tl.load(y_ptr + (t_prev * B + rows64)[:, None] * (D * H) + direction * H + cols[None, :], mask=ok, other=0.0)
            h_prev = tl.where(start, tl.load(h0_ptr + state_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32),
                              h_prev.to(tl.float32))
            d_state = tl.where(valid, tl.load(dy_ptr + u_offs, mask=ok, other=0.0).to(tl.float32)
                               + tl.load(dh_read + state_rows + cols[None, :], mask=ok, other=0.0), 0.0)
            if RECORD_FLOW:
                flow += tl.sum(d_state * d_state, axis=1)
            if ZONEOUT != 0:
                d_state = (1.0 - zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)) * d_state
            r = tl.load(gates_ptr + saved_offs, mask=ok, other=0.0).to(tl.float32)
            z = tl.load(gates_ptr + saved_offs + H, mask=ok, other=0.0).to(tl.float32)
            n = tl.load(gates_ptr + saved_offs + 2 * H, mask=ok, other=0.0).to(tl.float32)
            b_n = tl.load(gates_ptr + saved_offs + 3 * H, mask=ok, other=0.0).to(tl.float32)
            dr_pre, dz_pre, dn_pre, db_n, _ = gru_gates_grad(d_state, h_prev, r, z, n, b_n, grad_clip, CLIP)
            tl.store(d_ax_ptr + g_offs, dr_pre.to(d_ax_ptr.dtype.element_ty), mask=ok)
            tl.store(d_ax_ptr + g_offs + H, dz_pre.to(d_ax_ptr.dtype.element_ty), mask=ok)
            tl.store(d_ax_ptr + g_offs + 2 * H, dn_pre.to(d_ax_ptr.dtype.element_ty), mask=ok)
            for q in tl.static_range(3):
                if q == 0:
                    dq = dr_pre
                elif q == 1:
                    dq = dz_pre
                else:
                    dq = db_n
                r_q = tl.load(r_hat_ptr + g_offs + q * H, mask=ok, other=0.0).to(tl.float32)
                gain_partial = norm_plane + q * H + cols
                tl.store(gain_partial, tl.load(gain_partial, mask=col_ok, other=0.0) + tl.sum(dq * r_q, axis=0), mask=col_ok)
                bias_partial = norm_plane + (3 + q) * H + cols
                tl.store(bias_partial, tl.load(bias_partial, mask=col_ok, other=0.0) + tl.sum(dq, axis=0), mask=col_ok)
                e_q = dq * load_row_vector(gain + q * H, cols, col_ok)
                tl.store(d_pre_ptr + pre_rows + q * H + cols[None, :], e_q, mask=ok)
                e_mean += tl.sum(e_q, axis=1)
                e_mean_x += tl.sum(e_q * r_q, axis=1)
        if RECORD_FLOW:
            tl.store(flow_ptr + (direction * T + t) * B + rows64, flow, mask=row_ok)
        e_mean = e_mean / (3 * H)
        e_mean_x = e_mean_x / (3 * H)
        tl.debug_barrier()

        # (2) d_r, the gradient of W_hh h_{t-1}, over all 3H.
        for n0 in range(0, 3 * H, BLOCK_H):
            cols_n = n0 + tl.arange(0, BLOCK_H)
            n_ok = cols_n < 3 * H
            ok = row_ok[:, None] & n_ok[None, :]
            r_offs = step[:, None] * (D * 3 * H) + direction * 3 * H + cols_n[None, :]
            e = tl.load(d_pre_ptr + pre_rows + cols_n[None, :], mask=ok, other=0.0)
            d_r = norm_input_grad(e, tl.load(r_hat_ptr + r_offs, mask=ok, other=0.0).to(tl.float32), e_mean, e_mean_x, rstd, n_ok)
            tl.store(d_r_ptr + r_offs, d_r.to(d_r_ptr.dtype.element_ty), mask=ok)
            tl.store(d_pre_ptr + pre_rows + cols_n[None, :], d_r, mask=ok)
        tl.debug_barrier()

        # (3) dh_{t-1}; passed through past a row's length.
        for u0 in range(0, H, BLOCK_H):
            cols = u0 + tl.arange(0, BLOCK_H)
            col_ok = cols < H
            ok = row_ok[:, None] & col_ok[None, :]
            saved_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + cols[None, :]
            u_offs = step[:, None] * (D * H) + direction * H + cols[None, :]
            dh_prev = _tiled_row_product(d_pre_ptr, pre_rows, w_base, row_ok, cols, col_ok, 3 * H, H, 1, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            dh = tl.load(dh_read + state_rows + cols[None, :], mask=ok, other=0.0)
            d_state = tl.where(valid, tl.load(dy_ptr + u_offs, mask=ok, other=0.0).to(tl.float32) + dh, 0.0)
            z = tl.load(gates_ptr + saved_offs + H, mask=ok, other=0.0).to(tl.float32)
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)
                dh_prev += (1.0 - keep) * d_state * z + keep * d_state
            else:
                dh_prev += d_state * z
            dh = tl.where(valid, dh_prev, dh)
            tl.store(dh_write + state_rows + cols[None, :], dh, mask=ok)
            tl.store(dh0_ptr + state_rows + cols[None, :], dh.to(dh0_ptr.dtype.element_ty), mask=at_last_step(ok, s, T))
        tl.debug_barrier()
