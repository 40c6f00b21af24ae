"""First-call compile time of the README's ``torch.compile`` example, and compiled vs eager step time.

``python -m bench.compile_time [--steps 50,500] [--repeats 2] [--baseline-steps 50] [--threads N] [--out DIR]``

The README's example: ``fastrnn.LSTM(128, 256, num_layers=2, batch_first=True, bidirectional=True,
dropout=0.1)`` in training mode on ``x (8, T, 128)``, ``torch.compile(lstm, fullgraph=True)``.
Each ``T`` runs in a fresh Python process with an empty inductor (and Triton) cache, so the first
call pays the whole compile: Dynamo's trace, AOTAutograd and inductor for the forward (first
forward call) and the backward (first backward call). Then, in the same process, forward+backward
and forward-alone step times of the compiled module and of the eager one, timed in interleaved
rounds (:func:`bench.timing.time_cpu`), and the number of frames Dynamo compiled
(``torch._dynamo.utils.counters["stats"]["unique_graphs"]``).

Prints a table; with ``--out`` writes ``compile-<device>-<date>.{json,md}`` there (the project's
figures: ``--out bench/results``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
import torch
import fastrnn
from bench.timing import time_cpu

steps = int(sys.argv[1])
first_call_only = sys.argv[2] == "1"
torch.manual_seed(0)
lstm = fastrnn.LSTM(input_size=128, hidden_size=256, num_layers=2, batch_first=True,
                    bidirectional=True, dropout=0.1)
x = torch.randn(8, steps, 128)
compiled = torch.compile(lstm, fullgraph=True)
start = time.perf_counter()
y, _ = compiled(x)
first_forward = time.perf_counter() - start
start = time.perf_counter()
y.square().mean().backward()
first_backward = time.perf_counter() - start
graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
if first_call_only:
    print(json.dumps({"T": steps, "first_forward_s": first_forward, "first_backward_s": first_backward,
                      "first_call_s": first_forward + first_backward, "frames_compiled": graphs}))
    sys.exit(0)

def step(module):
    def run():
        lstm.zero_grad(set_to_none=True)
        out, _ = module(x)
        out.square().mean().backward()
    return run

def forward(module):
    def run():
        with torch.no_grad():
            module(x)
    return run

train = time_cpu({"eager": step(lstm), "compiled": step(compiled)}, budget_s=4.0, min_reps=5, max_reps=15)
infer = time_cpu({"eager": forward(lstm), "compiled": forward(compiled)}, budget_s=2.0, min_reps=5, max_reps=15)
print(json.dumps({
    "T": steps, "first_forward_s": first_forward, "first_backward_s": first_backward,
    "first_call_s": first_forward + first_backward, "frames_compiled": graphs,
    "torch_threads": torch.get_num_threads(),
    "step_fwd_bwd_ms": {k: v["median_ms"] for k, v in train.items()},
    "step_fwd_ms": {k: v["median_ms"] for k, v in infer.items()},
}))
"""


def measure(steps: int, backend: str = "auto", threads: int | None = None) -> dict:
    """One fresh process with empty compile caches; returns its JSON line. ``backend="reference"``
    times only the first call: what ``auto`` compiled before each layer became one operator (the
    reference loop, unrolled by Dynamo step by step)."""
    with tempfile.TemporaryDirectory(prefix="fastrnn-compile-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"), FASTRNN_BACKEND=backend)
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        first_only = "1" if backend == "reference" else "0"
        done = subprocess.run([sys.executable, "-c", CHILD, str(steps), first_only], capture_output=True, text=True, env=env,
                              cwd=Path(__file__).resolve().parent.parent, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"T={steps} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown(info: dict, rows: list[dict], baseline: list[dict]) -> str:
    lines = [
        "# torch.compile of the README example (2-layer bidirectional LSTM, I128 H256, B8, training mode)",
        "",
        f"Machine: {info['cpu_model']} ({info['cpu_count']} cores, load average {info['load_average']}), "
        f"torch {info['torch']}, commit {info['git']['commit']}; {info['date_utc']}.",
        "Each T in a fresh process with an empty inductor cache, after one discarded warm-up process (the OS file "
        "cache); runs alternate between the T values and the median run is shown (all first-call times in the last "
        "column). Command: `" + " ".join(["python -m bench.compile_time", *(repr(a) if a == "" else a for a in sys.argv[1:])]) + "`.",
        "",
        "| T | first forward (s) | first backward (s) | first call total (s) | frames compiled | fwd+bwd eager / compiled (ms) | fwd eager / compiled (ms) | all runs (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['T']} | {r['first_forward_s']:.1f} | {r['first_backward_s']:.1f} | {r['first_call_s']:.1f} | "
            f"{r['frames_compiled']} | {r['step_fwd_bwd_ms']['eager']:.1f} / {r['step_fwd_bwd_ms']['compiled']:.1f} | "
            f"{r['step_fwd_ms']['eager']:.1f} / {r['step_fwd_ms']['compiled']:.1f} | "
            f"{', '.join(f'{v:.1f}' for v in r.get('first_call_s_all', [r['first_call_s']]))} |"
        )
    if len(rows) >= 2:
        totals = [r["first_call_s"] for r in rows]
        lines += ["", f"Largest / smallest first-call time: {max(totals) / min(totals):.2f}x."]
    for b in baseline:
        now = next((r for r in rows if r["T"] == b["T"]), None)
        lines += ["", f"Before (`FASTRNN_BACKEND=reference`, the unrolled loop `auto` compiled until now), T={b['T']}, "
                  f"same machine and run: first forward {b['first_forward_s']:.1f} s, first backward "
                  f"{b['first_backward_s']:.1f} s, total {b['first_call_s']:.1f} s"
                  + (f"; now {now['first_call_s']:.1f} s ({b['first_call_s'] / now['first_call_s']:.1f}x faster)." if now else ".")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="50,500", help="comma-separated sequence lengths")
    parser.add_argument("--baseline-steps", default="50", help="T of the reference-loop baseline ('' for none)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the child processes")
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process runs per T (the median is reported)")
    parser.add_argument("--out", type=Path, default=None, help="write compile-<device>-<date>.{json,md} here")
    args = parser.parse_args(argv)
    import torch

    from bench.environment import describe

    steps = [int(t) for t in args.steps.split(",")]
    measure(5, threads=args.threads)  # warm the OS file cache (torch, inductor, the compiler): not counted
    samples: dict[int, list[dict]] = {t: [] for t in steps}
    for repeat in range(args.repeats):  # alternate the order, so load drifts hit every T alike
        for t in (steps if repeat % 2 == 0 else steps[::-1]):
            samples[t].append(measure(t, threads=args.threads))
    rows = []
    for t in steps:
        ordered = sorted(samples[t], key=lambda r: r["first_call_s"])
        row = dict(ordered[(len(ordered) - 1) // 2])  # the median run (lower median for an even count)
        row["first_call_s_all"] = [round(r["first_call_s"], 2) for r in samples[t]]
        rows.append(row)
    baseline = [measure(int(t), "reference", args.threads) for t in args.baseline_steps.split(",") if t]
    info = describe(torch.device("cpu"))
    text = markdown(info, rows, baseline)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"compile-cpu-{datetime.date.today().isoformat()}"
        stem.with_suffix(".json").write_text(json.dumps({"environment": info, "rows": rows, "baseline_reference": baseline}, indent=2) + "\n")
        stem.with_suffix(".md").write_text(text)
        print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
