"""The cells beyond torch.nn (LayerNormLSTM, LayerNormGRU, IndRNN) against the plain-PyTorch loop a
user writes: the "cells" section of ``python -m bench``.

torch.nn has no such layers, so the anchor is the user's own loop: an ``nn.Module`` cell stepped
in Python under autograd (:class:`UserLoop`; the LayerNorm cells are the ones of
:mod:`bench.layer_norm`, with ``nn.Linear`` + ``nn.LayerNorm``; IndRNN's user loop hoists the
input projection out of the loop, as anyone writing an elementwise recurrence would). The loop is
timed eager and with the cell under ``torch.compile`` (the loop stays in Python: compiling the
whole loop unrolls every step) and the faster of the two is the anchor, as issue 18 asks.

Rows (:data:`CPU_ROWS` on a CPU; :data:`GPU_ROWS`, the issue's rows, on CUDA, and in ``--dry-run``
shrunk like the GPU matrix by :data:`bench.matrix.DRY_RUN_DIVISORS` and run on the CPU). Every row
is first checked against its float64 oracle (fastrnn's reference backend in float64): it passes
when its relative error is within :data:`bench.accuracy.TOLERANCE` of the row's dtype, or within
:data:`AUTOGRAD_FACTOR` times the error of PyTorch's own autograd loop (the reference backend) in
the row's dtype. The second clause is for the LayerNorm LSTM, whose gradients amplify rounding
over the steps: at C5 (T=128, fp32) the autograd loop itself is 3e-4 off and the user's loop 6e-4
on the input gradient, above the 1e-4 that plain LSTMs meet. The user's loops' output errors are
recorded too, for context. Then the row is timed in the modes ``forward`` (inference) and ``train``
(forward+backward, gradients of the input and every parameter), fastrnn and the user's loops
interleaved on the CPU. A record's layout follows :func:`bench.runner.run_row`'s: ``variants``
(``fastrnn``, ``user_loop``, ``user_loop_compiled``), ``anchor`` and ``speedup`` per mode.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fastrnn
from bench import accuracy, timing
from bench.layer_norm import user_cell_from
from bench.matrix import DTYPES, SHORT_DTYPE
from bench.runner import MODES, recorded
from bench.workload import Sample, converted, forward_fn, train_fn

#: The fastrnn layer of each cell.
LAYERS = {"LayerNormLSTM": fastrnn.LayerNormLSTM, "LayerNormGRU": fastrnn.LayerNormGRU, "IndRNN": fastrnn.IndRNN}
USER_LOOPS = ("user_loop", "user_loop_compiled")
#: A row also passes when its error is at most this many times the autograd loop's in its dtype.
AUTOGRAD_FACTOR = 1.5


@dataclass(frozen=True)
class CellRow:
    """One workload of a cell beyond torch.nn: a one-layer, one-direction layer, ``I = H``."""

    name: str
    cell: str
    batch: int
    steps: int
    hidden: int
    dtype: str = "bfloat16"

    def describe(self) -> str:
        return f"{self.cell} B{self.batch} T{self.steps} H{self.hidden} {SHORT_DTYPE[self.dtype]}"

    def scaled(self, *, steps: int = 1, hidden: int = 1, batch: int = 1) -> CellRow:
        return dataclasses.replace(self, steps=max(4, self.steps // steps), hidden=max(8, self.hidden // hidden),
                                   batch=max(1, self.batch // batch))


#: The issue's GPU rows (bf16), each against the faster of the user's loop eager and compiled.
GPU_ROWS: tuple[CellRow, ...] = (
    CellRow("N1", "LayerNormLSTM", batch=64, steps=512, hidden=256),
    CellRow("I1", "IndRNN", batch=64, steps=1024, hidden=1024),
)
#: CPU rows, float32, at the CPU matrix's size (B16 T128 H128).
CPU_ROWS: tuple[CellRow, ...] = (
    CellRow("C5", "LayerNormLSTM", batch=16, steps=128, hidden=128, dtype="float32"),
    CellRow("C6", "LayerNormGRU", batch=16, steps=128, hidden=128, dtype="float32"),
    CellRow("C7", "IndRNN", batch=16, steps=128, hidden=128, dtype="float32"),
)


class UserIndRNNCell(nn.Module):
    """The IndRNN a user writes (Li et al. 2018): ``h = relu(W x + b + u * h)``; the input
    projection runs once over the sequence (:meth:`project`), the step is elementwise."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ih = nn.Linear(input_size, hidden_size)
        self.u = nn.Parameter(torch.ones(hidden_size))
        self.b_hh = nn.Parameter(torch.zeros(hidden_size))

    def project(self, x: Tensor) -> Tensor:
        return self.ih(x) + self.b_hh

    def forward(self, gx: Tensor, state: tuple[Tensor]) -> tuple[Tensor]:
        return (torch.relu(gx + self.u * state[0]),)


