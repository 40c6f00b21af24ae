"""The persistent strategy (``fastrnn.ops.persistent``, Elman RNN and GRU kernels) against the reference.

* Parity (outputs, final states, gradients of the input, the initial state and every parameter)
  with unsorted packed lengths, both directions and two layers, in fp32 (1e-4) and fp16/bf16
  (against float64), in ``barrier`` mode under the concurrent-program harness
  (``tests/concurrent_grid.py``, 4 programs per direction via ``FASTRNN_PERSISTENT_SLICE``) and
  in ``per_step`` mode on the stock interpreter.
* Every Elman nonlinearity, grad_clip and the gradient-flow record, per_step mode.
* Mutation checks: the kernels compiled with a broken barrier (``fastrnn.kernels.sync`` faults)
  must fail under the harness; a program that never arrives ends in the launcher's RuntimeError.
* The knobs and the plan: every GPU-matrix row of a cell with persistent kernels plans to it.
* Memory ordering, which the harness cannot see, in the sm_90 PTX of the real kernels.

Under CUDA the same parity tests run the compiled kernels (barrier mode: cooperative launches).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import fastrnn
from fastrnn.backend import triton_interpreting
from fastrnn.kernels import sync
from fastrnn.ops import persistent
from fastrnn.ops.recurrence import LAUNCHES, plan

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (ON_CUDA or triton_interpreting()), reason="needs CUDA or TRITON_INTERPRET=1")

if not ON_CUDA:
    from concurrent_grid import concurrent_grid, first_run_caught, unsupported_reason

H, SLICE, B, T, INPUT = 32, 8, 3, 5, 6  # 4 programs per direction
CELLS = {"rnn": (fastrnn.RNN, 1), "gru": (fastrnn.GRU, 3)}
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}


#: The mutation checks' harness setting: every store delayed by up to 5 ms (chaos 1.0,
#: ``jitter_s``), and up to FAULT_RUNS runs (the loop stops at the first catch, so a caught fault
#: costs about one run). Measured per run, 20 runs each, on this 2-core machine under load (about
#: 1-2.5 s a run): a missing wait and an off-by-one target are caught in 20 of 20 runs for both
#: cells at this setting and at chaos 0.5 / 1 ms; an early arrive in 18 of 20 (RNN) and 20 of 20
#: (GRU) here, against 17 and 13 of 20 at chaos 0.5 / 1 ms. At the worst rate, 18 of 20, the one-
#: sided 95% lower bound of the per-run rate is 0.72: 20 runs all miss with a probability of at
#: most 1e-11 (1e-20 at the measured 0.9). The correct kernels pass at this setting (5 of 5 runs).
FAULT_CHAOS, FAULT_JITTER_S, FAULT_RUNS = 1.0, 5e-3, 20


def harness(mode, chaos=0.05, seed=0):
    """The launch context of a mode: on CPU, barrier mode needs the thread-per-program harness."""
    import contextlib

    if mode == "barrier" and not ON_CUDA:
        reason = unsupported_reason()
        if reason:
            pytest.skip(reason)
        return concurrent_grid(timeout_s=120, chaos=chaos, seed=seed)
    return contextlib.nullcontext()


@pytest.fixture
def persistent_env(monkeypatch):
    """Force the persistent strategy at ``SLICE`` units per program; returns a mode setter."""
    monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
    monkeypatch.setenv("FASTRNN_PERSISTENT_SLICE", str(SLICE))
    return lambda mode: monkeypatch.setenv("FASTRNN_PERSISTENT_MODE", mode)


def make(cell, dtype, layers=2, bidirectional=True, nonlinearity="tanh", grad_clip=None, seed=0, batch=B):
    torch.manual_seed(seed)
    cls, _ = CELLS[cell]
    kwargs = dict(nonlinearity=nonlinearity) if cell == "rnn" else {}
    module = cls(INPUT, H, layers, bidirectional=bidirectional, grad_clip=grad_clip, device=DEVICE, dtype=dtype, **kwargs)
    directions = 2 if bidirectional else 1
    h0 = torch.randn(layers * directions, batch, H, device=DEVICE, dtype=dtype)
    lengths = torch.tensor([3, T, 1] * (batch // 3) + [2] * (batch % 3))  # unsorted, one full length
    x = pack_sequence([torch.randn(int(n), INPUT, device=DEVICE, dtype=dtype) for n in lengths], enforce_sorted=False)
    return module, x, h0


def run(module, x, h0, backend, record_flow=False):
    """Forward + backward of a loss weighing every output and state element: outputs, states,
    gradients of h0 and of every parameter (and the flow norms with ``record_flow``)."""
    import contextlib

    module.zero_grad()
    h0 = h0.detach().requires_grad_(True)
    flow_ctx = fastrnn.record_gradient_flow() if record_flow else contextlib.nullcontext()
    with fastrnn.use_backend(backend), flow_ctx as flow:
        y, h_n = module(x, h0)
        weights = torch.linspace(-1, 1, y.data.numel(), dtype=y.data.dtype, device=y.data.device).view_as(y.data)
        ((y.data * weights).sum() + h_n.square().sum()).backward()
    result = {"y": y.data, "h_n": h_n, "dh0": h0.grad}
    result.update({f"d{name}": p.grad for name, p in module.named_parameters()})
    if record_flow:
        result["flow"] = flow.norms()
    return result


def packed_as(x, dtype):
    return PackedSequence(x.data.to(dtype), x.batch_sizes, x.sorted_indices, x.unsorted_indices)


def assert_matches(got, want, rtol):
    for name in want:
        g, w = got[name].double(), want[name].double()
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten output?)"
        err = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert err < rtol, f"{name}: relative error {err:.2e} >= {rtol:.0e}"


# ---------------------------------------------------------------------------------- parity
#: fp32 in both modes; each 16-bit dtype in one (the same kernels, only the element type differs),
#: so the suite stays within its 10 minutes on Triton 3.6's slower interpreter.
MODE_DTYPES = [("barrier", torch.float32), ("per_step", torch.float32), ("per_step", torch.float16), ("barrier", torch.bfloat16)]


@pytest.mark.parametrize(("mode", "dtype"), MODE_DTYPES, ids=["barrier-fp32", "per_step-fp32", "per_step-fp16", "barrier-bf16"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_reference(cell, mode, dtype, persistent_env):
    """Two bidirectional layers, unsorted packed lengths; 16-bit against the float64 reference."""
    persistent_env(mode)
    module, x, h0 = make(cell, dtype)
    LAUNCHES.clear()
    with harness(mode, seed=list(TOLERANCE).index(dtype)):
        got = run(module, x, h0, "triton")
    assert LAUNCHES == {f"{cell}_fwd_persistent": 2, f"{cell}_bwd_persistent": 2}
    if dtype == torch.float32:
        want = run(module, x, h0, "reference")
    else:
        want = run(module.double(), packed_as(x, torch.float64), h0.double(), "reference")
    assert_matches(got, want, TOLERANCE[dtype])


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "sigmoid", "hardtanh", "silu", "gelu"])
def test_every_elman_nonlinearity_per_step(nonlinearity, persistent_env):
    persistent_env("per_step")
    module, x, h0 = make("rnn", torch.float32, layers=1, nonlinearity=nonlinearity, seed=1)
    assert_matches(run(module, x, h0, "triton"), run(module, x, h0, "reference"), 1e-4)


@pytest.mark.parametrize("mode", ["barrier", "per_step"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_grad_clip_and_flow_record(cell, mode, persistent_env):
    """The clip binds (gradients differ without it) and the flow norms match the reference's."""
    persistent_env(mode)
    module, x, h0 = make(cell, torch.float32, layers=1, grad_clip=0.02, seed=2)
    with harness(mode, seed=7):
        got = run(module, x, h0, "triton", record_flow=True)
    assert_matches(got, run(module, x, h0, "reference", record_flow=True), 1e-4)
    module.grad_clip = None
    unclipped = run(module, x, h0, "reference")
    assert not torch.allclose(unclipped["dweight_hh_l0"], got["dweight_hh_l0"]), "the clip must bind in this test"


