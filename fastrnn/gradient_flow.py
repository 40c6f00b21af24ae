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

The record is eager-mode only (it writes from the backward pass): a call compiled with
``torch.compile`` runs as if no record were open, and records nothing.
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
            raise RuntimeError(
                "no gradient flow was recorded: run the forward pass inside record_gradient_flow() "
                "(in eager mode: a torch.compile'd call records nothing)"
            )
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


#: Where the marks of exactly-zero steps sit, as fractions of the axes' height above its bottom:
#: the first line's at the first height, the next line's a step above (so marks don't hide each other).
ZERO_MARK_HEIGHT, ZERO_MARK_STEP = 0.03, 0.035


def plot_gradient_flow(flow: GradientFlow, ax=None, title: str | None = None):
    """Draw ``||dL/dh_t||`` against ``t`` (log scale), one line per layer and direction; returns the axes.

    A step whose norm is exactly zero (no gradient reached ``h_t``: past every row's length, or
    the steps a reverse direction's states do not influence the loss through) has no place on a
    log scale: the line breaks there, and the step is marked with an ``x`` in the line's colour
    along the bottom of the axes (each line's marks at their own height), with a legend entry
    ``<line>: exactly 0``. Without ``ax``, a new figure with constrained layout and the legend to
    the right of the axes, so labels and legend fit inside it and off the data. Needs matplotlib
    (``pip install 'fastrnn[plot]'``)."""
    try:
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"plot_gradient_flow draws with matplotlib ({error}): pip install 'fastrnn[plot]'") from error
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    own_figure = ax is None
    if own_figure:
        _, ax = plt.subplots(figsize=(8.0, 3.8), layout="constrained")
    data_x_axes_y = blended_transform_factory(ax.transData, ax.transAxes)
    marked = 0
    for record in flow.records:
        for direction, norms in enumerate(record.norms.detach().cpu().double()):
            label = f"{record.module} layer {record.layer}" + (" reverse" if direction else "")
            steps = torch.arange(len(norms)).numpy()
            zero = (norms == 0).numpy()
            shown = norms.masked_fill(norms == 0, float("nan")).numpy()
            (line,) = ax.plot(steps, shown, marker="o", markersize=2, linewidth=1.4, label=label)
            if zero.any():
                height = ZERO_MARK_HEIGHT + ZERO_MARK_STEP * marked
                ax.plot(steps[zero], [height] * int(zero.sum()), linestyle="none", marker="x", markersize=5,
                        color=line.get_color(), transform=data_x_axes_y, label=f"{label}: exactly 0")
                marked += 1
    if any((r.norms > 0).any() for r in flow.records):
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("timestep t")
    ax.set_ylabel("||dL/dh_t||")
    if title:
        ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    if own_figure:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize="small")
    return ax
