"""Persistent LSTM kernels (with and without projection): each direction's ``W_hh`` spread over many
programs, every program keeping its slice on chip for the whole sequence.

The step math is ``fastrnn.kernels.lstm``'s (``lstm_cell``, ``lstm_cell_grad``); this file differs
from the resident and tiled kernels only in where the weights live and how the state is exchanged.
Shapes and layouts of ``gx``, ``w_hh``, ``w_hr``, ``y``, ``gates``, ``c``, ``dy``, ``dgates``, ``dhp``,
``lengths`` are those of ``fastrnn.kernels.lstm`` (``H`` cell size, ``K`` size of ``h``: ``H``, or
``P`` with projection; ``D`` directions; compute dtype = dtype of ``gx``).

Partition. Grid ``(n_slices, n_groups, D)``: program ``(s, g, d)`` owns hidden units
``s*S ... s*S+S-1`` (its *slice*), batch rows ``g*BLOCK_B ...`` (its *group*) and direction ``d``.
Every product puts the weight slice on the M side and the batch on the N side (``tl.dot`` needs
every dimension >= 16, so the four gates of a slice are stacked on M: ``S = 8`` gives ``M = 32``;
a tile narrower than 16 is padded with masked, zero rows). The programs of one ``(g, d)`` walk time
together; between stages they synchronise through ``fastrnn.kernels.sync`` (per-program flags
carrying the stage number, release after a block barrier, acquire reads, ``>=``, bounded spins).

Forward. Program ``(s, g, d)`` holds ``W_hh[d, q*H + n, :]`` for the gates ``q`` and units ``n`` of its
slice, ``(4*S_TILE, BLOCK_K)`` (and, projecting, ``W_hr[d, p, :]`` for its ``SP`` projected units
``p = s*SP ...``, ``(BLOCK_SP, BLOCK_H)``), and its slice of ``c`` in fp32 registers. Stages per
step: one without projection, two with it.

* gate stage (step ``t``): ``gates^T = gx_t^T + W_slice h_{t-1}^T`` from the whole ``h_{t-1}`` (read
  from the exchange ``h_exchange``), the cell update, the saved ``gates`` and ``c``; without
  projection ``h_t = m_t`` of the slice goes to ``y`` and to the exchange; with it ``m_t`` of the
  slice goes to ``m_exchange``.
* projection stage (``HAS_PROJ``): the whole ``m_t`` (read from ``m_exchange``), the program's
  ``SP`` units of ``h_t = W_hr m_t`` to ``y`` and to the exchange.

Exchange per step and (group, direction), ``e`` bytes per element of the weight dtype: without
projection every program writes ``S * BLOCK_B`` and reads ``K * BLOCK_B`` elements of ``h``:
``n_slices * (S + H) * BLOCK_B * e`` bytes in all; with projection ``m`` (``H`` wide) and ``h``
(``P`` wide) both go round: ``n_slices * (S + SP + H + P) * BLOCK_B * e``, and two barriers.

Backward. Program ``(s, g, d)`` holds the same rows as in the forward (and the same rows of
``W_hr``) and carries its slice of ``dc`` and its units of ``dh`` (its slice without projection, its
``SP`` projected units with it) in fp32. Exchange by partial sums: after the gate gradients of its
slice (``4S`` rows), each program writes its partial of ``dh_{t-1} = dgates_t W_hh`` over all ``K``
units, ``W_slice^T dgates_slice^T``, to ``dh_partial``; after the barrier each program sums the
``n_slices`` partials of its own units, in a fixed order (deterministic). With projection the same
for ``dm_t = dhp_t W_hr``: each program's partial from its ``SP`` units of ``dhp_t``, over all ``H``
units, to ``dm_partial``, summed by the owner of each slice. Bytes per step and (group, direction),
fp32 partials: without projection each program writes ``K`` and reads ``n_slices * S = H`` values
per batch row, ``n_slices * (K + H) * BLOCK_B * 4`` in all; with projection
``n_slices * (P + n_slices*SP + 2H) * BLOCK_B * 4``, and two barriers per step. The alternative the
issue names, every program reading the whole ``dgates_t`` (``4H * BLOCK_B * e`` per program, ``e``
bytes per compute-dtype element: as many bytes in 16-bit, half in fp32), needs each program to
hold the *columns* of ``W_hh`` of its units (``4H x S``): the product then has ``M = S`` (padded to
16 when ``S = 8``: twice the weight registers) and a ``4H``-long reduction operand, which spills
where this form does not (ahead-of-time compiles, ``python -m fastrnn.ops.aot``).
Stages: ``T + 1`` (``2T + 1`` with projection): the last one forms ``dh_0`` from the last partials.

Modes. ``BARRIER`` (constexpr) on: one launch runs ``stage_begin = 0 ... stage_end = n_stages``,
waiting before each stage's exchange read and arriving after its writes. Off (per-step mode):
the barrier is compiled out and the launcher runs one stage per launch (the launch boundary is
the barrier); the carried fp32 state travels between launches through ``c_state`` (forward) and
``dh_state``, ``dc_state`` (backward), loaded at the start and stored at the end of every launch.

Kernel arguments besides ``fastrnn.kernels.lstm``'s:

* ``h_exchange``: ``(2, D, B, K)`` weight dtype, the ping-pong exchange of ``h``: step ``i`` of the
  walk reads slot ``i % 2`` and writes slot ``(i + 1) % 2``; the launcher puts ``h0`` in slot 0 and
  reads ``h_n`` from slot ``T % 2``. Two slots suffice: a program overwrites slot ``i % 2`` at step
  ``i + 1`` only after every program of its group has arrived at step ``i``, i.e. finished reading it.
* ``m_exchange``: ``(D, B, H)`` weight dtype (``HAS_PROJ``; else any pointer): ``m_t``; one slot
  suffices, as two barriers separate its writes from one step to the next.
* ``c_state``: ``(D, B, H)`` fp32, ``c`` between launches (the launcher fills it with ``c0``).
* ``dh_partial``: ``(2, n_slices, D, B, K)`` fp32, ``dm_partial``: ``(2, n_slices, D, B, H)`` fp32
  (``HAS_PROJ``; else any pointer): each program's partials, ping-pong by walk step (``i % 2``).
* ``dh_state``: ``(D, B, K)`` fp32, ``dc_state``: ``(D, B, H)`` fp32: ``dh``, ``dc`` between launches;
  filled with ``dh_n``, ``dc_n``; hold ``dh0``, ``dc0`` after the last stage.
* ``flow``: ``(D, T, n_slices * B)`` fp32 (``RECORD_FLOW``): program ``s``'s part of
  ``||dL/dh_t||^2`` of each row at ``[d, t, s*B + b]`` (summed on the host).
* ``flags``: ``(D, n_groups, n_slices)`` int32, zero at launch; ``error``: ``(1,)`` int32 (see
  ``fastrnn.kernels.sync``); ``max_spins``: the bound of every wait.
* ``stage_begin``, ``stage_end``: the stages this launch runs.
"""
import triton
import triton.language as tl

