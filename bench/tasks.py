"""Synthetic tasks of the five topologies, each with its fastrnn module and its torch.nn twin.

The topology section of ``python -m bench`` (:mod:`bench.topologies`) times a training step of
each module against the matching ``torch.nn`` construction and trains both on the task. The
tasks are those of the convergence tests (``tests/test_topologies.py``), redefined here at the
benchmark's sizes (the bench imports nothing from ``tests/``):

============ ============ ===== ========================================================================
task         module       cell  what is learned
============ ============ ===== ========================================================================
adding       ManyToOne    LSTM  sum of the two marked values in a sequence (predicting the mean: 1/6)
echo         ManyToMany   GRU   ``y_t = x_{t-2}``, variable lengths, masked MSE (predicting 0: about 0.9)
rotation     OneToMany    RNN   points of a circle from the first, each output fed back (0: 0.5)
reversal     Seq2Seq      GRU   2..n numbers reversed, zero-padded, teacher forcing (0: about 0.6)
product      OneToOne     LSTM  ``x1 * x2`` on ``[-1, 1]^2`` in one step (predicting 0: 1/9)
============ ============ ===== ========================================================================

Each ``torch.nn`` twin is built from ``torch.nn.LSTM``/``GRU``/``RNN`` (batch-first) and an
``nn.Linear`` head; where fastrnn generates with feedback (``OneToMany``, ``Seq2Seq.generate``)
it is a Python loop of ``torch.nn`` cells. Its weights are the fastrnn module's, loaded with
``load_state_dict``; :meth:`Twin.sources` names which fastrnn parameter each of its own came
from, so gradients can be compared name by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastrnn import ManyToMany, ManyToOne, OneToMany, OneToOne, Seq2Seq

#: Shared sizes: batch and hidden size of every task, and the sequence lengths.
BATCH = 32
HIDDEN = 32
ADDING_STEPS = 40
ECHO_STEPS = 40  # lengths uniform in [ECHO_STEPS // 4, ECHO_STEPS]
ECHO_DELAY = 2
ROTATION_STEPS = 20
ROTATION_OMEGA = 0.5
REVERSAL_STEPS = 8  # source lengths uniform in [2, REVERSAL_STEPS]
#: Training run of each task: Adam, this many steps (the adding problem sits at the mean's loss
#: for about 300 steps before the LSTM finds the markers, so it gets more).
TRAIN_STEPS = 300
ADDING_TRAIN_STEPS = 500

_LAYER_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_TORCH_LAYER = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}
_TORCH_CELL = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}


# ---------------------------------------------------------------------------- torch.nn twins
def _layer_sources(prefix: str, fast_prefix: str, layer: nn.Module) -> dict[str, str]:
    """``torch.nn`` layer parameter -> the fastrnn layer's (the names are the same)."""
    names = [name for name in _LAYER_PARAMS if getattr(layer, f"{name}_l0", None) is not None]
    return {f"{prefix}.{name}_l0": f"{fast_prefix}.{name}_l0" for name in names}


def _cell_sources(prefix: str, fast_prefix: str, cell: nn.Module) -> dict[str, str]:
    """``torch.nn`` cell parameter -> the fastrnn layer's (``weight_ih`` is ``weight_ih_l0``)."""
    names = [name for name in _LAYER_PARAMS if getattr(cell, name, None) is not None]
    return {f"{prefix}.{name}": f"{fast_prefix}.{name}_l0" for name in names}


def _head_sources(prefix: str = "head") -> dict[str, str]:
    return {f"{prefix}.weight": "head.weight", f"{prefix}.bias": "head.bias"}


def _torch_layer(fast_layer) -> nn.Module:
    cell = type(fast_layer).__name__.lower()
    extra = {"nonlinearity": fast_layer.nonlinearity} if cell == "rnn" else {}
    return _TORCH_LAYER[cell](fast_layer.input_size, fast_layer.hidden_size, batch_first=True, **extra)


def _torch_cell(fast_layer) -> nn.Module:
    cell = type(fast_layer).__name__.lower()
    extra = {"nonlinearity": fast_layer.nonlinearity} if cell == "rnn" else {}
    return _TORCH_CELL[cell](fast_layer.input_size, fast_layer.hidden_size, **extra)


class Twin(nn.Module):
    """A ``torch.nn`` construction computing what a fastrnn topology module computes."""

    def sources(self) -> dict[str, str]:
        """Own parameter name -> the fastrnn module's parameter it was loaded from."""
        raise NotImplementedError

    def load_from(self, fast: nn.Module) -> Twin:
        state = fast.state_dict()
        self.load_state_dict({mine: state[theirs] for mine, theirs in self.sources().items()})
        return self


class LayerAndHeadTwin(Twin):
    """The twin of a module that is a layer ``.rnn`` and a head ``.head`` (ManyToMany, ManyToOne,
    OneToOne): a torch.nn layer and an ``nn.Linear``."""

    def __init__(self, fast: nn.Module):
        super().__init__()
        self.rnn, self.head = _torch_layer(fast.rnn), nn.Linear(fast.head.in_features, fast.head.out_features)
        self.load_from(fast)

    def sources(self):
        return {**_layer_sources("rnn", "rnn", self.rnn), **_head_sources()}


