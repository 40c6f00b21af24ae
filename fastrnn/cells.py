"""``fastrnn.RNNCell``, ``GRUCell`` and ``LSTMCell``: the ``torch.nn`` cell contracts.

A cell is one step: one input GEMM, one recurrent GEMM and an elementwise tail. There is no time
loop to fuse, so every backend runs the reference step of :mod:`fastrnn.reference` (plain PyTorch,
differentiable twice, traceable by ``torch.compile``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrnn.reference import ACTIVATIONS, gru_step, lstm_step, rnn_step


class RecurrentCellBase(nn.Module):
    """Parameters and checks shared by the cells (like ``nn.RNNCellBase``)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool, num_chunks: int, device=None, dtype=None):
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((num_chunks * hidden_size, input_size), **factory_kwargs))
        self.weight_hh = nn.Parameter(torch.empty((num_chunks * hidden_size, hidden_size), **factory_kwargs))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory_kwargs))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if "bias" in self.__dict__ and self.bias is not True:
            s += ", bias={bias}"
        if "nonlinearity" in self.__dict__ and self.nonlinearity != "tanh":
            s += ", nonlinearity={nonlinearity}"
        return s.format(**self.__dict__)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def _prepare(
        self, input: Tensor, states: list[Tensor | None], names: list[str], num_states: int = 1
    ) -> tuple[Tensor, list[Tensor], bool]:
        """Check ranks and sizes as ``torch.nn`` does; return 2-D input, 2-D states, batched flag."""
        kind = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{kind}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        for name, state in zip(names, states):
            if state is not None and state.dim() not in (1, 2):
                raise ValueError(f"{kind}: Expected {name} to be 1D or 2D, got {state.dim()}D instead")
        if len(states) != num_states:
            raise RuntimeError("lstm_cell expects two hidden states")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if input.size(1) != self.input_size:
            raise RuntimeError(f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}")
        if input.dtype != self.weight_ih.dtype and not torch.is_autocast_enabled(input.device.type):
            raise RuntimeError(
                f"{kind} input dtype ({input.dtype}) does not match weight dtype ({self.weight_ih.dtype})"
            )
        prepared = []
        for index, state in enumerate(states):
            if state is None:
                state = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            elif not is_batched:
                state = state.unsqueeze(0)
            if state.size(0) != input.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{index} batch size {state.size(0)}"
                )
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{index} has inconsistent hidden_size: got {state.size(1)}, expected {self.hidden_size}"
                )
            if state.dtype != input.dtype and not torch.is_autocast_enabled(input.device.type):
                raise RuntimeError(f"hidden{index} dtype ({state.dtype}) does not match input dtype ({input.dtype})")
            prepared.append(state)
        return input, prepared, is_batched


class RNNCell(RecurrentCellBase):
    """One Elman step, ``h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)``: drop-in ``torch.nn.RNNCell``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, nonlinearity: str = "tanh", device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=1, device=device, dtype=dtype)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        input, (hx,), is_batched = self._prepare(input, [hx], ["hidden"])
        if self.nonlinearity not in ACTIVATIONS:
            raise RuntimeError(f"Unknown nonlinearity: {self.nonlinearity}")
        h = rnn_step(F.linear(input, self.weight_ih, self.bias_ih), hx, self.weight_hh, self.bias_hh, self.nonlinearity)
        return h if is_batched else h.squeeze(0)


class GRUCell(RecurrentCellBase):
    """One GRU step in PyTorch's convention: drop-in ``torch.nn.GRUCell``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=3, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        input, (hx,), is_batched = self._prepare(input, [hx], ["hidden"])
        h = gru_step(F.linear(input, self.weight_ih, self.bias_ih), hx, self.weight_hh, self.bias_hh)
        return h if is_batched else h.squeeze(0)


class LSTMCell(RecurrentCellBase):
    """One LSTM step, gates ``(i, f, g, o)``: drop-in ``torch.nn.LSTMCell``."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None):
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        states = [None, None] if hx is None else list(hx)
        names = [f"hx[{index}]" for index in range(len(states))]
        input, (h, c), is_batched = self._prepare(input, states, names, num_states=2)
        h, c = lstm_step(F.linear(input, self.weight_ih, self.bias_ih), h, c, self.weight_hh, self.bias_hh)
        return (h, c) if is_batched else (h.squeeze(0), c.squeeze(0))
