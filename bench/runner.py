"""Run one row: check it against float64, then time every implementation of it.

Implementations ("variants") of a row:

============== ====================================================================================
fastrnn        ``fastrnn`` in the row's dtype on the active backend (``auto`` unless ``--backend``)
torch_<dtype>  ``torch.nn`` with the same weights. GPU rules: half rows are timed in fp16 and in
               bf16 and the faster is the anchor; fp32 rows in fp32. CPU: the row's dtype.
compiled_ref   ``torch.compile`` of the fastrnn layer on the reference backend (the loop unrolls,
               so it is skipped past ``compile_max_steps`` of ``T * layers``)
eager_ref      the reference loop, eager (skipped past ``eager_max_steps``)
============== ====================================================================================

Each is timed forward alone (inference, ``torch.no_grad``) and forward+backward (gradients of
the input and every parameter) -- the modes ``forward`` and ``train``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from dataclasses import asdict, dataclass

import torch

from bench import accuracy, timing
from bench.matrix import DTYPES, SHORT_DTYPE, Row
from bench.workload import build_fastrnn, build_torch, forward_fn, make_samples, samples_as, train_fn

MODES = ("forward", "train")

#: Skip thresholds on ``T * layers`` for the reference loop (eager and compiled).
GPU_EAGER_MAX_STEPS = 128
GPU_COMPILE_MAX_STEPS = 128
CPU_EAGER_MAX_STEPS = 600
#: torch.compile unrolls the time loop; on a 2-core CPU inductor needs about a minute for T=32
#: (forward and training graphs) and minutes beyond, so by default only tiny rows compile there.
CPU_COMPILE_MAX_STEPS = 16


@dataclass
class Plan:
    """How rows are run: where, which torch.nn dtypes, what is skipped."""

    device: torch.device
    gpu_rules: bool
    backend: str = "auto"
    compile: bool = True
    eager_max_steps: int = CPU_EAGER_MAX_STEPS
    compile_max_steps: int = CPU_COMPILE_MAX_STEPS
    references: bool = True  # time the reference loop at all (the batch sweep does not)
    time_failed: bool = False  # time rows that failed their check too (they stay "failed")
    compile_skip_reason: str = "--no-compile"

    @classmethod
    def for_device(cls, device: torch.device, *, dry_run: bool = False, **changes) -> Plan:
        """Defaults for ``device``; ``dry_run`` keeps the GPU's variants but the CPU's thresholds."""
        on_gpu = device.type == "cuda"
        defaults = dict(
            gpu_rules=on_gpu or dry_run,
            eager_max_steps=GPU_EAGER_MAX_STEPS if on_gpu else CPU_EAGER_MAX_STEPS,
            compile_max_steps=GPU_COMPILE_MAX_STEPS if on_gpu else CPU_COMPILE_MAX_STEPS,
        )
        defaults.update(changes)
        return cls(device=device, **defaults)

    def torch_dtypes(self, row: Row) -> tuple[str, ...]:
        """The dtypes ``torch.nn`` is timed in for ``row``."""
        if self.gpu_rules and row.dtype in ("float16", "bfloat16"):
            return ("float16", "bfloat16")
        return (row.dtype,)


def _skip_reason(plan: Plan, row: Row, variant: str) -> str | None:
    steps = row.sequential_steps
    if variant == "compiled_ref":
        if not plan.references:
            return "not measured for this row"
        if not plan.compile:
            return plan.compile_skip_reason
        if steps > plan.compile_max_steps:
            return f"T*layers={steps} > {plan.compile_max_steps} (compile unrolls the time loop)"
    if variant == "eager_ref":
        if not plan.references:
            return "not measured for this row"
        if steps > plan.eager_max_steps:
            return f"T*layers={steps} > {plan.eager_max_steps} (too slow)"
    return None


def _callable(mode: str, model, params, samples, backend):
    if mode == "forward":
        return forward_fn(model, samples, backend)
    return train_fn(model, params, samples, backend)


def _time_group(result: dict, specs: dict[str, tuple], device: torch.device) -> None:
    """Time the variants in ``specs`` (name -> model, params, samples, backend) against each other,
    mode by mode, into ``result["variants"][name][mode]``."""
    for mode in MODES:
        fns = {name: _callable(mode, *spec) for name, spec in specs.items()}
        for name, measured in timing.measure(fns, device).items():
            result["variants"][name][mode] = measured


def _median(entry: dict, mode: str) -> float | None:
    return entry.get(mode, {}).get("median_ms")


def paired_speedup(mine: dict, anchor: dict) -> float | None:
    """Median over rounds of ``anchor_i / mine_i`` (CPU timings are interleaved round by round, so
    each pair saw the same load): steadier than the ratio of medians on a busy machine."""
    a, b = mine.get("samples_ms"), anchor.get("samples_ms")
    if not a or not b or len(a) != len(b):
        return None
    return statistics.median(y / x for x, y in zip(a, b))


def derive(row: Row, result: dict) -> None:
    """Add the anchor, speedups, microseconds per step and TFLOP/s to a row's ``result``."""
    variants = result["variants"]
    tokens = result["tokens"]
    for mode in MODES:
        torch_times = {name: _median(v, mode) for name, v in variants.items() if name.startswith("torch_")}
        torch_times = {k: v for k, v in torch_times.items() if v is not None}
        anchor = min(torch_times, key=torch_times.get) if torch_times else None
        result["anchor"][mode] = anchor
        mine = _median(variants.get("fastrnn", {}), mode)
        result["speedup"][mode] = (torch_times[anchor] / mine) if anchor and mine else None
        mine_entry, anchor_entry = variants.get("fastrnn", {}).get(mode, {}), variants.get(anchor, {}).get(mode, {})
        paired = paired_speedup(mine_entry, anchor_entry)
        if paired is not None:
            result.setdefault("paired_speedup", {})[mode] = paired
        if "min_ms" in mine_entry and "min_ms" in anchor_entry:
            result.setdefault("min_speedup", {})[mode] = anchor_entry["min_ms"] / mine_entry["min_ms"]
        flops = row.flops(tokens, backward=mode == "train")
        for name, entry in variants.items():
            median = _median(entry, mode)
            if median is None:
                continue
            entry[mode]["us_per_step"] = median * 1e3 / row.steps
            entry[mode]["tflops"] = flops / (median * 1e-3) / 1e12