@pytest.mark.parametrize("cell", list(CELLS))
def test_two_batch_groups_in_barrier_mode(cell, persistent_env):
    """20 rows: two batch groups of 16, each with its own flags, synchronised independently."""
    persistent_env("barrier")
    module, x, h0 = make(cell, torch.float32, layers=1, seed=5, batch=20)
    assert persistent.persistent_plan(CELLS[cell][1], H, 20, 2, torch.float32).grid == (4, 2, 2)
    with harness("barrier", seed=11):
        got = run(module, x, h0, "triton")
    assert_matches(got, run(module, x, h0, "reference"), 1e-4)


# ---------------------------------------------------------------------------------- mutations
needs_harness = pytest.mark.skipif(ON_CUDA, reason="mutation checks run under the CPU harness")


@needs_harness
@pytest.mark.parametrize("fault", [sync.FAULT_NO_WAIT, sync.FAULT_ARRIVE_EARLY, sync.FAULT_OFF_BY_ONE],
                         ids=["no-wait", "arrive-early", "off-by-one"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_broken_barrier_is_caught(cell, fault, persistent_env, monkeypatch):
    """The real kernels compiled with a broken barrier give wrong numbers (or a flagged wait)
    under the harness in at least one of up to FAULT_RUNS runs; the correct kernels never do."""
    persistent_env("barrier")
    module, x, h0 = make(cell, torch.float32, layers=1, bidirectional=False, seed=3)
    want = run(module, x, h0, "reference")
    monkeypatch.setattr(persistent, "FAULT", int(fault))
    if unsupported_reason():
        pytest.skip(unsupported_reason())
    caught = first_run_caught(lambda: run(module, x, h0, "triton"), lambda got: assert_matches(got, want, 1e-4),
                              FAULT_RUNS, FAULT_CHAOS, FAULT_JITTER_S)
    assert caught, f"fault {int(fault)} went unnoticed in {FAULT_RUNS} runs"


@needs_harness
@pytest.mark.parametrize("cell", list(CELLS))
def test_never_arriving_program_raises(cell, persistent_env, monkeypatch):
    persistent_env("barrier")
    module, x, h0 = make(cell, torch.float32, layers=1, bidirectional=True, seed=4)
    monkeypatch.setattr(persistent, "FAULT", int(sync.FAULT_NEVER_ARRIVE))
    monkeypatch.setitem(persistent.MAX_SPINS, "interpreter", 300)
    with harness("barrier"), pytest.raises(RuntimeError, match=rf"{cell}_fwd_persistent_kernel.*grid \(4, 1, 2\)"):
        run(module, x, h0, "triton")


@needs_harness
def test_stock_interpreter_cannot_run_barrier_mode(persistent_env, monkeypatch):
    """Without the harness programs run one by one: the first wait runs out, the launch raises."""
    persistent_env("barrier")
    monkeypatch.setitem(persistent.MAX_SPINS, "interpreter", 50)
    module, x, h0 = make("rnn", torch.float32, layers=1, bidirectional=False)
    with pytest.raises(RuntimeError, match="rnn_fwd_persistent_kernel"):
        run(module, x, h0, "triton")


# ---------------------------------------------------------------------------------- knobs, plan
def test_knobs_reject_bad_values(monkeypatch):
    module, x, h0 = make("rnn", torch.float32, layers=1)
    for env, value, match in [("FASTRNN_STRATEGY", "fast", "FASTRNN_STRATEGY"),
                              ("FASTRNN_PERSISTENT_SLICE", "3", "power of two"),
                              ("FASTRNN_PERSISTENT_MODE", "sometimes", "FASTRNN_PERSISTENT_MODE")]:
        with monkeypatch.context() as m:
            m.setenv("FASTRNN_STRATEGY", "persistent")
            m.setenv(env, value)
            with pytest.raises(ValueError, match=match), fastrnn.use_backend("triton"):
                module(x, h0)


def test_forcing_a_strategy_that_cannot_serve_raises(monkeypatch):
    monkeypatch.setenv("FASTRNN_STRATEGY", "resident")
    with pytest.raises(ValueError, match="resident"):
        plan(1, 1024, torch.bfloat16)
    missing = [g for g in (1, 3, 4) if g not in persistent.CELL_GATES]
    if missing:
        monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
        with pytest.raises(ValueError, match="persistent"):
            plan(missing[0], 512, torch.bfloat16)


def test_every_gpu_matrix_row_plans_persistent():
    """Rows of cells with persistent kernels plan to them; every row's partition fits one program
    per SM of an H100/H200 and fills at least 64 of them from H 512 up."""
    root = str(pathlib.Path(__file__).resolve().parents[1])
    if root not in sys.path:  # bench/ is not installed; it runs from the checkout
        sys.path.insert(0, root)
    from bench.matrix import GATES, GPU_MATRIX

    for row in GPU_MATRIX:
        gates = GATES[row.cell]
        if persistent.planned(gates, row.torch_dtype, row.hidden):
            assert plan(gates, row.hidden, row.torch_dtype).strategy == "persistent", row.name
        elif gates in persistent.CELL_GATES:  # split-tf32 fp32 LSTM (NOT_PLANNED), or past MAX_PLANNED_BLOCK_K: tiled
            assert plan(gates, row.hidden, row.torch_dtype).strategy == "tiled", row.name
        p = persistent.persistent_plan(gates, row.hidden, row.batch, row.directions, row.torch_dtype)
        assert p.programs <= persistent.DEFAULT_SM_COUNT, (row.name, p)
        assert p.slices * p.slice >= row.hidden and p.batch_groups * p.group_rows >= row.batch, (row.name, p)
        if row.hidden >= 512:
            assert p.programs >= 64, (row.name, p)


def test_large_lstm_rows_plan_split_reductions_and_walked_groups():
    """L1 (LSTM B16 H768 bf16): 96 programs of 8 units, ``h`` held as 512 + 256 units; L4 (B256
    H1024): 64 slices of 16 units x 2 groups of 128 rows, each walked as 8 sub-tiles of 16, the
    weight slice within :data:`MAX_SLICE_WEIGHT_BYTES`. Both persistent by the plan."""
    l1 = persistent.persistent_plan(4, 768, 16, 1, torch.bfloat16)
    assert (l1.slice, l1.slices, l1.batch_groups, l1.group_tiles, l1.programs) == (8, 96, 1, 1, 96)
    assert persistent.reduction_split(768, l1.weight_rows) == (512, 256)
    l4 = persistent.persistent_plan(4, 1024, 256, 1, torch.bfloat16)
    assert (l4.slice, l4.slices, l4.batch_groups, l4.group_tiles, l4.group_rows, l4.programs) == (16, 64, 2, 8, 128, 128)
    assert persistent.reduction_split(1024, l4.weight_rows) == (1024, 0)
    assert l4.weight_rows * 1024 * 2 <= persistent.MAX_SLICE_WEIGHT_BYTES
    assert "GROUP_TILES" in l4.constexprs() and "GROUP_TILES" not in persistent.persistent_plan(3, 1024, 256, 1, torch.bfloat16).constexprs()
    for hidden in (768, 1024):
        assert plan(4, hidden, torch.bfloat16).strategy == "persistent"


def test_slice_knob_sets_programs_per_direction(monkeypatch):
    monkeypatch.setenv("FASTRNN_PERSISTENT_SLICE", "8")
    p = persistent.persistent_plan(3, 64, 100, 2, torch.float32)
    assert (p.slice, p.slices, p.block_b, p.batch_groups, p.directions) == (8, 8, 16, 7, 2)
    assert p.grid == (8, 7, 2)


# ---------------------------------------------------------------------------------- PTX
PTX_SCRIPT = r"""
import json, re, sys
from fastrnn.ops import aot
out = {}
# The persistent launches as the launcher makes them (fastrnn.ops.aot captures them): barrier mode
# (forced: on a CPU the launcher runs per step) and per step.
# (The first bf16 persistent size class of each cell, whatever sizes the plan gives it.)
names = [n for n in aot.workloads() if re.fullmatch(r"(rnn|gru|lstm)-bf16-persistent(\d+-\d+w)?(-barrier)?-plain", n)]
first = {}
for n in names:
    first.setdefault((n.split("-")[0], "-barrier-" in n), n)
for name in first.values():
    for _, launch in aot.capture((90,), [name]):
        barrier = bool(launch.constants[(list(launch.signature).index("BARRIER"),)])
        key = f"{launch.name}-{barrier}"
        if key in out:
            continue
        ptx = aot.compile_binary(launch).asm["ptx"]
        ops = [line.strip() for line in ptx.splitlines() if re.search(r"\b(atom|red|ld|fence)\.", line)]
        out[key] = [o for o in ops if re.search(r"acquire|release|volatile|acq_rel", o)]
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def ordering_ops():
    """The ordering-relevant PTX instructions of each persistent kernel (bf16, sm_90), compiled
    in a subprocess without the interpreter, with the barrier in and compiled out."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", PTX_SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("kernel", ["rnn_fwd", "rnn_bwd", "gru_fwd", "gru_bwd", "lstm_fwd", "lstm_bwd"])
def test_ptx_orders_the_exchange(ordering_ops, kernel):
    """Barrier in: acquire reads in the wait (``ld.acquire`` / ``atom.acquire`` or an acquire
    fence), a release atomic at the arrive, no volatile spin. Barrier out (per_step): none."""
    ops = ordering_ops[f"{kernel}_persistent_kernel-True"]
    assert any(".acquire" in op and ("atom." in op or "ld." in op or "fence." in op) for op in ops), ops
    assert any(".release" in op and ("atom." in op or "red." in op) for op in ops), ops
    assert not any("volatile" in op for op in ops), ops
    per_step = ordering_ops[f"{kernel}_persistent_kernel-False"]
    assert not any(".acquire" in op or ".release" in op for op in per_step), per_step
