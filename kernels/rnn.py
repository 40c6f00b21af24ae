"""Elman RNN kernels: ``h_t = act(gx_t + h_{t-1} W_hh^T)`` over a whole sequence in one launch.

``gx = x W_ih^T + b_ih + b_hh`` (every step, every direction) is one GEMM before the launch.

Layouts (contiguous; ``D`` directions, ``G*H`` = ``H`` here):

* ``gx``, ``dgx``: ``(T, B, D*H)``, the output of one ``F.linear`` with the directions' ``W_ih``
  stacked, so the GEMM's output and input gradient need no reshuffle.
* ``y``, ``dy``: ``(T, B, D*H)``, the layer's output (direction ``d`` in features ``d*H:(d+1)*H``).
* ``w_hh``: ``(D, H, H)``, ``w_hh[d, n, k]`` weighs input unit ``k`` into output unit ``n``.
* ``h0``, ``h_n``, ``dh_n``, ``dh0``: ``(D, B, H)``. ``lengths``: ``(B,)`` int32.
* ``pre``: ``(T, B, D*H)`` pre-activations, written by the forward and read by the backward only
  for nonlinearities whose derivative needs them (silu, gelu); otherwise never touched.
* ``flow``: ``(D, T, B)`` fp32, written by the backward when ``RECORD_FLOW``: per row and step,
  ``||dL/dh_t||^2`` (the gradient reaching the state: ``dy_t`` plus the carried ``dh``), zero at
  steps past a row's length.
* ``grad_clip``: with ``CLIP``, the pre-activation gradient ``g_t`` is clamped to
  ``[-grad_clip, grad_clip]`` before it flows to ``h_{t-1}`` and into the weight gradients.

Grid: ``(cdiv(B, BLOCK_B), D)``; program ``(i, d)`` owns batch rows ``i*BLOCK_B ...`` of
direction ``d``. Direction 1 walks time backwards; a row past its length keeps its state and
writes zero output, so the reverse direction starts each row at its own last valid step.

Three strategies (chosen by the launcher, ``fastrnn.ops.rnn``, via ``fastrnn.ops.recurrence.plan``):

* ``*_resident``: all of ``W_hh`` is loaded on chip once (``BLOCK_H >= H``) and the state stays
  in fp32 registers for the whole sequence.
* ``*_tiled``: ``W_hh`` is re-read per step in ``BLOCK_H x BLOCK_H`` tiles (from L2); the fp32
  state lives in a ping-pong scratch buffer ``(2, D, B, H)`` in global memory, with a barrier
  between steps (all threads of the one program that owns the rows).
* ``*_persistent``: ``W_hh`` split by hidden units over a grid ``(slices, batch_groups, D)``
  (``fastrnn.ops.persistent``); each program keeps its slice of ``W_hh`` on chip and exchanges
  state with the other programs of its group every step (``fastrnn.kernels.sync``).
"""

import triton
import triton.language as tl

from fastrnn.kernels.activations import NEEDS_PRE, elman_activation, elman_activation_grad
from fastrnn.kernels.recurrence import (
    advance_state,
    clamp_grad,
    copy_rows,
    group_flags,
    load_rows,
    persistent_tile,
    program_tile,
    row_lengths,
    squared_row_norm,
    step_time,
)
from fastrnn.kernels.sync import FAULT_ARRIVE_EARLY, arrive, wait


