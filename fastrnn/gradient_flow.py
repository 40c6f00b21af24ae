"""The gradient through time made visible: per-step norms ``||dL/dh_t||`` of every layer.

Vanishing and exploding gradients are products of many per-step factors. fastrnn's backward
kernel sees every step's state gradient anyway, so recording its norm costs one small write per
step. Forward passes run inside :func:`record_gradient_flow` register a record per layer; the
backward pass fills them::

    with fastrnn.record_gradient_flow() as flow:
        y, _ = lstm(x)
        y[:, -1].sum().backward()
    flow.norms()          # (layers * directions, T): row l*D + d is layer l, direction d
    fastrnn.plot_gradient_flow(flow)

The record is eager-mode only (it writes from the backward pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
from torch import Tensor


@dataclasses.dataclass
class FlowRecord:
    """One layer's per-step gradient norms, ``norms (D, T)``, filled in by the backward pass."""

    module: str
    layer: int
    norms: Tensor


class GradientFlow:
    """The records of one :func:`record_gradient_flow` block, in forward order."""

    def __init__(self) -> None:
        self.records: list[FlowRecord] = []

    def new_record(self, module: torch.nn.Module, layer: int, directions: int, steps: int, device) -> Tensor:
        norms = torch.zeros((directions, steps), dtype=torch.float32, device=device)
        self.records.append(FlowRecord(type(module).__name__, layer, norms))
        return norms

    def norms(self, record_module: str | None = None) -> Tensor:
        """All records stacked ``(layers * directions, T)``; filter by module class name."""
        chosen = [r.norms for r in self.records if record_module is None or r.module == record_module]
        if not chosen:
            raise RuntimeError("no gradient flow was recorded: run the forward pass inside record_gradient_flow()")
        return torch.cat(chosen)


_active: GradientFlow | None = None


def active() -> GradientFlow | None:
    """The recorder of the enclosing :func:`record_gradient_flow` block, if any."""
    return _active


@contextlib.contextmanager
def record_gradient_flow() -> Iterator[GradientFlow]:
    """Record ``||dL/dh_t||`` for every step of every recurrent layer run in this block."""
    global _active
    previous, _active = _active, GradientFlow()
    try:
        yield _active
    finally:
        _active = previous


def plot_gradient_flow(flow: GradientFlow, ax=None, title: str | None = None):
    """Draw norm against timestep (log scale), one line per layer and direction; returns the axes.
    Needs matplotlib (``pip install 'fastrnn[plot]'``)."""
    try:
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"plot_gradient_flow draws with matplotlib ({error}): pip install 'fastrnn[plot]'") from error

    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for record in flow.records:
        for direction, norms in enumerate(record.norms.detach().cpu()):
            label = f"{record.module} layer {record.layer}" + (" reverse" if direction else "")
            ax.semilogy(range(len(norms)), norms.clamp_min(1e-30).numpy(), label=label)
    ax.set_xlabel("timestep t")
    ax.set_ylabel("||dL/dh_t||")
    if title:
        ax.set_title(title)
    ax.legend(fontsize="small")
    return ax
