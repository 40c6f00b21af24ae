"""Drop-in ``fastrnn.RNN``, ``fastrnn.GRU`` and ``fastrnn.LSTM``: the contract of ``torch.nn``.

Same constructor arguments and checks, parameter names, shapes and initialisation, forward forms
(unbatched, batched, ``batch_first``, ``PackedSequence``) and errors as ``torch.nn.RNN/GRU/LSTM``.
They are plain ``nn.Module``s (not ``nn.RNNBase``), so ``torch.compile(fullgraph=True)`` traces them.

The forward pass validates like ``torch.nn``, then hands the stack to :mod:`fastrnn.dispatch`.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastrnn import dispatch
from fastrnn.reference import ACTIVATIONS, GATES

#: mode -> (cell, nonlinearity). torch.nn's modes, plus RNN_<NAME> for fastrnn's extra Elman
#: nonlinearities (sigmoid, hardtanh, silu, gelu).
_MODES = {f"RNN_{name.upper()}": ("rnn", name) for name in ACTIVATIONS} | {"GRU": ("gru", None), "LSTM": ("lstm", None)}


def _permute(hx: Tensor, permutation: Tensor | None) -> Tensor:
    return hx if permutation is None else hx.index_select(1, permutation)


class RecurrentBase(nn.Module):
    """What RNN, GRU and LSTM share: parameters, checks, forward plumbing (like ``nn.RNNBase``)."""

    #: fastrnn's regularisers (GRU and LSTM take them as keyword arguments; see fastrnn.regularization).
    zoneout = 0.0
    recurrent_dropout = 0.0

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        grad_clip: float | None = None,
    ) -> None:
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        if not isinstance(dropout, numbers.Number) or not 0 <= dropout <= 1 or isinstance(dropout, bool):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=3,
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        if not isinstance(input_size, int):
            raise TypeError(f"input_size should be of type int, got: {type(input_size).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if not isinstance(hidden_size, int):
            raise TypeError(f"hidden_size should be of type int, got: {type(hidden_size).__name__}")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")
        if mode not in _MODES:
            raise ValueError("Unrecognized RNN mode: " + mode)
        if grad_clip is not None and (
            isinstance(grad_clip, bool) or not isinstance(grad_clip, numbers.Real) or not grad_clip > 0
        ):
            raise ValueError(f"grad_clip should be a positive number or None, got {grad_clip!r}")

        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        #: fastrnn's extension: clamp each step's pre-activation gradient to [-grad_clip, grad_clip]
        #: inside backpropagation through time (None: off, gradients bit-identical to torch.nn's).
        self.grad_clip = None if grad_clip is None else float(grad_clip)

        cell, _ = _MODES[mode]
        gate_size = GATES[cell] * hidden_size
        num_directions = 2 if bidirectional else 1
        real_hidden_size = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            layer_input_size = input_size if layer == 0 else real_hidden_size * num_directions
            for direction in range(num_directions):
                suffix = "_reverse" if direction == 1 else ""
                shapes = {
                    "weight_ih": (gate_size, layer_input_size),
                    "weight_hh": (gate_size, real_hidden_size),
                }
                if bias:
                    shapes["bias_ih"] = (gate_size,)
                    shapes["bias_hh"] = (gate_size,)
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                names = []
                for kind, shape in shapes.items():
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory_kwargs)))
                    names.append(name)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- params
    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    @property
    def _flat_weights(self) -> list[Tensor]:
        """Parameters in ``torch.nn``'s flat order (what ``torch._VF`` takes)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def flatten_parameters(self) -> None:
        """Accepted for ``torch.nn`` compatibility; fastrnn keeps no flattened weight buffer."""

    def _layer_params(self) -> list[list[dict[str, Tensor | None]]]:
        """``[layer][direction] -> {w_ih, w_hh, b_ih, b_hh, w_hr}`` (missing ones None)."""
        num_directions = 2 if self.bidirectional else 1
        layers = []
        for layer in range(self.num_layers):
            directions = []
            for direction in range(num_directions):
                suffix = "_reverse" if direction == 1 else ""

                def get(kind: str) -> Tensor | None:
                    return getattr(self, f"{kind}_l{layer}{suffix}", None)

                directions.append(
                    {
                        "w_ih": get("weight_ih"),
                        "w_hh": get("weight_hh"),
                        "b_ih": get("bias_ih"),
                        "b_hh": get("bias_hh"),
                        "w_hr": get("weight_hr"),
                    }
                )
            layers.append(directions)
        return layers

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.grad_clip is not None:
            s += ", grad_clip={grad_clip}"
        return s.format(**self.__dict__)

    # ----------------------------------------------------------------------------------- checks
    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        weight_dtype = self.weight_ih_l0.dtype
        if input.dtype != weight_dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight_dtype}). "
                f"Convert input: input.to({weight_dtype}), or convert model: model.to({input.dtype})"
            )
        expected_input_dim = 2 if batch_sizes is not None else 3
        if input.dim() != expected_input_dim:
            raise RuntimeError(f"input must have {expected_input_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.size(-1)}"
            )
        steps = input.size(1) if self.batch_first and batch_sizes is None else input.size(0)
        if batch_sizes is None and steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    def _expected_sizes(
        self, input: Tensor, batch_sizes: Tensor | None, sorted_indices: Tensor | None = None
    ) -> tuple[tuple[int, int, int], ...]:
        if batch_sizes is not None and torch.compiler.is_compiling() and sorted_indices is not None:
            mini_batch = sorted_indices.shape[0]  # a shape, not a value of batch_sizes: no graph break
        elif batch_sizes is not None:
            mini_batch = int(batch_sizes[0])
        else:
            mini_batch = input.size(0) if self.batch_first else input.size(1)
        layers = self.num_layers * (2 if self.bidirectional else 1)
        hidden = (layers, mini_batch, self.proj_size if self.proj_size > 0 else self.hidden_size)
        return hidden, (layers, mini_batch, self.hidden_size)

    def _check_state(self, state: Tensor, expected: tuple[int, int, int], input: Tensor, msg: str) -> None:
        if state.size() != expected:
            raise RuntimeError(msg.format(expected, list(state.size())))
        if state.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(
                f"hidden state dtype ({state.dtype}) does not match input dtype ({input.dtype})"
            )
        if state.device != input.device:
            raise RuntimeError(
                f"Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {state.device}"
            )

    # ---------------------------------------------------------------------------------- forward
    def forward_lengths(self, input: Tensor, lengths: Tensor, hx=None):
        """Padded ``input`` (batched, in the layer's layout) with per-row ``lengths (B,)``, without
        packing: the result of ``forward`` on ``pack_padded_sequence(input, lengths,
        enforce_sorted=False)``, padded again (zeros past each row's length, the final state at
        each row's last valid step). Nothing in it depends on the values of ``lengths``, so
        ``torch.compile`` traces it without a graph break (what the topologies run while compiling)."""
        if input.dim() != 3:
            raise ValueError(f"forward_lengths expects batched 3-D input, got {input.dim()}-D")
        if self.zoneout or (self.recurrent_dropout and self.training):
            raise NotImplementedError("forward_lengths does not run zoneout / recurrent_dropout: pack the input")
        cell, nonlinearity = _MODES[self.mode]
        self.check_input(input, None)
        hidden_size, cell_size = self._expected_sizes(input, None)
        if hx is None:
            zeros = dict(dtype=input.dtype, device=input.device)
            h0 = torch.zeros(hidden_size, **zeros)
            c0 = torch.zeros(cell_size, **zeros) if cell == "lstm" else None
        elif cell == "lstm":
            h0, c0 = hx
            self._check_state(h0, hidden_size, input, "Expected hidden[0] size {}, got {}")
            self._check_state(c0, cell_size, input, "Expected hidden[1] size {}, got {}")
        else:
            h0, c0 = hx, None
            self._check_state(h0, hidden_size, input, "Expected hidden size {}, got {}")
        output, h_n, c_n = dispatch.run_stack(self, cell, nonlinearity, input, None, h0, c0, lengths=lengths)
        return output, ((h_n, c_n) if cell == "lstm" else h_n)

    def forward(self, input, hx=None):
        cell, nonlinearity = _MODES[self.mode]
        is_lstm = cell == "lstm"
        name = {"rnn": "RNN", "gru": "GRU", "lstm": "LSTM"}[cell]
        packed = isinstance(input, PackedSequence)
        sorted_indices = unsorted_indices = batch_sizes = None
        is_batched = True
        if packed:
            input, batch_sizes, sorted_indices, unsorted_indices = input
        else:
            if input.dim() not in (2, 3):
                got = f"{input.dim()}D tensor" if cell == "rnn" else f"{input.dim()}D"
                raise ValueError(f"{name}: Expected input to be 2D or 3D, got {got} instead")
            is_batched = input.dim() == 3
            if not is_batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
        if hx is not None and (is_lstm or not packed):
            # Rank of the states first, as torch.nn does (before it checks the input).
            want = 3 if is_batched else 2
            form = "batched 3-D" if is_batched else "unbatched 2-D"
            if is_lstm and (hx[0].dim() != want or hx[1].dim() != want):
                raise RuntimeError(
                    f"For {form} input, hx and cx should also be {want}-D but got "
                    f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if not is_lstm and hx.dim() != want:
                raise RuntimeError(f"For {form} input, hx should also be {want}-D but got {hx.dim()}-D tensor")
        self.check_input(input, batch_sizes)
        hidden_size, cell_size = self._expected_sizes(input, batch_sizes, sorted_indices)

        if hx is None:
            zeros = dict(dtype=input.dtype, device=input.device)
            h0 = torch.zeros(hidden_size, **zeros)
            c0 = torch.zeros(cell_size, **zeros) if is_lstm else None
        elif is_lstm:
            h0, c0 = hx
            if not is_batched:
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
            self._check_state(h0, hidden_size, input, "Expected hidden[0] size {}, got {}")
            self._check_state(c0, cell_size, input, "Expected hidden[1] size {}, got {}")
            h0, c0 = _permute(h0, sorted_indices), _permute(c0, sorted_indices)
        else:
            h0, c0 = (hx if is_batched else hx.unsqueeze(1)), None
            self._check_state(h0, hidden_size, input, "Expected hidden size {}, got {}")
            h0 = _permute(h0, sorted_indices)

        if self.zoneout or (self.recurrent_dropout and self.training):
            from fastrnn import regularized_rnn  # zoneout / DropConnect: fastrnn.regularized_rnn's loop

            output, h_n, c_n = regularized_rnn.run_stack(self, cell, nonlinearity, input, batch_sizes, h0, c0, sorted_indices)
        else:
            output, h_n, c_n = dispatch.run_stack(
                module=self,
                cell=cell,
                nonlinearity=nonlinearity,
                input=input,
                batch_sizes=batch_sizes,
                h0=h0,
                c0=c0,
            )

        if packed:
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        elif not is_batched:
            output = output.squeeze(0 if self.batch_first else 1)
        h_n = _permute(h_n, unsorted_indices)
        if c_n is not None:
            c_n = _permute(c_n, unsorted_indices)
        if not is_batched:
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if c_n is not None else None
        return output, ((h_n, c_n) if is_lstm else h_n)


class RNN(RecurrentBase):
    r"""Elman RNN, ``h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh)``: drop-in ``torch.nn.RNN``.

    Arguments as ``torch.nn.RNN``: ``input_size, hidden_size, num_layers=1, nonlinearity='tanh',
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None``.
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if len(args) > 3:
            self_nonlinearity = args[3]
            args = args[:3] + args[4:]
        else:
            self_nonlinearity = kwargs.pop("nonlinearity", "tanh")
        if self_nonlinearity not in ACTIVATIONS:
            choices = ", ".join(f"'{name}'" for name in ACTIVATIONS)
            raise ValueError(f"Unknown nonlinearity '{self_nonlinearity}'. Select from {choices}.")
        mode = f"RNN_{self_nonlinearity.upper()}"
        super().__init__(mode, *args, **kwargs)
        self.nonlinearity = self_nonlinearity


class _Regularized:
    """Keyword-only ``zoneout`` and ``recurrent_dropout`` of GRU and LSTM (fastrnn.regularization);
    a call that uses them runs through fastrnn.regularized_rnn (the path: fastrnn.explain)."""

    def _set_regularizers(self, zoneout: float, recurrent_dropout: float) -> None:
        from fastrnn.regularization import check_probability

        self.zoneout = check_probability("zoneout", zoneout)
        self.recurrent_dropout = check_probability("recurrent_dropout", recurrent_dropout, below_one=True)

    def _regularizer_repr(self) -> str:
        s = f", zoneout={self.zoneout}" if self.zoneout else ""
        return s + (f", recurrent_dropout={self.recurrent_dropout}" if self.recurrent_dropout else "")


class GRU(_Regularized, RecurrentBase):
    """Gated recurrent unit, PyTorch's convention (``b_hn`` inside the reset product): drop-in ``torch.nn.GRU``.

    fastrnn's keyword-only extras: ``grad_clip``, ``zoneout``, ``recurrent_dropout``."""

    def __init__(self, *args, zoneout: float = 0.0, recurrent_dropout: float = 0.0, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)
        self._set_regularizers(zoneout, recurrent_dropout)

    def extra_repr(self) -> str:
        return super().extra_repr() + self._regularizer_repr()


class LSTM(_Regularized, RecurrentBase):
    """Long short-term memory with optional projection (``proj_size``): drop-in ``torch.nn.LSTM``.

    fastrnn's keyword-only extras: ``grad_clip``, ``zoneout``, ``recurrent_dropout`` and
    ``forget_bias`` (None: torch.nn's initialisation; a number: the forget gate's ``bias_ih``
    starts there and its ``bias_hh`` at zero)."""

    def __init__(self, *args, forget_bias: float | None = None, zoneout: float = 0.0, recurrent_dropout: float = 0.0,
                 **kwargs):
        if forget_bias is not None and (isinstance(forget_bias, bool) or not isinstance(forget_bias, numbers.Real)):
            raise ValueError(f"forget_bias should be a number or None, got {forget_bias!r}")
        super().__init__("LSTM", *args, **kwargs)
        self._set_regularizers(zoneout, recurrent_dropout)
        self.forget_bias = None if forget_bias is None else float(forget_bias)
        if self.forget_bias is not None:
            if not self.bias:
                raise ValueError("forget_bias needs bias=True")
            init_forget_bias(self, self.forget_bias)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "forget_bias", None) is not None:
            init_forget_bias(self, self.forget_bias)

    def extra_repr(self) -> str:
        s = super().extra_repr() + self._regularizer_repr()
        return s + ("" if getattr(self, "forget_bias", None) is None else f", forget_bias={self.forget_bias}")


def init_forget_bias(module: nn.Module, value: float) -> None:
    """Set every LSTM layer's forget-gate bias: ``bias_ih`` rows ``H:2H`` to ``value``, ``bias_hh``'s to
    zero, so the forget gate's total bias starts at ``value``."""
    hidden = module.hidden_size
    with torch.no_grad():
        for name, weight in module.named_parameters():
            if name.startswith("bias_ih"):
                weight[hidden:2 * hidden].fill_(value)
            elif name.startswith("bias_hh"):
                weight[hidden:2 * hidden].zero_()
