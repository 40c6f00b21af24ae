"""GRU kernels: the whole sequence of one layer (every direction) in one launch, forward and backward.

PyTorch's convention, gate order ``(r, z, n)``::

    gx = x W_ih^T + b_ih                       (every step, every direction: one GEMM before the launch)
    gh = h W_hh^T + b_hh                       (in the kernel, per step)
    r  = sigmoid(gx_r + gh_r)
    z  = sigmoid(gx_z + gh_z)
    n  = tanh(gx_n + r * gh_n)                 (b_hn stays inside the reset product)
    h' = (1 - z) * n + z * h

Layouts (contiguous; ``D`` directions, direction ``d``'s gate ``g`` unit ``j`` at feature
``d*G*H + g*H + j``):

* ``gx``, ``dgx``, ``dgh``: ``(T, B, D*3H)``, ``gx`` the output of one ``F.linear`` with the
  directions' ``W_ih`` stacked. ``dgx`` is the gradient of the pre-activations' input part
  ``[dr_pre, dz_pre, dn_pre]``; ``dgh`` that of ``gh``: ``[dr_pre, dz_pre, dn_pre * r]`` (what
  ``dW_hh = sum_t dgh_t^T h_{t-1}`` and ``db_hh`` are taken of, on the host).
* ``y``, ``dy``: ``(T, B, D*H)``, the layer's output (direction ``d`` in features ``d*H:(d+1)*H``).
* ``saved``: ``(T, B, D*4H)``, written by the forward for the backward: ``[r, z, n, gh_n]`` of
  every step, ``gh_n = W_hn h + b_hn``, in the dtype of ``gx`` (``4H`` values per row per step and
  direction: 16H bytes in fp32, 8H bytes in fp16/bf16). The state each step read is not saved:
  the backward reads it from ``y`` at the neighbouring step (``h0`` where a row's walk starts).
* ``w_hh``: ``(D, 3H, H)``, ``w_hh[d, g*H + n, k]`` weighs input unit ``k`` into gate ``g``'s unit ``n``.
* ``b_hh``: ``(D, 3H)`` (only read when ``HAS_BIAS``; any pointer otherwise).
* ``h0``, ``h_n``, ``dh_n``, ``dh0``: ``(D, B, H)``. ``lengths``: ``(B,)`` int32 (only read when
  ``HAS_LENGTHS``).
* ``state`` (tiled only): fp32 scratch ``(2, D, B, H)``, a ping-pong buffer.
* ``flow``: ``(D, T, B)`` fp32, written by the backward when ``RECORD_FLOW``: per row and step,
  ``||dL/dh_t||^2`` (``dy_t`` plus the carried gradient), zero past a row's length.
* ``grad_clip``: with ``CLIP``, the gate pre-activation gradients ``dr_pre, dz_pre, dn_pre`` are
  clamped to ``[-grad_clip, grad_clip]`` before they flow anywhere (``dgh_n = clamp(dn_pre) * r``).
* Zoneout (resident and persistent kernels; ``ZONEOUT`` constexpr, 0 compiles them as without
  it): 1 training, ``keep (T, B, D*H)`` compute dtype, the 0/1 mask of :mod:`fastrnn.regularization`
  (the layout of ``y``); 2 eval, the scalar ``zoneout_p`` (fp32) in its place. The state is
  ``h_t = keep * h_{t-1} + (1 - keep) * h'`` (``y`` holds it, and the persistent kernels exchange
  it; ``saved`` is unchanged, the backward reads ``h_{t-1}`` from ``y`` as before). The backward's
  gates see ``(1 - keep) * dh_t`` and ``keep * dh_t`` passes straight to ``dh_{t-1}`` (elementwise:
  a persistent program's own units). Past a row's length nothing is mixed.

Grid: ``(cdiv(B, BLOCK_B), D)``; program ``(i, d)`` owns batch rows ``i*BLOCK_B ...`` of
direction ``d``. Direction 1 walks time backwards; a row past its length keeps its state and
writes zero output, so the reverse direction starts each row at its own last valid step. In the
backward such steps pass ``dh`` through unchanged and write zero gradients.

Three strategies (chosen by the launcher, ``fastrnn.ops.gru``, via ``plan(3, H, dtype)``):

* ``*_resident``: the three ``H x H`` blocks of ``W_hh`` (r, z, n) are loaded on chip once
  (``BLOCK_H >= H``) and the fp32 state stays in registers for the whole sequence.
* ``*_tiled``: ``W_hh`` is re-read per step in ``BLOCK_H x BLOCK_H`` tiles; the fp32 state (or
  state gradient) lives in the ping-pong buffer ``state``, with a barrier between phases.
* ``*_persistent``: ``W_hh`` split by hidden units over a grid ``(slices, batch_groups, D)``
  (``fastrnn.ops.persistent``): each program keeps the r, z and n rows of its units on chip and
  exchanges state with the other programs of its group every step (``fastrnn.kernels.sync``).
"""

import triton
import triton.language as tl

from fastrnn.kernels.activations import sigmoid, tanh
from fastrnn.kernels.recurrence import (
    advance_state,
    clamp_grad,
    copy_rows,
    group_flags,
    gather_rows,
    load_rows,
    load_weight_split,
    persistent_tile,
    program_tile,
    row_lengths,
    squared_row_norm,
    slice_product,
    step_time,
)
from fastrnn.kernels.sync import FAULT_ARRIVE_EARLY, arrive, wait
from fastrnn.kernels.zoneout import zoneout_keep


@triton.jit
def gru_gates(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h):
    """One GRU step on fp32 tiles (``gh_*`` include ``b_hh``): returns ``r, z, n, h'``."""
    r = sigmoid(gx_r + gh_r)
    z = sigmoid(gx_z + gh_z)
    n = tanh(gx_n + r * gh_n)
    return r, z, n, (1.0 - z) * n + z * h


