"""Run a stack of recurrent layers on the path :func:`fastrnn.routing.route_stack` picks.

* ``native`` and ``cudnn``: PyTorch's own RNN kernels (``torch._VF``), exactly what ``torch.nn`` runs.
* ``reference`` and ``triton``: layer by layer on padded, time-major tensors with per-row
  ``lengths`` (a ``PackedSequence`` is padded once, in its sorted order, and packed again at the
  end); between layers, dropout in training mode.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor, _VF
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastrnn import gradient_flow, routing
from fastrnn.reference import reference_layer

#: Dtypes the kernels compute in (state and accumulation in fp32).
KERNEL_DTYPES = routing.KERNEL_DTYPES

#: The Triton implementation of one layer (every direction in one launch), by cell.
_TRITON_LAYERS = {"rnn": "fastrnn.ops.rnn:rnn_layer", "gru": "fastrnn.ops.gru:gru_layer", "lstm": "fastrnn.ops.lstm:lstm_layer"}


def triton_layer(cell: str):
    """The kernel-backed layer function of ``cell`` (imported on first use, so that
    ``TRITON_INTERPRET`` set after ``import fastrnn`` still takes effect)."""
    module, name = _TRITON_LAYERS[cell].split(":")
    return getattr(importlib.import_module(module), name)


def _native_stack(module, cell: str, nonlinearity: str | None, input: Tensor, batch_sizes, h0, c0):
    fn = {"rnn": _VF.rnn_tanh if nonlinearity == "tanh" else _VF.rnn_relu, "gru": _VF.gru, "lstm": _VF.lstm}[cell]
    hx = (h0, c0) if cell == "lstm" else h0
    flags = (module.bias, module.num_layers, module.dropout, module.training, module.bidirectional)
    if batch_sizes is None:
        result = fn(input, hx, module._flat_weights, *flags, module.batch_first)
    else:
        result = fn(input, batch_sizes, hx, module._flat_weights, *flags)
    output, h_n = result[0], result[1]
    return output, h_n, (result[2] if cell == "lstm" else None)


def run_stack(module, cell: str, nonlinearity: str | None, input: Tensor, batch_sizes: Tensor | None, h0: Tensor, c0: Tensor | None):
    """Run ``module``'s whole stack. ``input`` is packed data ``(N, I)`` when ``batch_sizes`` is given,
    else ``(T, B, I)`` or ``(B, T, I)`` by ``module.batch_first``; ``h0 (L*D, B, H_out)``, ``c0 (L*D, B, H)``
    already in the batch order of ``input``. Returns output in the form of ``input``, ``h_n``, ``c_n``."""
    path = routing.route_stack(module, cell, nonlinearity, input, batch_sizes).path
    grad_clip = getattr(module, "grad_clip", None)
    recorder = gradient_flow.active() if torch.is_grad_enabled() else None
    if path in ("native", "cudnn"):
        return _native_stack(module, cell, nonlinearity, input, batch_sizes, h0, c0)

    lengths = lengths_cpu = None
    if batch_sizes is not None:
        x, lengths_cpu = pad_packed_sequence(PackedSequence(input, batch_sizes))
        lengths = lengths_cpu.to(input.device)
    else:
        x = input.transpose(0, 1) if module.batch_first else input
    layer = reference_layer if path == "reference" else triton_layer(cell)

    directions = 2 if module.bidirectional else 1
    h_out, c_out = [], []
    for index, params in enumerate(module._layer_params()):
        if index > 0 and module.dropout > 0 and module.training:
            x = F.dropout(x, module.dropout, training=True)
        rows = slice(index * directions, (index + 1) * directions)
        options = {}
        if grad_clip is not None:
            options["grad_clip"] = grad_clip
        if recorder is not None:
            options["flow_record"] = recorder.new_record(module, index, directions, x.shape[0], x.device)
        x, h_n, c_n = layer(cell, x, h0[rows], None if c0 is None else c0[rows], params, lengths, nonlinearity, **options)
        h_out.append(h_n)
        c_out.append(c_n)

    if batch_sizes is not None:
        output = pack_padded_sequence(x, lengths_cpu, enforce_sorted=True).data
    else:
        output = x.transpose(0, 1) if module.batch_first else x
    return output, torch.cat(h_out), (torch.cat(c_out) if c0 is not None else None)
