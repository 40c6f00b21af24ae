"""LSTM and GRU zoneout on the reference cell steps as a registered operator: what ``torch.compile`` traces.

Dynamo would unroll :func:`fastrnn.regularized_rnn.zoned_reference_layer`'s time loop step by step
(a graph that grows with ``T`` and recompiles for each new one); as
``fastrnn::zoned_reference_layer`` (one layer, every direction: ``(x, h0, c0, weights) -> (y, h_n,
c_n)``) it sees one node whatever ``T`` is. The forward operator runs that loop; the backward
operator (``..._backward``) keeps nothing but the operator's inputs, so it runs the loop again
under ``torch.func.vjp`` and pulls the output gradients back through it: compiled, a training step
costs one forward more than eager, and gives eager's gradients (the same steps, differentiated
by autograd).

The zoneout mask ``keep (T, B, D*H)`` and the DropConnect-masked ``W_hh`` are inputs:
:mod:`fastrnn.regularization` draws both in the traced graph, where Dynamo sees every draw, and
the operator draws nothing (a compiled call draws what an eager call draws where the backend runs
``torch.rand`` as eager does: see :mod:`fastrnn.indrnn_op`). Not differentiable twice
(``FASTRNN_BACKEND=reference`` is: with it the loop runs unwrapped, and Dynamo unrolls it).
:mod:`fastrnn.regularized_rnn` calls this operator only while ``torch.compile`` traces a zoneout
call that routing sends to the loop (on the CPU, every one; the resident kernels have their own
operators in :mod:`fastrnn.ops.zoneout`). Gradient flow is not recorded under compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.registered_ops import refuse_double_backward
from fastrnn.regularized_rnn import zoned_reference_layer as _loop

#: A direction's parameters as :func:`fastrnn.reference.reference_layer` names them.
PARAMETER_KINDS = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def _flatten(params: list[dict]) -> tuple[list[Tensor], list[int]]:
    """The parameters that exist, and where each sits in the ``D * len(PARAMETER_KINDS)`` slots of
    every direction's :data:`PARAMETER_KINDS` (an operator's list of tensors holds no None)."""
    slots = [p.get(kind) for p in params for kind in PARAMETER_KINDS]
    return [w for w in slots if w is not None], [i for i, w in enumerate(slots) if w is not None]


def _run(cell, x, h0, c0, weights, slots, lengths, keep, zoneout_p, grad_clip):
    kinds = len(PARAMETER_KINDS)
    flat = [None] * (h0.shape[0] * kinds)
    for slot, weight in zip(slots, weights, strict=True):
        flat[slot] = weight
    params = [dict(zip(PARAMETER_KINDS, flat[d * kinds:(d + 1) * kinds])) for d in range(h0.shape[0])]
    y, h_n, c_n = _loop(cell, x, h0, c0, params, lengths, keep, zoneout_p, grad_clip)
    return y, h_n, (x.new_empty(0) if c_n is None else c_n)


@torch.library.custom_op("fastrnn::zoned_reference_layer", mutates_args=())
def zoned_reference_layer_op(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor], slots: list[int],
    lengths: Tensor | None, keep: Tensor | None, zoneout_p: float, grad_clip: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(y (T, B, D*H_out), h_n (D, B, H_out), c_n (D, B, H); empty for the GRU)``: the zoned loop's forward."""
    return _run(cell, x, h0, c0, weights, slots, lengths, keep, zoneout_p, grad_clip)


@zoned_reference_layer_op.register_fake
def _(cell, x, h0, c0, weights, slots, lengths, keep, zoneout_p, grad_clip):
    y = x.new_empty((x.shape[0], x.shape[1], h0.shape[0] * h0.shape[2]))
    return y, h0.new_empty(h0.shape), (x.new_empty(0) if c0 is None else c0.new_empty(c0.shape))


@torch.library.custom_op("fastrnn::zoned_reference_layer_backward", mutates_args=())
def zoned_reference_layer_backward(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor], slots: list[int],
    lengths: Tensor | None, keep: Tensor | None, zoneout_p: float, grad_clip: float | None,
    dy: Tensor, dh_n: Tensor, dc_n: Tensor,
) -> list[Tensor]:
    """``[dx, dh0, dc0 (empty for the GRU), d weights...]``: the loop again under ``torch.func.vjp``
    (autograd is off inside an operator; functorch's transform is not), then its pullback."""
    states = (h0,) if c0 is None else (h0, c0)

    def forward(x, states, weights):  # functorch differentiates tensors only: the GRU's states are (h0,)
        y, h_n, c_n = _run(cell, x, states[0], states[1] if c0 is not None else None, weights, slots, lengths, keep,
                           zoneout_p, grad_clip)
        return (y, h_n) if c0 is None else (y, h_n, c_n)

    _, pullback = torch.func.vjp(forward, x, states, list(weights))
    dx, dstates, dweights = pullback((dy, dh_n) if c0 is None else (dy, dh_n, dc_n))
    dc0 = x.new_empty(0) if c0 is None else dstates[1].contiguous()
    return [dx.contiguous(), dstates[0].contiguous(), dc0, *(g.contiguous() for g in dweights)]


@zoned_reference_layer_backward.register_fake
def _(cell, x, h0, c0, weights, slots, lengths, keep, zoneout_p, grad_clip, dy, dh_n, dc_n):
    dc0 = x.new_empty(0) if c0 is None else c0.new_empty(c0.shape)
    return [x.new_empty(x.shape), h0.new_empty(h0.shape), dc0,
            *(w.new_empty(w.shape) for w in weights)]


def _setup(ctx, inputs, output):
    cell, x, h0, c0, weights, slots, lengths, keep, zoneout_p, grad_clip = inputs
    ctx.save_for_backward(x, h0, c0, lengths, keep, *weights)
    ctx.options = cell, slots, zoneout_p, grad_clip


def _backward(ctx, dy, dh_n, dc_n):
    x, h0, c0, lengths, keep, *weights = ctx.saved_tensors
    cell, slots, zoneout_p, grad_clip = ctx.options
    dx, dh0, dc0, *dweights = zoned_reference_layer_backward(
        cell, x, h0, c0, weights, slots, lengths, keep, zoneout_p, grad_clip,
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(),
    )
    return None, dx, dh0, (None if c0 is None else dc0), dweights, None, None, None, None, None


zoned_reference_layer_op.register_autograd(_backward, setup_context=_setup)
refuse_double_backward(zoned_reference_layer_backward, "fastrnn::zoned_reference_layer (torch.compile)")


def zoned_reference_layer(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, params: list[dict], lengths: Tensor | None,
    keep: Tensor | None, zoneout_p: float, grad_clip: float | None,
):
    """:func:`fastrnn.regularized_rnn.zoned_reference_layer`'s signature (no flow record) through
    the operator. Returns ``y``, ``h_n``, ``c_n`` (None for the GRU)."""
    y, h_n, c_n = zoned_reference_layer_op(cell, x, h0.contiguous(), None if c0 is None else c0.contiguous(),
                                           *_flatten(params), lengths, keep, zoneout_p, grad_clip)
    return y, h_n, (c_n if cell == "lstm" else None)
