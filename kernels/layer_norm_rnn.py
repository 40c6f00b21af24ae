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
(their docstrings); they take the resident kernels' arguments, then their scratch.
``layer_norm_lstm_{fwd,bwd}_persistent_kernel`` and ``layer_norm_gru_{fwd,bwd}_persistent_kernel``
(any ``H``): the plain cell's persistent partition (``fastrnn.ops.persistent``: each program a
slice of units with their rows of ``W_hh`` on chip), a row's moments (backward: means, and the
partials of ``dh`` or ``d_r``) combined from every program's partials through the flags of
``fastrnn.kernels.sync``: three exchange rounds per step each way for the LSTM (``h``, the recurrent
norm's moments, the cell norm's), two for the GRU (no cell norm; their docstrings); they read and
write what the resident kernels save, so a persistent forward feeds a tiled backward and the other
way round. The cell step math is the plain cells' (``lstm_cell``, ``gru_gates``, ``gru_gates_grad``);
the layer-norm step pieces are the ``@triton.jit`` helpers below, shared by both strategies and
both directions of the walk (the resident ones first, then the tiled kernels' phases), so a kernel
reads as prologue, loop of step pieces, epilogue.

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
from fastrnn.kernels.gru import _previous_time, gru_gates, gru_gates_grad, gru_slice_weights
from fastrnn.kernels.lstm import (
    REDUCE_TILE, batch_tile, gather_partials, join_gates, load_weight_slice, lstm_cell, publish, split_gates,
)
from fastrnn.kernels.precision import weight_product
from fastrnn.kernels.recurrence import (
    advance_state, clamp_grad, copy_rows, feature_offsets, gather_rows, group_flags, live_rows, load_gate, persistent_tile,
    program_tile, row_lengths, slice_product, squared_row_norm, step_grad, step_time, store_gate,
)
from fastrnn.kernels.sync import wait
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
def merged_moments(total, square, count, tile_total, tile_square, tile_count):
    """A row's running moments ``(sum, centred sum of squares)`` over ``count`` values merged with
    one more tile's (:func:`slice_moments`, ``tile_count`` values): Chan et al.'s pairwise update
    ``M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / (n_a + n_b)`` (``count`` 0 at the first
    tile). The tiled kernels' moments: every term a centred square, no one-pass cancellation."""
    delta = tile_total / tile_count - total / tl.maximum(count, 1)
    return total + tile_total, square + tile_square + delta * delta * (count * tile_count / (count + tile_count))


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


@triton.jit
def store_flow(flow_ptr, direction, T, t, B, rows64, value, row_ok):
    """A step's ``||dL/dh_t||^2`` per row (``value``, ``(BLOCK_B,)`` fp32) into ``flow (D, T, B)``."""
    tl.store(flow_ptr + (direction * T + t) * B + rows64, value, mask=row_ok)


@triton.jit
def zero_norm_partials(BLOCK_H: tl.constexpr):
    """Six ``(BLOCK_H,)`` fp32 zeros: a resident backward's running sums for ``d_norm``."""
    zero = tl.zeros((BLOCK_H,), dtype=tl.float32)
    return zero, zero, zero, zero, zero, zero


@triton.jit
def store_gates(ptr, offs, H, ok, a, b, c, d=None):
    """``a, b, c`` (and ``d``) as gate blocks 0-3 of a gate-after-gate tile (``store_gate``)."""
    store_gate(ptr, offs, 0, H, a, ok)
    store_gate(ptr, offs, 1, H, b, ok)
    store_gate(ptr, offs, 2, H, c, ok)
    if d is not None:
        store_gate(ptr, offs, 3, H, d, ok)


# ------------------------------------------------------------------- the resident kernels' pieces
@triton.jit
def gate_weight(w_hh_ptr, direction, q: tl.constexpr, G: tl.constexpr, H, cols, col_ok, TRANSPOSE: tl.constexpr):
    """Gate ``q``'s ``(BLOCK_H, BLOCK_H)`` block of direction ``direction``'s ``W_hh`` (``(D, G*H,
    H)``): with ``TRANSPOSE`` ``w[k, n] = W_hh[d, q*H + n, k]`` (a forward's: gate ``q``'s
    product is ``h @ w``), else ``w[n, k]`` (a backward's: the gradient to ``h`` is ``d_r_q @ w``)."""
    if TRANSPOSE:
        w_offs = cols[None, :] * H + cols[:, None]
    else:
        w_offs = cols[:, None] * H + cols[None, :]
    w_base = w_hh_ptr + direction.to(tl.int64) * G * H * H
    return tl.load(w_base + q * H * H + w_offs, mask=col_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def lstm_norm_parameters(gain_hh_ptr, gain_c_ptr, bias_c_ptr, direction, cols, col_ok, H):
    """Direction ``direction``'s LSTM norm parameters as ``(1, BLOCK_H)`` fp32 rows: ``gain_hh``'s
    four gate blocks (i, f, g, o), ``gain_cell``, ``bias_cell``."""
    d64 = direction.to(tl.int64)
    gain = gain_hh_ptr + d64 * 4 * H
    return (load_row_vector(gain, cols, col_ok), load_row_vector(gain + H, cols, col_ok),
            load_row_vector(gain + 2 * H, cols, col_ok), load_row_vector(gain + 3 * H, cols, col_ok),
            load_row_vector(gain_c_ptr + d64 * H, cols, col_ok), load_row_vector(bias_c_ptr + d64 * H, cols, col_ok))


@triton.jit
def recurrent_norm(r0, r1, r2, r3, col_ok, G: tl.constexpr, H):
    """The recurrent layer norm of a resident step, over all ``G*H`` pre-activations of a row:
    the raw products ``r0..r{G-1}`` (fp32 ``(BLOCK_B, BLOCK_H)`` gate blocks; with ``G == 3`` the
    GRU passes its last block again as ``r3``, never read) normalised, zero in the padding
    columns, and each row's ``rstd``. Returns ``(r0, r1, r2, r3, rstd)``."""
    total = masked_row_sum(r0, col_ok) + masked_row_sum(r1, col_ok) + masked_row_sum(r2, col_ok)
    if G == 4:
        total += masked_row_sum(r3, col_ok)
    mean = total / (G * H)
    r0 = centred(r0, mean, col_ok)
    r1 = centred(r1, mean, col_ok)
    r2 = centred(r2, mean, col_ok)
    square = tl.sum(r0 * r0, axis=1) + tl.sum(r1 * r1, axis=1) + tl.sum(r2 * r2, axis=1)
    if G == 4:
        r3 = centred(r3, mean, col_ok)
        square += tl.sum(r3 * r3, axis=1)
    rstd = reciprocal_std(square, G * H)
    r0 = r0 * rstd[:, None]
    r1 = r1 * rstd[:, None]
    r2 = r2 * rstd[:, None]
    if G == 4:
        r3 = r3 * rstd[:, None]
    return r0, r1, r2, r3, rstd


@triton.jit
def recurrent_norm_grad(e0, e1, e2, e3, r0, r1, r2, r3, rstd, col_ok, G: tl.constexpr, H):
    """:func:`recurrent_norm`'s backward: from ``e_q = dL/drhat_q`` (the gain applied) and the
    saved ``rhat_q`` of the first ``G`` blocks, the gradients ``d_r_q`` of the raw products
    (``norm_input_grad`` with the means over all ``G*H``). Returns ``(d_r0, d_r1, d_r2, d_r3)``
    (the last unused with ``G == 3``)."""
    mean_d = tl.sum(e0, axis=1) + tl.sum(e1, axis=1) + tl.sum(e2, axis=1)
    if G == 4:
        mean_d += tl.sum(e3, axis=1)
    mean_d = mean_d / (G * H)
    mean_dx = tl.sum(e0 * r0, axis=1) + tl.sum(e1 * r1, axis=1) + tl.sum(e2 * r2, axis=1)
    if G == 4:
        mean_dx += tl.sum(e3 * r3, axis=1)
    mean_dx = mean_dx / (G * H)
    e0 = norm_input_grad(e0, r0, mean_d, mean_dx, rstd, col_ok)
    e1 = norm_input_grad(e1, r1, mean_d, mean_dx, rstd, col_ok)
    e2 = norm_input_grad(e2, r2, mean_d, mean_dx, rstd, col_ok)
    if G == 4:
        e3 = norm_input_grad(e3, r3, mean_d, mean_dx, rstd, col_ok)
    return e0, e1, e2, e3


@triton.jit
def lstm_gate_grads(d_c_new, d_h_new, i, f, g, o, c_prev, tanh_u, grad_clip, CLIP: tl.constexpr):
    """The gate gradients of ``fastrnn.kernels.lstm.lstm_cell_grad``, whose ``dc + dm*o*(1 -
    tanh(c)^2)`` is ``d_c_new`` here (the cell norm sits between ``c`` and the ``tanh``, whose
    value ``tanh_u`` stands in for ``tanh(c_t)``): ``di, df, dg, do``, clamped with ``CLIP``."""
    di = d_c_new * g * i * (1.0 - i)
    df = d_c_new * c_prev * f * (1.0 - f)
    dg = d_c_new * i * (1.0 - g * g)
    do = d_h_new * tanh_u * o * (1.0 - o)
    if CLIP:
        di = clamp_grad(di, grad_clip)
        df = clamp_grad(df, grad_clip)
        dg = clamp_grad(dg, grad_clip)
        do = clamp_grad(do, grad_clip)
    return di, df, dg, do


@triton.jit
def cell_norm_grad(d_h_new, o, c_hat, gain_c, bias_c):
    """The backward of ``h_new = o * tanh(u)``, ``u = chat * gain_c + bias_c`` up to ``chat``:
    ``(tanh(u), dL/du, dL/dchat)``."""
    tanh_u = tanh(c_hat * gain_c + bias_c)
    d_u = d_h_new * o * (1.0 - tanh_u * tanh_u)
    return tanh_u, d_u, d_u * gain_c


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
    w_i = gate_weight(w_hh_ptr, direction, 0, 4, H, cols, col_ok, True)
    w_f = gate_weight(w_hh_ptr, direction, 1, 4, H, cols, col_ok, True)
    w_g = gate_weight(w_hh_ptr, direction, 2, 4, H, cols, col_ok, True)
    w_o = gate_weight(w_hh_ptr, direction, 3, 4, H, cols, col_ok, True)
    gain_i, gain_f, gain_g, gain_o, gain_c, bias_c = lstm_norm_parameters(gain_hh_ptr, gain_c_ptr, bias_c_ptr, direction, cols, col_ok, H)
    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        step = t * B + rows64
        g_offs = feature_offsets(step, direction, 4, H, D, cols)
        u_offs = feature_offsets(step, direction, 1, H, D, cols)
        stats_offs = (step * D + direction) * 2
        hw = h.to(w_i.dtype)
        r_i = tl.dot(hw, w_i, input_precision=INPUT_PRECISION)
        r_f = tl.dot(hw, w_f, input_precision=INPUT_PRECISION)
        r_g = tl.dot(hw, w_g, input_precision=INPUT_PRECISION)
        r_o = tl.dot(hw, w_o, input_precision=INPUT_PRECISION)
        r_i, r_f, r_g, r_o, rstd = recurrent_norm(r_i, r_f, r_g, r_o, col_ok, 4, H)
        i = load_gate(ax_ptr, g_offs, 0, H, tile_ok) + r_i * gain_i
        f = load_gate(ax_ptr, g_offs, 1, H, tile_ok) + r_f * gain_f
        g = load_gate(ax_ptr, g_offs, 2, H, tile_ok) + r_g * gain_g
        o = load_gate(ax_ptr, g_offs, 3, H, tile_ok) + r_o * gain_o
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
        h, out = advance_state(h_new, h, t, length, HAS_LENGTHS)
        c, _ = advance_state(c_new, c, t, length, HAS_LENGTHS)
        tl.store(y_ptr + u_offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
        store_gates(gates_ptr, g_offs, H, tile_ok, i, f, g, o)
        store_gates(r_hat_ptr, g_offs, H, tile_ok, r_i, r_f, r_g, r_o)
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
    w_i = gate_weight(w_hh_ptr, direction, 0, 4, H, cols, col_ok, False)
    w_f = gate_weight(w_hh_ptr, direction, 1, 4, H, cols, col_ok, False)
    w_g = gate_weight(w_hh_ptr, direction, 2, 4, H, cols, col_ok, False)
    w_o = gate_weight(w_hh_ptr, direction, 3, 4, H, cols, col_ok, False)
    gain_i, gain_f, gain_g, gain_o, gain_c, bias_c = lstm_norm_parameters(gain_hh_ptr, gain_c_ptr, bias_c_ptr, direction, cols, col_ok, H)
    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    dh = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    dc = tl.load(dc_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    c_init = tl.load(c0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    d_gain_i, d_gain_f, d_gain_g, d_gain_o, d_gain_c, d_bias_c = zero_norm_partials(BLOCK_H)

    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        # The step the forward walk took just before t (clamped; c0 replaces it at the walk's start;
        # in reverse, past a row's length the saved c is the kept c0).
        t_prev, first = _previous_time(t, direction, T, T, False)
        step = t * B + rows64
        g_offs = feature_offsets(step, direction, 4, H, D, cols)
        u_offs = feature_offsets(step, direction, 1, H, D, cols)
        stats_offs = (step * D + direction) * 2
        valid = live_rows(t, length, row_ok, HAS_LENGTHS)
        d_state_h = step_grad(dy_ptr, u_offs, dh, valid, tile_ok)
        d_state_c = tl.where(valid, dc, 0.0)
        if RECORD_FLOW:
            store_flow(flow_ptr, direction, T, t, B, rows64, squared_row_norm(d_state_h, valid), row_ok)
        if ZONEOUT != 0:  # the part kept from the previous state goes straight to it
            keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
            carried_h = keep * d_state_h
            carried_c = keep * d_state_c
            d_h_new = d_state_h - carried_h
            d_c_zoned = d_state_c - carried_c
        else:
            d_h_new = d_state_h
            d_c_zoned = d_state_c

        i = load_gate(gates_ptr, g_offs, 0, H, tile_ok)
        f = load_gate(gates_ptr, g_offs, 1, H, tile_ok)
        g = load_gate(gates_ptr, g_offs, 2, H, tile_ok)
        o = load_gate(gates_ptr, g_offs, 3, H, tile_ok)
        c_hat = tl.load(c_hat_ptr + u_offs, mask=tile_ok, other=0.0).to(tl.float32)
        rstd = tl.load(stats_ptr + stats_offs, mask=row_ok, other=0.0)
        c_rstd = tl.load(stats_ptr + stats_offs + 1, mask=row_ok, other=0.0)
        c_prev = tl.load(c_ptr + feature_offsets(t_prev * B + rows64, direction, 1, H, D, cols), mask=tile_ok, other=0.0)
        c_prev = tl.where(first, c_init, c_prev.to(tl.float32))

        # The cell norm, then the gates (d_c_zoned + the cell norm's input gradient is lstm_cell_grad's dct).
        tanh_u, d_u, d_chat = cell_norm_grad(d_h_new, o, c_hat, gain_c, bias_c)
        d_gain_c += tl.sum(d_u * c_hat, axis=0)
        d_bias_c += tl.sum(d_u, axis=0)
        d_c_norm = norm_input_grad(d_chat, c_hat, tl.sum(d_chat, axis=1) / H, tl.sum(d_chat * c_hat, axis=1) / H, c_rstd, col_ok)
        d_c_new = d_c_zoned + d_c_norm
        di, df, dg, do = lstm_gate_grads(d_c_new, d_h_new, i, f, g, o, c_prev, tanh_u, grad_clip, CLIP)
        store_gates(d_ax_ptr, g_offs, H, tile_ok, di, df, dg, do)

        # The recurrent norm over all four gates.
        r_i = load_gate(r_hat_ptr, g_offs, 0, H, tile_ok)
        r_f = load_gate(r_hat_ptr, g_offs, 1, H, tile_ok)
        r_g = load_gate(r_hat_ptr, g_offs, 2, H, tile_ok)
        r_o = load_gate(r_hat_ptr, g_offs, 3, H, tile_ok)
        d_gain_i += tl.sum(di * r_i, axis=0)
        d_gain_f += tl.sum(df * r_f, axis=0)
        d_gain_g += tl.sum(dg * r_g, axis=0)
        d_gain_o += tl.sum(do * r_o, axis=0)
        e_i, e_f, e_g, e_o = recurrent_norm_grad(di * gain_i, df * gain_f, dg * gain_g, do * gain_o, r_i, r_f, r_g, r_o, rstd, col_ok, 4, H)
        store_gates(d_r_ptr, g_offs, H, tile_ok, e_i, e_f, e_g, e_o)
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
    w_r = gate_weight(w_hh_ptr, direction, 0, 3, H, cols, col_ok, True)
    w_z = gate_weight(w_hh_ptr, direction, 1, 3, H, cols, col_ok, True)
    w_n = gate_weight(w_hh_ptr, direction, 2, 3, H, cols, col_ok, True)
    gain = gain_hh_ptr + d64 * 3 * H
    bias = b_hh_ptr + d64 * 3 * H
    gain_r = load_row_vector(gain, cols, col_ok)
    gain_z = load_row_vector(gain + H, cols, col_ok)
    gain_n = load_row_vector(gain + 2 * H, cols, col_ok)
    bias_r = load_row_vector(bias, cols, col_ok)
    bias_z = load_row_vector(bias + H, cols, col_ok)
    bias_n = load_row_vector(bias + 2 * H, cols, col_ok)
    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        step = t * B + rows64
        g_offs = feature_offsets(step, direction, 3, H, D, cols)
        saved_offs = feature_offsets(step, direction, 4, H, D, cols)
        u_offs = feature_offsets(step, direction, 1, H, D, cols)
        hw = h.to(w_r.dtype)
        r_r = tl.dot(hw, w_r, input_precision=INPUT_PRECISION)
        r_z = tl.dot(hw, w_z, input_precision=INPUT_PRECISION)
        r_n = tl.dot(hw, w_n, input_precision=INPUT_PRECISION)
        r_r, r_z, r_n, _, rstd = recurrent_norm(r_r, r_z, r_n, r_n, col_ok, 3, H)
        b_n = r_n * gain_n + bias_n
        r, z, n, h_new = gru_gates(
            load_gate(ax_ptr, g_offs, 0, H, tile_ok), load_gate(ax_ptr, g_offs, 1, H, tile_ok), load_gate(ax_ptr, g_offs, 2, H, tile_ok),
            r_r * gain_r + bias_r, r_z * gain_z + bias_z, b_n, h,
        )
        if ZONEOUT != 0:
            keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
            h_new = keep * h + (1.0 - keep) * h_new
        h, out = advance_state(h_new, h, t, length, HAS_LENGTHS)
        tl.store(y_ptr + u_offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
        store_gates(gates_ptr, saved_offs, H, tile_ok, r, z, n, b_n)
        store_gates(r_hat_ptr, g_offs, H, tile_ok, r_r, r_z, r_n)
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
    w_r = gate_weight(w_hh_ptr, direction, 0, 3, H, cols, col_ok, False)
    w_z = gate_weight(w_hh_ptr, direction, 1, 3, H, cols, col_ok, False)
    w_n = gate_weight(w_hh_ptr, direction, 2, 3, H, cols, col_ok, False)
    gain = gain_hh_ptr + d64 * 3 * H
    gain_r = load_row_vector(gain, cols, col_ok)
    gain_z = load_row_vector(gain + H, cols, col_ok)
    gain_n = load_row_vector(gain + 2 * H, cols, col_ok)
    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    dh = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    h0 = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    d_gain_r, d_gain_z, d_gain_n, d_bias_r, d_bias_z, d_bias_n = zero_norm_partials(BLOCK_H)

    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        step = t * B + rows64
        g_offs = feature_offsets(step, direction, 3, H, D, cols)
        saved_offs = feature_offsets(step, direction, 4, H, D, cols)
        u_offs = feature_offsets(step, direction, 1, H, D, cols)
        valid = live_rows(t, length, row_ok, HAS_LENGTHS)
        t_prev, start = _previous_time(t, direction, T, length, HAS_LENGTHS)
        h_prev = tl.load(y_ptr + feature_offsets(t_prev * B + rows64, direction, 1, H, D, cols), mask=tile_ok, other=0.0)
        h_prev = tl.where(start, h0, h_prev.to(tl.float32))
        d_state = step_grad(dy_ptr, u_offs, dh, valid, tile_ok)
        if RECORD_FLOW:
            store_flow(flow_ptr, direction, T, t, B, rows64, squared_row_norm(d_state, valid), row_ok)
        if ZONEOUT != 0:
            keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
            d_h_new = (1.0 - keep) * d_state
        else:
            d_h_new = d_state
        r = load_gate(gates_ptr, saved_offs, 0, H, tile_ok)
        z = load_gate(gates_ptr, saved_offs, 1, H, tile_ok)
        n = load_gate(gates_ptr, saved_offs, 2, H, tile_ok)
        b_n = load_gate(gates_ptr, saved_offs, 3, H, tile_ok)
        dr_pre, dz_pre, dn_pre, db_n, direct = gru_gates_grad(d_h_new, h_prev, r, z, n, b_n, grad_clip, CLIP)
        store_gates(d_ax_ptr, g_offs, H, tile_ok, dr_pre, dz_pre, dn_pre)

        # The recurrent norm over all three gates; d_b = (dr_pre, dz_pre, db_n) reaches b_hh as is.
        rstd = tl.load(stats_ptr + step * D + direction, mask=row_ok, other=0.0)
        r_r = load_gate(r_hat_ptr, g_offs, 0, H, tile_ok)
        r_z = load_gate(r_hat_ptr, g_offs, 1, H, tile_ok)
        r_n = load_gate(r_hat_ptr, g_offs, 2, H, tile_ok)
        d_gain_r += tl.sum(dr_pre * r_r, axis=0)
        d_gain_z += tl.sum(dz_pre * r_z, axis=0)
        d_gain_n += tl.sum(db_n * r_n, axis=0)
        d_bias_r += tl.sum(dr_pre, axis=0)
        d_bias_z += tl.sum(dz_pre, axis=0)
        d_bias_n += tl.sum(db_n, axis=0)
        e_n = db_n * gain_n
        e_r, e_z, e_n, _ = recurrent_norm_grad(dr_pre * gain_r, dz_pre * gain_z, e_n, e_n, r_r, r_z, r_n, r_n, rstd, col_ok, 3, H)
        store_gates(d_r_ptr, g_offs, H, tile_ok, e_r, e_z, e_n)
        dh_prev = direct
        dh_prev += tl.dot(e_r.to(w_r.dtype), w_r, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(e_z.to(w_z.dtype), w_z, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(e_n.to(w_n.dtype), w_n, input_precision=INPUT_PRECISION)
        if ZONEOUT != 0:
            dh_prev += keep * d_state
        dh = tl.where(valid, dh_prev, dh)
        tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=at_last_step(tile_ok, s, T))  # the final gradient: module docstring
    store_norm_partials(d_norm_ptr, d_gain_r, d_gain_z, d_gain_n, d_bias_r, d_bias_z, d_bias_n, H, cols, col_ok)


# ---------------------------------------------------------------------- the tiled kernels' pieces
@triton.jit
def tiled_program(B, H, G: tl.constexpr, BLOCK_B: tl.constexpr):
    """What program ``(i, d)`` of a tiled kernel owns: its direction, the batch rows ``i*BLOCK_B
    ...`` (also int64) and their mask, and its rows' ``(BLOCK_B, 1)`` offsets in the ``(D, B, H)``
    state scratch and in the ``(D, B, G*H)`` product scratch."""
    direction = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    state_rows = ((direction * B + rows64) * H)[:, None]
    pre_rows = ((direction * B + rows64) * G * H)[:, None]
    return direction, rows, rows64, row_ok, state_rows, pre_rows


@triton.jit
def ping_pong(state_ptr, s, D, B, H):
    """Step ``s``'s slots of a ``(2, D, B, H)`` scratch state: it reads slot ``s % 2`` and writes the other."""
    slot = D * B * H
    return state_ptr + (s % 2) * slot, state_ptr + ((s + 1) % 2) * slot


@triton.jit
def tiled_step(s, T, walk, B, rows64, state_ptr, D, H, length, row_ok, HAS_LENGTHS: tl.constexpr):
    """Step ``s`` of a tiled kernel's walk (``walk``: the direction, or ``1 - direction`` in a
    backward): its time ``t`` (int64), rows ``step = t*B + row``, the slots of the ``(2, D, B, H)``
    scratch state ``state_ptr`` it reads and writes (:func:`ping_pong`), and its live rows."""
    t = step_time(s, T, walk).to(tl.int64)
    read, write = ping_pong(state_ptr, s, D, B, H)
    return t, t * B + rows64, read, write, live_rows(t, length, row_ok, HAS_LENGTHS)


@triton.jit
def unit_tile(u0, row_ok, width, BLOCK_H: tl.constexpr):
    """The columns ``u0 .. u0 + BLOCK_H`` of a ``width``-wide row, their mask, and the rows x columns mask."""
    cols = u0 + tl.arange(0, BLOCK_H)
    col_ok = cols < width
    return cols, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit
def load_scratch(ptr, row_offs, cols, ok):
    """A ``(BLOCK_B, BLOCK_H)`` tile of a scratch (or state) tensor at ``(BLOCK_B, 1)`` row offsets ``row_offs``."""
    return tl.load(ptr + row_offs + cols[None, :], mask=ok, other=0.0)


@triton.jit
def store_tiled_state(state, write_ptr, final_ptr, state_rows, cols, ok, s, T):
    """A tile of the carried state (fp32) into the scratch the next step reads and, at the walk's
    last step, into the final state ``final_ptr`` (``h_n``, ``dh0``, ``dc0``; module docstring)."""
    tl.store(write_ptr + state_rows + cols[None, :], state, mask=ok)
    tl.store(final_ptr + state_rows + cols[None, :], state.to(final_ptr.dtype.element_ty), mask=at_last_step(ok, s, T))


@triton.jit
def accumulate(ptr, value, mask):
    """``ptr[...] += value``: a program's running sum in global memory (no other program touches it)."""
    tl.store(ptr, tl.load(ptr, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def gate_of(q: tl.constexpr, a, b, c, d=None):
    """The ``q``-th of ``a, b, c, d`` (inside a ``tl.static_range`` over the gates)."""
    if q == 0:
        x = a
    elif q == 1:
        x = b
    elif q == 2:
        x = c
    else:
        x = d
    return x


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


@triton.jit
def tiled_recurrent_product(h_read, state_rows, w_base, pre_ptr, pre_rows, row_ok, H, G: tl.constexpr,
                            INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Phase (1) of a tiled forward step: ``r = h_{t-1} W_hh^T`` over all ``G*H`` outputs,
    ``BLOCK_H`` at a time, into the ``pre`` scratch; returns each row's ``(mean, rstd)`` of ``r``."""
    total = tl.zeros((BLOCK_B,), dtype=tl.float32)
    square = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for n0 in range(0, G * H, BLOCK_H):
        cols_n, n_ok, ok = unit_tile(n0, row_ok, G * H, BLOCK_H)
        acc = _tiled_row_product(h_read, state_rows, w_base, row_ok, cols_n, n_ok, H, 1, H, INPUT_PRECISION, BLOCK_B, BLOCK_H)
        tl.store(pre_ptr + pre_rows + cols_n[None, :], acc, mask=ok)
        width = tl.minimum(BLOCK_H, G * H - n0)
        tile_total, tile_square = slice_moments(acc, ok, width, 1)
        total, square = merged_moments(total, square, n0, tile_total, tile_square, width)
    return total / (G * H), reciprocal_std(square, G * H)


@triton.jit
def normalised_product(pre, q: tl.constexpr, H, mean, rstd, ok):
    """Gate ``q``'s block of the raw product in the ``pre`` scratch (tile pointers ``pre``), normalised."""
    return (tl.load(pre + q * H, mask=ok, other=0.0) - mean[:, None]) * rstd[:, None]


@triton.jit
def tiled_gate_norm_grad(dq, q: tl.constexpr, r_hat_ptr, g_offs, gain, norm_plane, d_pre_ptr, pre_rows, cols, col_ok, ok, H,
                         BIAS_SLOTS: tl.constexpr):
    """Gate ``q``'s part of the recurrent norm's backward in a tiled step, from its gradient ``dq =
    dL/d(rhat_q * gain_q (+ b_q))``: adds ``sum_rows dq * rhat_q`` to slot ``q`` of the program's
    ``norm_plane`` (and, with ``BIAS_SLOTS``, ``sum_rows dq`` to slot ``3 + q``), stores ``e_q = dq *
    gain_q`` into ``d_pre``, and returns the rows' ``(sum e_q, sum e_q * rhat_q)``."""
    r_q = load_gate(r_hat_ptr, g_offs, q, H, ok)
    accumulate(norm_plane + q * H + cols, tl.sum(dq * r_q, axis=0), col_ok)
    if BIAS_SLOTS:
        accumulate(norm_plane + (3 + q) * H + cols, tl.sum(dq, axis=0), col_ok)
    e_q = dq * load_row_vector(gain + q * H, cols, col_ok)
    tl.store(d_pre_ptr + pre_rows + q * H + cols[None, :], e_q, mask=ok)
    return tl.sum(e_q, axis=1), tl.sum(e_q * r_q, axis=1)


@triton.jit
def tiled_recurrent_norm_grad(d_pre_ptr, pre_rows, r_hat_ptr, d_r_ptr, step, direction, row_ok, e_mean, e_mean_x, rstd,
                              H, D, G: tl.constexpr, BLOCK_H: tl.constexpr):
    """The phase of a tiled backward step that gives ``d_r``, the gradient of ``W_hh h_{t-1}``,
    over all ``G*H``: ``norm_input_grad`` of ``e`` (in ``d_pre``) and the saved ``r_hat``, into
    ``d_r`` and, fp32, back into ``d_pre`` (the next phase's operand)."""
    for n0 in range(0, G * H, BLOCK_H):
        cols_n, n_ok, ok = unit_tile(n0, row_ok, G * H, BLOCK_H)
        r_offs = feature_offsets(step, direction, G, H, D, cols_n)
        e = load_scratch(d_pre_ptr, pre_rows, cols_n, ok)
        d_r = norm_input_grad(e, tl.load(r_hat_ptr + r_offs, mask=ok, other=0.0).to(tl.float32), e_mean, e_mean_x, rstd, n_ok)
        tl.store(d_r_ptr + r_offs, d_r.to(d_r_ptr.dtype.element_ty), mask=ok)
        tl.store(d_pre_ptr + pre_rows + cols_n[None, :], d_r, mask=ok)


# ------------------------------------------------------------------ LayerNormLSTM, W_hh streamed
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
    ``pre (D, B, 4H)``, ``cell (D, B, H)``. The moments are centred per tile and merged
    (:func:`merged_moments`)."""
    direction, rows, rows64, row_ok, state_rows, pre_rows = tiled_program(B, H, 4, BLOCK_B)
    d64 = direction.to(tl.int64)
    w_base = w_hh_ptr + d64 * 4 * H * H
    gain = gain_hh_ptr + d64 * 4 * H
    copy_rows(h0_ptr + state_rows, h_state_ptr + state_rows, row_ok, H, BLOCK_H)
    copy_rows(c0_ptr + state_rows, c_state_ptr + state_rows, row_ok, H, BLOCK_H)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    tl.debug_barrier()

    for s in range(T):
        t, step, h_read, h_write, valid = tiled_step(s, T, direction, B, rows64, h_state_ptr, D, H, length, row_ok, HAS_LENGTHS)

        # (1) the recurrent product over all 4H outputs, and each row's moments.
        mean, rstd = tiled_recurrent_product(h_read, state_rows, w_base, pre_ptr, pre_rows, row_ok, H, 4, INPUT_PRECISION, BLOCK_B, BLOCK_H)
        tl.debug_barrier()

        # (2) the normalised product, the gates and the new cell, unit tile by unit tile.
        c_total = tl.zeros((BLOCK_B,), dtype=tl.float32)
        c_square = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for u0 in range(0, H, BLOCK_H):
            cols, col_ok, ok = unit_tile(u0, row_ok, H, BLOCK_H)
            g_offs = feature_offsets(step, direction, 4, H, D, cols)
            pre = pre_ptr + pre_rows + cols[None, :]
            r_i = normalised_product(pre, 0, H, mean, rstd, ok)
            r_f = normalised_product(pre, 1, H, mean, rstd, ok)
            r_g = normalised_product(pre, 2, H, mean, rstd, ok)
            r_o = normalised_product(pre, 3, H, mean, rstd, ok)
            i = load_gate(ax_ptr, g_offs, 0, H, ok) + r_i * load_row_vector(gain, cols, col_ok)
            f = load_gate(ax_ptr, g_offs, 1, H, ok) + r_f * load_row_vector(gain + H, cols, col_ok)
            g = load_gate(ax_ptr, g_offs, 2, H, ok) + r_g * load_row_vector(gain + 2 * H, cols, col_ok)
            o = load_gate(ax_ptr, g_offs, 3, H, ok) + r_o * load_row_vector(gain + 3 * H, cols, col_ok)
            c_prev = load_scratch(c_state_ptr, state_rows, cols, ok)
            i, f, g, o, c_new, _ = lstm_cell(i, f, g, o, c_prev, row_ok[:, None], False)
            c_new = tl.where(ok, c_new, 0.0)
            tl.store(cell_ptr + state_rows + cols[None, :], c_new, mask=ok)
            width = tl.minimum(BLOCK_H, H - u0)
            tile_total, tile_square = slice_moments(c_new, ok, width, 1)
            c_total, c_square = merged_moments(c_total, c_square, u0, tile_total, tile_square, width)
            store_gates(r_hat_ptr, g_offs, H, ok, r_i, r_f, r_g, r_o)
            store_gates(gates_ptr, g_offs, H, ok, i, f, g, o)
        c_mean, c_rstd = c_total / H, reciprocal_std(c_square, H)
        tl.debug_barrier()

        # (3) the cell norm, h_t, zoneout and lengths; outputs and the state.
        for u0 in range(0, H, BLOCK_H):
            cols, col_ok, ok = unit_tile(u0, row_ok, H, BLOCK_H)
            g_offs = feature_offsets(step, direction, 4, H, D, cols)
            u_offs = feature_offsets(step, direction, 1, H, D, cols)
            c_new = load_scratch(cell_ptr, state_rows, cols, ok)
            o = load_gate(gates_ptr, g_offs, 3, H, ok)
            c_hat = (c_new - c_mean[:, None]) * c_rstd[:, None]
            h_new = o * tanh(c_hat * load_row_vector(gain_c_ptr + d64 * H, cols, col_ok) + load_row_vector(bias_c_ptr + d64 * H, cols, col_ok))
            h_prev = load_scratch(h_read, state_rows, cols, ok)
            c_prev = load_scratch(c_state_ptr, state_rows, cols, ok)
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)
                h_new = keep * h_prev + (1.0 - keep) * h_new
                c_new = keep * c_prev + (1.0 - keep) * c_new
            h = tl.where(valid, h_new, h_prev)
            c = tl.where(valid, c_new, c_prev)
            tl.store(y_ptr + u_offs, tl.where(valid, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=ok)
            tl.store(c_ptr + u_offs, c.to(c_ptr.dtype.element_ty), mask=ok)
            tl.store(c_hat_ptr + u_offs, c_hat.to(c_hat_ptr.dtype.element_ty), mask=ok)
            tl.store(c_state_ptr + state_rows + cols[None, :], c, mask=ok)
            store_tiled_state(h, h_write, h_n_ptr, state_rows, cols, ok, s, T)
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
    direction, rows, rows64, row_ok, state_rows, pre_rows = tiled_program(B, H, 4, BLOCK_B)
    d64 = direction.to(tl.int64)
    w_base = w_hh_ptr + d64 * 4 * H * H
    gain = gain_hh_ptr + d64 * 4 * H
    norm_plane = d_norm_ptr + ((direction * tl.num_programs(0) + tl.program_id(0)) * 6).to(tl.int64) * H
    copy_rows(dh_n_ptr + state_rows, dh_state_ptr + state_rows, row_ok, H, BLOCK_H)
    copy_rows(dc_n_ptr + state_rows, dc_state_ptr + state_rows, row_ok, H, BLOCK_H)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    tl.debug_barrier()

    for s in range(T):
        t, step, dh_read, dh_write, valid = tiled_step(s, T, 1 - direction, B, rows64, dh_state_ptr, D, H, length, row_ok, HAS_LENGTHS)
        t_prev, first = _previous_time(t, direction, T, T, False)
        stats_offs = (step * D + direction) * 2
        rstd = tl.load(stats_ptr + stats_offs, mask=row_ok, other=0.0)
        c_rstd = tl.load(stats_ptr + stats_offs + 1, mask=row_ok, other=0.0)

        # (1) dL/dchat of the cell norm, its moments, the cell norm's parameter gradients.
        mean_d = tl.zeros((BLOCK_B,), dtype=tl.float32)
        mean_dx = tl.zeros((BLOCK_B,), dtype=tl.float32)
        flow = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for u0 in range(0, H, BLOCK_H):
            cols, col_ok, ok = unit_tile(u0, row_ok, H, BLOCK_H)
            g_offs = feature_offsets(step, direction, 4, H, D, cols)
            u_offs = feature_offsets(step, direction, 1, H, D, cols)
            d_state_h = step_grad(dy_ptr, u_offs, load_scratch(dh_read, state_rows, cols, ok), valid, ok)
            if RECORD_FLOW:
                flow += tl.sum(d_state_h * d_state_h, axis=1)
            if ZONEOUT != 0:
                d_state_h = (1.0 - zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)) * d_state_h
            o = load_gate(gates_ptr, g_offs, 3, H, ok)
            c_hat = tl.load(c_hat_ptr + u_offs, mask=ok, other=0.0).to(tl.float32)
            _, d_u, d_chat = cell_norm_grad(d_state_h, o, c_hat, load_row_vector(gain_c_ptr + d64 * H, cols, col_ok),
                                            load_row_vector(bias_c_ptr + d64 * H, cols, col_ok))
            accumulate(norm_plane + 4 * H + cols, tl.sum(d_u * c_hat, axis=0), col_ok)
            accumulate(norm_plane + 5 * H + cols, tl.sum(d_u, axis=0), col_ok)
            tl.store(d_chat_ptr + state_rows + cols[None, :], d_chat, mask=ok)
            mean_d += tl.sum(d_chat, axis=1)
            mean_dx += tl.sum(d_chat * c_hat, axis=1)
        if RECORD_FLOW:
            store_flow(flow_ptr, direction, T, t, B, rows64, flow, row_ok)
        mean_d = mean_d / H
        mean_dx = mean_dx / H
        tl.debug_barrier()

        # (2) the gate gradients, dc_{t-1}, and e = dgates * gain_hh with its moments.
        e_mean = tl.zeros((BLOCK_B,), dtype=tl.float32)
        e_mean_x = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for u0 in range(0, H, BLOCK_H):
            cols, col_ok, ok = unit_tile(u0, row_ok, H, BLOCK_H)
            g_offs = feature_offsets(step, direction, 4, H, D, cols)
            u_offs = feature_offsets(step, direction, 1, H, D, cols)
            d_state_h = step_grad(dy_ptr, u_offs, load_scratch(dh_read, state_rows, cols, ok), valid, ok)
            dc = load_scratch(dc_state_ptr, state_rows, cols, ok)
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
            d_chat = load_scratch(d_chat_ptr, state_rows, cols, ok)
            d_c_new = d_c_zoned + norm_input_grad(d_chat, c_hat, mean_d, mean_dx, c_rstd, col_ok)
            i = load_gate(gates_ptr, g_offs, 0, H, ok)
            f = load_gate(gates_ptr, g_offs, 1, H, ok)
            g = load_gate(gates_ptr, g_offs, 2, H, ok)
            o = load_gate(gates_ptr, g_offs, 3, H, ok)
            c_prev = tl.load(c_ptr + feature_offsets(t_prev * B + rows64, direction, 1, H, D, cols), mask=ok, other=0.0)
            c_prev = tl.where(first, load_scratch(c0_ptr, state_rows, cols, ok).to(tl.float32), c_prev.to(tl.float32))
            tanh_u = tanh(c_hat * load_row_vector(gain_c_ptr + d64 * H, cols, col_ok) + load_row_vector(bias_c_ptr + d64 * H, cols, col_ok))
            di, df, dg, do = lstm_gate_grads(d_c_new, d_h_new, i, f, g, o, c_prev, tanh_u, grad_clip, CLIP)
            if ZONEOUT != 0:
                dc_prev = tl.fma(d_c_new, f, carried_c)  # as the resident backward
            else:
                dc_prev = d_c_new * f
            store_tiled_state(tl.where(valid, dc_prev, dc), dc_state_ptr, dc0_ptr, state_rows, cols, ok, s, T)
            store_gates(d_ax_ptr, g_offs, H, ok, di, df, dg, do)
            for q in tl.static_range(4):
                sum_e, sum_ex = tiled_gate_norm_grad(gate_of(q, di, df, dg, do), q, r_hat_ptr, g_offs, gain, norm_plane,
                                                     d_pre_ptr, pre_rows, cols, col_ok, ok, H, False)
                e_mean += sum_e
                e_mean_x += sum_ex
        e_mean = e_mean / (4 * H)
        e_mean_x = e_mean_x / (4 * H)
        tl.debug_barrier()

        # (3) d_r, the gradient of W_hh h_{t-1}, over all 4H.
        tiled_recurrent_norm_grad(d_pre_ptr, pre_rows, r_hat_ptr, d_r_ptr, step, direction, row_ok, e_mean, e_mean_x, rstd, H, D, 4, BLOCK_H)
        tl.debug_barrier()

        # (4) dh_{t-1} = d_r W_hh + the zoneout carry; passed through past a row's length.
        for u0 in range(0, H, BLOCK_H):
            cols, col_ok, ok = unit_tile(u0, row_ok, H, BLOCK_H)
            u_offs = feature_offsets(step, direction, 1, H, D, cols)
            dh_prev = _tiled_row_product(d_pre_ptr, pre_rows, w_base, row_ok, cols, col_ok, 4 * H, H, 1, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            dh = load_scratch(dh_read, state_rows, cols, ok)
            if ZONEOUT != 0:
                dh_prev += zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT) * step_grad(dy_ptr, u_offs, dh, valid, ok)
            store_tiled_state(tl.where(valid, dh_prev, dh), dh_write, dh0_ptr, state_rows, cols, ok, s, T)
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
    direction, rows, rows64, row_ok, state_rows, pre_rows = tiled_program(B, H, 3, BLOCK_B)
    d64 = direction.to(tl.int64)
    w_base = w_hh_ptr + d64 * 3 * H * H
    gain = gain_hh_ptr + d64 * 3 * H
    bias = b_hh_ptr + d64 * 3 * H
    copy_rows(h0_ptr + state_rows, h_state_ptr + state_rows, row_ok, H, BLOCK_H)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    tl.debug_barrier()

    for s in range(T):
        t, step, h_read, h_write, valid = tiled_step(s, T, direction, B, rows64, h_state_ptr, D, H, length, row_ok, HAS_LENGTHS)

        # (1) the recurrent product over all 3H outputs, and each row's moments.
        mean, rstd = tiled_recurrent_product(h_read, state_rows, w_base, pre_ptr, pre_rows, row_ok, H, 3, INPUT_PRECISION, BLOCK_B, BLOCK_H)
        tl.debug_barrier()

        # (2) the normalised product, the gates, h_t; outputs and the state.
        for u0 in range(0, H, BLOCK_H):
            cols, col_ok, ok = unit_tile(u0, row_ok, H, BLOCK_H)
            g_offs = feature_offsets(step, direction, 3, H, D, cols)
            saved_offs = feature_offsets(step, direction, 4, H, D, cols)
            u_offs = feature_offsets(step, direction, 1, H, D, cols)
            pre = pre_ptr + pre_rows + cols[None, :]
            r_r = normalised_product(pre, 0, H, mean, rstd, ok)
            r_z = normalised_product(pre, 1, H, mean, rstd, ok)
            r_n = normalised_product(pre, 2, H, mean, rstd, ok)
            b_n = r_n * load_row_vector(gain + 2 * H, cols, col_ok) + load_row_vector(bias + 2 * H, cols, col_ok)
            h_prev = load_scratch(h_read, state_rows, cols, ok)
            r, z, n, h_new = gru_gates(
                load_gate(ax_ptr, g_offs, 0, H, ok), load_gate(ax_ptr, g_offs, 1, H, ok), load_gate(ax_ptr, g_offs, 2, H, ok),
                r_r * load_row_vector(gain, cols, col_ok) + load_row_vector(bias, cols, col_ok),
                r_z * load_row_vector(gain + H, cols, col_ok) + load_row_vector(bias + H, cols, col_ok), b_n, h_prev,
            )
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)
                h_new = keep * h_prev + (1.0 - keep) * h_new
            h = tl.where(valid, h_new, h_prev)
            tl.store(y_ptr + u_offs, tl.where(valid, h_new, 0.0).to(y_ptr.dtype.element_ty), mask=ok)
            store_gates(gates_ptr, saved_offs, H, ok, r, z, n, b_n)
            store_gates(r_hat_ptr, g_offs, H, ok, r_r, r_z, r_n)
            store_tiled_state(h, h_write, h_n_ptr, state_rows, cols, ok, s, T)
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
    direction, rows, rows64, row_ok, state_rows, pre_rows = tiled_program(B, H, 3, BLOCK_B)
    d64 = direction.to(tl.int64)
    w_base = w_hh_ptr + d64 * 3 * H * H
    gain = gain_hh_ptr + d64 * 3 * H
    norm_plane = d_norm_ptr + ((direction * tl.num_programs(0) + tl.program_id(0)) * 6).to(tl.int64) * H
    copy_rows(dh_n_ptr + state_rows, dh_state_ptr + state_rows, row_ok, H, BLOCK_H)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    tl.debug_barrier()

    for s in range(T):
        t, step, dh_read, dh_write, valid = tiled_step(s, T, 1 - direction, B, rows64, dh_state_ptr, D, H, length, row_ok, HAS_LENGTHS)
        t_prev, start = _previous_time(t, direction, T, length, HAS_LENGTHS)
        rstd = tl.load(stats_ptr + step * D + direction, mask=row_ok, other=0.0)

        # (1) the gate gradients, e = d_b * gain_hh and its moments.
        e_mean = tl.zeros((BLOCK_B,), dtype=tl.float32)
        e_mean_x = tl.zeros((BLOCK_B,), dtype=tl.float32)
        flow = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for u0 in range(0, H, BLOCK_H):
            cols, col_ok, ok = unit_tile(u0, row_ok, H, BLOCK_H)
            g_offs = feature_offsets(step, direction, 3, H, D, cols)
            saved_offs = feature_offsets(step, direction, 4, H, D, cols)
            u_offs = feature_offsets(step, direction, 1, H, D, cols)
            h_prev = tl.load(y_ptr + feature_offsets(t_prev * B + rows64, direction, 1, H, D, cols), mask=ok, other=0.0)
            h_prev = tl.where(start, load_scratch(h0_ptr, state_rows, cols, ok).to(tl.float32), h_prev.to(tl.float32))
            d_state = step_grad(dy_ptr, u_offs, load_scratch(dh_read, state_rows, cols, ok), valid, ok)
            if RECORD_FLOW:
                flow += tl.sum(d_state * d_state, axis=1)
            if ZONEOUT != 0:
                d_state = (1.0 - zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)) * d_state
            r = load_gate(gates_ptr, saved_offs, 0, H, ok)
            z = load_gate(gates_ptr, saved_offs, 1, H, ok)
            n = load_gate(gates_ptr, saved_offs, 2, H, ok)
            b_n = load_gate(gates_ptr, saved_offs, 3, H, ok)
            dr_pre, dz_pre, dn_pre, db_n, _ = gru_gates_grad(d_state, h_prev, r, z, n, b_n, grad_clip, CLIP)
            store_gates(d_ax_ptr, g_offs, H, ok, dr_pre, dz_pre, dn_pre)
            for q in tl.static_range(3):
                sum_e, sum_ex = tiled_gate_norm_grad(gate_of(q, dr_pre, dz_pre, db_n), q, r_hat_ptr, g_offs, gain, norm_plane,
                                                     d_pre_ptr, pre_rows, cols, col_ok, ok, H, True)
                e_mean += sum_e
                e_mean_x += sum_ex
        if RECORD_FLOW:
            store_flow(flow_ptr, direction, T, t, B, rows64, flow, row_ok)
        e_mean = e_mean / (3 * H)
        e_mean_x = e_mean_x / (3 * H)
        tl.debug_barrier()

        # (2) d_r, the gradient of W_hh h_{t-1}, over all 3H.
        tiled_recurrent_norm_grad(d_pre_ptr, pre_rows, r_hat_ptr, d_r_ptr, step, direction, row_ok, e_mean, e_mean_x, rstd, H, D, 3, BLOCK_H)
        tl.debug_barrier()

        # (3) dh_{t-1}; passed through past a row's length.
        for u0 in range(0, H, BLOCK_H):
            cols, col_ok, ok = unit_tile(u0, row_ok, H, BLOCK_H)
            saved_offs = feature_offsets(step, direction, 4, H, D, cols)
            u_offs = feature_offsets(step, direction, 1, H, D, cols)
            dh_prev = _tiled_row_product(d_pre_ptr, pre_rows, w_base, row_ok, cols, col_ok, 3 * H, H, 1, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            dh = load_scratch(dh_read, state_rows, cols, ok)
            d_state = step_grad(dy_ptr, u_offs, dh, valid, ok)
            z = load_gate(gates_ptr, saved_offs, 1, H, ok)
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, ok, zoneout_p, ZONEOUT)
                dh_prev += (1.0 - keep) * d_state * z + keep * d_state
            else:
                dh_prev += d_state * z
            store_tiled_state(tl.where(valid, dh_prev, dh), dh_write, dh0_ptr, state_rows, cols, ok, s, T)
        tl.debug_barrier()


# -------------------------------------------------------------------- LayerNormLSTM, persistent
#: A test-only fault (``fastrnn.kernels.sync``'s convention; never set in a real launch): the
#: persistent LayerNorm kernels (LSTM and GRU, forward and backward) skip the waits before they
#: combine the statistics' partials (the wait for ``h_{t-1}`` / ``dh_t`` stays), so the harness
#: tests can prove they catch it.
FAULT_NO_STATS_WAIT = tl.constexpr(5)


@triton.jit
def slice_moments(x, ok, count, AXIS: tl.constexpr = 0):
    """This program's partial of a row's layer-norm moments over its slice, per column (batch
    row) of the ``(R, BLOCK_B)`` fp32 tile ``x`` (``AXIS`` 1: per row of a ``(BLOCK_B, R)`` tile,
    the tiled kernels') (``ok``: the real entries, ``count`` of them per batch row, ``(BLOCK_B,)``
    or a scalar): ``(sum, centred sum of squares)`` about the slice's own mean."""
    total = tl.sum(tl.where(ok, x, 0.0), axis=AXIS)
    dev = tl.where(ok, x - tl.expand_dims(total / count, AXIS), 0.0)
    return total, tl.sum(dev * dev, axis=AXIS)


@triton.jit
def combined_moments(partials, lanes, n_slices, SLICE: tl.constexpr, units_per_gate, gates: tl.constexpr, width,
                     B, rows, row_ok):
    """A row's ``(mean, 1 / sqrt(var + EPS))`` over ``width`` values from every program's
    :func:`slice_moments` (``partials``: fp32 ``(B, n_slices, 2)`` of this group and direction,
    ``lanes (BLOCK_FLAGS,)``): Chan et al.'s pairwise combine, ``M2 = sum_q M2_q + sum_q n_q
    (mean_q - mean)^2``, program ``q`` holding ``n_q = gates * min(SLICE, units_per_gate - q*SLICE)``
    values. Close to the resident kernels' centred two-pass moments (every term is a centred
    square), where a one-pass ``E[v^2] - mean^2`` cancels: measured in fp32
    against float64 on 64 rows of 256 values in 32 slices, the worst relative error of ``rstd`` is
    1.9e-7 (two-pass 0.9e-7, one-pass 1.7e-5) at mean 4, spread 0.3, and 7.6e-6 (two-pass 1.1e-7,
    one-pass 0.17) at mean 10, spread 0.01; all three 1e-7 on ``W_hh h`` at torch.nn's init. fp32."""
    lane_ok = lanes < n_slices
    ok = lane_ok[:, None] & row_ok[None, :]
    at = partials + (rows.to(tl.int64)[None, :] * n_slices + lanes[:, None]) * 2
    sums = tl.load(at, mask=ok, other=0.0)
    squares = tl.load(at + 1, mask=ok, other=0.0)
    counts = (gates * tl.minimum(SLICE, units_per_gate - lanes * SLICE)).to(tl.float32)
    counts = tl.where(lane_ok, counts, 1.0)
    mean = tl.sum(sums, axis=0) / width
    spread = tl.where(ok, sums / counts[:, None] - mean[None, :], 0.0)
    m2 = tl.sum(squares, axis=0) + tl.sum(counts[:, None] * spread * spread, axis=0)
    return mean, reciprocal_std(m2, width)


@triton.jit
def walk_state(h0, h_read, s, offs, ok):
    """``h_{t-1}`` at ``offs`` of the row pointers (fp32): from ``h0`` (compute dtype) at the walk's
    first step ``s == 0``, else from the fp32 exchange slot ``h_read``."""
    if s == 0:
        h = tl.load(h0 + offs, mask=ok, other=0.0).to(tl.float32)
    else:
        h = tl.load(h_read + offs, mask=ok, other=0.0)
    return h


@triton.jit
def stats_wait(flags, n_slices, target, error_ptr, max_spins, BARRIER: tl.constexpr, BLOCK_FLAGS: tl.constexpr,
               FAULT: tl.constexpr):
    """The wait before a statistics combine (barrier mode; skipped by :data:`FAULT_NO_STATS_WAIT`)."""
    if BARRIER:
        if FAULT != FAULT_NO_STATS_WAIT:
            wait(flags, n_slices, target, error_ptr, max_spins, BLOCK_FLAGS, FAULT)


@triton.jit
def slice_and_batch_tile(w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, lengths_ptr, flags_ptr,
                         piece, group, d64, n_slices, T, B, H, HAS_LENGTHS: tl.constexpr, SLICE: tl.constexpr,
                         S_TILE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_FLAGS: tl.constexpr):
    """What program ``(piece, group, direction)`` of the persistent LayerNormLSTM kernels (forward
    and backward: the same partition) holds for the whole launch; ``d64`` its direction (int64),
    ``n_slices`` the programs per group. Pointers as the kernels take them: ``w_hh (D, 4H, H)``,
    ``gain_hh (D, 4H)``, ``gain_c``, ``bias_c (D, H)``, ``lengths (B,)`` int32, ``flags (D,
    batch_groups, n_slices)`` int32.
    ``S_TILE = max(SLICE, 4)``, so that ``4 * S_TILE >= 16`` (``tl.dot``'s smallest M). Returns:

    * ``units``, ``unit_ok (S_TILE,)`` the slice's units (``< H``, and ``< SLICE`` within the
      tile); ``w_rows``, ``r_ok (4*S_TILE,)`` their rows of ``W_hh``, gate-major (row ``q*S_TILE +
      u`` is ``W_hh`` row ``q*H + units[u]``); ``cols_k``, ``k_ok (BLOCK_K,)`` the columns of
      ``W_hh`` (``< H``);
    * ``w (4*S_TILE, BLOCK_K)`` the weight slice (``fastrnn.kernels.lstm.load_weight_slice``, whole);
      ``gain_rows (4*S_TILE, 1)``, ``gain_c``, ``bias_c (S_TILE, 1)`` fp32 (zero outside the slice);
    * ``flags``, ``own_flag``: the group's flags and this program's (``group_flags``); ``lanes
      (BLOCK_FLAGS,)``;
    * the batch tile (``fastrnn.kernels.lstm.batch_tile``): ``rows``, ``row_ok (BLOCK_B,)``,
      ``state_rows (1, BLOCK_B)`` int64, ``tile_ok (S_TILE, BLOCK_B)``; ``rows_ok (4*S_TILE,
      BLOCK_B)`` its mask of the slice's rows; ``length (BLOCK_B,)`` the rows' lengths;
    * offsets of this program's part of a ``(D, B, H)`` buffer (``own (S_TILE, BLOCK_B)``) and of a
      ``(D, B, 4H)`` one (``(4*S_TILE, BLOCK_B)``); ``moments_at (1, BLOCK_B)`` its slots in a
      ``(D, B, n_slices, 2)`` moments exchange (whose base each kernel offsets by direction itself:
      done in here, the changed order of those two offsets changed the backward's PTX)."""
    S: tl.constexpr = SLICE
    units = piece * S + tl.arange(0, S_TILE)
    unit_ok = (tl.arange(0, S_TILE) < S) & (units < H)
    r = tl.arange(0, 4 * S_TILE)
    r_unit = r % S_TILE
    w_rows = (r // S_TILE) * H + piece * S + r_unit
    r_ok = (r_unit < S) & (piece * S + r_unit < H)
    cols_k = tl.arange(0, BLOCK_K)
    k_ok = cols_k < H
    w, _no_tail = load_weight_slice(w_hh_ptr + d64 * 4 * H * H, w_rows, r_ok, H, cols_k, k_ok, cols_k, k_ok, BLOCK_K, 0, 0)
    gain_rows = tl.load(gain_hh_ptr + d64 * 4 * H + w_rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    gain_c = tl.load(gain_c_ptr + d64 * H + units, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    bias_c = tl.load(bias_c_ptr + d64 * H + units, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    flags, own_flag = group_flags(flags_ptr, n_slices, BLOCK_FLAGS)
    lanes = tl.arange(0, BLOCK_FLAGS)
    rows, row_ok, state_rows, tile_ok = batch_tile(group * BLOCK_B, 0, B, d64, unit_ok, BLOCK_B)
    rows_ok = r_ok[:, None] & row_ok[None, :]
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    own = state_rows * H + units[:, None]
    own_rows = state_rows * (4 * H) + w_rows[:, None]
    moments_at = ((d64 * B + rows.to(tl.int64)) * n_slices + piece)[None, :] * 2
    return (units, unit_ok, w_rows, r_ok, cols_k, k_ok, w, gain_rows, gain_c, bias_c, flags, own_flag, lanes,
            rows, row_ok, state_rows, tile_ok, rows_ok, length, own, own_rows, moments_at)


@triton.jit(do_not_specialize=["phase_begin", "phase_end", "T"])
def layer_norm_lstm_fwd_persistent_kernel(
    ax_ptr, w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, h0_ptr, c0_ptr, lengths_ptr, keep_ptr,
    y_ptr, h_n_ptr, gates_ptr, r_hat_ptr, c_ptr, c_hat_ptr, stats_ptr,
    h_exchange_ptr, r_moments_ptr, c_moments_ptr, pre_ptr, cell_ptr, carry_ptr,
    flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, D, zoneout_p,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr, GROUP_TILES: tl.constexpr,
    BLOCK_KC: tl.constexpr,
):
    """The persistent forward (``fastrnn.ops.persistent``'s partition and launch): program ``(s,
    g, d)`` holds the rows of direction ``d``'s ``W_hh`` of its ``SLICE`` units, all four gates
    stacked (``fastrnn.kernels.lstm.load_weight_slice``, read whole: ``GROUP_TILES == 1``,
    ``BLOCK_KC == 0``), for the batch rows ``g*BLOCK_B ...``; the state is held transposed (units x
    rows), as the plain LSTM's persistent kernels hold it. Writes what the resident forward writes
    (``y``, ``h_n`` and the saved ``gates``, ``r_hat``, ``c``, ``c_hat``, ``stats``, same layouts),
    so every backward kernel takes its output as its own.

    A row's norms span every program's slice, so a step is three phases, each ending in an arrive
    (``fastrnn.kernels.sync``; phase ``p = 3*i + k`` of walk step ``i``, flags count phases done):

    0. wait for ``h_{t-1}`` (flags ``>= p``; the walk's first step reads ``h0``); ``r = W_slice
       h_{t-1}`` (``4*SLICE x BLOCK_B``, into ``pre``); publish the slice's moments of ``r``
       (:func:`slice_moments`).
    1. wait (``>= p``), combine every slice's moments over all ``4H`` (:func:`combined_moments`):
       ``rhat``, the gates, ``c_new``; publish the slice's moments of ``c_new``.
    2. wait, combine over ``H``: ``chat``, ``h_new``, zoneout, lengths; publish ``h_t``.

    Three exchange rounds per step is the fewest with this split of the work. ``mean(r)`` alone
    could be local (it is linear in ``h``: ``colsum(W_hh) . h / 4H``), but ``var(r)`` is the
    quadratic form ``h^T W_hh^T W_hh h``: local only with the ``H x H`` Gram matrix in every
    program, more on chip than the slice itself. ``c_new`` depends on ``rhat``, hence on the second
    round's result, so its moments are a third. (Two rounds are possible if every program re-derived
    all of ``h_t`` from published ``c_new`` and ``o`` and the cell moments: ``H x BLOCK_B``
    elementwise work, the zoneout masks and the previous ``h`` of all units in every program; not
    done.) Each round's buffer is reused step after step without a ping-pong: a program writes the
    next step's partials only after a wait that every program passes only after reading this
    step's. ``h`` keeps its ping-pong (``fastrnn.kernels.sync``, point 3).

    Numerics: ``r`` is the same product as the resident kernel's (``h`` cast to the weights' dtype,
    fp32 accumulation); the moments are combined centred (:func:`combined_moments`), so they
    match the resident kernels' two-pass moments to fp32 rounding.

    Scratch (fp32, per launch; ``fastrnn.ops.layer_norm_rnn.layer_norm_lstm_fwd``): ``h_exchange
    (2, D, B, H)`` the ping-pong of ``h`` (step ``i`` reads slot ``i % 2``); ``r_moments``,
    ``c_moments (D, B, slices, 2)`` the published partials; this program's own, a phase apart:
    ``pre (D, B, 4H)`` the raw product, ``cell (2, D, B, H)`` ``c_new`` and ``sigmoid(o)``,
    ``carry (D, B, H)`` the state ``c`` between steps. ``BLOCK_K >= H``, ``BLOCK_FLAGS >= slices``."""
    tl.static_assert(GROUP_TILES == 1, "the persistent LayerNormLSTM forward walks one sub-tile per program")
    tl.static_assert(BLOCK_KC == 0, "the persistent LayerNormLSTM forward reads its slice whole")
    S: tl.constexpr = SLICE
    S_TILE: tl.constexpr = SLICE if SLICE >= 4 else 4  # 4 * S_TILE >= 16: tl.dot's smallest M
    piece = tl.program_id(0)
    group = tl.program_id(1)
    direction = tl.program_id(2)
    n_slices = tl.num_programs(0)
    d64 = direction.to(tl.int64)
    (units, unit_ok, w_rows, r_ok, cols_k, k_ok, w, gain_rows, gain_c, bias_c, flags, own_flag, lanes,
     rows, row_ok, state_rows, tile_ok, rows_ok, length, own, own_pre, moments_at) = slice_and_batch_tile(
        w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, lengths_ptr, flags_ptr,
        piece, group, d64, n_slices, T, B, H, HAS_LENGTHS, SLICE, S_TILE, BLOCK_K, BLOCK_B, BLOCK_FLAGS)
    r_moments = r_moments_ptr + d64 * B * n_slices * 2
    c_moments = c_moments_ptr + d64 * B * n_slices * 2
    h_slot = D * B * H
    cell_slot = D * B * H
    if phase_begin == 0:
        tl.store(carry_ptr + own, tl.load(c0_ptr + own, mask=tile_ok, other=0.0).to(tl.float32), mask=tile_ok)

    for stage in range(phase_begin, phase_end):
        s = stage // 3
        part = stage % 3
        t = step_time(s, T, direction).to(tl.int64)
        step = (t * B + rows.to(tl.int64))[None, :]
        h_read = h_exchange_ptr + (s % 2) * h_slot + state_rows * H
        if part == 0:  # r = W_slice h_{t-1} and its moments over the slice
            if BARRIER:
                if s > 0:
                    wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
            h_prev = walk_state(h0_ptr + state_rows * H, h_read, s, cols_k[:, None], k_ok[:, None] & row_ok[None, :])
            pre = weight_product(w, h_prev.to(w.dtype), INPUT_PRECISION)
            tl.store(pre_ptr + own_pre, pre, mask=rows_ok)
            total, square = slice_moments(pre, rows_ok, 4 * tl.minimum(S, H - piece * S))
            tl.store(r_moments_ptr + moments_at + 1, square, mask=row_ok[None, :])
            publish(total[None, :], r_moments_ptr + moments_at, row_ok[None, :], own_flag, stage, piece, 0, BARRIER, FAULT, 1)
        elif part == 1:  # the recurrent norm over all 4H, the gates, c_new and its moments over the slice
            stats_wait(flags, n_slices, stage, error_ptr, max_spins, BARRIER, BLOCK_FLAGS, FAULT)
            mean, rstd = combined_moments(r_moments, lanes, n_slices, S, H, 4, 4 * H, B, rows, row_ok)
            r_hat = tl.where(rows_ok, (tl.load(pre_ptr + own_pre, mask=rows_ok, other=0.0) - mean[None, :]) * rstd[None, :], 0.0)
            gate_offs = step * (D * 4 * H) + direction * 4 * H + w_rows[:, None]
            pre_act = tl.load(ax_ptr + gate_offs, mask=rows_ok, other=0.0).to(tl.float32) + r_hat * gain_rows
            tl.store(r_hat_ptr + gate_offs, r_hat.to(r_hat_ptr.dtype.element_ty), mask=rows_ok)
            i, f, g, o = split_gates(pre_act, S_TILE, BLOCK_B)
            c = tl.load(carry_ptr + own, mask=tile_ok, other=0.0)
            i, f, g, o, c_new, _m = lstm_cell(i, f, g, o, c, tile_ok, False)
            unit_offs = step * (D * 4 * H) + direction * 4 * H + units[:, None]
            tl.store(gates_ptr + unit_offs, i.to(gates_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(gates_ptr + unit_offs + H, f.to(gates_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(gates_ptr + unit_offs + 2 * H, g.to(gates_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(gates_ptr + unit_offs + 3 * H, o.to(gates_ptr.dtype.element_ty), mask=tile_ok)
            if piece == 0:
                tl.store(stats_ptr + (step * D + direction) * 2, rstd[None, :], mask=row_ok[None, :])
            tl.store(cell_ptr + own, c_new, mask=tile_ok)
            tl.store(cell_ptr + cell_slot + own, o, mask=tile_ok)
            total, square = slice_moments(c_new, tile_ok, tl.minimum(S, H - piece * S))
            tl.store(c_moments_ptr + moments_at + 1, square, mask=row_ok[None, :])
            publish(total[None, :], c_moments_ptr + moments_at, row_ok[None, :], own_flag, stage, piece, 0, BARRIER, FAULT, 1)
        else:  # the cell norm over H, h_t; zoneout and lengths; publish h_t
            stats_wait(flags, n_slices, stage, error_ptr, max_spins, BARRIER, BLOCK_FLAGS, FAULT)
            c_mean, c_rstd = combined_moments(c_moments, lanes, n_slices, S, H, 1, H, B, rows, row_ok)
            c_new = tl.load(cell_ptr + own, mask=tile_ok, other=0.0)
            o = tl.load(cell_ptr + cell_slot + own, mask=tile_ok, other=0.0)
            c_hat = tl.where(tile_ok, (c_new - c_mean[None, :]) * c_rstd[None, :], 0.0)
            h_new = o * tanh(c_hat * gain_c + bias_c)
            h = walk_state(h0_ptr + state_rows * H, h_read, s, units[:, None], tile_ok)
            c = tl.load(carry_ptr + own, mask=tile_ok, other=0.0)
            u_offs = step * (D * H) + direction * H + units[:, None]
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
                h_new = keep * h + (1.0 - keep) * h_new
                c_new = keep * c + (1.0 - keep) * c_new
            if HAS_LENGTHS:
                live = (t < length)[None, :]
                out = tl.where(live, h_new, 0.0)
                h = tl.where(live, h_new, h)
                c = tl.where(live, c_new, c)
            else:
                out = h_new
                h = h_new
                c = c_new
            tl.store(y_ptr + u_offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(c_ptr + u_offs, c.to(c_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(c_hat_ptr + u_offs, c_hat.to(c_hat_ptr.dtype.element_ty), mask=tile_ok)
            if piece == 0:
                tl.store(stats_ptr + (step * D + direction) * 2 + 1, c_rstd[None, :], mask=row_ok[None, :])
            tl.store(carry_ptr + own, c, mask=tile_ok)
            if s == T - 1:
                tl.store(h_n_ptr + own, h.to(h_n_ptr.dtype.element_ty), mask=tile_ok)
            publish(h, h_exchange_ptr + ((s + 1) % 2) * h_slot + own, tile_ok, own_flag, stage, piece, 0, BARRIER, FAULT, 1)


@triton.jit
def summed_partials(partials, lanes, n_slices, rows, row_ok):
    """Every program's two published sums of a row (``partials``: fp32 ``(B, n_slices, 2)`` of this
    group and direction), summed over the programs: ``(sum of the first, sum of the second)``."""
    ok = (lanes < n_slices)[:, None] & row_ok[None, :]
    at = partials + (rows.to(tl.int64)[None, :] * n_slices + lanes[:, None]) * 2
    return tl.sum(tl.load(at, mask=ok, other=0.0), axis=0), tl.sum(tl.load(at + 1, mask=ok, other=0.0), axis=0)


@triton.jit(do_not_specialize=["phase_begin", "phase_end", "T"])
def layer_norm_lstm_bwd_persistent_kernel(
    dy_ptr, dh_n_ptr, dc_n_ptr, gates_ptr, r_hat_ptr, c_ptr, c_hat_ptr, stats_ptr, c0_ptr, keep_ptr,
    w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, lengths_ptr,
    d_ax_ptr, d_r_ptr, dh0_ptr, dc0_ptr, d_norm_ptr, flow_ptr,
    dh_partial_ptr, c_moments_ptr, r_moments_ptr, grad_ptr, e_ptr, dh_carry_ptr, dc_carry_ptr,
    flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, D, zoneout_p, grad_clip,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr,
    GROUP_TILES: tl.constexpr, BLOCK_KC: tl.constexpr,
):
    """The persistent backward: :func:`layer_norm_lstm_fwd_persistent_kernel`'s partition (the same
    rows of ``W_hh`` per program), the forward's walk reversed, the math of
    :func:`layer_norm_lstm_bwd_kernel`. Three phases per step and one more at the end (``3T + 1``;
    phase ``p = 3*i + k`` of walk step ``i``, flags count phases done):

    0. wait (``i > 0``), ``dh`` of the slice's units = its carried part + every program's partial of
       ``d_r W_hh`` of the step before (the forward's step after); ``dh_t = dy_t + dh``, the flow
       share, zoneout's split, the cell norm's ``dL/dchat`` and its parameters' sums; publish the
       slice's ``sum dchat``, ``sum dchat * chat``. (Phase ``3T``: only ``dh``; store ``dh0``, ``dc0``.)
    1. wait, the cell norm's input gradient from the means over ``H``, the gate gradients (``d_ax``,
       clamped with ``CLIP``), ``dc_{t-1}``, ``gain_hh``'s sums, ``e = dgates * gain_hh``; publish the
       slice's ``sum e``, ``sum e * rhat``.
    2. wait, ``d_r`` from the means over ``4H``; publish this program's partial ``W_slice^T d_r``
       over all ``H`` units (the plain LSTM's ``reduce`` exchange, ``fastrnn.kernels.lstm``).

    Three rounds: each of the two norms' backward needs a row's means over every slice (as the
    forward needs its moments), and ``dh_{t-1}`` a sum over every slice's rows of ``W_hh``. The
    means are plain sums (no cancellation). Buffers as the forward's, reused without a ping-pong
    by the same argument. ``d_norm (D, cdiv(B, BLOCK_B), 6, H)`` fp32, zeroed by the launcher: each
    program adds its units' sums over its rows, step by step (its entries are its own). ``flow``
    (``RECORD_FLOW``): ``(n_slices, D, T, B)`` fp32, this program's share of ``||dL/dh_t||^2`` in
    plane ``s``. Scratch (fp32): ``dh_partial (n_slices, D, B, H)``; ``c_moments``, ``r_moments (D, B,
    n_slices, 2)``; own, a phase apart: ``grad (2, D, B, H)`` ``(1 - k) dh_t`` and ``dL/dchat``,
    ``e (D, B, 4H)``, ``dh_carry``, ``dc_carry (D, B, H)`` the carried ``dh`` (its local part: the
    zoneout carry, or all of it past a row's length) and ``dc``. ``BLOCK_KC`` (the plain LSTM's
    chunked partial) is not used: the partial is formed whole, as the forward reads its slice."""
    tl.static_assert(GROUP_TILES == 1, "the persistent LayerNormLSTM backward walks one sub-tile per program")
    S: tl.constexpr = SLICE
    S_TILE: tl.constexpr = SLICE if SLICE >= 4 else 4
    GATHER: tl.constexpr = BLOCK_FLAGS if BLOCK_FLAGS <= 8 else 8
    piece = tl.program_id(0)
    group = tl.program_id(1)
    direction = tl.program_id(2)
    n_slices = tl.num_programs(0)
    d64 = direction.to(tl.int64)
    (units, unit_ok, w_rows, r_ok, cols_k, k_ok, w, gain_rows, gain_c, bias_c, flags, own_flag, lanes,
     rows, row_ok, state_rows, tile_ok, rows_ok, length, own, own_rows, moments_at) = slice_and_batch_tile(
        w_hh_ptr, gain_hh_ptr, gain_c_ptr, bias_c_ptr, lengths_ptr, flags_ptr,
        piece, group, d64, n_slices, T, B, H, HAS_LENGTHS, SLICE, S_TILE, BLOCK_K, BLOCK_B, BLOCK_FLAGS)
    c_moments = c_moments_ptr + d64 * B * n_slices * 2
    r_moments = r_moments_ptr + d64 * B * n_slices * 2
    norm_plane = d_norm_ptr + ((direction * tl.num_programs(1) + group) * 6).to(tl.int64) * H
    grad_slot = D * B * H
    partial_stride = D * B * H
    if phase_begin == 0:
        tl.store(dh_carry_ptr + own, tl.load(dh_n_ptr + own, mask=tile_ok, other=0.0).to(tl.float32), mask=tile_ok)
        tl.store(dc_carry_ptr + own, tl.load(dc_n_ptr + own, mask=tile_ok, other=0.0).to(tl.float32), mask=tile_ok)

    for stage in range(phase_begin, phase_end):
        s = stage // 3
        part = stage % 3
        t = step_time(tl.minimum(s, T - 1), T, 1 - direction).to(tl.int64)
        step = (t * B + rows.to(tl.int64))[None, :]
        u_offs = step * (D * H) + direction * H + units[:, None]
        g_offs = step * (D * 4 * H) + direction * 4 * H + units[:, None]
        if HAS_LENGTHS:
            valid = (t < length)[None, :] & row_ok[None, :]
        else:
            valid = row_ok[None, :]
        if part == 0:  # dh; the cell norm's dL/dchat and its sums over the slice
            dh = tl.load(dh_carry_ptr + own, mask=tile_ok, other=0.0)
            if s > 0:
                if BARRIER:
                    wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
                dh += gather_partials(dh_partial_ptr, n_slices, partial_stride, state_rows, H, units, tile_ok, GATHER, S_TILE, BLOCK_B)
            if s == T:
                tl.store(dh0_ptr + own, dh.to(dh0_ptr.dtype.element_ty), mask=tile_ok)
                tl.store(dc0_ptr + own, tl.load(dc_carry_ptr + own, mask=tile_ok, other=0.0).to(dc0_ptr.dtype.element_ty), mask=tile_ok)
            else:
                d_state_h = step_grad(dy_ptr, u_offs, dh, valid, tile_ok)
                if RECORD_FLOW:
                    share = tl.sum(tl.where(tile_ok, d_state_h * d_state_h, 0.0), axis=0)
                    tl.store(flow_ptr + ((piece * D + direction) * T + t) * B + rows, share, mask=row_ok)
                if ZONEOUT != 0:  # the part kept from the previous state goes straight to it
                    carried_h = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT) * d_state_h
                else:
                    carried_h = tl.zeros_like(d_state_h)
                d_h_new = d_state_h - carried_h
                tl.store(dh_carry_ptr + own, tl.where(valid, carried_h, dh), mask=tile_ok)  # dh_{t-1}'s own part
                o = tl.load(gates_ptr + g_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
                c_hat = tl.load(c_hat_ptr + u_offs, mask=tile_ok, other=0.0).to(tl.float32)
                _tanh_u, d_u, d_chat = cell_norm_grad(d_h_new, o, c_hat, gain_c, bias_c)
                accumulate(norm_plane + 4 * H + units, tl.sum(d_u * c_hat, axis=1), unit_ok)
                accumulate(norm_plane + 5 * H + units, tl.sum(d_u, axis=1), unit_ok)
                tl.store(grad_ptr + own, d_h_new, mask=tile_ok)
                tl.store(grad_ptr + grad_slot + own, d_chat, mask=tile_ok)
                tl.store(c_moments_ptr + moments_at + 1, tl.sum(tl.where(tile_ok, d_chat * c_hat, 0.0), axis=0)[None, :],
                         mask=row_ok[None, :])
                publish(tl.sum(tl.where(tile_ok, d_chat, 0.0), axis=0)[None, :], c_moments_ptr + moments_at, row_ok[None, :], own_flag,
                        stage, piece, 0, BARRIER, FAULT, 1)
        elif part == 1:  # the cell norm's input gradient, the gate gradients, dc_{t-1}, e and its sums
            stats_wait(flags, n_slices, stage, error_ptr, max_spins, BARRIER, BLOCK_FLAGS, FAULT)
            sum_d, sum_dx = summed_partials(c_moments, lanes, n_slices, rows, row_ok)
            c_rstd = tl.load(stats_ptr + (step * D + direction) * 2 + 1, mask=row_ok[None, :], other=0.0)
            c_hat = tl.load(c_hat_ptr + u_offs, mask=tile_ok, other=0.0).to(tl.float32)
            d_chat = tl.load(grad_ptr + grad_slot + own, mask=tile_ok, other=0.0)
            d_h_new = tl.load(grad_ptr + own, mask=tile_ok, other=0.0)
            d_c_norm = tl.trans(norm_input_grad(tl.trans(d_chat), tl.trans(c_hat), sum_d / H, sum_dx / H, tl.reshape(c_rstd, (BLOCK_B,)),
                                                unit_ok))
            dc = tl.load(dc_carry_ptr + own, mask=tile_ok, other=0.0)
            d_state_c = tl.where(valid, dc, 0.0)
            if ZONEOUT != 0:
                carried_c = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT) * d_state_c
            else:
                carried_c = tl.zeros_like(d_state_c)
            d_c_new = (d_state_c - carried_c) + d_c_norm
            i = tl.load(gates_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32)
            f = tl.load(gates_ptr + g_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
            g = tl.load(gates_ptr + g_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
            o = tl.load(gates_ptr + g_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
            t_prev = t - 1 + 2 * direction  # the step the forward walk took before t (c0 at the walk's start)
            first = (t_prev < 0) | (t_prev >= T)
            t_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1)
            c_prev = tl.load(c_ptr + (t_prev * B + rows.to(tl.int64))[None, :] * (D * H) + direction * H + units[:, None], mask=tile_ok,
                             other=0.0).to(tl.float32)
            c_prev = tl.where(first, tl.load(c0_ptr + own, mask=tile_ok, other=0.0).to(tl.float32), c_prev)
            tanh_u, _d_u, _d_chat = cell_norm_grad(d_h_new, o, c_hat, gain_c, bias_c)
            di, df, dg, do = lstm_gate_grads(d_c_new, d_h_new, i, f, g, o, c_prev, tanh_u, grad_clip, CLIP)
            tl.store(dc_carry_ptr + own, tl.where(valid, tl.fma(d_c_new, f, carried_c), dc), mask=tile_ok)
            store_gates(d_ax_ptr, g_offs, H, tile_ok, di, df, dg, do)
            dgates = join_gates(di, df, dg, do, S_TILE, BLOCK_B)
            r_hat = tl.load(r_hat_ptr + step * (D * 4 * H) + direction * 4 * H + w_rows[:, None], mask=rows_ok, other=0.0).to(tl.float32)
            gain_sums = tl.sum(dgates * r_hat, axis=1)  # (4*S_TILE,): the rows' gain_hh sums
            accumulate(norm_plane + w_rows, gain_sums, r_ok)
            e = tl.where(rows_ok, dgates * gain_rows, 0.0)
            tl.store(e_ptr + own_rows, e, mask=rows_ok)
            tl.store(r_moments_ptr + moments_at + 1, tl.sum(e * r_hat, axis=0)[None, :], mask=row_ok[None, :])
            publish(tl.sum(e, axis=0)[None, :], r_moments_ptr + moments_at, row_ok[None, :], own_flag, stage, piece, 0, BARRIER, FAULT, 1)
        else:  # d_r from the means over 4H; this program's partial of dh_{t-1} over all H units
            stats_wait(flags, n_slices, stage, error_ptr, max_spins, BARRIER, BLOCK_FLAGS, FAULT)
            sum_e, sum_ex = summed_partials(r_moments, lanes, n_slices, rows, row_ok)
            rstd = tl.load(stats_ptr + (step * D + direction) * 2, mask=row_ok[None, :], other=0.0)
            row_offs = step * (D * 4 * H) + direction * 4 * H + w_rows[:, None]
            r_hat = tl.load(r_hat_ptr + row_offs, mask=rows_ok, other=0.0).to(tl.float32)
            e = tl.load(e_ptr + own_rows, mask=rows_ok, other=0.0)
            d_r = tl.where(rows_ok, rstd * (e - (sum_e / (4 * H))[None, :] - r_hat * (sum_ex / (4 * H))[None, :]), 0.0)
            tl.store(d_r_ptr + row_offs, d_r.to(d_r_ptr.dtype.element_ty), mask=rows_ok)
            partial = weight_product(tl.trans(w), d_r.to(w.dtype), INPUT_PRECISION)  # (BLOCK_K, BLOCK_B)
            publish(partial, dh_partial_ptr + piece * partial_stride + state_rows * H + cols_k[:, None], k_ok[:, None] & row_ok[None, :],
                    own_flag, stage, piece, 0, BARRIER, FAULT, 1)


# --------------------------------------------------------------------- LayerNormGRU, persistent


@triton.jit
def gate_slice_moments(a, b, c, ok, count):
    """This program's partial of a row's recurrent-norm moments over its slice of all three gate
    blocks ``a, b, c`` (fp32 ``(BLOCK_S, BLOCK_B)`` units x rows, ``ok`` the real entries,
    ``count`` real units per block): each block's :func:`slice_moments`, merged pairwise by
    :func:`merged_moments`. ``(sum, centred sum of squares)`` per batch row, ``(BLOCK_B,)``."""
    n = count.to(tl.float32)
    total, square = slice_moments(a, ok, n)
    block_total, block_square = slice_moments(b, ok, n)
    total, square = merged_moments(total, square, n, block_total, block_square, n)
    block_total, block_square = slice_moments(c, ok, n)
    return merged_moments(total, square, 2.0 * n, block_total, block_square, n)


@triton.jit
def normalised_slice(pre_ptr, own_pre, q: tl.constexpr, H, mean, rstd, ok):
    """Gate ``q``'s block of this program's raw products (``pre``, fp32, its own units x rows)
    normalised with the rows' combined ``mean``, ``rstd`` ``(BLOCK_B,)``; zero outside ``ok``."""
    pre = tl.load(pre_ptr + own_pre + q * H, mask=ok, other=0.0)
    return tl.where(ok, (pre - mean[None, :]) * rstd[None, :], 0.0)


@triton.jit(do_not_specialize=["phase_begin", "phase_end", "T"])
def layer_norm_gru_fwd_persistent_kernel(
    ax_ptr, w_hh_ptr, gain_hh_ptr, b_hh_ptr, h0_ptr, lengths_ptr, keep_ptr,
    y_ptr, h_n_ptr, gates_ptr, r_hat_ptr, stats_ptr,
    h_exchange_ptr, r_moments_ptr, pre_ptr,
    flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, D, zoneout_p,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """The persistent LayerNormGRU forward: the plain GRU's persistent partition and product
    (``fastrnn.kernels.gru.gru_fwd_persistent_kernel``; ``fastrnn.ops.persistent``'s plan for 3
    gates): program ``(s, g, d)`` holds the r, z and n rows of direction ``d``'s ``W_hh`` for its
    ``SLICE`` units (:func:`gru_slice_weights`, on chip for the whole launch) and computes those
    units for the batch rows ``g*BLOCK_B ...``, its state transposed (units x rows). It takes the
    resident forward's arguments and writes what it writes (``y``, ``h_n``, the saved ``gates``
    ``r, z, n, b_n``, ``r_hat``, ``stats``; same layouts), so the resident and tiled backward
    kernels take its output as their own.

    A row's recurrent norm spans all ``3H`` products, every program's slice, so a step is two
    phases, each ending in an arrive (``fastrnn.kernels.sync``; phase ``p = 2*i + k`` of walk step
    ``i``, flags count phases done):

    0. wait for ``h_{t-1}`` (flags ``>= p``; the walk's first step reads ``h0``), gather all of it
       for the group's rows, ``gh_q = W_slice_q h_{t-1}`` for the three gates (into ``pre``);
       publish the slice's moments over its ``3*SLICE`` products (:func:`gate_slice_moments`).
    1. wait (``>= p``), combine every slice's moments over ``3H`` (:func:`combined_moments`):
       ``rhat``, ``b_t = rhat * gain_hh + b_hh``, the gates (``gru_gates``: the reset gate
       multiplies the normalised ``b_n``, as the resident kernel's), zoneout, lengths; publish
       the slice's units of ``h_t``.

    Two exchange rounds per step, the fewest: the moments need every slice's products, which need
    all of ``h_{t-1}`` (one round each; ``var(r)`` is the quadratic form ``h^T W_hh^T W_hh h``, not
    local without the ``H x H`` Gram matrix in every program: the LayerNormLSTM forward's
    argument), and once ``rhat`` is known a GRU step has no second norm: every unit's update is
    local. (The LayerNormLSTM takes a third, for its cell norm.) The moments' buffer is reused
    step after step without a ping-pong: a program writes the next step's partials only after a
    wait that every program passes only after reading this step's; ``h`` keeps its ping-pong
    (``fastrnn.kernels.sync``, point 3).

    Numerics: the products are the resident kernel's (``h`` cast to the weights' dtype, fp32
    accumulation), the moments combined centred (:func:`combined_moments`); ``h`` is exchanged
    in fp32, as the resident kernel keeps it in registers.

    Scratch (fp32, per launch; ``fastrnn.ops.layer_norm_rnn.layer_norm_gru_fwd``): ``h_exchange
    (2, D, B, H)`` the ping-pong of ``h`` (step ``i`` reads slot ``i % 2``); ``r_moments (D, B,
    slices, 2)`` the published partials; this program's own, a phase apart: ``pre (D, B, 3H)``
    the raw products. ``BLOCK_K >= H``, ``BLOCK_FLAGS >= slices``; ``SPLIT_K`` (16-bit) the
    product's ``k`` side in chunks, as the plain GRU's. ``FAULT``: ``fastrnn.kernels.sync``'s, and
    :data:`FAULT_NO_STATS_WAIT` skips the wait before the moments are combined."""
    direction, piece, units, unit_ok, rows, rows64, row_ok, ks, k_ok, tile_ok = persistent_tile(B, H, SLICE, BLOCK_S, BLOCK_K, BLOCK_B)
    flags, own_flag = group_flags(flags_ptr, tl.num_programs(0), BLOCK_FLAGS)
    n_slices = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK_FLAGS)
    d64 = direction.to(tl.int64)
    SPLIT: tl.constexpr = 8 if BLOCK_K >= 128 else BLOCK_K // 16  # as the plain GRU's
    CHUNK: tl.constexpr = BLOCK_K // SPLIT
    w_r, w_z, w_n = gru_slice_weights(w_hh_ptr + d64 * 3 * H * H, H, units, unit_ok, ks, k_ok, False, SPLIT_K, SPLIT, CHUNK)
    gain = gain_hh_ptr + d64 * 3 * H + units
    bias = b_hh_ptr + d64 * 3 * H + units
    gain_r = tl.load(gain, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    gain_z = tl.load(gain + H, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    gain_n = tl.load(gain + 2 * H, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    bias_r = tl.load(bias, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    bias_z = tl.load(bias + H, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    bias_n = tl.load(bias + 2 * H, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    state_rows = (d64 * B + rows64)[None, :]  # (1, BLOCK_B): this program's rows of a (D, B, .) buffer
    own = state_rows * H + units[:, None]  # its units x rows of a (D, B, H) buffer
    own_pre = state_rows * (3 * H) + units[:, None]  # ... and of a (D, B, 3H) one, gate r
    moments_at = ((d64 * B + rows64) * n_slices + piece)[None, :] * 2  # (1, BLOCK_B)
    r_moments = r_moments_ptr + d64 * B * n_slices * 2
    count = tl.minimum(SLICE, H - piece * SLICE)  # real units of this slice
    h_slot = D * B * H

    for stage in range(phase_begin, phase_end):
        s = stage // 2
        t = step_time(s, T, direction).to(tl.int64)
        step = (t * B + rows64)[None, :]
        h_read = h_exchange_ptr + (s % 2) * h_slot
        if stage % 2 == 0:  # the products of the slice's rows with all of h_{t-1}; their moments
            if BARRIER:
                if s > 0:
                    wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
            if s == 0:
                h_all = gather_rows(h0_ptr + d64 * B * H, H, rows64, row_ok, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
            else:
                h_all = gather_rows(h_read + d64 * B * H, H, rows64, row_ok, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
            gh_r = tl.trans(slice_product(h_all, w_r, INPUT_PRECISION, SPLIT_K))
            gh_z = tl.trans(slice_product(h_all, w_z, INPUT_PRECISION, SPLIT_K))
            gh_n = tl.trans(slice_product(h_all, w_n, INPUT_PRECISION, SPLIT_K))
            store_gates(pre_ptr, own_pre, H, tile_ok, gh_r, gh_z, gh_n)
            total, square = gate_slice_moments(gh_r, gh_z, gh_n, tile_ok, count)
            tl.store(r_moments_ptr + moments_at + 1, square[None, :], mask=row_ok[None, :])
            publish(total[None, :], r_moments_ptr + moments_at, row_ok[None, :], own_flag, stage, piece, 0, BARRIER, FAULT, 1)
        else:  # the recurrent norm over all 3H, the gates, h_t; zoneout and lengths; publish h_t
            stats_wait(flags, n_slices, stage, error_ptr, max_spins, BARRIER, BLOCK_FLAGS, FAULT)
            mean, rstd = combined_moments(r_moments, lanes, n_slices, SLICE, H, 3, 3 * H, B, rows, row_ok)
            r_r = normalised_slice(pre_ptr, own_pre, 0, H, mean, rstd, tile_ok)
            r_z = normalised_slice(pre_ptr, own_pre, 1, H, mean, rstd, tile_ok)
            r_n = normalised_slice(pre_ptr, own_pre, 2, H, mean, rstd, tile_ok)
            g_offs = step * (D * 3 * H) + direction * 3 * H + units[:, None]
            u_offs = step * (D * H) + direction * H + units[:, None]
            h = walk_state(h0_ptr + state_rows * H, h_read + state_rows * H, s, units[:, None], tile_ok)
            b_n = r_n * gain_n + bias_n
            r, z, n, h_new = gru_gates(
                load_gate(ax_ptr, g_offs, 0, H, tile_ok), load_gate(ax_ptr, g_offs, 1, H, tile_ok), load_gate(ax_ptr, g_offs, 2, H, tile_ok),
                r_r * gain_r + bias_r, r_z * gain_z + bias_z, b_n, h,
            )
            if ZONEOUT != 0:
                keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
                h_new = keep * h + (1.0 - keep) * h_new
            if HAS_LENGTHS:
                live = (t < length)[None, :]
                out = tl.where(live, h_new, 0.0)
                h = tl.where(live, h_new, h)
            else:
                out = h_new
                h = h_new
            tl.store(y_ptr + u_offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
            store_gates(gates_ptr, step * (D * 4 * H) + direction * 4 * H + units[:, None], H, tile_ok, r, z, n, b_n)
            store_gates(r_hat_ptr, g_offs, H, tile_ok, r_r, r_z, r_n)
            if piece == 0:
                tl.store(stats_ptr + step * D + direction, rstd[None, :], mask=row_ok[None, :])
            if s == T - 1:
                tl.store(h_n_ptr + own, h.to(h_n_ptr.dtype.element_ty), mask=tile_ok)
            publish(h, h_exchange_ptr + ((s + 1) % 2) * h_slot + own, tile_ok, own_flag, stage, piece, 0, BARRIER, FAULT, 1)


@triton.jit(do_not_specialize=["phase_begin", "phase_end", "T"])
def layer_norm_gru_bwd_persistent_kernel(
    dy_ptr, dh_n_ptr, y_ptr, gates_ptr, r_hat_ptr, stats_ptr, h0_ptr, keep_ptr, w_hh_ptr, gain_hh_ptr, lengths_ptr,
    d_ax_ptr, d_r_ptr, dh0_ptr, d_norm_ptr, flow_ptr,
    e_ptr, e_moments_ptr, carry_ptr,
    flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, D, zoneout_p, grad_clip,
    HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """The persistent LayerNormGRU backward: the plain GRU's persistent backward partition
    (``fastrnn.kernels.gru.gru_bwd_persistent_kernel``: program ``(s, g, d)`` holds the columns of
    direction ``d``'s ``W_hh`` of its ``SLICE`` units, all three gates, :func:`gru_slice_weights`),
    the forward's walk reversed, the math of :func:`layer_norm_gru_bwd_kernel`; it reads what every
    LayerNormGRU forward saves and writes what the resident backward writes. Two phases per step and
    one more at the end (``2T + 1``; phase ``p = 2*i + k`` of walk step ``i``, flags count phases done):

    0. wait (``i > 0``), ``dh`` of the slice's units = its carried part + ``d_r W_hh[:, units]``
       of the step before (the forward's step after: all ``3H`` of ``d_r`` gathered, the all-gather
       of the plain GRU's backward, through ``d_r`` itself); ``dh_t = dy_t + dh``, the flow share,
       zoneout's split, ``gru_gates_grad`` (``d_ax``), the norm parameters' sums, ``e = d_b *
       gain_hh``; publish the slice's ``sum e``, ``sum e * rhat``. (Phase ``2T``: only ``dh``;
       store ``dh0``.)
    1. wait, ``d_r = rstd (e - mean(e) - rhat mean(e rhat))`` from the means over ``3H``; publish
       the slice's units of ``d_r`` (stored in ``d_r``, the gathered operand of the next phase 0).

    Two rounds per step, the fewest: the norm's backward needs a row's two means over every slice,
    and ``dh_{t-1}`` needs every slice's ``d_r``. The means are plain sums (no cancellation). The
    moments' buffer is reused without a ping-pong (a program writes the next step's partials only
    after a wait every program passes only after reading this step's); ``d_r`` of each step has
    its own place in the output. ``d_norm (D, cdiv(B, BLOCK_B), 6, H)`` fp32, zeroed by the
    launcher: each program adds its units' sums over its rows, step by step (its entries are its
    own). ``flow`` (``RECORD_FLOW``): ``(n_slices, D, T, B)`` fp32, this program's share of
    ``||dL/dh_t||^2`` in plane ``s``. Scratch (fp32), the program's own, a phase apart: ``e (D, B,
    3H)``, ``carry (D, B, H)`` the carried part of ``dh`` (the gates' direct part and zoneout's, or
    all of it past a row's length); ``e_moments (D, B, slices, 2)`` the published partials."""
    direction, piece, units, unit_ok, rows, rows64, row_ok, ks, k_ok, tile_ok = persistent_tile(B, H, SLICE, BLOCK_S, BLOCK_K, BLOCK_B)
    flags, own_flag = group_flags(flags_ptr, tl.num_programs(0), BLOCK_FLAGS)
    n_slices = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK_FLAGS)
    d64 = direction.to(tl.int64)
    SPLIT: tl.constexpr = 8 if BLOCK_K >= 128 else BLOCK_K // 16  # as the plain GRU's
    CHUNK: tl.constexpr = BLOCK_K // SPLIT
    w_r, w_z, w_n = gru_slice_weights(w_hh_ptr + d64 * 3 * H * H, H, units, unit_ok, ks, k_ok, True, SPLIT_K, SPLIT, CHUNK)
    gain = gain_hh_ptr + d64 * 3 * H + units
    gain_r = tl.load(gain, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    gain_z = tl.load(gain + H, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    gain_n = tl.load(gain + 2 * H, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
    state_rows = (d64 * B + rows64)[None, :]
    own = state_rows * H + units[:, None]
    own_e = state_rows * (3 * H) + units[:, None]
    moments_at = ((d64 * B + rows64) * n_slices + piece)[None, :] * 2
    e_moments = e_moments_ptr + d64 * B * n_slices * 2
    norm_plane = d_norm_ptr + ((direction * tl.num_programs(1) + tl.program_id(1)) * 6).to(tl.int64) * H + units
    g_stride = D * 3 * H  # elements between consecutive batch rows of d_r
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)[None, :]
    else:
        length = T

    for stage in range(phase_begin, phase_end):
        i = stage // 2
        t = step_time(tl.minimum(i, T - 1), T, 1 - direction).to(tl.int64)
        step = (t * B + rows64)[None, :]
        g_offs = step * g_stride + direction * 3 * H + units[:, None]
        u_offs = step * (D * H) + direction * H + units[:, None]
        if HAS_LENGTHS:
            valid = (t < length) & row_ok[None, :]
        else:
            valid = row_ok[None, :]
        if stage % 2 == 0:  # dh; the gate gradients, e and its sums over the slice
            if i == 0:
                dh = tl.load(dh_n_ptr + own, mask=tile_ok, other=0.0).to(tl.float32)
            else:
                dh = tl.load(carry_ptr + own, mask=tile_ok, other=0.0)
                if BARRIER:
                    wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
                t_after = step_time(i - 1, T, 1 - direction).to(tl.int64)  # the step the forward took after t
                gathered = d_r_ptr + t_after * B * g_stride + direction * 3 * H
                d_r_r = gather_rows(gathered, g_stride, rows64, row_ok, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
                d_r_z = gather_rows(gathered + H, g_stride, rows64, row_ok, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
                d_r_n = gather_rows(gathered + 2 * H, g_stride, rows64, row_ok, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
                acc = tl.dot(d_r_r, w_r, input_precision=INPUT_PRECISION)
                acc += tl.dot(d_r_z, w_z, input_precision=INPUT_PRECISION)
                acc += tl.dot(d_r_n, w_n, input_precision=INPUT_PRECISION)
                if SPLIT_K:  # the chunks' partial products summed once (split_product's reduction)
                    acc = tl.sum(acc, axis=0)
                dh += tl.trans(acc)
            if i == T:
                tl.store(dh0_ptr + own, dh.to(dh0_ptr.dtype.element_ty), mask=tile_ok)
            else:
                d_state = step_grad(dy_ptr, u_offs, dh, valid, tile_ok)
                if RECORD_FLOW:
                    share = tl.sum(tl.where(tile_ok, d_state * d_state, 0.0), axis=0)
                    tl.store(flow_ptr + ((piece * D + direction) * T + t) * B + rows64, share, mask=row_ok)
                if ZONEOUT != 0:  # the kept part goes straight to dh_{t-1}
                    keep = zoneout_keep(keep_ptr, u_offs, tile_ok, zoneout_p, ZONEOUT)
                    d_h_new = (1.0 - keep) * d_state
                    kept = keep * d_state
                else:
                    d_h_new = d_state
                    kept = tl.zeros_like(d_state)
                t_read = t - 1 + 2 * direction  # the state step t read: y there, h0 where a row's walk starts
                start = (t_read < 0) | (t_read >= length)
                t_read = tl.minimum(tl.maximum(t_read, 0), T - 1)
                h_prev = tl.load(y_ptr + (t_read * B + rows64)[None, :] * (D * H) + direction * H + units[:, None], mask=tile_ok,
                                 other=0.0).to(tl.float32)
                h_prev = tl.where(start, tl.load(h0_ptr + own, mask=tile_ok, other=0.0).to(tl.float32), h_prev)
                saved_offs = step * (D * 4 * H) + direction * 4 * H + units[:, None]
                dr_pre, dz_pre, dn_pre, db_n, direct = gru_gates_grad(
                    d_h_new, h_prev, load_gate(gates_ptr, saved_offs, 0, H, tile_ok), load_gate(gates_ptr, saved_offs, 1, H, tile_ok),
                    load_gate(gates_ptr, saved_offs, 2, H, tile_ok), load_gate(gates_ptr, saved_offs, 3, H, tile_ok), grad_clip, CLIP)
                store_gates(d_ax_ptr, g_offs, H, tile_ok, dr_pre, dz_pre, dn_pre)
                tl.store(carry_ptr + own, tl.where(valid, direct + kept, dh), mask=tile_ok)  # dh_{t-1}'s own part
                # d_b = (dr_pre, dz_pre, db_n) reaches b_hh as is, and gain_hh through rhat
                r_r = load_gate(r_hat_ptr, g_offs, 0, H, tile_ok)
                r_z = load_gate(r_hat_ptr, g_offs, 1, H, tile_ok)
                r_n = load_gate(r_hat_ptr, g_offs, 2, H, tile_ok)
                accumulate(norm_plane, tl.sum(dr_pre * r_r, axis=1), unit_ok)
                accumulate(norm_plane + H, tl.sum(dz_pre * r_z, axis=1), unit_ok)
                accumulate(norm_plane + 2 * H, tl.sum(db_n * r_n, axis=1), unit_ok)
                accumulate(norm_plane + 3 * H, tl.sum(dr_pre, axis=1), unit_ok)
                accumulate(norm_plane + 4 * H, tl.sum(dz_pre, axis=1), unit_ok)
                accumulate(norm_plane + 5 * H, tl.sum(db_n, axis=1), unit_ok)
                e_r = tl.where(tile_ok, dr_pre * gain_r, 0.0)
                e_z = tl.where(tile_ok, dz_pre * gain_z, 0.0)
                e_n = tl.where(tile_ok, db_n * gain_n, 0.0)
                store_gates(e_ptr, own_e, H, tile_ok, e_r, e_z, e_n)
                e_x = tl.sum(e_r * r_r + e_z * r_z + e_n * r_n, axis=0)
                tl.store(e_moments_ptr + moments_at + 1, e_x[None, :], mask=row_ok[None, :])
                publish(tl.sum(e_r + e_z + e_n, axis=0)[None, :], e_moments_ptr + moments_at, row_ok[None, :], own_flag, stage, piece, 0,
                        BARRIER, FAULT, 1)
        else:  # d_r from the means over 3H; publish the slice's units of it
            stats_wait(flags, n_slices, stage, error_ptr, max_spins, BARRIER, BLOCK_FLAGS, FAULT)
            sum_e, sum_ex = summed_partials(e_moments, lanes, n_slices, rows, row_ok)
            mean_e = (sum_e / (3 * H))[None, :]
            mean_ex = (sum_ex / (3 * H))[None, :]
            rstd = tl.load(stats_ptr + step * D + direction, mask=row_ok[None, :], other=0.0)
            d_r_r = tl.where(tile_ok, rstd * (load_gate(e_ptr, own_e, 0, H, tile_ok) - mean_e
                                              - load_gate(r_hat_ptr, g_offs, 0, H, tile_ok) * mean_ex), 0.0)
            d_r_z = tl.where(tile_ok, rstd * (load_gate(e_ptr, own_e, 1, H, tile_ok) - mean_e
                                              - load_gate(r_hat_ptr, g_offs, 1, H, tile_ok) * mean_ex), 0.0)
            d_r_n = tl.where(tile_ok, rstd * (load_gate(e_ptr, own_e, 2, H, tile_ok) - mean_e
                                              - load_gate(r_hat_ptr, g_offs, 2, H, tile_ok) * mean_ex), 0.0)
            store_gate(d_r_ptr, g_offs, 0, H, d_r_r, tile_ok)
            store_gate(d_r_ptr, g_offs, 1, H, d_r_z, tile_ok)
            publish(d_r_n, d_r_ptr + g_offs + 2 * H, tile_ok, own_flag, stage, piece, 0, BARRIER, FAULT, 1)
