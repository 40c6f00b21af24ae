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
* On CUDA (``bench/gpu_check.sh`` runs ``tests/test_persistent*.py``): barrier mode as cooperative
  launches and per step, fp32 and bf16, against the float64 reference loop on the CPU; and the GPU
  row's shape on its own plan (no knob forced).
"""

from __future__ import annotations

import pytest
import torch

from fastrnn.backend import triton_interpreting
from fastrnn.kernels import layer_norm_rnn as kernels
from fastrnn.ops import persistent
from tests.conftest import assert_close
from tests.test_layer_norm_kernels import CASES, flow_record_matches_the_loop, run_case
from tests.test_persistent import FAULT_CHAOS, FAULT_JITTER_S, FAULT_RUNS, harness

ON_CUDA = torch.cuda.is_available()
interpreted = pytest.mark.skipif(ON_CUDA or not triton_interpreting(), reason="the interpreter's tests (CPU tensors)")
on_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")

if not ON_CUDA:
    from concurrent_grid import first_run_caught, unsupported_reason

SLICE = 8
#: id -> run_case's (cell, options, training, packed, batch, hidden)
PERSISTENT_CASES = {
    "bidir-packed-zoneout-clip": ("lstm", dict(bidirectional=True, zoneout=0.3, grad_clip=0.05), True, True, 3, 32),
    "eval-zoneout-two-groups-narrow-slice": ("lstm", dict(zoneout=0.25), False, False, 17, 20),
    "packed-zoneout-clip": ("lstm", dict(zoneout=0.3, grad_clip=0.05), True, True, 3, 32),  # the mutation check's: 4 programs
    # 19 rows: groups of 16 and 3 (sorted lengths 5 5 5 5 5 4 4 4 4 4 3 3 3 2 2 2 | 2 2 1), 3 slices (8 8 4)
    "packed-zoneout-two-groups-narrow-slice": ("lstm", dict(zoneout=0.3), True, True, 19, 20),
    # the persistent LayerNormGRU's (its section below): 3 programs per direction, the last 4 units wide (the moments' counts differ per program)
    "gru-bidir-packed-zoneout-clip-narrow-slice": ("gru", dict(bidirectional=True, zoneout=0.3, grad_clip=0.05), True, True, 3, 20),
    "gru-eval-zoneout-two-groups": ("gru", dict(zoneout=0.25), False, False, 17, 20),
    # barrier mode: 4 programs x 2 batch groups
    "gru-packed-zoneout-two-groups": ("gru", dict(zoneout=0.3), True, True, 17, 32),
    "gru-packed-zoneout-clip": ("gru", dict(zoneout=0.3, grad_clip=0.05), True, True, 3, 32),  # the mutation check's: 4 programs
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


@interpreted
def test_per_step_matches_float64_equations(persistent_case):
    names, actual, expected, counts, module = run_case(persistent_case("eval-zoneout-two-groups-narrow-slice", "per_step"),
                                                       torch.float32)
    assert counts == {"layer_norm_lstm_fwd_persistent": 1, "layer_norm_lstm_bwd_persistent": 1}
    check(names, actual, expected)


@interpreted
def test_barrier_matches_float64_equations(persistent_case):
    name = persistent_case("bidir-packed-zoneout-clip", "barrier")
    assert persistent.persistent_plan(4, 32, 3, 2, torch.float32).grid == (4, 1, 2)
    with harness("barrier", seed=3):
        names, actual, expected, counts, _ = run_case(name, torch.float32)
    assert counts == {"layer_norm_lstm_fwd_persistent": 1, "layer_norm_lstm_bwd_persistent": 1}
    check(names, actual, expected)


class GridRecorder:
    """Stands in for a kernel: records the grid of every launch (``kernel[grid](...)``)."""

    def __init__(self, kernel, grids):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]

    def __getattr__(self, name):
        return getattr(self.kernel, name)


@interpreted
def test_barrier_two_batch_groups_match_float64_equations(persistent_case, monkeypatch):
    """Two batch groups (16 rows and 3, lengths mixed within each) x 3 slices (the last of 4 units)
    in barrier mode, one launch each way: each group waits on its own flags and exchanges its own
    rows' moments. Measured: flags shared across the groups (the group index dropped from
    ``group_flags``' offset) in the forward alone, or in the backward alone, fails this test and no
    other of this file's."""
    name = persistent_case("packed-zoneout-two-groups-narrow-slice", "barrier")
    assert persistent.persistent_plan(4, 20, 19, 1, torch.float32).grid == (3, 2, 1)
    grids = {}
    for way in ("fwd", "bwd"):
        attr = f"layer_norm_lstm_{way}_persistent_kernel"
        monkeypatch.setattr(kernels, attr, GridRecorder(getattr(kernels, attr), grids.setdefault(way, [])))
    with harness("barrier", seed=5):
        names, actual, expected, counts, _ = run_case(name, torch.float32)
    assert counts == {"layer_norm_lstm_fwd_persistent": 1, "layer_norm_lstm_bwd_persistent": 1}
    assert grids == {"fwd": [(3, 2, 1)], "bwd": [(3, 2, 1)]}  # one barrier-mode launch each, 2 groups
    check(names, actual, expected)


