#!/usr/bin/env bash
# GPU check of fastrnn: versions, the test suite, and the benchmark matrix, in one go.
#
#   bash bench/gpu_check.sh            # tests + `python -m bench --quick`   (under 6 minutes)
#   bash bench/gpu_check.sh full       # tests + the full GPU matrix          (up to ~13 minutes)
#   bash bench/gpu_check.sh bench      # skip the tests, quick matrix only
#
# Run from anywhere; it works in the repository root. Results go to $OUT (default bench/results/):
#   gpu-check-<date>.md / .json    card, driver, CUDA, torch, triton versions, exit codes, timings
#   pytest-<date>.log              the test run
#   bench-<date>.log               the benchmark's progress and table
#   <device>[-quick]-<date>.json/.md/-*.png   the benchmark results (see python -m bench)
# Nothing is downloaded: fastrnn is installed editable offline (--no-deps --no-build-isolation),
# falling back to PYTHONPATH when that fails. Step time limits: PYTEST_TIMEOUT, BENCH_TIMEOUT (seconds).
set -uo pipefail

MODE="${1:-quick}"
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/bench/results}"
mkdir -p "$OUT"
DATE="$(date -u +%Y-%m-%d)"
PY="${PYTHON:-python}"
START=$(date +%s)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

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

PYTEST_RC="skipped"
PYTEST_SECONDS=0
if [ "$MODE" != "bench" ]; then
    section "tests"
    T0=$(date +%s)
    # The tests a GPU adds evidence to, GPU-only ones first; no -x, so one call shows every failure.
    # (Parity with torch.nn on the CPU paths and the ahead-of-time compile check run in CI already.)
    timeout "${PYTEST_TIMEOUT:-150}" "$PY" -m pytest -q -p no:cacheprovider -rfE \
        tests/test_gpu.py tests/test_kernels_rnn.py tests/test_kernels_gru.py tests/test_kernels_lstm.py \
        tests/test_gradient_control.py tests/test_topologies.py 2>&1 | tee "$OUT/pytest-$DATE.log"
    PYTEST_RC=${PIPESTATUS[0]}
    PYTEST_SECONDS=$(( $(date +%s) - T0 ))
    [ "$PYTEST_RC" = 124 ] && echo "pytest stopped at the ${PYTEST_TIMEOUT:-150} s limit"
fi

section "benchmark ($MODE)"
LIMIT="${BENCH_TIMEOUT:-170}"
if [ "$MODE" = "full" ]; then LIMIT="${BENCH_TIMEOUT:-600}"; fi
# The benchmark starts no new row past its budget, so it still writes its report; timeout is the backstop.
BENCH_ARGS=(--out "$OUT" --budget-s "$(( LIMIT - 45 ))")
[ "$MODE" = "full" ] || BENCH_ARGS+=(--quick)
T0=$(date +%s)
timeout "$LIMIT" "$PY" -m bench "${BENCH_ARGS[@]}" 2>&1 | tee "$OUT/bench-$DATE.log"
BENCH_RC=${PIPESTATUS[0]}
BENCH_SECONDS=$(( $(date +%s) - T0 ))
[ "$BENCH_RC" = 124 ] && echo "benchmark stopped at the $LIMIT s limit"

section "summary"
MODE="$MODE" INSTALL="$INSTALL" PYTEST_RC="$PYTEST_RC" PYTEST_SECONDS="$PYTEST_SECONDS" BENCH_RC="$BENCH_RC" \
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
    "pytest": {"exit_code": os.environ["PYTEST_RC"], "seconds": int(os.environ["PYTEST_SECONDS"])},
    "bench": {"exit_code": os.environ["BENCH_RC"], "seconds": int(os.environ["BENCH_SECONDS"])},
    "total_seconds": int(os.environ["TOTAL_SECONDS"]),
}
log = out / f"pytest-{date}.log"
if log.exists():
    tail = [line for line in log.read_text().splitlines() if re.search(r"\b(passed|failed|error|skipped)\b", line)]
    summary["pytest"]["summary"] = tail[-1] if tail else None
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
    f"- tests: exit {summary['pytest']['exit_code']} in {summary['pytest']['seconds']} s"
    + (f" ({summary['pytest'].get('summary')})" if summary["pytest"].get("summary") else ""),
    f"- benchmark ({summary['mode']}): exit {summary['bench']['exit_code']} in {summary['bench']['seconds']} s"
    + (f", results in {summary['bench']['results']}" if "results" in summary["bench"] else ""),
]
for name, row in summary["bench"].get("rows", {}).items():
    speed = row["speedup"] or {}
    shown = ", ".join(f"{mode} {value:.2f}x" for mode, value in speed.items() if value)
    lines.append(f"  - {name}: {row['status']}" + (f", speedup over torch.nn {shown}" if shown else ""))
lines.append(f"- total {summary['total_seconds']} s")
(out / f"gpu-check-{date}.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
(out / f"gpu-check-{date}.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
print(f"\nwrote {out}/gpu-check-{date}.json and .md")
EOF
echo "done in $(( $(date +%s) - START )) s"
[ "$PYTEST_RC" = 0 -o "$PYTEST_RC" = skipped ] && [ "$BENCH_RC" = 0 ]
