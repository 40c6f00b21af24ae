"""Build a row's layers and inputs, and the callables that are timed and checked.

Every implementation of a row (fastrnn, ``torch.nn``, the reference loop eager or compiled) is
built from one ``state_dict``, so they compute the same function. Inputs come as a few
:class:`Sample`\\ s that the timed callables cycle through (rotating inputs, so no run reuses the
previous run's input in cache).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn
from bench.matrix import Row

#: How many different inputs each timed callable cycles through.
ROTATING_INPUTS = 3

_FASTRNN = {"rnn": fastrnn.RNN, "gru": fastrnn.GRU, "lstm": fastrnn.LSTM}
_TORCH = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


@dataclass
class Sample:
    """One input of a row.

    ``input`` is what the layer is called with (a tensor ``(T, B, I)`` or a ``PackedSequence``),
    ``leaf`` the tensor input gradients are taken with respect to (the tensor itself or the packed
    data), ``grad_output`` the upstream gradient of the output (of the packed data for packed rows),
    ``tokens`` the number of valid timesteps summed over the batch.
    """

    input: Tensor | PackedSequence
    leaf: Tensor
    grad_output: Tensor
    tokens: int


def layer_kwargs(row: Row) -> dict:
    """Constructor arguments shared by ``fastrnn`` and ``torch.nn`` for ``row``."""
    kwargs = dict(input_size=row.input_size, hidden_size=row.hidden, num_layers=row.layers,
                  bidirectional=row.bidirectional)
    if row.cell == "rnn":
        kwargs["nonlinearity"] = row.nonlinearity
    return kwargs


def build_fastrnn(row: Row, device: torch.device, seed: int = 0) -> nn.Module:
    """The row's ``fastrnn`` layer in the row's dtype, with seeded ``torch.nn`` initialisation."""
    torch.manual_seed(seed)
    return _FASTRNN[row.cell](**layer_kwargs(row)).to(device=device, dtype=row.torch_dtype)


def build_torch(row: Row, reference: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The row's ``torch.nn`` layer holding ``reference``'s weights, converted to ``dtype``."""
    layer = _TORCH[row.cell](**layer_kwargs(row))
    layer.load_state_dict(reference.state_dict())
    layer = layer.to(device=next(reference.parameters()).device, dtype=dtype)
    layer.flatten_parameters()
    return layer


def converted(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``module`` in ``dtype`` (the original is left alone)."""
    return copy.deepcopy(module).to(dtype=dtype)


def make_samples(row: Row, device: torch.device, count: int = ROTATING_INPUTS, seed: int = 1) -> list[Sample]:
    """``count`` different inputs for ``row``, in the row's dtype.

    Packed rows draw each sequence's length uniformly from ``[T // 4, T]`` and give the first
    sequence the full ``T`` (so every sample pads to the same shape, which keeps compiled
    callables from recompiling).
    """
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        x = torch.randn(row.steps, row.batch, row.input_size, generator=generator)
        x = x.to(device=device, dtype=row.torch_dtype)
        if row.packed:
            lengths = torch.randint(max(1, row.steps // 4), row.steps + 1, (row.batch,), generator=generator)
            lengths[0] = row.steps
            packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
            leaf = packed.data.detach().requires_grad_(True)
            layer_input = PackedSequence(leaf, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)
            tokens = int(lengths.sum())
            out_rows = leaf.shape[0]
        else:
            leaf = layer_input = x.requires_grad_(True)
            tokens = row.steps * row.batch
            out_rows = None
        out_features = row.directions * row.hidden
        out_shape = (out_rows, out_features) if row.packed else (row.steps, row.batch, out_features)
        grad_output = torch.randn(out_shape, generator=generator).to(device=device, dtype=row.torch_dtype)
        samples.append(Sample(layer_input, leaf, grad_output, tokens))
    return samples


def samples_as(samples: list[Sample], dtype: torch.dtype) -> list[Sample]:
    """The same samples in another dtype (new leaves, so gradients stay separate)."""
    result = []
    for s in samples:
        leaf = s.leaf.detach().to(dtype).requires_grad_(True)
        if isinstance(s.input, PackedSequence):
            layer_input = PackedSequence(leaf, s.input.batch_sizes, s.input.sorted_indices, s.input.unsorted_indices)
        else:
            layer_input = leaf
        result.append(Sample(layer_input, leaf, s.grad_output.to(dtype), s.tokens))
    return result


def _backend(name: str | None):
    return contextlib.nullcontext() if name is None else fastrnn.use_backend(name)


def _output_data(output) -> Tensor:
    return output.data if isinstance(output, PackedSequence) else output


def forward_fn(model: Callable, samples: list[Sample], backend: str | None = None) -> Callable[[], None]:
    """A callable running one inference forward (``torch.no_grad``) on the next sample."""
    cycle = itertools.cycle(samples)

    def run() -> None:
        sample = next(cycle)
        with torch.no_grad(), _backend(backend):
            model(sample.input)

    return run


def train_fn(model: Callable, params: list[Tensor], samples: list[Sample],
             backend: str | None = None) -> Callable[[], None]:
    """A callable running forward and backward (gradients of the input and every parameter)
    on the next sample, with the sample's upstream gradient."""
    cycle = itertools.cycle(samples)

    def run() -> None:
        sample = next(cycle)
        with _backend(backend):
            output = _output_data(model(sample.input)[0])
            torch.autograd.grad(output, [sample.leaf, *params], sample.grad_output)

    return run


def outputs_and_grads(module: nn.Module, sample: Sample, backend: str | None = None) -> dict[str, Tensor]:
    """Every tensor a row's check compares: output, final states, the input's gradient and each
    parameter's gradient (by ``torch.nn`` parameter name), from one forward and backward."""
    names, params = zip(*module.named_parameters())
    with _backend(backend):
        output, state = module(sample.input)
        output = _output_data(output)
        grads = torch.autograd.grad(output, [sample.leaf, *params], sample.grad_output)
    result = {"output": output.detach()}
    if isinstance(state, tuple):
        result["h_n"], result["c_n"] = state[0].detach(), state[1].detach()
    else:
        result["h_n"] = state.detach()
    result["grad_input"] = grads[0]
    result.update({f"grad_{name}": g for name, g in zip(names, grads[1:])})
    return result