def user_indrnn_cell_from(module: fastrnn.IndRNN) -> UserIndRNNCell:
    p = {name.rsplit("_l0", 1)[0]: w for name, w in module.named_parameters()}
    cell = UserIndRNNCell(module.input_size, module.hidden_size).to(p["weight_ih"])
    with torch.no_grad():
        cell.ih.weight.copy_(p["weight_ih"])
        cell.ih.bias.copy_(p["bias_ih"])
        cell.b_hh.copy_(p["bias_hh"])
        cell.u.copy_(p["weight_hh"])
    return cell


class UserLoop(nn.Module):
    """``cell`` stepped over time in Python, called like a fastrnn layer: ``(x (T, B, I)) -> (y,
    h_n)`` (``(y, (h_n, c_n))`` for the LSTM), ``h_n (1, B, H)``, from a zero initial state. ``step`` is what runs each step (the cell, or the cell
    under ``torch.compile``); ``cell`` holds the parameters."""

    def __init__(self, cell: nn.Module, hidden: int, cell_state: bool, step: nn.Module | None = None):
        super().__init__()
        self.cell, self.hidden, self.cell_state = cell, hidden, cell_state
        self.step = cell if step is None else step

    def forward(self, x: Tensor):
        zeros = x.new_zeros(x.shape[1], self.hidden)
        state = (zeros, zeros) if self.cell_state else (zeros,)
        if isinstance(self.cell, UserIndRNNCell):
            x = self.cell.project(x)
        outputs = []
        for t in range(x.shape[0]):
            state = self.step(x[t], state)
            outputs.append(state[0])
        final = tuple(s.unsqueeze(0) for s in state)
        return torch.stack(outputs), (final if self.cell_state else final[0])


def build(row: CellRow, device: torch.device, compile_cell: bool) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The row's fastrnn layer (seeded, in the row's dtype) and the user's loops holding its weights."""
    torch.manual_seed(0)
    layer = LAYERS[row.cell](row.hidden, row.hidden).to(device=device, dtype=DTYPES[row.dtype])
    if row.cell == "IndRNN":
        cell = user_indrnn_cell_from(layer)
    else:
        cell = user_cell_from(layer, "lstm" if row.cell == "LayerNormLSTM" else "gru")
    loops = {"user_loop": UserLoop(cell, row.hidden, row.cell == "LayerNormLSTM")}
    if compile_cell:
        loops["user_loop_compiled"] = UserLoop(cell, row.hidden, row.cell == "LayerNormLSTM", step=torch.compile(cell))
    return layer, loops


def samples(row: CellRow, device: torch.device, count: int = 3, seed: int = 1) -> list[Sample]:
    generator = torch.Generator().manual_seed(seed)
    dtype = DTYPES[row.dtype]
    result = []
    for _ in range(count):
        x = torch.randn(row.steps, row.batch, row.hidden, generator=generator).to(device=device, dtype=dtype).requires_grad_(True)
        grad = torch.randn(row.steps, row.batch, row.hidden, generator=generator).to(device=device, dtype=dtype)
        result.append(Sample(x, x, grad, row.steps * row.batch))
    return result


