#!/usr/bin/env bash
# GPU check of fastrnn: versions, the plan report, the CUDA tests, and the GPU benchmark matrix, in one go.
#
#   bash bench/gpu_check.sh            # plan + CUDA tests + the whole GPU matrix, lean  (under 6 minutes)
#   bash bench/gpu_check.sh quick      # CUDA tests + `python -m bench --quick`            (under 6 minutes)
#   bash bench/gpu_check.sh full       # CUDA tests + the full GPU matrix, every section  (up to ~13 minutes)
#   bash bench/gpu_check.sh bench      # skip the tests, the lean matrix only
#
# The default ("check") is what the first GPU session of the persistent kernels runs:
#   1. `python -m bench --plan --json` (strategy, grid, sm_90 compile resources and the cost model's
#      estimate per GPU row: the predictions the timings are then read against), on the CPU in the
#      background while the tests run (it compiles, it launches nothing);
#   2. the CUDA tests: first, in a call of their own, the per_step mode's CUDA graphs
#      (tests/test_gpu.py -k per_step_cuda_graph: fastrnn.ops.step_graph, never run before); then the
#      persistent kernels' tests (tests/test_persistent*.py: parity in barrier mode as cooperative
#      launches, and per step), then the rest of tests/test_gpu.py, then the kernel parity tests; one
#      line per test (-v), so a run cut short by its limit still shows what passed;
#   3. every GPU-matrix row of `python -m bench` (on CUDA it times the Triton kernels) against torch.nn (cuDNN),
#      without the reference loops, the batch sweep, the topology and gradient-flow sections
#      (after the plan report has finished: nothing else runs while it times).
# Step limits (seconds): PLAN_TIMEOUT 90 (in the background), GRAPH_TIMEOUT 50, PYTEST_TIMEOUT 120,
# BENCH_TIMEOUT 140 (check mode): at most 310 s of steps, plus the set-up and the summary. (The graph
# tests compile the per_step kernels of tests/test_persistent*.py's per_step cases, which the main
# call then finds in Triton's cache: the 30 s it lost are mostly compiles it no longer makes.)
#
# Run from anywhere; it works in the repository root. Results go to $OUT (default bench/results/),
# eight files at most (what a lent machine hands back):
#   gpu-check-<date>.md / .json    card, driver, CUDA, torch, triton versions, exit codes, timings, per-row results
#   gpu-check-<date>.log           everything the steps printed (tests, plan, benchmark progress)
#   plan-<device>-<date>.json      the plan report
#   <device>[-quick]-<date>.json/.md/-speedup.png   the benchmark results (see python -m bench)
# Nothing is downloaded: fastrnn is installed editable offline (--no-deps --no-build-isolation),
# falling back to PYTHONPATH when that fails. A copy without .git names its commit with
# FASTRNN_COMMIT=<sha> (written into the results).
set -uo pipefail

MODE="${1:-check}"
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/bench/results}"
mkdir -p "$OUT"
DATE="$(date -u +%Y-%m-%d)"
PY="${PYTHON:-python}"
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

LOG="$OUT/gpu-check-$DATE.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
section() { printf '\n===== %s (%ss) =====\n' "$1" "$(( $(date +%s) - START ))"; }

section "machine"
if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi; else echo "nvidia-smi not found"; fi
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(),
      "| GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton missing:", error)
EOF

section "install fastrnn (editable, offline)"
INSTALL="pip-editable"
if ! "$PY" -m pip install --no-deps --no-build-isolation --no-index -e . -q; then
    # PYTHONPATH alone cannot map fastrnn.kernels onto kernels/ (setuptools' package-dir does that
    # when installed), so a sitecustomize on the path adds the alias.
    INSTALL="PYTHONPATH"
    SHIM="$(mktemp -d)"
    cat > "$SHIM/sitecustomize.py" <<'SHIM_EOF'
"""fastrnn without installing: import fastrnn.kernels from <repo>/kernels (as pyproject's package-dir does)."""
import importlib.abc
import importlib.util
import os
import sys

_KERNELS = os.path.join(os.environ["FASTRNN_ROOT"], "kernels")


class _KernelsAlias(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fastrnn.kernels":
            return importlib.util.spec_from_file_location(
                name, os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])
        return None


sys.meta_path.insert(0, _KernelsAlias())
SHIM_EOF
    export FASTRNN_ROOT="$ROOT" PYTHONPATH="$SHIM:$PYTHONPATH"
    echo "editable install failed; using PYTHONPATH=$PYTHONPATH (with a fastrnn.kernels alias)"
fi
"$PY" -c "import fastrnn, fastrnn.kernels; print('fastrnn', fastrnn.__version__, 'from', fastrnn.__file__)" \
    || echo "WARNING: fastrnn or fastrnn.kernels does not import"

