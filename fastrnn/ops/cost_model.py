"""Cost model of one time step of a recurrent kernel on an H100/H200, written down so it can be checked.

An estimate, not a measurement: every input is a named :class:`Figure` with its value, unit and
source (a published figure by name, ``shared/NOTES.md``, or an assumption the first GPU session
must measure). ``python -m bench --plan`` prints them beside each row's estimate.

What a step costs, per program, on the critical path (the slowest program sets the pace):

* ``persistent`` in ``barrier`` mode (one launch; program ``(s, b, d)`` keeps the rows of ``W_hh``
  for its hidden slice of ``S`` units, all ``G`` gates, on chip for the whole sequence)::

      flag round trip            release after the block barrier, the waiters' acquire poll sees it
    + exchange load              L2 latency + (h_{t-1} of the program's batch group) / L2 bandwidth
    + weight reads               0 from registers; slice bytes / shared-memory bandwidth from shared
    + tensor-core time           max(dependent mma chain over K, FLOPs / mma rate)
    + pointwise                  the gates of the slice
  and at least (all L2 bytes of the step) / (aggregate L2 bandwidth).

  The backward walks time in reverse with one of two exchanges (``Partition.bwd_exchange``):
  ``reduce`` (``kernels/lstm_persistent.py``): each program keeps the forward's rows, writes its
  fp32 partial ``dh_{t-1}`` over all ``K`` units (``W_slice^T dgates_slice^T``: M = K, a reduction
  over only ``G*S``) and then sums the ``n_slices`` partials of its own units in
  ``ceil(n_slices / GATHER)`` dependent loads; ``all_gather``: each program holds the columns
  ``W_hh[:, slice]``, reads all ``G*H`` gate gradients of its group (``G`` times the forward's
  exchange) and reduces over ``G*H`` (M = S).
* ``persistent`` in ``per_step`` mode: one launch per step (in a CUDA graph), no flag, but the
  weight slice is loaded again every step (``weight_bytes_reread_per_step`` = all of ``W_hh``).
* A forward of several exchange rounds per step (``Partition.exchange_rounds``: the LayerNormLSTM's
  3, its norms' moments combined across the slices) pays the flag round trip (per step mode: the
  launch) once per round and one more L2 load per extra round; the pointwise norm math is not
  counted beyond the gates'.
* ``tiled`` (today's large-H strategy): one program per 16-row batch tile and direction streams all
  of its direction's ``W_hh`` from L2 every step in an unpipelined loop of ``REDUCE``-wide tiles.
* ``resident`` (small H): ``W_hh`` in registers, no exchange; the mma chain and the pointwise.

The byte counts are exact for the partition given; the times are as good as the figures
(``NOTES.md``'s review puts such estimates at +-40%) and assume a kernel that does not spill
(``python -m bench --plan`` flags the rows whose compiled kernels do).
"""

from __future__ import annotations

import dataclasses
import math

# ----------------------------------------------------------------------------------- figures


@dataclasses.dataclass(frozen=True)
class Figure:
    """One constant of the model: ``value`` in ``unit``, where it comes from, and whether it was
    published, measured here, derived from others, or assumed (to be measured on a GPU)."""

    value: float
    unit: str
    source: str
    kind: str  # "published" | "measured" | "derived" | "assumption"


