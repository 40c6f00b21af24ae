"""LSTM kernels (with and without projection) over a whole sequence in one launch.

Per step (``torch.nn.LSTM``)::

    i, f, g, o = chunks of  gx_t + h_{t-1} W_hh^T          (gx = x W_ih^T + b_ih + b_hh)
    c_t = sigmoid(f) c_{t-1} + sigmoid(i) tanh(g)          (fp32 state)
    m_t = sigmoid(o) tanh(c_t)
    h_t = m_t                 (no projection, K = H)
    h_t = m_t W_hr^T          (projection, K = P = proj_size < H)

``H`` is the cell size, ``K`` the size of ``h`` (the recurrent input and the output): ``H`` without
projection, ``P`` with it. Every tensor is contiguous; ``D`` directions; "compute dtype" is the
dtype of ``gx`` (fp32, fp16 or bf16); weights are in the compute dtype, except bf16 under Triton's
interpreter (widened to fp32; each dot casts its left operand to the weight's dtype).

Kernel arguments (shapes in elements):

* ``gx``: ``(T, B, D*4H)`` compute dtype, one ``F.linear`` with the directions' ``W_ih`` stacked:
  direction ``d``, gate ``k`` (0 i, 1 f, 2 g, 3 o), unit ``j`` at feature ``d*4H + k*H + j``.
* ``w_hh``: ``(D, 4H, K)``, ``w_hh[d, k*H + n, j]`` weighs ``h`` unit ``j`` into gate ``k`` unit ``n``.
* ``w_hr``: ``(D, P, H)`` (``HAS_PROJ``; else any pointer, never read), ``w_hr[d, p, n]`` weighs
  ``m`` unit ``n`` into ``h`` unit ``p``.
* ``h0``, ``h_n``, ``dh_n``, ``dh0``: ``(D, B, K)``. ``c0``, ``dc_n``, ``dc0``: ``(D, B, H)``; all in
  the compute dtype. (``c_n`` is no kernel output: it is the saved ``c`` at each direction's last
  step, ``c[T-1]`` forward and ``c[0]`` reverse, sliced by the launcher. Keeping a ``c_n`` store
  after the time loop makes ptxas park its addresses on the stack.)
* ``lengths``: ``(B,)`` int32 (``HAS_LENGTHS``; else any pointer, never read).
* ``y``, ``dy``: ``(T, B, D*K)``, direction ``d`` in features ``d*K:(d+1)*K``; zero past a row's length.
* ``gates`` (saved by the forward): ``(T, B, D*4H)`` compute dtype, the *activated* gates
  ``sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)`` in ``gx``'s layout. Past a row's length they
  are the identity step ``i = g = o = 0, f = 1``: the forward keeps ``c`` exactly (``1*c + 0``)
  with ``m = 0``, and the backward's gate gradients there are exactly zero and ``dc`` passes
  through (``dc * 1``) with no extra select.
* ``c`` (saved by the forward): ``(T, B, D*H)`` compute dtype, the cell state after step ``t``
  (past a row's length the state kept, so the reverse direction's ``c`` after a step the row
  skipped is ``c0``). The state a step read is ``c[t-1]`` (forward direction) / ``c[t+1]``
  (reverse), or ``c0`` at the walk's first step.
* ``dgates`` (backward output): ``(T, B, D*4H)`` compute dtype, the gradient of the gate
  pre-activations, i.e. of ``gx`` (and of ``b_hh``; ``dW_hh = sum_t dgates_t^T h_{t-1}``), clamped
  to ``[-grad_clip, grad_clip]`` with ``CLIP``. Zero past a row's length.
* ``dhp`` (backward output, ``HAS_PROJ``): ``(T, B, D*P)`` compute dtype, the total gradient
  ``dy_t + dh_t`` of each step's ``h_t`` (for ``dW_hr = sum_t dhp_t^T m_t``); zero past a row's
  length.
* ``flow`` (backward output, ``RECORD_FLOW``; else any pointer, never written): ``(D, T, B)``
  fp32, ``||dL/dh_t||^2`` of each row (0 past its length). ``grad_clip``: fp32 scalar (``CLIP``).
* Zoneout (resident and persistent kernels; ``ZONEOUT`` constexpr, 0 compiles them as without it): 1
  training, ``keep (T, B, D*H)`` compute dtype, the 0/1 mask of :mod:`fastrnn.regularization`
  (direction ``d`` in features ``d*H:(d+1)*H``; ``h`` is zoned by its first ``K`` units); 2 eval,
  the scalar ``zoneout_p`` (fp32) in its place. The step's cell computes ``c'``, ``h'`` as above,
  then ``c_t = keep * c_{t-1} + (1 - keep) * c'`` and ``h_t = keep * h_{t-1} + (1 - keep) * h'``
  (``y`` and the saved ``c`` hold the zoned states). ``cand (T, B, D*H)`` compute dtype, written by
  the forward, read by the backward: ``c'`` of every step (the backward's ``tanh``, and with
  projection ``m_t = sigmoid(o) tanh(c')`` for ``dW_hr``). Past a row's length nothing is mixed.
  The persistent kernels mix each program's own units (its slice of ``c``; its units of ``h``, or
  its projected units projecting), so the exchanged ``h_t`` is the zoned one. Backward: the step
  sees ``(1 - keep)`` of ``dh_t`` and ``dc_t``; ``keep`` of them passes straight to ``dh_{t-1}``,
  ``dc_{t-1}`` (elementwise: a persistent program's own units).
* Tiled scratch (fp32, each element written before it is read): forward ``h_state (2, D, B, K)``,
  ``c_state (2, D, B, H)``, ``m_state (D, B, H)`` (``HAS_PROJ``); backward ``dh_state (2, D, B, K)``,
  ``dc_state (2, D, B, H)``, ``dm_state (D, B, H)`` (``HAS_PROJ``). Step ``s`` reads slot ``s % 2``
  of the ping-pong buffers and writes the other.

Grid: ``(cdiv(B, BLOCK_B), D)``; program ``(i, d)`` owns batch rows ``i*BLOCK_B ...`` of direction
``d``. Direction 1 walks time backwards; a row past its length keeps its state (``h`` and ``c``)
and writes zero output, so the reverse direction starts each row at its own last valid step.
Offsets are int64; ``T`` is not specialised.

Three strategies (chosen by ``fastrnn.ops.recurrence.plan``; the persistent one partitioned by
``fastrnn.ops.persistent``); the persistent kernels are described in their own section below:

* ``*_resident``: ``BLOCK_H >= H``. ``W_hh``'s four gate blocks (``h`` padded from ``K`` to
  ``BLOCK_H`` units) and ``W_hr`` are loaded on chip once; ``h``, ``c`` (forward) and ``dh``, ``dc``
  (backward) stay in fp32 registers for the whole sequence.
* ``*_tiled``: any size. Weights are re-read every step (from L2) in tiles: outputs ``BLOCK_H``
  wide, reductions ``REDUCE_TILE`` wide. The fp32 state lives in the ping-pong scratch, with a
  barrier between phases (all threads of the one program that owns the rows). Forward step:
  (1) gate by gate, tile by tile over ``H``: pre-activations, cell update, saved gates and ``c``
  (and ``h = m`` without projection); (2) projecting: ``h = m W_hr^T`` tile by tile over ``P``.
  Backward step: (0) projecting: ``dhp = dy + dh`` over ``P``, then ``dm = dhp W_hr`` over ``H``;
  (1) gate gradients and ``dc_{t-1}`` over ``H``; (2) ``dh_{t-1} = dgates W_hh`` over ``K``, the
  four gates one reduction over ``4H``.

Persistent strategy (``*_persistent``; partition, knobs and launcher: ``fastrnn.ops.persistent``):
each direction's ``W_hh`` spread over many programs, every program keeping its slice on chip for
the whole sequence. The step math is the resident kernels' (``lstm_cell``, ``lstm_cell_grad``); the
kernels differ from the other strategies only in where the weights live and how the state is
exchanged. They take the resident kernels' arguments, then their scratch, then ``flags``, ``error``
(int32, zeroed per launch: ``fastrnn.kernels.sync``), ``phase_begin, phase_end, max_spins``.

Partition. Grid ``(n_slices, n_groups, D)``: program ``(s, g, d)`` owns the cell units
``s*SLICE ... s*SLICE + SLICE - 1`` (its *slice*), the batch rows ``g*BLOCK_B ...`` (its *group*)
and direction ``d``. Every product puts the weights on the M side and the batch on the N side;
``tl.dot`` needs every dimension >= 16, so the four gates of a slice are stacked on M
(``SLICE = 8``: ``M = 32``; ``S_TILE = max(SLICE, 4)`` rows per gate, masked past the slice), and
the projected units of a program (``SP = cdiv(P, n_slices) <= SLICE``) are padded to
``BLOCK_S`` masked rows, the next power of two >= ``max(SP, 16)``
(``fastrnn.ops.persistent.projected_block``). The ``K`` units of ``h`` a weight row spans are held (and
``h`` read) in two power-of-two parts, ``BLOCK_HOUT`` then ``BLOCK_HTAIL`` units (``w``, ``w_tail``;
``BLOCK_HTAIL = 0``: one part), chosen by ``fastrnn.ops.persistent.reduction_split`` (``768 = 512 +
256``: a quarter less weight and ``h`` than one 1024-wide part). A group is ``GROUP_TILES``
sub-tiles of ``BLOCK_B`` rows (the N side of every product): each phase the program walks them one
after another with the weights loaded once, waiting before the first and arriving after the last
(``publish``); with ``GROUP_TILES > 1`` the carried fp32 state of each sub-tile (``c`` forward,
``dh`` and ``dc`` backward) lives in the program's own rows of the ``carry`` buffers instead of
registers (read and written only by its owner, a block barrier apart). The forward and the
backward each get their own ``BLOCK_B``, ``GROUP_TILES`` from the plan (the carry is indexed by
batch row, so it does not depend on them); with ``BLOCK_KC > 0`` a kernel holds the head part of
its weights as a tuple of ``BLOCK_KC``-wide chunks (each its own tile, on chip for the whole
sequence): the forward reads ``h`` chunk by chunk into one accumulator, the backward forms and
stores its partial of ``dh_{t-1}`` chunk by chunk, so no ``K x BLOCK_B`` operand is held whole (L4
on an H100/H200: forward 4 sub-tiles of 32 rows in chunks of 64, backward 2 of 64 in chunks of 128,
where both walked 8 of 16). The programs of one ``(g, d)`` walk time together,
synchronised per phase by ``fastrnn.kernels.sync`` (flags carrying the phase count, release after a
block barrier, acquire reads, ``>=``, bounded spins); ``publish`` stores a program's part of the
exchanged state, then arrives.

Forward: ``T`` phases (``2T`` with projection). Program ``(s, g, d)`` holds
``W_hh[d, q*H + n, :]`` for the gates ``q`` and units ``n`` of its slice (``(4*S_TILE, BLOCK_HOUT)``)
and, projecting, ``W_hr[d, p, :]`` for its projected units ``p`` (``(BLOCK_S, BLOCK_K)``); its
slice of ``c`` stays in fp32 registers.

* gate phase of walk step ``i`` (time ``t``): ``gates^T = gx_t^T + W_slice h_{t-1}^T`` from the
  whole ``h_{t-1}`` (``h0`` at ``i = 0``, else the exchange), the cell update, the saved ``gates``
  and ``c``; without projection ``h_t`` of the slice goes to ``y`` and is published; with it
  ``m_t`` of the slice is published in ``m_exchange``.
* projection phase (``HAS_PROJ``): the whole ``m_t``, the program's units of ``h_t = W_hr m_t`` to
  ``y``, published. ``h_n`` is written at the last step.

Bytes exchanged per step and (group, direction), ``e`` bytes per compute-dtype element: without
projection each program writes ``SLICE`` and reads ``K = H`` values of ``h`` per batch row:
``n_slices * (SLICE + H) * BLOCK_B * e``; with projection ``m`` (``H`` wide) and ``h`` (``P`` wide)
both go round, ``n_slices * (SLICE + SP + H + P) * BLOCK_B * e``, and two barriers per step.

Backward: ``T + 1`` phases (``2T + 1`` with projection; the last forms ``dh_0``). Program
``(s, g, d)`` holds the same rows of ``W_hh`` (and of ``W_hr``) as in the forward and carries its
slice of ``dc`` and its units of ``dh`` (its slice without projection, its projected units with
it) in fp32. Exchange by partial sums: after the gate gradients of its slice (``4*SLICE`` rows),
each program publishes its partial of ``dh_{t-1} = dgates_t W_hh`` over all ``K`` units,
``W_slice^T dgates_slice^T``, in ``dh_partial``; after the barrier each program sums the
``n_slices`` partials of its own units in a fixed order (deterministic). With projection the same
for ``dm_t = dhp_t W_hr``: each program's partial from its units of ``dhp_t``, over all ``H`` units,
in ``dm_partial``, summed by each slice's owner. Bytes per step and (group, direction), fp32
partials: without projection each program writes ``K`` and reads ``n_slices * SLICE = H`` values
per batch row, ``n_slices * (K + H) * BLOCK_B * 4`` in all; with projection
``n_slices * (P + n_slices * SP + 2H) * BLOCK_B * 4`` and two barriers per step. The all-gather the
issue names (every program reading the whole ``dgates_t``, ``4H * BLOCK_B * e`` per program: as
many bytes in 16-bit, half in fp32) needs each program to hold the *columns* of ``W_hh`` of its
units (``4H x SLICE``): a product with ``M = SLICE`` (padded to 16 at ``SLICE = 8``: twice the
weight registers) over a ``4H``-long reduction operand, which spills in ahead-of-time compiles
where this form does not.

Modes. ``BARRIER`` (constexpr) on: one launch runs every phase, waiting before each phase's read
of the exchange and publishing after its writes. Off (per-step mode): the barrier is compiled out
and the launcher runs one phase per launch (the launch boundary is the barrier); the carried fp32
state travels between launches through the ``carry`` buffers (read when ``phase_begin > 0``).

Scratch (``fastrnn.ops.lstm`` allocates it; nothing is read before it is written):

* forward ``h_exchange (2, D, B, K)`` compute dtype: walk step ``i > 0`` reads slot ``i % 2``, step
  ``i`` writes slot ``(i + 1) % 2``. Two slots suffice: a program overwrites slot ``i % 2`` at step
  ``i + 1`` only after every program of its group has published step ``i``, i.e. finished reading
  it. ``m_exchange (D, B, H)`` compute dtype (``HAS_PROJ``; else ``(1,)``): one slot suffices, as
  two barriers separate its writes from one step to the next. ``carry (D, B, H)`` fp32: ``c``.
* backward ``dh_partial (2, n_slices, D, B, K)``, ``dm_partial (2, n_slices, D, B, H)``
  (``HAS_PROJ``; else ``(1,)``): fp32, each program's partials, ping-pong by walk step (with
  zoneout ``dh_partial`` has ``n_slices + 1`` planes: the last holds each program's kept part of
  ``dh_t`` at its own units, one more partial of ``dh_{t-1}``);
  ``dh_carry (D, B, K)``, ``dc_carry (D, B, H)``: fp32.

``flow`` (``RECORD_FLOW``): ``(n_slices, D, T, B)`` fp32, zeroed (``persistent.flow_shares``): each
program writes its units' share of ``||dL/dh_t||^2`` of each row in its plane; the launcher sums the
planes (deterministic). ``BLOCK_K >= H``, ``BLOCK_FLAGS >= n_slices`` and ``GROUP_TILES`` come
from the plan, ``BLOCK_HOUT + BLOCK_HTAIL >= K`` from the launcher.
"""
import triton
import triton.language as tl

