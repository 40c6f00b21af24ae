"""What the layers fastrnn adds beyond torch.nn (``IndRNN``, ``LayerNormLSTM``, ``LayerNormGRU``) share.

* :class:`StackedRecurrence`: torch.nn's constructor checks and forward forms (unbatched,
  batched, ``batch_first``, ``PackedSequence`` sorted or not, ``h0``/``c0``), parameters named
  ``<kind>_l{layer}{_reverse}``, and the stack: a ``PackedSequence`` is padded once (time-major,
  per-row ``lengths``), layers run one after another with torch.nn's ``dropout`` between them,
  the output is packed again. A subclass declares its parameters and runs one layer (every
  direction) in ``_run_layer``. Options: ``zoneout``, ``recurrent_dropout`` and ``grad_clip``
  (see :mod:`fastrnn.regularization`).
* :func:`time_loop`: the reference walk through time of one direction, with per-row lengths
  (state frozen past a row's length, zero output there, the reverse direction starting at each
  row's own last step), zoneout of every state, and the gradient-flow record.
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastrnn import gradient_flow
from fastrnn.layers import RecurrentBase, _permute
from fastrnn.packing import lengths_from_batch_sizes, pack_padded, pad_packed
from fastrnn.regularization import check_probability, drop_connect, zoneout, zoneout_mask


def time_loop(
    step: Callable[[int, tuple[Tensor, ...]], tuple[Tensor, ...]],
    steps: int,
    state: tuple[Tensor, ...],
    lengths: Tensor | None = None,
    reverse: bool = False,
    zoneout_mask: Tensor | None = None,
    zoneout_p: float = 0.0,
    flow_record: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Walk one direction through time. ``step(t, state) -> new state`` (a tuple whose first
    element is ``h (B, H)``); ``zoneout_mask`` ``(T, B, H)`` in training (None: eval, ``zoneout_p``
    is then the expectation's weight); ``flow_record`` ``(T,)`` gets ``||dL/dh_t||`` in backward.
    Returns the outputs ``(T, B, H)`` (zero past a row's length) and the final state."""
    valid = None
    if lengths is not None:
        valid = torch.arange(steps, device=state[0].device)[:, None, None] < lengths.to(state[0].device)[None, :, None]
    outputs: list[Tensor | None] = [None] * steps
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        new = step(t, state)
        if zoneout_p:
            mask = None if zoneout_mask is None else zoneout_mask[t]
            new = tuple(zoneout(old, s, mask, zoneout_p) for old, s in zip(state, new))
        h_new = new[0]
        if flow_record is not None and h_new.requires_grad:
            h_new.register_hook(functools.partial(_record_norm, flow_record, t))
        if valid is None:
            state, outputs[t] = new, h_new
        else:
            state = tuple(torch.where(valid[t], s, old) for old, s in zip(state, new))
            outputs[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), state  # type: ignore[arg-type]


def _record_norm(record: Tensor, step: int, grad: Tensor) -> None:
    record[step] = grad.detach().double().norm().to(record.dtype)


