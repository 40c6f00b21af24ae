"""pytest-benchmark suite: fastrnn against torch.nn, forward+backward, float32, on the CPU.

One benchmark group per shape, so pytest-benchmark prints fastrnn and torch.nn side by side::

    python -m pytest bench/ --benchmark-only --benchmark-json=bench-cpu.json
    python -m bench.ratio bench-cpu.json        # fastrnn / torch.nn speed per shape (must be >= 0.9)

Both layers hold the same ``state_dict``; fastrnn runs its default backend (``auto``: torch's
native kernels on the CPU). Each benchmark first checks that the two agree. On a machine already
busy (load average at least the core count) torch runs one thread, as in ``python -m bench``;
``FASTRNN_BENCH_THREADS=N`` pins the count.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.accuracy import compare
from bench.environment import calm_threads
from bench.matrix import CPU_MATRIX, Row
from bench.workload import build_fastrnn, build_torch, make_samples, outputs_and_grads, train_fn

IMPLEMENTATIONS = ("fastrnn", "torch.nn")
#: Set ``FASTRNN_BENCH_THREADS`` to pin torch's CPU threads; otherwise one thread on a busy machine.
THREADS_ENV = "FASTRNN_BENCH_THREADS"
#: Both run torch's native CPU kernels in float32; they should agree to rounding.
AGREEMENT = 1e-5


@pytest.fixture(scope="module", autouse=True)
def cpu_threads():
    """The same thread policy as ``python -m bench`` (restored afterwards)."""
    before = torch.get_num_threads()
    if os.environ.get(THREADS_ENV):
        torch.set_num_threads(int(os.environ[THREADS_ENV]))
    else:
        note = calm_threads()
        if note:
            print(f"\n{note}")
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def group_name(row: Row) -> str:
    return f"{row.name} {row.describe()} fwd+bwd"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("row", CPU_MATRIX, ids=[r.name for r in CPU_MATRIX])
def test_forward_backward(benchmark, cpu_threads: int, row: Row, impl: str) -> None:
    device = torch.device("cpu")
    fast = build_fastrnn(row, device)
    layer = fast if impl == "fastrnn" else build_torch(row, fast, row.torch_dtype)
    samples = make_samples(row, device)

    if impl == "fastrnn":  # same weights, same function: check once per shape
        reference = build_torch(row, fast, row.torch_dtype)
        errors = compare(outputs_and_grads(fast, samples[0]), outputs_and_grads(reference, samples[0]))
        assert max(errors.values()) < AGREEMENT, errors

    benchmark.group = group_name(row)
    benchmark.extra_info.update(impl=impl, row=row.name, shape=row.describe(), tokens=samples[0].tokens,
                                flops=row.flops(backward=True), torch_threads=cpu_threads)
    benchmark(train_fn(layer, list(layer.parameters()), samples))
