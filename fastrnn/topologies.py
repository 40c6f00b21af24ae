"""Ready modules for the five shapes a recurrent network comes in.

================ ======================================= ==========================================
module           forward                                 what it is
================ ======================================= ==========================================
``ManyToMany``   ``(x, lengths=None) -> (B, T, O)``      ``y_t = head(h_t)``; zeros at padded steps
``ManyToOne``    ``(x, lengths=None) -> (B, O)``         ``head`` of each row's last valid state
                                                         (bidirectional: last forward state with the
                                                         backward state after the first step)
``OneToMany``    ``(x0, steps, h0=None) -> (B, S, O)``   ``feedback=True``: each output is the next
                                                         step's input; else ``x0`` at every step
``Seq2Seq``      ``(src, tgt_in, src_lengths=None)``     encoder final state into the decoder,
                 ``-> (B, m, O)``; ``generate(src,       teacher forcing; ``generate`` runs the
                 steps, src_lengths=None)``              decoder free with feedback
``OneToOne``     ``(x) -> (B, O)``                       one recurrent step from the zero state
================ ======================================= ==========================================

Tensors are batch-first. ``cell`` is ``"rnn"``, ``"gru"`` or ``"lstm"``, or one of the cells beyond
torch.nn: ``"indrnn"`` (:class:`fastrnn.IndRNN`), ``"lnlstm"`` (:class:`fastrnn.LayerNormLSTM`),
``"lngru"`` (:class:`fastrnn.LayerNormGRU`); ``nonlinearity`` (``"tanh"``/``"relu"``) applies to
``"rnn"`` and ``"indrnn"``. Free-running generation with those three runs the layer one step at a
time. The recurrent layers (``batch_first=True``) are exposed as ``.rnn``
(``.encoder`` and ``.decoder`` for ``Seq2Seq``), so every module runs on the path its layers'
calls take (:mod:`fastrnn.routing`; ``fastrnn.explain(module, x)`` names it).
Their parameters carry ``torch.nn``'s names, and the head's are an ``nn.Linear``'s (``head.weight``,
``head.bias``), so a ``torch.nn`` construction with attributes of the same names (a layer ``rnn``
and an ``nn.Linear`` ``head``) loads the module's ``state_dict`` as it is, and back.

Variable lengths go through ``pack_padded_sequence(..., enforce_sorted=False)``: a padded row
gives the same result as the row alone, whatever the padding holds.

Free-running generation (``OneToMany`` with feedback, ``Seq2Seq.generate``) feeds each output
back as the next input. On CUDA (or with the Triton backend forced), for a single-layer
unidirectional Elman RNN, GRU or LSTM (no projection) with an identity/tanh/sigmoid head, the
whole generation (recurrence, head and feedback, forward and backward) is one kernel launch each
way (:mod:`fastrnn.ops.feedback`), within the kernel's size limits. Everything else runs the
plain loop of cell steps of :mod:`fastrnn.reference` with the layer's own parameters, which is
also the oracle the kernel is tested against.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from fastrnn import routing
from fastrnn.indrnn import IndRNN
from fastrnn.layer_norm_rnn import LayerNormGRU, LayerNormLSTM
from fastrnn.layers import _MODES, GRU, LSTM, RNN, RecurrentBase
from fastrnn.reference import gru_step, lstm_step, rnn_step
from fastrnn.stacked import StackedRecurrence

__all__ = ["OutputHead", "ManyToMany", "ManyToOne", "OneToMany", "Seq2Seq", "OneToOne"]

CELLS = {"rnn": RNN, "gru": GRU, "lstm": LSTM, "indrnn": IndRNN, "lnlstm": LayerNormLSTM, "lngru": LayerNormGRU}

#: Output activations by name.
ACTIVATIONS: dict[str | None, Callable[[], nn.Module]] = {
    None: nn.Identity,
    "identity": nn.Identity,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
}

#: Activations the fused generation kernel knows, by the code it takes.
FUSED_ACTIVATIONS = {"identity": 0, "tanh": 1, "sigmoid": 2}


# ------------------------------------------------------------------------------------- the head
class _Function(nn.Module):
    """A plain callable as a module (so the head is always ``Linear`` then a module)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _activation_kind(module: nn.Module) -> str | None:
    """``"identity"``, ``"tanh"`` or ``"sigmoid"`` when ``module`` is one of them, else None."""
    for kind, cls in (("identity", nn.Identity), ("tanh", nn.Tanh), ("sigmoid", nn.Sigmoid)):
        if type(module) is cls:
            return kind
    if isinstance(module, _Function):
        known = {torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid"}
        return known.get(module.fn)
    return None


class OutputHead(nn.Module):
    """``activation(h @ weight.T + bias)``: ``weight (out_features, in_features)`` and ``bias
    (out_features,)`` are an ``nn.Linear``'s, with its names and initialisation, so the head's
    ``state_dict`` loads into a plain ``nn.Linear`` and back (``activation`` adds keys only if it
    has parameters of its own). ``activation`` is given as a name (``None``/``"identity"``,
    ``"tanh"``, ``"sigmoid"``, ``"relu"``), an ``nn.Module`` or any callable.

    State dicts from before the head was flattened (``linear.weight``, ``linear.bias``) still load:
    a load pre-hook renames them."""

    def __init__(self, in_features: int, out_features: int, activation=None, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()
        if isinstance(activation, nn.Module):
            self.activation = activation
        elif callable(activation):
            self.activation = _Function(activation)
        elif activation in ACTIVATIONS:
            self.activation = ACTIVATIONS[activation]()
        else:
            names = ", ".join(repr(name) for name in ACTIVATIONS)
            raise ValueError(f"unknown output_activation {activation!r}; give a callable, an nn.Module or one of {names}")
        self.register_load_state_dict_pre_hook(_rename_nested_linear_keys)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation, the same draws in the same order: both uniform in
        ``+-1/sqrt(in_features)`` (``kaiming_uniform_`` with ``a=sqrt(5)`` is that bound)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def kind(self) -> str | None:
        """The activation as the fused kernel names it (``"identity"``, ``"tanh"``, ``"sigmoid"``) or None."""
        return _activation_kind(self.activation)

    def forward(self, h: Tensor) -> Tensor:
        return self.activation(F.linear(h, self.weight, self.bias))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _rename_nested_linear_keys(module, state_dict, prefix, *_) -> None:
    """Load pre-hook of :class:`OutputHead`: ``<prefix>linear.weight`` / ``linear.bias`` (the
    head's keys when it held an ``nn.Linear`` as ``.linear``) become ``<prefix>weight`` / ``bias``."""
    for name in ("weight", "bias"):
        old = f"{prefix}linear.{name}"
        if old in state_dict and f"{prefix}{name}" not in state_dict:
            state_dict[f"{prefix}{name}"] = state_dict.pop(old)


# ------------------------------------------------------------------------------------ helpers
def recurrent_layer(
    cell: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    nonlinearity: str = "tanh",
    bias: bool = True,
    dropout: float = 0.0,
    bidirectional: bool = False,
    device=None,
    dtype=None,
    grad_clip: float | None = None,
) -> RecurrentBase:
    """A batch-first :class:`fastrnn.RNN`, ``GRU`` or ``LSTM`` (``grad_clip``: clipping inside BPTT)."""
    if cell not in CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose one of {', '.join(map(repr, CELLS))}")
    kwargs = dict(num_layers=num_layers, bias=bias, batch_first=True, dropout=dropout, bidirectional=bidirectional,
                  device=device, dtype=dtype, grad_clip=grad_clip)
    if cell in ("rnn", "indrnn"):
        return CELLS[cell](input_size, hidden_size, nonlinearity=nonlinearity, **kwargs)
    if nonlinearity != "tanh":
        raise ValueError(f"nonlinearity applies to cell='rnn' and 'indrnn' only (got nonlinearity={nonlinearity!r} with cell={cell!r})")
    return CELLS[cell](input_size, hidden_size, **kwargs)


def _cell_name(layer: RecurrentBase) -> str:
    if isinstance(layer, StackedRecurrence):
        return next(name for name, cls in CELLS.items() if type(layer) is cls)
    return _MODES[layer.mode][0]


def _hidden(state) -> Tensor:
    """``h_n`` of a layer's final state (an LSTM's state is ``(h_n, c_n)``)."""
    return state[0] if isinstance(state, tuple) else state


def _lengths_cpu(lengths, x: Tensor) -> Tensor:
    """``lengths`` as int64 on the CPU (what packing wants), checked against ``x (B, T, ...)``."""
    lengths = torch.as_tensor(lengths).to(device="cpu", dtype=torch.int64)
    if lengths.shape != (x.shape[0],):
        raise ValueError(f"lengths must have shape ({x.shape[0]},), one per row; got {tuple(lengths.shape)}")
    if len(lengths) and not torch.compiler.is_compiling() and (lengths.min() < 1 or lengths.max() > x.shape[1]):
        raise ValueError(f"lengths must lie in [1, {x.shape[1]}] (the padded length); got {lengths.tolist()}")
    return lengths


def run_layer(layer: RecurrentBase, x: Tensor, lengths=None, hx=None):
    """Run a batch-first layer on ``x (B, T, I)``; with ``lengths`` through a ``PackedSequence``.

    Returns ``output (B, T, D*H)`` (zero past each row's length) and the layer's final state,
    which with ``lengths`` is each row's state at its own last valid step. An empty batch (B=0)
    gives the layer's empty results, with or without ``lengths``."""
    if lengths is None:
        return layer(x, hx)
    lengths = _lengths_cpu(lengths, x)
    if x.shape[0] == 0:  # torch cannot pack an empty batch; the layer takes B=0 as it is
        return layer(x, hx)
    regularized = getattr(layer, "zoneout", 0) or (getattr(layer, "recurrent_dropout", 0) and layer.training)
    if torch.compiler.is_compiling() and (isinstance(layer, StackedRecurrence) or (isinstance(layer, RecurrentBase)
                                                                                   and not regularized)):
        return layer.forward_lengths(x, lengths, hx)  # packing has value-dependent shapes: padded with lengths
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    output, state = layer(packed, hx)
    output, _ = pad_packed_sequence(output, batch_first=True, total_length=x.shape[1])
    return output, state


def _step_mask(lengths, x: Tensor) -> Tensor:
    """``(B, T, 1)`` bool: step ``t`` of row ``b`` is valid."""
    lengths = _lengths_cpu(lengths, x).to(x.device)
    return (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None])[..., None]


# -------------------------------------------------------------------------- free-running loop
def _initial_state(layer: RecurrentBase, batch: int, like: Tensor, hx) -> list[tuple[Tensor, Tensor | None]]:
    """Per layer ``(h, c)`` (``c`` None unless LSTM) from ``hx`` as the layer takes it, or zeros."""
    lstm = _cell_name(layer) == "lstm"
    if hx is None:
        zeros = torch.zeros(layer.num_layers, batch, layer.hidden_size, dtype=like.dtype, device=like.device)
        h0, c0 = zeros, (zeros if lstm else None)
    elif lstm:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    expected = (layer.num_layers, batch, layer.hidden_size)
    for state in (h0, c0):
        if state is not None and tuple(state.shape) != expected:
            raise RuntimeError(f"Expected hidden size {expected}, got {list(state.shape)}")
    return [(h0[i], None if c0 is None else c0[i]) for i in range(layer.num_layers)]


def _stack_state(layer: RecurrentBase, states: list[tuple[Tensor, Tensor | None]]):
    h = torch.stack([h for h, _ in states])
    return (h, torch.stack([c for _, c in states])) if _cell_name(layer) == "lstm" else h


def cell_step(layer: RecurrentBase, x: Tensor, states: list[tuple[Tensor, Tensor | None]]):
    """One time step of every layer of ``layer`` (unidirectional), as its cells would compute it:
    ``x (B, I)`` -> top layer's ``h (B, H)`` and the new per-layer states. Dropout between layers
    in training mode and ``grad_clip``, as the layer applies them."""
    cell = _cell_name(layer)
    new_states = []
    for index, (p, (h, c)) in enumerate(zip(layer._layer_params(), states)):
        p = p[0]
        if index > 0 and layer.dropout > 0 and layer.training:
            x = F.dropout(x, layer.dropout, training=True)
        gx = F.linear(x, p["w_ih"], p["b_ih"])
        clip = layer.grad_clip
        if cell == "rnn":
            h, c = rnn_step(gx, h, p["w_hh"], p["b_hh"], layer.nonlinearity, clip), None
        elif cell == "gru":
            h = gru_step(gx, h, p["w_hh"], p["b_hh"], clip)
        else:
            h, c = lstm_step(gx, h, c, p["w_hh"], p["b_hh"], grad_clip=clip)
        new_states.append((h, c))
        x = h
    return x, new_states


def _fused_generation(layer: RecurrentBase, head: OutputHead, x0: Tensor):
    """The launcher of the fused generation kernel when :func:`fastrnn.routing.route_generation`
    chooses it for this configuration, else None."""
    if routing.route_generation(layer, head, x0).path != "triton":
        return None
    return importlib.import_module("fastrnn.ops.feedback").generate


def free_run(layer: RecurrentBase, head: OutputHead, x0: Tensor, steps: int, hx=None):
    """Free-running generation with feedback: ``x_0 = x0``, ``y_t = head(h_t)``, ``x_{t+1} = y_t``.

    ``x0 (B, I)``, where ``I`` (the layer's input size) equals ``O = head.out_features``; ``hx`` as
    the layer takes it (or None).
    Returns ``y (B, steps, O)`` and the final state in the layer's form."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if layer.bidirectional:
        raise ValueError("free-running generation needs a unidirectional layer")
    if head.out_features != layer.input_size:
        raise ValueError(f"feedback needs the layer's input size ({layer.input_size}) to equal the output size ({head.out_features})")
    if x0.dim() != 2 or x0.shape[1] != layer.input_size:
        raise ValueError(f"x0 must be (B, {layer.input_size}), got shape {tuple(x0.shape)}")
    batch = x0.shape[0]
    if isinstance(layer, StackedRecurrence):
        return _free_run_stepwise(layer, head, x0, steps, hx)
    states = _initial_state(layer, batch, x0, hx)
    if steps == 0:
        return x0.new_zeros(batch, 0, head.out_features), _stack_state(layer, states)
    fused = _fused_generation(layer, head, x0)
    if fused is not None:
        p = layer._layer_params()[0][0]
        h0, c0 = states[0]
        nonlinearity = getattr(layer, "nonlinearity", "tanh")  # Elman only
        y, h_n, c_n = fused(_cell_name(layer), x0, h0, c0, p, head, nonlinearity, steps, layer.grad_clip)
        return y, (h_n[None] if c_n is None else (h_n[None], c_n[None]))
    outputs = []
    x = x0
    for _ in range(steps):
        h, states = cell_step(layer, x, states)
        x = head(h)
        outputs.append(x)
    return torch.stack(outputs, dim=1), _stack_state(layer, states)


def _free_run_stepwise(layer: StackedRecurrence, head: OutputHead, x0: Tensor, steps: int, hx=None):
    """Free-running generation for the cells beyond torch.nn: the layer runs one step at a time
    (``x (B, 1, I)`` with the state carried), its output through the head is the next input."""
    state = hx
    if state is None:
        zeros = x0.new_zeros(layer.num_layers, x0.shape[0], layer.hidden_size)
        state = (zeros, zeros) if layer.HAS_CELL else zeros
    outputs, x = [], x0
    for _ in range(steps):
        y, state = layer(x[:, None], state)
        x = head(y[:, 0])
        outputs.append(x)
    if not outputs:
        return x0.new_zeros(x0.shape[0], 0, head.out_features), state
    return torch.stack(outputs, dim=1), state


# ------------------------------------------------------------------------------------ modules
class _Topology(nn.Module):
    def extra_repr(self) -> str:
        return f"cell={self.cell!r}"


class _LayerAndHead(_Topology):
    """A recurrent layer ``.rnn`` and a head ``.head`` reading its ``D*H`` features."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, cell: str = "lstm", num_layers: int = 1,
                 nonlinearity: str = "tanh", bidirectional: bool = False, dropout: float = 0.0, bias: bool = True,
                 output_activation=None, device=None, dtype=None, grad_clip: float | None = None):
        super().__init__()
        self.cell = cell
        self.rnn = recurrent_layer(cell, input_size, hidden_size, num_layers, nonlinearity, bias, dropout, bidirectional, device, dtype, grad_clip)
        directions = 2 if bidirectional else 1
        self.head = OutputHead(directions * hidden_size, output_size, output_activation, device=device, dtype=dtype)