@triton.jit
def gru_gates_grad(dh, h_prev, r, z, n, gh_n, grad_clip, CLIP: tl.constexpr):
    """Backward of one GRU step given ``dh``, the total gradient into ``h'`` (gate gradients
    clamped to ``[-grad_clip, grad_clip]`` with ``CLIP``).

    Returns ``dr_pre, dz_pre, dn_pre`` (gradient of the gate pre-activations), ``dgh_n = dn_pre * r``
    (of ``gh_n``) and ``dh * z``, the direct part of the gradient to ``h_prev``
    (``dh_prev = dh * z + dgh @ W_hh``)."""
    dn_pre = dh * (1.0 - z) * (1.0 - n * n)
    dz_pre = dh * (h_prev - n) * z * (1.0 - z)
    if CLIP:  # dn_pre is clamped before it reaches r, as a hook on n's pre-activation does
        dn_pre = clamp_grad(dn_pre, grad_clip)
        dz_pre = clamp_grad(dz_pre, grad_clip)
    dr_pre = dn_pre * gh_n * r * (1.0 - r)
    if CLIP:
        dr_pre = clamp_grad(dr_pre, grad_clip)
    return dr_pre, dz_pre, dn_pre, dn_pre * r, dh * z


@triton.jit
def _previous_time(t, direction, T, length, HAS_LENGTHS: tl.constexpr):
    """Where the state step ``t`` read sits in ``y``: ``(t_prev, start)``; ``start`` is True where
    the step read ``h0`` instead (a row's first step: ``t == 0`` forward; ``t + 1 == length`` or
    ``T`` reverse). ``t_prev`` is clamped into ``[0, T)`` so the load is always in bounds."""
    t_prev = t - 1 + 2 * direction
    if HAS_LENGTHS:
        start = ((t_prev < 0) | (t_prev >= length))[:, None]
    else:
        start = (t_prev < 0) | (t_prev >= T)
    t_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1)
    return t_prev, start


