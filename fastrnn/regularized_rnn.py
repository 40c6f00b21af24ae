"""``zoneout`` and ``recurrent_dropout`` for ``fastrnn.LSTM`` and ``fastrnn.GRU``.

A ``fastrnn.LSTM``/``GRU`` with ``zoneout > 0`` (training or eval) or with ``recurrent_dropout > 0``
in training runs here instead of :func:`fastrnn.dispatch.run_stack`, layer by layer on padded,
time-major input with per-row lengths, drawing the masks of :mod:`fastrnn.regularization` in its
documented order (so every path below gives the same result under one seed):

* DropConnect: each direction's ``W_hh`` is masked on the host (``W_hh * M / (1 - p)``, autograd
  carries the gradient back through the mask); without zoneout the layer then runs on the path
  :func:`fastrnn.routing.route_stack` gives the call (the Triton kernels, cuDNN or PyTorch's native
  op, ``native-bptt``, the reference), one layer at a time.
* zoneout: where routing says ``triton`` (CUDA, or ``FASTRNN_BACKEND=triton``, at sizes the
  resident kernels hold), :func:`fastrnn.ops.zoneout.zoneout_layer` (the mask into the kernels; their
  registered operators while ``torch.compile`` traces);
  else the plain PyTorch cell steps of :mod:`fastrnn.reference` in the time loop of
  :func:`fastrnn.stacked.time_loop` (``grad_clip``, ``proj_size`` and gradient-flow recording
  included; differentiable twice); while ``torch.compile`` traces, that loop as one registered
  operator per layer (:mod:`fastrnn.zoneout_op`; with ``FASTRNN_BACKEND=reference`` Dynamo unrolls
  the loop, which stays differentiable twice). PyTorch's native kernels cannot zone out.

The options are off by default, and then a layer runs exactly as before.
"""

from __future__ import annotations

import importlib
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, _VF

from fastrnn import backend, gradient_flow, routing
from fastrnn.native_bptt import native_bptt_layer
from fastrnn.packing import lengths_from_batch_sizes, pack_padded, pad_packed
from fastrnn.reference import gru_step, lstm_step, reference_layer
from fastrnn.regularization import drop_connect, zoneout_mask
from fastrnn.stacked import time_loop


def regularized(module) -> bool:
    """Whether ``module``'s call needs this path (a zoneout, or DropConnect while training)."""
    return bool(getattr(module, "zoneout", 0.0)) or bool(getattr(module, "recurrent_dropout", 0.0) and module.training)


def run_stack(module, cell: str, nonlinearity, input: Tensor, batch_sizes: Tensor | None, h0: Tensor, c0: Tensor | None,
              sorted_indices: Tensor | None = None):
    """The signature and results of :func:`fastrnn.dispatch.run_stack` (plus ``sorted_indices``, so
    that row ``b`` of a zoneout mask is the caller's row ``b``), for ``cell`` ``"lstm"`` or ``"gru"``."""
    path = routing.route_stack(module, cell, nonlinearity, input, batch_sizes).path
    lengths = None
    if batch_sizes is not None:  # fastrnn's registered pad/pack: Dynamo traces them (not torch.nn's)
        x = pad_packed(input, batch_sizes, h0.shape[1])
        lengths = lengths_from_batch_sizes(batch_sizes, h0.shape[1]).to(input.device)
    else:
        x = input.transpose(0, 1) if module.batch_first else input
    recorder = gradient_flow.active() if torch.is_grad_enabled() and not torch.compiler.is_compiling() else None
    directions = 2 if module.bidirectional else 1
    p_zone = module.zoneout
    h_out, c_out = [], []
    for index, params in enumerate(module._layer_params()):
        if index > 0 and module.dropout > 0 and module.training:
            x = F.dropout(x, module.dropout, training=True)
        params = [dict(p, w_hh=drop_connect(p["w_hh"], module.recurrent_dropout, module.training)) for p in params]
        mask = zoneout_mask(p_zone, module.training, (x.shape[0], x.shape[1], directions * module.hidden_size), x)
        if mask is not None and sorted_indices is not None:
            mask = mask.index_select(1, sorted_indices.to(mask.device))
        rows = slice(index * directions, (index + 1) * directions)
        h0_layer, c0_layer = h0[rows], (None if c0 is None else c0[rows])
        record = None if recorder is None else recorder.new_record(module, index, directions, x.shape[0], x.device)
        options = dict(grad_clip=module.grad_clip, flow_record=record)
        if p_zone and path == "triton":
            zoneout = sys.modules.get("fastrnn.ops.zoneout") or importlib.import_module("fastrnn.ops.zoneout")  # triton
            x, h_n, c_n = zoneout.zoneout_layer(cell, x, h0_layer, c0_layer, params, lengths, mask, p_zone, **options)
        elif p_zone and torch.compiler.is_compiling() and backend.get_backend() != "reference":  # the loop as one operator
            x, h_n, c_n = zoneout_op.zoned_reference_layer(cell, x, h0_layer, c0_layer, params, lengths, mask, p_zone,
                                                           module.grad_clip)
        elif p_zone:
            x, h_n, c_n = zoned_reference_layer(cell, x, h0_layer, c0_layer, params, lengths, mask, p_zone, module.grad_clip,
                                                record)
        else:
            x, h_n, c_n = _plain_layer(module, path, cell, nonlinearity, x, h0_layer, c0_layer, params, lengths, options)
        h_out.append(h_n)
        if cell == "lstm":
            c_out.append(c_n)
    if batch_sizes is not None:
        output = pack_padded(x, batch_sizes, input.shape[0])
    else:
        output = x.transpose(0, 1) if module.batch_first else x
    return output, torch.cat(h_out), (torch.cat(c_out) if c0 is not None else None)


