"""``python -m bench --plan --json``: one object per GPU-matrix row with the keys the issue lists,
the strategy the launcher's plan picks, resources from real sm_90 compiles, and estimates that
follow from the partition (bench/plan.py, fastrnn/ops/cost_model.py). Runs once per session in
a subprocess without ``TRITON_INTERPRET`` (the compiles need it off)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench.matrix import GATES, GPU_MATRIX

KEYS = ("row", "strategy", "programs", "weight_bytes_reread_per_step", "exchange_bytes_per_step", "registers",
        "spill_bytes", "shared_bytes", "est_us_per_step_fwd", "est_us_per_step_bwd", "cudnn_us_per_step_anchor")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRNN_STRATEGY", "FASTRNN_PERSISTENT_SLICE")}
    done = subprocess.run([sys.executable, "-m", "bench", "--plan", "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["row"]: r for r in json.loads(done.stdout)}


def test_one_object_per_row_with_the_keys(report):
    assert list(report) == [row.name for row in GPU_MATRIX]
    for name, r in report.items():
        missing = [k for k in KEYS if k not in r]
        assert not missing, f"{name} lacks {missing}"
        assert r["registers"] > 0 and r["spill_bytes"] >= 0 and r["shared_bytes"] > 0, name
        assert r["est_us_per_step_fwd"] > 0 and r["est_us_per_step_bwd"] > 0, name
        assert "estimate" in r["cudnn_anchor_kind"] or "measured" in r["cudnn_anchor_kind"] or "nearest" in r["cudnn_anchor_kind"]


@pytest.mark.parametrize("row", GPU_MATRIX, ids=lambda r: r.name)
def test_strategy_is_the_launchers(report, row):
    """The report shows what recurrence.plan picks for the row (not a strategy of its own), and a
    persistent row keeps its weights on chip: nothing of W_hh re-read per step."""
    from fastrnn.ops.recurrence import plan

    r = report[row.name]
    assert r["strategy"] == plan(GATES[row.cell], row.hidden, torch.bfloat16 if row.dtype != "float32" else torch.float32).strategy
    if r["strategy"] == "persistent":
        assert r["weight_bytes_reread_per_step"] == 0
        assert all("_persistent_kernel" in k["kernel"] for k in r["kernels"])
    else:
        assert r["weight_bytes_reread_per_step"] > 0
