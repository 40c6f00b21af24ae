"""The benchmark matrix: which layer shapes are measured, and the arithmetic each one implies.

A :class:`Row` names one workload (cell, sizes, dtype, packing). The GPU matrix is the project's
headline; the CPU matrix is the four shapes the drop-in promise is checked on without a GPU.
``--quick`` and ``--dry-run`` derive smaller rows from these with :meth:`Row.scaled`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

#: Gates stacked in a weight matrix's rows, by cell (G in the FLOP count).
GATES = {"rnn": 1, "gru": 3, "lstm": 4}

#: Short dtype names used in row definitions and result files.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}


@dataclass(frozen=True)
class Row:
    """One workload: a ``torch.nn``-style recurrent layer and the input it is fed.

    ``input_size`` defaults to ``hidden`` (I = H). ``packed`` rows feed a ``PackedSequence`` whose
    lengths are drawn uniformly from ``[steps // 4, steps]`` (one row always has the full length,
    so the padded shape is the same for every rotating input).
    """

    name: str
    cell: str
    batch: int
    steps: int
    hidden: int
    input_size: int = 0
    layers: int = 1
    bidirectional: bool = False
    dtype: str = "bfloat16"
    packed: bool = False
    nonlinearity: str = "tanh"

    def __post_init__(self) -> None:
        if self.cell not in GATES:
            raise ValueError(f"unknown cell {self.cell!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        if self.input_size <= 0:
            object.__setattr__(self, "input_size", self.hidden)

    # ------------------------------------------------------------------------------- naming
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    def describe(self) -> str:
        """A one-line human description, e.g. ``LSTM 2L bidir packed B32 T512 H256 bf16``."""
        parts = [self.cell.upper() + (f"-{self.nonlinearity}" if self.cell == "rnn" else "")]
        if self.layers > 1:
            parts.append(f"{self.layers}L")
        if self.bidirectional:
            parts.append("bidir")
        if self.packed:
            parts.append("packed")
        parts.append(f"B{self.batch} T{self.steps} H{self.hidden}")
        if self.input_size != self.hidden:
            parts.append(f"I{self.input_size}")
        parts.append(SHORT_DTYPE[self.dtype])
        return " ".join(parts)

    def scaled(self, *, steps: int = 1, hidden: int = 1, batch: int = 1, name: str | None = None, **changes) -> Row:
        """A smaller copy: sizes divided by the given factors (never below 1; hidden at least 8)."""
        new_hidden = max(8, self.hidden // hidden)
        new_input = new_hidden if self.input_size == self.hidden else max(8, self.input_size // hidden)
        return dataclasses.replace(
            self,
            name=name or self.name,
            steps=max(4, self.steps // steps),
            hidden=new_hidden,
            input_size=new_input,
            batch=max(1, self.batch // batch),
            **changes,
        )

    # ------------------------------------------------------------------------------- arithmetic
    def flops(self, tokens: float | None = None, backward: bool = False) -> float:
        """Matrix-product FLOPs of the whole stack.

        Forward, per layer and direction: ``2 * tokens * (I_layer + H) * G * H`` (input projection plus
        recurrent product); forward+backward is three times that. ``tokens`` defaults to ``B * T``
        (packed rows pass the real number of valid steps).
        """
        tokens = self.batch * self.steps if tokens is None else tokens
        gates = GATES[self.cell]
        total = 0.0
        for layer in range(self.layers):
            layer_input = self.input_size if layer == 0 else self.directions * self.hidden
            total += self.directions * 2.0 * tokens * (layer_input + self.hidden) * gates * self.hidden
        return total * (3 if backward else 1)

    @property
    def sequential_steps(self) -> int:
        """``T * layers``: how long the eager/compiled reference loop is (what makes it slow)."""
        return self.steps * self.layers


#: The GPU matrix (bf16 unless noted; I = H).
GPU_MATRIX: tuple[Row, ...] = (
    Row("L1", "lstm", batch=16, steps=1024, hidden=768),
    Row("L2", "lstm", batch=64, steps=512, hidden=256),
    Row("L3", "lstm", batch=1, steps=2048, hidden=512),
    Row("L4", "lstm", batch=256, steps=256, hidden=1024),
    Row("L5", "lstm", batch=64, steps=512, hidden=256, dtype="float32"),
    Row("G1", "gru", batch=64, steps=512, hidden=512),
    Row("R1", "rnn", batch=64, steps=512, hidden=512),
    Row("P1", "lstm", batch=64, steps=512, hidden=256, packed=True),
    Row("B1", "lstm", batch=32, steps=512, hidden=256, layers=2, bidirectional=True),
)

#: The CPU matrix: float32, forward+backward, the shapes the 0.9x-of-torch.nn promise is held to.
CPU_MATRIX: tuple[Row, ...] = (
    Row("C1", "lstm", batch=16, steps=128, hidden=128, dtype="float32"),
    Row("C2", "gru", batch=16, steps=128, hidden=128, dtype="float32"),
    Row("C3", "rnn", batch=32, steps=128, hidden=256, dtype="float32"),
    Row("C4", "lstm", batch=1, steps=256, hidden=128, dtype="float32"),
)

#: Rows ``--quick`` keeps, and how much it shrinks them (``steps`` divisor).
QUICK_GPU_ROWS = ("L2", "L5", "G1", "R1", "P1", "B1")
QUICK_GPU_STEPS_DIVISOR = 4
QUICK_CPU_ROWS = ("C1", "C4")
QUICK_CPU_STEPS_DIVISOR = 2

#: ``--dry-run``: every GPU row, shrunk so it runs on a CPU in seconds.
DRY_RUN_DIVISORS = {"steps": 16, "hidden": 8, "batch": 4}


def batch_sweep(device_type: str, dry_run: bool = False) -> tuple[Row, ...]:
    """The batch-size sweep of one shape (for the microseconds-per-step plot)."""
    if device_type == "cuda" and not dry_run:
        base, batches = GPU_MATRIX[1], (1, 8, 32, 64, 128, 256)  # L2's shape
    elif dry_run:
        base, batches = GPU_MATRIX[1].scaled(**DRY_RUN_DIVISORS), (1, 4, 16)
    else:
        base, batches = CPU_MATRIX[0], (1, 4, 16, 64)
    return tuple(dataclasses.replace(base, name=f"S{b}", batch=b) for b in batches)


def select(rows: tuple[Row, ...], names: str | None) -> tuple[Row, ...]:
    """The rows named in ``names`` (comma separated, case-insensitive), in matrix order."""
    if not names:
        return rows
    wanted = [n.strip().upper() for n in names.split(",") if n.strip()]
    known = {r.name.upper() for r in rows}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"unknown row(s) {', '.join(unknown)}; this matrix has {', '.join(r.name for r in rows)}")
    return tuple(r for r in rows if r.name.upper() in wanted)