FIGURES: dict[str, Figure] = {
    "sm_count": Figure(132, "SMs", "H100 SXM5 / H200: 132 SMs (NVIDIA H100 Tensor Core GPU Architecture whitepaper; NOTES.md)", "published"),
    "clock_ghz": Figure(1.98, "GHz", "H100/H200 SXM boost clock (NOTES.md: per-SM L2 bandwidth quoted at 1.98 GHz)", "published"),
    "l2_bytes_per_clk_per_sm": Figure(64, "B/clk", "per-SM L2 bandwidth, low end of 64-128 B/clk (NOTES.md, 'Where the current kernels stand'); the estimate takes the low end", "published"),
    "l2_bytes_per_clk_per_sm_best": Figure(128, "B/clk", "per-SM L2 bandwidth, high end of 64-128 B/clk (NOTES.md); gives the optimistic bound", "published"),
    "l2_total_bytes_per_clk": Figure(5120, "B/clk", "aggregate L2 read bandwidth: A100 whitepaper's 5120 B/clk; NVIDIA publishes none for Hopper, assumed not lower", "assumption"),
    "l2_latency_clk": Figure(270, "clk", "L2 hit latency: 222-339 cycles across the SMs of an L40 ('Non-Uniform L2 Cache Latency Across the SMs of an NVIDIA L40', arXiv 2606.22588); Hopper assumed alike (Luo et al., 'Benchmarking and Dissecting the Nvidia Hopper GPU Architecture', arXiv 2402.13499, has the H800 figures)", "assumption"),
    "flag_round_trip_l2_latencies": Figure(3.75, "L2 latencies", "kernels/sync.py's protocol: the arrive's bar.sync + release fence drains the step's stores to L2 (1) and its atomic_xchg reaches L2 (1); a waiter's poll (acquire atomics on the group's flags, one L2 round trip) sees it half a poll period later on average plus one round trip (1.5); then a tl.min over the flags and bar.sync (0.25)", "assumption"),
    "mma_latency_clk": Figure(32, "clk", "one dependent mma.sync m16n8k16 with fp32 accumulators, about 30 cycles on A100 (Sun et al. 2022, 'Dissecting Tensor Cores via Microbenchmarks', IEEE TPDS); Hopper's mma.sync (HMMA, what Triton emits for M=16 tiles) assumed alike", "assumption"),
    "mma_flop_per_clk_per_sm": Figure(2048, "FLOP/clk", "mma.sync (HMMA) rate: half of Hopper's dense wgmma rate of 4096 FLOP/clk/SM (989 TFLOP/s bf16 dense / 132 SMs / 1.83 GHz, H100 whitepaper); Luo et al. (arXiv 2402.13499) measure mma.sync well below wgmma on Hopper", "assumption"),
    "mma_tf32_flop_per_clk_per_sm": Figure(1024, "FLOP/clk", "mma.sync (HMMA) rate on tf32 operands: half the 16-bit rate above, as Hopper's dense TF32 is half its dense BF16 (494.7 vs 989.4 TFLOP/s, H100 SXM5, H100 whitepaper); one m16n8k8 tf32 mma assumed as slow as one m16n8k16 16-bit mma (mma_latency_clk)", "derived"),
    "fma_flop_per_clk_per_sm": Figure(256, "FLOP/clk", "128 FP32 lanes per SM x 2 (H100 whitepaper): fp32 'ieee' dots run on FMA units", "published"),
    "fma_latency_clk": Figure(4, "clk", "dependent FP32 FMA latency, 4 cycles on Volta..Hopper (Jia et al., 'Dissecting the NVIDIA Volta GPU Architecture via Microbenchmarking', 2018)", "published"),
    "shared_bytes_per_clk_per_sm": Figure(128, "B/clk", "shared memory: 32 banks x 4 B per clock per SM (CUDA programming guide; HOPPER.md 'Banks')", "published"),
    "shared_limit_bytes": Figure(232_448, "B", "shared memory one block may use on H100/H200 (NOTES.md; fastrnn.ops.aot.SHARED_LIMIT)", "published"),
    "pointwise_clk_per_element": Figure(24, "clk", "gate math per element and thread (a few FMAs and one MUFU ex2/rcp per sigmoid or tanh, dependent): an assumption", "assumption"),
    "graph_launch_us": Figure(2.0, "us", "one kernel launch inside a CUDA graph replay, back to back: NOTES.md's per-step-mode estimate for L1 (2.5-3.5 us/step) less the step's own work", "derived"),
    "tiled_iteration_loads": Figure(2, "L2 latencies", "the tiled kernels' unpipelined reduction step: two dependent global loads (NOTES.md review of the sm_90 SASS)", "derived"),
    "tiled_iteration_barriers_clk": Figure(80, "clk", "four block barriers per reduction step (NOTES.md review), ~20 clk each (assumption)", "assumption"),
}


def figure(name: str) -> float:
    return FIGURES[name].value


def clk_to_us(clk: float) -> float:
    return clk / (figure("clock_ghz") * 1e3)


