"""The topology section of ``python -m bench``: the five modules of :mod:`fastrnn.topologies`
against their ``torch.nn`` twins (:mod:`bench.tasks`), timed per training step and trained.

* **Timing**: one training step (forward, backward, Adam step) of the fastrnn module and of the
  ``torch.nn`` construction holding the same weights, on the task's batches (three rotating,
  drawn before timing). Before timing, the two are checked against each other: the loss and every
  parameter gradient of one step from the same weights (relative error, bound 1e-4). CPU: the
  two alternate round by round and the speedup is the median of per-round ratios (as in the
  matrix); CUDA: ``triton.testing.do_bench`` each.
  ``Seq2Seq.generate`` is timed besides ``Seq2Seq``: training through the free-running decoder
  (each output fed back), which the ``torch.nn`` side runs as a loop of ``torch.nn`` cells.
* **Training**: each module and its twin, from the same weights, learn the task with Adam on the
  same seeded batches; the per-step training loss of both and a held-out loss before and after
  go into the JSON (the report draws one loss-curve plot per task from it).
"""

from __future__ import annotations

import contextlib
import itertools
import time
import traceback
from collections.abc import Callable

import torch
from torch import nn

import fastrnn
from bench import accuracy, timing, tasks
from bench.runner import paired_speedup

#: Largest relative error (loss and every parameter gradient) between the two constructions.
CHECK_TOLERANCE = 1e-4
#: CPU timing: rounds fill this many seconds per case (fastrnn and torch.nn alternating).
CPU_BUDGET_S = 1.5
CPU_MAX_REPS = 200
#: Seeds: weights, training batches, held-out batch, timing batches.
WEIGHT_SEED, TRAIN_SEED, HELDOUT_SEED, TIMING_SEED = 0, 1, 99, 2

#: What is timed: (label, task, loss (None: the task's), the torch.nn construction in words).
TIMING_CASES: tuple[tuple[str, str, Callable | None, str], ...] = (
    ("ManyToOne", "adding", None, "nn.LSTM + nn.Linear on h_n"),
    ("ManyToMany", "echo", None, "nn.GRU on a PackedSequence + nn.Linear, masked"),
    ("OneToMany", "rotation", None, "loop of nn.RNNCell + nn.Linear, output fed back"),
    ("Seq2Seq", "reversal", None, "nn.GRU encoder (packed) -> nn.GRU decoder + nn.Linear"),
    ("Seq2Seq.generate", "reversal", tasks.reversal_generate_loss,
     "nn.GRU encoder (packed) -> loop of nn.GRUCell + nn.Linear, output fed back"),
    ("OneToOne", "product", None, "nn.LSTM on one step + nn.Linear"),
)


def _backend(name: str | None):
    return contextlib.nullcontext() if name in (None, "auto") else fastrnn.use_backend(name)


# ------------------------------------------------------------------------------------ check
def check(fast: nn.Module, twin: tasks.Twin, loss_fn, batch, backend: str | None) -> dict:
    """Loss and every parameter gradient of one step, fastrnn against its twin (same weights)."""
    with _backend(backend):
        fast_loss = loss_fn(fast, *batch)
    twin_loss = loss_fn(twin, *batch)
    fast_params = dict(fast.named_parameters())
    twin_names, twin_params = zip(*twin.named_parameters())
    fast_grads = dict(zip(fast_params, torch.autograd.grad(fast_loss, list(fast_params.values()))))
    twin_grads = torch.autograd.grad(twin_loss, list(twin_params))
    sources = twin.sources()
    errors = {"loss": accuracy.relative_error(fast_loss.detach().reshape(1), twin_loss.detach().reshape(1))}
    for name, grad in zip(twin_names, twin_grads):
        errors[f"grad {sources[name]}"] = accuracy.relative_error(fast_grads[sources[name]], grad)
    worst = max(errors, key=errors.get)
    return {"max_rel_err": errors[worst], "worst": worst, "loss_rel_err": errors["loss"], "tolerance": CHECK_TOLERANCE,
            "passed": errors[worst] <= CHECK_TOLERANCE, "loss": twin_loss.item()}


