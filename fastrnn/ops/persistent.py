"""The persistent strategy: each direction's ``W_hh`` spread over the whole GPU, one slice per program.

Read top to bottom: the knobs, the plan (:class:`PersistentPlan`, :func:`persistent_plan`), the
mode choice, the launcher (:func:`launch`). The kernels are in ``fastrnn.kernels.<cell>``
(``<cell>_{fwd,bwd}_persistent_kernel``), their barrier in ``fastrnn.kernels.sync``.

Partition. The grid is ``(slices, batch_groups, directions)``. Program ``(s, b, d)`` owns the
hidden units ``s*SLICE ... (s+1)*SLICE - 1`` of direction ``d`` for the batch rows
``b*BLOCK_B ...``: it loads the rows of ``W_hh`` of its units, every gate (so the cell update is
local), once, and keeps them on chip for the whole sequence, with its part of the state in fp32
registers (held transposed, units x batch rows). Per step the product is
``h (BLOCK_B x BLOCK_K) @ W_slice^T (BLOCK_K x BLOCK_S)``, with ``BLOCK_S >= 16`` (padded) and
``BLOCK_B = 16`` as ``tl.dot`` needs. (The issue's form, the weight slice on the M side, compiled
to spills at the GPU matrix's sizes, sm_90: the operands of an M=16, N=16 product are replicated
across warps; with the batch on M the same product compiles clean at R1's plan. Slices of 64+
rows, where wgmma would want the weights on M, are not what this plan produces.) The programs of
one (batch group, direction) exchange state every step through a global buffer and the flags of
``fastrnn.kernels.sync``; groups never wait for each other.

The LSTM's kernels (``fastrnn.kernels.lstm``) hold larger slices in two ways, so the GPU matrix's
large rows plan persistent (:data:`CELL_MAX_PLANNED_BLOCK_K`): their product puts the weights on
the M side with the slice's four gates stacked (an 8-unit slice is a 32-row tile, not four padded
16-row ones), and

* the reduction over ``h`` is held and read in at most two power-of-two parts
  (:func:`reduction_split`: ``BLOCK_HOUT + BLOCK_HTAIL``): L1's ``768 = 512 + 256`` holds 48 KB of
  weights per program where one 1024-wide part held 64 KB and spilled;
* a batch group may be wider than the ``BLOCK_B = 16`` rows of one product: the program loads its
  weights once and walks the group's ``GROUP_TILES`` sub-tiles every step (the fp32 state of each
  in the program's own rows of ``carry``; one wait before the first, one arrive after the last),
  so the plan can keep slices small at large batches (L4: 64 slices of 16 units x 2 groups of
  128 rows, :data:`MAX_SLICE_WEIGHT_BYTES`). The flags stay per (batch group, direction). The
  forward walks such a group in wider sub-tiles than the backward (:data:`FWD_MAX_BLOCK_B` rows,
  the reduction streamed in :data:`FWD_CHUNK`-wide chunks: L4's forward 4 sub-tiles of 32), and
  where the card's shared memory allows, the backward too (:data:`BWD_MAX_BLOCK_B`: L4's backward
  2 sub-tiles of 64 on an H100/H200; on an A100, 108 SMs, one group of 256 rows, 16 of 16, with
  its partial of ``dh`` formed in chunks: :data:`BWD_NARROW_CHUNK`).

The compiled figures of each plan (registers, stack, shared memory: the weight slice lives in
shared memory at L4, in registers at L1) are in ``python -m bench --plan``'s report.

Knobs (environment variables, read at every launch so tests can set them):

* ``FASTRNN_STRATEGY`` = ``resident`` | ``tiled`` | ``persistent`` (read by
  ``fastrnn.ops.recurrence.plan``); unset: the plan decides.
* ``FASTRNN_PERSISTENT_SLICE`` = hidden units per program, a power of two (e.g. ``8`` gives 8
  programs per direction and batch group at ``H=64``); unset: :func:`persistent_plan` decides.
* ``FASTRNN_PERSISTENT_MODE`` = ``barrier`` | ``per_step`` | ``auto`` (default ``auto``):

  ``barrier``: one launch for the whole sequence, programs synchronised per step by the flags.
  On a GPU it is a cooperative launch (``launch_cooperative_grid=True``: the driver refuses a grid
  that cannot be co-resident instead of letting it deadlock) after checking, from the compiled
  kernel's registers and shared memory, that the grid fits the device at one program per SM. Under
  the interpreter it needs ``tests/concurrent_grid.py`` (on the stock interpreter the programs run
  one by one, the first wait runs out of spins and the launch raises).

  ``per_step``: the same kernel with the barrier compiled out (``BARRIER=False``), one launch per
  phase: the launch boundary is the barrier. Each program's fp32 state goes through ``carry``
  between launches. What the stock interpreter runs, and what a GPU runs when the cooperative
  launch is refused or the grid does not fit. On a GPU the launches are captured in a CUDA graph
  and replayed where that is valid (``fastrnn.ops.step_graph``; ``FASTRNN_CUDA_GRAPH=0``: never).

  ``auto``: ``barrier`` on a GPU where the grid fits and the cooperative launch is accepted
  (remembered per kernel and grid), ``per_step`` otherwise and under the interpreter.

Kernel interface (what a cell's persistent kernel takes, so every cell launches through
:func:`launch` unchanged): the cell's own arguments (``args``, then ``meta`` as keywords, exactly as
its resident kernel takes them), then

* one buffer per ``scratch`` entry ``(shape, dtype)`` (the exchange buffers and the fp32 ``carry``
  of the program's own state; the cell decides their meaning and documents them in its kernel),
* ``flags_ptr``: int32 ``(D, batch_groups, slices)``, zeroed per launch (one flag per program;
  a group's flags contiguous), ``error_ptr``: int32 ``(1,)``, zeroed per launch,
* ``phase_begin, phase_end``: the kernel runs phases ``phase_begin <= p < phase_end`` of
  ``0 .. phases - 1`` (barrier mode: all of them in one launch; per_step: one per launch),
* ``max_spins``: the bound of every wait,
* constexprs ``SLICE, BLOCK_S, BLOCK_K, BLOCK_FLAGS`` (from the plan; ``BLOCK_B`` too, and
  ``GROUP_TILES`` for the cells in :data:`WALKING_GATES`), ``BARRIER``
  and ``FAULT`` (``fastrnn.kernels.sync``; always 0 except in the tests' mutation checks, which set
  :data:`FAULT` here).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton

from fastrnn import backend
from fastrnn.ops import step_graph

SLICE_ENV = "FASTRNN_PERSISTENT_SLICE"
MODE_ENV = "FASTRNN_PERSISTENT_MODE"
MODES = ("barrier", "per_step", "auto")

#: Gates of the cells that have persistent kernels (the plan only picks the strategy for these).
CELL_GATES = frozenset({1, 3, 4})
#: (gates, fp32 ``INPUT_PRECISION``) the plan does not pick the persistent kernels for by itself
#: (they still run when forced): the LSTM with its products split as ``"tf32x4"``
#: (:data:`SPLIT_TF32_GATES`), what it runs when cuDNN's RNN flag disallows tf32
#: (``fastrnn.ops.recurrence.input_precision``). At L5's plan (B64 H256, sm_90) that backward sits at
#: 255 registers with an 8 B stack frame (Triton 3.9 with every option on, 3.6 in both forms), the
#: 3.6 plain forward keeps 16 B, and the compile gate's ``full`` form (projection, lengths,
#: bidirectional, H248) spills 24-432 B in the backward; as ``"ieee"`` FMA products the backward
#: spilled 728 B. With tf32 products (the default, as ``nn.LSTM``'s cuDNN) the same plans compile
#: clean given the register budget (:func:`register_budget`), so they plan persistent; with the flag
#: off the fp32 LSTM keeps the tiled strategy (``"tf32x3"``) past its resident sizes. The RNN and GRU
#: plan persistent in both forms (``"tf32"``, ``"ieee"``): every form of the compile gate compiles
#: clean on sm_90 with Triton 3.6 and 3.9 (the GRU backward with tf32 products given the budget).
NOT_PLANNED = frozenset({(4, "tf32x4")})
#: Gates of the cells whose persistent kernels run fp32 products as ``"tf32x4"`` on tensor cores
#: (``fastrnn.kernels.precision``; ``fastrnn.ops.recurrence.input_precision``): the LSTM's, whose
#: products are one weight-on-the-left ``tl.dot`` per stage. The RNN and GRU persistent kernels
#: (state on the left, the GRU's three gate products chained) spill on sm_90 with it, so they keep
#: ``"ieee"`` (FMA units).
SPLIT_TF32_GATES = frozenset({4})
#: Widest ``BLOCK_K`` (H rounded up to a power of two) the plan gives the persistent kernels by
#: itself, by fp32?: the largest size at which every persistent kernel compiles clean for sm_90 at
#: the GPU matrix's plans (``tests/test_persistent_compile.py``, ``python -m bench --plan``). Past it
#: a program's weight slice no longer fits on chip as the kernels hold it (measured at L1, LSTM
#: H768 bf16: the forward spills 304 B; at L4, LSTM H1024 B256: 16 batch groups leave 128-unit
#: slices wanting about 1.08 MB of shared memory), so those sizes keep the tiled strategy for the
#: cells whose kernels do not hold larger slices (the LSTM's do: :data:`CELL_MAX_PLANNED_BLOCK_K`).
MAX_PLANNED_BLOCK_K = {False: 512, True: 256}
#: Per (gates, fp32?), where a cell's kernels hold larger slices than :data:`MAX_PLANNED_BLOCK_K`
#: allows: the LSTM's 16-bit kernels split the reduction in two power-of-two parts
#: (:func:`reduction_split`) and walk wide batch groups in sub-tiles (:data:`WALKING_GATES`), so
#: the GPU matrix's L1 (H768 B16) and L4 (H1024 B256) compile clean at their plans.
CELL_MAX_PLANNED_BLOCK_K = {(4, False): 1024}
#: Gates of the cells whose persistent kernels walk a batch group wider than ``BLOCK_B`` in
#: ``GROUP_TILES`` sub-tiles of ``BLOCK_B`` rows (the weights loaded once, the fp32 state of each
#: sub-tile kept in the program's ``carry`` rows). The others get one sub-tile per group.
WALKING_GATES = frozenset({4})
#: Most bytes of ``W_hh`` one program holds (all gates of its slice stacked, ``h`` as
#: :func:`reduction_split` parts it) before the plan widens the batch groups instead of the
#: slices (walking cells only): LSTM H1024 bf16 at a 16-unit slice (4 x 16 x 1024 x 2 B, L4's
#: plan) compiles clean with the weights in shared memory (sm_90, Triton 3.9, in the sub-tiles of
#: :data:`FWD_MAX_BLOCK_B` / :data:`BWD_MAX_BLOCK_B`: forward 252 registers and 144,384 B of shared
#: memory, within sm_80's 166,912 too; backward 184 and 156,672 B; ``python -m bench --plan``); a
#: 32-unit slice would need twice that.
MAX_SLICE_WEIGHT_BYTES = 128 * 1024


def planned(gates: int, dtype: torch.dtype, hidden: int) -> bool:
    """Whether :func:`fastrnn.ops.recurrence.plan` picks the persistent strategy for this cell,
    dtype and hidden size beyond the resident sizes (else the tiled one), at the precision the
    launch would run (:data:`NOT_PLANNED`: it depends on PyTorch's tf32 flags for fp32)."""
    from fastrnn.ops.recurrence import input_precision

    fp32 = dtype == torch.float32
    block_k = max(16, triton.next_power_of_2(hidden))
    limit = CELL_MAX_PLANNED_BLOCK_K.get((gates, fp32), MAX_PLANNED_BLOCK_K[fp32])
    precision = input_precision(dtype, "persistent", gates)
    return gates in CELL_GATES and (gates, precision) not in NOT_PLANNED and block_k <= limit


#: SMs assumed when planning without a GPU: the H100/H200 the GPU matrix is tuned for.
DEFAULT_SM_COUNT = 132
#: Smallest slice the plan picks by itself (below it each program's M side is mostly padding
#: and every program still reads the whole ``h`` per step).
MIN_SLICE = 4
#: Rows of one product (``BLOCK_B``, a batch group's sub-tile). 16 (tl.dot's minimum): wider
#: products hold a ``BLOCK_B x H`` operand per step and spill at H 512 (sm_90: 1-4 KB of stack at
#: B64 in one group); more groups of 16 rows use the SMs instead, with smaller slices per program,
#: or (:data:`WALKING_GATES`) a program walks a wider group in sub-tiles of 16 (its forward in
#: sub-tiles of up to :data:`FWD_MAX_BLOCK_B`).
MAX_BLOCK_B = 16
#: Rows of one product in the walking cells' forward (:data:`WALKING_GATES`) when a program walks
#: a group of several sub-tiles: its weights (in shared memory) are read once per product, and the
#: dependent mma chains of a step are one per product, so fewer, wider products; ``h`` then comes
#: in ``FWD_CHUNK``-wide chunks of the reduction (``BLOCK_KC``), each multiplied into one
#: accumulator, so no ``K x BLOCK_B`` operand is held whole. Measured at L4's plan (LSTM H1024
#: B256 bf16, 8 warps, heaviest form, ahead-of-time compiles): 32 rows in chunks of 64 compile clean
#: (sm_90 252 registers on Triton 3.9, 247 on 3.6; sm_80 172 / 176; 144,384 B of shared memory
#: on sm_90); 32 rows in chunks of 128 spill 40 B on sm_90, 64 rows 96-184 B (chunks of 32-128),
#: 128 rows 280 B. The backward's: :data:`BWD_MAX_BLOCK_B`.
FWD_MAX_BLOCK_B = 32
FWD_CHUNK = 64
#: Shared memory (bytes) a 16-bit walking forward of one sub-tile per product must leave free on the
#: card for reading its weight slice whole; with less, it reads the slice in :data:`FWD_CHUNK`-wide
#: chunks of the head part with the whole register budget (``fwd_chunk``, ``fwd_maxnreg``). Read
#: whole, the kernel keeps the slice and one ``BLOCK_B x h`` operand in shared memory (measured,
#: ahead-of-time compiles, LSTM bf16, 8 warps, barrier mode: exactly ``slice bytes + BLOCK_B x
#: (BLOCK_HOUT + BLOCK_HTAIL) x 2`` at H1024 and H512). At an A100's plans (108 SMs, 166,912 B per
#: block, sm_80): H1024 B16/B1, 16-unit slices of 128 KB, 163,840 B, 3 KB left: 32 registers and
#: 1,584-1,824 B of stack on Triton 3.6 and 3.9; in chunks of 64, 135,168 B and no stack with
#: ``maxnreg`` (3.9 252-254 registers, 3.6 250-252; without it 3.6 stops at 128 registers with
#: 8-16 B of stack, 3.9 at B1 likewise with 8 B). H512 B64 (147,456 B, 19 KB left) and H768 B16
#: bidirectional (114,688 B) compile clean whole, so they keep it. On an H100/H200 (232,448 B) a
#: slice within MAX_SLICE_WEIGHT_BYTES reads whole in at most 163,840 B, far from the limit (H1024
#: B32, 128 KB read whole: 198 / 241 registers, no stack, 164,864 B): every H100/H200 plan of its own up to
#: H1024 is unchanged (the GPU matrix's and the compile gate's binaries identical). fp32: not measured.
FWD_WHOLE_SHARED_HEADROOM = 16 * 1024
#: The backward's likewise (its partial of ``dh_{t-1}`` formed and stored chunk by chunk), on cards
#: whose blocks may use at least ``BWD_WIDE_SHARED_BYTES`` of shared memory (Hopper's 227 KB).
#: Measured at L4's plan (heaviest form, sm_90): 64 rows in chunks of 128 compile clean (184
#: registers on Triton 3.9, 231 on 3.6; 156,672 B of shared memory); in chunks of 64 3.9 is clean
#: (230) but 3.6 spills 40 B (32 rows: 24 B); 128 rows spill 56 B (3.9, chunks of 64). On sm_80
#: (Triton 3.9) 32 rows spill 448 B (the weights left in registers), where 16 rows keep a 32 B
#: stack frame: an A100 (163 KB per block) keeps 16-row backward sub-tiles, with
#: :data:`BWD_NARROW_CHUNK`.
BWD_MAX_BLOCK_B = 64
BWD_CHUNK = 128
BWD_WIDE_SHARED_BYTES = 200 * 1024
#: On cards below :data:`BWD_WIDE_SHARED_BYTES` (an A100's sm_80), the walking cells' backward
#: (not projecting) forms its partial of ``dh_{t-1}`` in chunks of this many units of ``h``'s head
#: part wherever that part is wider (``BLOCK_KC``, sub-tiles of 16 rows): the product with the whole
#: head part held its operands in registers and kept a stack frame. Measured at the A100 plans
#: (108 SMs, heaviest form, sm_80, bf16): L1 (H768 B16, head 512) 255 registers and 16 B of stack
#: on Triton 3.9 (3.6: 255, none), in chunks of 256 248 / 252 and none, in chunks of 128 16 B
#: again (3.9); L4 (H1024 B256, 16 sub-tiles of 16) 255 and 32 B / 16 B, in chunks of 256 255 and
#: none on both (128: 242 / 254, none; 64: 408 B; 512: 8 B on 3.9); L3 (H512 B1, head 512) clean
#: either way (224 / 191 registers whole, 231 / 191 in chunks of 256).
BWD_NARROW_CHUNK = 256
#: The walking cells' 16-bit forward and backward without projection where one program holds a
#: 1024-wide reduction (``BLOCK_K`` 1024: H 513-1024) and the binary is not one of the GPU matrix's
#: unidirectional ones with ``H`` a multiple of 16 (L1, L4: clean at their plans, unchanged): a
#: bidirectional layer, or ``H`` not divisible by 16 (issue #12). Their sub-tiles stay 16 rows
#: (``fwd_block_b``, ``bwd_block_b`` 0); the forward reads ``h`` in chunks of :data:`NARROW_FWD_CHUNK`
#: units, as one part padded to ``BLOCK_K`` where :func:`reduction_split` would give it a tail
#: (``fwd_head``: H760's 512 + 256 read as 1024; the padded chunks are masked), and on a card with
#: :data:`BWD_WIDE_SHARED_BYTES` the backward forms its partial of ``dh`` in chunks of
#: :data:`NARROW_BWD_CHUNK` (an A100's backward as it was: 16-row sub-tiles, :data:`BWD_NARROW_CHUNK`).
#: With 8-unit slices (one direction, 32 weight rows) the forward takes the whole register budget
#: (``fwd_maxnreg``: without it Triton 3.6 stops at 128 registers and 24 B of stack), and on a card
#: with :data:`BWD_WIDE_SHARED_BYTES` the backward too reads ``h`` as one part padded to ``BLOCK_K``
#: (``bwd_head``; 1016's 512 + 512 is 1024 either way) with its partial in chunks of
#: :data:`NARROW_BWD_CHUNK` (an A100's as it was).
#: The weights stay on chip (shared memory). Measured (ahead-of-time compiles, sm_90, bf16, lengths,
#: ``grad_clip``, the gradient-flow record, bidirectional unless said; forward / backward registers,
#: ``+N`` bytes of stack; Triton 3.9, then 3.6), before -> with it:
#:
#: * H1016 B20 (64 slices of 16, one group of two sub-tiles; before: forward 32 rows in chunks of 64,
#:   backward 32 in chunks of 128): 3.9 255+384 / 255+16 -> 247 / 200; 3.6 -> 243 / 255, no stack.
#:   fp16 likewise (3.9 247 / 200, 3.6 241 / 255). The compile gate's ``-H1024-full-noproj``.
#: * H1016 B16 (one sub-tile, read whole): 3.9 255+112 / 255+88 -> 221 / 194; 3.6 -> 242 / 255.
#: * H760 B20: 3.9 255+456 / 255+96 -> 247 / 254; 3.6 -> 243 / 252 (in two parts forward: 255+48 /
#:   255+16). H760 B16: 3.9 255+168 / 188 -> 221 / 190; 3.6 -> 242 / 246.
#: * One direction, H1016 B16 (8-unit slices): forward 3.9 255+208 (with lengths 255+64) -> 255, no
#:   stack, on both; its backward with lengths and ``grad_clip`` (and the flow record) 3.9 255+24
#:   -> 160 (170), 3.6 255+48 -> 235 (229), no stack (the compile gate's ``-H1024-uni-noproj``). In
#:   two parts: whole 255+24 / 255+48 (3.9 / 3.6), chunks of 32 255+392 / 255+480, of 256 250 /
#:   255+32 (3.6 earlier: of 64 / 128 144 / 56 B); one padded part: whole 255+24 / 255+88, chunks of
#:   256 234 / 255+8.
#:   H760 B16 (two parts 512 + 256: 191 / 254, clean) -> 160 / 235; fp16 H1016 B16 -> 170 / 246.
#:   At B20 (16-unit slices) clean as planned before (187 / 255).
#:
#: On an A100 (sm_80, 3.9) no worse: H760 B20 forward 255+120 -> 128+8 (135,168 B of shared memory), B16
#: 255+64 -> 127, no stack; at H1016 bidirectional its 108 SMs give 32-unit slices of 256 KB whose
#: forward needs 270,336-278,528 B of shared memory (over its 166,912) before and after: not fixed.
#: Tried on the way (sm_90, 3.9 unless said): forward chunks of 64 at H1016 B16 8 B, of 128 200 B, of
#: 256 888 B, of 16 at H760 B20 (two parts) 64 B; 32-row forward sub-tiles in chunks of 32 208 B; the
#: forward with ``maxnreg`` at 64 weight rows 255+8 to 255+40 on both; backward chunks of 64 clean on
#: 3.9 but 16-24 B on 3.6 at B20, of 32 3,424 B on 3.6.
NARROW_FWD_CHUNK = 32
NARROW_BWD_CHUNK = 128
#: The forward's chunk of ``h`` with zoneout (``ZONEOUT`` 1 or 2) where :data:`NARROW_FWD_CHUNK`
#: applies to a bidirectional layer of 16-unit slices (64 weight rows; ``fwd_zoneout_chunk``): the
#: zoned ``c`` and ``h`` of the slice (the mask, ``h_{t-1}``'s own units) kept a stack frame with
#: chunks of 32 (issue #12). Measured (ahead-of-time compiles, sm_90, bf16, bidirectional, lengths,
#: ``grad_clip``, the gradient-flow record, training mask; forward registers ``+N`` bytes of stack,
#: Triton 3.9 / 3.6): H1016 B20 (two sub-tiles) chunks of 32 255+40 / 255+16, of 64 254 / 250, of
#: 16 255+136 / 255+16; H760 B20 (the same binary: ``h`` as one padded part) likewise; H1016 B16 (one
#: sub-tile) clean with 32 or 64 (3.9 222 / 255, 3.6 255 / 255), so it keeps 32. Eval (``ZONEOUT`` 2,
#: the scalar ``p``) at H1016 B20: 32 255+40 / 255+16, 64 255 / 250. The compile gate's
#: ``-H1024-zoneout-noproj-full``. Without zoneout the forward keeps :data:`NARROW_FWD_CHUNK` (its
#: binaries unchanged); with 8-unit slices (one direction) zoneout keeps it too: H1016 B16 (no
#: lengths) forward 255 / 255, backward (``bwd_head``, chunks of 128) 155 / 249, no stack.
NARROW_ZONEOUT_FWD_CHUNK = 64
#: The projecting LSTM's 16-bit backward's likewise, on the same cards: its partial of ``dh_{t-1}``
#: (``P`` wide) formed in chunks of this many units of the head part wherever that part is wider.
#: Measured at the A100 plans (sm_80, bf16, bidirectional, lengths, every option; stack bytes on
#: Triton 3.9 / 3.6, 255 registers and 16,384 B of shared memory throughout, with
#: :func:`projected_block`): ``-H512-full`` (H504 P252, head 256, barrier) whole 80 / 312, in chunks
#: of 128 16 / 248, of 64 248 / 488; ``-H1024-full`` (H1016 P508, head 512, per step, 2 sub-tiles)
#: whole 32 / 184, in chunks of 256 32 / 184, of 128 0 / 8, of 64 176 / 280. fp32: not measured.
#: The projecting forward's ``h`` read in chunks likewise (``fwd_chunk`` with ``maxnreg``) does not
#: pay: ``-H1024-full``'s per-step forward 280 B -> 240 (chunks of 64) / 288 (128) on 3.9 and 0 -> 8
#: on 3.6; ``-H512-full``'s clean on 3.9 either way: it reads ``h`` whole.
PROJECTING_BWD_NARROW_CHUNK = 128
#: Shared memory (bytes) kept free below the card's limit by the estimate of a 16-bit projecting
#: forward's (:func:`projecting_fwd_shared_bytes`): what the compile adds beyond the slices and the
#: operand buffer (measured: 1,024 B on sm_90 at H1016 P508 and H504 P252, none on sm_80).
PROJECTING_SHARED_MARGIN = 4 * 1024
#: Polls before a wait gives up: a step's flag round trip is about a microsecond on a GPU, so this
#: is seconds; an interpreted poll costs tens of microseconds and programs drift by milliseconds.
MAX_SPINS = {"gpu": 1 << 22, "interpreter": 20_000}
#: Test-only: the sync fault compiled into every persistent launch (``fastrnn.kernels.sync``).
FAULT = 0
#: The ``maxnreg`` of :func:`register_budget`: every register a thread can address (65,536 per SM
#: over the plan's 4 or 8 warps is 256 or more).
REGISTER_BUDGET = 255


def register_budget(dtype: torch.dtype, precision: str | None = None, fp32: bool = False) -> dict:
    """Launch options for a cell's persistent kernels (``PersistentKernel.meta``): in 16-bit, and in
    fp32 with ``precision`` ``"tf32"`` (tensor-core products), the whole register budget
    (``maxnreg``). A persistent grid runs one program per SM, so occupancy buys nothing; left to
    itself ptxas aims for more blocks per SM and parks values on the stack (measured, sm_90: the GRU
    forward bf16 at H 256 held at 128 registers with a 16-byte stack frame; 170 registers and none
    with the budget, before its product was split; the LSTM forward fp32 tf32 at L5 with lengths, 80
    registers and an 8 B frame, 96 and none with the budget; the GRU backward fp32 tf32 at H256 in
    barrier mode, Triton 3.6: 128 and 80 registers with 8 B frames in the plain and one-row forms,
    none with the budget; the RNN backward's likewise, sm_80, Triton 3.9: 64 and 8 B, 70 and none). Not for fp32's other products: given the budget, the FMA dots' heaviest
    forms take all 255 registers and still spill (the GRU backward, all options, H 256: 16 B of
    stack), where uncapped they compile clean; nor for the GRU forward's tf32 form (its launcher
    passes no precision): with the budget its ``full`` form spills 56-80 B on sm_90, uncapped none.

    ``fp32``: the budget in fp32 too, for the kernels measured clean with it in every form of the
    compile gate on Triton 3.6 and 3.9: the RNN forward. Uncapped, ptxas stops it at 64 registers,
    the count that fits four 256-thread blocks per SM, and parks a value held across the time loop
    in an 8 B stack frame (barrier mode, Triton 3.9); with the budget it takes 56-154 registers and
    no frame in all six forms on both; a cap of 128 spilled 16 B in the ``full`` form once the kernel
    held one value fewer: ptxas trades stack for occupancy at whatever cap it aims for."""
    budget = dtype != torch.float32 or precision == "tf32" or fp32
    return {"maxnreg": REGISTER_BUDGET} if budget else {}


@dataclasses.dataclass(frozen=True)
class PersistentPlan:
    """How one layer's recurrence is spread over programs (see the module docstring)."""

    slice: int  # SLICE: hidden units per program
    # BLOCK_S: units of each gate's weight tile, max(16, SLICE) (tl.dot's N side); projecting (the
    # LSTM's kernels use it for the projected units only) :func:`projected_block`
    block_s: int
    block_k: int  # BLOCK_K: all of h, next power of two >= max(16, H) (the reduction)
    block_b: int  # BLOCK_B: batch rows per sub-tile (tl.dot's N side), a power of two >= 16
    slices: int  # programs per (batch group, direction): cdiv(H, SLICE)
    batch_groups: int
    directions: int
    gates: int
    num_warps: int
    group_tiles: int = 1  # GROUP_TILES: sub-tiles of BLOCK_B rows a program walks per step (its group)
    # The forward's own sub-tiles where they are wider (0: BLOCK_B): rows per product, and the
    # chunk of h its reduction streams (BLOCK_KC; 0: h read whole). See :data:`FWD_MAX_BLOCK_B`.
    fwd_block_b: int = 0
    fwd_chunk: int = 0
    bwd_block_b: int = 0  # the backward's likewise (:data:`BWD_MAX_BLOCK_B`)
    bwd_chunk: int = 0
    # The forward's maxnreg (0: none): REGISTER_BUDGET where it reads its slice in chunks of
    # FWD_CHUNK for lack of shared memory to read it whole (:data:`FWD_WHOLE_SHARED_HEADROOM`)
    fwd_maxnreg: int = 0
    # The forward's BLOCK_HOUT where it reads h as one part (BLOCK_HTAIL 0), padded to BLOCK_K, in
    # chunks of fwd_chunk, instead of the two parts of reduction_split (0: as reduction_split parts
    # it); the backward keeps the split. See :data:`NARROW_FWD_CHUNK`.
    fwd_head: int = 0
    # The forward's BLOCK_KC with zoneout (0: fwd_chunk): :data:`NARROW_ZONEOUT_FWD_CHUNK`
    fwd_zoneout_chunk: int = 0
    # The backward's BLOCK_HOUT where it reads h as one padded part (BLOCK_HTAIL 0), as fwd_head
    # (0: the parts of reduction_split). See :data:`NARROW_BWD_CHUNK`.
    bwd_head: int = 0

    @property
    def grid(self) -> tuple[int, int, int]:
        return (self.slices, self.batch_groups, self.directions)

    @property
    def programs(self) -> int:
        return self.slices * self.batch_groups * self.directions

    @property
    def block_flags(self) -> int:
        return triton.next_power_of_2(self.slices)

    @property
    def weight_rows(self) -> int:
        """Rows of ``W_hh`` a program holds when its kernel stacks the slice's gates on one tile
        axis (the LSTM's: ``gates * max(SLICE, 4)``, at least 16)."""
        return max(16, self.gates * max(self.slice, 4))

    @property
    def group_rows(self) -> int:
        """Batch rows of one group: ``GROUP_TILES * BLOCK_B``."""
        return self.group_tiles * self.block_b

    @property
    def fwd_tiles(self) -> int:
        """Sub-tiles the forward walks its group in: ``group_rows / fwd_block_b``."""
        return self.group_rows // (self.fwd_block_b or self.block_b)

    @property
    def bwd_tiles(self) -> int:
        """Sub-tiles the backward walks its group in: ``group_rows / bwd_block_b``."""
        return self.group_rows // (self.bwd_block_b or self.block_b)

    def constexprs(self, forward: bool = False, zoneout: bool = False) -> dict:
        """The plan's constexprs of the cell's backward kernel, or (``forward``) of its forward
        kernel: the walking cells' kernels take their own ``BLOCK_B``, ``GROUP_TILES``, ``BLOCK_KC``
        (the forward's with ``zoneout``: ``fwd_zoneout_chunk`` where set)."""
        block_b, walk = self.block_b, {}
        if self.gates in WALKING_GATES:
            if forward:
                block_b = self.fwd_block_b or self.block_b
                walk = dict(GROUP_TILES=self.fwd_tiles, BLOCK_KC=(zoneout and self.fwd_zoneout_chunk) or self.fwd_chunk)
                if self.fwd_maxnreg:
                    walk["maxnreg"] = self.fwd_maxnreg
                if self.fwd_head:
                    walk |= dict(BLOCK_HOUT=self.fwd_head, BLOCK_HTAIL=0)
            else:
                block_b = self.bwd_block_b or self.block_b
                walk = dict(GROUP_TILES=self.bwd_tiles, BLOCK_KC=self.bwd_chunk)
                if self.bwd_head:
                    walk |= dict(BLOCK_HOUT=self.bwd_head, BLOCK_HTAIL=0)
        return dict(SLICE=self.slice, BLOCK_S=self.block_s, BLOCK_K=self.block_k, BLOCK_B=block_b,
                    BLOCK_FLAGS=self.block_flags, num_warps=self.num_warps, **walk)


def reduction_split(k: int, weight_rows: int) -> tuple[int, int]:
    """The reduction over ``k`` units of ``h`` as at most two power-of-two parts ``(head, tail)``
    (``tail`` 0: one part), each at least 16 (``tl.dot``'s smallest side), for a program holding
    ``weight_rows`` rows of ``W_hh`` (its slice's gates stacked). A program holds its weight
    slice and reads ``h`` in these parts. Two parts when they pad less than one (``768 = 512 +
    256`` instead of ``1024``, ``48 = 32 + 16`` instead of ``64``), and ``1024 = 512 + 512`` when
    the block has at most 32 rows. Measured by ahead-of-time compiles for sm_90 (Triton 3.9, LSTM
    bf16, 8 warps, ``python -m bench --plan``): at L1 (H768, 32 rows) one 1024-wide part spills
    304 B, two parts compile clean (232 registers); at H1024 B16 (32 rows) likewise (one part 304 B
    of stack, two 224 registers); at L4 (H1024, 64 rows, weights in shared memory) one part is
    clean (196 registers) and two spill 24 B."""
    whole = max(16, triton.next_power_of_2(k))
    head = max(16, whole // 2)
    if k <= head:
        return whole, 0
    tail = max(16, triton.next_power_of_2(k - head))
    if head + tail < whole or (whole >= 1024 and weight_rows <= 32):
        return head, tail
    return whole, 0


def forced_slice() -> int | None:
    """``$FASTRNN_PERSISTENT_SLICE`` as an int (None when unset); a power of two or ValueError."""
    raw = os.environ.get(SLICE_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1 or int(raw) & (int(raw) - 1):
        raise ValueError(f"{SLICE_ENV} must be a power of two (hidden units per program), got {raw!r}")
    return int(raw)


def mode() -> str:
    """``$FASTRNN_PERSISTENT_MODE``: ``barrier``, ``per_step`` or ``auto`` (default)."""
    raw = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if raw not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {raw!r}")
    return raw


@dataclasses.dataclass(frozen=True)
class PlanningCard:
    """The card an ahead-of-time compile plans for: its SM count and the shared memory one block
    may use (bytes)."""

    sms: int
    shared_bytes: int


#: Set by ``fastrnn.ops.aot.capture_launches`` while it records the launches of an ahead-of-time
#: compile: the card it compiles for (None: :data:`DEFAULT_SM_COUNT`, :data:`DEFAULT_SHARED_BYTES`).
planning_card: PlanningCard | None = None


def sm_count(device=None) -> int:
    """SMs of ``device`` when it is a GPU, else the card an ahead-of-time compile plans for, else
    :data:`DEFAULT_SM_COUNT`."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return planning_card.sms if planning_card is not None else DEFAULT_SM_COUNT


#: Shared memory one block may use, assumed without a GPU: the H100/H200's (232,448 B; A100: 166,912).
DEFAULT_SHARED_BYTES = 232_448


def shared_per_block(device=None) -> int:
    """Shared memory one block of ``device`` may use (bytes) when it is a GPU, else the card an
    ahead-of-time compile plans for, else :data:`DEFAULT_SHARED_BYTES`."""
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return getattr(props, "shared_memory_per_block_optin", None) or (232_448 if props.major >= 9 else 166_912)
    return planning_card.shared_bytes if planning_card is not None else DEFAULT_SHARED_BYTES


def projected_block(proj: int, slices: int) -> int:
    """``BLOCK_S`` of the projecting LSTM's persistent kernels (``kernels/lstm.py``, ``HAS_PROJ``),
    which use it for a program's projected units only (``SP = cdiv(proj, slices)`` of the ``proj``
    units of ``h``: its rows of ``W_hr``, its units of ``dh``; the gates' tile is ``SLICE``-wide on its
    own): the next power of two >= ``SP``, at least 16 (``tl.dot``'s smallest side). ``max(16,
    SLICE)``, as the other cells use, padded a 32-unit slice's 16 projected units to 32 rows (``proj <
    hidden``, so ``SP <= SLICE``). Measured at the ``-H512-full`` form's A100 plan (H504 P252
    bidirectional B20, 16 slices of 32 x 2 groups x 2 directions, sm_80, ahead-of-time compiles):
    forward 114,688 -> 98,304 B of shared memory, stack 48 -> 8 B on Triton 3.6 (3.9: none either
    way); backward stack 168 -> 80 B (3.9), 408 -> 312 B (3.6); 255 registers throughout. At the
    16-unit slices of every sm_90 plan of the compile gate it is 16 either way (binaries unchanged);
    off the gate, an H100/H200's 32-unit slices (H504 P252 bidirectional B48, 132 SMs, barrier,
    sm_90): forward 115,712 -> 99,328 B, backward 103,424 -> 87,040 B (3.9; 3.6 107,520 -> 91,136), no
    stack on 3.9 either way (forward 234 -> 218 registers, backward 240 -> 234), on 3.6 forward 24 ->
    8 B and backward 136 -> 72 B (255 registers). The plan's warp count still follows the gates'
    tile (``max(16, SLICE)``)."""
    return max(16, triton.next_power_of_2(triton.cdiv(proj, slices)))


def projecting_fwd_shared_bytes(slice_units: int, hidden: int, proj: int, batch_rows: int) -> int:
    """Shared memory (bytes) of the 16-bit projecting LSTM's persistent forward (``kernels/lstm.py``,
    ``HAS_PROJ``) at a slice of ``slice_units`` units, ``hidden`` cell units projected to ``proj``,
    sub-tiles of ``batch_rows``: both weight slices stay in shared memory for the whole sequence,
    ``W_hh``'s (``4 * slice_units`` rows x ``h`` as :func:`reduction_split` parts it) and ``W_hr``'s
    (``BLOCK_S x BLOCK_K``, in chunks; ``BLOCK_S`` :func:`projected_block`), plus one buffer the step's operands go through, as wide as the
    larger of ``h`` and ``m`` (``m``'s ``BLOCK_B x BLOCK_K`` reuses ``h``'s).

    Measured (ahead-of-time compiles, bf16, bidirectional, lengths: the TTGIR's ``local_alloc``
    buffers and ``metadata.shared``, Triton 3.9 and 3.6 alike) at H1016 P508, B20 in two sub-tiles of
    16. Slice 32 (what an A100's 108 SMs gave): ``W_hh`` ``128 x 512`` (131,072 B), ``W_hr`` 8 chunks
    of ``16 x 128`` (32,768 B: ``BLOCK_S`` 16 rows for a program's 16 projected units), ``m``
    ``16 x 1024`` (32,768 B): 196,608 B, exactly the compile's figure (sm_80, Triton 3.9, the slice
    forced), over the A100's 166,912 (229,376 B when ``BLOCK_S`` was ``max(16, SLICE)``, 32).
    Slice 16: 65,536 + 32,768 + 32,768 = 131,072 B (sm_80 barrier binary on both Tritons, per-step
    binary on 3.6; 3.9's per-step binary keeps part of the weights in registers, 81,920 B), 132,096
    on sm_90. H504 P252 (the ``-H512-full`` form, one sub-tile): 98,304 B at slice 32 on sm_80,
    exactly, on both Tritons (114,688 with ``BLOCK_S`` 32); 65,536 against 66,560 at slice 16 on sm_90 (hence :data:`PROJECTING_SHARED_MARGIN`).
    The backward holds less (sm_80: its weights in registers, 16,384 B at either slice; sm_90 at
    slice 16: 103,424 B), so the forward's decides. fp32 (not planned past H256): not measured,
    not estimated."""
    rows = max(16, 4 * max(slice_units, 4))
    block_s, block_k = projected_block(proj, triton.cdiv(hidden, slice_units)), max(16, triton.next_power_of_2(hidden))
    h_width = sum(reduction_split(proj, rows))
    return (rows * h_width + block_s * block_k + batch_rows * max(h_width, block_k)) * 2


def persistent_plan(gates: int, hidden: int, batch: int, directions: int, dtype: torch.dtype, sms: int = DEFAULT_SM_COUNT,
                    shared: int = DEFAULT_SHARED_BYTES, projecting: bool = False, proj: int = 0) -> PersistentPlan:
    """The partition for ``gates`` stacked ``hidden``-wide gate blocks, ``batch`` rows and
    ``directions``: sub-tiles of ``BLOCK_B = 16`` rows (:data:`MAX_BLOCK_B`), one per batch group,
    and the smallest slice (a power of two, at least :data:`MIN_SLICE`) that keeps all programs at
    one per SM (``programs <= sms``). For the cells that walk batch groups (:data:`WALKING_GATES`),
    while that slice's weights exceed :data:`MAX_SLICE_WEIGHT_BYTES` the groups double in width
    (``GROUP_TILES`` sub-tiles each, fewer groups) so the slices can shrink: L4 (LSTM B256 H1024)
    gets 64 slices of 16 units x 2 groups of 128 rows, 128 programs, instead of 8 slices of 128
    units (1 MB of weights each) x 16 groups. ``$FASTRNN_PERSISTENT_SLICE`` overrides the slice
    (the groups then stay one sub-tile wide unless the weights exceed the limit). A walked group's
    forward gets its own sub-tiles of up to :data:`FWD_MAX_BLOCK_B` rows and reduction chunks of
    :data:`FWD_CHUNK` (``fwd_block_b``, ``fwd_chunk``; L4: 4 sub-tiles of 32 rows forward), and
    where a block may use ``shared >= BWD_WIDE_SHARED_BYTES`` of shared memory its backward
    sub-tiles of up to :data:`BWD_MAX_BLOCK_B` (L4 on an H100/H200: 2 of 64 rows); where it may
    not (an A100), the backward keeps sub-tiles of 16 rows, walked group or not, and forms its
    partial of ``dh`` in chunks of :data:`BWD_NARROW_CHUNK` where the head part is wider (L1, L3,
    L4). A 16-bit forward of one sub-tile per product reads its slice in chunks of
    :data:`FWD_CHUNK`, with ``maxnreg``, where reading it whole would leave less than
    :data:`FWD_WHOLE_SHARED_HEADROOM` of the card's shared memory (an A100's H1024 B16). At
    ``BLOCK_K`` 1024, bidirectional or ``H`` not a multiple of 16: 16-row sub-tiles in both and the
    chunks of :data:`NARROW_FWD_CHUNK` / :data:`NARROW_BWD_CHUNK` instead (issue #12). Neither
    when ``projecting`` (``proj_size``): the projection's operands (all of ``m_t``,
    the partial of ``dm_t``: ``H x BLOCK_B``) are not streamed, and at H1024 32-row sub-tiles
    spilled 0.5-1.3 KB on sm_90 where 16-row ones compile clean; only a 16-bit projecting backward
    on such a card forms its partial of ``dh`` (``P`` wide) in chunks of
    :data:`PROJECTING_BWD_NARROW_CHUNK` (``-H512-full``, ``-H1024-full``), and its ``BLOCK_S`` spans
    the projected units (:func:`projected_block`).

    ``proj`` (the projection size; implies ``projecting``): a 16-bit projecting forward keeps both
    weight slices in shared memory (:func:`projecting_fwd_shared_bytes`); where the slice that keeps
    every program resident needs more than the card's ``shared`` (less
    :data:`PROJECTING_SHARED_MARGIN`), the slice halves until it fits, and the grid then exceeds
    ``sms``: it runs per step (``launch``: the per-step launches need no co-residency; barrier mode
    is refused). An A100 at H1016 P508 bidirectional (the compile gate's ``-H1024-full``): 64 slices
    of 16 (128 programs, per step) instead of 32 of 32 (64 programs, whose forward needs 196,608 B
    and would die at launch with OutOfResources). The cost model (``fastrnn.ops.cost_model``, H100
    figures, forward / backward us per step): per_step at slice 16 4.5 / 6.7 (twice that for the
    projection's second phase, and the 128 programs run in two waves of 108), barrier at slice 32
    3.2 / 4.5 were it to fit, the tiled strategy 321 / 318: per step it is. Without projection (16-bit,
    walking cells) a slice past :data:`MAX_SLICE_WEIGHT_BYTES` with no batch group left to widen
    halves likewise: an A100 at H1016 bidirectional plans 16-unit slices (128 KB; the forward's
    binary 135,168 B, sm_80, Triton 3.9) instead of 32 (256 KB, a forward of 270-279 KB that could
    not load), 128 programs, per step."""
    projecting = projecting or proj > 0
    block_b = min(MAX_BLOCK_B, max(16, triton.next_power_of_2(max(1, batch))))
    tiles = triton.cdiv(max(1, batch), block_b)
    block_k = max(16, triton.next_power_of_2(hidden))
    forced = forced_slice()
    group_tiles = 1
    while True:
        groups = triton.cdiv(tiles, group_tiles)
        size = forced
        if size is None:
            size = min(MIN_SLICE, block_k)
            while triton.cdiv(hidden, size) * groups * directions > sms and size < block_k:
                size *= 2
        rows = max(16, gates * size)  # the slice's gates stacked on M
        slice_bytes = rows * sum(reduction_split(hidden, rows)) * (4 if dtype == torch.float32 else 2)
        if gates not in WALKING_GATES or slice_bytes <= MAX_SLICE_WEIGHT_BYTES or group_tiles >= tiles:
            break
        group_tiles *= 2
    if proj and forced is None and dtype != torch.float32:  # both weight slices in shared memory: halve to fit
        while size > MIN_SLICE and projecting_fwd_shared_bytes(size, hidden, proj, block_b) > shared - PROJECTING_SHARED_MARGIN:
            size //= 2
        rows = max(16, gates * size)
        slice_bytes = rows * sum(reduction_split(hidden, rows)) * 2
    elif gates in WALKING_GATES and forced is None and dtype != torch.float32:
        # the slice in shared memory: past MAX_SLICE_WEIGHT_BYTES with no batch group left to widen (an
        # A100's 108 SMs at H1016 bidirectional: 32-unit slices of 256 KB, over its 166,912 B), halve it;
        # the grid then exceeds ``sms`` and runs per step, as the projecting forward's does
        while size > MIN_SLICE and slice_bytes > MAX_SLICE_WEIGHT_BYTES:
            size //= 2
            rows = max(16, gates * size)
            slice_bytes = rows * sum(reduction_split(hidden, rows)) * 2
    slices = triton.cdiv(hidden, size)
    gate_units = max(16, size)  # BLOCK_S of a slice's gates (projecting: of its projected units, below)
    block_s = projected_block(proj, slices) if proj else gate_units
    # 8 warps for fp32 (FMA dots spread their operands over threads) or past 16 KB of weights per
    # program (the dot operands are replicated across warps; the compile report shows spills at
    # 4 warps beyond that); else 4.
    weight_bytes = gates * gate_units * block_k * (4 if dtype == torch.float32 else 2)
    num_warps = 8 if dtype == torch.float32 or weight_bytes > 16 * 1024 else 4
    wide = [0, 0, 0, 0, 0]  # fwd_block_b, fwd_chunk, bwd_block_b, bwd_chunk, fwd_maxnreg
    fwd_head = fwd_zoneout_chunk = bwd_head = 0
    narrow_card = shared < BWD_WIDE_SHARED_BYTES
    if gates in WALKING_GATES and not projecting:
        head = reduction_split(hidden, rows)[0]
        if group_tiles > 1:
            bwd_widest = block_b if narrow_card else BWD_MAX_BLOCK_B
            for i, (widest, chunk) in enumerate(((FWD_MAX_BLOCK_B, FWD_CHUNK), (bwd_widest, BWD_CHUNK))):
                if widest > block_b:
                    wide[2 * i:2 * i + 2] = min(widest, group_tiles * block_b), min(chunk, head)  # chunks of the head part
        whole_read_shared = slice_bytes + block_b * sum(reduction_split(hidden, rows)) * 2  # the slice and one h operand
        if not wide[1] and dtype != torch.float32 and whole_read_shared > shared - FWD_WHOLE_SHARED_HEADROOM:
            wide[1], wide[4] = min(FWD_CHUNK, head), REGISTER_BUDGET
        if narrow_card and head > BWD_NARROW_CHUNK:  # 16-row sub-tiles (bwd_block_b 0: block_b), the partial in chunks
            wide[3] = BWD_NARROW_CHUNK
        if dtype != torch.float32 and block_k >= 1024 and (directions > 1 or hidden % 16):  # NARROW_FWD_CHUNK
            if reduction_split(hidden, rows)[1]:  # the forward's h as one padded part (H760: 1024, not 512 + 256)
                fwd_head = block_k
            if rows <= 32:  # an 8-unit slice (one direction): the forward's chunks with the whole register budget
                wide[:2], wide[4] = [0, min(NARROW_FWD_CHUNK, fwd_head or head)], REGISTER_BUDGET
                if not narrow_card:  # and the backward's h as one padded part in chunks (an A100's as it was)
                    bwd_head, wide[3] = block_k, min(NARROW_BWD_CHUNK, block_k)
            else:
                # an A100's backward as it was (16-row sub-tiles, BWD_NARROW_CHUNK)
                wide = [0, min(NARROW_FWD_CHUNK, head), 0, wide[3] if narrow_card else min(NARROW_BWD_CHUNK, head), wide[4]]
                if group_tiles > 1:  # with zoneout, several sub-tiles: NARROW_ZONEOUT_FWD_CHUNK
                    fwd_zoneout_chunk = min(NARROW_ZONEOUT_FWD_CHUNK, fwd_head or head)
    elif gates in WALKING_GATES and proj and narrow_card and dtype != torch.float32:
        if reduction_split(proj, rows)[0] > PROJECTING_BWD_NARROW_CHUNK:  # the partial of dh_{t-1} in chunks
            wide[3] = PROJECTING_BWD_NARROW_CHUNK
    return PersistentPlan(size, block_s, block_k, block_b, slices, groups, directions, gates, num_warps, group_tiles, *wide, fwd_head, fwd_zoneout_chunk, bwd_head)


def launch_plan(gates: int, H: int, B: int, D: int, dtype: torch.dtype, device, proj: int = 0) -> PersistentPlan:
    """The partition :func:`launch` runs on ``device`` (its SMs and shared memory, or the card an
    ahead-of-time compile plans for), ``proj`` the LSTM's projection size (0: none): what a
    launcher sizing its scratch by the plan (slices, weight rows) must ask for."""
    return persistent_plan(gates, H, B, D, dtype, sm_count(device), shared_per_block(device), proj=proj)


def flow_shares(flow: torch.Tensor | None, gates: int, H: int, B: int, D: int, dtype: torch.dtype,
                proj: int = 0) -> torch.Tensor | None:
    """Where a persistent backward kernel writes the gradient-flow record: each program its
    share of ``||dL/dh_t||^2`` in a plane of a zeroed ``(slices, D, T, B)`` fp32 tensor (sum the
    planes into ``flow (D, T, B)`` after the launch; ``proj`` as :func:`launch_plan` takes it).
    None when ``flow`` is None or the plan for this size is not persistent (the other strategies
    write ``flow`` directly)."""
    from fastrnn.ops.recurrence import plan

    if flow is None or plan(gates, H, dtype).strategy != "persistent":
        return None
    slices = launch_plan(gates, H, B, D, dtype, flow.device, proj).slices
    return flow.new_zeros((slices, *flow.shape))


# ---------------------------------------------------------------------------------- launching
#: Barrier-mode decisions on a GPU by (kernel, grid, constexprs): True (co-resident, accepted) or
#: False (does not fit, or the cooperative launch was refused: run per_step).
_BARRIER_OK: dict[tuple, bool] = {}
#: Per-step launches on a GPU by the same key whose binary the device was found to load (:func:`_check_loads`).
_LOADS_OK: set[tuple] = set()


def _loaded(kernel, all_args: list, meta: dict, grid: tuple):
    """The compiled kernel of this launch, loaded on the device: Triton raises
    ``triton.runtime.errors.OutOfResources`` here (before any program runs) when its shared memory
    exceeds what a block of the device may use."""
    compiled = kernel.warmup(*all_args, grid=grid, **meta)
    compiled._init_handles()
    return compiled


def _fits_one_per_sm(kernel, all_args: list, meta: dict, plan: PersistentPlan, device) -> bool:
    """From the compiled kernel: at least one program fits an SM (registers, shared memory), and
    the grid is no larger than the SM count, so every program is resident at once. A barrier binary
    the device cannot load (OutOfResources) does not fit: the launch runs per step, whose own
    binary :func:`_check_loads` checks."""
    props = torch.cuda.get_device_properties(device)
    if plan.programs > props.multi_processor_count:
        return False
    try:
        compiled = _loaded(kernel, all_args, meta, plan.grid)
    except triton.runtime.errors.OutOfResources:
        return False
    threads = 32 * plan.num_warps
    registers = getattr(props, "regs_per_multiprocessor", 65536)
    shared = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    return compiled.n_regs * threads <= registers and compiled.metadata.shared <= shared


def _check_loads(name: str, kernel, all_args: list, meta: dict, plan: PersistentPlan) -> None:
    """Raise RuntimeError naming the kernel, its grid and the resource when the device cannot load
    the per-step binary of this launch (what ``kernel[grid]`` would die of with Triton's
    OutOfResources): no plan of this kernel is left to fall back to."""
    try:
        _loaded(kernel, all_args, meta, plan.grid)
    except triton.runtime.errors.OutOfResources as error:
        raise RuntimeError(
            f"{getattr(kernel, '__name__', name)}: grid {plan.grid} (slices x batch groups x directions; slice "
            f"{plan.slice}, {plan.programs} programs, per_step) cannot launch on this GPU: {error} "
            "(fastrnn.ops.persistent.persistent_plan sized it for this card's shared memory; please report it)"
        ) from error


def launch(
    name: str, kernel, args: list, meta: dict, *, gates: int, B: int, H: int, D: int, dtype: torch.dtype, device,
    phases: int, scratch: list[tuple[tuple, torch.dtype]], forward: bool = False,
) -> str:
    """Run ``kernel`` (a cell's persistent kernel, interface in the module docstring) over
    ``phases`` phases on the plan's grid; returns the mode it ran in (``barrier`` or ``per_step``).
    ``scratch``: the ``(shape, dtype)`` of each buffer the kernel takes after ``args`` (fresh,
    uninitialised). Raises RuntimeError naming the kernel and grid if a wait ran out of spins, or
    if the device cannot load the per-step binary (:func:`_check_loads`: Triton's OutOfResources)."""
    # HAS_PROJ: the LSTM's projection (its kernels' constexpr), which keeps the narrow sub-tiles
    plan = launch_plan(gates, H, B, D, dtype, device, int(meta["K"]) if meta.get("HAS_PROJ", False) else 0)

    def state() -> list[torch.Tensor]:  # what the kernel takes after args: scratch (uninitialised), flags, error (zeroed)
        buffers = [torch.empty(shape, device=device, dtype=dt) for shape, dt in scratch]
        return [*buffers, torch.zeros(plan.grid[::-1], device=device, dtype=torch.int32),
                torch.zeros(1, device=device, dtype=torch.int32)]

    on_gpu = torch.device(device).type == "cuda" and not backend.triton_interpreting()
    max_spins = MAX_SPINS["gpu" if on_gpu else "interpreter"]
    meta = dict(meta, **plan.constexprs(forward, zoneout=bool(meta.get("ZONEOUT", 0))), FAULT=FAULT)

    asked = mode()
    run_barrier = asked == "barrier" or (asked == "auto" and on_gpu)
    if run_barrier and not on_gpu and planning_card is not None and plan.programs > planning_card.sms:
        # An ahead-of-time capture (fastrnn.ops.aot) for a card this grid cannot be resident on
        # (persistent_plan's projecting slices): it records the per-step launches the card runs.
        run_barrier = False
    all_args = [*args, *state()] if run_barrier else []
    error = all_args[-1] if run_barrier else None
    # a tensor in meta (zoneout's mask) by its dtype: the compiled kernel does not depend on its values
    key = (name, plan.grid, tuple(sorted((k, str(v.dtype) if isinstance(v, torch.Tensor) else str(v)) for k, v in meta.items())))
    if run_barrier and on_gpu:
        if key not in _BARRIER_OK:
            _BARRIER_OK[key] = _fits_one_per_sm(kernel, [*all_args, 0, phases, max_spins],
                                                dict(meta, BARRIER=True, launch_cooperative_grid=True), plan, device)
        if not _BARRIER_OK[key]:
            if asked == "barrier":
                raise RuntimeError(f"{name}: FASTRNN_PERSISTENT_MODE=barrier, but grid {plan.grid} ({plan.programs} programs) "
                                   "cannot be resident at once on this GPU (more programs than SMs, or the compiled kernel "
                                   "needs more registers or shared memory than an SM has)")
            run_barrier = False
        else:
            try:
                kernel[plan.grid](*all_args, 0, phases, max_spins, **meta, BARRIER=True, launch_cooperative_grid=True)
            except RuntimeError:
                if asked == "barrier":
                    raise
                _BARRIER_OK[key] = False  # the driver refused the cooperative launch
                run_barrier = False
    elif run_barrier:
        kernel[plan.grid](*all_args, 0, phases, max_spins, **meta, BARRIER=True)
    if not run_barrier:  # one launch per phase, captured in a CUDA graph where valid (fastrnn.ops.step_graph)
        if on_gpu and key not in _LOADS_OK:
            _check_loads(name, kernel, [*args, *state(), 0, 1, max_spins], dict(meta, BARRIER=False), plan)
            _LOADS_OK.add(key)
        step_graph.launch_steps(name, kernel, plan.grid, args, state, meta, phases=phases, max_spins=max_spins,
                                device=device, on_gpu=on_gpu)
    if run_barrier and int(error.item()) != 0:
        raise RuntimeError(
            f"{getattr(kernel, '__name__', name)}: a program waited more than {max_spins} polls "
            f"at a step barrier (grid {plan.grid} = slices x batch groups x directions, {plan.programs} programs, "
            "barrier mode): not every program arrived; are all programs co-resident?"
        )
    return "barrier" if run_barrier else "per_step"