# ----------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Workload:
    """One recurrent layer: ``gates`` stacked blocks of ``hidden`` rows over ``K`` state columns
    (``proj`` or ``hidden``), ``batch`` rows, ``directions``, element size of the compute dtype."""

    cell: str
    gates: int
    hidden: int
    batch: int
    directions: int
    dtype_bytes: int
    fp32: bool  # 16-bit dots run on tensor cores; fp32 ones as the precisions below say
    precision: str = "ieee"  # INPUT_PRECISION of the resident and tiled kernels (fastrnn.ops.recurrence.input_precision)
    persistent_precision: str = "ieee"  # INPUT_PRECISION of the cell's persistent kernels
    proj: int = 0

    @property
    def k(self) -> int:
        return self.proj or self.hidden

    @classmethod
    def from_row(cls, row) -> Workload:
        """From a :class:`bench.matrix.Row` (first layer; deeper layers have the same recurrence)."""
        gates = {"rnn": 1, "gru": 3, "lstm": 4}[row.cell]
        size = {"float32": 4, "float16": 2, "bfloat16": 2}[row.dtype]
        from fastrnn.ops.recurrence import input_precision

        fp32 = row.dtype == "float32"
        return cls(row.cell, gates, row.hidden, row.batch, 2 if row.bidirectional else 1, size, fp32,
                   precision=input_precision(row.torch_dtype, "resident", gates),
                   persistent_precision=input_precision(row.torch_dtype, "persistent", gates))