@interpreted
@pytest.mark.parametrize("case", ["packed-zoneout-clip", "gru-packed-zoneout-clip"], ids=["lstm", "gru"])
def test_missing_moments_wait_is_caught(persistent_case, monkeypatch, case):
    """The kernels without their waits before combining the norms' statistics
    (``FAULT_NO_STATS_WAIT``; the waits for ``h_{t-1}`` and for the partials of ``dh`` / ``d_r``
    kept) give wrong numbers under the harness in one of up to FAULT_RUNS runs. Measured (one
    direction, 4 programs, the fault harness setting): the LayerNormLSTM's caught in the first run
    3 of 3 times, as are sync's no-wait, off-by-one and arrive-early faults, the correct kernels
    passing 4 of 4 runs at that setting (5 of 5 bidirectional); the LayerNormGRU's caught in the
    first run, as are sync's three faults, the correct kernels passing 4 of 4 runs."""
    name = persistent_case(case, "barrier")
    if unsupported_reason():
        pytest.skip(unsupported_reason())
    monkeypatch.setattr(persistent, "FAULT", int(kernels.FAULT_NO_STATS_WAIT))
    caught = first_run_caught(lambda: run_case(name, torch.float32)[:3], lambda result: check(*result),
                              FAULT_RUNS, FAULT_CHAOS, FAULT_JITTER_S)
    assert caught, f"the missing moments wait went unnoticed in {FAULT_RUNS} runs"


@interpreted
def test_explain_names_the_persistent_kernels():
    """The 16-bit LayerNormLSTM past the resident size plans persistent by itself (the GPU row's
    shape); at B256 the plan walks sub-tiles, which these kernels do not: tiled."""
    import fastrnn

    module = fastrnn.LayerNormLSTM(3, 256, dtype=torch.bfloat16)
    with fastrnn.use_backend("triton"):
        assert "persistent: W_hh spread over the programs" in fastrnn.explain(module, torch.zeros(2, 64, 3, dtype=torch.bfloat16))
        assert "re-read per step in tiles" in fastrnn.explain(module, torch.zeros(2, 256, 3, dtype=torch.bfloat16))


@interpreted
def test_gradient_flow_record_matches_the_loop(persistent_case):
    import fastrnn

    persistent_case("bidir-packed-zoneout-clip", "per_step")
    flow_record_matches_the_loop(lambda: fastrnn.LayerNormLSTM(3, 20))