from fastrnn.kernels.activations import sigmoid, tanh
from fastrnn.kernels.precision import weight_product
from fastrnn.kernels.recurrence import clamp_grad, copy_rows, group_flags, split_product, squared_row_norm, step_time
from fastrnn.kernels.sync import FAULT_ARRIVE_EARLY, arrive, wait
from fastrnn.kernels.zoneout import zoneout_keep

#: Width of the reduction tiles of the tiled kernels' products (their output tiles are ``BLOCK_H``
#: wide): narrower than ``BLOCK_H`` keeps an fp32 FMA dot's operands within the registers of
#: 8 warps (measured by ahead-of-time compiles for sm_90).
REDUCE_TILE = tl.constexpr(32)


@triton.jit
def lstm_cell(i, f, g, o, c, valid, HAS_LENGTHS: tl.constexpr):
    """One cell update (fp32) from the gate pre-activations ``i, f, g, o`` and ``c = c_{t-1}``.

    Returns the activated gates ``sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)`` -- with
    ``HAS_LENGTHS``, the identity step ``i = g = o = 0, f = 1`` where ``valid`` is false (past a row's
    length: ``c`` kept exactly, ``m = 0``) -- then ``c_t`` and ``m_t = sigmoid(o) tanh(c_t)``."""
    i = sigmoid(i)
    f = sigmoid(f)
    g = tanh(g)
    o = sigmoid(o)
    if HAS_LENGTHS:
        i = tl.where(valid, i, 0.0)
        f = tl.where(valid, f, 1.0)
        g = tl.where(valid, g, 0.0)
        o = tl.where(valid, o, 0.0)
    c = f * c + i * g
    return i, f, g, o, c, o * tanh(c)


@triton.jit
def lstm_cell_grad(dm, dc, i, f, g, o, c_t, c_prev, grad_clip, CLIP: tl.constexpr):
    """Gate gradients of one step from ``dm = dL/dm_t`` and the carried ``dc = dL/dc_t`` (fp32).

    Returns the pre-activation gradients ``di, df, dg, do`` (clamped to ``[-grad_clip, grad_clip]``
    with ``CLIP``) and ``dL/dc_{t-1}`` (never clamped: ``c`` is no pre-activation)."""
    tc = tanh(c_t)
    do = dm * tc * o * (1.0 - o)
    dct = dc + dm * o * (1.0 - tc * tc)
    di = dct * g * i * (1.0 - i)
    df = dct * c_prev * f * (1.0 - f)
    dg = dct * i * (1.0 - g * g)
    if CLIP:
        di = clamp_grad(di, grad_clip)
        df = clamp_grad(df, grad_clip)
        dg = clamp_grad(dg, grad_clip)
        do = clamp_grad(do, grad_clip)
    return di, df, dg, do, dct * f


