"""IndRNN kernels (Li et al. 2018): ``h_t = act(gx_t + u * h_{t-1})``, a fused elementwise scan.

``gx = x W_ih^T + b_ih + b_hh`` (every step, every direction) is one GEMM before the launch. The
recurrence has no matrix product: each unit of each row is its own scalar recurrence, so a
program owns a ``BLOCK_B x BLOCK_H`` tile of (rows, units) of one direction and walks time with it
in fp32 registers, reading ``gx`` and writing ``y`` once per step: the kernel is bound by memory
bandwidth, not by latency of a product.

Layouts (contiguous; ``D`` directions):

* ``gx``, ``dgx``, ``y``, ``dy``, ``keep``, ``cand``: ``(T, B, D*H)``; direction ``d`` in
  features ``d*H:(d+1)*H``.
* ``u``: ``(D, H)`` the recurrent weights. ``h0``, ``h_n``, ``dh_n``, ``dh0``: ``(D, B, H)``.
  ``lengths``: ``(B,)`` int32.
* ``du``: ``(D, cdiv(B, BLOCK_B), H)`` fp32, the backward's partial ``sum_b g * h_{t-1}`` of each
  batch tile (the host sums the tiles: deterministic, no atomics).
* ``flow``: ``(D, T, B, cdiv(H, BLOCK_H))`` fp32 with ``RECORD_FLOW``: the partial
  ``||dL/dh_t||^2`` of a row over a tile's units (zero past a row's length).

Zoneout (``ZONEOUT``): 0 off; 1 training, ``h_t = keep * h_{t-1} + (1 - keep) * c_t`` with the
0/1 mask ``keep``; 2 eval, ``h_t = p * h_{t-1} + (1 - p) * c_t`` with ``p = zoneout_p``. With
zoneout the forward also writes the candidate ``c_t = act(...)`` to ``cand`` (the backward's
derivative needs it); otherwise ``c_t = h_t`` and ``cand``/``keep`` are never touched.

Grid: ``(cdiv(B, BLOCK_B), cdiv(H, BLOCK_H), D)``. Direction 1 walks time backwards; a row past
its length keeps its state and writes zero output, so the reverse direction starts each row at
its own last valid step. ``NONLINEARITY``: 0 tanh, 1 relu (codes of ``kernels.activations``).
"""

import triton
import triton.language as tl

from fastrnn.kernels.activations import elman_activation, elman_activation_grad
from fastrnn.kernels.recurrence import advance_state, clamp_grad, row_lengths, squared_row_norm, step_time