def new_record(row: Row, status: str = "ok") -> dict:
    """An empty result record of ``row``."""
    return {
        "name": row.name,
        "description": row.describe(),
        "config": asdict(row),
        "status": status,
        "variants": {},
        "anchor": {},
        "speedup": {},
    }


def skipped_record(row: Row, reason: str) -> dict:
    """The record of a row that was not run at all (e.g. past the time budget)."""
    return {**new_record(row, "skipped"), "error": reason, "seconds": 0.0}


def run_row(row: Row, plan: Plan, log=None) -> dict:
    """Check ``row`` and, when it passes, time all its variants. Returns the row's result record
    (status ``ok``, ``failed`` (check), ``missing`` (kernel not there) or ``error``)."""
    device = plan.device
    result = new_record(row)
    with recorded(result, device, progress_line, log, missing=(NotImplementedError, ImportError)):
        module = build_fastrnn(row, device)
        samples = make_samples(row, device)
        result["tokens"] = sum(s.tokens for s in samples) / len(samples)
        result["flops"] = {mode: row.flops(result["tokens"], backward=mode == "train") for mode in MODES}
        torch_layers = {f"torch_{SHORT_DTYPE[d]}": build_torch(row, module, DTYPES[d]) for d in plan.torch_dtypes(row)}

        tol = accuracy.tolerance(row.dtype, device)
        same_dtype = {k: v for k, v in torch_layers.items() if next(v.parameters()).dtype == row.torch_dtype}
        result["check"] = accuracy.check(module, samples[0], tol, backend=plan.backend, others=same_dtype)
        if not result["check"]["passed"]:
            result["status"] = "failed"
            if not plan.time_failed:
                return result

        # fastrnn and torch.nn are timed together (interleaved on the CPU), the references alone.
        params = list(module.parameters())
        contenders = {"fastrnn": (module, params, samples, plan.backend)}
        result["variants"]["fastrnn"] = {"dtype": row.dtype, "backend": plan.backend}
        for name, layer in torch_layers.items():
            dtype = next(layer.parameters()).dtype
            own = samples if dtype == row.torch_dtype else samples_as(samples, dtype)
            contenders[name] = (layer, list(layer.parameters()), own, None)
            result["variants"][name] = {"dtype": str(dtype).removeprefix("torch.")}
        _time_group(result, contenders, device)
        del contenders

        for variant in ("compiled_ref", "eager_ref"):
            reason = _skip_reason(plan, row, variant)
            if reason:
                result["variants"][variant] = {"skipped": reason}
                continue
            model = torch.compile(module) if variant == "compiled_ref" else module
            result["variants"][variant] = {"dtype": row.dtype, "backend": "reference"}
            _time_group(result, {variant: (model, params, samples, "reference")}, device)
            if variant == "compiled_ref":
                torch._dynamo.reset()
        derive(row, result)
        broken = any("error" in v.get(m, {}) for v in result["variants"].values() for m in MODES)
        if result["status"] == "ok" and broken:
            result["status"] = "error"
    return result


@contextlib.contextmanager
def recorded(result: dict, device: torch.device, progress, log=None, missing: tuple[type[BaseException], ...] = ()):
    """The block that runs one row into its ``result`` record (this module's rows and
    :mod:`bench.cells`'): an exception of a ``missing`` type (a kernel not written yet) sets the
    status ``missing``, any other the status ``error`` with its traceback, and the row carries on
    to the next; then the row's ``seconds``, CUDA's cache emptied, and ``log(progress(result))``."""
    started = time.perf_counter()
    try:
        yield result
    except missing as error:
        result["status"] = "missing"
        result["error"] = timing.describe_error(error)
    except Exception as error:  # noqa: BLE001 - report the row and carry on with the next
        result["status"] = "error"
        result["error"] = timing.describe_error(error)
        result["traceback"] = traceback.format_exc(limit=8)[-4000:]
    finally:
        result["seconds"] = round(time.perf_counter() - started, 2)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if log:
            log(progress(result))


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g} ms"


def progress_line(result: dict) -> str:
    """One line summarising a finished row (printed to stderr while the matrix runs)."""
    head = f"{result['name']:<4} {result['description']:<36} {result['status']:<6}"
    check = result.get("check")
    if check:
        head += f" err {check['max_rel_err']:.1e}"
    if result["status"] == "failed" and "fastrnn" not in result["variants"]:
        return f"{head} > tol {check['tolerance']:.0e} ({check['worst']}); not timed [{result['seconds']:.0f} s]"
    if "error" in result:
        return f"{head} {result['error']} [{result['seconds']:.0f} s]"
    train = result["variants"].get("fastrnn", {}).get("train", {})
    anchor = result["anchor"].get("train")
    anchor_ms = _median(result["variants"].get(anchor, {}), "train") if anchor else None
    speedup = result["speedup"].get("train")
    tail = f" | fwd+bwd fastrnn {_fmt_ms(train.get('median_ms'))}, {anchor or 'torch.nn'} {_fmt_ms(anchor_ms)}"
    if speedup:
        tail += f" -> {speedup:.2f}x"
    return f"{head}{tail} [{result['seconds']:.0f} s]"