PLAN_RC="skipped"
PLAN_SECONDS=0
PLAN_PID=""
if [ "$MODE" = "check" ] || [ "$MODE" = "full" ]; then
    section "plan report (python -m bench --plan --json, in the background)"
    PLAN_JSON="$OUT/plan-$("$PY" -c 'from bench import environment as e; print(e.describe(e.detect_device())["device"])' 2>/dev/null || echo gpu)-$DATE.json"
    PLAN_LOG="$(mktemp)"
    # Its progress goes to a file of its own (printed when it ends), not into the tests' output.
    ( T0=$(date +%s); timeout "${PLAN_TIMEOUT:-90}" "$PY" -m bench --plan --json > "$PLAN_JSON.tmp" 2> "$PLAN_LOG"
      echo "$? $(( $(date +%s) - T0 ))" > "$PLAN_LOG.rc" ) &
    PLAN_PID=$!
fi
finish_plan() {  # wait for the background plan report; set PLAN_RC and PLAN_SECONDS
    [ -n "$PLAN_PID" ] || return 0
    wait "$PLAN_PID"
    PLAN_PID=""
    section "plan report finished"
    cat "$PLAN_LOG"
    read -r PLAN_RC PLAN_SECONDS < "$PLAN_LOG.rc" || { PLAN_RC="unknown"; PLAN_SECONDS=0; }
    mv "$PLAN_JSON.tmp" "$PLAN_JSON"
    [ "$PLAN_RC" = 124 ] && echo "plan report stopped at the ${PLAN_TIMEOUT:-90} s limit"
    echo "wrote $PLAN_JSON (exit $PLAN_RC, $PLAN_SECONDS s)"
}

GRAPH_RC="skipped"
GRAPH_SECONDS=0
PYTEST_RC="skipped"
PYTEST_SECONDS=0
if [ "$MODE" != "bench" ]; then
    section "tests: the per_step mode in CUDA graphs"
    # Their kernels are those of the per_step cases of tests/test_persistent*.py, so the compiles
    # they make are the ones the main call would make anyway.
    T0=$(date +%s)
    timeout "${GRAPH_TIMEOUT:-50}" "$PY" -m pytest -v -p no:cacheprovider -rfE tests/test_gpu.py -k per_step_cuda_graph
    GRAPH_RC=$?
    GRAPH_SECONDS=$(( $(date +%s) - T0 ))
    [ "$GRAPH_RC" = 124 ] && echo "pytest stopped at the ${GRAPH_TIMEOUT:-50} s limit"

    section "tests"
    T0=$(date +%s)
    # The tests a GPU adds evidence to: the persistent kernels' tests first (whatever
    # tests/test_persistent*.py there are), then the GPU-only ones, then parity of every kernel on
    # CUDA tensors; no -x, so one call shows every failure, and -v, so a run stopped at its limit
    # still shows every test that finished. (The CPU paths and the ahead-of-time compile gates run in CI;
    # the concurrent-grid harness is CPU-only.)
    PYTEST_LIMIT="${PYTEST_TIMEOUT:-120}"
    [ "$MODE" = "full" ] && PYTEST_LIMIT="${PYTEST_TIMEOUT:-180}"
    TESTS=()
    for f in tests/test_persistent*.py; do  # the compile gate runs in CI, not here
        [ -e "$f" ] && [ "$f" != tests/test_persistent_compile.py ] && TESTS+=("$f")
    done
    TESTS+=(tests/test_gpu.py tests/test_kernels_rnn.py tests/test_kernels_gru.py tests/test_kernels_lstm.py tests/test_gradient_control.py tests/test_regularized_kernels.py)
    [ "$MODE" = "check" ] || TESTS+=(tests/test_topologies.py)
    echo "pytest ${TESTS[*]}"
    timeout "$PYTEST_LIMIT" "$PY" -m pytest -v -p no:cacheprovider -rfE "${TESTS[@]}" -k "not per_step_cuda_graph"
    PYTEST_RC=$?
    PYTEST_SECONDS=$(( $(date +%s) - T0 ))
    [ "$PYTEST_RC" = 124 ] && echo "pytest stopped at the $PYTEST_LIMIT s limit"
fi

finish_plan
section "benchmark ($MODE)"
case "$MODE" in
    full) LIMIT="${BENCH_TIMEOUT:-600}" ;;
    quick) LIMIT="${BENCH_TIMEOUT:-170}" ;;
    *) LIMIT="${BENCH_TIMEOUT:-140}" ;;
esac
# The benchmark starts no new row past its budget, so it still writes its report; timeout is the backstop.
BENCH_ARGS=(--out "$OUT" --budget-s "$(( LIMIT - 30 ))")
case "$MODE" in
    full) ;;
    quick) BENCH_ARGS+=(--quick) ;;
    *) BENCH_ARGS+=(--eager-max-steps 0 --no-compile --no-sweep --no-topologies --no-gradient-flow) ;;
esac
T0=$(date +%s)
timeout "$LIMIT" "$PY" -m bench "${BENCH_ARGS[@]}"
BENCH_RC=$?
BENCH_SECONDS=$(( $(date +%s) - T0 ))
[ "$BENCH_RC" = 124 ] && echo "benchmark stopped at the $LIMIT s limit"

