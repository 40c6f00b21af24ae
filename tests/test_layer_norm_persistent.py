"""The persistent LayerNormLSTM forward (``layer_norm_lstm_fwd_persistent_kernel``, three exchange
rounds per step: ``h``, the recurrent norm's moments, the cell norm's) against the hand-written
float64 equations of ``tests/test_layer_norm_rnn.py`` (through ``tests/test_layer_norm_kernels.py``'s
``run_case``): outputs, final states and every gradient (the backward runs on the tiled kernels
from what the persistent forward saved).

* per_step mode on the stock interpreter: zoneout in eval with two batch groups and a last slice
  narrower than the others (H 20 at 8 units per program: the moments' counts differ per program).
  (Bidirectional, unsorted lengths, zoneout in training and ``grad_clip`` in per_step mode: the bf16
  H70 case of ``tests/test_layer_norm_kernels.py``, which plans to this forward by itself.)
* barrier mode under the thread-per-program harness (``tests/concurrent_grid.py``), 4 programs per
  direction, and the mutation check: without the waits before the moments are combined
  (``FAULT_NO_STATS_WAIT``) the harness sees wrong numbers.
"""

from __future__ import annotations

import pytest
import torch

from fastrnn.backend import triton_interpreting
from fastrnn.kernels import layer_norm_rnn as kernels
from fastrnn.ops import persistent
from tests.conftest import assert_close
from tests.test_layer_norm_kernels import CASES, run_case
from tests.test_persistent import FAULT_CHAOS, FAULT_JITTER_S, FAULT_RUNS, harness

pytestmark = pytest.mark.skipif(torch.cuda.is_available() or not triton_interpreting(), reason="interpreter tests")

if not torch.cuda.is_available():
    from concurrent_grid import first_run_caught, unsupported_reason

SLICE = 8
#: id -> run_case's (cell, options, training, packed, batch, hidden)
PERSISTENT_CASES = {
    "bidir-packed-zoneout-clip": ("lstm", dict(bidirectional=True, zoneout=0.3, grad_clip=0.05), True, True, 3, 32),
    "eval-zoneout-two-groups-narrow-slice": ("lstm", dict(zoneout=0.25), False, False, 17, 20),
}


@pytest.fixture
def persistent_case(monkeypatch):
    """Force the persistent forward at SLICE units per program in ``mode``; registers the case."""
    monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
    monkeypatch.setenv("FASTRNN_PERSISTENT_SLICE", str(SLICE))

    def setup(name, mode):
        monkeypatch.setenv("FASTRNN_PERSISTENT_MODE", mode)
        monkeypatch.setitem(CASES, name, PERSISTENT_CASES[name])
        return name
    return setup


def check(names, actual, expected):
    for label, a, e in zip(names, actual, expected):
        assert a.dtype == torch.float32, label
        assert_close(a.double(), e.double(), atol=1e-4, rtol=1e-4, msg=lambda m, label=label: f"{label}: {m}")


def test_per_step_matches_float64_equations(persistent_case):
    names, actual, expected, counts, module = run_case(persistent_case("eval-zoneout-two-groups-narrow-slice", "per_step"),
                                                       torch.float32)
    assert counts == {"layer_norm_lstm_fwd_persistent": 1, "layer_norm_lstm_bwd_tiled": 1}
    check(names, actual, expected)


def test_barrier_matches_float64_equations(persistent_case):
    name = persistent_case("bidir-packed-zoneout-clip", "barrier")
    assert persistent.persistent_plan(4, 32, 3, 2, torch.float32).grid == (4, 1, 2)
    with harness("barrier", seed=3):
        names, actual, expected, counts, _ = run_case(name, torch.float32)
    assert counts == {"layer_norm_lstm_fwd_persistent": 1, "layer_norm_lstm_bwd_tiled": 1}
    check(names, actual, expected)


def test_missing_moments_wait_is_caught(persistent_case, monkeypatch):
    """The kernel without its two waits before combining the moments (the wait for ``h_{t-1}``
    kept) gives wrong numbers under the harness in one of up to FAULT_RUNS runs."""
    name = persistent_case("bidir-packed-zoneout-clip", "barrier")
    if unsupported_reason():
        pytest.skip(unsupported_reason())
    with harness("barrier", seed=4):
        names, _, expected, _, _ = run_case(name, torch.float32)
    monkeypatch.setattr(persistent, "FAULT", int(kernels.FAULT_NO_STATS_WAIT))
    caught = first_run_caught(lambda: run_case(name, torch.float32)[1], lambda actual: check(names, actual, expected),
                              FAULT_RUNS, FAULT_CHAOS, FAULT_JITTER_S)
    assert caught, f"the missing moments wait went unnoticed in {FAULT_RUNS} runs"


# ---------------------------------------------------------------------------------- PTX
PTX_SCRIPT = r"""
import json, re, sys
from fastrnn.ops import aot
import torch
out = {}
# The GPU row's launch as the launcher makes it: barrier mode (forced: on a CPU the launcher runs
# per step), and per step (the same layer unforced).
hidden, batch = aot.LAYER_NORM_PERSISTENT_ROW
runs = {"barrier": aot.workloads()["layer-norm-lstm-bf16-persistent-barrier-plain"],
        "per_step": lambda: aot.layer_norm_workload("lstm", torch.bfloat16, hidden, batch, "plain")}
for mode, run in runs.items():
    with aot.capture_launches(90) as launches:
        run()
    for launch in launches:
        if launch.name == "layer_norm_lstm_fwd_persistent_kernel":
            ptx = aot.compile_binary(launch).asm["ptx"]
            ops = [line.strip() for line in ptx.splitlines() if re.search(r"\b(atom|red|ld|fence)\.", line)]
            out[mode] = [o for o in ops if re.search(r"acquire|release|volatile|acq_rel", o)]
json.dump(out, sys.stdout)
"""


def test_ptx_orders_the_exchanges():
    """sm_90 PTX of the GPU row's forward (bf16): in barrier mode acquire reads in the waits, release
    atomics at the arrives, no volatile spin; per step (barrier compiled out), none of them."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRNN_STRATEGY", "FASTRNN_PERSISTENT_SLICE")}
    done = subprocess.run([sys.executable, "-c", PTX_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ops = json.loads(done.stdout)
    barrier = ops["barrier"]
    assert any(".acquire" in op and ("atom." in op or "ld." in op or "fence." in op) for op in barrier), barrier
    assert sum(".release" in op and ("atom." in op or "red." in op) for op in barrier) >= 3, barrier  # one arrive per round
    assert not any("volatile" in op for op in barrier), barrier
    assert not any(".acquire" in op or ".release" in op for op in ops["per_step"]), ops["per_step"]