class ManyToMany(_LayerAndHead):
    """``y_t = head(h_t)`` at every step: ``forward(x (B, T, I), lengths=None) -> (B, T, O)``,
    zero at the padded steps of each row. ``.rnn`` is the recurrent layer, ``.head`` the head
    (its input is ``D*H``, both directions when bidirectional)."""

    def forward(self, x: Tensor, lengths=None) -> Tensor:
        output, _ = run_layer(self.rnn, x, lengths)
        y = self.head(output)
        if lengths is not None:
            y = torch.where(_step_mask(lengths, x), y, torch.zeros_like(y))
        return y


class ManyToOne(_LayerAndHead):
    """One output per sequence: ``forward(x (B, T, I), lengths=None) -> (B, O)`` from the top
    layer's state at each row's last valid step; bidirectional: that forward state concatenated
    with the backward state after reading the first step (the top layer's ``h_n``)."""

    def features(self, x: Tensor, lengths=None) -> Tensor:
        """What the head reads: ``(B, D*H)``."""
        _, state = run_layer(self.rnn, x, lengths)
        h_n = _hidden(state)  # (L*D, B, H)
        directions = 2 if self.rnn.bidirectional else 1
        return torch.cat(list(h_n[-directions:]), dim=-1)

    def forward(self, x: Tensor, lengths=None) -> Tensor:
        return self.head(self.features(x, lengths))