section "summary"
MODE="$MODE" INSTALL="$INSTALL" PLAN_RC="$PLAN_RC" PLAN_SECONDS="$PLAN_SECONDS" GRAPH_RC="$GRAPH_RC" GRAPH_SECONDS="$GRAPH_SECONDS" PYTEST_RC="$PYTEST_RC" PYTEST_SECONDS="$PYTEST_SECONDS" BENCH_RC="$BENCH_RC" \
BENCH_SECONDS="$BENCH_SECONDS" TOTAL_SECONDS="$(( $(date +%s) - START ))" OUT="$OUT" DATE="$DATE" "$PY" - <<'EOF'
"""Write gpu-check-<date>.json/.md: versions, what ran, how it ended."""
import json
import os
import re
from pathlib import Path

import torch

from bench import environment

out, date = Path(os.environ["OUT"]), os.environ["DATE"]
device = environment.detect_device()
summary = {
    "environment": environment.describe(device),
    "mode": os.environ["MODE"],
    "install": os.environ["INSTALL"],
    "plan": {"exit_code": os.environ["PLAN_RC"], "seconds": int(os.environ["PLAN_SECONDS"])},
    "graph_tests": {"exit_code": os.environ["GRAPH_RC"], "seconds": int(os.environ["GRAPH_SECONDS"])},
    "pytest": {"exit_code": os.environ["PYTEST_RC"], "seconds": int(os.environ["PYTEST_SECONDS"])},
    "bench": {"exit_code": os.environ["BENCH_RC"], "seconds": int(os.environ["BENCH_SECONDS"])},
    "total_seconds": int(os.environ["TOTAL_SECONDS"]),
}
log = out / f"gpu-check-{date}.log"
if log.exists():
    tail = [line for line in log.read_text().splitlines()
            if re.search(r"\b\d+ (passed|failed|error|errors|skipped)\b", line) and " in " in line]
    if summary["graph_tests"]["exit_code"] not in ("skipped", "124"):  # the first pytest summary line is the graph tests'
        summary["graph_tests"]["summary"], tail = (tail[0], tail[1:]) if tail else (None, tail)
    summary["pytest"]["summary"] = tail[-1] if tail else None
plans = sorted(out.glob(f"plan-*-{date}.json"), key=lambda p: p.stat().st_mtime)
estimates = {}
if plans:
    summary["plan"]["results"] = plans[-1].name
    try:
        estimates = {r["row"]: r for r in json.loads(plans[-1].read_text())}
    except ValueError as error:
        summary["plan"]["error"] = f"unreadable plan JSON: {error}"
results = sorted(out.glob(f"{summary['environment']['device']}*-{date}*.json"), key=lambda p: p.stat().st_mtime)
if results:
    summary["bench"]["results"] = results[-1].name
    rows = json.loads(results[-1].read_text())["rows"]
    summary["bench"]["rows"] = {r["name"]: {"status": r["status"], "speedup": r.get("speedup")} for r in rows}

env = summary["environment"]
lines = [
    f"# GPU check, {date}",
    "",
    f"- card: **{env['card']}**, driver {env['driver']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}",
    f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}; fastrnn via {summary['install']}",
    f"- commit {(env['git']['commit'] or 'unknown')[:12]}{' (dirty)' if env['git']['dirty'] else ''}",
    f"- plan report: exit {summary['plan']['exit_code']} in {summary['plan']['seconds']} s"
    + (f" ({summary['plan']['results']})" if "results" in summary["plan"] else ""),
    f"- per_step CUDA-graph tests: exit {summary['graph_tests']['exit_code']} in {summary['graph_tests']['seconds']} s"
    + (f" ({summary['graph_tests'].get('summary')})" if summary["graph_tests"].get("summary") else ""),
    f"- tests: exit {summary['pytest']['exit_code']} in {summary['pytest']['seconds']} s"
    + (f" ({summary['pytest'].get('summary')})" if summary["pytest"].get("summary") else ""),
    f"- benchmark ({summary['mode']}): exit {summary['bench']['exit_code']} in {summary['bench']['seconds']} s"
    + (f", results in {summary['bench']['results']}" if "results" in summary["bench"] else ""),
]
for name, row in summary["bench"].get("rows", {}).items():
    speed = row["speedup"] or {}
    shown = ", ".join(f"{mode} {value:.2f}x" for mode, value in speed.items() if value)
    plan = estimates.get(name)
    predicted = (f"; plan: {plan['strategy']}, {plan['programs']} programs, estimated {plan['est_us_per_step_fwd']} us/step fwd"
                 f" + {plan['est_us_per_step_bwd']} bwd") if plan else ""
    lines.append(f"  - {name}: {row['status']}" + (f", speedup over torch.nn {shown}" if shown else "") + predicted)
lines.append(f"- total {summary['total_seconds']} s")
(out / f"gpu-check-{date}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
(out / f"gpu-check-{date}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {out}/gpu-check-{date}.json and .md")
EOF
echo "done in $(( $(date +%s) - START )) s"
[ "$GRAPH_RC" = 0 -o "$GRAPH_RC" = skipped ] && [ "$PYTEST_RC" = 0 -o "$PYTEST_RC" = skipped ] && [ "$PLAN_RC" = 0 -o "$PLAN_RC" = skipped ] && [ "$BENCH_RC" = 0 ]