from fastrnn.kernels.lstm import lstm_cell, lstm_cell_grad
from fastrnn.kernels.recurrence import group_flags, step_time
from fastrnn.kernels.sync import FAULT_ARRIVE_EARLY, arrive, wait


@triton.jit
def split_gates(pre, S_TILE: tl.constexpr, BLOCK_B: tl.constexpr):
    """``(4*S_TILE, BLOCK_B)`` rows gate-major (row ``q*S_TILE + u``) -> ``i, f, g, o``, each
    ``(S_TILE, BLOCK_B)``."""
    quad = tl.permute(tl.reshape(pre, (2, 2, S_TILE, BLOCK_B)), (2, 3, 0, 1))  # [u, b, q // 2, q % 2]
    even, odd = tl.split(quad)  # q % 2 == 0: (i, g); 1: (f, o)
    i, g = tl.split(even)
    f, o = tl.split(odd)
    return i, f, g, o


@triton.jit
def publish(values, dst, mask, own_flag, stage, piece, BARRIER: tl.constexpr, FAULT: tl.constexpr):
    """Store this program's part of the exchanged state (``values`` to ``dst``), then arrive with
    ``stage + 1`` phases done (``FAULT_ARRIVE_EARLY``: the other way round, a test-only mutation)."""
    if BARRIER:
        if FAULT == FAULT_ARRIVE_EARLY:
            arrive(own_flag, stage + 1, piece, FAULT)
    tl.store(dst, values.to(dst.dtype.element_ty), mask=mask)
    if BARRIER:
        if FAULT != FAULT_ARRIVE_EARLY:
            arrive(own_flag, stage + 1, piece, FAULT)


