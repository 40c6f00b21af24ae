"""``grad_clip`` and ``record_gradient_flow()`` on the CPU against the plain native layer.

``python -m bench.bptt_speed [--out DIR] [--threads N]``

Forward+backward of one fastrnn layer (fp32, ``I = H``, loss ``y.square().mean()``) at B16 T1000
H64 and B16 T256 H256 for LSTM, GRU and RNN-tanh, three ways: plain (PyTorch's native op forward
and backward, what ``torch.nn`` runs), with ``grad_clip=1.0`` and inside ``record_gradient_flow()``
(both: native forward, fastrnn's hand-written BPTT backward, :mod:`fastrnn.native_bptt`). The three
are timed in interleaved rounds (:func:`bench.timing.time_cpu`); the ratio is the median of the
per-round ratios to the plain layer. Before timing, each variant's gradients are checked against
the reference backend's (float64, relative error).

Prints a table; with ``--out`` writes ``bptt-cpu-<date>.{json,md}`` there (the project's figures:
``--out bench/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
from pathlib import Path

import torch

import fastrnn
from bench.environment import calm_threads, describe
from bench.timing import time_cpu

CELLS = {"LSTM": fastrnn.LSTM, "GRU": fastrnn.GRU, "RNN": fastrnn.RNN}
SHAPES = [(16, 1000, 64), (16, 256, 256)]
GOAL = 3.0


def _variants(layer, x):
    def plain():
        layer.grad_clip = None
        layer.zero_grad(set_to_none=True)
        layer(x)[0].square().mean().backward()

    def clipped():
        layer.grad_clip = 1.0
        layer.zero_grad(set_to_none=True)
        layer(x)[0].square().mean().backward()
        layer.grad_clip = None

    def recorded():
        layer.grad_clip = None
        layer.zero_grad(set_to_none=True)
        with fastrnn.record_gradient_flow():
            layer(x)[0].square().mean().backward()

    return {"plain": plain, "grad_clip": clipped, "record_flow": recorded}


def check_against_reference(cls, hidden: int) -> float:
    """Largest relative gradient error of the fast CPU path (clip and record) against the
    reference backend, float64, at a small size."""
    torch.manual_seed(0)
    layer = cls(hidden, hidden, dtype=torch.float64, grad_clip=0.05)
    x = torch.randn(4, 20, hidden, dtype=torch.float64)
    grads = []
    for backend in ("auto", "reference"):
        layer.zero_grad(set_to_none=True)
        with fastrnn.use_backend(backend), fastrnn.record_gradient_flow() as flow:
            layer(x)[0].square().mean().backward()
        grads.append([p.grad.clone() for p in layer.parameters()] + [flow.norms().double()])
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(*grads))


def measure(cls, batch: int, steps: int, hidden: int) -> dict:
    torch.manual_seed(0)
    layer = cls(hidden, hidden)
    x = torch.randn(steps, batch, hidden)
    times = time_cpu(_variants(layer, x), warmup=1, budget_s=6.0, min_reps=5, max_reps=15)
    plain = times["plain"]["samples_ms"]
    ratios = {
        name: statistics.median(v / p for v, p in zip(times[name]["samples_ms"], plain))
        for name in ("grad_clip", "record_flow")
    }
    return {"median_ms": {k: v["median_ms"] for k, v in times.items()}, "ratio": ratios}


def markdown(info: dict, rows: list[dict], threads_note: str | None) -> str:
    lines = [
        "# grad_clip and record_gradient_flow() on the CPU vs the plain native layer (forward+backward, fp32)",
        "",
        f"Machine: {info['cpu_model']} ({info['cpu_count']} cores, torch threads {info['torch_threads']}, "
        f"load average {info['load_average']}), torch {info['torch']}, commit {info['git']['commit']}; {info['date_utc']}.",
        "Command: `python -m bench.bptt_speed --out bench/results`. Ratio: median of per-round ratios to plain; goal "
        f"<= {GOAL:g}x. Gradient check: largest relative error against the float64 reference backend.",
    ]
    if threads_note:
        lines += ["", threads_note]
    lines += [
        "",
        "| cell | B | T | H | plain (ms) | grad_clip (ms) | record (ms) | grad_clip / plain | record / plain | vs reference |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m, q = r["median_ms"], r["ratio"]
        lines.append(
            f"| {r['cell']} | {r['B']} | {r['T']} | {r['H']} | {m['plain']:.1f} | {m['grad_clip']:.1f} | "
            f"{m['record_flow']:.1f} | {q['grad_clip']:.2f}x | {q['record_flow']:.2f}x | {r['reference_error']:.1e} |"
        )
    worst = max(max(r["ratio"].values()) for r in rows)
    lines += ["", f"Worst ratio: {worst:.2f}x ({'within' if worst <= GOAL else 'over'} the {GOAL:g}x goal)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write bptt-cpu-<date>.{json,md} here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on a loaded machine)")
    args = parser.parse_args(argv)
    note = None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    else:
        note = calm_threads()
    rows = []
    for name, cls in CELLS.items():
        error = check_against_reference(cls, 8)
        for batch, steps, hidden in SHAPES:
            row = {"cell": name, "B": batch, "T": steps, "H": hidden, "reference_error": error}
            row.update(measure(cls, batch, steps, hidden))
            rows.append(row)
            print(row, flush=True)
    info = describe(torch.device("cpu"))
    text = markdown(info, rows, note)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"bptt-cpu-{datetime.date.today().isoformat()}"
        stem.with_suffix(".json").write_text(json.dumps({"environment": info, "threads_note": note, "rows": rows}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(text)
        print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