def judged(check: dict, autograd_rel_err) -> dict:
    """The section's accuracy rule applied to ``check`` (a :func:`bench.accuracy.check` record,
    whose ``passed`` says ``max_rel_err <= tolerance``): a row that fails it still passes when
    ``max_rel_err <= AUTOGRAD_FACTOR * autograd_rel_err()``, the error of PyTorch's own autograd loop
    in the row's dtype (called only then; recorded as ``autograd_rel_err``). Returns ``check``."""
    if not check["passed"]:
        autograd = autograd_rel_err()
        check.update(autograd_rel_err=autograd, passed=check["max_rel_err"] <= AUTOGRAD_FACTOR * autograd)
    return check


def run_cell_row(row: CellRow, device: torch.device, backend: str = "auto", compile_cell: bool = True,
                 cpu_options: dict | None = None, log=None) -> dict:
    """Check ``row`` against float64, then time fastrnn and the user's loops. Returns its record
    (status ``ok``, ``failed`` (check; not timed) or ``error``)."""
    result = {"name": row.name, "description": row.describe(), "config": dataclasses.asdict(row), "status": "ok",
              "variants": {}, "anchor": {}, "speedup": {}}
    with recorded(result, device, progress_line, log):
        layer, loops = build(row, device, compile_cell)
        inputs = samples(row, device)
        tol = accuracy.tolerance(row.dtype, device)
        first = {}
        for name, loop in loops.items():  # the compiled cell compiles here, before the check and the timing
            clock = time.perf_counter()
            loop(inputs[0].input)[0].sum().backward()
            first[name] = round(time.perf_counter() - clock, 2)
        result["check"] = judged(accuracy.check(layer, inputs[0], tol, backend=backend),
                                 lambda: accuracy.check(layer, inputs[0], tol, backend="reference")["max_rel_err"])
        oracle = converted(layer, torch.float64)
        with torch.no_grad(), fastrnn.use_backend("reference"):
            expected = oracle(inputs[0].input.detach().double())[0]
            result["check"]["user_loop_output_rel_err"] = {  # context, not judged
                name: accuracy.relative_error(loop(inputs[0].input)[0], expected) for name, loop in loops.items()}
        if not result["check"]["passed"]:
            result["status"] = "failed"
            return result
        specs = {"fastrnn": (layer, list(layer.parameters()), inputs, backend)}
        specs |= {name: (loop, list(loop.cell.parameters()), inputs, None) for name, loop in loops.items()}
        for name in specs:
            result["variants"][name] = {"dtype": row.dtype, "first_call_s": first.get(name)}
        result["variants"]["fastrnn"]["backend"] = backend
        _time_group(result, specs, device, cpu_options or {})
        for mode in MODES:
            times = {name: result["variants"][name].get(mode, {}).get("median_ms") for name in loops}
            times = {k: v for k, v in times.items() if v is not None}
            mine = result["variants"]["fastrnn"].get(mode, {}).get("median_ms")
            anchor = min(times, key=times.get) if times else None
            result["anchor"][mode] = anchor
            result["speedup"][mode] = times[anchor] / mine if anchor and mine else None
        if any("error" in v.get(m, {}) for v in result["variants"].values() for m in MODES):
            result["status"] = "error"
    return result


def _time_group(result: dict, specs: dict, device: torch.device, cpu_options: dict) -> None:
    """The variants in ``specs`` (name -> model, params, samples, backend) timed against each other
    mode by mode (interleaved on the CPU, with ``cpu_options`` for :func:`bench.timing.time_cpu`)."""
    for mode in MODES:
        fns = {name: (forward_fn(*spec[:1], spec[2], spec[3]) if mode == "forward" else train_fn(*spec))
               for name, spec in specs.items()}
        for name, measured in timing.measure(fns, device, **cpu_options).items():
            result["variants"][name][mode] = measured