@triton.jit
def elman_step(gx, h, w_t, NONLINEARITY: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """One Elman step on a tile: ``pre = gx + h @ w_t`` and ``act(pre)``; ``h`` fp32 ``(BB, K)``,
    ``w_t`` ``(K, N)``. Returns ``(h_new, pre)``."""
    pre = gx + tl.dot(h.to(w_t.dtype), w_t, input_precision=INPUT_PRECISION)
    return elman_activation(pre, NONLINEARITY), pre


@triton.jit
def elman_step_grad(dy, dh, h, pre, valid, grad_clip, NONLINEARITY: tl.constexpr, CLIP: tl.constexpr):
    """Backward of one step on a tile: the pre-activation gradient ``g`` (zero where not
    ``valid``, clipped with ``CLIP``) and the squared norm per row of ``dL/dh_t = dy + dh``."""
    d_state = dy + dh
    g = tl.where(valid, d_state * elman_activation_grad(h, pre, NONLINEARITY), 0.0)
    if CLIP:
        g = clamp_grad(g, grad_clip)
    return g, squared_row_norm(d_state, valid)


@triton.jit(do_not_specialize=["T"])
def rnn_fwd_resident_kernel(
    gx_ptr, w_hh_ptr, h0_ptr, lengths_ptr, y_ptr, h_n_ptr, pre_ptr,
    T, B, H, D,
    NONLINEARITY: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward, ``W_hh`` on chip. Writes ``y (T, B, D*H)`` and ``h_n (D, B, H)``."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = program_tile(B, H, BLOCK_B, BLOCK_H)

    # w_t[k, n] = W_hh[d, n, k]: the recurrent product is h @ w_t.
    w_base = w_hh_ptr + direction.to(tl.int64) * H * H
    w_t = tl.load(w_base + cols[None, :] * H + cols[:, None], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)

    row_stride = D * H  # elements between consecutive batch rows of gx / y
    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        offs = (t * B + rows64)[:, None] * row_stride + direction * H + cols[None, :]
        gx = tl.load(gx_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        h_new, pre = elman_step(gx, h, w_t, NONLINEARITY, INPUT_PRECISION)
        if NONLINEARITY >= NEEDS_PRE:
            tl.store(pre_ptr + offs, pre.to(pre_ptr.dtype.element_ty), mask=tile_ok)
        h, out = advance_state(h_new, h, t, length, HAS_LENGTHS)
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(h_n_ptr + state_offs, h.to(h_n_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["T"])
def rnn_bwd_resident_kernel(
    dy_ptr, dh_n_ptr, y_ptr, w_hh_ptr, lengths_ptr, dgx_ptr, dh0_ptr, pre_ptr, flow_ptr,
    T, B, H, D, grad_clip,
    NONLINEARITY: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward through time, ``W_hh`` on chip.

    ``g_t = (dy_t + dh_t) * act'(h_t)`` is written to ``dgx``; ``dh_{t-1} = g_t @ W_hh``;
    the carried ``dh`` (fp32 registers) ends in ``dh0``. Steps past a row's length pass ``dh``
    through unchanged and write ``g = 0``.
    """
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = program_tile(B, H, BLOCK_B, BLOCK_H)

    # w[n, k] = W_hh[d, n, k]: the gradient to the previous state is g @ w.
    w_base = w_hh_ptr + direction.to(tl.int64) * H * H
    w = tl.load(w_base + cols[:, None] * H + cols[None, :], mask=col_ok[:, None] & col_ok[None, :], other=0.0)
    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    dh = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    row_stride = D * H
    for s in range(T):
        # The reverse of the forward walk: forward direction from T-1 down, reverse from 0 up.
        t = step_time(s, T, 1 - direction).to(tl.int64)
        offs = (t * B + rows64)[:, None] * row_stride + direction * H + cols[None, :]
        h = tl.load(y_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        pre = h
        if NONLINEARITY >= NEEDS_PRE:
            pre = tl.load(pre_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        else:
            valid = row_ok[:, None]
        g, flow = elman_step_grad(dy, dh, h, pre, valid, grad_clip, NONLINEARITY, CLIP)
        if RECORD_FLOW:
            tl.store(flow_ptr + (direction * T + t) * B + rows64, flow, mask=row_ok)
        dh = tl.where(valid, tl.dot(g.to(w.dtype), w, input_precision=INPUT_PRECISION), dh)
        tl.store(dgx_ptr + offs, g.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["T"])
def rnn_fwd_tiled_kernel(
    gx_ptr, w_hh_ptr, h0_ptr, lengths_ptr, y_ptr, h_n_ptr, pre_ptr, state_ptr,
    T, B, H, D,
    NONLINEARITY: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward for any ``H``: ``W_hh`` re-read per step in ``BLOCK_H`` tiles.

    ``state``: fp32 scratch ``(2, D, B, H)``; step ``s`` reads slot ``s % 2`` and writes the other.
    """
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    w_base = w_hh_ptr + direction.to(tl.int64) * H * H
    slot = D * B * H  # elements per ping-pong slot
    state_rows = (direction * B + rows64)[:, None] * H
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    copy_rows(h0_ptr + state_rows, state_ptr + state_rows, row_ok, H, BLOCK_H)  # slot 0 <- h0
    tl.debug_barrier()

    row_stride = D * H
    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        read = state_ptr + (s % 2) * slot + state_rows
        write = state_ptr + ((s + 1) % 2) * slot + state_rows
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        for n0 in range(0, H, BLOCK_H):
            cols_n = n0 + tl.arange(0, BLOCK_H)
            n_ok = cols_n < H
            ok = row_ok[:, None] & n_ok[None, :]
            offs = (t * B + rows64)[:, None] * row_stride + direction * H + cols_n[None, :]
            pre = tl.load(gx_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            for k0 in range(0, H, BLOCK_H):
                cols_k = k0 + tl.arange(0, BLOCK_H)
                k_ok = cols_k < H
                h_k = tl.load(read + cols_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w_t = tl.load(w_base + cols_n[None, :] * H + cols_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                pre += tl.dot(h_k.to(w_t.dtype), w_t, input_precision=INPUT_PRECISION)
            h_new = elman_activation(pre, NONLINEARITY)
            if NONLINEARITY >= NEEDS_PRE:
                tl.store(pre_ptr + offs, pre.to(pre_ptr.dtype.element_ty), mask=ok)
            if HAS_LENGTHS:
                h_old = tl.load(read + cols_n[None, :], mask=ok, other=0.0)
                h_keep = tl.where(valid, h_new, h_old)
                out = tl.where(valid, h_new, 0.0)
            else:
                h_keep = h_new
                out = h_new
            tl.store(write + cols_n[None, :], h_keep, mask=ok)
            tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=ok)
        tl.debug_barrier()

    final = state_ptr + (T % 2) * slot + state_rows
    copy_rows(final, h_n_ptr + state_rows, row_ok, H, BLOCK_H)


@triton.jit(do_not_specialize=["T"])
def rnn_bwd_tiled_kernel(
    dy_ptr, dh_n_ptr, y_ptr, w_hh_ptr, lengths_ptr, dgx_ptr, dh0_ptr, pre_ptr, flow_ptr, state_ptr,
    T, B, H, D, grad_clip,
    NONLINEARITY: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward for any ``H``. Per step: ``g`` for every tile into ``dgx``, a barrier, then
    ``dh_{t-1} = g @ W_hh`` tile by tile into the other slot of ``state`` (fp32 ``(2, D, B, H)``)."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    w_base = w_hh_ptr + direction.to(tl.int64) * H * H
    slot = D * B * H
    state_rows = (direction * B + rows64)[:, None] * H
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    copy_rows(dh_n_ptr + state_rows, state_ptr + state_rows, row_ok, H, BLOCK_H)  # slot 0 <- dh_n
    tl.debug_barrier()

    row_stride = D * H
    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        read = state_ptr + (s % 2) * slot + state_rows
        write = state_ptr + ((s + 1) % 2) * slot + state_rows
        step_rows = (t * B + rows64)[:, None] * row_stride + direction * H
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        else:
            valid = row_ok[:, None]
        flow = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for n0 in range(0, H, BLOCK_H):
            cols = n0 + tl.arange(0, BLOCK_H)
            ok = row_ok[:, None] & (cols < H)[None, :]
            h = tl.load(y_ptr + step_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + step_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            dh = tl.load(read + cols[None, :], mask=ok, other=0.0)
            pre = h
            if NONLINEARITY >= NEEDS_PRE:
                pre = tl.load(pre_ptr + step_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            g, flow_part = elman_step_grad(dy, dh, h, pre, valid, grad_clip, NONLINEARITY, CLIP)
            flow += flow_part
            tl.store(dgx_ptr + step_rows + cols[None, :], g.to(dgx_ptr.dtype.element_ty), mask=ok)
        if RECORD_FLOW:
            tl.store(flow_ptr + (direction * T + t) * B + rows64, flow, mask=row_ok)
        tl.debug_barrier()
        for k0 in range(0, H, BLOCK_H):
            cols_k = k0 + tl.arange(0, BLOCK_H)
            k_ok = cols_k < H
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for n0 in range(0, H, BLOCK_H):
                cols_n = n0 + tl.arange(0, BLOCK_H)
                n_ok = cols_n < H
                g = tl.load(dgx_ptr + step_rows + cols_n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                w = tl.load(w_base + cols_n[:, None] * H + cols_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(g.to(w.dtype), w, input_precision=INPUT_PRECISION)
            ok = row_ok[:, None] & k_ok[None, :]
            acc = tl.where(valid, acc, tl.load(read + cols_k[None, :], mask=ok, other=0.0))
            tl.store(write + cols_k[None, :], acc, mask=ok)
        tl.debug_barrier()

    final = state_ptr + (T % 2) * slot + state_rows
    copy_rows(final, dh0_ptr + state_rows, row_ok, H, BLOCK_H)


@triton.jit(do_not_specialize=["T", "phase_begin", "phase_end"])
def rnn_fwd_persistent_kernel(
    gx_ptr, w_hh_ptr, h0_ptr, lengths_ptr, y_ptr, h_n_ptr, pre_ptr,
    exchange_ptr, carry_ptr, flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, D,
    NONLINEARITY: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr,
):
    """Forward, ``W_hh`` split by hidden units: program ``(s, g, d)`` computes units
    ``s*SLICE ...`` of direction ``d`` for batch group ``g``. Phases ``0..T-1``, one per step.

    * ``exchange``: ``(2, D, B, H)`` in ``w_hh``'s dtype, the ping-pong of the exchanged state:
      phase ``p`` writes the program's units of ``h_t`` (kept through a row's end of sequence)
      into slot ``p % 2`` and arrives (flag ``p + 1``); phase ``p > 0`` waits for flags ``>= p``
      and reads all ``H`` columns of ``h_{t-1}`` from slot ``(p - 1) % 2`` (phase 0: ``h0``).
    * ``carry``: fp32 ``(D, B, H)``, the program's own fp32 state between launches in per-step
      mode (read when ``phase_begin > 0``, written when ``phase_end < T``; barrier mode never
      touches it). ``flags``: int32 ``(D, batch_groups, slices)``; ``error``: int32 ``(1,)``.

    Per step and group: each of the ``slices`` programs reads ``H x BLOCK_B`` exchanged values
    and writes ``SLICE x BLOCK_B``: ``slices * H * B_group * bytes`` read from L2 per step, the
    weights never (on chip for the whole sequence). Per step the product is
    ``h (BLOCK_B x BLOCK_K) @ W[units, :]^T (BLOCK_K x BLOCK_S)``, the shared ``elman_step``.
    """
    direction, index, units, unit_ok, rows, rows64, row_ok, ks, k_ok, tile_ok = persistent_tile(B, H, SLICE, BLOCK_S, BLOCK_K, BLOCK_B)
    group, own_flag = group_flags(flags_ptr, tl.num_programs(0), BLOCK_FLAGS)
    slices = tl.num_programs(0)

    # w_slice[k, i] = W_hh[d, units[i], k], on chip for every phase of the launch.
    w_base = w_hh_ptr + direction.to(tl.int64) * H * H
    w_slice = tl.load(w_base + ks[:, None] + units[None, :] * H, mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
    # Own state, transposed: state_offs[i, b] addresses (d, rows[b], units[i]) of a (D, B, H) tensor.
    state_offs = (direction * B + rows64)[None, :] * H + units[:, None]
    if phase_begin == 0:
        h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        h = tl.load(carry_ptr + state_offs, mask=tile_ok, other=0.0)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    slot = D * B * H  # elements per ping-pong slot
    group_rows = exchange_ptr + direction * B * H  # row b of direction d in slot 0

    row_stride = D * H  # elements between consecutive batch rows of gx / y
    for p in range(phase_begin, phase_end):
        t = step_time(p, T, direction).to(tl.int64)
        # gx of this step does not depend on the other programs: issued before the wait.
        offs = (t * B + rows64)[None, :] * row_stride + direction * H + units[:, None]
        gx = tl.load(gx_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        if p == 0:
            h_all = load_rows(h0_ptr + direction * B * H, H, rows64, row_ok, ks, k_ok, w_slice.dtype)
        else:
            if BARRIER:
                wait(group, slices, p, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
            h_all = load_rows(group_rows + ((p - 1) % 2) * slot, H, rows64, row_ok, ks, k_ok, w_slice.dtype)
        # (h @ W[units, :]^T)^T: batch rows on the product's M side, units on N.
        h_new, pre = elman_step(tl.trans(gx), h_all, w_slice, NONLINEARITY, INPUT_PRECISION)
        h_new = tl.trans(h_new)
        pre = tl.trans(pre)
        if NONLINEARITY >= NEEDS_PRE:
            tl.store(pre_ptr + offs, pre.to(pre_ptr.dtype.element_ty), mask=tile_ok)
        if HAS_LENGTHS:
            valid = (t < length)[None, :]
            h = tl.where(valid, h_new, h)
            out = tl.where(valid, h_new, 0.0)
        else:
            h = h_new
            out = h_new
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
        if BARRIER:
            if FAULT == FAULT_ARRIVE_EARLY:
                arrive(own_flag, p + 1, index, FAULT)
        tl.store(group_rows + (p % 2) * slot + rows64[None, :] * H + units[:, None], h.to(exchange_ptr.dtype.element_ty), mask=tile_ok)
        if BARRIER:
            if FAULT != FAULT_ARRIVE_EARLY:
                arrive(own_flag, p + 1, index, FAULT)
    if phase_end == T:
        tl.store(h_n_ptr + state_offs, h.to(h_n_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(carry_ptr + state_offs, h, mask=tile_ok)


@triton.jit(do_not_specialize=["T", "phase_begin", "phase_end"])
def rnn_bwd_persistent_kernel(
    dy_ptr, dh_n_ptr, y_ptr, w_hh_ptr, lengths_ptr, dgx_ptr, dh0_ptr, pre_ptr, flow_ptr,
    carry_ptr, flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, D, grad_clip,
    NONLINEARITY: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr,
):
    """Backward through time, ``W_hh`` split by hidden units; phases ``0..T`` (``T + 1``).

    Exchange: an all-gather of the step's pre-activation gradients through ``dgx`` itself. Phase
    ``p < T`` (step ``s = p`` of the reversed walk, time ``t``): the program forms ``g_t`` of its
    units (``elman_step_grad``), stores it in ``dgx`` and arrives (flag ``p + 1``). Phase ``p > 0``
    first waits for flags ``>= p``, reads all ``H`` columns of the previous phase's ``g`` from
    ``dgx`` and forms its units of ``dh = partial + (g W[:, units])^T`` with the weight columns
    of its slice (``BLOCK_K x BLOCK_S``, on chip), ``partial`` being zero on a valid
    step and the carried ``dh`` past a row's length. Phase ``T`` only does that, for ``dh0``.

    Bytes per step and group: each of the ``slices`` programs reads ``H x B_group`` gradients
    (``slices * H * B_group * bytes`` from L2, the same as the forward's exchange) and writes its
    ``SLICE x B_group``; weights never. ``flow`` (with ``RECORD_FLOW``): each program adds its
    units' share of ``||dL/dh_t||^2`` per row into its own plane of ``flow``
    (``(slices, D, T, B)`` fp32, zeroed; the host sums the planes: deterministic, no atomics).
    ``carry``: fp32 ``(D, B, H)``, ``partial`` between per-step launches (read when
    ``phase_begin > 0``, written when ``phase_end <= T``).
    """
    direction, index, units, unit_ok, rows, rows64, row_ok, ks, k_ok, tile_ok = persistent_tile(B, H, SLICE, BLOCK_S, BLOCK_K, BLOCK_B)
    group, own_flag = group_flags(flags_ptr, tl.num_programs(0), BLOCK_FLAGS)
    slices = tl.num_programs(0)

    # w_cols[n, i] = W_hh[d, n, units[i]]: the columns of the slice; dh[:, units] = g @ w_cols.
    w_base = w_hh_ptr + direction.to(tl.int64) * H * H
    w_cols = tl.load(w_base + ks[:, None] * H + units[None, :], mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
    state_offs = (direction * B + rows64)[None, :] * H + units[:, None]
    if phase_begin == 0:
        partial = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        partial = tl.load(carry_ptr + state_offs, mask=tile_ok, other=0.0)
    dh = partial
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    row_stride = D * H
    for p in range(phase_begin, phase_end):
        # The step's own inputs (y, dy, pre of time t) do not depend on the other programs: issued
        # before the wait, so their latency hides behind it. The reverse of the forward walk:
        # forward direction from T-1 down, reverse from 0 up. Phase T has no step (its loads masked off).
        t = step_time(tl.minimum(p, T - 1), T, 1 - direction).to(tl.int64)
        own = tl.where(p < T, tile_ok, False)  # (not tile_ok & (p < T): the interpreter rejects that mask)
        offs = (t * B + rows64)[None, :] * row_stride + direction * H + units[:, None]
        h = tl.load(y_ptr + offs, mask=own, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=own, other=0.0).to(tl.float32)
        pre = h
        if NONLINEARITY >= NEEDS_PRE:
            pre = tl.load(pre_ptr + offs, mask=own, other=0.0).to(tl.float32)
        if BARRIER:
            if p > 0:
                wait(group, slices, p, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
        # Phase 0 has no previous gradient: its load is masked off (zeros), so dh = partial.
        # (g @ w_cols)^T rather than w_cols^T @ g^T: the same product, and in fp32 (FMA dots) the
        # form that compiles without spills (measured: 2 KB of stack the other way round).
        t_prev = step_time(tl.maximum(p - 1, 0), T, 1 - direction).to(tl.int64)
        g_all = load_rows(dgx_ptr + t_prev * B * row_stride + direction * H, row_stride, rows64, row_ok & (p > 0), ks, k_ok, w_cols.dtype)
        dh = partial + tl.trans(tl.dot(g_all, w_cols, input_precision=INPUT_PRECISION))
        if p < T:
            if HAS_LENGTHS:
                valid = (t < length)[None, :]
            else:
                valid = row_ok[None, :]
            g, _ = elman_step_grad(dy, dh, h, pre, valid, grad_clip, NONLINEARITY, CLIP)
            if RECORD_FLOW:
                d_state = dy + dh
                share = tl.sum(tl.where(valid & unit_ok[:, None], d_state * d_state, 0.0), axis=0)
                tl.store(flow_ptr + ((index * D + direction) * T + t) * B + rows64, share, mask=row_ok)
            partial = tl.where(valid, 0.0, dh)
            if BARRIER:
                if FAULT == FAULT_ARRIVE_EARLY:
                    arrive(own_flag, p + 1, index, FAULT)
            tl.store(dgx_ptr + offs, g.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
            if BARRIER:
                if FAULT != FAULT_ARRIVE_EARLY:
                    arrive(own_flag, p + 1, index, FAULT)
    if phase_end == T + 1:
        tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=tile_ok)
    else:
        tl.store(carry_ptr + state_offs, partial, mask=tile_ok)