def _plain_layer(module, path, cell, nonlinearity, x, h0, c0, params, lengths, options):
    """One layer (DropConnect-masked ``params``, no zoneout) on ``path``: the layer functions of
    :func:`fastrnn.dispatch.run_padded`; ``cudnn``/``native``: PyTorch's op for one layer
    (``native-bptt``'s operator with lengths, as :func:`fastrnn.dispatch.run_stack` does)."""
    if path in ("cudnn", "native") and lengths is None:
        return _native_layer(module, cell, x, h0, c0, params)
    if path == "triton":
        from fastrnn.dispatch import triton_layer

        layer = triton_layer(cell)
    else:
        layer = reference_layer if path == "reference" else native_bptt_layer
    options = {k: v for k, v in options.items() if v is not None}
    return layer(cell, x, h0, c0, params, lengths, nonlinearity, **options)


def _native_layer(module, cell, x, h0, c0, params):
    """One layer on PyTorch's RNN op (cuDNN on CUDA), the masked weights in ``torch.nn``'s flat order."""
    names = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    weights = [p[name] for p in params for name in names if p[name] is not None]
    fn = _VF.lstm if cell == "lstm" else _VF.gru
    result = fn(x, (h0, c0) if cell == "lstm" else h0, weights, module.bias, 1, 0.0, module.training,
                module.bidirectional, False)
    return result[0], result[1], (result[2] if cell == "lstm" else None)


def zoned_reference_layer(cell, x, h0, c0, params, lengths, mask, p_zone, clip, record=None):
    """One layer with zoneout on the reference cell steps (every direction): ``x (T, B, I)``,
    ``h0 (D, B, H_out)``, ``c0 (D, B, H)`` (LSTM) or None, ``mask (T, B, D*H)`` or None (eval:
    ``p_zone``), ``clip`` the ``grad_clip``, ``record`` a ``(D, T)`` flow record or None. Returns
    ``y (T, B, D*H_out)``, ``h_n``, ``c_n`` (None for the GRU)."""
    hidden = h0.shape[-1]
    cell_size = c0.shape[-1] if cell == "lstm" else hidden
    ys, hs, cs = [], [], []
    for d, p in enumerate(params):
        gx = F.linear(x, p["w_ih"], p["b_ih"])
        if cell == "lstm":
            def step(t, state, gx=gx, p=p):
                return lstm_step(gx[t], state[0], state[1], p["w_hh"], p["b_hh"], p["w_hr"], clip)

            state = (h0[d], c0[d])
        else:
            def step(t, state, gx=gx, p=p):
                return (gru_step(gx[t], state[0], p["w_hh"], p["b_hh"], clip),)

            state = (h0[d],)
        # zoneout mixes h (H_out wide) and c (H wide): with a projection the h mask is the first H_out units
        d_mask = None if mask is None else mask[..., d * cell_size:(d + 1) * cell_size]
        y, final = _zoned_time_loop(step, x.shape[0], state, lengths, d == 1, d_mask, p_zone, hidden,
                                    None if record is None else record[d])
        ys.append(y)
        hs.append(final[0])
        if cell == "lstm":
            cs.append(final[1])
    return torch.cat(ys, dim=-1), torch.stack(hs), (torch.stack(cs) if cell == "lstm" else None)


def _zoned_time_loop(step, steps, state, lengths, reverse, mask, p, hidden_out, record):
    """:func:`time_loop` where ``h`` may be narrower than ``c`` (``proj_size``): ``h`` is zoned
    out with the mask's first ``H_out`` units, ``c`` with all of it."""
    if mask is None or hidden_out == state[-1].shape[-1]:
        return time_loop(step, steps, state, lengths, reverse, mask, p, record)

    def zoned_step(t, current):
        new = step(t, current)
        m = mask[t]
        mixed = [m[..., :hidden_out] * current[0] + (1 - m[..., :hidden_out]) * new[0]]
        mixed += [m * old + (1 - m) * s for old, s in zip(current[1:], new[1:])]
        return tuple(mixed)

    return time_loop(zoned_step, steps, state, lengths, reverse, None, 0.0, record)


from fastrnn import zoneout_op  # noqa: E402  (registers the operator torch.compile traces; it imports the loop above)
