"""``zoneout`` and ``recurrent_dropout`` for ``fastrnn.LSTM`` and ``fastrnn.GRU``: the reference path.

A ``fastrnn.LSTM``/``GRU`` with ``zoneout > 0`` (training or eval) or with ``recurrent_dropout > 0``
in training runs here instead of :func:`fastrnn.dispatch.run_stack`: the plain PyTorch cell steps
of :mod:`fastrnn.reference` (``grad_clip``, ``proj_size`` and gradient-flow recording included)
in the time loop of :func:`fastrnn.stacked.time_loop`, with the masks of
:mod:`fastrnn.regularization` (drawn in its documented order). Neither PyTorch's native kernels
nor fastrnn's Triton kernels zone out or drop connections yet, so these calls run this loop on
every device and backend (differentiable twice). The options are off by default, and then a layer
runs exactly as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastrnn import gradient_flow
from fastrnn.reference import gru_step, lstm_step
from fastrnn.regularization import drop_connect, zoneout_mask
from fastrnn.stacked import time_loop


def regularized(module) -> bool:
    """Whether ``module``'s call needs this path (a zoneout, or DropConnect while training)."""
    return bool(getattr(module, "zoneout", 0.0)) or bool(getattr(module, "recurrent_dropout", 0.0) and module.training)


def run_stack(module, cell: str, nonlinearity, input: Tensor, batch_sizes: Tensor | None, h0: Tensor, c0: Tensor | None,
              sorted_indices: Tensor | None = None):
    """The signature and results of :func:`fastrnn.dispatch.run_stack` (plus ``sorted_indices``, so
    that row ``b`` of a zoneout mask is the caller's row ``b``), for ``cell`` ``"lstm"`` or ``"gru"``."""
    lengths = lengths_cpu = None
    if batch_sizes is not None:
        x, lengths_cpu = pad_packed_sequence(PackedSequence(input, batch_sizes))
        lengths = lengths_cpu.to(input.device)
    else:
        x = input.transpose(0, 1) if module.batch_first else input
    recorder = gradient_flow.active() if torch.is_grad_enabled() else None
    directions = 2 if module.bidirectional else 1
    p_zone, clip = module.zoneout, module.grad_clip
    h_out, c_out = [], []
    for index, params in enumerate(module._layer_params()):
        if index > 0 and module.dropout > 0 and module.training:
            x = F.dropout(x, module.dropout, training=True)
        w_hh = [drop_connect(p["w_hh"], module.recurrent_dropout, module.training) for p in params]
        hidden = h0.shape[-1]
        mask = zoneout_mask(p_zone, module.training, (x.shape[0], x.shape[1], directions * module.hidden_size), x)
        if mask is not None and sorted_indices is not None:
            mask = mask.index_select(1, sorted_indices.to(mask.device))
        record = None if recorder is None else recorder.new_record(module, index, directions, x.shape[0], x.device)
        ys = []
        for d, p in enumerate(params):
            row = slice(index * directions + d, index * directions + d + 1)
            gx = F.linear(x, p["w_ih"], p["b_ih"])
            if cell == "lstm":
                def step(t, state, gx=gx, p=p, w=w_hh[d]):
                    return lstm_step(gx[t], state[0], state[1], w, p["b_hh"], p["w_hr"], clip)

                state = (h0[row][0], c0[row][0])
            else:
                def step(t, state, gx=gx, p=p, w=w_hh[d]):
                    return (gru_step(gx[t], state[0], w, p["b_hh"], clip),)

                state = (h0[row][0],)
            # zoneout mixes h (H_out wide) and c (H wide): with a projection the h mask is the first H_out units
            d_mask = None if mask is None else mask[..., d * module.hidden_size:(d + 1) * module.hidden_size]
            y, final = _zoned_time_loop(step, x.shape[0], state, lengths, d == 1, d_mask, p_zone, hidden,
                                        None if record is None else record[d])
            ys.append(y)
            h_out.append(final[0])
            if cell == "lstm":
                c_out.append(final[1])
        x = torch.cat(ys, dim=-1)
    if batch_sizes is not None:
        output = pack_padded_sequence(x, lengths_cpu, enforce_sorted=True).data
    else:
        output = x.transpose(0, 1) if module.batch_first else x
    return output, torch.stack(h_out), (torch.stack(c_out) if c0 is not None else None)


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