def _cell_loop(cell: nn.Module, head: nn.Module, x: Tensor, steps: int, state=None) -> Tensor:
    """Free-running generation with torch.nn cells: each output is the next input."""
    outputs = []
    for _ in range(steps):
        state = cell(x, state)
        x = head(state[0] if isinstance(state, tuple) else state)
        outputs.append(x)
    return torch.stack(outputs, dim=1)


class TorchManyToOne(LayerAndHeadTwin):
    def forward(self, x):
        _, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(h_n[-1])


class TorchManyToMany(LayerAndHeadTwin):
    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=x.shape[1])
        mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths.to(x.device)[:, None])[..., None]
        return torch.where(mask, self.head(out), 0.0)


class TorchOneToMany(Twin):
    """Feedback generation: a loop of ``torch.nn`` cells holding the layer's weights."""

    def __init__(self, fast: OneToMany):
        super().__init__()
        self.cell, self.head = _torch_cell(fast.rnn), nn.Linear(fast.head.in_features, fast.head.out_features)
        self.load_from(fast)

    def sources(self):
        return {**_cell_sources("cell", "rnn", self.cell), **_head_sources()}

    def forward(self, x0, steps):
        return _cell_loop(self.cell, self.head, x0, steps)


class TorchSeq2Seq(Twin):
    """Teacher forcing: ``torch.nn`` encoder layer into ``torch.nn`` decoder layer. ``generate``:
    the decoder as a loop of ``torch.nn`` cells (``decoder_cell``, which shares the decoder layer's
    parameter tensors) fed its own outputs."""

    def __init__(self, fast: Seq2Seq):
        super().__init__()
        self.encoder, self.decoder = _torch_layer(fast.encoder), _torch_layer(fast.decoder)
        self.head = nn.Linear(fast.head.in_features, fast.head.out_features)
        self.decoder_cell = _torch_cell(fast.decoder)
        for name in _LAYER_PARAMS:  # one set of decoder weights, two ways to run it
            setattr(self.decoder_cell, name, getattr(self.decoder, f"{name}_l0"))
        self.load_from(fast)

    def sources(self):
        return {**_layer_sources("encoder", "encoder", self.encoder), **_layer_sources("decoder", "decoder", self.decoder),
                **_cell_sources("decoder_cell", "decoder", self.decoder_cell), **_head_sources()}

    def encode(self, src, src_lengths):
        _, state = self.encoder(pack_padded_sequence(src, src_lengths.cpu(), batch_first=True, enforce_sorted=False))
        return state

    def forward(self, src, tgt_in, src_lengths):
        return self.head(self.decoder(tgt_in, self.encode(src, src_lengths))[0])

    def generate(self, src, steps, src_lengths):
        state = self.encode(src, src_lengths)
        state = tuple(s[-1] for s in state) if isinstance(state, tuple) else state[-1]
        start = src.new_zeros(src.shape[0], self.head.out_features)
        return _cell_loop(self.decoder_cell, self.head, start, steps, state)


class TorchOneToOne(LayerAndHeadTwin):
    def forward(self, x):
        return self.head(self.rnn(x[:, None])[0][:, 0])


# ------------------------------------------------------------------------------------- tasks
Batch = tuple  # the tensors a task's loss takes after the model


@dataclass(frozen=True)
class Task:
    """A synthetic task for one topology module.

    ``batch(generator, device)`` draws a batch; ``loss(model, *batch)`` is the training loss
    (the same code serves the fastrnn module and its twin); ``build(device)`` gives the seeded
    fastrnn module and its twin with the same weights; ``baseline`` is the loss of a trivial
    predictor (named by ``baseline_label``), for scale; ``lr`` and ``steps`` set the training run
    (Adam).
    """

    name: str
    title: str
    topology: str
    cell: str
    shape: str
    build_fast: Callable[[], nn.Module]
    twin: Callable[[nn.Module], Twin]
    batch: Callable[[torch.Generator, torch.device], Batch]
    loss: Callable[..., Tensor]
    lr: float
    baseline: float
    baseline_label: str
    steps: int = TRAIN_STEPS

    def build(self, device: torch.device, seed: int = 0) -> tuple[nn.Module, Twin]:
        torch.manual_seed(seed)
        fast = self.build_fast()
        return fast.to(device), self.twin(fast).to(device)