@triton.jit
def _gate_stage(
    gx_ptr, w, w_rows, r_ok, cols_k, k_ok, h_read, h_write, h_final, m_exchange_ptr, y_ptr, gates_ptr, c_ptr, c,
    s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows, units, tile_ok,
    flags, own_flag, piece, n_slices, error_ptr, max_spins,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BARRIER: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, FAULT: tl.constexpr, S_TILE: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Walk step ``s`` (time ``t``): the slice's gates from the whole ``h_{t-1}`` (``h_read``), the
    cell update, the saved ``gates`` and ``c``; publishes ``m_t`` (projecting) or ``h_t``. Returns ``c_t``."""
    step = (t * B + rows.to(tl.int64))[None, :]
    # gx does not depend on the other programs: fetched before the wait.
    pre = tl.load(gx_ptr + step * (D * 4 * H) + direction * 4 * H + w_rows[:, None], mask=r_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
    if BARRIER:
        if s > 0:
            wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
    h_prev = tl.load(h_read + cols_k[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)
    pre += tl.dot(w, h_prev.to(w.dtype), input_precision=INPUT_PRECISION)
    i, f, g, o = split_gates(pre, S_TILE, BLOCK_B)
    i, f, g, o, c, m = lstm_cell(i, f, g, o, c, valid, HAS_LENGTHS)
    gate_offs = step * (D * 4 * H) + direction * 4 * H + units[:, None]
    tl.store(gates_ptr + gate_offs, i.to(gates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + H, f.to(gates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + 2 * H, g.to(gates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + 3 * H, o.to(gates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(c_ptr + step * (D * H) + direction * H + units[:, None], c.to(c_ptr.dtype.element_ty), mask=tile_ok)
    if HAS_PROJ:
        publish(m, m_exchange_ptr + state_rows * H + units[:, None], tile_ok, own_flag, stage, piece, BARRIER, FAULT)
    else:
        tl.store(y_ptr + step * (D * K) + direction * K + units[:, None], m.to(y_ptr.dtype.element_ty), mask=tile_ok)
        if HAS_LENGTHS:  # past a row's length h keeps its value
            m = tl.where(valid, m, tl.load(h_read + units[:, None], mask=tile_ok, other=0.0).to(tl.float32))
        if s == T - 1:
            tl.store(h_final + units[:, None], m.to(h_final.dtype.element_ty), mask=tile_ok)
        publish(m, h_write + units[:, None], tile_ok, own_flag, stage, piece, BARRIER, FAULT)
    return c


@triton.jit
def _projection_stage(
    w_r, cols_h, proj_units, proj_ok, h_read, h_write, h_final, m_exchange_ptr, y_ptr,
    s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows,
    flags, own_flag, piece, n_slices, error_ptr, max_spins,
    HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BARRIER: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, FAULT: tl.constexpr,
):
    """Walk step ``s``'s projection: the program's projected units of ``h_t = W_hr m_t`` from the
    whole ``m_t``, to ``y`` and published (and to ``h_n`` at the last step)."""
    if BARRIER:
        wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
    m_all = tl.load(m_exchange_ptr + state_rows * H + cols_h[:, None], mask=(cols_h < H)[:, None] & row_ok[None, :], other=0.0)
    h_new = tl.dot(w_r, m_all.to(w_r.dtype), input_precision=INPUT_PRECISION)
    proj_tile = proj_ok[:, None] & row_ok[None, :]
    step = (t * B + rows.to(tl.int64))[None, :]
    tl.store(y_ptr + step * (D * K) + direction * K + proj_units[:, None], h_new.to(y_ptr.dtype.element_ty), mask=proj_tile)
    if HAS_LENGTHS:  # m = 0 past a row's length, so y is 0 there; h keeps its value
        h_new = tl.where(valid, h_new, tl.load(h_read + proj_units[:, None], mask=proj_tile, other=0.0).to(tl.float32))
    if s == T - 1:
        tl.store(h_final + proj_units[:, None], h_new.to(h_final.dtype.element_ty), mask=proj_tile)
    publish(h_new, h_write + proj_units[:, None], proj_tile, own_flag, stage, piece, BARRIER, FAULT)


@triton.jit(do_not_specialize=["phase_begin", "phase_end", "T"])
def lstm_fwd_persistent_kernel(
    gx_ptr, w_hh_ptr, w_hr_ptr, h0_ptr, c0_ptr, lengths_ptr, y_ptr, h_n_ptr, gates_ptr, c_ptr,
    h_exchange_ptr, m_exchange_ptr, carry_ptr, flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, K, D,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr, BLOCK_HOUT: tl.constexpr,
):
    """Forward phases ``phase_begin ... phase_end - 1`` (``T`` per direction, ``2T`` projecting:
    phase ``2i`` the gates of walk step ``i``, ``2i + 1`` its projection). Writes ``y``, ``h_n``, the
    saved ``gates`` and ``c``, the exchanges and ``carry`` (``c`` between per-step launches: fp32
    ``(D, B, H)``). The walk's first step reads ``h0`` (and ``c0`` when ``phase_begin = 0``).
    ``BLOCK_K >= H``, ``BLOCK_HOUT >= K``, ``BLOCK_S = max(SLICE, 16)`` (the projected units, at
    most ``SLICE`` per program), ``BLOCK_FLAGS >= n_slices``."""
    S: tl.constexpr = SLICE
    S_TILE: tl.constexpr = SLICE if SLICE >= 4 else 4  # 4 * S_TILE >= 16: tl.dot's smallest M
    piece = tl.program_id(0)
    group = tl.program_id(1)
    direction = tl.program_id(2)
    n_slices = tl.num_programs(0)
    d64 = direction.to(tl.int64)
    rows = group * BLOCK_B + tl.arange(0, BLOCK_B)  # batch rows (the N side)
    row_ok = rows < B
    state_rows = (d64 * B + rows.to(tl.int64))[None, :]  # row index into (D, B, .) buffers
    units = piece * S + tl.arange(0, S_TILE)
    unit_ok = (tl.arange(0, S_TILE) < S) & (units < H)
    tile_ok = unit_ok[:, None] & row_ok[None, :]
    # Gate rows of the slice, gate-major: row r = q*S_TILE + u is W_hh row q*H + s*S + u.
    r = tl.arange(0, 4 * S_TILE)
    r_unit = r % S_TILE
    w_rows = (r // S_TILE) * H + piece * S + r_unit
    r_ok = (r_unit < S) & (piece * S + r_unit < H)
    cols_k = tl.arange(0, BLOCK_HOUT)
    k_ok = cols_k < K
    w = tl.load(w_hh_ptr + d64 * 4 * H * K + w_rows[:, None] * K + cols_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    if HAS_PROJ:
        # SP = cdiv(P, n_slices) <= SLICE projected units per program (the last ones may have none).
        sp = tl.cdiv(K, n_slices)
        proj_units = piece * sp + tl.arange(0, BLOCK_S)
        proj_ok = (tl.arange(0, BLOCK_S) < sp) & (proj_units < K)
        cols_h = tl.arange(0, BLOCK_K)
        w_r = tl.load(w_hr_ptr + d64 * K * H + proj_units[:, None] * H + cols_h[None, :],
                      mask=proj_ok[:, None] & (cols_h < H)[None, :], other=0.0)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    flags, own_flag = group_flags(flags_ptr, n_slices, BLOCK_FLAGS)
    if phase_begin == 0:
        c = tl.load(c0_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
    else:
        c = tl.load(carry_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0)
    h_slot = D * B * K

    for stage in range(phase_begin, phase_end):
        if HAS_PROJ:
            s = stage // 2
        else:
            s = stage
        t = step_time(s, T, direction).to(tl.int64)
        if HAS_LENGTHS:
            valid = (t < length)[None, :]
        else:
            valid = row_ok[None, :]
        # The walk's first step reads h0; step i > 0 reads slot i % 2; step i writes slot (i + 1) % 2.
        if s == 0:
            h_read = h0_ptr + state_rows * K
        else:
            h_read = h_exchange_ptr + (s % 2) * h_slot + state_rows * K
        h_write = h_exchange_ptr + ((s + 1) % 2) * h_slot + state_rows * K
        h_final = h_n_ptr + state_rows * K
        if HAS_PROJ:
            if stage % 2 == 0:
                c = _gate_stage(gx_ptr, w, w_rows, r_ok, cols_k, k_ok, h_read, h_write, h_final, m_exchange_ptr, y_ptr, gates_ptr, c_ptr, c,
                                s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows, units, tile_ok,
                                flags, own_flag, piece, n_slices, error_ptr, max_spins,
                                HAS_PROJ, HAS_LENGTHS, INPUT_PRECISION, BARRIER, BLOCK_FLAGS, FAULT, S_TILE, BLOCK_B)
            else:
                _projection_stage(w_r, cols_h, proj_units, proj_ok, h_read, h_write, h_final, m_exchange_ptr, y_ptr,
                                  s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows,
                                  flags, own_flag, piece, n_slices, error_ptr, max_spins,
                                  HAS_LENGTHS, INPUT_PRECISION, BARRIER, BLOCK_FLAGS, FAULT)
        else:
            c = _gate_stage(gx_ptr, w, w_rows, r_ok, cols_k, k_ok, h_read, h_write, h_final, m_exchange_ptr, y_ptr, gates_ptr, c_ptr, c,
                            s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows, units, tile_ok,
                            flags, own_flag, piece, n_slices, error_ptr, max_spins,
                            HAS_PROJ, HAS_LENGTHS, INPUT_PRECISION, BARRIER, BLOCK_FLAGS, FAULT, S_TILE, BLOCK_B)
    tl.store(carry_ptr + state_rows * H + units[:, None], c, mask=tile_ok)


@triton.jit
def join_gates(i, f, g, o, S_TILE: tl.constexpr, BLOCK_B: tl.constexpr):
    """The inverse of :func:`split_gates`: four ``(S_TILE, BLOCK_B)`` tiles -> ``(4*S_TILE, BLOCK_B)``
    rows gate-major."""
    quad = tl.join(tl.join(i, g), tl.join(f, o))  # [u, b, q // 2, q % 2]
    return tl.reshape(tl.permute(quad, (2, 3, 0, 1)), (4 * S_TILE, BLOCK_B))


@triton.jit
def gather_partials(partial_ptr, n_slices, slot_stride, state_rows, width, units, tile_ok,
                    GATHER: tl.constexpr, TILE: tl.constexpr, BLOCK_B: tl.constexpr):
    """``sum_j partial[j, d, b, units]`` over the ``n_slices`` programs ``j`` of the group, in a fixed
    order (deterministic): ``partial_ptr`` is one ping-pong slot of a ``(n_slices, D, B, width)``
    fp32 buffer, ``slot_stride = D*B*width``. Returns ``(TILE, BLOCK_B)`` fp32."""
    acc = tl.zeros((TILE, BLOCK_B), dtype=tl.float32)
    lanes = tl.arange(0, GATHER)
    offs = (state_rows * width + units[:, None])[None, :, :]
    for j0 in range(0, n_slices, GATHER):
        j = j0 + lanes
        part = tl.load(partial_ptr + j.to(tl.int64)[:, None, None] * slot_stride + offs,
                       mask=(j < n_slices)[:, None, None] & tile_ok[None, :, :], other=0.0)
        acc += tl.sum(part, axis=0)
    return acc


@triton.jit
def _cell_grad_stage(dm, dc, w, gates_ptr, c_ptr, c0_ptr, dgates_ptr, dh_partial_ptr, t, T, B, H, K, D, direction, rows,
                     state_rows, units, tile_ok, cols_k, k_ok, row_ok, grad_clip, own_flag, stage, piece,
                     CLIP: tl.constexpr, INPUT_PRECISION: tl.constexpr, S_TILE: tl.constexpr, BLOCK_B: tl.constexpr,
                     BARRIER: tl.constexpr, FAULT: tl.constexpr):
    """Step ``t``'s gate gradients of the slice (``(S_TILE, BLOCK_B)`` tiles) from ``dm = dL/dm_t``
    and the carried ``dc = dL/dc_t``: stored to ``dgates``, and this program's partial
    ``dh_{t-1}^T = W_slice^T dgates_slice^T`` (all ``K`` units) to ``dh_partial``; returns ``dL/dc_{t-1}``."""
    step = (t * B + rows.to(tl.int64))[None, :]
    g_offs = step * (D * 4 * H) + direction * 4 * H + units[:, None]
    i = tl.load(gates_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32)
    f = tl.load(gates_ptr + g_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
    g = tl.load(gates_ptr + g_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
    o = tl.load(gates_ptr + g_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
    c_cols = direction * H + units[:, None]
    c_t = tl.load(c_ptr + step * (D * H) + c_cols, mask=tile_ok, other=0.0).to(tl.float32)
    # The state the forward step read: c[t-1] (forward direction) / c[t+1] (reverse), c0 at the walk's start.
    t_prev = t - 1 + 2 * direction
    first = (t_prev < 0) | (t_prev >= T)
    t_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1)
    c_init = tl.load(c0_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
    c_prev = tl.load(c_ptr + (t_prev * B + rows.to(tl.int64))[None, :] * (D * H) + c_cols, mask=tile_ok, other=0.0).to(tl.float32)
    c_prev = tl.where(first, c_init, c_prev)
    # Past a row's length the saved gates (i = g = o = 0, f = 1) give zero gate gradients and dc_{t-1} = dc.
    di, df, dg, do, dc_prev = lstm_cell_grad(dm, dc, i, f, g, o, c_t, c_prev, grad_clip, CLIP)
    tl.store(dgates_ptr + g_offs, di.to(dgates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dgates_ptr + g_offs + H, df.to(dgates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dgates_ptr + g_offs + 2 * H, dg.to(dgates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dgates_ptr + g_offs + 3 * H, do.to(dgates_ptr.dtype.element_ty), mask=tile_ok)
    # The same rounding of the gate gradients as the resident kernel's product (to the weight dtype).
    d_slice = join_gates(di, df, dg, do, S_TILE, BLOCK_B).to(w.dtype)
    partial = tl.dot(tl.trans(w), d_slice, input_precision=INPUT_PRECISION)  # (BLOCK_HOUT, BLOCK_B)
    publish(partial, dh_partial_ptr + state_rows * K + cols_k[:, None], k_ok[:, None] & row_ok[None, :], own_flag, stage, piece, BARRIER, FAULT)
    return dc_prev


@triton.jit(do_not_specialize=["phase_begin", "phase_end", "T"])
def lstm_bwd_persistent_kernel(
    dy_ptr, dh_n_ptr, dc_n_ptr, gates_ptr, c_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    dgates_ptr, dhp_ptr, dh0_ptr, dc0_ptr, flow_ptr,
    dh_partial_ptr, dm_partial_ptr, dh_carry_ptr, dc_carry_ptr, flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, K, D, grad_clip,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr, BLOCK_HOUT: tl.constexpr,
):
    """Backward phases ``phase_begin ... phase_end - 1``: ``T + 1`` per direction (``2T + 1``
    projecting), the last one only forming ``dh_0`` (and storing ``dh0``, ``dc0``). Walk step ``i``
    (time ``t``):

    * without projection, phase ``i``: ``dh`` of the slice's units = the sum of every program's
      partial of the previous step (``i > 0``); ``dm = dh_t = dy_t + dh`` (its squared norm added to
      ``flow``); the gate gradients; this program's partial of ``dh_{t-1}`` (all ``K`` units).
    * with projection, phase ``2i``: ``dh`` of the program's projected units from the partials;
      ``dhp_t = dy_t + dh`` (0 past a row's length) to ``dhp`` and ``flow``; this program's partial of
      ``dm_t = dhp_t W_hr`` (all ``H`` units, from its rows of ``W_hr``). Phase ``2i + 1``: ``dm`` of
      the slice's units from the partials; the gate gradients; the partial of ``dh_{t-1}``.

    ``flow`` (``RECORD_FLOW``, ``(D, T, B)`` fp32, zeroed): each program atomically adds its units'
    share of ``||dL/dh_t||^2``. ``dh_carry (D, B, K)``, ``dc_carry (D, B, H)``: fp32, the carried
    ``dh``, ``dc`` between per-step launches (read when ``phase_begin > 0``; the first phase reads
    ``dh_n``, ``dc_n``). Same tile sizes as the forward."""
    S: tl.constexpr = SLICE
    S_TILE: tl.constexpr = SLICE if SLICE >= 4 else 4
    GATHER: tl.constexpr = BLOCK_FLAGS if BLOCK_FLAGS <= 8 else 8  # partials summed per load
    piece = tl.program_id(0)
    group = tl.program_id(1)
    direction = tl.program_id(2)
    n_slices = tl.num_programs(0)
    d64 = direction.to(tl.int64)
    rows = group * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    state_rows = (d64 * B + rows.to(tl.int64))[None, :]
    units = piece * S + tl.arange(0, S_TILE)  # the slice's cell units
    unit_ok = (tl.arange(0, S_TILE) < S) & (units < H)
    tile_ok = unit_ok[:, None] & row_ok[None, :]
    # The forward's rows of W_hh: the partial of dh_{t-1} is W_slice^T dgates_slice^T.
    r = tl.arange(0, 4 * S_TILE)
    r_unit = r % S_TILE
    w_rows = (r // S_TILE) * H + piece * S + r_unit
    r_ok = (r_unit < S) & (piece * S + r_unit < H)
    cols_k = tl.arange(0, BLOCK_HOUT)
    k_ok = cols_k < K
    w = tl.load(w_hh_ptr + d64 * 4 * H * K + w_rows[:, None] * K + cols_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    if HAS_PROJ:
        # The forward's rows of W_hr: the partial of dm_t is W_hr_slice^T dhp_slice^T.
        sp = tl.cdiv(K, n_slices)
        dh_units = piece * sp + tl.arange(0, BLOCK_S)  # the program's projected units
        dh_ok = (tl.arange(0, BLOCK_S) < sp) & (dh_units < K)
        cols_h = tl.arange(0, BLOCK_K)
        h_ok = cols_h < H
        w_r = tl.load(w_hr_ptr + d64 * K * H + dh_units[:, None] * H + cols_h[None, :], mask=dh_ok[:, None] & h_ok[None, :], other=0.0)
        DH_TILE: tl.constexpr = BLOCK_S
    else:
        dh_units = units
        dh_ok = unit_ok
        DH_TILE: tl.constexpr = S_TILE
    dh_tile = dh_ok[:, None] & row_ok[None, :]
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    flags, own_flag = group_flags(flags_ptr, n_slices, BLOCK_FLAGS)
    if phase_begin == 0:
        dh = tl.load(dh_n_ptr + state_rows * K + dh_units[:, None], mask=dh_tile, other=0.0).to(tl.float32)
        dc = tl.load(dc_n_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
    else:
        dh = tl.load(dh_carry_ptr + state_rows * K + dh_units[:, None], mask=dh_tile, other=0.0)
        dc = tl.load(dc_carry_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0)
    dh_slot = n_slices * D * B * K  # elements per ping-pong slot of the partials
    dm_slot = n_slices * D * B * H

    for stage in range(phase_begin, phase_end):
        if HAS_PROJ:
            s = stage // 2
        else:
            s = stage
        # The reverse of the forward walk (t clamped at s = T, where only dh_0 is formed).
        t = step_time(tl.minimum(s, T - 1), T, 1 - direction).to(tl.int64)
        if HAS_LENGTHS:
            valid = (t < length)[None, :]
        else:
            valid = row_ok[None, :]
        step = (t * B + rows.to(tl.int64))[None, :]
        own_partial = dh_partial_ptr + (s % 2) * dh_slot + piece * (D * B * K)
        if (not HAS_PROJ) or (stage % 2 == 0):
            dy_t = tl.load(dy_ptr + step * (D * K) + direction * K + dh_units[:, None], mask=dh_tile, other=0.0).to(tl.float32)
            if s > 0:
                if BARRIER:
                    wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
                dh_new = gather_partials(dh_partial_ptr + ((s - 1) % 2) * dh_slot, n_slices, D * B * K, state_rows, K, dh_units, dh_tile,
                                         GATHER, DH_TILE, BLOCK_B)
                if HAS_LENGTHS:  # past a row's length dh passes through
                    t_before = step_time(s - 1, T, 1 - direction)
                    dh = tl.where((t_before < length)[None, :], dh_new, dh)
                else:
                    dh = dh_new
            if s < T:
                dh_t = dy_t + dh
                if HAS_LENGTHS:
                    dh_t = tl.where(valid, dh_t, 0.0)
                if RECORD_FLOW:
                    tl.atomic_add(flow_ptr + (direction * T + t) * B + rows, tl.sum(tl.where(dh_tile, dh_t * dh_t, 0.0), axis=0), mask=row_ok)
                if HAS_PROJ:
                    tl.store(dhp_ptr + step * (D * K) + direction * K + dh_units[:, None], dh_t.to(dhp_ptr.dtype.element_ty), mask=dh_tile)
                    dm_part = tl.dot(tl.trans(w_r), dh_t.to(w_r.dtype), input_precision=INPUT_PRECISION)  # (BLOCK_K, BLOCK_B)
                    publish(dm_part, dm_partial_ptr + (s % 2) * dm_slot + piece * (D * B * H) + state_rows * H + cols_h[:, None],
                            h_ok[:, None] & row_ok[None, :], own_flag, stage, piece, BARRIER, FAULT)
                else:
                    dc = _cell_grad_stage(dh_t, dc, w, gates_ptr, c_ptr, c0_ptr, dgates_ptr, own_partial, t, T, B, H, K, D, direction, rows,
                                          state_rows, units, tile_ok, cols_k, k_ok, row_ok, grad_clip, own_flag, stage, piece,
                                          CLIP, INPUT_PRECISION, S_TILE, BLOCK_B, BARRIER, FAULT)
            else:
                tl.store(dh0_ptr + state_rows * K + dh_units[:, None], dh.to(dh0_ptr.dtype.element_ty), mask=dh_tile)
                tl.store(dc0_ptr + state_rows * H + units[:, None], dc.to(dc0_ptr.dtype.element_ty), mask=tile_ok)
        else:
            if BARRIER:
                wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
            dm = gather_partials(dm_partial_ptr + (s % 2) * dm_slot, n_slices, D * B * H, state_rows, H, units, tile_ok,
                                 GATHER, S_TILE, BLOCK_B)
            dc = _cell_grad_stage(dm, dc, w, gates_ptr, c_ptr, c0_ptr, dgates_ptr, own_partial, t, T, B, H, K, D, direction, rows,
                                  state_rows, units, tile_ok, cols_k, k_ok, row_ok, grad_clip, own_flag, stage, piece,
                                  CLIP, INPUT_PRECISION, S_TILE, BLOCK_B, BARRIER, FAULT)
    tl.store(dh_carry_ptr + state_rows * K + dh_units[:, None], dh, mask=dh_tile)
    tl.store(dc_carry_ptr + state_rows * H + units[:, None], dc, mask=tile_ok)