def choose_rows(device: torch.device, dry_run: bool, divisors: dict) -> tuple[CellRow, ...]:
    """The GPU rows on CUDA, the CPU rows on a CPU; ``dry_run``: the GPU rows shrunk by ``divisors``
    in float32 (on a CPU the cells' bf16 fallback is not what a GPU row measures)."""
    if dry_run:
        return tuple(dataclasses.replace(r.scaled(**divisors), dtype="float32") for r in GPU_ROWS)
    return GPU_ROWS if device.type == "cuda" else CPU_ROWS


def run_section(device: torch.device, backend: str, *, dry_run: bool, divisors: dict, compile_cell: bool,
                cpu_options: dict | None = None, log=print, save=None, section: dict | None = None) -> dict:
    """Every row of the section into ``section["rows"]`` (``save()`` after each)."""
    section = {} if section is None else section
    section.update(rows=[], compile_cell=compile_cell, backend=backend)
    for row in choose_rows(device, dry_run, divisors):
        log(f"{row.name} {row.describe()} ...")
        section["rows"].append(run_cell_row(row, device, backend, compile_cell, cpu_options, log=lambda s: log(f"    {s}")))
        if save:
            save()
    return section


def _ms(entry: dict, mode: str) -> str:
    value = entry.get(mode, {}).get("median_ms")
    return "-" if value is None else f"{value:.3g}"


def progress_line(result: dict) -> str:
    head = f"{result['name']:<3} {result['description']:<32} {result['status']:<6}"
    if "error" in result:
        return f"{head} {result['error']} [{result['seconds']:.0f} s]"
    check = result.get("check", {})
    head += f" err {check.get('max_rel_err', float('nan')):.1e}"
    speedup = result["speedup"].get("train")
    anchor = result["anchor"].get("train")
    tail = f" | fwd+bwd fastrnn {_ms(result['variants'].get('fastrnn', {}), 'train')} ms, {anchor or '-'} " \
           f"{_ms(result['variants'].get(anchor, {}), 'train')} ms" + (f" -> {speedup:.2f}x" if speedup else "")
    return f"{head}{tail} [{result['seconds']:.0f} s]"


def table(section: dict) -> str:
    """The section as a markdown table (fits 120 columns)."""
    lines = ["| row | cell | status | err | fwd+bwd ms: fastrnn / loop / loop compiled | speedup (vs faster loop) | "
             "fwd speedup |", "|---|---|---|---|---|---|---|"]
    for r in section.get("rows", []):
        v = r["variants"]
        err = r.get("check", {}).get("max_rel_err")
        train = " / ".join(_ms(v.get(name, {}), "train") for name in ("fastrnn", *USER_LOOPS))
        ratio = {m: "-" if r["speedup"].get(m) is None else f"{r['speedup'][m]:.2f}x" for m in MODES}
        lines.append(f"| {r['name']} | {r['description']} | {r['status']} | {'-' if err is None else f'{err:.1e}'} | "
                     f"{train} | {ratio['train']} | {ratio['forward']} |")
    return "\n".join(lines)


def markdown(section: dict) -> str:
    """The section for the run's markdown report."""
    return "\n".join([
        "## Cells beyond torch.nn (bench.cells)", "",
        "fastrnn against the plain-PyTorch loop a user writes (eager, and with the cell under torch.compile"
        + ("" if section.get("compile_cell") else ": not timed in this run") + "); the speedup is against the "
        "faster loop. Errors: relative, against fastrnn's reference backend in float64.", "", table(section), ""])


def problems(section: dict | None) -> list[str]:
    """Names of rows that failed their check or errored (they make ``python -m bench`` exit 1)."""
    return [r["name"] for r in (section or {}).get("rows", []) if r["status"] in ("failed", "error")]