def adding_problem(batch: int, steps: int, g: torch.Generator, device=None) -> Batch:
    """Values in [0, 1] and a marker channel with two ones, one in each half; the target is the
    sum of the two marked values. Returns ``x (batch, steps, 2)`` and ``y (batch, 1)``."""
    values = torch.rand(batch, steps, generator=g)
    markers = torch.zeros(batch, steps)
    rows = torch.arange(batch)
    markers[rows, torch.randint(0, steps // 2, (batch,), generator=g)] = 1
    markers[rows, torch.randint(steps // 2, steps, (batch,), generator=g)] = 1
    x, y = torch.stack([values, markers], dim=-1), (values * markers).sum(1, keepdim=True)
    return x.to(device), y.to(device)


def _adding_batch(g: torch.Generator, device) -> Batch:
    return adding_problem(BATCH, ADDING_STEPS, g, device)


def _mse(model, x, y):
    return F.mse_loss(model(x), y)


def _echo_batch(g: torch.Generator, device) -> Batch:
    x = torch.randn(BATCH, ECHO_STEPS, 1, generator=g)
    lengths = torch.randint(ECHO_STEPS // 4, ECHO_STEPS + 1, (BATCH,), generator=g)
    lengths[0] = ECHO_STEPS
    y = torch.zeros_like(x)
    y[:, ECHO_DELAY:] = x[:, :-ECHO_DELAY]
    return x.to(device), y.to(device), lengths


def _echo_loss(model, x, y, lengths):
    mask = (torch.arange(x.shape[1], device=x.device)[None] < lengths.to(x.device)[:, None])[..., None]
    return ((model(x, lengths) - y) ** 2 * mask).sum() / mask.sum()


def _rotation_batch(g: torch.Generator, device) -> Batch:
    theta = torch.rand(BATCH, generator=g) * 2 * math.pi
    angles = theta[:, None] + ROTATION_OMEGA * torch.arange(1, ROTATION_STEPS + 1)[None]
    x0 = torch.stack([theta.cos(), theta.sin()], -1)
    return x0.to(device), torch.stack([angles.cos(), angles.sin()], -1).to(device)


def _rotation_loss(model, x0, y):
    return F.mse_loss(model(x0, y.shape[1]), y)


def _reversal_batch(g: torch.Generator, device) -> Batch:
    src = torch.randn(BATCH, REVERSAL_STEPS, 1, generator=g)
    lengths = torch.randint(2, REVERSAL_STEPS + 1, (BATCH,), generator=g)
    tgt = torch.zeros_like(src)
    for row, length in enumerate(lengths.tolist()):
        tgt[row, :length] = src[row, :length].flip(0)
    tgt_in = torch.cat([torch.zeros(BATCH, 1, 1), tgt[:, :-1]], dim=1)
    return src.to(device), tgt.to(device), tgt_in.to(device), lengths


def _reversal_loss(model, src, tgt, tgt_in, lengths):
    return F.mse_loss(model(src, tgt_in, lengths), tgt)


def reversal_generate_loss(model, src, tgt, tgt_in, lengths):
    """The reversal loss with the decoder running free (each output fed back), no teacher forcing."""
    return F.mse_loss(model.generate(src, tgt.shape[1], lengths), tgt)


def _product_batch(g: torch.Generator, device) -> Batch:
    x = torch.rand(BATCH, 2, generator=g) * 2 - 1
    return x.to(device), (x[:, :1] * x[:, 1:]).to(device)


TASKS: tuple[Task, ...] = (
    Task("adding", "adding problem", "ManyToOne", "lstm", f"B{BATCH} T{ADDING_STEPS} I2 H{HIDDEN} O1",
         lambda: ManyToOne(2, HIDDEN, 1, cell="lstm"), TorchManyToOne, _adding_batch, _mse, 2e-2,
         1 / 6, "predict the mean", ADDING_TRAIN_STEPS),
    Task("echo", "delayed echo", "ManyToMany", "gru", f"B{BATCH} T<={ECHO_STEPS} I1 H{HIDDEN} O1 packed",
         lambda: ManyToMany(1, HIDDEN, 1, cell="gru"), TorchManyToMany, _echo_batch, _echo_loss, 1e-2,
         1 - ECHO_DELAY / ((ECHO_STEPS // 4 + ECHO_STEPS) / 2), "predict 0"),
    Task("rotation", "circle rotation", "OneToMany", "rnn", f"B{BATCH} S{ROTATION_STEPS} I2 H{HIDDEN} O2 feedback",
         lambda: OneToMany(2, HIDDEN, 2, cell="rnn"), TorchOneToMany, _rotation_batch, _rotation_loss, 1e-2,
         0.5, "predict 0"),
    Task("reversal", "sequence reversal", "Seq2Seq", "gru",
         f"B{BATCH} n<={REVERSAL_STEPS} m{REVERSAL_STEPS} I1 H{HIDDEN} O1",
         lambda: Seq2Seq(1, HIDDEN, 1, cell="gru"), TorchSeq2Seq, _reversal_batch, _reversal_loss, 1e-2,
         (2 + REVERSAL_STEPS) / 2 / REVERSAL_STEPS, "predict 0"),
    Task("product", "product", "OneToOne", "lstm", f"B{BATCH} I2 H{HIDDEN} O1",
         lambda: OneToOne(2, HIDDEN, 1, cell="lstm"), TorchOneToOne, _product_batch, _mse, 1e-2,
         1 / 9, "predict 0"),
)


def task(name: str) -> Task:
    return next(t for t in TASKS if t.name == name)