@dataclasses.dataclass(frozen=True)
class Partition:
    """How a strategy spreads a layer over the card.

    ``persistent``: ``slices`` programs of ``hidden_slice`` units per (batch group, direction),
    ``batch_groups`` of ``batch_per_group`` rows; ``mode`` ``barrier`` or ``per_step``;
    ``exchange_bytes`` per exchanged element (0: the compute dtype's, as ``kernels/lstm_persistent.py``
    exchanges ``h`` and ``dgates`` in it; 4 for an fp32 exchange); ``k_chains``
    independent accumulators the product's reduction is split into; ``weights_in`` where the slice
    lives during the sequence (``registers`` or ``shared``, read from the compile); ``batch_tiles``
    the sub-tiles a program walks its group in, one product (and one ``h`` load, its chunks in flight
    together) after another, and ``bwd_batch_tiles`` the backward's where they differ (the LSTM's
    forward walks wider sub-tiles than its backward, ``fastrnn.ops.persistent.FWD_MAX_BLOCK_B``:
    each term of a sub-tile is then counted per direction with that direction's sub-tiles).
    ``tiled`` / ``resident``: one program per ``batch_per_group``-row batch tile and direction.
    """

    strategy: str
    programs: int
    batch_groups: int
    batch_per_group: int
    hidden_slice: int = 0
    slices: int = 1
    mode: str = "barrier"
    exchange_bytes: int = 0
    k_chains: int = 1
    weights_in: str = "registers"
    num_warps: int = 8
    bwd_exchange: str = "reduce"  # or "all_gather" (see the module docstring)
    gather: int = 8  # partials summed per load ("reduce")
    batch_tiles: int = 1  # sub-tiles a program walks its batch group in, one product after another
    bwd_batch_tiles: int = 0  # the backward's, where its sub-tiles are narrower than the forward's (0: batch_tiles)
    # Flag rounds per forward step: 1 (h), 3 for the LayerNormLSTM (h, then the recurrent and the
    # cell norm's moments: kernels/layer_norm_rnn.py), each extra round a flag round trip, an L2
    # load of every program's ``round_bytes`` per batch row (its partial moments) and, per step
    # mode, a launch of its own.
    exchange_rounds: int = 1
    round_bytes: int = 0
    bwd_exchange_rounds: int = 1  # the backward's (the LayerNormLSTM's: 3, its two norms' means and dh)

    def describe(self) -> str:
        if self.strategy == "persistent":
            walked = f" (walked as {self.batch_tiles} sub-tiles)" if self.batch_tiles > 1 else ""
            if self.bwd_batch_tiles and self.bwd_batch_tiles != self.batch_tiles:
                walked = f" (walked as {self.batch_tiles} sub-tiles forward, {self.bwd_batch_tiles} backward)"
            return (f"{self.slices} slices of {self.hidden_slice} x {self.batch_groups} batch groups of "
                    f"{self.batch_per_group}{walked} = {self.programs} programs, {self.mode}")
        return f"{self.programs} programs ({self.batch_per_group}-row batch tiles x directions)"


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Per-step bytes (all programs together) and times (microseconds, critical path)."""

    weight_bytes_reread_per_step: int
    exchange_bytes_per_step: int  # forward: h written by its owners + read by every program of the group
    exchange_bytes_per_step_bwd: int
    l2_bytes_per_step: int  # everything the forward step moves through L2 (weights, exchange, gx, outputs)
    fwd_us: float
    bwd_us: float
    fwd_terms_us: dict
    bwd_terms_us: dict
    fwd_best_us: float  # with the optimistic per-SM L2 bandwidth

    @property
    def fwd_bwd_us(self) -> float:
        return self.fwd_us + self.bwd_us


def _pad16(n: int) -> int:
    """``tl.dot`` needs every dimension >= 16 (powers of two)."""
    return max(16, 1 << max(0, (n - 1).bit_length()))


#: An fp32 product on tensor cores by ``INPUT_PRECISION``: (tf32 multiply-adds per fp32 one, depth of
#: the dependent mma chain in multiples of ``k``). ``tf32x3``: Triton's three chained products;
#: ``tf32x4``: ``fastrnn.kernels.precision``'s one product over the stacked halves, ``2k`` deep and
#: ``2n`` wide. A tf32 mma reduces over 8, not 16.
TF32_PRODUCTS = {"tf32": (1, 1), "tf32x3": (3, 3), "tf32x4": (4, 2)}


def _product_clk(w: Workload, m: int, n: int, k: int, k_chains: int, precision: str = "ieee") -> tuple[float, float]:
    """(latency of the dependent chain, throughput time) of one ``(m x k) @ (k x n)`` product in a
    program, its fp32 operands at ``precision`` (:data:`TF32_PRODUCTS`; ``ieee``: FMA units)."""
    flops = 2.0 * _pad16(m) * _pad16(n) * k
    if w.fp32 and precision in TF32_PRODUCTS:
        products, depth = TF32_PRODUCTS[precision]
        chain = math.ceil(depth * k / 8) * figure("mma_latency_clk") / k_chains
        return chain, products * flops / figure("mma_tf32_flop_per_clk_per_sm")
    if w.fp32:
        chain = k * figure("fma_latency_clk") / k_chains
        return chain, flops / figure("fma_flop_per_clk_per_sm")
    chain = math.ceil(k / 16) * figure("mma_latency_clk") / k_chains
    return chain, flops / figure("mma_flop_per_clk_per_sm")


def _weight_copies(w: Workload) -> int:
    """Copies of its weight slice a persistent program holds: 2 for ``tf32x4`` (its tf32 halves)."""
    return 2 if w.fp32 and w.persistent_precision == "tf32x4" else 1


def _bandwidth(programs: int, per_sm: float) -> float:
    """L2 bytes per clock one program gets when ``programs`` read at once."""
    return min(per_sm, figure("l2_total_bytes_per_clk") / max(1, programs))


def _pointwise_clk(elements: int, num_warps: int) -> float:
    return math.ceil(elements / (32 * num_warps)) * figure("pointwise_clk_per_element")


# ----------------------------------------------------------------------------------- strategies


def estimate(w: Workload, p: Partition) -> Estimate:
    """Bytes and time per step of workload ``w`` under partition ``p``."""
    fn = {"persistent": _persistent, "tiled": _tiled, "resident": _resident}[p.strategy]
    return fn(w, p)


def _persistent(w: Workload, p: Partition) -> Estimate:
    G, H, K, e = w.gates, w.hidden, w.k, w.dtype_bytes
    S, Bg = p.hidden_slice, p.batch_per_group
    x = p.exchange_bytes or e
    lat = figure("l2_latency_clk")
    flag = figure("flag_round_trip_l2_latencies") * lat if p.mode == "barrier" else 0.0
    launch = figure("graph_launch_us") if p.mode == "per_step" else 0.0
    # the forward's extra rounds (Partition.exchange_rounds): each program reads every program's
    # partial of its group's rows and writes its own
    extra_rounds = p.exchange_rounds - 1

    def read_rounds(rounds):  # the partials a program reads in its extra rounds
        return (rounds - 1) * p.slices * Bg * p.round_bytes
    slice_bytes = G * S * K * e  # rows of W_hh (forward) or columns (backward) a program holds
    weights_reread = slice_bytes * p.programs if p.mode == "per_step" else 0
    # forward exchange: every program reads all K columns of h_{t-1} of its batch group; owners write theirs
    read_fwd = Bg * K * x
    exchange_fwd = (p.programs * (read_fwd + read_rounds(p.exchange_rounds) + extra_rounds * Bg * p.round_bytes)
                    + w.directions * w.batch * K * x)
    # backward exchange, written and read, all programs
    if p.bwd_exchange == "reduce":  # fp32 partials of dh over all K units, each owner sums its S units'
        read_bwd = p.slices * S * Bg * 4
        exchange_bwd = p.programs * (K * Bg * 4 + read_bwd + read_rounds(p.bwd_exchange_rounds)
                                     + (p.bwd_exchange_rounds - 1) * Bg * p.round_bytes)
        bwd_loads, bwd_m, bwd_k = math.ceil(p.slices / p.gather), K, G * S
    else:  # all G*H gate gradients of the group (all-gather of dgates)
        read_bwd = Bg * G * H * x
        exchange_bwd = p.programs * read_bwd + w.directions * w.batch * G * H * x
        bwd_loads, bwd_m, bwd_k = 1, S, G * H
    # per_step mode: the fp32 state a program carries (c; dh and dc backward) in and out of every launch
    # (also in barrier mode when a program walks its group in sub-tiles: the state of each goes
    # through the program's carry rows every step)
    bwd_tiles = p.bwd_batch_tiles or p.batch_tiles

    def carried(tiles):
        return 2 * S * Bg * 4 * (2 if w.cell == "lstm" else 1) if p.mode == "per_step" or tiles > 1 else 0
    # streamed, prefetched: gx slice in, y / saved gates (and c) out
    stream_fwd = p.programs * Bg * (G * S + S + G * S + (S if w.cell == "lstm" else 0)) * e
    l2_fwd = weights_reread + exchange_fwd + stream_fwd

    def step(read_bytes, m, k, loads=1, best=False, tiles=p.batch_tiles, rounds=1):
        per_sm = figure("l2_bytes_per_clk_per_sm_best" if best else "l2_bytes_per_clk_per_sm")
        bw = _bandwidth(p.programs, per_sm)
        load = loads * tiles * lat + (read_bytes + (slice_bytes if p.mode == "per_step" else 0) + carried(tiles)) / bw
        load += (rounds - 1) * lat + read_rounds(rounds) / bw  # the extra rounds' partials
        # read once per sub-tile's product; "tf32x4" holds the slice twice over (its tf32 halves,
        # fastrnn.kernels.precision)
        weights = (tiles * slice_bytes * _weight_copies(w) / figure("shared_bytes_per_clk_per_sm")
                   if p.weights_in == "shared" and p.mode == "barrier" else 0.0)
        # a walked group: per sub-tile, its h load and its product, one sub-tile after another
        # (the L2 latencies and the mma chains add up)
        chain, rate = _product_clk(w, m, max(1, Bg // tiles), k, p.k_chains, w.persistent_precision)
        chain, rate = chain * tiles, rate * tiles
        pointwise = _pointwise_clk(G * S * Bg, p.num_warps)
        floor = l2_fwd / figure("l2_total_bytes_per_clk")
        terms = {"launch": rounds * launch, "flag": clk_to_us(rounds * flag), "exchange_load": clk_to_us(load),
                 "weights_from_shared": clk_to_us(weights), "tensor_core": clk_to_us(max(chain, rate)),
                 "pointwise": clk_to_us(pointwise)}
        total = max(sum(terms.values()), clk_to_us(floor))
        return total, terms

    fwd, fwd_terms = step(read_fwd, G * S, K, rounds=p.exchange_rounds)
    fwd_best, _ = step(read_fwd, G * S, K, best=True, rounds=p.exchange_rounds)
    bwd, bwd_terms = step(read_bwd, bwd_m, bwd_k, bwd_loads, tiles=bwd_tiles, rounds=p.bwd_exchange_rounds)
    return Estimate(weights_reread, exchange_fwd, exchange_bwd, l2_fwd, fwd, bwd, fwd_terms, bwd_terms, fwd_best)


#: The tiled kernels' reduction width (``REDUCE_TILE`` in kernels/lstm.py; the Elman and GRU
#: kernels reduce over ``BLOCK_H``) and output tile.
TILED_REDUCE = {"lstm": 32, "gru": 64, "rnn": 64}
TILED_TILE = 64


def _tiled(w: Workload, p: Partition) -> Estimate:
    G, H, K, e = w.gates, w.hidden, w.k, w.dtype_bytes
    lat = figure("l2_latency_clk")
    w_bytes = G * H * K * e  # a direction's W_hh, streamed by every program of that direction
    reread = w_bytes * p.programs
    state = p.batch_per_group * K * 4  # fp32 ping-pong state read per step per program
    iteration = figure("tiled_iteration_loads") * lat + figure("tiled_iteration_barriers_clk")
    bw = _bandwidth(p.programs, figure("l2_bytes_per_clk_per_sm"))
    bw_best = _bandwidth(p.programs, figure("l2_bytes_per_clk_per_sm_best"))

    def step(iterations, streamed, bandwidth):
        loop = iterations * iteration
        floor = streamed / bandwidth
        terms = {"reduction_loop": clk_to_us(loop), "weight_stream_floor": clk_to_us(floor)}
        return clk_to_us(max(loop, floor)), terms

    reduce = TILED_REDUCE[w.cell]
    it_fwd = math.ceil(G * H / TILED_TILE) * math.ceil(K / reduce)
    it_bwd = math.ceil(K / TILED_TILE) * math.ceil(G * H / reduce)
    fwd, fwd_terms = step(it_fwd, w_bytes + state, bw)
    fwd_best, _ = step(it_fwd, w_bytes + state, bw_best)
    bwd, bwd_terms = step(it_bwd, w_bytes + G * state, bw)
    exchange = p.programs * state * 2
    return Estimate(reread, exchange, exchange * G, reread + exchange, fwd, bwd, fwd_terms, bwd_terms, fwd_best)


def _resident(w: Workload, p: Partition) -> Estimate:
    G, H, K = w.gates, w.hidden, w.k
    lat = figure("l2_latency_clk")
    Bt = p.batch_per_group

    def step(m, k):
        chain, rate = _product_clk(w, m, Bt, k, p.k_chains, w.precision)
        terms = {"gx_load": clk_to_us(lat), "tensor_core": clk_to_us(max(chain, rate)),
                 "pointwise": clk_to_us(_pointwise_clk(G * H * Bt, p.num_warps))}
        return sum(terms.values()), terms

    fwd, fwd_terms = step(G * H, K)
    bwd, bwd_terms = step(K, G * H)
    stream = p.programs * Bt * 3 * G * H * w.dtype_bytes
    return Estimate(0, 0, 0, stream, fwd, bwd, fwd_terms, bwd_terms, fwd)


# ----------------------------------------------------------------------------------- partitions


def today_partition(w: Workload, strategy: str, num_warps: int = 8, block_b: int = 16) -> Partition:
    """The resident or tiled strategy's grid: ``(cdiv(B, 16), D)``."""
    tiles = math.ceil(w.batch / block_b)
    return Partition(strategy, tiles * w.directions, tiles, block_b, num_warps=num_warps)