class OneToMany(_Topology):
    """A sequence from one input: ``forward(x0 (B, I), steps, h0=None) -> (B, steps, O)``.

    ``feedback=True`` (needs ``input_size == output_size``): ``x0`` is the first input and each
    output is the next step's input. ``feedback=False``: ``x0`` is the input at every step.
    ``h0`` is the layer's initial state, ``(num_layers, B, H)`` (LSTM: a pair), zeros if None."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, cell: str = "lstm", feedback: bool = True,
                 num_layers: int = 1, nonlinearity: str = "tanh", dropout: float = 0.0, bias: bool = True,
                 output_activation=None, device=None, dtype=None, grad_clip: float | None = None):
        super().__init__()
        if feedback and input_size != output_size:
            raise ValueError(f"feedback=True feeds each output back as the next input: needs input_size == output_size (got {input_size} and {output_size})")
        self.cell = cell
        self.feedback = feedback
        self.rnn = recurrent_layer(cell, input_size, hidden_size, num_layers, nonlinearity, bias, dropout, False, device, dtype, grad_clip)
        self.head = OutputHead(hidden_size, output_size, output_activation, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"cell={self.cell!r}, feedback={self.feedback}"

    def forward(self, x0: Tensor, steps: int, h0=None) -> Tensor:
        if x0.dim() != 2:
            raise ValueError(f"x0 must be (B, input_size), got shape {tuple(x0.shape)}")
        if not self.feedback:
            if steps == 0:
                return x0.new_zeros(x0.shape[0], 0, self.head.out_features)
            output, _ = self.rnn(x0[:, None].expand(-1, steps, -1), h0)
            return self.head(output)
        y, _ = free_run(self.rnn, self.head, x0, steps, h0)
        return y


class Seq2Seq(_Topology):
    """Encoder-decoder: the encoder's final state (each row's last valid step) starts the decoder.

    ``forward(src (B, n, I), tgt_in (B, m, O), src_lengths=None) -> (B, m, O)`` with teacher
    forcing (``tgt_in`` is the decoder's input: usually the target shifted right behind a start
    vector). ``generate(src, steps, src_lengths=None, start=None) -> (B, steps, O)`` runs the
    decoder free, feeding each output back, from ``start`` (default zeros, ``(B, O)``).
    ``.encoder``, ``.decoder`` (input size ``O``) and ``.head`` are the parts."""

    def __init__(self, input_size: int, hidden_size: int, output_size: int, cell: str = "lstm", num_layers: int = 1,
                 nonlinearity: str = "tanh", dropout: float = 0.0, bias: bool = True, output_activation=None,
                 device=None, dtype=None, grad_clip: float | None = None):
        super().__init__()
        self.cell = cell
        args = (num_layers, nonlinearity, bias, dropout, False, device, dtype, grad_clip)
        self.encoder = recurrent_layer(cell, input_size, hidden_size, *args)
        self.decoder = recurrent_layer(cell, output_size, hidden_size, *args)
        self.head = OutputHead(hidden_size, output_size, output_activation, device=device, dtype=dtype)

    def encode(self, src: Tensor, src_lengths=None):
        """The encoder's final state, in the layer's form (LSTM: ``(h_n, c_n)``)."""
        _, state = run_layer(self.encoder, src, src_lengths)
        return state

    def forward(self, src: Tensor, tgt_in: Tensor, src_lengths=None) -> Tensor:
        output, _ = self.decoder(tgt_in, self.encode(src, src_lengths))
        return self.head(output)

    def generate(self, src: Tensor, steps: int, src_lengths=None, start: Tensor | None = None) -> Tensor:
        if start is None:
            start = src.new_zeros(src.shape[0], self.head.out_features)
        y, _ = free_run(self.decoder, self.head, start, steps, self.encode(src, src_lengths))
        return y


class OneToOne(_LayerAndHead):
    """One recurrent step from the zero state: ``forward(x (B, I)) -> (B, O)``."""

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2:
            raise ValueError(f"x must be (B, input_size), got shape {tuple(x.shape)}")
        output, _ = self.rnn(x[:, None])
        return self.head(output[:, 0])
