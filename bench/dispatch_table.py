"""Dispatch-table entries from a benchmark run: every GPU run teaches ``auto`` where the kernels win.

    python -m bench.dispatch_table bench/results/nvidia-h200-2026-12-02.json [--write] [--table PATH]

prints the entries a results file yields and, with ``--write``, merges them into fastrnn's
dispatch table (``fastrnn/dispatch_table.json`` unless ``--table``); ``python -m bench
--update-dispatch`` does the same at the end of a run, and every run's JSON keeps its entries
under ``"dispatch_entries"`` either way.

A row yields an entry when it ran on CUDA, passed its float64 check, timed the Triton kernels
(the ``fastrnn`` variant on the ``triton`` backend) and ``torch.nn`` in the row's own dtype (what
``torch.nn`` would run for that caller: cuDNN), forward and forward+backward, without error.
The entry holds ``cuDNN median / kernel median`` for both modes (see :mod:`fastrnn.routing` for
the key and how the ratios are used). Rows of one run that share a key (a matrix row and the
batch-sweep row of the same shape) keep the slower measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastrnn import routing

from bench.matrix import SHORT_DTYPE

MODES = ("forward", "train")


def _median(variant: dict, mode: str) -> float | None:
    measured = variant.get(mode, {})
    return None if "error" in measured else measured.get("median_ms")


def entry_from_row(record: dict, environment: dict) -> dict | None:
    """The dispatch-table entry of one row's result record, or None when the row does not
    qualify (module docstring)."""
    if record.get("status") != "ok":
        return None
    variants = record.get("variants", {})
    kernels = variants.get("fastrnn", {})
    config = record["config"]
    cudnn = variants.get(f"torch_{SHORT_DTYPE[config['dtype']]}", {})
    if kernels.get("backend") != "triton":
        return None
    times = {mode: (_median(kernels, mode), _median(cudnn, mode)) for mode in MODES}
    if any(mine is None or theirs is None or mine <= 0 for mine, theirs in times.values()):
        return None
    return {
        "gpu": environment["card"],
        "capability": environment["compute_capability"],
        "cell": config["cell"],
        "dtype": SHORT_DTYPE[config["dtype"]],
        "directions": 2 if config["bidirectional"] else 1,
        "projection": bool(config.get("proj_size", 0)),
        "packed": bool(config["packed"]),
        "h_class": routing.size_class(config["hidden"]),
        "b_class": routing.size_class(config["batch"]),
        "forward_ratio": round(times["forward"][1] / times["forward"][0], 4),
        "train_ratio": round(times["train"][1] / times["train"][0], 4),
        "measured": {
            "row": record["name"],
            "shape": record.get("description"),
            "hidden": config["hidden"], "batch": config["batch"], "steps": config["steps"],
            "layers": config["layers"], "input_size": config["input_size"],
            "kernel_ms": {mode: round(times[mode][0], 4) for mode in MODES},
            "cudnn_ms": {mode: round(times[mode][1], 4) for mode in MODES},
        },
        "date": environment["date_utc"],
        "versions": {
            "torch": environment.get("torch"), "triton": environment.get("triton"),
            "cuda": environment.get("cuda"), "cudnn": environment.get("cudnn"),
            "driver": environment.get("driver"), "commit": (environment.get("git") or {}).get("commit"),
            "dirty": (environment.get("git") or {}).get("dirty"), "tf32": environment.get("tf32"),
        },
    }


def entries_from_results(data: dict) -> list[dict]:
    """The entries a results file (what ``python -m bench`` writes) yields: one per qualifying
    row of the matrix and the batch sweep, the slower of any two with one key; none from a CPU
    run."""
    environment = data.get("environment", {})
    if environment.get("device_type") != "cuda":
        return []
    chosen: dict[tuple, dict] = {}
    for record in data.get("rows", []) + (data.get("sweep") or {}).get("rows", []):
        entry = entry_from_row(record, environment)
        if entry is None:
            continue
        key = routing.entry_key(entry)
        if key not in chosen or entry["train_ratio"] < chosen[key]["train_ratio"]:
            chosen[key] = entry
    return list(chosen.values())


def update_table(entries: list[dict], path: Path | str = routing.TABLE_PATH) -> Path:
    """Merge ``entries`` into the table at ``path`` (a new measurement replaces the old one of
    its key) and write it back."""
    path = Path(path)
    table = json.loads(path.read_text()) if path.exists() else routing.empty_table()
    return routing.write_table(routing.merge_entries(table, entries), path)


def describe(entry: dict) -> str:
    """One line: key and ratios."""
    return (f"{entry['measured']['row']:<4} {entry['gpu']} sm_{entry['capability'].replace('.', '')} {entry['cell']} "
            f"{entry['dtype']} D{entry['directions']}{' packed' if entry['packed'] else ''} H{entry['h_class']} "
            f"B{entry['b_class']}: fwd {entry['forward_ratio']:.2f}x, fwd+bwd {entry['train_ratio']:.2f}x cuDNN")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results JSON written by python -m bench")
    parser.add_argument("--write", action="store_true", help="merge the entries into the dispatch table")
    parser.add_argument("--table", type=Path, default=routing.TABLE_PATH, help="the table (default: fastrnn's own)")
    args = parser.parse_args(argv)
    entries = entries_from_results(json.loads(args.results.read_text()))
    for entry in entries:
        print(describe(entry))
    if not entries:
        print("no entries: the file holds no CUDA row that timed the kernels against torch.nn in its own dtype")
    elif args.write:
        print(f"wrote {len(entries)} entries into {update_table(entries, args.table)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
