"""The persistent LayerNormLSTM kernels (``layer_norm_lstm_{fwd,bwd}_persistent_kernel``, three
exchange rounds per step each way: forward ``h``, the recurrent norm's moments, the cell norm's;
backward the cell norm's and the recurrent norm's means, the partials of ``dh``) against the
hand-written float64 equations of ``tests/test_layer_norm_rnn.py`` (through
``tests/test_layer_norm_kernels.py``'s ``run_case``): outputs, final states and every gradient.

* per_step mode on the stock interpreter: zoneout in eval with two batch groups and a last slice
  narrower than the others (H 20 at 8 units per program: the moments' counts differ per program).
  (Bidirectional, unsorted lengths, zoneout in training and ``grad_clip`` in per_step mode: the bf16
  H70 case of ``tests/test_layer_norm_kernels.py``, which plans to this forward by itself.)
* barrier mode under the thread-per-program harness (``tests/concurrent_grid.py``), 4 programs per
  direction, and the mutation check: without the waits before the moments are combined
  (``FAULT_NO_STATS_WAIT``) the harness sees wrong numbers.
* The gradient-flow record (per-program shares summed on the host) against the reference loop's.
* The sm_90 PTX of the GPU row's kernels orders the exchanges (acquire waits, release arrives).
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
    "packed-zoneout-clip": ("lstm", dict(zoneout=0.3, grad_clip=0.05), True, True, 3, 32),  # the mutation check's: 4 programs
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
    assert counts == {"layer_norm_lstm_fwd_persistent": 1, "layer_norm_lstm_bwd_persistent": 1}
    check(names, actual, expected)


def test_barrier_matches_float64_equations(persistent_case):
    name = persistent_case("bidir-packed-zoneout-clip", "barrier")
    assert persistent.persistent_plan(4, 32, 3, 2, torch.float32).grid == (4, 1, 2)
    with harness("barrier", seed=3):
        names, actual, expected, counts, _ = run_case(name, torch.float32)
    assert counts == {"layer_norm_lstm_fwd_persistent": 1, "layer_norm_lstm_bwd_persistent": 1}
    check(names, actual, expected)


def test_missing_moments_wait_is_caught(persistent_case, monkeypatch):
    """The kernels without their waits before combining the norms' statistics (the waits for
    ``h_{t-1}`` and for the partials of ``dh`` kept) give wrong numbers under the harness in one of
    up to FAULT_RUNS runs. Measured (one direction, 4 programs, the fault harness setting): caught
    in the first run 3 of 3 times, as are sync's no-wait, off-by-one and arrive-early faults; the
    correct kernels passed 4 of 4 runs at that setting (5 of 5 bidirectional)."""
    name = persistent_case("packed-zoneout-clip", "barrier")
    if unsupported_reason():
        pytest.skip(unsupported_reason())
    monkeypatch.setattr(persistent, "FAULT", int(kernels.FAULT_NO_STATS_WAIT))
    caught = first_run_caught(lambda: run_case(name, torch.float32)[:3], lambda result: check(*result),
                              FAULT_RUNS, FAULT_CHAOS, FAULT_JITTER_S)
    assert caught, f"the missing moments wait went unnoticed in {FAULT_RUNS} runs"


def test_explain_names_the_persistent_kernels():
    """The 16-bit LayerNormLSTM past the resident size plans persistent by itself (the GPU row's
    shape); at B256 the plan walks sub-tiles, which these kernels do not: tiled."""
    import fastrnn

    module = fastrnn.LayerNormLSTM(3, 256, dtype=torch.bfloat16)
    with fastrnn.use_backend("triton"):
        assert "persistent: W_hh spread over the programs" in fastrnn.explain(module, torch.zeros(2, 64, 3, dtype=torch.bfloat16))
        assert "re-read per step in tiles" in fastrnn.explain(module, torch.zeros(2, 256, 3, dtype=torch.bfloat16))


def test_gradient_flow_record_matches_the_loop(persistent_case):
    import fastrnn

    persistent_case("bidir-packed-zoneout-clip", "per_step")
    torch.manual_seed(0)
    module = fastrnn.LayerNormLSTM(3, 20)
    x = torch.randn(4, 2, 3)
    norms = {}
    for path in ("reference", "triton"):
        with fastrnn.use_backend(path), fastrnn.record_gradient_flow() as flow:
            y, _ = module(x)
            y[-1].sum().backward()
        norms[path] = flow.norms()
    assert (norms["triton"][0] > 0).all()
    assert_close(norms["triton"], norms["reference"], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- PTX
PTX_SCRIPT = r"""
import json, re, sys
from fastrnn.ops import aot
out = {}
# The GPU row's launches as the launcher makes them in barrier mode (forced: on a CPU the launcher
# runs per step): the compile gate's binaries (tests/test_kernel_compile.py), from Triton's cache.
with aot.capture_launches(90) as launches:
    aot.workloads()["layer-norm-lstm-bf16-persistent-barrier-plain"]()
for launch in launches:
    if launch.name.endswith("_persistent_kernel") and launch.name not in out:
        ptx = aot.compile_binary(launch).asm["ptx"]
        ops = [line.strip() for line in ptx.splitlines() if re.search(r"\b(atom|red|ld|fence)\.", line)]
        out[launch.name] = [o for o in ops if re.search(r"acquire|release|volatile|acq_rel", o)]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def ordering_ops():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRNN_STRATEGY", "FASTRNN_PERSISTENT_SLICE")}
    done = subprocess.run([sys.executable, "-c", PTX_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("kernel", ["layer_norm_lstm_fwd", "layer_norm_lstm_bwd"])
def test_ptx_orders_the_exchanges(ordering_ops, kernel):
    """sm_90 PTX of the GPU row's kernels (bf16, barrier mode): acquire reads in the waits, release
    atomics at the arrives (one per round), no volatile spin. (Per step the barrier is compiled out
    by the constexpr ``BARRIER``, as in the plain cells' kernels, whose PTX test checks that form.)"""
    ops = ordering_ops[f"{kernel}_persistent_kernel"]
    assert any(".acquire" in op and ("atom." in op or "ld." in op or "fence." in op) for op in ops), ops
    assert sum(".release" in op and ("atom." in op or "red." in op) for op in ops) >= 3, ops
    assert not any("volatile" in op for op in ops), ops