class StackedRecurrence(nn.Module):
    """Base of the layers beyond torch.nn. Subclasses set ``NAME`` (for messages), ``HAS_CELL``
    (an LSTM's cell state), ``_parameter_shapes(layer_input_size)`` and ``_run_layer``."""

    NAME = "RNN"
    HAS_CELL = False

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, bidirectional: bool = False, device=None, dtype=None, *,
        zoneout: float = 0.0, recurrent_dropout: float = 0.0, grad_clip: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=3,
            )
        for name, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
            if value <= 0:
                raise ValueError(f"{name} must be greater than zero")
        if grad_clip is not None and (
            isinstance(grad_clip, bool) or not isinstance(grad_clip, numbers.Real) or not grad_clip > 0
        ):
            raise ValueError(f"grad_clip should be a positive number or None, got {grad_clip!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout = float(dropout)
        self.proj_size = 0
        self.zoneout = check_probability("zoneout", zoneout)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout, below_one=True)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self._all_weights: list[list[str]] = []
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                suffix = "_reverse" if direction == 1 else ""
                names = []
                for kind, shape in self._parameter_shapes(layer_input_size).items():
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
                    names.append(name)
                self._all_weights.append(names)
        self.reset_parameters()

    def _parameter_shapes(self, layer_input_size: int) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        raise NotImplementedError

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def _layer_params(self) -> list[list[dict[str, Tensor]]]:
        """``[layer][direction] -> {kind: parameter}``."""
        directions = 2 if self.bidirectional else 1
        return [
            [{name.rsplit("_l", 1)[0]: getattr(self, name) for name in self._all_weights[layer * directions + d]}
             for d in range(directions)]
            for layer in range(self.num_layers)
        ]

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = dict(num_layers=1, bias=True, batch_first=False, dropout=0.0, bidirectional=False,
                        zoneout=0.0, recurrent_dropout=0.0, grad_clip=None)
        for name, default in defaults.items():
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return s

    # ---------------------------------------------------------------------------------- forward
    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = batch_sizes = None
        is_batched = True
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{self.NAME}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
        want = 3 if is_batched else 2
        form = "batched 3-D" if is_batched else "unbatched 2-D"
        if hx is not None and self.HAS_CELL and (hx[0].dim() != want or hx[1].dim() != want):
            raise RuntimeError(
                f"For {form} input, hx and cx should also be {want}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
        if hx is not None and not self.HAS_CELL and hx.dim() != want:
            raise RuntimeError(f"For {form} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
        RecurrentBase.check_input(self, input, batch_sizes)
        hidden_size, _ = RecurrentBase._expected_sizes(self, input, batch_sizes, sorted_indices)
        if hx is None:
            h0 = torch.zeros(hidden_size, dtype=input.dtype, device=input.device)
            c0 = torch.zeros_like(h0) if self.HAS_CELL else None
        else:
            h0, c0 = hx if self.HAS_CELL else (hx, None)
            if not is_batched:
                h0, c0 = h0.unsqueeze(1), (None if c0 is None else c0.unsqueeze(1))
            RecurrentBase._check_state(self, h0, hidden_size, input, "Expected hidden[0] size {}, got {}" if self.HAS_CELL else "Expected hidden size {}, got {}")
            h0 = _permute(h0, sorted_indices)
            if c0 is not None:
                RecurrentBase._check_state(self, c0, hidden_size, input, "Expected hidden[1] size {}, got {}")
                c0 = _permute(c0, sorted_indices)

        output, h_n, c_n = self._run_stack(input, batch_sizes, h0, c0, sorted_indices)

        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        elif not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
        h_n = _permute(h_n, unsorted_indices)
        c_n = None if c_n is None else _permute(c_n, unsorted_indices)
        if not is_batched:
            h_n = h_n.squeeze(1)
            c_n = None if c_n is None else c_n.squeeze(1)
        return output, ((h_n, c_n) if self.HAS_CELL else h_n)

    def forward_lengths(self, input: Tensor, lengths: Tensor, hx=None):
        """Padded batched ``input`` (the layer's layout) with per-row ``lengths (B,)``, without packing:
        :meth:`fastrnn.layers.RecurrentBase.forward_lengths` for these layers (zoneout and
        DropConnect included; a zoneout mask's row ``b`` is row ``b`` of ``input``, as for packed input)."""
        if input.dim() != 3:
            raise ValueError(f"forward_lengths expects batched 3-D input, got {input.dim()}-D")
        RecurrentBase.check_input(self, input, None)
        hidden_size, _ = RecurrentBase._expected_sizes(self, input, None)
        if hx is None:
            h0 = torch.zeros(hidden_size, dtype=input.dtype, device=input.device)
            c0 = torch.zeros_like(h0) if self.HAS_CELL else None
        else:
            h0, c0 = hx if self.HAS_CELL else (hx, None)
            for state in (h0, c0) if self.HAS_CELL else (h0,):
                RecurrentBase._check_state(self, state, hidden_size, input, "Expected hidden size {}, got {}")
        output, h_n, c_n = self._run_stack(input, None, h0, c0, None, lengths)
        return output, ((h_n, c_n) if self.HAS_CELL else h_n)

    def _run_stack(self, input: Tensor, batch_sizes: Tensor | None, h0: Tensor, c0: Tensor | None,
                   sorted_indices: Tensor | None, lengths: Tensor | None = None):
        if lengths is not None:  # padded input with per-row lengths (forward_lengths)
            lengths = lengths.to(input.device)
        if batch_sizes is not None:  # fastrnn's registered pad/pack: Dynamo traces them (not torch.nn's)
            x = pad_packed(input, batch_sizes, h0.shape[1])
            lengths = lengths_from_batch_sizes(batch_sizes, h0.shape[1]).to(input.device)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        recorder = gradient_flow.active() if torch.is_grad_enabled() and not torch.compiler.is_compiling() else None
        directions = 2 if self.bidirectional else 1
        h_out, c_out = [], []
        for index, params in enumerate(self._layer_params()):
            if index > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, training=True)
            params = [dict(p, weight_hh=drop_connect(p["weight_hh"], self.recurrent_dropout, self.training)) for p in params]
            mask = zoneout_mask(self.zoneout, self.training, (x.shape[0], x.shape[1], directions * self.hidden_size), x)
            if mask is not None and sorted_indices is not None:
                mask = mask.index_select(1, sorted_indices.to(mask.device))  # row b of the mask is the caller's row b
            rows = slice(index * directions, (index + 1) * directions)
            record = None if recorder is None else recorder.new_record(self, index, directions, x.shape[0], x.device)
            x, h_n, c_n = self._run_layer(x, h0[rows], None if c0 is None else c0[rows], params, lengths, mask, record)
            h_out.append(h_n)
            c_out.append(c_n)
        if batch_sizes is not None:
            output = pack_padded(x, batch_sizes, input.shape[0])
        else:
            output = x.transpose(0, 1) if self.batch_first else x
        return output, torch.cat(h_out), (torch.cat(c_out) if c0 is not None else None)

    def _run_layer(self, x, h0, c0, params, lengths, zoneout_mask, flow_record):
        """One layer, every direction: ``x (T, B, I)``, ``h0``/``c0`` ``(D, B, H)``, ``params[d]``
        (``weight_hh`` already DropConnected), ``zoneout_mask (T, B, D*H)`` or None, ``flow_record
        (D, T)`` or None. Returns ``y (T, B, D*H)``, ``h_n (D, B, H)``, ``c_n`` or None."""
        raise NotImplementedError