@triton.jit
def indrnn_tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Program ``(i, j, d)``: direction ``d``, rows ``i*BLOCK_B...``, units ``j*BLOCK_H...`` and masks."""
    direction = tl.program_id(2)
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < B
    col_ok = cols < H
    return direction, rows, rows.to(tl.int64), row_ok, cols, col_ok, row_ok[:, None] & col_ok[None, :]


@triton.jit(do_not_specialize=["T"])
def indrnn_fwd_kernel(
    gx_ptr, u_ptr, h0_ptr, lengths_ptr, keep_ptr, y_ptr, h_n_ptr, cand_ptr,
    T, B, H, D, zoneout_p,
    NONLINEARITY: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward scan. Writes ``y (T, B, D*H)``, ``h_n (D, B, H)`` and, with zoneout, ``cand``."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = indrnn_tile(B, H, BLOCK_B, BLOCK_H)
    u = tl.load(u_ptr + direction * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    h = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    length = row_lengths(lengths_ptr, rows, row_ok, T, HAS_LENGTHS)
    row_stride = D * H
    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        offs = (t * B + rows64)[:, None] * row_stride + direction * H + cols[None, :]
        gx = tl.load(gx_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
        cand = elman_activation(gx + u * h, NONLINEARITY)
        if ZONEOUT == 1:
            keep = tl.load(keep_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
            h_new = keep * h + (1.0 - keep) * cand
        elif ZONEOUT == 2:
            h_new = zoneout_p * h + (1.0 - zoneout_p) * cand
        else:
            h_new = cand
        if ZONEOUT != 0:
            tl.store(cand_ptr + offs, cand.to(cand_ptr.dtype.element_ty), mask=tile_ok)
        h, out = advance_state(h_new, h, t, length, HAS_LENGTHS)
        tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(h_n_ptr + state_offs, h.to(h_n_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit(do_not_specialize=["T"])
def indrnn_bwd_kernel(
    dy_ptr, dh_n_ptr, y_ptr, cand_ptr, keep_ptr, u_ptr, h0_ptr, lengths_ptr, dgx_ptr, dh0_ptr, du_ptr, flow_ptr,
    T, B, H, D, zoneout_p, grad_clip,
    NONLINEARITY: tl.constexpr, HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr,
    CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward scan, the forward's walk reversed. Per step, with ``d = dy_t + dh`` (the gradient
    reaching ``h_t``) and ``k`` the zoneout keep (0 without zoneout):

    ``g_t = d * (1 - k) * act'(c_t)`` (zero past a row's length, clamped with ``CLIP``) into ``dgx``;
    ``du += sum_rows g_t * h_{t-1}``; ``dh_{t-1} = g_t * u + d * k``, passed through unchanged past a
    row's length; the last carried ``dh`` is ``dh0``. ``h_{t-1}`` is ``y`` of the step before in
    the walk, or ``h0`` at a row's first step (``t = 0`` forward, ``t = length - 1`` reverse)."""
    direction, rows, rows64, row_ok, cols, col_ok, tile_ok = indrnn_tile(B, H, BLOCK_B, BLOCK_H)
    u = tl.load(u_ptr + direction * H + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    state_offs = (direction * B + rows64)[:, None] * H + cols[None, :]
    dh = tl.load(dh_n_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    h0 = tl.load(h0_ptr + state_offs, mask=tile_ok, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
        last = length - 1
    else:
        last = tl.zeros((BLOCK_B,), dtype=tl.int32) + (T - 1)
    first = tl.where(direction == 0, 0, last).to(tl.int64)  # each row's first step in the forward walk
    du = tl.zeros((BLOCK_H,), dtype=tl.float32)
    row_stride = D * H
    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        step_rows = (t * B + rows64)[:, None] * row_stride + direction * H
        offs = step_rows + cols[None, :]
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        else:
            valid = row_ok[:, None]
        d_state = tl.load(dy_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32) + dh
        if ZONEOUT != 0:
            cand = tl.load(cand_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
            if ZONEOUT == 1:
                keep = tl.load(keep_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
            else:
                keep = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32) + zoneout_p
            d_cand = d_state * (1.0 - keep)
            carried = d_state * keep
        else:
            cand = tl.load(y_ptr + offs, mask=tile_ok, other=0.0).to(tl.float32)
            d_cand = d_state
            carried = 0.0
        g = tl.where(valid, d_cand * elman_activation_grad(cand, cand, NONLINEARITY), 0.0)
        if CLIP:
            g = clamp_grad(g, grad_clip)
        if RECORD_FLOW:
            n_tiles = tl.num_programs(1)
            flow_offs = ((direction * T + t) * B + rows64) * n_tiles + tl.program_id(1)
            tl.store(flow_ptr + flow_offs, squared_row_norm(d_state, valid), mask=row_ok)
        at_first = (t == first)[:, None]
        prev_t = t - 1 + 2 * direction
        prev_offs = (prev_t * B + rows64)[:, None] * row_stride + direction * H + cols[None, :]
        prev = tl.load(y_ptr + prev_offs, mask=tile_ok & valid & (at_first == 0), other=0.0).to(tl.float32)
        prev = tl.where(at_first, h0, prev)
        du += tl.sum(g * prev, axis=0)
        dh = tl.where(valid, g * u + carried, dh)
        tl.store(dgx_ptr + offs, g.to(dgx_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dh0_ptr + state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=tile_ok)
    du_offs = (direction * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * H + cols
    tl.store(du_ptr + du_offs, du, mask=col_ok)
