"""The reference path: plain PyTorch, obviously right, the oracle every kernel is tested against.

Conventions shared with the kernels (and with ``torch.nn``):

* time-major tensors: ``x`` is ``(T, B, I)``; a layer's output is ``(T, B, D * H_out)`` with the
  forward direction in the first ``H_out`` features and the reverse direction after it;
* gate order LSTM ``(i, f, g, o)``, GRU ``(r, z, n)``; GRU's ``b_hn`` sits inside
  ``r * (W_hn h + b_hn)``;
* the input projection of all timesteps is one matrix product before the time loop;
* per-row ``lengths``: a row's state is frozen past its length and its output is zero there;
  the reverse direction starts each row at its own last valid step.

Two extensions torch.nn lacks, both defined here first (the kernels are held to them):

* ``grad_clip=c``: the gradient of each step's pre-activations (the gates, for GRU and LSTM) is
  clamped to ``[-c, c]`` by a hook before it flows on to the previous state and into the weight
  gradients (Lasagne's ``grad_clipping``);
* ``flow_record``: a ``(T,)`` tensor that receives ``||dL/dh_t||`` of every step in backward.

Everything here is differentiable twice (double backward works).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

#: Elman activations by name: the function of the pre-activation.
ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "hardtanh": F.hardtanh,
    "silu": F.silu,
    "gelu": functools.partial(F.gelu, approximate="tanh"),
}

#: Gates stacked in a weight matrix's rows, by cell.
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def clip_grad(pre: Tensor, grad_clip: float | None) -> Tensor:
    """Clamp the gradient that reaches ``pre`` to ``[-grad_clip, grad_clip]`` (no-op for None)."""
    if grad_clip is not None and pre.requires_grad:
        pre.register_hook(lambda grad: grad.clamp(-grad_clip, grad_clip))
    return pre


def rnn_step(
    gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, nonlinearity: str = "tanh", grad_clip: float | None = None
) -> Tensor:
    """One Elman step. ``gx = x W_ih^T + b_ih`` is ``(B, H)``, ``h`` is ``(B, H)``."""
    return ACTIVATIONS[nonlinearity](clip_grad(gx + F.linear(h, w_hh, b_hh), grad_clip))


def gru_step(gx: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, grad_clip: float | None = None) -> Tensor:
    """One GRU step. ``gx`` is ``(B, 3H)`` (input part of r, z, n, with ``b_ih``)."""
    gh = F.linear(h, w_hh, b_hh)
    x_r, x_z, x_n = gx.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(clip_grad(x_r + h_r, grad_clip))
    z = torch.sigmoid(clip_grad(x_z + h_z, grad_clip))
    n = torch.tanh(clip_grad(x_n + r * h_n, grad_clip))
    return (1 - z) * n + z * h


def lstm_step(
    gx: Tensor, h: Tensor, c: Tensor, w_hh: Tensor, b_hh: Tensor | None, w_hr: Tensor | None = None,
    grad_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step. ``gx`` is ``(B, 4H)``; ``h`` is ``(B, H_out)``, ``c`` is ``(B, H)``."""
    gates = clip_grad(gx + F.linear(h, w_hh, b_hh), grad_clip)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:
        h = F.linear(h, w_hr)
    return h, c


def recurrence(
    cell: str,
    gx: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    lengths: Tensor | None = None,
    reverse: bool = False,
    nonlinearity: str = "tanh",
    grad_clip: float | None = None,
    flow_record: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Run one direction of one layer over time.

    Args:
        cell: ``"rnn"``, ``"gru"`` or ``"lstm"``.
        gx: ``(T, B, G*H)`` input projection ``x W_ih^T + b_ih`` of every step.
        h0: ``(B, H_out)`` initial hidden state; ``c0``: ``(B, H)`` initial cell state (LSTM).
        w_hh: ``(G*H, H_out)``; b_hh: ``(G*H,)`` or None; w_hr: ``(H_out, H)`` LSTM projection.
        lengths: ``(B,)`` valid steps per row, or None for all ``T``.
        reverse: walk time backwards (each row from its own last valid step).
        grad_clip: clamp each step's pre-activation gradient to ``[-grad_clip, grad_clip]``.
        flow_record: ``(T,)`` tensor; backward writes ``||dL/dh_t||`` of step ``t`` into it.

    Returns:
        ``y (T, B, H_out)`` (zero past a row's length), ``h_n (B, H_out)``, ``c_n (B, H)`` or None.
    """
    steps = gx.shape[0]
    valid = None
    if lengths is not None:
        valid = torch.arange(steps, device=gx.device)[:, None, None] < lengths.to(gx.device)[None, :, None]
    h, c = h0, c0
    outputs: list[Tensor | None] = [None] * steps
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    for t in order:
        if cell == "rnn":
            h_new, c_new = rnn_step(gx[t], h, w_hh, b_hh, nonlinearity, grad_clip), None
        elif cell == "gru":
            h_new, c_new = gru_step(gx[t], h, w_hh, b_hh, grad_clip), None
        else:
            h_new, c_new = lstm_step(gx[t], h, c, w_hh, b_hh, w_hr, grad_clip)
        if flow_record is not None and h_new.requires_grad:
            h_new.register_hook(functools.partial(_record_norm, flow_record, t))
        if valid is None:
            h, c, outputs[t] = h_new, c_new, h_new
        else:
            h = torch.where(valid[t], h_new, h)
            if c_new is not None:
                c = torch.where(valid[t], c_new, c)
            outputs[t] = torch.where(valid[t], h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, c  # type: ignore[arg-type]


def _record_norm(record: Tensor, step: int, grad: Tensor) -> None:
    record[step] = grad.detach().double().norm().to(record.dtype)


def reference_layer(
    cell: str,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    params: list[dict[str, Tensor | None]],
    lengths: Tensor | None = None,
    nonlinearity: str = "tanh",
    grad_clip: float | None = None,
    flow_record: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer, every direction: ``x (T, B, I)``, ``h0 (D, B, H_out)``, ``c0 (D, B, H)``.

    ``params[d]`` holds ``w_ih, w_hh, b_ih, b_hh, w_hr`` of direction ``d`` (missing ones None).
    ``flow_record``: ``(D, T)``, receives the per-step gradient norms in backward.
    Returns ``y (T, B, D*H_out)``, ``h_n (D, B, H_out)``, ``c_n (D, B, H)`` or None.
    """
    ys, hs, cs = [], [], []
    for d, p in enumerate(params):
        gx = F.linear(x, p["w_ih"], p["b_ih"])
        y, h, c = recurrence(
            cell, gx, h0[d], None if c0 is None else c0[d], p["w_hh"], p["b_hh"], p["w_hr"],
            lengths, reverse=d == 1, nonlinearity=nonlinearity, grad_clip=grad_clip,
            flow_record=None if flow_record is None else flow_record[d],
        )
        ys.append(y)
        hs.append(h)
        cs.append(c)
    c_n = None if c0 is None else torch.stack(cs)
    return torch.cat(ys, dim=-1), torch.stack(hs), c_n