@triton.jit
def _tiled_gate(gx_ptr, offs, ok, h_read, w_base, row_ok, cols_n, n_ok, H, K, q: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr):
    """Pre-activation tile of gate ``q`` (tiled forward): ``gx + h_{t-1} W_hh[q]^T`` over the
    columns ``cols_n``, accumulated over ``REDUCE_TILE``-wide tiles of ``h`` (fp32 scratch ``h_read``)."""
    acc = tl.load(gx_ptr + offs + q * H, mask=ok, other=0.0).to(tl.float32)
    for k0 in tl.range(0, K, REDUCE_TILE, num_stages=1):
        cols_k = k0 + tl.arange(0, REDUCE_TILE)
        k_ok = cols_k < K
        h_k = tl.load(h_read + cols_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        # w_t[j, n] = W_hh[d, q*H + n, j]
        w_t = tl.load(w_base + (q * H + cols_n[None, :]) * K + cols_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += tl.dot(h_k.to(w_t.dtype), w_t, input_precision=INPUT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["T"])
def lstm_fwd_resident_kernel(
    gx_ptr, w_hh_ptr, w_hr_ptr, h0_ptr, c0_ptr, lengths_ptr,
    y_ptr, h_n_ptr, gates_ptr, c_ptr,
    T, B, H, K, D,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    keep_ptr=None, cand_ptr=None, zoneout_p=None, ZONEOUT: tl.constexpr = 0,
):
    """Forward, weights on chip. Writes ``y``, ``h_n`` and the saved ``gates``, ``c``; with
    ``ZONEOUT`` (the zoneout item above) also ``cand``."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    hc = tl.arange(0, BLOCK_H)
    kc = tl.arange(0, BLOCK_H)  # h units (K <= H: padded to BLOCK_H)
    h_ok = hc < H
    k_ok = kc < K
    d64 = direction.to(tl.int64)

    # w_q[j, n] = W_hh[d, q*H + n, j]: gate q's recurrent product is h @ w_q.
    w_base = w_hh_ptr + d64 * 4 * H * K
    w_offs = hc[None, :] * K + kc[:, None]
    w_mask = k_ok[:, None] & h_ok[None, :]
    w_i = tl.load(w_base + w_offs, mask=w_mask, other=0.0)
    w_f = tl.load(w_base + H * K + w_offs, mask=w_mask, other=0.0)
    w_g = tl.load(w_base + 2 * H * K + w_offs, mask=w_mask, other=0.0)
    w_o = tl.load(w_base + 3 * H * K + w_offs, mask=w_mask, other=0.0)
    if HAS_PROJ:
        # w_r[n, p] = W_hr[d, p, n]: the projection is m @ w_r.
        w_r = tl.load(w_hr_ptr + d64 * K * H + kc[None, :] * H + hc[:, None], mask=h_ok[:, None] & k_ok[None, :], other=0.0)

    h_tile = row_ok[:, None] & k_ok[None, :]
    c_tile = row_ok[:, None] & h_ok[None, :]
    h_state_offs = (direction * B + rows64)[:, None] * K + kc[None, :]
    c_state_offs = (direction * B + rows64)[:, None] * H + hc[None, :]
    h = tl.load(h0_ptr + h_state_offs, mask=h_tile, other=0.0).to(tl.float32)
    c = tl.load(c0_ptr + c_state_offs, mask=c_tile, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        step = t * B + rows64
        g_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + hc[None, :]
        hw = h.to(w_i.dtype)
        i = tl.load(gx_ptr + g_offs, mask=c_tile, other=0.0).to(tl.float32) + tl.dot(hw, w_i, input_precision=INPUT_PRECISION)
        f = tl.load(gx_ptr + g_offs + H, mask=c_tile, other=0.0).to(tl.float32) + tl.dot(hw, w_f, input_precision=INPUT_PRECISION)
        g = tl.load(gx_ptr + g_offs + 2 * H, mask=c_tile, other=0.0).to(tl.float32) + tl.dot(hw, w_g, input_precision=INPUT_PRECISION)
        o = tl.load(gx_ptr + g_offs + 3 * H, mask=c_tile, other=0.0).to(tl.float32) + tl.dot(hw, w_o, input_precision=INPUT_PRECISION)
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        else:
            valid = row_ok[:, None]
        c_prev = c
        i, f, g, o, c, m = lstm_cell(i, f, g, o, c, valid, HAS_LENGTHS)  # past a row's length: m = 0
        if HAS_PROJ:
            out = tl.dot(m.to(w_r.dtype), w_r, input_precision=INPUT_PRECISION)
        else:
            out = m
        if ZONEOUT != 0:
            c_offs = step[:, None] * (D * H) + direction * H + hc[None, :]
            tl.store(cand_ptr + c_offs, c.to(cand_ptr.dtype.element_ty), mask=c_tile)
            keep_c = zoneout_keep(keep_ptr, c_offs, c_tile, zoneout_p, ZONEOUT)
            keep_h = keep_c
            if HAS_PROJ:  # h (K units) is zoned with the first K units of the direction's mask
                keep_h = zoneout_keep(keep_ptr, step[:, None] * (D * H) + direction * H + kc[None, :], h_tile, zoneout_p, ZONEOUT)
            c = keep_c * c_prev + (1.0 - keep_c) * c
            out = keep_h * h + (1.0 - keep_h) * out
            if HAS_LENGTHS:
                c = tl.where(valid, c, c_prev)
                out = tl.where(valid, out, 0.0)
        if HAS_LENGTHS:
            h = tl.where(valid, out, h)
        else:
            h = out
        tl.store(y_ptr + step[:, None] * (D * K) + direction * K + kc[None, :], out.to(y_ptr.dtype.element_ty), mask=h_tile)
        tl.store(gates_ptr + g_offs, i.to(gates_ptr.dtype.element_ty), mask=c_tile)
        tl.store(gates_ptr + g_offs + H, f.to(gates_ptr.dtype.element_ty), mask=c_tile)
        tl.store(gates_ptr + g_offs + 2 * H, g.to(gates_ptr.dtype.element_ty), mask=c_tile)
        tl.store(gates_ptr + g_offs + 3 * H, o.to(gates_ptr.dtype.element_ty), mask=c_tile)
        tl.store(c_ptr + step[:, None] * (D * H) + direction * H + hc[None, :], c.to(c_ptr.dtype.element_ty), mask=c_tile)
    tl.store(h_n_ptr + h_state_offs, h.to(h_n_ptr.dtype.element_ty), mask=h_tile)


@triton.jit(do_not_specialize=["T"])
def lstm_bwd_resident_kernel(
    dy_ptr, dh_n_ptr, dc_n_ptr, gates_ptr, c_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    dgates_ptr, dhp_ptr, dh0_ptr, dc0_ptr, flow_ptr,
    T, B, H, K, D, grad_clip,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
    keep_ptr=None, cand_ptr=None, zoneout_p=None, ZONEOUT: tl.constexpr = 0,
):
    """Backward through time, weights on chip; ``dh`` and ``dc`` carried in fp32 registers.

    Per step: ``dh_t = dy_t + dh`` (written to ``dhp`` when projecting), ``dm = dh_t W_hr``
    (or ``dh_t``), the gate gradients into ``dgates``, ``dc_{t-1} = dc_t sigmoid(f)``,
    ``dh_{t-1} = dgates W_hh``. Steps past a row's length pass ``dh``, ``dc`` through and write 0.
    With ``ZONEOUT`` the step's cell sees ``(1 - keep)`` of ``dh_t`` and ``dc_t`` (its ``tanh`` of
    the candidate ``cand``) and ``keep`` of them passes straight to ``dh_{t-1}``, ``dc_{t-1}``.
    """
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    hc = tl.arange(0, BLOCK_H)
    kc = tl.arange(0, BLOCK_H)  # h units (K <= H: padded to BLOCK_H)
    h_ok = hc < H
    k_ok = kc < K
    d64 = direction.to(tl.int64)

    # w_q[n, j] = W_hh[d, q*H + n, j]: the gradient to h_{t-1} is sum_q dgate_q @ w_q.
    w_base = w_hh_ptr + d64 * 4 * H * K
    w_offs = hc[:, None] * K + kc[None, :]
    w_mask = h_ok[:, None] & k_ok[None, :]
    w_i = tl.load(w_base + w_offs, mask=w_mask, other=0.0)
    w_f = tl.load(w_base + H * K + w_offs, mask=w_mask, other=0.0)
    w_g = tl.load(w_base + 2 * H * K + w_offs, mask=w_mask, other=0.0)
    w_o = tl.load(w_base + 3 * H * K + w_offs, mask=w_mask, other=0.0)
    if HAS_PROJ:
        # w_r[p, n] = W_hr[d, p, n]: dm = dh @ w_r.
        w_r = tl.load(w_hr_ptr + d64 * K * H + kc[:, None] * H + hc[None, :], mask=k_ok[:, None] & h_ok[None, :], other=0.0)

    h_tile = row_ok[:, None] & k_ok[None, :]
    c_tile = row_ok[:, None] & h_ok[None, :]
    h_state_offs = (direction * B + rows64)[:, None] * K + kc[None, :]
    c_state_offs = (direction * B + rows64)[:, None] * H + hc[None, :]
    dh = tl.load(dh_n_ptr + h_state_offs, mask=h_tile, other=0.0).to(tl.float32)
    dc = tl.load(dc_n_ptr + c_state_offs, mask=c_tile, other=0.0).to(tl.float32)
    c_init = tl.load(c0_ptr + c_state_offs, mask=c_tile, other=0.0).to(tl.float32)
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    for s in range(T):
        # The reverse of the forward walk: forward direction from T-1 down, reverse from 0 up.
        t = step_time(s, T, 1 - direction).to(tl.int64)
        # The step the forward walk took just before t (clamped; c0 replaces it at the walk's start).
        t_prev = t - 1 + 2 * direction
        first = (t_prev < 0) | (t_prev >= T)
        t_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1)
        step = t * B + rows64
        y_offs = step[:, None] * (D * K) + direction * K + kc[None, :]
        g_offs = step[:, None] * (D * 4 * H) + direction * 4 * H + hc[None, :]
        c_offs = direction * H + hc[None, :]
        if HAS_LENGTHS:
            valid = (t < length)[:, None]

        dh_t = tl.load(dy_ptr + y_offs, mask=h_tile, other=0.0).to(tl.float32) + dh
        if RECORD_FLOW:
            if HAS_LENGTHS:
                flow = squared_row_norm(dh_t, valid)
            else:
                flow = squared_row_norm(dh_t, row_ok[:, None])
            tl.store(flow_ptr + (direction * T + t) * B + rows64, flow, mask=row_ok)
        dh_cell = dh_t
        dc_cell = dc
        if ZONEOUT != 0:
            c_zone_offs = step[:, None] * (D * H) + c_offs
            keep_c = zoneout_keep(keep_ptr, c_zone_offs, c_tile, zoneout_p, ZONEOUT)
            keep_h = keep_c
            if HAS_PROJ:
                keep_h = zoneout_keep(keep_ptr, step[:, None] * (D * H) + direction * H + kc[None, :], h_tile, zoneout_p, ZONEOUT)
            dh_cell = (1.0 - keep_h) * dh_t
            dc_cell = (1.0 - keep_c) * dc
        if HAS_PROJ:
            if HAS_LENGTHS:
                dh_cell = tl.where(valid, dh_cell, 0.0)
            tl.store(dhp_ptr + y_offs, dh_cell.to(dhp_ptr.dtype.element_ty), mask=h_tile)
            dm = tl.dot(dh_cell.to(w_r.dtype), w_r, input_precision=INPUT_PRECISION)
        else:
            dm = dh_cell
        i = tl.load(gates_ptr + g_offs, mask=c_tile, other=0.0).to(tl.float32)
        f = tl.load(gates_ptr + g_offs + H, mask=c_tile, other=0.0).to(tl.float32)
        g = tl.load(gates_ptr + g_offs + 2 * H, mask=c_tile, other=0.0).to(tl.float32)
        o = tl.load(gates_ptr + g_offs + 3 * H, mask=c_tile, other=0.0).to(tl.float32)
        if ZONEOUT != 0:  # the cell's own c_t before zoneout mixed it with c_{t-1}
            c_t = tl.load(cand_ptr + c_zone_offs, mask=c_tile, other=0.0).to(tl.float32)
        else:
            c_t = tl.load(c_ptr + step[:, None] * (D * H) + c_offs, mask=c_tile, other=0.0).to(tl.float32)
        c_prev = tl.load(c_ptr + (t_prev * B + rows64)[:, None] * (D * H) + c_offs, mask=c_tile, other=0.0).to(tl.float32)
        c_prev = tl.where(first, c_init, c_prev)

        di, df, dg, do, dc_prev = lstm_cell_grad(dm, dc_cell, i, f, g, o, c_t, c_prev, grad_clip, CLIP)
        dh_prev = tl.dot(di.to(w_i.dtype), w_i, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(df.to(w_f.dtype), w_f, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(dg.to(w_g.dtype), w_g, input_precision=INPUT_PRECISION)
        dh_prev += tl.dot(do.to(w_o.dtype), w_o, input_precision=INPUT_PRECISION)
        if ZONEOUT != 0:
            dh_prev += keep_h * dh_t
            dc_prev += keep_c * dc
            if HAS_LENGTHS:
                dc_prev = tl.where(valid, dc_prev, dc)
        if HAS_LENGTHS:
            dh = tl.where(valid, dh_prev, dh)
        else:
            dh = dh_prev
        dc = dc_prev  # past a row's length the saved gates (o = 0, f = 1) make dc_prev = dc exactly
        tl.store(dgates_ptr + g_offs, di.to(dgates_ptr.dtype.element_ty), mask=c_tile)
        tl.store(dgates_ptr + g_offs + H, df.to(dgates_ptr.dtype.element_ty), mask=c_tile)
        tl.store(dgates_ptr + g_offs + 2 * H, dg.to(dgates_ptr.dtype.element_ty), mask=c_tile)
        tl.store(dgates_ptr + g_offs + 3 * H, do.to(dgates_ptr.dtype.element_ty), mask=c_tile)
    tl.store(dh0_ptr + h_state_offs, dh.to(dh0_ptr.dtype.element_ty), mask=h_tile)
    tl.store(dc0_ptr + c_state_offs, dc.to(dc0_ptr.dtype.element_ty), mask=c_tile)


@triton.jit(do_not_specialize=["T"])
def lstm_fwd_tiled_kernel(
    gx_ptr, w_hh_ptr, w_hr_ptr, h0_ptr, c0_ptr, lengths_ptr,
    y_ptr, h_n_ptr, gates_ptr, c_ptr,
    h_state_ptr, c_state_ptr, m_state_ptr,
    T, B, H, K, D,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Forward for any ``H``, ``K``: weights re-read every step in tiles (``BLOCK_H`` outputs by
    ``REDUCE_TILE``), fp32 state in the ping-pong scratch ``h_state``, ``c_state`` (and ``m_state``,
    the projection's input). Writes ``y``, ``h_n`` and the saved ``gates``, ``c``."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    d64 = direction.to(tl.int64)
    w_base = w_hh_ptr + d64 * 4 * H * K
    w_hr_base = w_hr_ptr + d64 * K * H
    h_slot = D * B * K  # elements per ping-pong slot
    c_slot = D * B * H
    h_rows = (direction * B + rows64)[:, None] * K
    c_rows = (direction * B + rows64)[:, None] * H
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    for k0 in range(0, K, BLOCK_H):  # slot 0 <- h0
        cols = k0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < K)[None, :]
        h0 = tl.load(h0_ptr + h_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(h_state_ptr + h_rows + cols[None, :], h0, mask=ok)
    copy_rows(c0_ptr + c_rows, c_state_ptr + c_rows, row_ok, H, BLOCK_H)  # slot 0 <- c0
    tl.debug_barrier()

    for s in range(T):
        t = step_time(s, T, direction).to(tl.int64)
        step = t * B + rows64
        h_read = h_state_ptr + (s % 2) * h_slot + h_rows
        h_write = h_state_ptr + ((s + 1) % 2) * h_slot + h_rows
        c_read = c_state_ptr + (s % 2) * c_slot + c_rows
        c_write = c_state_ptr + ((s + 1) % 2) * c_slot + c_rows
        gx_rows = step[:, None] * (D * 4 * H) + direction * 4 * H
        y_rows = step[:, None] * (D * K) + direction * K
        c_out_rows = step[:, None] * (D * H) + direction * H
        if HAS_LENGTHS:
            valid = (t < length)[:, None]

        # Phase 1: gates and cell update, tile by tile over H.
        for n0 in range(0, H, BLOCK_H):
            cols_n = n0 + tl.arange(0, BLOCK_H)
            n_ok = cols_n < H
            ok = row_ok[:, None] & n_ok[None, :]
            offs = gx_rows + cols_n[None, :]
            # One gate at a time, so that one weight tile is live at once; each gate is stored as
            # soon as it is known. Past a row's length the gates become the identity step.
            i = sigmoid(_tiled_gate(gx_ptr, offs, ok, h_read, w_base, row_ok, cols_n, n_ok, H, K, 0, INPUT_PRECISION, BLOCK_H))
            if HAS_LENGTHS:
                i = tl.where(valid, i, 0.0)
            tl.store(gates_ptr + offs, i.to(gates_ptr.dtype.element_ty), mask=ok)
            g = tanh(_tiled_gate(gx_ptr, offs, ok, h_read, w_base, row_ok, cols_n, n_ok, H, K, 2, INPUT_PRECISION, BLOCK_H))
            if HAS_LENGTHS:
                g = tl.where(valid, g, 0.0)
            tl.store(gates_ptr + offs + 2 * H, g.to(gates_ptr.dtype.element_ty), mask=ok)
            ig = i * g
            f = sigmoid(_tiled_gate(gx_ptr, offs, ok, h_read, w_base, row_ok, cols_n, n_ok, H, K, 1, INPUT_PRECISION, BLOCK_H))
            if HAS_LENGTHS:
                f = tl.where(valid, f, 1.0)
            tl.store(gates_ptr + offs + H, f.to(gates_ptr.dtype.element_ty), mask=ok)
            c_new = f * tl.load(c_read + cols_n[None, :], mask=ok, other=0.0) + ig
            tl.store(c_write + cols_n[None, :], c_new, mask=ok)
            tl.store(c_ptr + c_out_rows + cols_n[None, :], c_new.to(c_ptr.dtype.element_ty), mask=ok)
            o = sigmoid(_tiled_gate(gx_ptr, offs, ok, h_read, w_base, row_ok, cols_n, n_ok, H, K, 3, INPUT_PRECISION, BLOCK_H))
            if HAS_LENGTHS:
                o = tl.where(valid, o, 0.0)
            tl.store(gates_ptr + offs + 3 * H, o.to(gates_ptr.dtype.element_ty), mask=ok)
            m = o * tanh(c_new)  # 0 past a row's length
            if HAS_PROJ:
                tl.store(m_state_ptr + c_rows + cols_n[None, :], m, mask=ok)
            else:
                tl.store(y_ptr + y_rows + cols_n[None, :], m.to(y_ptr.dtype.element_ty), mask=ok)
                if HAS_LENGTHS:
                    m = tl.where(valid, m, tl.load(h_read + cols_n[None, :], mask=ok, other=0.0))
                tl.store(h_write + cols_n[None, :], m, mask=ok)
        tl.debug_barrier()

        if HAS_PROJ:
            # Phase 2: h = m W_hr^T, tile by tile over P.
            for p0 in range(0, K, BLOCK_H):
                cols_p = p0 + tl.arange(0, BLOCK_H)
                p_ok = cols_p < K
                acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for n0 in tl.range(0, H, REDUCE_TILE, num_stages=1):
                    cols_n = n0 + tl.arange(0, REDUCE_TILE)
                    n_ok = cols_n < H
                    m_n = tl.load(m_state_ptr + c_rows + cols_n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
                    # w_r[n, p] = W_hr[d, p, n]
                    w_r = tl.load(w_hr_base + cols_p[None, :] * H + cols_n[:, None], mask=n_ok[:, None] & p_ok[None, :], other=0.0)
                    acc += tl.dot(m_n.to(w_r.dtype), w_r, input_precision=INPUT_PRECISION)
                ok = row_ok[:, None] & p_ok[None, :]
                tl.store(y_ptr + y_rows + cols_p[None, :], acc.to(y_ptr.dtype.element_ty), mask=ok)  # m = 0 past the length
                if HAS_LENGTHS:
                    acc = tl.where(valid, acc, tl.load(h_read + cols_p[None, :], mask=ok, other=0.0))
                tl.store(h_write + cols_p[None, :], acc, mask=ok)
            tl.debug_barrier()

    h_final = h_state_ptr + (T % 2) * h_slot + h_rows
    for k0 in range(0, K, BLOCK_H):
        cols = k0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < K)[None, :]
        h = tl.load(h_final + cols[None, :], mask=ok, other=0.0)
        tl.store(h_n_ptr + h_rows + cols[None, :], h.to(h_n_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["T"])
def lstm_bwd_tiled_kernel(
    dy_ptr, dh_n_ptr, dc_n_ptr, gates_ptr, c_ptr, c0_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    dgates_ptr, dhp_ptr, dh0_ptr, dc0_ptr, flow_ptr,
    dh_state_ptr, dc_state_ptr, dm_state_ptr,
    T, B, H, K, D, grad_clip,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CLIP: tl.constexpr, RECORD_FLOW: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward for any ``H``, ``K``; ``dh``, ``dc`` in the fp32 ping-pong scratch ``dh_state``,
    ``dc_state``. Per step: (projecting: ``dhp = dy + dh`` over ``P``, barrier) gate gradients
    over ``H`` into ``dgates`` and ``dc_state``, barrier, ``dh_{t-1} = dgates W_hh`` over ``K``, barrier."""
    pid_b = tl.program_id(0)
    direction = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    d64 = direction.to(tl.int64)
    w_base = w_hh_ptr + d64 * 4 * H * K
    w_hr_base = w_hr_ptr + d64 * K * H
    h_slot = D * B * K
    c_slot = D * B * H
    h_rows = (direction * B + rows64)[:, None] * K
    c_rows = (direction * B + rows64)[:, None] * H
    if HAS_LENGTHS:
        length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)

    for k0 in range(0, K, BLOCK_H):  # slot 0 <- dh_n
        cols = k0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < K)[None, :]
        dh = tl.load(dh_n_ptr + h_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(dh_state_ptr + h_rows + cols[None, :], dh, mask=ok)
    copy_rows(dc_n_ptr + c_rows, dc_state_ptr + c_rows, row_ok, H, BLOCK_H)  # slot 0 <- dc_n
    tl.debug_barrier()

    for s in range(T):
        t = step_time(s, T, 1 - direction).to(tl.int64)
        t_prev = t - 1 + 2 * direction
        first = (t_prev < 0) | (t_prev >= T)
        t_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1)
        step = t * B + rows64
        dh_read = dh_state_ptr + (s % 2) * h_slot + h_rows
        dh_write = dh_state_ptr + ((s + 1) % 2) * h_slot + h_rows
        dc_read = dc_state_ptr + (s % 2) * c_slot + c_rows
        dc_write = dc_state_ptr + ((s + 1) % 2) * c_slot + c_rows
        g_rows = step[:, None] * (D * 4 * H) + direction * 4 * H
        y_rows = step[:, None] * (D * K) + direction * K
        c_t_rows = step[:, None] * (D * H) + direction * H
        c_prev_rows = (t_prev * B + rows64)[:, None] * (D * H) + direction * H
        if HAS_LENGTHS:
            valid = (t < length)[:, None]
        else:
            valid = row_ok[:, None]
        flow = tl.zeros((BLOCK_B,), dtype=tl.float32)

        if HAS_PROJ:
            # Phase 0: the total gradient of h_t, tile by tile over P, into dhp.
            for p0 in range(0, K, BLOCK_H):
                cols_p = p0 + tl.arange(0, BLOCK_H)
                ok = row_ok[:, None] & (cols_p < K)[None, :]
                dh_t = tl.load(dy_ptr + y_rows + cols_p[None, :], mask=ok, other=0.0).to(tl.float32)
                dh_t += tl.load(dh_read + cols_p[None, :], mask=ok, other=0.0)
                if HAS_LENGTHS:
                    dh_t = tl.where(valid, dh_t, 0.0)
                if RECORD_FLOW:
                    flow += squared_row_norm(dh_t, valid)
                tl.store(dhp_ptr + y_rows + cols_p[None, :], dh_t.to(dhp_ptr.dtype.element_ty), mask=ok)
            tl.debug_barrier()
            # Phase 0b: dm = dhp W_hr, tile by tile over H, into dm_state.
            for n0 in range(0, H, BLOCK_H):
                cols_n = n0 + tl.arange(0, BLOCK_H)
                n_ok = cols_n < H
                dm = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for p0 in tl.range(0, K, REDUCE_TILE, num_stages=1):
                    cols_p = p0 + tl.arange(0, REDUCE_TILE)
                    p_ok = cols_p < K
                    dh_p = tl.load(dhp_ptr + y_rows + cols_p[None, :], mask=row_ok[:, None] & p_ok[None, :], other=0.0)
                    # w_r[p, n] = W_hr[d, p, n]
                    w_r = tl.load(w_hr_base + cols_p[:, None] * H + cols_n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0)
                    dm += tl.dot(dh_p.to(w_r.dtype), w_r, input_precision=INPUT_PRECISION)
                tl.store(dm_state_ptr + c_rows + cols_n[None, :], dm, mask=row_ok[:, None] & n_ok[None, :])
            tl.debug_barrier()

        # Phase 1: gate gradients and dc_{t-1}, tile by tile over H.
        for n0 in range(0, H, BLOCK_H):
            cols_n = n0 + tl.arange(0, BLOCK_H)
            n_ok = cols_n < H
            ok = row_ok[:, None] & n_ok[None, :]
            if HAS_PROJ:
                dm = tl.load(dm_state_ptr + c_rows + cols_n[None, :], mask=ok, other=0.0)
            else:
                dm = tl.load(dy_ptr + y_rows + cols_n[None, :], mask=ok, other=0.0).to(tl.float32)
                dm += tl.load(dh_read + cols_n[None, :], mask=ok, other=0.0)
                if RECORD_FLOW:
                    flow += squared_row_norm(dm, valid)
            offs = g_rows + cols_n[None, :]
            i = tl.load(gates_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            f = tl.load(gates_ptr + offs + H, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(gates_ptr + offs + 2 * H, mask=ok, other=0.0).to(tl.float32)
            o = tl.load(gates_ptr + offs + 3 * H, mask=ok, other=0.0).to(tl.float32)
            c_t = tl.load(c_ptr + c_t_rows + cols_n[None, :], mask=ok, other=0.0).to(tl.float32)
            c_prev = tl.load(c_ptr + c_prev_rows + cols_n[None, :], mask=ok, other=0.0).to(tl.float32)
            c_init = tl.load(c0_ptr + c_rows + cols_n[None, :], mask=ok, other=0.0).to(tl.float32)
            c_prev = tl.where(first, c_init, c_prev)
            dc = tl.load(dc_read + cols_n[None, :], mask=ok, other=0.0)
            # Past a row's length the saved gates (i = g = o = 0, f = 1) give zero gate
            # gradients and dc_prev = dc exactly.
            di, df, dg, do, dc_prev = lstm_cell_grad(dm, dc, i, f, g, o, c_t, c_prev, grad_clip, CLIP)
            tl.store(dc_write + cols_n[None, :], dc_prev, mask=ok)
            tl.store(dgates_ptr + offs, di.to(dgates_ptr.dtype.element_ty), mask=ok)
            tl.store(dgates_ptr + offs + H, df.to(dgates_ptr.dtype.element_ty), mask=ok)
            tl.store(dgates_ptr + offs + 2 * H, dg.to(dgates_ptr.dtype.element_ty), mask=ok)
            tl.store(dgates_ptr + offs + 3 * H, do.to(dgates_ptr.dtype.element_ty), mask=ok)
        if RECORD_FLOW:
            tl.store(flow_ptr + (direction * T + t) * B + rows64, flow, mask=row_ok)
        tl.debug_barrier()

        # Phase 2: dh_{t-1} = dgates W_hh, tile by tile over K. The four gates are one reduction
        # over r = q*H + n in [0, 4H): dgates and W_hh's rows are both contiguous in r.
        for k0 in range(0, K, BLOCK_H):
            cols_k = k0 + tl.arange(0, BLOCK_H)
            k_ok = cols_k < K
            acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
            for r0 in tl.range(0, 4 * H, REDUCE_TILE, num_stages=1):
                cols_r = r0 + tl.arange(0, REDUCE_TILE)
                r_ok = cols_r < 4 * H
                dr = tl.load(dgates_ptr + g_rows + cols_r[None, :], mask=row_ok[:, None] & r_ok[None, :], other=0.0)
                # w[r, j] = W_hh[d, r, j]
                w = tl.load(w_base + cols_r[:, None] * K + cols_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(dr.to(w.dtype), w, input_precision=INPUT_PRECISION)
            ok = row_ok[:, None] & k_ok[None, :]
            if HAS_LENGTHS:
                acc = tl.where(valid, acc, tl.load(dh_read + cols_k[None, :], mask=ok, other=0.0))
            tl.store(dh_write + cols_k[None, :], acc, mask=ok)
        tl.debug_barrier()

    dh_final = dh_state_ptr + (T % 2) * h_slot + h_rows
    dc_final = dc_state_ptr + (T % 2) * c_slot + c_rows
    for k0 in range(0, K, BLOCK_H):
        cols = k0 + tl.arange(0, BLOCK_H)
        ok = row_ok[:, None] & (cols < K)[None, :]
        dh = tl.load(dh_final + cols[None, :], mask=ok, other=0.0)
        tl.store(dh0_ptr + h_rows + cols[None, :], dh.to(dh0_ptr.dtype.element_ty), mask=ok)
    copy_rows(dc_final, dc0_ptr + c_rows, row_ok, H, BLOCK_H)


# ---------------------------------------------------------------------------- persistent strategy


@triton.jit
def batch_tile(group_rows, tile, B, d64, unit_ok, BLOCK_B: tl.constexpr):
    """Batch sub-tile ``tile`` of the group starting at row ``group_rows``: its ``BLOCK_B`` rows
    (the N side of the step's product), which are ``< B``, their index into ``(D, B, .)`` buffers
    (``(1, BLOCK_B)`` int64) and the ``(S_TILE, BLOCK_B)`` mask of the slice's units x rows."""
    rows = group_rows + tile * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    state_rows = (d64 * B + rows.to(tl.int64))[None, :]
    return rows, row_ok, state_rows, unit_ok[:, None] & row_ok[None, :]


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
def publish(values, dst, mask, own_flag, stage, piece, tile, BARRIER: tl.constexpr, FAULT: tl.constexpr,
            GROUP_TILES: tl.constexpr):
    """Store this program's part of the exchanged state for batch sub-tile ``tile`` (``values`` to
    ``dst``); after the last of the ``GROUP_TILES`` sub-tiles, arrive with ``stage + 1`` phases done
    (``FAULT_ARRIVE_EARLY``: before the first store, a test-only mutation)."""
    if BARRIER:
        if FAULT == FAULT_ARRIVE_EARLY:
            if tile == 0:
                arrive(own_flag, stage + 1, piece, FAULT)
    tl.store(dst, values.to(dst.dtype.element_ty), mask=mask)
    if BARRIER:
        if FAULT != FAULT_ARRIVE_EARLY:
            if tile == GROUP_TILES - 1:
                arrive(own_flag, stage + 1, piece, FAULT)


@triton.jit
def load_weight_slice(w_dir_ptr, w_rows, r_ok, K, cols_k, k_ok, cols_tail, tail_ok,
                      BLOCK_HOUT: tl.constexpr, BLOCK_HTAIL: tl.constexpr, KC: tl.constexpr):
    """A persistent program's slice of ``W_hh``, loaded once for the whole sequence (forward and
    backward hold the same one): ``w_dir_ptr`` is the direction's ``W_hh (4H, K)``, row-major;
    ``w_rows (R,)`` its rows the program holds (the slice's gates stacked, ``R = 4*S_TILE``),
    ``r_ok (R,)`` which of them exist. The reduction over ``h`` in the two parts of
    ``fastrnn.ops.persistent.reduction_split``: ``cols_k (BLOCK_HOUT,)`` the head part's columns,
    ``cols_tail (TAIL,)`` the tail's (``BLOCK_HOUT ...``), ``k_ok``, ``tail_ok`` their masks
    (``< K``). Returns ``(w, w_tail)``: ``w`` the head part, ``(R, BLOCK_HOUT)``, or with ``KC > 0``
    a tuple of its ``BLOCK_HOUT // KC`` chunks of ``(R, KC)`` (columns ``j*KC ...``); ``w_tail``
    ``(R, BLOCK_HTAIL)``, or ``w`` itself when ``BLOCK_HTAIL == 0`` (no tail: never used)."""
    if KC > 0:
        w = ()
        for j in tl.static_range(BLOCK_HOUT // KC):
            cols_j = j * KC + tl.arange(0, KC)
            w = w + (tl.load(w_dir_ptr + w_rows[:, None] * K + cols_j[None, :], mask=r_ok[:, None] & (cols_j < K)[None, :], other=0.0),)
    else:
        w = tl.load(w_dir_ptr + w_rows[:, None] * K + cols_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
    if BLOCK_HTAIL > 0:
        w_tail = tl.load(w_dir_ptr + w_rows[:, None] * K + cols_tail[None, :], mask=r_ok[:, None] & tail_ok[None, :], other=0.0)
    else:
        w_tail = w
    return w, w_tail


@triton.jit
def _gate_stage(
    gx_ptr, w, w_tail, w_rows, r_ok, cols_k, k_ok, cols_tail, tail_ok, h_read, h_write, h_final, m_exchange_ptr, y_ptr, gates_ptr, c_ptr, c,
    s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows, units, tile_ok,
    flags, own_flag, piece, n_slices, error_ptr, max_spins, tile,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BARRIER: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, FAULT: tl.constexpr, S_TILE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_HTAIL: tl.constexpr,
    GROUP_TILES: tl.constexpr, BLOCK_KC: tl.constexpr,
    keep_ptr, cand_ptr, zoneout_p, ZONEOUT: tl.constexpr,
):
    """Walk step ``s`` (time ``t``) on batch sub-tile ``tile`` (rows ``rows``): the slice's gates
    from the whole ``h_{t-1}`` (``h_read``, in two parts of ``BLOCK_HOUT`` and ``BLOCK_HTAIL``
    units when ``BLOCK_HTAIL > 0``; with ``BLOCK_KC > 0`` the head part's weights ``w`` are a tuple
    of ``BLOCK_KC``-wide chunks and ``h`` is read and multiplied chunk by chunk into one
    accumulator), the cell update, the saved ``gates`` and ``c``; publishes ``m_t`` (projecting)
    or ``h_t``. With ``ZONEOUT`` the candidate ``c'`` goes to ``cand`` and the slice's units of
    ``c_t`` (and, without projection, of ``h_t``, read from ``h_read``) are zoned before they are
    stored and published. Returns ``c_t``."""
    step = (t * B + rows.to(tl.int64))[None, :]
    # gx does not depend on the other programs: fetched before the wait.
    pre = tl.load(gx_ptr + step * (D * 4 * H) + direction * 4 * H + w_rows[:, None], mask=r_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
    if BARRIER:
        if s > 0:
            if tile == 0:
                wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
    if BLOCK_KC > 0:  # w: a tuple of BLOCK_KC-wide chunks of the head part; h_{t-1} streamed chunk by chunk
        for j in tl.static_range(len(w)):
            cols_j = j * BLOCK_KC + tl.arange(0, BLOCK_KC)
            h_part = tl.load(h_read + cols_j[:, None], mask=(cols_j < K)[:, None] & row_ok[None, :], other=0.0)
            pre += weight_product(w[j], h_part.to(w[j].dtype), INPUT_PRECISION)
    else:
        h_prev = tl.load(h_read + cols_k[:, None], mask=k_ok[:, None] & row_ok[None, :], other=0.0)
        pre += weight_product(w, h_prev.to(w.dtype), INPUT_PRECISION)
    if BLOCK_HTAIL > 0:
        h_tail = tl.load(h_read + cols_tail[:, None], mask=tail_ok[:, None] & row_ok[None, :], other=0.0)
        pre += weight_product(w_tail, h_tail.to(w_tail.dtype), INPUT_PRECISION)
    i, f, g, o = split_gates(pre, S_TILE, BLOCK_B)
    c_prev = c
    i, f, g, o, c, m = lstm_cell(i, f, g, o, c, valid, HAS_LENGTHS)
    gate_offs = step * (D * 4 * H) + direction * 4 * H + units[:, None]
    tl.store(gates_ptr + gate_offs, i.to(gates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + H, f.to(gates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + 2 * H, g.to(gates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(gates_ptr + gate_offs + 3 * H, o.to(gates_ptr.dtype.element_ty), mask=tile_ok)
    if ZONEOUT != 0:  # the slice's own units of c: the cell's candidate saved, then mixed with c_{t-1}
        c_offs = step * (D * H) + direction * H + units[:, None]
        tl.store(cand_ptr + c_offs, c.to(cand_ptr.dtype.element_ty), mask=tile_ok)
        keep = zoneout_keep(keep_ptr, c_offs, tile_ok, zoneout_p, ZONEOUT)
        c = keep * c_prev + (1.0 - keep) * c
        if HAS_LENGTHS:
            c = tl.where(valid, c, c_prev)
    tl.store(c_ptr + step * (D * H) + direction * H + units[:, None], c.to(c_ptr.dtype.element_ty), mask=tile_ok)
    if HAS_PROJ:
        publish(m, m_exchange_ptr + state_rows * H + units[:, None], tile_ok, own_flag, stage, piece, tile, BARRIER, FAULT, GROUP_TILES)
    else:
        if ZONEOUT != 0:  # the slice's own units of h (K = H: the mask's units of c): the exchanged h_t is the zoned one
            h_prev = tl.load(h_read + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
            m = keep * h_prev + (1.0 - keep) * m
            if HAS_LENGTHS:  # past a row's length y is 0 and h keeps its value
                tl.store(y_ptr + step * (D * K) + direction * K + units[:, None], tl.where(valid, m, 0.0).to(y_ptr.dtype.element_ty), mask=tile_ok)
                m = tl.where(valid, m, h_prev)
            else:
                tl.store(y_ptr + step * (D * K) + direction * K + units[:, None], m.to(y_ptr.dtype.element_ty), mask=tile_ok)
        else:
            tl.store(y_ptr + step * (D * K) + direction * K + units[:, None], m.to(y_ptr.dtype.element_ty), mask=tile_ok)
            if HAS_LENGTHS:  # past a row's length h keeps its value
                m = tl.where(valid, m, tl.load(h_read + units[:, None], mask=tile_ok, other=0.0).to(tl.float32))
        if s == T - 1:
            tl.store(h_final + units[:, None], m.to(h_final.dtype.element_ty), mask=tile_ok)
        publish(m, h_write + units[:, None], tile_ok, own_flag, stage, piece, tile, BARRIER, FAULT, GROUP_TILES)
    return c


@triton.jit
def _projection_stage(
    w_r, cols_h, proj_units, proj_ok, h_read, h_write, h_final, m_exchange_ptr, y_ptr,
    s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows,
    flags, own_flag, piece, n_slices, error_ptr, max_spins, tile,
    HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr, BARRIER: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, FAULT: tl.constexpr, GROUP_TILES: tl.constexpr, PROJ_SPLIT: tl.constexpr,
    keep_ptr, zoneout_p, ZONEOUT: tl.constexpr,
):
    """Walk step ``s``'s projection on batch sub-tile ``tile``: the program's projected units of
    ``h_t = W_hr m_t`` from the whole ``m_t``, to ``y`` and published (and to ``h_n`` at the last step).
    With ``ZONEOUT`` they are zoned first, by the mask's first ``P`` units of the direction."""
    if BARRIER:
        if tile == 0:
            wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
    if PROJ_SPLIT > 1:  # m_all[c, k, b] = m[rows[b], cols_h[c, k]]: the chunks' products summed (split_product)
        m_all = tl.load(m_exchange_ptr + state_rows[None, :, :] * H + cols_h[:, :, None], mask=(cols_h < H)[:, :, None] & row_ok[None, None, :],
                        other=0.0)
        h_new = split_product(w_r, m_all.to(w_r.dtype), INPUT_PRECISION)
    else:
        m_all = tl.load(m_exchange_ptr + state_rows * H + cols_h[:, None], mask=(cols_h < H)[:, None] & row_ok[None, :], other=0.0)
        h_new = weight_product(w_r, m_all.to(w_r.dtype), INPUT_PRECISION)
    proj_tile = proj_ok[:, None] & row_ok[None, :]
    step = (t * B + rows.to(tl.int64))[None, :]
    if ZONEOUT != 0:  # the program's own projected units: the exchanged h_t is the zoned one
        h_prev = tl.load(h_read + proj_units[:, None], mask=proj_tile, other=0.0).to(tl.float32)
        keep = zoneout_keep(keep_ptr, step * (D * H) + direction * H + proj_units[:, None], proj_tile, zoneout_p, ZONEOUT)
        h_new = keep * h_prev + (1.0 - keep) * h_new
        if HAS_LENGTHS:  # past a row's length y is 0 and h keeps its value
            tl.store(y_ptr + step * (D * K) + direction * K + proj_units[:, None], tl.where(valid, h_new, 0.0).to(y_ptr.dtype.element_ty),
                     mask=proj_tile)
            h_new = tl.where(valid, h_new, h_prev)
        else:
            tl.store(y_ptr + step * (D * K) + direction * K + proj_units[:, None], h_new.to(y_ptr.dtype.element_ty), mask=proj_tile)
    else:
        tl.store(y_ptr + step * (D * K) + direction * K + proj_units[:, None], h_new.to(y_ptr.dtype.element_ty), mask=proj_tile)
        if HAS_LENGTHS:  # m = 0 past a row's length, so y is 0 there; h keeps its value
            h_new = tl.where(valid, h_new, tl.load(h_read + proj_units[:, None], mask=proj_tile, other=0.0).to(tl.float32))
    if s == T - 1:
        tl.store(h_final + proj_units[:, None], h_new.to(h_final.dtype.element_ty), mask=proj_tile)
    publish(h_new, h_write + proj_units[:, None], proj_tile, own_flag, stage, piece, tile, BARRIER, FAULT, GROUP_TILES)


@triton.jit(do_not_specialize=["phase_begin", "phase_end", "T"])
def lstm_fwd_persistent_kernel(
    gx_ptr, w_hh_ptr, w_hr_ptr, h0_ptr, c0_ptr, lengths_ptr, y_ptr, h_n_ptr, gates_ptr, c_ptr,
    h_exchange_ptr, m_exchange_ptr, carry_ptr, flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
    T, B, H, K, D,
    HAS_PROJ: tl.constexpr, HAS_LENGTHS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SLICE: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_FLAGS: tl.constexpr, BARRIER: tl.constexpr, FAULT: tl.constexpr, BLOCK_HOUT: tl.constexpr,
    BLOCK_HTAIL: tl.constexpr, GROUP_TILES: tl.constexpr, BLOCK_KC: tl.constexpr,
    keep_ptr=None, cand_ptr=None, zoneout_p=None, ZONEOUT: tl.constexpr = 0,
):
    """Forward phases ``phase_begin ... phase_end - 1`` (``T`` per direction, ``2T`` projecting:
    phase ``2i`` the gates of walk step ``i``, ``2i + 1`` its projection). Writes ``y``, ``h_n``, the
    saved ``gates`` and ``c``, the exchanges and ``carry`` (``c`` between per-step launches: fp32
    ``(D, B, H)``). The walk's first step reads ``h0`` (and ``c0`` when ``phase_begin = 0``).
    ``BLOCK_K >= H``, ``BLOCK_HOUT + BLOCK_HTAIL >= K``, ``BLOCK_S`` the next power of two >=
    ``max(SP, 16)`` (the projected units, ``SP <= SLICE`` per program: ``projected_block``), ``BLOCK_FLAGS >= n_slices``; program
    ``(s, g, d)`` walks batch rows ``g*GROUP_TILES*BLOCK_B ...`` in ``GROUP_TILES`` sub-tiles.
    ``BLOCK_KC``: 0, or the width of the chunks the head part of the reduction is held and read in
    (a power of two; capped at ``BLOCK_HOUT``). ``keep_ptr``, ``cand_ptr``, ``zoneout_p``,
    ``ZONEOUT``: zoneout as the module docstring says, each program mixing its own units of ``c_t``
    and ``h_t`` (its projected units, projecting) before they are stored and published."""
    S: tl.constexpr = SLICE
    S_TILE: tl.constexpr = SLICE if SLICE >= 4 else 4  # 4 * S_TILE >= 16: tl.dot's smallest M
    # The projection's reduction over the H units of m in PROJ_SPLIT chunks, one batched (3-D) dot
    # (fastrnn.kernels.recurrence.split_product), 16-bit only: its weights (BLOCK_S x BLOCK_K) sit on
    # M = 16 rows, so a 2-D dot holds all of them in every warp (H504 P252 bidirectional, sm_90:
    # 255 registers and a 112-120 B stack frame on Triton 3.6 and 3.9; split, each warp holds its
    # chunks: 185 / 253 registers, no frame). As the GRU's split: 8 chunks from BLOCK_K 128 up, else
    # chunks of 16. fp32 (tf32x4 products) keeps the 2-D dot.
    PROJ_SPLIT: tl.constexpr = (8 if BLOCK_K >= 128 else BLOCK_K // 16) if w_hr_ptr.dtype.element_ty != tl.float32 else 1
    piece = tl.program_id(0)
    group = tl.program_id(1)
    direction = tl.program_id(2)
    n_slices = tl.num_programs(0)
    d64 = direction.to(tl.int64)
    group_rows = group * (GROUP_TILES * BLOCK_B)  # the group's first batch row
    units = piece * S + tl.arange(0, S_TILE)
    unit_ok = (tl.arange(0, S_TILE) < S) & (units < H)
    # Gate rows of the slice, gate-major: row r = q*S_TILE + u is W_hh row q*H + s*S + u.
    r = tl.arange(0, 4 * S_TILE)
    r_unit = r % S_TILE
    w_rows = (r // S_TILE) * H + piece * S + r_unit
    r_ok = (r_unit < S) & (piece * S + r_unit < H)
    cols_k = tl.arange(0, BLOCK_HOUT)
    k_ok = cols_k < K
    # BLOCK_KC > 0: the head part as chunks of KC units, one tile each (see _gate_stage)
    KC: tl.constexpr = BLOCK_KC if BLOCK_KC < BLOCK_HOUT else BLOCK_HOUT
    TAIL: tl.constexpr = BLOCK_HTAIL if BLOCK_HTAIL > 0 else 16
    cols_tail = BLOCK_HOUT + tl.arange(0, TAIL)
    tail_ok = cols_tail < K
    w, w_tail = load_weight_slice(w_hh_ptr + d64 * 4 * H * K, w_rows, r_ok, K, cols_k, k_ok, cols_tail, tail_ok,
                                  BLOCK_HOUT, BLOCK_HTAIL, KC if BLOCK_KC > 0 else 0)
    if HAS_PROJ:
        # SP = cdiv(P, n_slices) <= SLICE projected units per program (the last ones may have none).
        sp = tl.cdiv(K, n_slices)
        proj_units = piece * sp + tl.arange(0, BLOCK_S)
        proj_ok = (tl.arange(0, BLOCK_S) < sp) & (proj_units < K)
        if PROJ_SPLIT > 1:  # w_r[c, u, k] = W_hr[proj_units[u], cols_h[c, k]], cols_h[c, k] = c*CHUNK + k
            cols_h = tl.arange(0, PROJ_SPLIT)[:, None] * (BLOCK_K // PROJ_SPLIT) + tl.arange(0, BLOCK_K // PROJ_SPLIT)[None, :]
            w_r = tl.load(w_hr_ptr + d64 * K * H + proj_units[None, :, None] * H + cols_h[:, None, :],
                          mask=proj_ok[None, :, None] & (cols_h < H)[:, None, :], other=0.0)
        else:
            cols_h = tl.arange(0, BLOCK_K)
            w_r = tl.load(w_hr_ptr + d64 * K * H + proj_units[:, None] * H + cols_h[None, :],
                          mask=proj_ok[:, None] & (cols_h < H)[None, :], other=0.0)
    flags, own_flag = group_flags(flags_ptr, n_slices, BLOCK_FLAGS)
    # The fp32 c of the slice: in registers for one sub-tile; walking several, in carry (this
    # program's own units and rows: read and written by this program only, a block barrier apart).
    rows, row_ok, state_rows, tile_ok = batch_tile(group_rows, 0, B, d64, unit_ok, BLOCK_B)
    if GROUP_TILES > 1:
        if phase_begin == 0:
            for tile in range(GROUP_TILES):
                rows, row_ok, state_rows, tile_ok = batch_tile(group_rows, tile, B, d64, unit_ok, BLOCK_B)
                c0 = tl.load(c0_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(carry_ptr + state_rows * H + units[:, None], c0, mask=tile_ok)
            tl.debug_barrier()
        c = tl.zeros((S_TILE, BLOCK_B), dtype=tl.float32)
    elif phase_begin == 0:
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
        # The walk's first step reads h0; step i > 0 reads slot i % 2; step i writes slot (i + 1) % 2.
        if s == 0:
            h_read_slot = h0_ptr
        else:
            h_read_slot = h_exchange_ptr + (s % 2) * h_slot
        h_write_slot = h_exchange_ptr + ((s + 1) % 2) * h_slot
        for tile in range(GROUP_TILES):
            rows, row_ok, state_rows, tile_ok = batch_tile(group_rows, tile, B, d64, unit_ok, BLOCK_B)
            if HAS_LENGTHS:
                valid = (t < tl.load(lengths_ptr + rows, mask=row_ok, other=0))[None, :]
            else:
                valid = row_ok[None, :]
            h_read = h_read_slot + state_rows * K
            h_write = h_write_slot + state_rows * K
            h_final = h_n_ptr + state_rows * K
            if (not HAS_PROJ) or (stage % 2 == 0):
                if GROUP_TILES > 1:
                    c = tl.load(carry_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0)
                c = _gate_stage(gx_ptr, w, w_tail, w_rows, r_ok, cols_k, k_ok, cols_tail, tail_ok, h_read, h_write, h_final, m_exchange_ptr,
                                y_ptr, gates_ptr, c_ptr, c, s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows, units,
                                tile_ok, flags, own_flag, piece, n_slices, error_ptr, max_spins, tile,
                                HAS_PROJ, HAS_LENGTHS, INPUT_PRECISION, BARRIER, BLOCK_FLAGS, FAULT, S_TILE, BLOCK_B, BLOCK_HTAIL,
                                GROUP_TILES, KC if BLOCK_KC > 0 else 0, keep_ptr, cand_ptr, zoneout_p, ZONEOUT)
                if GROUP_TILES > 1:
                    tl.store(carry_ptr + state_rows * H + units[:, None], c, mask=tile_ok)
            else:
                _projection_stage(w_r, cols_h, proj_units, proj_ok, h_read, h_write, h_final, m_exchange_ptr, y_ptr,
                                  s, t, valid, stage, T, B, H, K, D, direction, rows, row_ok, state_rows,
                                  flags, own_flag, piece, n_slices, error_ptr, max_spins, tile,
                                  HAS_LENGTHS, INPUT_PRECISION, BARRIER, BLOCK_FLAGS, FAULT, GROUP_TILES, PROJ_SPLIT,
                                  keep_ptr, zoneout_p, ZONEOUT)
    if GROUP_TILES == 1:
        rows, row_ok, state_rows, tile_ok = batch_tile(group_rows, 0, B, d64, unit_ok, BLOCK_B)
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
def _cell_grad_stage(dm, dc, w, w_tail, gates_ptr, c_ptr, c0_ptr, dgates_ptr, dh_partial_ptr, t, T, B, H, K, D, direction, rows,
                     state_rows, units, tile_ok, cols_k, k_ok, cols_tail, tail_ok, row_ok, grad_clip, own_flag, stage, piece, tile,
                     CLIP: tl.constexpr, INPUT_PRECISION: tl.constexpr, S_TILE: tl.constexpr, BLOCK_B: tl.constexpr,
                     BARRIER: tl.constexpr, FAULT: tl.constexpr, BLOCK_HTAIL: tl.constexpr, GROUP_TILES: tl.constexpr,
                     BLOCK_KC: tl.constexpr, keep, cand_ptr, valid, HAS_LENGTHS: tl.constexpr, ZONEOUT: tl.constexpr):
    """Step ``t``'s gate gradients of the slice (``(S_TILE, BLOCK_B)`` tiles) from ``dm = dL/dm_t``
    and the carried ``dc = dL/dc_t``: stored to ``dgates``, and this program's partial
    ``dh_{t-1}^T = W_slice^T dgates_slice^T`` (all ``K`` units) to ``dh_partial``; returns ``dL/dc_{t-1}``.
    With ``ZONEOUT`` the cell sees ``(1 - keep) * dc`` and the candidate ``cand`` as its ``c_t``, and
    ``keep * dc`` passes straight to ``dc_{t-1}`` (``keep``: the slice's zoneout weights, as
    ``zoneout_keep`` reads them; ``valid``: past a row's length ``dc`` passes whole)."""
    step = (t * B + rows.to(tl.int64))[None, :]
    g_offs = step * (D * 4 * H) + direction * 4 * H + units[:, None]
    i = tl.load(gates_ptr + g_offs, mask=tile_ok, other=0.0).to(tl.float32)
    f = tl.load(gates_ptr + g_offs + H, mask=tile_ok, other=0.0).to(tl.float32)
    g = tl.load(gates_ptr + g_offs + 2 * H, mask=tile_ok, other=0.0).to(tl.float32)
    o = tl.load(gates_ptr + g_offs + 3 * H, mask=tile_ok, other=0.0).to(tl.float32)
    c_cols = direction * H + units[:, None]
    if ZONEOUT != 0:  # the cell's own c_t before zoneout mixed it with c_{t-1}
        c_t = tl.load(cand_ptr + step * (D * H) + c_cols, mask=tile_ok, other=0.0).to(tl.float32)
    else:
        c_t = tl.load(c_ptr + step * (D * H) + c_cols, mask=tile_ok, other=0.0).to(tl.float32)
    # The state the forward step read: c[t-1] (forward direction) / c[t+1] (reverse), c0 at the walk's start.
    t_prev = t - 1 + 2 * direction
    first = (t_prev < 0) | (t_prev >= T)
    t_prev = tl.minimum(tl.maximum(t_prev, 0), T - 1)
    c_init = tl.load(c0_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
    c_prev = tl.load(c_ptr + (t_prev * B + rows.to(tl.int64))[None, :] * (D * H) + c_cols, mask=tile_ok, other=0.0).to(tl.float32)
    c_prev = tl.where(first, c_init, c_prev)
    # Past a row's length the saved gates (i = g = o = 0, f = 1) give zero gate gradients and dc_{t-1} = dc.
    if ZONEOUT != 0:  # the kept part of dc goes straight to the slice's own units of dc_{t-1}
        di, df, dg, do, dc_prev = lstm_cell_grad(dm, (1.0 - keep) * dc, i, f, g, o, c_t, c_prev, grad_clip, CLIP)
        dc_prev += keep * dc
        if HAS_LENGTHS:
            dc_prev = tl.where(valid, dc_prev, dc)
    else:
        di, df, dg, do, dc_prev = lstm_cell_grad(dm, dc, i, f, g, o, c_t, c_prev, grad_clip, CLIP)
    tl.store(dgates_ptr + g_offs, di.to(dgates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dgates_ptr + g_offs + H, df.to(dgates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dgates_ptr + g_offs + 2 * H, dg.to(dgates_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(dgates_ptr + g_offs + 3 * H, do.to(dgates_ptr.dtype.element_ty), mask=tile_ok)
    # The same rounding of the gate gradients as the resident kernel's product (to the weight dtype).
    if BLOCK_KC > 0:  # w: a tuple of BLOCK_KC-wide chunks of the head part; the partial formed and stored chunk by chunk
        d_slice = join_gates(di, df, dg, do, S_TILE, BLOCK_B).to(w[0].dtype)
        for j in tl.static_range(len(w)):
            cols_j = j * BLOCK_KC + tl.arange(0, BLOCK_KC)
            partial = weight_product(tl.trans(w[j]), d_slice, INPUT_PRECISION)  # (BLOCK_KC, BLOCK_B)
            if BLOCK_HTAIL == 0 and j == len(w) - 1:
                publish(partial, dh_partial_ptr + state_rows * K + cols_j[:, None], (cols_j < K)[:, None] & row_ok[None, :], own_flag,
                        stage, piece, tile, BARRIER, FAULT, GROUP_TILES)
            else:
                tl.store(dh_partial_ptr + state_rows * K + cols_j[:, None], partial, mask=(cols_j < K)[:, None] & row_ok[None, :])
        if BLOCK_HTAIL > 0:
            partial = weight_product(tl.trans(w_tail), d_slice, INPUT_PRECISION)  # (BLOCK_HTAIL, BLOCK_B)
            publish(partial, dh_partial_ptr + state_rows * K + cols_tail[:, None], tail_ok[:, None] & row_ok[None, :], own_flag, stage, piece,
                    tile, BARRIER, FAULT, GROUP_TILES)
    else:
        d_slice = join_gates(di, df, dg, do, S_TILE, BLOCK_B).to(w.dtype)
        partial = weight_product(tl.trans(w), d_slice, INPUT_PRECISION)  # (BLOCK_HOUT, BLOCK_B)
        if BLOCK_HTAIL > 0:
            tl.store(dh_partial_ptr + state_rows * K + cols_k[:, None], partial, mask=k_ok[:, None] & row_ok[None, :])
            partial = weight_product(tl.trans(w_tail), d_slice, INPUT_PRECISION)  # (BLOCK_HTAIL, BLOCK_B)
            publish(partial, dh_partial_ptr + state_rows * K + cols_tail[:, None], tail_ok[:, None] & row_ok[None, :], own_flag, stage, piece,
                    tile, BARRIER, FAULT, GROUP_TILES)
        else:
            publish(partial, dh_partial_ptr + state_rows * K + cols_k[:, None], k_ok[:, None] & row_ok[None, :], own_flag, stage, piece,
                    tile, BARRIER, FAULT, GROUP_TILES)
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
    BLOCK_HTAIL: tl.constexpr, GROUP_TILES: tl.constexpr, BLOCK_KC: tl.constexpr,
    keep_ptr=None, cand_ptr=None, zoneout_p=None, ZONEOUT: tl.constexpr = 0, ZONEOUT_KC: tl.constexpr = 0,
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

    ``flow`` (``RECORD_FLOW``): ``(n_slices, D, T, B)`` fp32, program ``s``'s share of
    ``||dL/dh_t||^2`` in plane ``s``. ``dh_carry (D, B, K)``, ``dc_carry (D, B, H)``: fp32, the carried
    ``dh``, ``dc`` between per-step launches (read when ``phase_begin > 0``; the first phase reads
    ``dh_n``, ``dc_n``). Same tile sizes as the forward (``BLOCK_B``, ``GROUP_TILES``, ``BLOCK_KC``:
    the backward's own, ``BLOCK_KC`` the chunks its partial of ``dh_{t-1}`` is formed in).
    ``keep_ptr``, ``cand_ptr``, ``zoneout_p``, ``ZONEOUT``: zoneout as the module docstring says: the
    step sees ``(1 - keep) * dh_t`` (to ``dhp`` and the products) and ``(1 - keep) * dc``, and the kept
    parts pass straight to the program's own units of ``dh_{t-1}`` (in ``dh_partial``'s extra plane,
    ``(2, n_slices + 1, D, B, K)`` with zoneout, summed with the other partials) and ``dc_{t-1}``;
    ``keep`` read after the wait. ``ZONEOUT_KC``: with zoneout, the width of the chunks the partial
    of ``dh_{t-1}`` is formed in where the plan holds the head part whole (``BLOCK_KC = 0``; 0: whole)."""
    S: tl.constexpr = SLICE
    S_TILE: tl.constexpr = SLICE if SLICE >= 4 else 4
    # Partials summed per load: 8; projecting in barrier mode 4, except the sum of dm with tf32
    # products (fp32): 8 (GATHER_DH, GATHER_DM). Measured on Triton 3.6 at the gate's projecting
    # barrier forms (bidirectional, lengths): fp32 H248 P124 with both sums at 4 keeps a 24 B stack
    # frame on sm_90, both at 8 128 B on sm_80 (dh at 8, dm at 4: 32 B there), dh at 4 and dm at 8
    # none on either arch (none on Triton 3.9 either way); bf16 with dm at 8 keeps 24 B (H504 P252)
    # and 8 B (H1016 P508) on sm_90, none at 4. Earlier, at 4 the per-step backward kept 8 B: it sums 8.
    GATHER: tl.constexpr = BLOCK_FLAGS if BLOCK_FLAGS <= 8 else 8
    GATHER_DH: tl.constexpr = (BLOCK_FLAGS if BLOCK_FLAGS <= 4 else 4) if HAS_PROJ and BARRIER else GATHER
    GATHER_DM: tl.constexpr = GATHER if INPUT_PRECISION == "tf32" else GATHER_DH
    piece = tl.program_id(0)
    group = tl.program_id(1)
    direction = tl.program_id(2)
    n_slices = tl.num_programs(0)
    d64 = direction.to(tl.int64)
    group_rows = group * (GROUP_TILES * BLOCK_B)  # the group's first batch row
    units = piece * S + tl.arange(0, S_TILE)  # the slice's cell units
    unit_ok = (tl.arange(0, S_TILE) < S) & (units < H)
    # The forward's rows of W_hh: the partial of dh_{t-1} is W_slice^T dgates_slice^T.
    r = tl.arange(0, 4 * S_TILE)
    r_unit = r % S_TILE
    w_rows = (r // S_TILE) * H + piece * S + r_unit
    r_ok = (r_unit < S) & (piece * S + r_unit < H)
    cols_k = tl.arange(0, BLOCK_HOUT)
    k_ok = cols_k < K
    # BLOCK_KC > 0: the head part as chunks of KC units, one tile each (see _cell_grad_stage)
    # (ZONEOUT_KC: the launcher's chunks with zoneout without projection, where the plan has none:
    # whole, L1's zoneout backward took 255 registers and a 48 B stack frame on sm_90, Triton 3.9;
    # in chunks of 256, 223 and none)
    BWD_KC: tl.constexpr = BLOCK_KC if BLOCK_KC > 0 else ZONEOUT_KC
    KC: tl.constexpr = BWD_KC if BWD_KC < BLOCK_HOUT else BLOCK_HOUT
    TAIL: tl.constexpr = BLOCK_HTAIL if BLOCK_HTAIL > 0 else 16
    cols_tail = BLOCK_HOUT + tl.arange(0, TAIL)
    tail_ok = cols_tail < K
    w, w_tail = load_weight_slice(w_hh_ptr + d64 * 4 * H * K, w_rows, r_ok, K, cols_k, k_ok, cols_tail, tail_ok,
                                  BLOCK_HOUT, BLOCK_HTAIL, KC if BWD_KC > 0 else 0)
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
    flags, own_flag = group_flags(flags_ptr, n_slices, BLOCK_FLAGS)
    # The fp32 dh (the program's units of h) and dc (its slice): in registers for one sub-tile;
    # walking several, in dh_carry, dc_carry (this program's own units and rows only).
    rows, row_ok, state_rows, tile_ok = batch_tile(group_rows, 0, B, d64, unit_ok, BLOCK_B)
    dh_tile = dh_ok[:, None] & row_ok[None, :]
    if GROUP_TILES > 1:
        if phase_begin == 0:
            for tile in range(GROUP_TILES):
                rows, row_ok, state_rows, tile_ok = batch_tile(group_rows, tile, B, d64, unit_ok, BLOCK_B)
                dh_tile = dh_ok[:, None] & row_ok[None, :]
                dh_last = tl.load(dh_n_ptr + state_rows * K + dh_units[:, None], mask=dh_tile, other=0.0).to(tl.float32)
                tl.store(dh_carry_ptr + state_rows * K + dh_units[:, None], dh_last, mask=dh_tile)
                dc_last = tl.load(dc_n_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
                tl.store(dc_carry_ptr + state_rows * H + units[:, None], dc_last, mask=tile_ok)
            tl.debug_barrier()
        dh = tl.zeros((DH_TILE, BLOCK_B), dtype=tl.float32)
        dc = tl.zeros((S_TILE, BLOCK_B), dtype=tl.float32)
    elif phase_begin == 0:
        dh = tl.load(dh_n_ptr + state_rows * K + dh_units[:, None], mask=dh_tile, other=0.0).to(tl.float32)
        dc = tl.load(dc_n_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0).to(tl.float32)
    else:
        dh = tl.load(dh_carry_ptr + state_rows * K + dh_units[:, None], mask=dh_tile, other=0.0)
        dc = tl.load(dc_carry_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0)
    # With zoneout dh_partial has one plane more, plane n_slices: each program's kept part of dh_t at
    # its own units, one more partial of dh_{t-1} (summed with the others; not held across the products)
    dh_planes = n_slices + 1 if ZONEOUT != 0 else n_slices
    dh_slot = dh_planes * D * B * K  # elements per ping-pong slot of the partials
    dm_slot = n_slices * D * B * H

    for stage in range(phase_begin, phase_end):
        if HAS_PROJ:
            s = stage // 2
        else:
            s = stage
        # The reverse of the forward walk (t clamped at s = T, where only dh_0 is formed).
        t = step_time(tl.minimum(s, T - 1), T, 1 - direction).to(tl.int64)
        for tile in range(GROUP_TILES):
            rows, row_ok, state_rows, tile_ok = batch_tile(group_rows, tile, B, d64, unit_ok, BLOCK_B)
            dh_tile = dh_ok[:, None] & row_ok[None, :]
            if GROUP_TILES > 1:
                dh = tl.load(dh_carry_ptr + state_rows * K + dh_units[:, None], mask=dh_tile, other=0.0)
                dc = tl.load(dc_carry_ptr + state_rows * H + units[:, None], mask=tile_ok, other=0.0)
            if HAS_LENGTHS:
                length = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
                valid = (t < length)[None, :]
            else:
                valid = row_ok[None, :]
            step = (t * B + rows.to(tl.int64))[None, :]
            own_partial = dh_partial_ptr + (s % 2) * dh_slot + piece * (D * B * K)
            if (not HAS_PROJ) or (stage % 2 == 0):
                dy_t = tl.load(dy_ptr + step * (D * K) + direction * K + dh_units[:, None], mask=dh_tile, other=0.0).to(tl.float32)
                if s > 0:
                    if BARRIER:
                        if tile == 0:
                            wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
                    dh_new = gather_partials(dh_partial_ptr + ((s - 1) % 2) * dh_slot, dh_planes, D * B * K, state_rows, K, dh_units, dh_tile,
                                             GATHER_DH, DH_TILE, BLOCK_B)
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
                        share = tl.sum(tl.where(dh_tile, dh_t * dh_t, 0.0), axis=0)
                        tl.store(flow_ptr + ((piece * D + direction) * T + t) * B + rows, share, mask=row_ok)
                    if ZONEOUT != 0:  # the kept part of dh_t is the program's partial of its own units of dh_{t-1}; the step sees the rest
                        keep = zoneout_keep(keep_ptr, step * (D * H) + direction * H + dh_units[:, None], dh_tile, zoneout_p, ZONEOUT)
                        tl.store(dh_partial_ptr + (s % 2) * dh_slot + n_slices * (D * B * K) + state_rows * K + dh_units[:, None], keep * dh_t,
                                 mask=dh_tile)
                        dh_t = (1.0 - keep) * dh_t
                    if HAS_PROJ:
                        tl.store(dhp_ptr + step * (D * K) + direction * K + dh_units[:, None], dh_t.to(dhp_ptr.dtype.element_ty), mask=dh_tile)
                        dm_part = weight_product(tl.trans(w_r), dh_t.to(w_r.dtype), INPUT_PRECISION)  # (BLOCK_K, BLOCK_B)
                        publish(dm_part, dm_partial_ptr + (s % 2) * dm_slot + piece * (D * B * H) + state_rows * H + cols_h[:, None],
                                h_ok[:, None] & row_ok[None, :], own_flag, stage, piece, tile, BARRIER, FAULT, GROUP_TILES)
                    else:
                        # without projection the units of h are the slice's: the same keep weighs dc
                        dc = _cell_grad_stage(dh_t, dc, w, w_tail, gates_ptr, c_ptr, c0_ptr, dgates_ptr, own_partial, t, T, B, H, K, D, direction, rows,
                                              state_rows, units, tile_ok, cols_k, k_ok, cols_tail, tail_ok, row_ok, grad_clip, own_flag, stage, piece,
                                              tile, CLIP, INPUT_PRECISION, S_TILE, BLOCK_B, BARRIER, FAULT, BLOCK_HTAIL, GROUP_TILES,
                                              KC if BWD_KC > 0 else 0, keep if ZONEOUT != 0 else None, cand_ptr, valid, HAS_LENGTHS, ZONEOUT)
                else:
                    tl.store(dh0_ptr + state_rows * K + dh_units[:, None], dh.to(dh0_ptr.dtype.element_ty), mask=dh_tile)
                    tl.store(dc0_ptr + state_rows * H + units[:, None], dc.to(dc0_ptr.dtype.element_ty), mask=tile_ok)
            else:
                if BARRIER:
                    if tile == 0:
                        wait(flags, n_slices, stage, error_ptr, max_spins, BLOCK_FLAGS, FAULT)
                dm = gather_partials(dm_partial_ptr + (s % 2) * dm_slot, n_slices, D * B * H, state_rows, H, units, tile_ok,
                                     GATHER_DM, S_TILE, BLOCK_B)
                if ZONEOUT != 0:  # the slice's units of c
                    keep = zoneout_keep(keep_ptr, step * (D * H) + direction * H + units[:, None], tile_ok, zoneout_p, ZONEOUT)
                dc = _cell_grad_stage(dm, dc, w, w_tail, gates_ptr, c_ptr, c0_ptr, dgates_ptr, own_partial, t, T, B, H, K, D, direction, rows,
                                      state_rows, units, tile_ok, cols_k, k_ok, cols_tail, tail_ok, row_ok, grad_clip, own_flag, stage, piece,
                                      tile, CLIP, INPUT_PRECISION, S_TILE, BLOCK_B, BARRIER, FAULT, BLOCK_HTAIL, GROUP_TILES,
                                              KC if BWD_KC > 0 else 0, keep if ZONEOUT != 0 else None, cand_ptr, valid, HAS_LENGTHS, ZONEOUT)
            if GROUP_TILES > 1:
                tl.store(dh_carry_ptr + state_rows * K + dh_units[:, None], dh, mask=dh_tile)
                tl.store(dc_carry_ptr + state_rows * H + units[:, None], dc, mask=tile_ok)
    if GROUP_TILES == 1:
        rows, row_ok, state_rows, tile_ok = batch_tile(group_rows, 0, B, d64, unit_ok, BLOCK_B)
        dh_tile = dh_ok[:, None] & row_ok[None, :]
        # Scalar bases plus the rows' offsets, not state_rows' (the same addresses): the prologue's
        # state_rows * K, kept across the walk for this store alone, was parked on the stack
        # (sm_90, Triton 3.6, H504 P252 bidirectional: 8 B).
        rows64 = rows.to(tl.int64)[None, :]
        tl.store(dh_carry_ptr + d64 * B * K + rows64 * K + dh_units[:, None], dh, mask=dh_tile)
        tl.store(dc_carry_ptr + d64 * B * H + rows64 * H + units[:, None], dc, mask=tile_ok)
