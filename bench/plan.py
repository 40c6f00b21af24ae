"""The plan report: ``python -m bench --plan [--json]``.

For every row of the GPU matrix (:data:`bench.matrix.GPU_MATRIX`), then the LayerNormLSTM GPU row of
issue 18 (:data:`LAYER_NORM_ROWS`, :func:`plan_layer_norm_row`): the strategy and grid the
launcher would use on an H100/H200, the kernels it would launch compiled ahead of time for sm_90
with the real launch's signature and specialisation (:func:`fastrnn.ops.aot.capture_launches`:
registers, spills, shared memory), the bytes and the time per step the cost model
(:mod:`fastrnn.ops.cost_model`) estimates for that partition, today's tiled or resident strategy
estimated the same way, and cuDNN's published per-step figure for the shape (``ANCHORS``, from
``shared/NOTES.md``; most are estimates, and each entry says which).

Everything here is an estimate from compiles and a model: no GPU ran. ``--json`` prints a JSON
list, one object per row; the plain form prints a table, the model's figures and their sources.
The compiles run in this process (never under ``TRITON_INTERPRET=1``) and Triton caches them on
disk, so a second run takes seconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys

import torch

from bench import matrix
from fastrnn.ops import cost_model
from fastrnn.ops.aot import SHARED_LIMIT

#: cuDNN through torch.nn, microseconds per step (forward, forward+backward), from NOTES.md's
#: "cuDNN per-step anchors for the GPU matrix". ``strict`` is the lowest figure given for the shape
#: (what the estimate is held to); ``range`` the row dtype's figures; ``kind`` says which are estimates.
ANCHORS: dict[str, dict] = {
    "L1": dict(strict=(1.96, 5.07), range="fp16 1.96 / 5.07 (cuDNN persistent algorithm); bf16 standard est. 7-10 / 18-25",
               kind="measured (fp16, FlashRNN's benchmark, H100); bf16 figure an estimate"),
    "L2": dict(strict=(1.5, 4.0), range="fp16 est. 1.5-2 / 4-5; bf16 est. ~9 / 20-23", kind="estimate"),
    "L3": dict(strict=(8.0, 19.0), range="est. 8-9 / 19-23 (standard algorithm forced)", kind="estimate"),
    "L4": dict(strict=(12.0, 35.0), range="est. 12-20 / 35-55 (standard algorithm forced)", kind="estimate"),
    "L5": dict(strict=(9.0, 18.0), range="~9-10 / 18-20", kind="nearest shape (KernelBench LSTM H256 fp32, 8.9 us, H100)"),
    "G1": dict(strict=(10.0, 25.0), range="est. 10-13 / 25-30", kind="estimate (KernelBench GRU 7.1-12.7 us, noisy)"),
    "R1": dict(strict=(1.5, 4.0), range="fp16 est. 1.5-2.5 / 4-6; bf16 est. 6-9 / 15-20", kind="estimate (no tanh data anywhere)"),
    "P1": dict(strict=(9.0, 20.0), range="est. 9-11 / 20-25 per padded step", kind="estimate"),
    "B1": dict(strict=(35.0, 80.0), range="~35 / ~80 per timestep (2 layers x 2 directions)", kind="nearest shape (KernelBench BiLSTM 17.6 us per layer-step)"),
}

#: Programs the issue asks for on the rows with H >= 512.
MIN_PROGRAMS_LARGE_H = 64


def compile_checks(kernels: list[dict], errors: list[str], arch: int) -> list[str]:
    """What a row's compiled kernels fail: spills, shared memory over the arch's limit, failed compiles."""
    checks = []
    for k in kernels:
        if k["spill_bytes"]:
            checks.append(f"{k['kernel']} spills on {k['arch']}: {k['registers']} registers, {k['stack_bytes']} B of stack, "
                          f"{k['local_bytes']} B of local memory per thread")
        if k["shared_bytes"] > SHARED_LIMIT[arch]:
            checks.append(f"{k['kernel']} needs {k['shared_bytes']:,} B of shared memory, over sm_{arch}'s {SHARED_LIMIT[arch]:,}")
    if errors:
        checks.append("compile failed: " + "; ".join(errors))
    return checks


@contextlib.contextmanager
def _barrier_mode():
    """Persistent launches as an H100/H200 runs them: one cooperative launch (``BARRIER=True``),
    not the per-step launches a machine without a GPU would fall back to."""
    from fastrnn.ops import persistent

    previous = os.environ.get(persistent.MODE_ENV)
    os.environ[persistent.MODE_ENV] = "barrier"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[persistent.MODE_ENV]
        else:
            os.environ[persistent.MODE_ENV] = previous


def capture_row(row: matrix.Row, arch: int = 90, heaviest: bool = False) -> list:
    """The distinct launches (:class:`fastrnn.ops.aot.Launch`) of one recurrent layer of ``row``,
    forward and backward, as Triton specialises them for ``sm_{arch}``: the real layer function on
    CPU tensors of the row's batch and hidden size under :func:`fastrnn.ops.aot.capture_launches`
    (``T`` is never specialised, so a few steps stand for the row's ``T``). Packed rows get
    lengths. ``heaviest`` turns on what a user could add at that shape: lengths, ``grad_clip``,
    the gradient-flow record, gelu for the Elman cell."""
    from fastrnn.ops import aot

    options = dict(bidirectional=row.bidirectional, lengths=row.packed or heaviest)
    if row.cell == "rnn":
        options["nonlinearity"] = "gelu" if heaviest else row.nonlinearity
    if heaviest:
        options.update(grad_clip=1.0, record_flow=True)
    with _barrier_mode(), aot.capture_launches(arch) as launches:
        aot.layer_workload(row.cell, row.torch_dtype, row.hidden, row.batch, **options)
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key, launch)
    return list(unique.values())


def launcher_partition(row: matrix.Row, workload: cost_model.Workload, launches: list, kernels: list[dict]) -> cost_model.Partition:
    """The partition the launcher chose for ``row``: the strategy from the launched kernels' names;
    for ``persistent`` the grid of :func:`fastrnn.ops.persistent.persistent_plan` (what the
    launcher launches on a 132-SM card), the backward's exchange from its buffers
    (``dh_partial_ptr``: partials of ``dh`` reduced by their owners, else an all-gather of the gate
    gradients), ``GATHER`` from its constants, and where the weight slice lives from the compile
    (shared memory when the forward kernel's shared memory can hold it, else registers)."""
    from fastrnn.ops import persistent

    forward = launches[0]
    strategy = next((s for s in ("persistent", "tiled", "resident") if f"_{s}" in forward.name), "unknown")
    warps = forward.options.get("num_warps", 4)
    if strategy in ("tiled", "resident"):
        return cost_model.today_partition(workload, strategy, warps)
    if strategy != "persistent":
        raise NotImplementedError(f"{row.name}: no cost-model partition for the launch {forward.name}")
    pp = persistent.persistent_plan(workload.gates, row.hidden, row.batch, workload.directions, row.torch_dtype,
                                    persistent.DEFAULT_SM_COUNT, persistent.DEFAULT_SHARED_BYTES)
    backward = next((l for l in launches if "_bwd_" in l.name), None)
    bwd_params = [p.name for p in backward.kernel.params] if backward else []
    # partials summed per load: a GATHER argument when the kernel takes one, else the rule
    # kernels/lstm.py applies inside the kernel (min(BLOCK_FLAGS, 8); the partials of dh 4 projecting in barrier mode)
    gather = min(8, pp.block_flags)
    if backward and "GATHER" in bwd_params:
        gather = backward.constants.get((bwd_params.index("GATHER"),), gather)
    slice_bytes = workload.gates * pp.slice * workload.k * workload.dtype_bytes
    forward_shared = next((k["shared_bytes"] for k in kernels if k["kernel"] == forward.name), 0)
    return cost_model.Partition(
        "persistent", pp.programs, pp.batch_groups, min(pp.group_rows, row.batch), hidden_slice=pp.slice, slices=pp.slices,
        batch_tiles=pp.fwd_tiles, bwd_batch_tiles=pp.bwd_tiles,
        mode="barrier", weights_in="shared" if forward_shared >= slice_bytes else "registers", num_warps=pp.num_warps,
        bwd_exchange="reduce" if "dh_partial_ptr" in bwd_params else "all_gather", gather=gather,
    )


def _kernel_record(launch, resources) -> dict:
    return dict(kernel=launch.name, arch=f"sm_{launch.arch}", registers=resources.registers,
                spill_bytes=resources.stack + resources.local, stack_bytes=resources.stack, local_bytes=resources.local,
                shared_bytes=resources.shared, tensor_core_ops=resources.tensor_core_ops,
                num_warps=launch.options.get("num_warps"), num_stages=launch.options.get("num_stages"),
                specialisation=launch.specialisation())


def _rounded(value, digits=2):
    return None if value is None else round(value, digits)


def plan_row(row: matrix.Row, arch: int = 90) -> dict:
    """One row of the report (see the module docstring)."""
    from fastrnn.ops.aot import compile_launch

    workload = cost_model.Workload.from_row(row)
    launches = capture_row(row, arch)
    record: dict = dict(row=row.name, shape=row.describe(), hidden=row.hidden)
    kernels, errors = [], []
    for launch in launches:
        try:
            kernels.append(_kernel_record(launch, compile_launch(launch)))
        except Exception as error:  # reported in the row, not hidden: the row shows no resources
            errors.append(f"{launch.name}: {type(error).__name__}: {error}")
    partition = launcher_partition(row, workload, launches, kernels)
    est = cost_model.estimate(workload, partition)
    record.update(
        strategy=partition.strategy,
        mode=partition.mode if partition.strategy == "persistent" else "one launch",
        # the INPUT_PRECISION the launches got (fp32: tf32 or a split, by PyTorch's flags at report time)
        input_precision=workload.persistent_precision if partition.strategy == "persistent" else workload.precision,
        partition=partition.describe(),
        programs=partition.programs,
        # flag rounds per forward step: 1 for a persistent plain cell (h), 0 where programs exchange nothing
        exchange_rounds_per_step=partition.exchange_rounds if partition.strategy == "persistent" else 0,
        weight_bytes_reread_per_step=est.weight_bytes_reread_per_step,
        exchange_bytes_per_step=est.exchange_bytes_per_step,
        exchange_bytes_per_step_bwd=est.exchange_bytes_per_step_bwd,
        l2_bytes_per_step=est.l2_bytes_per_step,
        # the heaviest kernel of the row (forward and backward are listed under "kernels")
        registers=max((k["registers"] for k in kernels), default=None),
        spill_bytes=max((k["spill_bytes"] for k in kernels), default=None),
        shared_bytes=max((k["shared_bytes"] for k in kernels), default=None),
        kernels=kernels,
        est_us_per_step_fwd=_rounded(est.fwd_us),
        est_us_per_step_bwd=_rounded(est.bwd_us),
        est_us_per_step_fwd_bwd=_rounded(est.fwd_bwd_us),
        est_us_per_step_fwd_optimistic=_rounded(est.fwd_best_us),
        est_terms_us_fwd={k: _rounded(v, 3) for k, v in est.fwd_terms_us.items()},
        est_terms_us_bwd={k: _rounded(v, 3) for k, v in est.bwd_terms_us.items()},
        estimate_kind="cost model (fastrnn.ops.cost_model), no GPU measurement",
    )
    # the other strategies of the same row, estimated the same way (today's tiled grid; the
    # persistent kernel in per-step mode, what a GPU runs when the cooperative launch is refused)
    compare = {}
    if partition.strategy != "tiled":
        tiled = cost_model.estimate(workload, cost_model.today_partition(workload, "tiled"))
        compare["tiled"] = dict(weight_bytes_reread_per_step=tiled.weight_bytes_reread_per_step,
                                est_us_per_step_fwd=_rounded(tiled.fwd_us), est_us_per_step_bwd=_rounded(tiled.bwd_us))
    if partition.strategy == "persistent":
        per_step = cost_model.estimate(workload, dataclasses.replace(partition, mode="per_step"))
        compare["persistent_per_step"] = dict(weight_bytes_reread_per_step=per_step.weight_bytes_reread_per_step,
                                              est_us_per_step_fwd=_rounded(per_step.fwd_us),
                                              est_us_per_step_bwd=_rounded(per_step.bwd_us))
    record["other_strategies"] = compare
    anchor = ANCHORS.get(row.name)
    if anchor:
        fwd, fwd_bwd = anchor["strict"]
        record.update(cudnn_us_per_step_anchor=fwd, cudnn_us_per_step_anchor_fwd_bwd=fwd_bwd,
                      cudnn_anchor_figures=anchor["range"], cudnn_anchor_kind=anchor["kind"],
                      est_fwd_within_anchor=est.fwd_us <= fwd)
    best = cost_model.best_partition(workload, MIN_PROGRAMS_LARGE_H if row.hidden >= 512 else 1)
    if best:
        p, e = best
        record["model_best_partition"] = dict(partition=p.describe(), programs=p.programs, hidden_slice=p.hidden_slice,
                                              batch_groups=p.batch_groups, est_us_per_step_fwd=_rounded(e.fwd_us),
                                              est_us_per_step_bwd=_rounded(e.bwd_us))
    checks = []
    if est.weight_bytes_reread_per_step:
        checks.append(f"W_hh re-read: {est.weight_bytes_reread_per_step:,} B per step")
    if partition.strategy == "persistent":
        slice_bytes = workload.gates * partition.hidden_slice * workload.k * workload.dtype_bytes
        if slice_bytes > cost_model.figure("shared_limit_bytes"):
            checks.append(f"the weight slice is {slice_bytes:,} B per program, more than one block's shared memory "
                          f"({cost_model.figure('shared_limit_bytes'):,.0f} B): it cannot stay on chip (the estimate assumes it does)")
    if row.hidden >= 512 and partition.programs < MIN_PROGRAMS_LARGE_H:
        checks.append(f"{partition.programs} programs < {MIN_PROGRAMS_LARGE_H} at H={row.hidden}")
    if anchor and est.fwd_us > anchor["strict"][0]:
        fix = record.get("model_best_partition", {})
        checks.append(f"forward estimate {est.fwd_us:.2f} us > cuDNN anchor {anchor['strict'][0]} us"
                      + (f"; the model's best partition: {fix['partition']} at {fix['est_us_per_step_fwd']} us" if fix else ""))
    checks += compile_checks(kernels, errors, arch)
    record["issues"] = checks
    return record


#: The LayerNormLSTM GPU row of issue 18 (``bench.cells.GPU_ROWS``: N1, B64 T512 H256 bf16), after
#: the GPU matrix's rows. Its forward and backward plan persistent with three exchange rounds per
#: step each (``fastrnn.ops.layer_norm_rnn.persistent_planned``).
LAYER_NORM_ROWS = ("N1",)
#: What each extra round of the LayerNormLSTM forward publishes per batch row and program: a
#: partial ``(sum, centred sum of squares)`` in fp32 (``kernels/layer_norm_rnn.py``).
LAYER_NORM_ROUND_BYTES = 8
#: The persistent LayerNormLSTM forward exchanges ``h`` in fp32.
LAYER_NORM_EXCHANGE_BYTES = 4


def layer_norm_rows():
    from bench.cells import GPU_ROWS

    return tuple(r for r in GPU_ROWS if r.name in LAYER_NORM_ROWS)


def plan_layer_norm_row(row, arch: int = 90) -> dict:
    """The report's object for a LayerNormLSTM row (``bench.cells.CellRow``): the launches of
    ``fastrnn.ops.aot.layer_norm_workload`` at its shape (barrier mode), compiled for ``sm_{arch}``;
    the partition as the launcher plans it, estimated with its exchange rounds each way (a tiled
    backward, where the plan gives it, estimated as the tiled strategy)."""
    from fastrnn.ops import aot, layer_norm_rnn
    from fastrnn.ops.aot import compile_launch
    from fastrnn.ops.recurrence import input_precision

    dtype = matrix.DTYPES[row.dtype]
    with _barrier_mode(), aot.capture_launches(arch) as launches:
        aot.layer_norm_workload("lstm", dtype, row.hidden, row.batch, "plain")
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key, launch)
    kernels, errors = [], []
    for launch in unique.values():
        try:
            kernels.append(_kernel_record(launch, compile_launch(launch)))
        except Exception as error:  # reported in the row, as plan_row does
            errors.append(f"{launch.name}: {type(error).__name__}: {error}")
    precision = input_precision(dtype)
    workload = cost_model.Workload("lstm", 4, row.hidden, row.batch, 1, dtype.itemsize, dtype == torch.float32,
                                   precision=precision, persistent_precision=precision)
    forward = next(launch for launch in unique.values() if "_fwd_" in launch.name)
    backward = next(launch for launch in unique.values() if "_bwd_" in launch.name)
    tiled_partition = cost_model.today_partition(workload, "tiled")
    if "_persistent" in forward.name:
        pp = layer_norm_rnn.persistent_plan(row.hidden, row.batch, 1, dtype)
        partition = cost_model.Partition(
            "persistent", pp.programs, pp.batch_groups, pp.block_b, hidden_slice=pp.slice, slices=pp.slices, mode="barrier",
            exchange_bytes=LAYER_NORM_EXCHANGE_BYTES, num_warps=pp.num_warps, exchange_rounds=3, round_bytes=LAYER_NORM_ROUND_BYTES,
            bwd_exchange="reduce", gather=min(8, pp.block_flags), bwd_exchange_rounds=3)
    else:
        partition = tiled_partition
    est = cost_model.estimate(workload, partition)
    bwd_persistent = "_persistent" in backward.name
    bwd_est = est if bwd_persistent else cost_model.estimate(workload, tiled_partition)
    record: dict = dict(
        row=row.name, shape=row.describe(), hidden=row.hidden, strategy=partition.strategy,
        mode=partition.mode if partition.strategy == "persistent" else "one launch", input_precision=precision,
        partition=partition.describe() + ("" if bwd_persistent or partition.strategy != "persistent" else "; backward tiled"),
        programs=partition.programs, exchange_rounds_per_step=partition.exchange_rounds if partition.strategy == "persistent" else 0,
        exchange_rounds_per_step_bwd=partition.bwd_exchange_rounds if bwd_persistent else 0,
        weight_bytes_reread_per_step=est.weight_bytes_reread_per_step,
        weight_bytes_reread_per_step_bwd=0 if bwd_persistent else bwd_est.weight_bytes_reread_per_step,
        exchange_bytes_per_step=est.exchange_bytes_per_step, exchange_bytes_per_step_bwd=bwd_est.exchange_bytes_per_step_bwd,
        l2_bytes_per_step=est.l2_bytes_per_step,
        registers=max((k["registers"] for k in kernels), default=None),
        spill_bytes=max((k["spill_bytes"] for k in kernels), default=None),
        shared_bytes=max((k["shared_bytes"] for k in kernels), default=None),
        kernels=kernels,
        est_us_per_step_fwd=_rounded(est.fwd_us), est_us_per_step_bwd=_rounded(bwd_est.bwd_us),
        est_us_per_step_fwd_bwd=_rounded(est.fwd_us + bwd_est.bwd_us), est_us_per_step_fwd_optimistic=_rounded(est.fwd_best_us),
        est_terms_us_fwd={k: _rounded(v, 3) for k, v in est.fwd_terms_us.items()},
        est_terms_us_bwd={k: _rounded(v, 3) for k, v in bwd_est.bwd_terms_us.items()},
        estimate_kind="cost model (fastrnn.ops.cost_model), no GPU measurement; the norms' pointwise math is not counted",
    )
    compare = {}
    if partition.strategy == "persistent":
        tiled = cost_model.estimate(workload, cost_model.today_partition(workload, "tiled"))
        compare["tiled"] = dict(weight_bytes_reread_per_step=tiled.weight_bytes_reread_per_step,
                                est_us_per_step_fwd=_rounded(tiled.fwd_us), est_us_per_step_bwd=_rounded(tiled.bwd_us))
        per_step = cost_model.estimate(workload, dataclasses.replace(partition, mode="per_step"))
        compare["persistent_per_step"] = dict(weight_bytes_reread_per_step=per_step.weight_bytes_reread_per_step,
                                              est_us_per_step_fwd=_rounded(per_step.fwd_us),
                                              est_us_per_step_bwd=_rounded(per_step.bwd_us if bwd_persistent else bwd_est.bwd_us))
        one_round = cost_model.estimate(workload, dataclasses.replace(partition, exchange_rounds=1, bwd_exchange_rounds=1))
        compare["persistent_one_round"] = dict(weight_bytes_reread_per_step=0, est_us_per_step_fwd=_rounded(one_round.fwd_us),
                                               est_us_per_step_bwd=_rounded(one_round.bwd_us if bwd_persistent else bwd_est.bwd_us))
    record["other_strategies"] = compare
    checks = [] if bwd_persistent else [f"W_hh re-read by the (tiled) backward: {bwd_est.weight_bytes_reread_per_step:,} B per step"]
    checks += compile_checks(kernels, errors, arch)
    record["issues"] = checks
    return record


def plan_report(rows: tuple[matrix.Row, ...] = matrix.GPU_MATRIX, arch: int = 90, log=None, layer_norm_rows=()) -> list[dict]:
    out = []
    for row in rows:
        if log:
            log(f"plan {row.name} {row.describe()} ...")
        out.append(plan_row(row, arch))
    for row in layer_norm_rows:
        if log:
            log(f"plan {row.name} {row.describe()} ...")
        out.append(plan_layer_norm_row(row, arch))
    return out


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def text_report(records: list[dict]) -> str:
    """A readable table of the records, the model's figures and their sources."""
    header = ["row", "strategy", "programs", "rounds", "W re-read/step", "exchange/step", "regs", "spill", "shared",
              "est fwd us", "est bwd us", "cuDNN fwd us", "issues"]
    cells = []
    for r in records:
        cells.append([r["row"], r["strategy"], str(r["programs"]), str(r["exchange_rounds_per_step"]), _bytes(r["weight_bytes_reread_per_step"]),
                      _bytes(r["exchange_bytes_per_step"]), str(r["registers"]), str(r["spill_bytes"]),
                      _bytes(r["shared_bytes"]), f"{r['est_us_per_step_fwd']:.2f}", f"{r['est_us_per_step_bwd']:.2f}",
                      str(r.get("cudnn_us_per_step_anchor", "-")), str(len(r["issues"]))])
    widths = [max(len(x) for x in column) for column in zip(header, *cells)]
    lines = ["ESTIMATES (cost model + sm_90 compiles on a CPU; no GPU measured anything):", ""]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    lines.append("")
    for r in records:
        lines.append(f"{r['row']} {r['shape']}: {r['partition']}")
        for strategy, other in r.get("other_strategies", {}).items():
            lines.append(f"    {strategy} (estimated alike): fwd {other['est_us_per_step_fwd']} us, bwd {other['est_us_per_step_bwd']} us, "
                         f"W re-read {_bytes(other['weight_bytes_reread_per_step'])}/step")
        best = r.get("model_best_partition")
        if best:
            lines.append(f"    model's best persistent partition{' of >= 64 programs' if best['programs'] >= 64 else ''}: {best['partition']}: fwd {best['est_us_per_step_fwd']} us, bwd {best['est_us_per_step_bwd']} us")
        if "cudnn_anchor_figures" in r:
            lines.append(f"    cuDNN: {r['cudnn_anchor_figures']} ({r['cudnn_anchor_kind']})")
        for issue in r["issues"]:
            lines.append(f"    ! {issue}")
    lines += ["", "Issue #12's done-when, by this report (estimates and compiles, not measurements):"]
    lines += [f"  {line}" for line in done_when(records)]
    lines += ["", "Cost-model figures (fastrnn/ops/cost_model.py):"]
    for name, f in cost_model.FIGURES.items():
        lines.append(f"  {name} = {f.value:g} {f.unit} [{f.kind}]: {f.source}")
    return "\n".join(lines)


def done_when(records: list[dict]) -> list[str]:
    """One line per condition of the issue's done-when that a plan report can judge: the rows
    that miss it, or "yes"."""
    def rows(miss) -> str:
        names = [r["row"] for r in records if miss(r)]
        return "yes" if not names else "no: " + ", ".join(names)

    records = [r for r in records if r["row"] not in LAYER_NORM_ROWS]  # issue 12's: the GPU matrix's rows
    large = [r for r in records if r["hidden"] >= 512]
    return [
        f"persistent on every row: {rows(lambda r: r['strategy'] != 'persistent')}",
        f"weight_bytes_reread_per_step 0 on every row: {rows(lambda r: r['weight_bytes_reread_per_step'] != 0)}",
        f">= {MIN_PROGRAMS_LARGE_H} programs where H >= 512 ({', '.join(r['row'] for r in large)}): "
        f"{rows(lambda r: r in large and r['programs'] < MIN_PROGRAMS_LARGE_H)}",
        f"est_us_per_step_fwd within cuDNN's anchor: {rows(lambda r: not r.get('est_fwd_within_anchor', True))}",
        f"no spills on sm_90 and shared memory within the limit: {rows(lambda r: any('spills' in i or 'shared memory' in i for i in r['issues']))}",
    ]


def main(as_json: bool, row_names: str | None = None) -> int:
    """Print the report; exit status 1 when a row could not be compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("python -m bench --plan compiles for sm_90: run it without TRITON_INTERPRET=1", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    names = [n.strip().upper() for n in (row_names or "").split(",") if n.strip()]
    layer_norm = tuple(r for r in layer_norm_rows() if not names or r.name in names)
    rest = ",".join(n for n in names if n not in LAYER_NORM_ROWS)
    rows = matrix.select(matrix.GPU_MATRIX, rest) if rest or not names else ()
    records = plan_report(rows, log=lambda line: print(line, file=sys.stderr, flush=True), layer_norm_rows=layer_norm)
    print(json.dumps(records, indent=1) if as_json else text_report(records))
    return 1 if any(r["registers"] is None for r in records) else 0


def gate_compiles(arches: tuple[int, ...] = (90, 80), rows: tuple[matrix.Row, ...] = matrix.GPU_MATRIX) -> list[dict]:
    """The compile gate's data: every kernel each GPU-matrix row launches in barrier mode, in its
    heaviest form (:func:`capture_row`), compiled for each of ``arches`` as that launch binds it:
    one record per (row, arch, kernel); a binary several rows share is compiled once."""
    from fastrnn.ops.aot import compile_launch

    out, compiled = [], {}
    for row in rows:
        for arch in arches:
            for launch in capture_row(row, arch, heaviest=True):
                if launch.key not in compiled:
                    compiled[launch.key] = compile_launch(launch)
                out.append(dict(_kernel_record(launch, compiled[launch.key]), row=row.name, arch=arch))
    return out


def _cli() -> int:
    """``python -m bench.plan --gate --arch 90 80 --json PATH``: write :func:`gate_compiles`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bench.plan", description=_cli.__doc__)
    parser.add_argument("--gate", action="store_true", help="compile every row's kernels in their heaviest form")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--rows", help="comma-separated GPU-matrix rows (default all)")
    parser.add_argument("--json", help="write the records here (default: stdout)")
    args = parser.parse_args()
    if not args.gate:
        return main(as_json=bool(args.json), row_names=args.rows)
    records = gate_compiles(tuple(args.arch), matrix.select(matrix.GPU_MATRIX, args.rows))
    text = json.dumps(records, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
