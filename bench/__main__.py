"""Benchmark fastrnn against torch.nn: ``python -m bench``.

On a CUDA machine it runs the GPU matrix (rows L1..B1, see :mod:`bench.matrix`); on a CPU the CPU
matrix plus a correctness pass of the Triton kernels through Triton's interpreter. Every row is
checked against the float64 reference before it is timed. Then, on either device, the topology
section (:mod:`bench.topologies`: a training step of each of the five topology modules against
its torch.nn construction, and loss curves of both on synthetic tasks; off in --quick and
--dry-run unless --topologies) and the gradient-flow section (:mod:`bench.gradflow`: per-step
||dL/dh_t|| of an untrained tanh RNN and LSTM on the adding problem, T=100; off in --dry-run
unless --gradient-flow) and the cells section (:mod:`bench.cells`: LayerNormLSTM, LayerNormGRU and
IndRNN against the plain-PyTorch loop a user writes, eager and with torch.compile of the cell;
the GPU rows N1, I1 on CUDA and shrunk in --dry-run, CPU rows C5-C7 on a CPU; off with --no-cells). Progress goes to stderr, the tables (at most 120 columns) to stdout,
and the results to ``<out>/<device>[-quick|-dry-run]-<YYYY-MM-DD>[-N].json`` with a markdown
report (every column) and PNG plots drawn from that JSON (:mod:`bench.report`). ``<out>`` is
``bench/out/`` (ignored by git) unless ``--out`` says otherwise; the results the project commits
are in ``bench/results/``. A same-day rerun adds ``-2``, ``-3``, ... rather than overwrite.

The JSON is rewritten after every row, so a run cut short leaves its finished rows behind.
Exit status: 1 when a row (or a topology case, training run or gradient-flow cell) failed its
check, errored or found a kernel missing (the files are written either way); 0 otherwise.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

for _needed in ("matplotlib", "triton"):  # the bench extra
    if importlib.util.find_spec(_needed) is None:
        sys.exit(f"python -m bench needs {_needed}: pip install -e '.[bench]'")

from bench import cells, dispatch_table, environment, gradflow, interpret, matrix, report, topologies
from bench.runner import Plan, run_row, skipped_record

#: Where the results this project commits live (the README cites them); a run writes there only
#: when ``--out`` says so.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Where a run writes by default: ignored by git (``.gitignore``), so a run leaves the checkout clean.
DEFAULT_OUT = Path(__file__).resolve().parent / "out"


def fresh_results_path(out: Path, label: str, date: str) -> Path:
    """``<out>/<label>-<date>.json``, or with ``-2``, ``-3``, ... before ``.json`` when a run of the
    same day already wrote that name (its JSON or its report; the plots are named after it): a
    rerun never overwrites one."""
    for number in range(1, 10_000):
        stem = f"{label}-{date}" + ("" if number == 1 else f"-{number}")
        if not (out / f"{stem}.json").exists() and not (out / f"{stem}.md").exists():
            return out / f"{stem}.json"
    raise FileExistsError(f"{out} already holds 9999 results of {label} on {date}")


def _shown(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it (shorter to print)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", help="comma-separated row names to run (e.g. L1,G1); default all")
    parser.add_argument("--quick", action="store_true", help="a subset of the rows at reduced size")
    parser.add_argument("--dry-run", action="store_true",
                        help="build every GPU-matrix row and run it on the CPU at reduced size (T/16, H/8, B/4)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"results folder (default {DEFAULT_OUT}, ignored by git; the committed results are "
                             f"in {RESULTS_DIR})")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference loop")
    parser.add_argument("--compile", action="store_true", help="with --quick: time torch.compile too")
    parser.add_argument("--compile-max-steps", type=int, help="compile the reference only up to this T*layers")
    parser.add_argument("--eager-max-steps", type=int, help="time the eager reference only up to this T*layers")
    parser.add_argument("--no-sweep", action="store_true", help="skip the batch-size sweep")
    parser.add_argument("--no-interpret", action="store_true", help="skip the Triton interpreter pass (CPU)")
    parser.add_argument("--backend", choices=("auto", "triton", "reference"),
                        help="fastrnn backend timed as 'fastrnn' (default: triton on CUDA, the kernels the "
                             "dispatch table compares with cuDNN; auto elsewhere)")
    parser.add_argument("--update-dispatch", action="store_true",
                        help="write the run's dispatch-table entries into fastrnn/dispatch_table.json (GPU runs)")
    parser.add_argument("--time-failed", action="store_true",
                        help="time rows that fail the float64 check too (they are still reported failed)")
    parser.add_argument("--budget-s", type=float,
                        help="start no new row after this many seconds (the rest are reported skipped)")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads (default: torch's choice, or 1 when the machine is already busy)")
    parser.add_argument("--topologies", action="store_true",
                        help="run the topology section in --quick and --dry-run too (it runs by default otherwise)")
    parser.add_argument("--no-topologies", action="store_true",
                        help="skip the topology section (training steps and loss curves of the five modules)")
    parser.add_argument("--gradient-flow", action="store_true", help="run the gradient-flow section in --dry-run too")
    parser.add_argument("--no-gradient-flow", action="store_true", help="skip the gradient-flow section")
    parser.add_argument("--no-cells", action="store_true",
                        help="skip the cells section (LayerNormLSTM, LayerNormGRU, IndRNN vs the user's loop)")
    parser.add_argument("--plan", action="store_true",
                        help="no timing: the plan report (strategy, grid, sm_90 compile resources, cost-model estimates per GPU row; bench/plan.py)")
    parser.add_argument("--json", action="store_true", help="with --plan: print a JSON list, one object per GPU-matrix row")
    parser.add_argument("--allow-tf32", action="store_true",
                        help="allow TF32 on GPU for torch matmuls and cuDNN, whose RNN flag fastrnn's fp32 RNN, GRU and LSTM "
                             "kernels follow as torch.nn's do (fp32 rows then get the 1e-2 tolerance)")
    return parser.parse_args(argv)


def choose_rows(args: argparse.Namespace, device: torch.device) -> tuple[str, tuple[matrix.Row, ...]]:
    """The mode name and the rows it runs."""
    if args.dry_run:
        rows = tuple(r.scaled(**matrix.DRY_RUN_DIVISORS) for r in matrix.GPU_MATRIX)
        return "dry-run", matrix.select(rows, args.rows)
    on_gpu = device.type == "cuda"
    rows = matrix.GPU_MATRIX if on_gpu else matrix.CPU_MATRIX
    if args.quick:
        keep = matrix.QUICK_GPU_ROWS if on_gpu else matrix.QUICK_CPU_ROWS
        divisor = matrix.QUICK_GPU_STEPS_DIVISOR if on_gpu else matrix.QUICK_CPU_STEPS_DIVISOR
        rows = tuple(r.scaled(steps=divisor) for r in rows if r.name in keep)
        return "quick", matrix.select(rows, args.rows)
    return "full", matrix.select(rows, args.rows)


def sections(args: argparse.Namespace, mode: str) -> dict[str, bool]:
    """Which of the sections after the matrix run: the topology section by default only in the
    full run, the gradient-flow section in the full and quick runs; the flags override."""
    topologies = (mode == "full" or args.topologies) and not args.no_topologies
    flow = (mode != "dry-run" or args.gradient_flow) and not args.no_gradient_flow
    return {"topologies": topologies, "gradient_flow": flow, "cells": not args.no_cells}


def make_plan(args: argparse.Namespace, device: torch.device, mode: str) -> Plan:
    changes = {"backend": args.backend, "time_failed": args.time_failed}
    if args.no_compile:
        changes["compile"] = False
    elif mode == "quick" and not args.compile:
        changes.update(compile=False, compile_skip_reason="--quick (pass --compile to time it)")
    if args.compile_max_steps is not None:
        changes["compile_max_steps"] = args.compile_max_steps
    if args.eager_max_steps is not None:
        changes["eager_max_steps"] = args.eager_max_steps
    return Plan.for_device(device, dry_run=mode == "dry-run", **changes)


def choose_threads(requested: int | None, device: torch.device) -> str | None:
    """Set torch's CPU threads: ``requested`` if given, else :func:`environment.calm_threads`
    (CPU runs only). Returns a note saying what was chosen and why, or None."""
    if requested:
        torch.set_num_threads(requested)
        return f"torch threads: {requested} (--threads)"
    return environment.calm_threads() if device.type == "cpu" else None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def private_inductor_cache() -> None:
    """Give torch.compile a cache folder of this run's own (unless the user chose one): the
    shared default under /tmp can be cleared by other processes mid-compile."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="fastrnn-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plan:
        from bench import plan
        return plan.main(args.json, args.rows)
    private_inductor_cache()
    started = time.perf_counter()
    device = torch.device("cpu") if args.dry_run else environment.detect_device()
    if args.backend is None:  # on CUDA, auto would time cuDNN against itself
        args.backend = "triton" if device.type == "cuda" else "auto"
    if device.type == "cuda":  # fp32 means fp32 for fastrnn and torch.nn (cuDNN) alike, unless asked
        torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
        torch.backends.cudnn.allow_tf32 = args.allow_tf32
    threads_note = choose_threads(args.threads, device)
    mode, rows = choose_rows(args, device)
    plan = make_plan(args, device, mode)
    env = environment.describe(device)
    env["threads_note"] = threads_note
    if threads_note:
        log(threads_note)
    chosen = sections(args, mode)
    extra = [name.replace("_", "-") for name, on in chosen.items() if on]
    log(f"fastrnn bench: {mode} on {env['card'] or env['cpu_model']}; torch {env['torch']}, triton {env['triton']}; "
        f"{len(rows)} rows" + (f", then {' and '.join(extra)}" if extra else ""))

    args.out.mkdir(parents=True, exist_ok=True)
    label = env["device"] + ("" if mode == "full" else f"-{mode}")
    json_path = fresh_results_path(args.out, label, env["date_utc"][:10])
    if json_path.stem != f"{label}-{env['date_utc'][:10]}":
        log(f"{label}-{env['date_utc'][:10]}.json is taken in {_shown(args.out)}: writing {json_path.name}")
    data = {
        "schema": 1,
        "mode": mode,
        "complete": False,
        "argv": sys.argv[1:] if argv is None else argv,
        "environment": env,
        "plan": {k: (str(v) if isinstance(v, torch.device) else v) for k, v in dataclasses.asdict(plan).items()},
        "rows": [],
        "sweep": {"rows": []},
        "interpreter": None,
        "topologies": None,
        "gradient_flow": None,
        "cells": None,
        "seconds": 0.0,
    }

    def save() -> None:
        """Write what there is so far (a run cut short still leaves its rows behind)."""
        data["seconds"] = round(time.perf_counter() - started, 1)
        data["dispatch_entries"] = dispatch_table.entries_from_results(data)
        json_path.write_text(json.dumps(data, indent=1, default=str) + "\n")

    def run(row: matrix.Row, row_plan: Plan) -> dict:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            record = skipped_record(row, f"time budget of {args.budget_s:.0f} s spent")
            log(f"    {row.name}: skipped (time budget)")
            return record
        return run_row(row, row_plan, log=lambda line: log(f"    {line}"))

    for index, row in enumerate(rows, 1):
        log(f"[{index}/{len(rows)}] {row.name} {row.describe()} ...")
        data["rows"].append(run(row, plan))
        save()

    sweep = data["sweep"]
    if not args.no_sweep:
        sweep_rows = matrix.batch_sweep(device.type, dry_run=args.dry_run)
        if mode == "quick":
            sweep_rows = sweep_rows[::2]
        sweep["shape"] = sweep_rows[0].describe().replace(f"B{sweep_rows[0].batch} ", "")
        sweep_plan = dataclasses.replace(plan, references=False)
        log(f"batch sweep: {sweep['shape']}, B in {[r.batch for r in sweep_rows]}")
        for row in sweep_rows:
            sweep["rows"].append(run(row, sweep_plan))
            save()

    def budget_spent() -> str | None:
        if args.budget_s is not None and time.perf_counter() - started > args.budget_s:
            return f"time budget of {args.budget_s:.0f} s spent"
        return None

    if chosen["topologies"]:
        if reason := budget_spent():
            data["topologies"] = {"skipped": reason}
            log("topologies: skipped (time budget)")
        else:
            log("topologies: one training step of each module vs torch.nn, then loss curves on synthetic tasks")
            data["topologies"] = {}
            topologies.run_section(device, args.backend, log=lambda line: log(f"    {line}"), save=save,
                                   section=data["topologies"])
            save()

    if chosen["gradient_flow"]:
        if reason := budget_spent():
            data["gradient_flow"] = {"skipped": reason}
            log("gradient flow: skipped (time budget)")
        else:
            log(f"gradient flow: ||dL/dh_t|| on the adding problem, T={gradflow.STEPS}, untrained cells")
            data["gradient_flow"] = gradflow.run_section(device, args.backend, log=log)
            save()

    if chosen["cells"]:
        if reason := budget_spent():
            data["cells"] = {"skipped": reason}
            log("cells: skipped (time budget)")
        else:
            log("cells: LayerNormLSTM, LayerNormGRU, IndRNN against the user's loop (eager, torch.compile(cell))")
            data["cells"] = {}
            cells.run_section(device, args.backend, dry_run=mode == "dry-run", divisors=matrix.DRY_RUN_DIVISORS,
                              compile_cell=plan.compile, log=lambda line: log(f"    {line}"), save=save, section=data["cells"])
            save()

    if device.type == "cpu" and mode != "dry-run" and not args.no_interpret:
        log("Triton kernels through the interpreter (child process) ...")
        interpreter = data["interpreter"] = interpret.run_pass()
        for case in interpreter.get("cases", []):
            err = f" err {case['max_rel_err']:.1e}" if "max_rel_err" in case else ""
            log(f"    {case['case']:<22} {case['status']}{err} {case.get('message', '')[:100]}")
        if interpreter.get("error"):
            log(f"    interpreter pass failed: {interpreter['error'][:300]}")

    if args.update_dispatch:
        entries = dispatch_table.entries_from_results(data)
        written = dispatch_table.update_table(entries) if entries else None
        log(f"dispatch table: {len(entries)} entries" + (f" written into {written}" if written else
            " (no CUDA row timed the kernels against torch.nn in its dtype): nothing written"))
    env["load_average_end"] = environment.load_average()
    data["complete"] = True
    save()
    md_path = report.write_report(json_path)
    if data["cells"] and data["cells"].get("rows"):
        with md_path.open("a") as md:
            md.write("\n" + cells.markdown(data["cells"]))
    print(report.text_table(data))
    if data["cells"] and data["cells"].get("rows"):
        print("\n" + cells.table(data["cells"]))
    extra_tables = report.topology_text(data)
    if extra_tables:
        print("\n" + extra_tables)
    print(f"\nwrote {_shown(json_path)} and {_shown(md_path)} (every column), {data['seconds']:.0f} s")
    bad = [r["name"] for r in data["rows"] + sweep["rows"] if r["status"] in ("failed", "error", "missing")]
    bad += report.section_problems(data)
    bad += cells.problems(data["cells"])
    if bad:
        log(f"rows not ok: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