# ---------------------------------------------------------------------------------- PTX
PTX_SCRIPT = r"""
import json, re, sys
from fastrnn.ops import aot
out = {}
# The workloads' launches as the launcher makes them in barrier mode (forced: on a CPU the launcher
# runs per step): the compile gate's binaries (tests/test_kernel_compile.py), from Triton's cache.
with aot.capture_launches(90) as launches:
    for name in sys.argv[1:]:
        aot.workloads()[name]()
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
    # the LayerNormLSTM's GPU row and the LayerNormGRU's compile-gate plan, in one subprocess
    workloads = ["layer-norm-lstm-bf16-persistent-barrier-plain", "layer-norm-gru-bf16-persistent-barrier-plain"]
    done = subprocess.run([sys.executable, "-c", PTX_SCRIPT, *workloads], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize(("kernel", "rounds"), [("layer_norm_lstm_fwd", 3), ("layer_norm_lstm_bwd", 3),
                                               ("layer_norm_gru_fwd", 2), ("layer_norm_gru_bwd", 2)])
def test_ptx_orders_the_exchanges(ordering_ops, kernel, rounds):
    """sm_90 PTX of the LayerNormLSTM GPU row's kernels and the LayerNormGRU's at the compile gate's
    plan (bf16, barrier mode): acquire reads in the waits, release atomics at the arrives (one per
    exchange round: 3 LSTM, 2 GRU), no volatile spin. (Per step the barrier is compiled out by the
    constexpr ``BARRIER``, as in the plain cells' kernels, whose PTX test checks that form.)"""
    ops = ordering_ops[f"{kernel}_persistent_kernel"]
    assert any(".acquire" in op and ("atom." in op or "ld." in op or "fence." in op) for op in ops), ops
    assert sum(".release" in op and ("atom." in op or "red." in op) for op in ops) >= rounds, ops
    assert not any("volatile" in op for op in ops), ops


# ---------------------------------------------------------------------------------- CUDA
def cuda_against_float64(module, batch, steps, bidirectional, device="cuda"):
    """Outputs, final states and every gradient of ``module`` (a LayerNormLSTM, or a LayerNormGRU:
    state ``h`` alone; on ``device``) against a float64 copy of it on the reference path (CPU):
    relative error (norm of the difference over the norm) per tensor. Unsorted packed lengths,
    zoneout in eval (no mask to draw: the same on both devices)."""
    import copy

    from torch.nn.utils.rnn import pack_sequence

    import fastrnn

    torch.manual_seed(1)
    D = 2 if bidirectional else 1
    lengths = [steps, 1] + [int(n) for n in torch.randint(1, steps + 1, (batch - 2,))]
    xs = [torch.randn(n, module.input_size) for n in lengths]
    lstm = isinstance(module, fastrnn.LayerNormLSTM)
    initial = [torch.randn(D, batch, module.hidden_size) for _ in range(2 if lstm else 1)]  # h0 (, c0)
    results = {}
    for path, m, device, dtype in (("triton", module, device, module.weight_hh_l0.dtype),
                                   ("reference", copy.deepcopy(module).cpu().double(), "cpu", torch.float64)):
        x = pack_sequence([v.to(device, dtype) for v in xs], enforce_sorted=False)
        state = [v.to(device, dtype, copy=True).requires_grad_() for v in initial]
        m.zero_grad()
        with fastrnn.use_backend(path):
            y, final = m(x, tuple(state) if lstm else state[0])
            final = final if lstm else (final,)
            weights = torch.linspace(-1, 1, y.data.numel(), device=device, dtype=dtype).view_as(y.data)
            ((y.data * weights).sum() + final[0].square().sum() + sum(c.sum() for c in final[1:])).backward()
        results[path] = dict(y=y.data, **dict(zip(("h_n", "c_n"), final)), **dict(zip(("dh0", "dc0"), (v.grad for v in state))),
                             **{f"d{n}": p.grad for n, p in m.named_parameters()})
    missing = [f"{path} {k}" for path, r in results.items() for k, v in r.items() if v is None]
    assert not missing, missing
    return {k: ((v.double().cpu() - results["reference"][k]).norm() / results["reference"][k].norm()).item()
            for k, v in results["triton"].items()}


@on_cuda
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize(("mode", "dtype"), [("barrier", torch.float32), ("per_step", torch.bfloat16)],
                         ids=["barrier-fp32", "per_step-bf16"])
def test_cuda_matches_float64(mode, dtype, cell, monkeypatch):
    """The persistent LayerNormLSTM / LayerNormGRU kernels on CUDA, forced: 4 programs per direction
    (H 32, 8 units each), bidirectional, zoneout in eval, ``grad_clip``, unsorted packed lengths.
    Two of the four (mode, dtype) pairs: each is two compiles on the GPU (bench/gpu_check.sh's tests
    share 120 s); the own-plan test adds bf16 in barrier mode."""
    import fastrnn
    from fastrnn.ops.recurrence import LAUNCHES

    monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
    monkeypatch.setenv("FASTRNN_PERSISTENT_SLICE", str(SLICE))
    monkeypatch.setenv("FASTRNN_PERSISTENT_MODE", mode)
    torch.manual_seed(0)
    layer = {"lstm": fastrnn.LayerNormLSTM, "gru": fastrnn.LayerNormGRU}[cell]
    module = layer(6, 32, bidirectional=True, zoneout=0.25, grad_clip=0.5).eval().to("cuda", dtype)
    before = dict(LAUNCHES)
    errors = cuda_against_float64(module, 5, 7, True)
    for way in ("fwd", "bwd"):
        key = f"layer_norm_{cell}_{way}_persistent"
        assert LAUNCHES.get(key, 0) > before.get(key, 0), (key, LAUNCHES)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert max(errors.values()) < tolerance, errors


@on_cuda
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_own_plan_matches_float64(cell):
    """The LayerNormLSTM GPU row's shape (H256 B64 bf16, a few steps; the LayerNormGRU's compile-gate
    shape is the same) on its own plan: 32 slices of 8 units x 4 batch groups on an H100/H200,
    barrier mode where the card fits it (a cooperative launch)."""
    import fastrnn
    from fastrnn.ops.recurrence import LAUNCHES

    torch.manual_seed(0)
    module = {"lstm": fastrnn.LayerNormLSTM, "gru": fastrnn.LayerNormGRU}[cell](16, 256).to("cuda", torch.bfloat16)
    before = dict(LAUNCHES)
    errors = cuda_against_float64(module, 64, 6, False)
    for way in ("fwd", "bwd"):
        key = f"layer_norm_{cell}_{way}_persistent"
        assert LAUNCHES.get(key, 0) == before.get(key, 0) + 1, (key, LAUNCHES)
    assert max(errors.values()) < 5e-2, errors


# ------------------------------------------------------------------ the persistent LayerNormGRU
#: The persistent LayerNormGRU kernels (``layer_norm_gru_{fwd,bwd}_persistent_kernel``, two exchange
#: rounds per step each way: forward the recurrent norm's moments, then ``h``; backward the norm's
#: means, then ``d_r``), against the same float64 equations: outputs, final state, every gradient
#: (their cases: ``gru-*`` of :data:`PERSISTENT_CASES`).
GRU_COUNTS = {"layer_norm_gru_fwd_persistent": 1, "layer_norm_gru_bwd_persistent": 1}


@interpreted
@pytest.mark.parametrize(("name", "dtype"), [("gru-bidir-packed-zoneout-clip-narrow-slice", torch.bfloat16),
                                             ("gru-eval-zoneout-two-groups", torch.float32)], ids=["bf16", "fp32"])
def test_gru_per_step_matches_float64_equations(persistent_case, name, dtype):
    """Bidirectional with unsorted lengths, zoneout in training and ``grad_clip`` in bf16 (the
    16-bit form: products split over ``k``, ``SPLIT_K``; tolerances as
    ``tests/test_layer_norm_kernels.py``'s bf16 cases); zoneout in eval with two batch groups in fp32."""
    from tests.test_layer_norm_kernels import TOLERANCE

    names, actual, expected, counts, _ = run_case(persistent_case(name, "per_step"), dtype)
    assert counts == GRU_COUNTS
    if dtype == torch.float32:
        check(names, actual, expected)
        return
    out_tol, grad_tol = TOLERANCE[dtype]
    for label, a, e in zip(names, actual, expected):
        assert a.dtype == dtype, label
        worst = ((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-12)).item()
        assert worst < (grad_tol if label.startswith("d ") else out_tol), (label, worst)


@interpreted
def test_gru_barrier_matches_float64_equations(persistent_case):
    name = persistent_case("gru-packed-zoneout-two-groups", "barrier")
    assert persistent.persistent_plan(3, 32, 17, 1, torch.float32).grid == (4, 2, 1)
    with harness("barrier", seed=3):
        names, actual, expected, counts, _ = run_case(name, torch.float32)
    assert counts == GRU_COUNTS
    check(names, actual, expected)


@interpreted
def test_gru_16bit_plans_the_persistent_kernels_by_itself():
    """The 16-bit LayerNormGRU plans the persistent kernels by itself from ``BLOCK_K`` 256 (H 130;
    their numbers: the cases above), and H 120 keeps the tiled ones; ``fastrnn.explain`` says so."""
    import fastrnn

    x = torch.zeros(2, 3, 4, dtype=torch.bfloat16)
    with fastrnn.use_backend("triton"):
        wide = fastrnn.explain(fastrnn.LayerNormGRU(4, 130, dtype=torch.bfloat16), x)
        narrower = fastrnn.explain(fastrnn.LayerNormGRU(4, 120, dtype=torch.bfloat16), x)
    assert "persistent: W_hh spread over the programs" in wide, wide
    assert "persistent" not in narrower and "re-read per step in tiles" in narrower, narrower


@interpreted
def test_gru_gradient_flow_record_matches_the_loop(persistent_case):
    """The persistent LayerNormGRU backward's per-program shares of ``||dL/dh_t||^2``, summed on the
    host, against the reference loop's record (3 programs, the last narrower)."""
    import fastrnn

    persistent_case("gru-bidir-packed-zoneout-clip-narrow-slice", "per_step")
    flow_record_matches_the_loop(lambda: fastrnn.LayerNormGRU(3, 20))
