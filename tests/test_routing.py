"""Which path a call takes (``fastrnn.routing``): the pure decision on synthetic devices and
tables, ``fastrnn.explain``, the dispatch table, and the bench function that fills it."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import dispatch, routing
from fastrnn.ops.recurrence import LAUNCHES

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed; it runs from the checkout
    sys.path.insert(0, str(ROOT))

from bench import dispatch_table  # noqa: E402

H200 = routing.DeviceInfo("cuda", "NVIDIA H200", "9.0")
A100 = routing.DeviceInfo("cuda", "NVIDIA A100-SXM4-80GB", "8.0")
CPU = routing.DeviceInfo("cpu")
#: A plain LSTM call: no feature only the kernels have.
PLAIN = routing.CallInfo(cell="lstm", dtype=torch.bfloat16, hidden=768, batch=16, steps=1024)


def entry(train: float, forward: float | None = None, *, gpu: routing.DeviceInfo = H200, cell: str = "lstm",
          dtype: str = "bf16", hidden: int = 768, batch: int = 16, directions: int = 1, packed: bool = False) -> dict:
    return {"gpu": gpu.name, "capability": gpu.capability, "cell": cell, "dtype": dtype, "directions": directions,
            "projection": False, "packed": packed, "h_class": routing.size_class(hidden),
            "b_class": routing.size_class(batch), "forward_ratio": train if forward is None else forward,
            "train_ratio": train, "date": "2026-12-02T10:00:00+00:00"}


def table(*entries: dict) -> dict:
    return {"schema": routing.TABLE_SCHEMA, "entries": list(entries)}


def decide(call=PLAIN, device=H200, tab=None, requested="auto", **kwargs) -> routing.Route:
    return routing.decide(device, call, table() if tab is None else tab, requested, **kwargs)


# ------------------------------------------------------------------------------ the decision
@pytest.mark.parametrize("change, named", [
    ({"grad_clip": True}, "grad_clip"),
    ({"flow": True}, "gradient-flow recording"),
    ({"cell": "rnn", "nonlinearity": "gelu"}, "nonlinearity 'gelu'"),
    ({"generation": True, "fusable": True}, "free-running generation"),
])
def test_feature_forces_kernels_even_where_measured_slower(change, named):
    call = dataclasses.replace(PLAIN, **change)
    slower = table(entry(0.1, cell=call.cell))
    route = decide(call, tab=slower)
    assert route.path == "triton"
    assert named in route.reason and "cuDNN cannot" in route.reason


def test_torch_nonlinearities_are_not_features():
    for nonlinearity in ("tanh", "relu"):
        call = dataclasses.replace(PLAIN, cell="rnn", nonlinearity=nonlinearity)
        assert decide(call).path == "cudnn"


def test_entry_faster_runs_kernels():
    route = decide(tab=table(entry(1.30, 1.20)))
    assert route.path == "triton"
    assert "1.30x cuDNN's speed forward+backward (1.20x forward)" in route.reason
    assert "NVIDIA H200 (sm_90)" in route.reason and "2026-12-02" in route.reason
    assert route.entries and route.entries[0]["train_ratio"] == 1.30


def test_entry_slower_runs_cudnn():
    route = decide(tab=table(entry(0.07)))
    assert route.path == "cudnn"
    assert "0.07x" in route.reason and "cuDNN is faster" in route.reason


@pytest.mark.parametrize("ratio, path", [(1.0, "cudnn"), (1.03, "cudnn"), (1.0499, "cudnn"), (1.05, "triton")])
def test_entry_within_noise_runs_cudnn(ratio, path):
    route = decide(tab=table(entry(ratio)))
    assert route.path == path
    if path == "cudnn":
        assert "noise" in route.reason and f"{routing.MIN_SPEEDUP}x" in route.reason


def test_no_entry_runs_cudnn_and_says_how_to_force():
    other = table(entry(2.0, cell="gru"), entry(2.0, dtype="fp16"), entry(2.0, directions=2), entry(2.0, packed=True))
    route = decide(tab=other)
    assert route.path == "cudnn"
    assert route.reason == ("no measured entry for NVIDIA H200 (sm_90), LSTM bf16 H768 B16; "
                            "set FASTRNN_BACKEND=triton to force the kernels")


def test_unknown_gpu_runs_cudnn():
    route = decide(device=A100, tab=table(entry(2.0)))  # measured on the H200 only
    assert route.path == "cudnn"
    assert route.reason.startswith("no measured entry for NVIDIA A100-SXM4-80GB (sm_80), LSTM bf16 H768 B16 (the "
                                   "dispatch table holds no measurement on this GPU)")
    other_capability = dataclasses.replace(H200, capability="9.1")
    assert decide(device=other_capability, tab=table(entry(2.0))).path == "cudnn"


def test_inference_needs_the_forward_ratio_too():
    faster_training_only = table(entry(1.3, forward=0.9))
    assert decide(tab=faster_training_only).path == "triton"
    no_grad = dataclasses.replace(PLAIN, needs_grad=False)
    route = decide(no_grad, tab=faster_training_only)
    assert route.path == "cudnn" and "cuDNN is faster" in route.reason


def test_cudnn_switched_off_names_the_native_path():
    device = dataclasses.replace(H200, cudnn=False)
    assert decide(device=device).path == "native"
    assert decide(device=device, tab=table(entry(2.0))).path == "triton"


@pytest.mark.parametrize("device", [H200, CPU], ids=["cuda", "cpu"])
@pytest.mark.parametrize("call", [PLAIN, dataclasses.replace(PLAIN, grad_clip=True),
                                  dataclasses.replace(PLAIN, dtype=torch.float64)], ids=["plain", "clip", "fp64"])
def test_forced_reference(device, call):
    route = decide(call, device=device, tab=table(entry(5.0)), requested="reference")
    assert route.path == "reference" and "FASTRNN_BACKEND=reference" in route.reason


def test_forced_triton():
    assert decide(tab=table(entry(0.01)), requested="triton").path == "triton"
    interpreted = dataclasses.replace(CPU, interpreting=True)
    route = decide(device=interpreted, requested="triton")
    assert route.path == "triton" and "interpreter" in route.reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        decide(device=CPU, requested="triton")
    with pytest.raises(RuntimeError, match="not installed"):
        decide(device=dataclasses.replace(H200, triton=False), requested="triton")
    with pytest.raises(TypeError, match="float64"):
        decide(dataclasses.replace(PLAIN, dtype=torch.float64), requested="triton")
    with pytest.raises(ValueError, match="unknown fastrnn backend"):
        decide(requested="cuda")


def test_float64_on_cuda_takes_an_exact_path():
    fp64 = dataclasses.replace(PLAIN, dtype=torch.float64)
    route = decide(fp64, tab=table(entry(5.0, dtype="fp64")))
    assert route.path == "cudnn" and "not fp64" in route.reason
    clipped = decide(dataclasses.replace(fp64, grad_clip=True))
    assert clipped.path == "reference" and "grad_clip" in clipped.reason


def test_without_triton_cuda_takes_cudnn_or_the_loop():
    device = dataclasses.replace(H200, triton=False)
    assert decide(device=device, tab=table(entry(5.0))).path == "cudnn"
    assert decide(dataclasses.replace(PLAIN, flow=True), device=device).path == "reference"


def test_autocast_dtype_is_the_compute_dtype():
    fp32 = dataclasses.replace(PLAIN, dtype=torch.float32)
    tab = table(entry(0.5, dtype="fp32"), entry(1.4, dtype="bf16"))
    assert decide(fp32, tab=tab).path == "cudnn"
    route = decide(fp32, tab=tab, autocast=torch.bfloat16)
    assert route.path == "triton" and "LSTM bf16" in route.reason
    # float64 under autocast computes in the autocast dtype, which the kernels take.
    fp64_clip = dataclasses.replace(PLAIN, dtype=torch.float64, grad_clip=True)
    assert decide(fp64_clip).path == "reference"
    assert decide(fp64_clip, autocast=torch.float16).path == "triton"


def test_compiling():
    assert decide(device=CPU, compiling=True).path == "native-bptt"
    route = decide(compiling=True)
    assert route.path == "triton" and "torch.compile" in route.reason
    assert decide(dataclasses.replace(PLAIN, dtype=torch.float64), compiling=True).path == "reference"


def test_cpu():
    route = decide(device=CPU, tab=table(entry(5.0)))
    assert route.path == "native" and "what torch.nn runs" in route.reason
    assert decide(dataclasses.replace(PLAIN, grad_clip=True), device=CPU).path == "native-bptt"
    assert decide(device=routing.DeviceInfo("mps")).path == "native"


def test_generation_outside_the_fused_shapes_runs_the_loop():
    unfusable = dataclasses.replace(PLAIN, generation=True, fusable=False)
    assert decide(unfusable).path == "reference"
    assert decide(unfusable, requested="triton").path == "reference"
    assert decide(dataclasses.replace(unfusable, fusable=True), device=CPU).path == "reference"


# --------------------------------------------------------------------- sizes between classes
@pytest.mark.parametrize("n, expected", [(1, 1), (2, 2), (3, 4), (16, 16), (17, 32), (768, 1024), (1024, 1024)])
def test_size_class(n, expected):
    assert routing.size_class(n) == expected


def test_size_in_a_measured_class_uses_that_class():
    measured_at_1024 = table(entry(1.5, hidden=1024))
    assert decide(tab=measured_at_1024).path == "triton"  # H768 is in the 1024 class


@pytest.mark.parametrize("low, high, path", [(1.5, 0.9, "cudnn"), (0.9, 1.5, "cudnn"), (1.5, 1.2, "triton")])
def test_size_between_classes_takes_the_slower_neighbour(low, high, path):
    call = dataclasses.replace(PLAIN, hidden=512)  # class 512: measured at 256 and 1024 only
    tab = table(entry(low, hidden=256), entry(high, hidden=1024), entry(0.01, hidden=4096))
    route = decide(call, tab=tab)
    assert route.path == path
    assert "between measured classes H256/B16 and H1024/B16" in route.reason
    assert f"{min(low, high):.2f}x" in route.reason


def test_batch_between_classes_and_outside_the_measured_range():
    tab = table(entry(1.5, batch=8), entry(1.6, batch=64))
    assert decide(dataclasses.replace(PLAIN, batch=20), tab=tab).path == "triton"
    assert decide(dataclasses.replace(PLAIN, batch=256), tab=tab).path == "cudnn"  # above the largest
    assert decide(dataclasses.replace(PLAIN, hidden=2048, batch=20), tab=tab).path == "cudnn"  # no H match


# ------------------------------------------------------------------------------------- explain
LAYERS = {
    "lstm": lambda **kw: fastrnn.LSTM(3, 8, **kw),
    "gru": lambda **kw: fastrnn.GRU(3, 8, **kw),
    "rnn": lambda **kw: fastrnn.RNN(3, 8, **kw),
}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("FASTRNN_BACKEND", raising=False)
    return monkeypatch


@pytest.fixture
def on_h200(clean_env):
    """CPU tensors that routing takes for tensors on an H200 (nothing runs on a GPU)."""
    clean_env.setattr(routing, "describe_device", lambda device: H200)
    return clean_env


@pytest.mark.parametrize("name", list(LAYERS))
def test_explain_cpu_tensors(clean_env, name):
    x = torch.randn(5, 2, 3)
    assert fastrnn.explain(LAYERS[name](), x).startswith("native: CPU tensor")
    assert fastrnn.explain(LAYERS[name](), x[:, 0]).startswith("native")  # unbatched
    assert fastrnn.explain(LAYERS[name](grad_clip=1.0), x).startswith("native-bptt: grad_clip on the CPU")
    with fastrnn.record_gradient_flow():
        assert fastrnn.explain(LAYERS[name](), x).startswith("native-bptt: gradient-flow recording")
    with torch.no_grad(), fastrnn.record_gradient_flow():
        assert fastrnn.explain(LAYERS[name](), x).startswith("native")  # nothing to record without autograd
    clean_env.setattr(torch.compiler, "is_compiling", lambda: True)
    assert fastrnn.explain(LAYERS[name](), x).startswith("native-bptt: torch.compile")


@pytest.mark.parametrize("name", list(LAYERS))
def test_explain_with_the_shipped_table_on_a_cuda_device(on_h200, name):
    """The shipped table has no measurement for these calls: cuDNN, unless only the kernels can."""
    layer = LAYERS[name]()
    call = routing.stack_call(layer, name, "tanh" if name == "rnn" else None, torch.zeros(5, 2, 3), None)
    assert routing.lookup(routing.shipped_table(), H200, call, torch.float32)[0] == [], "the table measured this call"
    x = torch.randn(5, 2, 3)
    answer = fastrnn.explain(layer, x)
    assert answer.startswith(f"cudnn: no measured entry for NVIDIA H200 (sm_90), {name.upper()} fp32 H8 B2")
    assert answer.endswith("; set FASTRNN_BACKEND=triton to force the kernels")
    assert fastrnn.explain(LAYERS[name](grad_clip=0.5), x).startswith("triton: grad_clip: cuDNN cannot")


def test_explain_reads_the_backend_and_the_table(on_h200):
    layer, x = fastrnn.LSTM(3, 8), torch.randn(5, 2, 3)
    with fastrnn.use_backend("reference"):
        assert fastrnn.explain(layer, x).startswith("reference: FASTRNN_BACKEND=reference")
    on_h200.setenv("FASTRNN_BACKEND", "triton")
    assert fastrnn.explain(layer, x).startswith("triton: FASTRNN_BACKEND=triton forces")
    on_h200.delenv("FASTRNN_BACKEND")
    on_h200.setattr(routing, "shipped_table", lambda: table(entry(1.2, dtype="fp32", hidden=8, batch=2)))
    assert fastrnn.explain(layer, x).startswith("triton: the kernels measured 1.20x")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastrnn.explain(layer, x).startswith("cudnn: no measured entry for NVIDIA H200 (sm_90), LSTM bf16")


def test_explain_packed_input(on_h200):
    layer = fastrnn.GRU(3, 8, bidirectional=True)
    packed = pack_padded_sequence(torch.randn(6, 4, 3), torch.tensor([6, 5, 2, 1]), enforce_sorted=False)
    assert fastrnn.explain(layer, packed).startswith("cudnn: no measured entry for NVIDIA H200 (sm_90), GRU bidir "
                                                     "packed fp32 H8 B4")


def test_explain_topologies_and_cells(clean_env):
    x = torch.randn(2, 5, 4)
    assert fastrnn.explain(fastrnn.ManyToOne(4, 8, 2), x).startswith("native")
    assert fastrnn.explain(fastrnn.ManyToMany(4, 8, 2, grad_clip=1.0), x).startswith("native-bptt: grad_clip")
    assert fastrnn.explain(fastrnn.OneToOne(4, 8, 2), x[:, 0]).startswith("native")
    assert fastrnn.explain(fastrnn.OneToMany(4, 8, 4), x[:, 0]).startswith("reference: free-running generation")
    assert fastrnn.explain(fastrnn.OneToMany(4, 8, 2, feedback=False), x[:, 0]).startswith("native")
    assert fastrnn.explain(fastrnn.Seq2Seq(4, 8, 4), x).startswith("native: the encoder: CPU tensor")
    assert fastrnn.explain(fastrnn.LSTMCell(4, 8), x[:, 0]).startswith("reference: a cell is one step")
    with pytest.raises(TypeError, match="expected a fastrnn layer"):
        fastrnn.explain(torch.nn.LSTM(4, 8), x)
    with pytest.raises(TypeError, match="Tensor or a PackedSequence"):
        fastrnn.explain(fastrnn.LSTM(4, 8), [x])


def test_explain_generation_on_a_cuda_device(on_h200):
    x0 = torch.randn(2, 4)
    assert fastrnn.explain(fastrnn.OneToMany(4, 8, 4, cell="gru"), x0).startswith("triton: free-running generation")
    two_layers = fastrnn.OneToMany(4, 8, 4, num_layers=2)
    assert fastrnn.explain(two_layers, x0).startswith("reference: free-running generation outside")
    too_wide = fastrnn.OneToMany(4, 512, 4, cell="lstm")
    assert "on-chip limits" in fastrnn.explain(too_wide, x0)


def test_explain_forced_triton_raises_what_the_call_raises(clean_env):
    clean_env.delenv("TRITON_INTERPRET", raising=False)
    with fastrnn.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fastrnn.explain(fastrnn.LSTM(3, 8), torch.randn(5, 2, 3))


# ------------------------------------------------------------- dispatch follows the decision
def test_dispatch_runs_what_the_table_says(on_h200):
    """On a (described) H200: no entry runs torch's native op; a faster entry runs the kernels
    (here through Triton's interpreter on CPU tensors)."""
    on_h200.setenv("TRITON_INTERPRET", "1")
    calls = []
    native = dispatch._native_stack
    on_h200.setattr(dispatch, "_native_stack", lambda *a, **k: calls.append("native") or native(*a, **k))
    torch.manual_seed(0)
    layer, x = fastrnn.LSTM(3, 16), torch.randn(4, 2, 3)
    expected, _ = layer(x)
    assert calls == ["native"]

    on_h200.setattr(routing, "shipped_table", lambda: table(entry(1.5, dtype="fp32", hidden=16, batch=2)))
    before = sum(LAUNCHES.values())
    y, _ = layer(x)
    assert calls == ["native"] and sum(LAUNCHES.values()) == before + 1  # one forward launch
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ the table
def test_shipped_table_is_valid_package_data():
    shipped = routing.shipped_table()
    assert shipped["schema"] == routing.TABLE_SCHEMA and isinstance(shipped["entries"], list)
    assert json.loads(routing.TABLE_PATH.read_text()) == shipped
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert routing.TABLE_FILE in pyproject["tool"]["setuptools"]["package-data"]["fastrnn"]


def test_table_validation():
    with pytest.raises(ValueError, match="schema"):
        routing.validate_table({"entries": []})
    broken = entry(1.0)
    del broken["train_ratio"]
    with pytest.raises(ValueError, match="train_ratio"):
        routing.validate_table(table(broken))


def test_merge_replaces_the_same_key_and_keeps_the_rest():
    old = table(entry(0.5), entry(0.8, cell="gru"))
    merged = routing.merge_entries(old, [entry(1.7), entry(0.3, hidden=64)])
    ratios = {(e["cell"], e["h_class"]): e["train_ratio"] for e in merged["entries"]}
    assert ratios == {("lstm", 1024): 1.7, ("gru", 1024): 0.8, ("lstm", 64): 0.3}
    assert old["entries"][0]["train_ratio"] == 0.5  # the input is left alone


# ------------------------------------------------------------------- bench results -> entries
ENVIRONMENT = {"device_type": "cuda", "card": "NVIDIA H200", "compute_capability": "9.0",
               "date_utc": "2026-12-02T10:00:00+00:00", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
               "cudnn": 91000, "driver": "580.1", "git": {"commit": "abc", "dirty": False}, "tf32": {}}


def row(name="L1", cell="lstm", batch=16, hidden=768, dtype="bfloat16", kernel=(10.0, 30.0), cudnn=(2.0, 6.0),
        status="ok", backend="triton", bidirectional=False, packed=False, train_error=False) -> dict:
    short = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[dtype]
    kernels = {"backend": backend, "forward": {"median_ms": kernel[0]}, "train": {"median_ms": kernel[1]}}
    if train_error:
        kernels["train"] = {"error": "OutOfResources"}
    variants = {"fastrnn": kernels, f"torch_{short}": {"forward": {"median_ms": cudnn[0]}, "train": {"median_ms": cudnn[1]}}}
    if short == "bf16":  # a faster fp16 anchor must not stand in for the bf16 comparison
        variants["torch_fp16"] = {"forward": {"median_ms": 0.1}, "train": {"median_ms": 0.1}}
    config = {"name": name, "cell": cell, "batch": batch, "steps": 1024, "hidden": hidden, "input_size": hidden,
              "layers": 1, "bidirectional": bidirectional, "dtype": dtype, "packed": packed, "nonlinearity": "tanh"}
    return {"name": name, "description": "synthetic", "config": config, "status": status, "variants": variants}


def results(rows, sweep=(), device_type="cuda") -> dict:
    return {"environment": {**ENVIRONMENT, "device_type": device_type}, "rows": list(rows),
            "sweep": {"rows": list(sweep)}}


def test_entries_from_results():
    data = results([row(), row("G1", cell="gru", hidden=512, batch=64, kernel=(1.0, 2.0), cudnn=(1.5, 2.4)),
                    row("X1", status="failed"), row("X2", backend="auto"), row("X3", train_error=True, hidden=64),
                    row("P1", packed=True, bidirectional=True, dtype="float32", hidden=256, batch=64)])
    entries = {e["measured"]["row"]: e for e in dispatch_table.entries_from_results(data)}
    assert sorted(entries) == ["G1", "L1", "P1"]
    l1 = entries["L1"]
    assert (l1["gpu"], l1["capability"], l1["cell"], l1["dtype"], l1["h_class"], l1["b_class"]) == \
        ("NVIDIA H200", "9.0", "lstm", "bf16", 1024, 16)
    assert (l1["forward_ratio"], l1["train_ratio"]) == (0.2, 0.2)  # against torch_bf16, not the fp16 anchor
    assert l1["versions"]["torch"] == "2.11.0" and l1["date"].startswith("2026-12-02")
    assert (entries["G1"]["forward_ratio"], entries["G1"]["train_ratio"]) == (1.5, 1.2)
    p1 = entries["P1"]
    assert (p1["packed"], p1["directions"], p1["dtype"]) == (True, 2, "fp32")
    routing.validate_table(table(*entries.values()))


def test_entries_keep_the_slower_of_one_key_and_read_the_sweep():
    data = results([row("L2", batch=64, hidden=256, kernel=(1.0, 1.0), cudnn=(1.5, 1.5))],
                   sweep=[row("S64", batch=64, hidden=256, kernel=(1.0, 1.0), cudnn=(1.2, 1.1)),
                          row("S8", batch=8, hidden=256)])
    entries = dispatch_table.entries_from_results(data)
    assert sorted((e["measured"]["row"], e["train_ratio"]) for e in entries) == [("S64", 1.1), ("S8", 0.2)]


def test_no_entries_from_a_cpu_run():
    assert dispatch_table.entries_from_results(results([row()], device_type="cpu")) == []


def test_update_table_round_trip(tmp_path):
    path = tmp_path / "dispatch_table.json"
    path.write_text(json.dumps(table(entry(0.5, cell="gru"))))
    fast = results([row(kernel=(1.0, 2.0), cudnn=(1.3, 2.6))])
    data_path = tmp_path / "results.json"
    data_path.write_text(json.dumps(fast))
    assert dispatch_table.main([str(data_path), "--write", "--table", str(path)]) == 0
    written = json.loads(path.read_text())
    assert sorted(e["cell"] for e in written["entries"]) == ["gru", "lstm"]
    assert decide(tab=written).path == "triton"  # the LSTM bf16 H768 B16 call now measured 1.3x

    dispatch_table.update_table(dispatch_table.entries_from_results(results([row()])), path)
    assert decide(tab=json.loads(path.read_text())).path == "cudnn"  # a new run replaces the old entry
