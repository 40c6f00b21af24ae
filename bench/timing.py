"""Timing: median and 20/80 percentiles of a callable, plus peak GPU memory.

On CUDA, :func:`triton.testing.do_bench` (it flushes L2 between runs and synchronises). On the CPU, a
plain ``time.perf_counter`` loop: warm-up calls first (excluded), then enough timed calls to fill a
small time budget. Callables compared with each other are timed in interleaved rounds.
"""

from __future__ import annotations

import statistics
import time
import traceback
from collections.abc import Callable

import torch


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def describe_error(error: BaseException, limit: int = 400) -> str:
    """``Type: message`` cut to ``limit`` characters (compiler errors run to pages)."""
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _summary(samples: list[float]) -> dict:
    return {
        "median_ms": statistics.median(samples),
        "p20_ms": _quantile(samples, 0.2),
        "p80_ms": _quantile(samples, 0.8),
        "min_ms": min(samples),
        "reps": len(samples),
        "timer": "perf_counter",
        "samples_ms": [round(v, 4) for v in samples],
    }


def time_cpu(fns: dict[str, Callable[[], None]], *, warmup: int = 2, budget_s: float = 1.0, min_reps: int = 5,
             max_reps: int = 30) -> dict[str, dict]:
    """Median and 20/80 percentiles (ms) of each callable on the CPU, timed in interleaved rounds
    (one call of each per round, the order alternating), so that load from elsewhere on the
    machine hits all of them alike and their ratio stays fair; every sample is kept (round ``i``
    of one callable pairs with round ``i`` of the others). Warm-up calls are not counted; the number of rounds fills
    ``budget_s`` within ``[min_reps, max_reps]``."""
    started = time.perf_counter()
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    per_round = (time.perf_counter() - started) / max(warmup, 1)
    reps = int(min(max_reps, max(min_reps, budget_s / max(per_round, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(reps):
        for name in names if round_index % 2 == 0 else reversed(names):  # alternate who goes first
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summary(values) for name, values in samples.items()}


def time_cuda(fn: Callable[[], None]) -> dict:
    """Median and 20/80 percentiles (ms) with ``triton.testing.do_bench``, and the peak memory
    one call allocates (``torch.cuda.max_memory_allocated``, absolute and above what was held)."""
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    held = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {
        "median_ms": float(median),
        "p20_ms": float(p20),
        "p80_ms": float(p80),
        "timer": "triton.testing.do_bench",
        "peak_mem_bytes": int(peak),
        "extra_mem_bytes": int(peak - held),
    }


def measure(fns: dict[str, Callable[[], None]], device: torch.device, **cpu_options) -> dict[str, dict]:
    """Time each callable on ``device``. The first call of each is made (and timed) here, so
    compile and autotuning land in ``first_call_s`` rather than in the timings; a callable that
    raises gets ``{"error": ...}`` and the others are still timed. ``cpu_options`` go to
    :func:`time_cpu` (warm-up, budget, repetitions)."""
    results: dict[str, dict] = {}
    working: dict[str, Callable[[], None]] = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        try:
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # noqa: BLE001 - recorded, the caller carries on
            results[name] = {"error": describe_error(error), "traceback": traceback.format_exc(limit=6)[-4000:]}
            continue
        results[name] = {"first_call_s": time.perf_counter() - start}
        working[name] = fn
    if device.type == "cuda":
        for name, fn in working.items():
            try:
                results[name].update(time_cuda(fn))
            except Exception as error:  # noqa: BLE001 - e.g. out of memory
                results[name]["error"] = describe_error(error)
            torch.cuda.empty_cache()
    elif working:
        for name, summary in time_cpu(working, **cpu_options).items():
            results[name].update(summary)
    return results