def persistent_partition(w: Workload, hidden_slice: int, batch_groups: int, **options) -> Partition:
    slices = math.ceil(w.hidden / hidden_slice)
    per_group = math.ceil(w.batch / batch_groups)
    return Partition("persistent", slices * batch_groups * w.directions, batch_groups, per_group,
                     hidden_slice=hidden_slice, slices=slices, **options)


def candidate_partitions(w: Workload, **options) -> list[Partition]:
    """Every persistent partition that fits the card: slices a power of two with the slice's
    weights (``G*S*K`` elements) within one block's shared memory, batch groups a power of two
    of at least 16 rows (or the whole batch), at most one program per SM."""
    out = []
    S = 1
    while S <= w.hidden:
        groups = 1
        while groups == 1 or math.ceil(w.batch / groups) >= 16:
            p = persistent_partition(w, S, groups, **options)
            fits = w.gates * S * w.k * w.dtype_bytes * _weight_copies(w) <= figure("shared_limit_bytes")
            if fits and p.programs <= figure("sm_count"):
                out.append(p)
            groups *= 2
        S *= 2
    return out


def best_partition(w: Workload, min_programs: int = 1, **options) -> tuple[Partition, Estimate] | None:
    """The candidate of at least ``min_programs`` programs with the smallest forward+backward
    estimate (ties: fewer programs)."""
    scored = [(estimate(w, p), p) for p in candidate_partitions(w, **options) if p.programs >= min_programs]
    if not scored:
        return None
    e, p = min(scored, key=lambda pair: (pair[0].fwd_bwd_us, pair[1].programs))
    return p, e
