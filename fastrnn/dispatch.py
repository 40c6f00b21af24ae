"""Run a stack of recurrent layers on the path :func:`fastrnn.routing.route_stack` picks.

* ``native`` and ``cudnn``: PyTorch's own RNN kernels (``torch._VF``), exactly what ``torch.nn`` runs.
* ``native-bptt``: on the CPU where the native op alone cannot serve (``grad_clip``, gradient-flow
  recording, the extra Elman nonlinearities) and for every layer under ``torch.compile``: one
  registered operator per layer, native forward and hand-written backward
  (:mod:`fastrnn.native_bptt`).
* ``reference``, ``native-bptt`` and ``triton``: layer by layer on padded, time-major tensors with
  per-row ``lengths`` (a ``PackedSequence`` is padded once, in its sorted order, and packed again
  at the end, both through registered operators of :mod:`fastrnn.packing`); between layers,
  dropout in training mode.

Under ``torch.compile`` nothing is recorded by :func:`fastrnn.record_gradient_flow` (the record
is written by the backward pass, outside the graph): the layers run as if no record were open.
"""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, _VF

from fastrnn import gradient_flow, routing
from fastrnn.native_bptt import native_bptt_layer
from fastrnn.packing import lengths_from_batch_sizes, pack_padded, pad_packed
from fastrnn.reference import reference_layer

#: Dtypes the kernels compute in (state and accumulation in fp32).
KERNEL_DTYPES = routing.KERNEL_DTYPES

#: The Triton implementation of one layer (every direction in one launch), by cell.
_TRITON_LAYERS = {"rnn": "fastrnn.ops.rnn:rnn_layer", "gru": "fastrnn.ops.gru:gru_layer", "lstm": "fastrnn.ops.lstm:lstm_layer"}


def triton_layer(cell: str):
    """The kernel-backed layer function of ``cell``. Imported on first use on a CPU machine (so
    that ``TRITON_INTERPRET`` set after ``import fastrnn`` still takes effect); with a GPU, when
    this module is imported, since ``torch.compile`` cannot trace an import (it reads
    ``sys.modules``, which it can)."""
    module, name = _TRITON_LAYERS[cell].split(":")
    loaded = sys.modules.get(module)
    if loaded is None:
        loaded = importlib.import_module(module)
    return getattr(loaded, name)


if torch.cuda.is_available() and backend.triton_available():
    for _cell in _TRITON_LAYERS:
        triton_layer(_cell)


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


def run_stack(module, cell: str, nonlinearity: str | None, input: Tensor, batch_sizes: Tensor | None, h0: Tensor,
              c0: Tensor | None, lengths: Tensor | None = None):
    """Run ``module``'s whole stack. ``input`` is packed data ``(N, I)`` when ``batch_sizes`` is given,
    else ``(T, B, I)`` or ``(B, T, I)`` by ``module.batch_first`` (padded rows with per-row
    ``lengths (B,)`` when given); ``h0 (L*D, B, H_out)``, ``c0 (L*D, B, H)`` already in the batch
    order of ``input``. Returns output in the form of ``input``, ``h_n``, ``c_n``."""
    path = routing.route_stack(module, cell, nonlinearity, input, batch_sizes).path
    compiling = torch.compiler.is_compiling()
    recorder = gradient_flow.active() if torch.is_grad_enabled() and not compiling else None
    if path in ("native", "cudnn") and lengths is not None:
        path = "native-bptt"  # padded rows with lengths: the operator packs them for the native forward
    if path in ("native", "cudnn"):
        return _native_stack(module, cell, nonlinearity, input, batch_sizes, h0, c0)

    if lengths is not None:
        lengths = lengths.to(input.device)
    if batch_sizes is not None:
        x = pad_packed(input, batch_sizes, h0.shape[1])
        lengths = lengths_from_batch_sizes(batch_sizes, h0.shape[1]).to(input.device)
    else:
        x = input.transpose(0, 1) if module.batch_first else input
    return run_padded(module, path, cell, nonlinearity, x, lengths, h0, c0, batch_sizes, input.shape[0], recorder)


def run_padded(module, path: str, cell: str, nonlinearity: str | None, x: Tensor, lengths: Tensor | None, h0: Tensor,
               c0: Tensor | None, batch_sizes: Tensor | None = None, total: int = 0, recorder=None):
    """The stack layer by layer on ``path`` (``"reference"``, ``"native-bptt"`` or ``"triton"``):
    padded time-major ``x (T, B, I)`` with ``lengths (B,)`` or None. Returns the output packed again
    when ``batch_sizes`` is given (``total`` rows), else in the layout of ``module``'s input."""
    grad_clip = getattr(module, "grad_clip", None)
    layer = {"reference": reference_layer, "native-bptt": native_bptt_layer}.get(path) or triton_layer(cell)

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
        output = pack_padded(x.contiguous(), batch_sizes, total)
    else:
        output = x.transpose(0, 1) if module.batch_first else x
    return output, torch.cat(h_out), (torch.cat(c_out) if c0 is not None else None)
