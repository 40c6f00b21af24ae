"""Correctness of the Triton kernels on a CPU, through Triton's interpreter.

``TRITON_INTERPRET`` must be set before ``triton`` is imported, so the cases run in a child
process (:func:`run_pass` spawns ``python -m bench.interpret`` with ``TRITON_INTERPRET=1
FASTRNN_BACKEND=triton``). Each case is a tiny layer whose output and gradients are compared with
the float64 reference backend. A cell whose kernel is not written yet (``NotImplementedError`` or
``ImportError``) is reported ``missing``; nothing here raises.

    python -m bench.interpret            # run the cases in this process (set the env vars yourself)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.matrix import Row

REPO = Path(__file__).resolve().parent.parent

#: Tiny cases: every cell at T=6, B=3, H=16, plus the awkward paths (relu, packed, stacked bidirectional).
CASES: tuple[Row, ...] = (
    Row("rnn-tanh", "rnn", batch=3, steps=6, hidden=16, dtype="float32"),
    Row("rnn-relu", "rnn", batch=3, steps=6, hidden=16, dtype="float32", nonlinearity="relu"),
    Row("gru", "gru", batch=3, steps=6, hidden=16, dtype="float32"),
    Row("lstm", "lstm", batch=3, steps=6, hidden=16, dtype="float32"),
    Row("lstm-packed-2L-bidir", "lstm", batch=3, steps=6, hidden=16, input_size=10, dtype="float32",
        layers=2, bidirectional=True, packed=True),
)
TOLERANCE = 1e-4
TIMEOUT_S = 300


def run_cases() -> list[dict]:
    """Run every case on the Triton backend in this process (the caller set the environment)."""
    import torch

    from bench.accuracy import check
    from bench.timing import describe_error
    from bench.workload import build_fastrnn, make_samples

    results = []
    for case in CASES:
        entry = {"case": case.name, "description": case.describe()}
        start = time.perf_counter()
        try:
            module = build_fastrnn(case, torch.device("cpu"))
            sample = make_samples(case, torch.device("cpu"), count=1)[0]
            outcome = check(module, sample, TOLERANCE, backend="triton")
            entry.update(status="ok" if outcome["passed"] else "failed", max_rel_err=outcome["max_rel_err"],
                         worst=outcome["worst"], errors=outcome["errors"])
        except (NotImplementedError, ImportError) as error:
            entry.update(status="missing", message=f"{type(error).__name__}: {error}")
        except Exception as error:  # noqa: BLE001 - a broken kernel is a result, not a crash
            entry.update(status="error", message=describe_error(error), traceback=traceback.format_exc(limit=4)[-4000:])
        entry["seconds"] = round(time.perf_counter() - start, 3)
        results.append(entry)
    return results


def run_pass(timeout_s: float = TIMEOUT_S) -> dict:
    """Spawn the interpreter pass in a child process; returns ``{"cases": [...], "seconds", ...}``
    (``{"error": ...}`` in place of cases when the child itself fails)."""
    env = dict(os.environ, TRITON_INTERPRET="1", FASTRNN_BACKEND="triton")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "interpret.json"
        try:
            done = subprocess.run([sys.executable, "-m", "bench.interpret", "--json", str(out)], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout_s:.0f} s", "cases": [], "seconds": timeout_s}
        seconds = round(time.perf_counter() - start, 2)
        if done.returncode != 0 or not out.exists():
            return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}", "cases": [], "seconds": seconds}
        return {"cases": json.loads(out.read_text()), "seconds": seconds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here instead of printing a summary")
    args = parser.parse_args(argv)
    results = run_cases()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    for entry in results:
        detail = f"err {entry['max_rel_err']:.1e}" if "max_rel_err" in entry else entry.get("message", "")
        print(f"{entry['case']:<24} {entry['status']:<8} {detail}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
