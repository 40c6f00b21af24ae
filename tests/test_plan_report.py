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

KEYS = ("row", "strategy", "programs", "exchange_rounds_per_step", "weight_bytes_reread_per_step", "exchange_bytes_per_step",
        "registers", "spill_bytes", "shared_bytes", "est_us_per_step_fwd", "est_us_per_step_bwd", "cudnn_us_per_step_anchor")
#: The rows after the GPU matrix's: issue 18's LayerNormLSTM row (bench.plan.LAYER_NORM_ROWS), no cuDNN anchor.
LAYER_NORM_ROWS = ("N1",)


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRNN_STRATEGY", "FASTRNN_PERSISTENT_SLICE")}
    done = subprocess.run([sys.executable, "-m", "bench", "--plan", "--json"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["row"]: r for r in json.loads(done.stdout)}


def test_one_object_per_row_with_the_keys(report):
    assert list(report) == [row.name for row in GPU_MATRIX] + list(LAYER_NORM_ROWS)
    for name, r in report.items():
        if name in LAYER_NORM_ROWS:
            continue
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


def test_layer_norm_row_counts_its_exchange_rounds(report):
    """N1 (LayerNormLSTM B64 H256 bf16): both ways on the persistent kernels with three flag rounds
    per step (forward: h, the recurrent norm's moments, the cell norm's; backward: the two norms'
    means, the partials of dh), one for every persistent plain row; the estimate pays for the extra
    rounds (more than the same partition with one round, less than the tiled strategy)."""
    r = report["N1"]
    missing = [k for k in KEYS if k not in r and k != "cudnn_us_per_step_anchor"]
    assert not missing, missing
    assert r["strategy"] == "persistent" and r["weight_bytes_reread_per_step"] == 0
    assert r["exchange_rounds_per_step"] == 3 and r["exchange_rounds_per_step_bwd"] == 3
    assert sorted(k["kernel"] for k in r["kernels"]) == ["layer_norm_lstm_bwd_persistent_kernel", "layer_norm_lstm_fwd_persistent_kernel"]
    assert all(k["spill_bytes"] == 0 for k in r["kernels"])
    other = r["other_strategies"]
    for way in ("fwd", "bwd"):
        key = f"est_us_per_step_{way}"
        assert other["persistent_one_round"][key] < r[key] < other["tiled"][key], way
    assert all(report[row.name]["exchange_rounds_per_step"] == (1 if report[row.name]["strategy"] == "persistent" else 0)
               for row in GPU_MATRIX)
