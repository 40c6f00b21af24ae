"""pytest configuration of the benchmark suite.

``pyproject.toml`` puts ``--benchmark-disable`` in ``addopts`` (so the unit tests never time
anything). pytest-benchmark refuses ``--benchmark-only`` next to ``--benchmark-disable``; here
``--benchmark-only`` turns benchmarking back on, so ``python -m pytest bench/ --benchmark-only``
just works (as does ``--benchmark-enable``).
"""

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("benchmark_only", default=False):
        config.option.benchmark_enable = True