@triton.jit(do_not_specialize=["T"])
def gru_fwd_resident_kernel(
    gx_ptr, w_hh_ptr, b_hh_ptr, h0_ptr, lengths_ptr, y_ptr, h_n_ptr, saved_ptr,
    T, B, H, D,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    keep_ptr=None, zoneout_p=None, ZONEOUT: tl.constexpr = 0,
):
    """Forward, ``W_hh`` on chip. Writes ``y (T, B, D*H)``, ``h_n (D, B, H)``, ``saved (T, B, D*4H)``."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = program_tile(B, H, BLOCK_B, BLOCK_H)

    # w_*_t[k, n] = W_hh[d, g*H + n, k]: gate g's recurrent product is h @ w_g_t.
    w_base = w_hh_ptr + direction.to(tl.int64) * 3 * H * H
    w_offs = cols[None, :] * H + cols[:, None]
    w_ok = col_ok[:, None] & col_ok[None, :]
    w_r_t = tl.load(w_base + w_offs, mask=w_ok, other=0.0)
    w_z_t = tl.load(w_base + H * H + w_offs, mask=w_ok, other=0.0)
    w_n_t = tl.load(w_base + 2 * H * H + w_offs, mask=w_ok, other=0.0)
    if HAS_BIAS:
        b_base = b_hh_ptr + direction * 3 * H + cols
        b_r = tl.load(b_base, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        b_z = tl.load(b_base + H, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        b_n = tl.load(b_base + 2 * H, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        row_t = (t * B + rows64)[:, None]
        gx_offs = row_t * (D * 3 * H) + direction * 3 * H + cols[None, :]
        gx_r = tl.load(gx_ptr + gx_offs, mask=tile_ok, other=0.0).to(tl.float32)
        gx_z = tl.load(gx_ptr + gx_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
        gx_n = tl.load(gx_ptr + gx_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
        h_w = h.to(w_r_t.dtype)
        gh_r = tl.dot(h_w, w_r_t, input_precision=INPUT_PRECISION)
        gh_z = tl.dot(h_w, w_z_t, input_precision=INPUT_PRECISION)
        gh_n = tl.dot(h_w, w_n_t, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            gh_r += b_r
            gh_z += b_z
            gh_n += b_n
        r, z, n, h_new = gru_gates(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h)

        saved_offs = row_t * (D * 4 * H) + direction * 4 * H + cols[None, :]
        tl.store(saved_ptr + saved_offs, r.to(saved_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(saved_ptr + saved_offs + H, z.to(saved_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(saved_ptr + saved_offs + 2 * H, n.to(saved_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(saved_ptr + saved_offs + 3 * H, gh_n.to(saved_ptr.dtype.element_ty), mask=tile_ok)
        y_offs = row_t * (D * H) + direction * H + cols[None, :]
        if ZONEOUT != 0:
            keep = zoneout_keep(keep_ptr, y_offs, tile_ok, zoneout_p, ZONEOUT)
            h_new = keep * h + (1.0 - keep) * h_new
        h, out = advance_state(h_new, h, t, length, HAS_LENGTHS)
        tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(h_n_ptr + state_offs, h.to(h_n_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["T"])
def gru_bwd_resident_kernel(
    dy_ptr, dh_n_ptr, y_ptr, h0_ptr, saved_ptr, w_hh_ptr, lengths_ptr, dgx_ptr, dgh_ptr, dh0_ptr, flow_ptr,
    T, B, H, D, grad_clip,
    HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    keep_ptr=None, zoneout_p=None, ZONEOUT: tl.constexpr = 0,
):
    """Backward through time, ``W_hh`` on chip. Writes ``dgx``, ``dgh (T, B, D*3H)`` and ``dh0 (D, B, H)``.

    Per step: ``dh = dy_t + carried``; the gate gradients from ``saved``; the carried gradient
    becomes ``dh * z + dgh @ W_hh`` (fp32 registers). Steps past a row's length pass the carried
    gradient through unchanged and write zero gradients. With ``ZONEOUT`` the gates see
    ``(1 - keep) * dh`` and ``keep * dh`` passes straight to the previous state."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = program_tile(B, H, BLOCK_B, BLOCK_H)

    # w_g[n, k] = W_hh[d, g*H + n, k]: the gradient to the previous state is dgh_g @ w_g.
    w_base = w_hh_ptr + direction.to(tl.int64) * 3 * H * H
    w_offs = cols[:, None] * H + cols[None, :]
    w_ok = col_ok[:, None] & col_ok[None, :]
    w_r = tl.load(w_base + w_offs, mask=w_ok, other=0.0)
    w_z = tl.load(w_base + H * H + w_offs, mask=w_ok, other=0.0)
    w_n = tl.load(w_base + 2 * H * H + w_offs, mask=w_ok, other=0.0)

    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    dh = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    h0 = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = T
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    for s in range(T):
        # The reverse of the forward walk: forward direction from T-1 down, reverse from 0 up.
        t = step_time(s, T, 1 - direction).to(tl.int64)
        row_t = (t * B + rows64)[:, None]
        y_offs = row_t * (D * H) + direction * H + cols[None, :]
        saved_offs = row_t * (D * 4 * H) + direction * 4 * H + cols[None, :]
        g_offs = row_t * (D * 3 * H) + direction * 3 * H + cols[None, :]

        t_prev, start = _previous_time(t, direction, T, length, HAS_LENGTHS)
        prev_offs = (t_prev * B + rows64)[:, None] * (D * H) + direction * H + cols[None, :]
        h_prev = tl.load(y_ptr + prev_offs, mask=tile_ok, other=0.0).to(tl.float32)
        h_prev = tl.where(start, h0, h_prev)

        dh_total = dh + tl.load(dy_ptr + y_offs, mask=tile_ok, other=0.0).to(tl.float32)
        r = tl.load(saved_ptr + saved_offs, mask=tile_ok, other=0.0).to(tl.float32)
        z = tl.load(saved_ptr + saved_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
        n = tl.load(saved_ptr + saved_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
        gh_n = tl.load(saved_ptr + saved_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
        if ZONEOUT != 0:
            keep = zoneout_keep(keep_ptr, y_offs, tile_ok, zoneout_p, ZONEOUT)
            dr_pre, dz_pre, dn_pre, dgh_n, direct = gru_gates_grad((1.0 - keep) * dh_total, h_prev, r, z, n, gh_n, grad_clip, CLIP)
            direct += keep * dh_total
        else:
            dr_pre, dz_pre, dn_pre, dgh_n, direct = gru_gates_grad(dh_total, h_prev, r, z, n, gh_n, grad_clip, CLIP)
        if RECORD_FLOW:
            if HAS_LENGTHS:
                flow = squared_row_norm(dh_total, (t < length)[:, None])
            else:
                flow = squared_row_norm(dh_total, row_ok[:, None])
            tl.store(flow_ptr + (direction * T + t) * B + rows64, flow, mask=row_ok)
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
            dr_pre = tl.where(valid, dr_pre, 0.0)
            dz_pre = tl.where(valid, dz_pre, 0.0)
            dn_pre = tl.where(valid, dn_pre, 0.0)
            dgh_n = tl.where(valid, dgh_n, 0.0)
            direct = tl.where(valid, direct, dh)
        dh = direct
        dh += tl.dot(dr_pre.to(w_r.dtype), w_r, input_precision=INPUT_PRECISION)
        dh += tl.dot(dz_pre.to(w_z.dtype), w_z, input_precision=INPUT_PRECISION)
        dh += tl.dot(dgh_n.to(w_n.dtype), w_n, input_precision=INPUT_PRECISION)

        tl.store(dgx_ptr + g_offs, dr_pre.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dgx_ptr + g_offs + H, dz_pre.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dgx_ptr + g_offs + 2 * H, dn_pre.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dgh_ptr + g_offs, dr_pre.to(dgh_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dgh_ptr + g_offs + H, dz_pre.to(dgh_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(dgh_ptr + g_offs + 2 * H, dgh_n.to(dgh_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def _tiled_product(h_ptr, w_ptr, row_ok, cols_n, H, INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """``h @ W[cols_n, :]^T`` for one gate, ``h`` (fp32 rows of ``H`` at ``h_ptr``) and that gate's
    ``(H, H)`` block of ``W_hh`` (at ``w_ptr``) both read ``BLOCK_H`` columns at a time."""
    n_ok = cols_n < H
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        cols_k = k0 + tl.arange(0, BLOCK_H)
        k_ok = cols_k < H
        h_k = tl.load(h_ptr + cols_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_t = tl.load(w_ptr + cols_n[None, :] * H + cols_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(h_k.to(w_t.dtype), w_t, input_precision=INPUT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["T"])
def gru_fwd_tiled_kernel(
    gx_ptr, w_hh_ptr, b_hh_ptr, h0_ptr, lengths_ptr, y_ptr, h_n_ptr, saved_ptr, state_ptr,
    T, B, H, D,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward for any ``H``: ``W_hh`` re-read per step in ``BLOCK_H`` tiles.

    ``state``: fp32 scratch ``(2, D, B, H)``; step ``s`` reads slot ``s % 2`` and writes the other."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    w_base = w_hh_ptr + direction.to(tl.int64) * 3 * H * H
    slot = D * B * H  # elements per ping-pong slot
    state_rows = (direction * B + rows64)[:, None] * H
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    copy_rows(h0_ptr + state_rows, state_ptr + state_rows, row_ok, H, BLOCK_H)  # slot 0 <- h0
    tl.debug_barrier()

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        row_t = (t * B + rows64)[:, None]
        read = state_ptr + (s % 2) * slot + state_rows
        write = state_ptr + ((s + 1) % 2) * slot + state_rows
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        for n0 in range(0, H, BLOCK_H):
            cols_n = n0 + tl.arange(0, BLOCK_H)
            n_ok = cols_n < H
            ok = row_ok[:, None] & n_ok[None, :]
            # One gate at a time: a single W tile live (three at once spill in fp32).
            gh_r = _tiled_product(read, w_base, row_ok, cols_n, H, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            gh_z = _tiled_product(read, w_base + H * H, row_ok, cols_n, H, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            gh_n = _tiled_product(read, w_base + 2 * H * H, row_ok, cols_n, H, INPUT_PRECISION, BLOCK_B, BLOCK_H)
            if HAS_BIAS:
                b_base = b_hh_ptr + direction * 3 * H + cols_n
                gh_r += tl.load(b_base, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                gh_z += tl.load(b_base + H, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                gh_n += tl.load(b_base + 2 * H, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            gx_offs = row_t * (D * 3 * H) + direction * 3 * H + cols_n[None, :]
            gx_r = tl.load(gx_ptr + gx_offs, mask=ok, other=0.0).to(tl.float32)
            gx_z = tl.load(gx_ptr + gx_offs + H, mask=ok, other=0.0).to(tl.float32)
            gx_n = tl.load(gx_ptr + gx_offs + 2 * H, mask=ok, other=0.0).to(tl.float32)
            h_old = tl.load(read + cols_n[None, :], mask=ok, other=0.0)
            r, z, n, h_new = gru_gates(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h_old)

            saved_offs = row_t * (D * 4 * H) + direction * 4 * H + cols_n[None, :]
            tl.store(saved_ptr + saved_offs, r.to(saved_ptr.dtype.element_ty), mask=ok)
            tl.store(saved_ptr + saved_offs + H, z.to(saved_ptr.dtype.element_ty), mask=ok)
            tl.store(saved_ptr + saved_offs + 2 * H, n.to(saved_ptr.dtype.element_ty), mask=ok)
            tl.store(saved_ptr + saved_offs + 3 * H, gh_n.to(saved_ptr.dtype.element_ty), mask=ok)
            if HAS_LENGTHS:
                h_keep = tl.where(valid, h_new, h_old)
                out = tl.where(valid, h_new, 0.0)
            else:
                h_keep = h_new
                out = h_new
            tl.store(write + cols_n[None, :], h_keep, mask=ok)
            y_offs = row_t * (D * H) + direction * H + cols_n[None, :]
            tl.store(y_ptr + y_offs, out.to(y_ptr.dtype.element_ty), mask=ok)
        tl.debug_barrier()

    final = state_ptr + (T % 2) * slot + state_rows
    copy_rows(final, h_n_ptr + state_rows, row_ok, H, BLOCK_H)


@triton.jit(do_not_specialize=["T"])
def gru_bwd_tiled_kernel(
    dy_ptr, dh_n_ptr, y_ptr, h0_ptr, saved_ptr, w_hh_ptr, lengths_ptr, dgx_ptr, dgh_ptr, dh0_ptr, flow_ptr, state_ptr,
    T, B, H, D, grad_clip,
    HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward for any ``H``; ``state`` is fp32 ``(2, D, B, H)``, the carried gradient ping-pong.

    Per step, phase 1 (tile by tile): the gate gradients into ``dgx`` and ``dgh``, and the direct
    part ``dh * z`` of the next carried gradient into the other slot (past a row's length: ``dh``
    itself, with zero gate gradients). A barrier. Phase 2: that slot ``+= dgh @ W_hh``, tile by
    tile. A barrier."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    w_base = w_hh_ptr + direction.to(tl.int64) * 3 * H * H
    slot = D * B * H
    state_rows = (direction * B + rows64)[:, None] * H
    length = T
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    copy_rows(dh_n_ptr + state_rows, state_ptr + state_rows, row_ok, H, BLOCK_H)  # slot 0 <- dh_n
    tl.debug_barrier()

    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        row_t = (t * B + rows64)[:, None]
        read = state_ptr + (s % 2) * slot + state_rows
        write = state_ptr + ((s + 1) % 2) * slot + state_rows
        y_rows = row_t * (D * H) + direction * H
        saved_rows = row_t * (D * 4 * H) + direction * 4 * H
        g_rows = row_t * (D * 3 * H) + direction * 3 * H
        t_prev, start = _previous_time(t, direction, T, length, HAS_LENGTHS)
        prev_rows = (t_prev * B + rows64)[:, None] * (D * H) + direction * H
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        else:
            valid = row_ok[:, None]
        flow = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + tl.arange(0, BLOCK_H)
            ok = row_ok[:, None] & (cols < H)[None, :]
            h0 = tl.load(h0_ptr + state_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            h_prev = tl.load(y_ptr + prev_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            h_prev = tl.where(start, h0, h_prev)
            dh = tl.load(read + cols[None, :], mask=ok, other=0.0)
            dh_total = dh + tl.load(dy_ptr + y_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            saved = saved_ptr + saved_rows + cols[None, :]
            r = tl.load(saved, mask=ok, other=0.0).to(tl.float32)
            z = tl.load(saved + H, mask=ok, other=0.0).to(tl.float32)
            n = tl.load(saved + 2 * H, mask=ok, other=0.0).to(tl.float32)
            gh_n = tl.load(saved + 3 * H, mask=ok, other=0.0).to(tl.float32)
            dr_pre, dz_pre, dn_pre, dgh_n, direct = gru_gates_grad(dh_total, h_prev, r, z, n, gh_n, grad_clip, CLIP)
            flow += squared_row_norm(dh_total, valid)
            if HAS_LENGTHS:
                dr_pre = tl.where(valid, dr_pre, 0.0)
                dz_pre = tl.where(valid, dz_pre, 0.0)
                dn_pre = tl.where(valid, dn_pre, 0.0)
                dgh_n = tl.where(valid, dgh_n, 0.0)
                direct = tl.where(valid, direct, dh)
            g_offs = g_rows + cols[None, :]
            tl.store(dgx_ptr + g_offs, dr_pre.to(dgx_ptr.dtype.element_ty), mask=ok)
            tl.store(dgx_ptr + g_offs + H, dz_pre.to(dgx_ptr.dtype.element_ty), mask=ok)
            tl.store(dgx_ptr + g_offs + 2 * H, dn_pre.to(dgx_ptr.dtype.element_ty), mask=ok)
            tl.store(dgh_ptr + g_offs, dr_pre.to(dgh_ptr.dtype.element_ty), mask=ok)
            tl.store(dgh_ptr + g_offs + H, dz_pre.to(dgh_ptr.dtype.element_ty), mask=ok)
            tl.store(dgh_ptr + g_offs + 2 * H, dgh_n.to(dgh_ptr.dtype.element_ty), mask=ok)
            tl.store(write + cols[None, :], direct, mask=ok)
        if RECORD_FLOW:
            tl.store(flow_ptr + (direction * T + t) * B + rows64, flow, mask=row_ok)
        tl.debug_barrier()
        for k0 in range(0, H, BLOCK_H):
            cols_k = k0 + tl.arange(0, BLOCK_H)
            k_ok = cols_k < H
            ok = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(write + cols_k[None, :], mask=ok, other=0.0)
            for n0 in range(0, H, BLOCK_H):
                cols_n = n0 + tl.arange(0, BLOCK_H)
                n_ok = cols_n < H
                g_ok = row_ok[:, None] & n_ok[None, :]
                w_ok = n_ok[:, None] & k_ok[None, :]
                w_offs = cols_n[:, None] * H + cols_k[None, :]
                for gate in range(3):
                    dgh = tl.load(dgh_ptr + g_rows + gate * H + cols_n[None, :], mask=g_ok, other=0.0)
                    w = tl.load(w_base + gate * H * H + w_offs, mask=w_ok, other=0.0)
                    acc += tl.dot(dgh.to(w.dtype), w, input_precision=INPUT_PRECISION)
            tl.store(write + cols_k[None, :], acc, mask=ok)
        tl.debug_barrier()

    final = state_ptr + (T % 2) * slot + state_rows
    copy_rows(final, dh0_ptr + state_rows, row_ok, H, BLOCK_H)


@triton.jit
def gru_slice_weights(w_base, H, units, unit_ok, ks, k_ok, COLUMNS: tl.constexpr, SPLIT_K: tl.constexpr, SPLIT: tl.constexpr,
                      CHUNK: tl.constexpr):
    """A persistent program's part of direction ``d``'s ``W_hh`` (``w_base``: its ``(3H, H)``
    block), one tile per gate (r, z, n), loaded once for the whole launch, in the forms of the
    persistent kernels (this module's and ``fastrnn.kernels.layer_norm_rnn``'s): the forward's (``COLUMNS`` False) the rows of its ``units``, ``w[k, i] =
    W_hh[d, q*H + units[i], k]``; the backward's (``COLUMNS``) their columns, ``w[n, i] = W_hh[d,
    q*H + n, units[i]]``; each ``(BLOCK_K, BLOCK_S)``, or with ``SPLIT_K`` cut into ``(SPLIT, CHUNK,
    BLOCK_S)`` (``load_weight_split``)."""
    if COLUMNS:
        k_stride, unit_stride = H, 1
    else:
        k_stride, unit_stride = 1, H
    if SPLIT_K:
        w_r = load_weight_split(w_base, k_stride, unit_stride, H, units, unit_ok, SPLIT, CHUNK)
        w_z = load_weight_split(w_base + H * H, k_stride, unit_stride, H, units, unit_ok, SPLIT, CHUNK)
        w_n = load_weight_split(w_base + 2 * H * H, k_stride, unit_stride, H, units, unit_ok, SPLIT, CHUNK)
    else:
        w_offs = ks[:, None] * k_stride + units[None, :] * unit_stride
        w_ok = k_ok[:, None] & unit_ok[None, :]
        w_r = tl.load(w_base + w_offs, mask=w_ok, other=0.0)
        w_z = tl.load(w_base + H * H + w_offs, mask=w_ok, other=0.0)
        w_n = tl.load(w_base + 2 * H * H + w_offs, mask=w_ok, other=0.0)
    return w_r, w_z, w_n


@triton.jit(do_not_specialize=["T", "phase_begin", "phase_end"])
def gru_fwd_persistent_kernel(
    gx_ptr, w_hh_ptr, b_hh_ptr, h0_ptr, lengths_ptr, y_ptr, h_n_ptr, saved_ptr,
    exchange_ptr, carry_ptr, flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, D,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr, SPLIT_K: tl.constexpr = False,
    keep_ptr=None, zoneout_p=None, ZONEOUT: tl.constexpr = 0,
):
    """Forward, ``W_hh`` split by hidden units: program ``(s, g, d)`` holds the rows of all three
    gates for units ``s*SLICE ...`` (three ``BLOCK_S x BLOCK_K`` tiles on chip) and computes those
    units of direction ``d`` for batch group ``g``. Phases ``0..T-1``, one per step.

    ``exchange`` (``(2, D, B, H)`` in ``w_hh``'s dtype), ``carry`` (fp32 ``(D, B, H)``), flags and
    phases exactly as in ``rnn_fwd_persistent_kernel``: phase ``p`` reads all of ``h_{t-1}``
    (``h0``, or slot ``(p - 1) % 2`` after waiting for flags ``>= p``), forms
    ``gh_g = (h W_g[units, :]^T)^T (+ b_hh)`` for the three gates and the shared ``gru_gates``
    update, writes ``y``, ``saved`` and its units of ``h_t`` into slot ``p % 2``, and arrives.
    Bytes per step and group as the RNN's: ``slices * H * B_group * bytes`` of ``h`` from L2.

    ``SPLIT_K`` (the launcher sets it for 16-bit): the product's ``k`` side in ``SPLIT`` chunks of
    ``CHUNK`` (:func:`fastrnn.kernels.recurrence.split_product`: the warps share the reduction);
    else one 2-D dot (fp32: its FMA dots compile leaner that way).
    ``keep_ptr``, ``zoneout_p``, ``ZONEOUT``: zoneout as the module docstring says, mixed into the
    program's own units of ``h_t`` before ``y`` and the exchange are written.
    """
    direction, index, units, unit_ok, rows, rows64, row_ok, ks, k_ok, tile_ok = persistent_tile(B, H, SLICE, BLOCK_S, BLOCK_K, BLOCK_B)
    group, own_flag = group_flags(flags_ptr, tl.num_programs(0), BLOCK_FLAGS)
    slices = tl.num_programs(0)

    # SPLIT: 8 chunks from BLOCK_K 128 up, else chunks of 16 (tl.dot's least k).
    SPLIT: tl.constexpr = 8 if BLOCK_K >= 128 else BLOCK_K // 16
    CHUNK: tl.constexpr = BLOCK_K // SPLIT
    # w_g[c, k, i] (split) or w_g[k, i] = W_hh[d, g*H + units[i], c*CHUNK + k] for the gates r, z, n:
    # on chip for the whole launch.
    w_r, w_z, w_n = gru_slice_weights(w_hh_ptr + direction.to(tl.int64) * 3 * H * H, H, units, unit_ok, ks, k_ok, False,
                                      SPLIT_K, SPLIT, CHUNK)
    if HAS_BIAS:
        b_base = b_hh_ptr + direction * 3 * H + units
        b_r = tl.load(b_base, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
        b_z = tl.load(b_base + H, mask=unit_ok, other=0.0).to(tl.float32)[:, None]
        b_n = tl.load(b_base + 2 * H, mask=unit_ok, other=0.0).to(tl.float32)[:, None]

    state_offs = (direction * B + rows64)[None, :] * H + units[:, None]
    if phase_begin == 0:
        h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        h = tl.load(carry_ptr + state_offs, mask=tile_ok, other=0.0)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    slot = D * B * H
    group_rows = exchange_ptr + direction * B * H
    own_offs = rows64[None, :] * H + units[:, None]  # the program's (units, rows) tile within a direction's (B, H) block

    for p in range(phase_begin, phase_end):
        t = step_time(p, T, direction).to(tl.int64)
        # gx of this step does not depend on the other programs: issued before the wait.
        row_t = (t * B + rows64)[None, :]
        gx_offs = row_t * (D * 3 * H) + direction * 3 * H + units[:, None]
        gx_r = tl.load(gx_ptr + gx_offs, mask=tile_ok, other=0.0).to(tl.float32)
        gx_z = tl.load(gx_ptr + gx_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
        gx_n = tl.load(gx_ptr + gx_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
        if p == 0:
            h_all = gather_rows(h0_ptr + direction * B * H, H, rows64, row_ok, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
        else:
            if BARRIER:
                wait(group, slices, p, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
            h_all = gather_rows(group_rows + ((p - 1) % 2) * slot, H, rows64, row_ok, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
        # gh_g = (h @ W_g[units, :]^T)^T: batch rows on the product's M side, units on N.
        gh_r = tl.trans(slice_product(h_all, w_r, INPUT_PRECISION, SPLIT_K))
        gh_z = tl.trans(slice_product(h_all, w_z, INPUT_PRECISION, SPLIT_K))
        gh_n = tl.trans(slice_product(h_all, w_n, INPUT_PRECISION, SPLIT_K))
        if HAS_BIAS:
            gh_r += b_r
            gh_z += b_z
            gh_n += b_n
        r, z, n, h_new = gru_gates(gx_r, gx_z, gx_n, gh_r, gh_z, gh_n, h)

        saved_offs = row_t * (D * 4 * H) + direction * 4 * H + units[:, None]
        tl.store(saved_ptr + saved_offs, r.to(saved_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(saved_ptr + saved_offs + H, z.to(saved_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(saved_ptr + saved_offs + 2 * H, n.to(saved_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(saved_ptr + saved_offs + 3 * H, gh_n.to(saved_ptr.dtype.element_ty), mask=tile_ok)
        if ZONEOUT != 0:  # the program's own units of h: the exchanged h_t is the zoned one
            keep = zoneout_keep(keep_ptr, row_t * (D * H) + direction * H + units[:, None], tile_ok, zoneout_p, ZONEOUT)
            h_new = keep * h + (1.0 - keep) * h_new
        if HAS_LENGTHS:
            valid = (t < length)[None, :]
            h = tl.where(valid, h_new, h)
            out = tl.where(valid, h_new, 0.0)
        else:
            h = h_new
            out = h_new
        tl.store(y_ptr + row_t * (D * H) + direction * H + units[:, None], out.to(y_ptr.dtype.element_ty), mask=tile_ok)
        if BARRIER:
            if FAULT == FAULT_ARRIVE_EARLY:
                arrive(own_flag, p + 1, index, FAULT)
        tl.store(group_rows + (p % 2) * slot + own_offs, h.to(exchange_ptr.dtype.element_ty), mask=tile_ok)
        if BARRIER:
            if FAULT != FAULT_ARRIVE_EARLY:
                arrive(own_flag, p + 1, index, FAULT)
    # fp32: the final state's addresses from the exchange's offsets (live through the loop) and a
    # scalar base, not the prologue's state_offs: held across the whole time loop for this store,
    # that one was what ptxas parked on the stack (sm_90, Triton 3.6, plain form: 80 registers and
    # 16 B; now 76 and none). 16-bit (SPLIT_K) keeps state_offs: the other form made the barrier
    # full form at H 512 spill 8 B (255 registers, Triton 3.6).
    if SPLIT_K:
        h_n_tile = h_n_ptr + state_offs
        carry_tile = carry_ptr + state_offs
    else:
        h_n_tile = h_n_ptr + direction * B * H + own_offs
        carry_tile = carry_ptr + direction * B * H + own_offs
    if phase_end == T:
        tl.store(h_n_tile, h.to(h_n_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(carry_tile, h, mask=tile_ok)


@triton.jit(do_not_specialize=["T", "phase_begin", "phase_end"])
def gru_bwd_persistent_kernel(
    dy_ptr, dh_n_ptr, y_ptr, h0_ptr, saved_ptr, w_hh_ptr, lengths_ptr, dgx_ptr, dgh_ptr, dh0_ptr, flow_ptr,
    carry_ptr, flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, D, grad_clip,
    HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr, CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr, SPLIT_K: tl.constexpr = False,
    keep_ptr=None, zoneout_p=None, ZONEOUT: tl.constexpr = 0,
):
    """Backward through time, ``W_hh`` split by hidden units; phases ``0..T`` (``T + 1``).

    Exchange: an all-gather of the step's ``dgh`` (the gradient of ``h W_hh^T + b_hh``, all three
    gates) through ``dgh`` itself. Phase ``p < T`` (time ``t``): the program forms its units'
    gate gradients with the shared ``gru_gates_grad``, stores them in ``dgx`` and ``dgh``, keeps
    ``partial = dh * z`` (the carried ``dh`` past a row's length) and arrives (flag ``p + 1``).
    Phase ``p > 0`` first waits for flags ``>= p``, reads all ``3H`` columns of the previous
    phase's ``dgh`` and forms its units of ``dh = partial + sum_g (dgh_g W_g[:, units])`` with the
    weight columns of its slice (three ``BLOCK_K x BLOCK_S`` tiles on chip). Phase ``T`` only does
    that, for ``dh0``.

    Bytes per step and group: each of the ``slices`` programs reads ``3H x B_group`` gradients
    (``3 * slices * H * B_group * bytes`` from L2) and writes ``2 * 3 * SLICE x B_group`` (dgx, dgh);
    weights never. ``flow``: ``(slices, D, T, B)`` fp32, each program's share of ``||dL/dh_t||^2`` in its own plane
    (the host sums them: deterministic, no atomics).
    ``carry``: fp32 ``(D, B, H)``, ``partial`` between per-step launches.
    ``SPLIT_K``: the products' ``k`` side split over the warps, as in ``gru_fwd_persistent_kernel``.
    ``keep_ptr``, ``zoneout_p``, ``ZONEOUT``: zoneout as the module docstring says: the gates see
    ``(1 - keep) * dh_total`` and ``partial`` gains ``keep * dh_total`` (``keep`` read at the step's
    own ``(units, rows)``).
    """
    direction, index, units, unit_ok, rows, rows64, row_ok, ks, k_ok, tile_ok = persistent_tile(B, H, SLICE, BLOCK_S, BLOCK_K, BLOCK_B)
    group, own_flag = group_flags(flags_ptr, tl.num_programs(0), BLOCK_FLAGS)
    slices = tl.num_programs(0)

    # w_g[n, i] (or w_g[c, k, i], n = c*CHUNK + k, split) = W_hh[d, g*H + n, units[i]]: the slice's
    # columns of each gate's block.
    SPLIT: tl.constexpr = 8 if BLOCK_K >= 128 else BLOCK_K // 16
    CHUNK: tl.constexpr = BLOCK_K // SPLIT
    w_r, w_z, w_n = gru_slice_weights(w_hh_ptr + direction.to(tl.int64) * 3 * H * H, H, units, unit_ok, ks, k_ok, True,
                                      SPLIT_K, SPLIT, CHUNK)

    state_offs = (direction * B + rows64)[None, :] * H + units[:, None]
    h0 = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    if phase_begin == 0:
        partial = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        partial = tl.load(carry_ptr + state_offs, mask=tile_ok, other=0.0)
    dh = partial
    length = T
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)[None, :]

    g_stride = D * 3 * H  # elements between consecutive batch rows of dgx / dgh
    for p in range(phase_begin, phase_end):
        # The step's own inputs (the state it read, dy, saved) do not depend on the other programs:
        # issued before the wait, so their latency hides behind it. The reverse of the forward walk:
        # forward direction from T-1 down, reverse from 0 up. Phase T has no step (its loads masked off).
        t = step_time(tl.minimum(p, T - 1), T, 1 - direction).to(tl.int64)
        own = tl.where(p < T, tile_ok, False)  # (not tile_ok & (p < T): the interpreter rejects that mask)
        row_t = (t * B + rows64)[None, :]
        # The state step t read: y at the neighbouring step, h0 where a row's walk starts.
        t_read = t - 1 + 2 * direction
        start = (t_read < 0) | (t_read >= length)
        t_read = tl.minimum(tl.maximum(t_read, 0), T - 1)
        h_prev = tl.load(y_ptr + (t_read * B + rows64)[None, :] * (D * H) + direction * H + units[:, None], mask=own, other=0.0).to(tl.float32)
        h_prev = tl.where(start, h0, h_prev)
        dy = tl.load(dy_ptr + row_t * (D * H) + direction * H + units[:, None], mask=own, other=0.0).to(tl.float32)
        saved_offs = row_t * (D * 4 * H) + direction * 4 * H + units[:, None]
        r = tl.load(saved_ptr + saved_offs, mask=own, other=0.0).to(tl.float32)
        z = tl.load(saved_ptr + saved_offs + H, mask=own, other=0.0).to(tl.float32)
        n = tl.load(saved_ptr + saved_offs + 2 * H, mask=own, other=0.0).to(tl.float32)
        gh_n = tl.load(saved_ptr + saved_offs + 3 * H, mask=own, other=0.0).to(tl.float32)
        if BARRIER:
            if p > 0:
                wait(group, slices, p, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
        # Phase 0 has no previous gradient: its loads are masked off (zeros), so dh = partial.
        # Products as (dgh @ w_g)^T: the form that compiles without spills in fp32 (as the RNN's).
        t_prev = step_time(tl.maximum(p - 1, 0), T, 1 - direction).to(tl.int64)
        gathered = dgh_ptr + t_prev * B * g_stride + direction * 3 * H
        consume = row_ok & (p > 0)
        dgh_r = gather_rows(gathered, g_stride, rows64, consume, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
        dgh_z = gather_rows(gathered + H, g_stride, rows64, consume, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
        dgh_n_all = gather_rows(gathered + 2 * H, g_stride, rows64, consume, ks, k_ok, H, w_r.dtype, SPLIT_K, SPLIT, CHUNK)
        acc = tl.dot(dgh_r, w_r, input_precision=INPUT_PRECISION)
        acc += tl.dot(dgh_z, w_z, input_precision=INPUT_PRECISION)
        acc += tl.dot(dgh_n_all, w_n, input_precision=INPUT_PRECISION)
        if SPLIT_K:  # the chunks' partial products summed once (split_product's reduction)
            acc = tl.sum(acc, axis=0)
        dh = partial + tl.trans(acc)
        if p < T:
            dh_total = dh + dy
            if ZONEOUT != 0:  # the kept part of dh_total goes straight to the program's own units of dh_{t-1}
                # keep read here, not with dy before the wait: live across the products it made the
                # bf16 barrier form at H 504 spill (sm_90, Triton 3.9: 255 registers, 8 B of stack)
                keep = zoneout_keep(keep_ptr, row_t * (D * H) + direction * H + units[:, None], tile_ok, zoneout_p, ZONEOUT)
                dr_pre, dz_pre, dn_pre, dgh_n, direct = gru_gates_grad((1.0 - keep) * dh_total, h_prev, r, z, n, gh_n, grad_clip, CLIP)
                direct += keep * dh_total
            else:
                dr_pre, dz_pre, dn_pre, dgh_n, direct = gru_gates_grad(dh_total, h_prev, r, z, n, gh_n, grad_clip, CLIP)
            if HAS_LENGTHS:
                valid = t < length
            else:
                valid = row_ok[None, :]
            if RECORD_FLOW:
                share = tl.sum(tl.where(valid & unit_ok[:, None], dh_total * dh_total, 0.0), axis=0)
                tl.store(flow_ptr + ((index * D + direction) * T + t) * B + rows64, share, mask=row_ok)
            dr_pre = tl.where(valid, dr_pre, 0.0)
            dz_pre = tl.where(valid, dz_pre, 0.0)
            dn_pre = tl.where(valid, dn_pre, 0.0)
            dgh_n = tl.where(valid, dgh_n, 0.0)
            partial = tl.where(valid, direct, dh)
            g_offs = row_t * g_stride + direction * 3 * H + units[:, None]
            tl.store(dgx_ptr + g_offs, dr_pre.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(dgx_ptr + g_offs + H, dz_pre.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(dgx_ptr + g_offs + 2 * H, dn_pre.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
            if BARRIER:
                if FAULT == FAULT_ARRIVE_EARLY:
                    arrive(own_flag, p + 1, index, FAULT)
            tl.store(dgh_ptr + g_offs, dr_pre.to(dgh_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(dgh_ptr + g_offs + H, dz_pre.to(dgh_ptr.dtype.element_ty), mask=tile_ok)
            tl.store(dgh_ptr + g_offs + 2 * H, dgh_n.to(dgh_ptr.dtype.element_ty), mask=tile_ok)
            if BARRIER:
                if FAULT != FAULT_ARRIVE_EARLY:
                    arrive(own_flag, p + 1, index, FAULT)
    # Addresses rebuilt from values the loop keeps live (rows64, units) and a scalar base, not the
    # prologue's state_offs: held across the loop for this store alone, that one was parked on the
    # stack (sm_90, fp32, Triton 3.6, one row, barrier mode: 64 registers and 8 B; now 64 and none).
    own_offs = rows64[None, :] * H + units[:, None]
    if phase_end == T + 1:
        tl.store(dh0_ptr + direction * B * H + own_offs, dh.to(dh0_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(carry_ptr + direction * B * H + own_offs, partial, mask=tile_ok)
