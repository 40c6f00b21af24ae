"""Which backend is asked for: ``auto``, ``triton`` or ``reference``.

The choice comes from ``FASTRNN_BACKEND`` (read on every call, so tests can set it with monkeypatch)
unless a Python override is active (:func:`set_backend`, :func:`use_backend`). What then runs a
given call is decided by :func:`fastrnn.routing.decide`:

========== ================================================================================
backend    what runs
========== ================================================================================
auto       CUDA: the Triton kernels where they are the only fused option (``grad_clip``,
           gradient-flow recording, the extra nonlinearities, fused free-running generation,
           zoneout at the resident kernels' sizes)
           or where the shipped dispatch table measured them faster than cuDNN; cuDNN
           otherwise, exactly what ``torch.nn`` runs. CPU: PyTorch's native RNN kernels
           (``torch._VF``); where those can't serve (``grad_clip``, recording, the
           extra nonlinearities) and under ``torch.compile``, that forward inside one
           registered operator per layer with fastrnn's own backward (:mod:`fastrnn.native_bptt`).
triton     The Triton kernels. On CPU tensors only under ``TRITON_INTERPRET=1``; otherwise a
           ``RuntimeError`` names what is missing. Never falls back silently.
reference  The plain PyTorch loop of :mod:`fastrnn.reference` (the test oracle), on any device.
========== ================================================================================
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "FASTRNN_BACKEND"

_override: str | None = None


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fastrnn backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The backend asked for: the active override, else ``$FASTRNN_BACKEND``, else ``"auto"``."""
    if _override is not None:
        return _override
    return _check(os.environ.get(ENV_VAR, "auto").strip().lower() or "auto")


def set_backend(name: str | None) -> None:
    """Force a backend for the whole process; ``None`` goes back to ``$FASTRNN_BACKEND``."""
    global _override
    _override = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed block with ``name`` as the backend, then restore the previous choice."""
    global _override
    previous = _override
    _override = _check(name)
    try:
        yield
    finally:
        _override = previous


def triton_interpreting() -> bool:
    """True when Triton's interpreter is on (it must be set before ``triton`` is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once, at import: torch 2.11's dynamo refuses to trace importlib's find_spec (a layer
# decides its route while torch.compile traces it).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


#: What to install for the kernels where PyTorch's wheel brought no Triton (pyproject's extra).
TRITON_EXTRA = "pip install 'fastrnn[triton]'"


@torch.compiler.assume_constant_result
def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernels with the installed packages, or None.
    Triton before 3.7 converts one-element arrays with ``int()``, which numpy 2.3 refuses
    (``TypeError: only 0-dimensional arrays can be converted to Python scalars`` in every loop).
    A constant to torch.compile: torch 2.11's dynamo refuses to trace importlib's package lookups."""
    return _interpreter_problem()


@functools.cache
def _interpreter_problem() -> str | None:
    if importlib.util.find_spec("numpy") is None:
        return "Triton's interpreter needs numpy: pip install numpy"
    triton_version = _major_minor(importlib.metadata.version("triton"))
    numpy_version = _major_minor(importlib.metadata.version("numpy"))
    if triton_version < (3, 7) and numpy_version >= (2, 3):
        return (
            f"Triton {importlib.metadata.version('triton')}'s interpreter fails with numpy "
            f"{importlib.metadata.version('numpy')}: pip install 'numpy<2.3' (or triton>=3.7)"
        )
    return None


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)