# ----------------------------------------------------------------------------------- timing
def step_fn(model: nn.Module, loss_fn, batches: list, lr: float, backend: str | None = None) -> Callable[[], None]:
    """One training step per call (zero_grad, loss, backward, Adam step) on the next batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    cycle = itertools.cycle(batches)

    def step() -> None:
        batch = next(cycle)
        optimizer.zero_grad(set_to_none=True)
        with _backend(backend):
            loss = loss_fn(model, *batch)
            loss.backward()
        optimizer.step()

    return step


def time_case(label: str, task: tasks.Task, loss_fn, construction: str, device: torch.device,
              backend: str | None) -> dict:
    """Check, then time one training step of fastrnn and of torch.nn for one topology."""
    started = time.perf_counter()
    loss_fn = loss_fn or task.loss
    record = {"name": label, "topology": task.topology, "cell": task.cell, "task": task.name, "shape": task.shape,
              "torch_construction": construction, "status": "ok", "variants": {}}
    try:
        fast, twin = task.build(device, WEIGHT_SEED)
        g = torch.Generator().manual_seed(TIMING_SEED)
        batches = [task.batch(g, device) for _ in range(3)]
        record["check"] = check(fast, twin, loss_fn, batches[0], backend)
        if not record["check"]["passed"]:
            record["status"] = "failed"
        fns = {"fastrnn": step_fn(fast, loss_fn, batches, task.lr, backend),
               "torch": step_fn(twin, loss_fn, batches, task.lr)}
        record["variants"] = timing.measure(fns, device, warmup=3, budget_s=CPU_BUDGET_S, max_reps=CPU_MAX_REPS)
        fast_t, torch_t = (record["variants"][k] for k in ("fastrnn", "torch"))
        if "median_ms" in fast_t and "median_ms" in torch_t:
            record["speedup"] = torch_t["median_ms"] / fast_t["median_ms"]
            paired = paired_speedup(fast_t, torch_t)
            if paired is not None:
                record["paired_speedup"] = paired
            if "min_ms" in fast_t and "min_ms" in torch_t:
                record["min_speedup"] = torch_t["min_ms"] / fast_t["min_ms"]
        if record["status"] == "ok" and any("error" in v for v in record["variants"].values()):
            record["status"] = "error"
    except Exception as error:  # noqa: BLE001 - report the case and carry on
        record["status"] = "error"
        record["error"] = timing.describe_error(error)
        record["traceback"] = traceback.format_exc(limit=8)[-4000:]
    record["seconds"] = round(time.perf_counter() - started, 2)
    return record


# --------------------------------------------------------------------------------- training
def fit(model: nn.Module, task: tasks.Task, device: torch.device, backend: str | None = None) -> list[float]:
    """Adam on ``task.steps`` fresh batches from a fixed generator (the same data for every model)."""
    g = torch.Generator().manual_seed(TRAIN_SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.lr)
    losses = []
    for _ in range(task.steps):
        batch = task.batch(g, device)
        optimizer.zero_grad(set_to_none=True)
        with _backend(backend):
            loss = task.loss(model, *batch)
            loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def heldout(model: nn.Module, task: tasks.Task, device: torch.device, backend: str | None = None) -> float:
    with torch.no_grad(), _backend(backend):
        return task.loss(model, *task.batch(torch.Generator().manual_seed(HELDOUT_SEED), device)).item()


def train_task(task: tasks.Task, device: torch.device, backend: str | None) -> dict:
    """Train the fastrnn module and its twin from the same weights on the same batches."""
    started = time.perf_counter()
    record = {"task": task.name, "title": task.title, "topology": task.topology, "cell": task.cell, "shape": task.shape,
              "optimizer": "Adam", "lr": task.lr, "steps": task.steps, "baseline": task.baseline,
              "baseline_label": task.baseline_label, "status": "ok", "curves": {}, "heldout": {}, "seconds": {}}
    try:
        fast, twin = task.build(device, WEIGHT_SEED)
        record["heldout"]["initial"] = heldout(twin, task, device)
        for name, model, chosen in (("fastrnn", fast, backend), ("torch", twin, None)):
            begin = time.perf_counter()
            record["curves"][name] = [round(v, 7) for v in fit(model, task, device, chosen)]
            record["seconds"][name] = round(time.perf_counter() - begin, 2)
            record["heldout"][name] = heldout(model, task, device, chosen)
        a, b = record["curves"]["fastrnn"], record["curves"]["torch"]
        record["max_curve_gap"] = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))
        if not all(map(_finite, a + b)):
            record["status"] = "error"
            record["error"] = "a loss curve holds a non-finite value"
    except Exception as error:  # noqa: BLE001
        record["status"] = "error"
        record["error"] = timing.describe_error(error)
        record["traceback"] = traceback.format_exc(limit=8)[-4000:]
    record["seconds"]["total"] = round(time.perf_counter() - started, 2)
    return record


def _finite(value: float) -> bool:
    return value == value and abs(value) != float("inf")


# ---------------------------------------------------------------------------------- section
def sizes() -> dict:
    return {"batch": tasks.BATCH, "hidden": tasks.HIDDEN, "adding_steps": tasks.ADDING_STEPS,
            "echo_steps": tasks.ECHO_STEPS, "rotation_steps": tasks.ROTATION_STEPS,
            "reversal_steps": tasks.REVERSAL_STEPS}


def run_section(device: torch.device, backend: str | None = None, log: Callable[[str], None] | None = None,
                save: Callable[[], None] | None = None, section: dict | None = None) -> dict:
    """Time every case of :data:`TIMING_CASES`, then train every task of :data:`bench.tasks.TASKS`.
    ``section`` (filled in place, so ``save`` writes what there is so far) is returned."""
    log = log or (lambda line: None)
    started = time.perf_counter()
    section = section if section is not None else {}
    section.update({"device": str(device), "backend": backend or "auto", "sizes": sizes(), "timing": [],
                    "training": [], "check_tolerance": CHECK_TOLERANCE, "seconds": 0.0})
    for label, name, loss_fn, construction in TIMING_CASES:
        record = time_case(label, tasks.task(name), loss_fn, construction, device, backend)
        section["timing"].append(record)
        log(timing_line(record))
        if save:
            save()
    for task in tasks.TASKS:
        record = train_task(task, device, backend)
        section["training"].append(record)
        log(training_line(record))
        if save:
            save()
    section["seconds"] = round(time.perf_counter() - started, 1)
    return section


def timing_line(record: dict) -> str:
    head = f"{record['name']:<17} {record['cell']:<4} {record['shape']:<30} {record['status']:<6}"
    if "error" in record:
        return f"{head} {record['error']}"
    check = record.get("check", {})
    text = f"{head} err {check.get('max_rel_err', float('nan')):.1e}"
    v = record["variants"]
    for name in ("fastrnn", "torch"):
        entry = v.get(name, {})
        text += f" | {name} " + (f"{entry['median_ms']:.3g} ms" if "median_ms" in entry else entry.get("error", "-")[:80])
    speedup = record.get("paired_speedup", record.get("speedup"))
    if speedup:
        text += f" -> {speedup:.2f}x"
    return text + f" [{record['seconds']:.0f} s]"


def training_line(record: dict) -> str:
    head = f"{record['task']:<9} {record['topology']:<10} {record['cell']:<4} {record['steps']} steps"
    if record["status"] != "ok":
        return f"{head} {record['status']}: {record.get('error', '')}"
    h = record["heldout"]
    return (f"{head}: held-out loss {h['initial']:.4f} -> fastrnn {h['fastrnn']:.5f}, torch.nn {h['torch']:.5f} "
            f"(baseline {record['baseline']:.3f}); curves differ by at most {record['max_curve_gap']:.1e} "
            f"[{record['seconds']['total']:.0f} s]")
