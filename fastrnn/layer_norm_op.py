"""The LayerNorm cells' hand-written path as registered operators: what ``torch.compile`` traces.

Dynamo would unroll :class:`~fastrnn.layer_norm_rnn.LayerNormLSTMFunction`'s time loop step by step;
as ``fastrnn::layer_norm_lstm_direction`` and ``fastrnn::layer_norm_gru_direction`` (one direction
of one layer each, the Functions' arguments) it sees one node whatever ``T`` is, so
``torch.compile(fullgraph=True)`` traces a whole LayerNormLSTM/GRU. The forward operator runs the
Function's forward; the backward operator (``..._backward``) keeps nothing but the operator's
inputs, so it runs that forward again before the hand-written backward: compiled, a training step
costs one forward more than eager. ``flow_record`` is handed to the backward, which fills it (as
:mod:`fastrnn.native_bptt` does). Not differentiable twice (``FASTRNN_BACKEND=reference`` is).
The layers call these operators only while ``torch.compile`` traces (eager calls run the Functions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.layer_norm_rnn import LayerNormGRUFunction, LayerNormLSTMFunction
from fastrnn.registered_ops import OperatorContext, no_tensor, refuse_double_backward


#: What double backward is refused through (:func:`fastrnn.registered_ops.refuse_double_backward`).
_DOUBLE_BACKWARD_THROUGH = "fastrnn's hand-written LayerNorm backward (torch.compile)"


# ------------------------------------------------------------------------------------ LSTM
@torch.library.custom_op("fastrnn::layer_norm_lstm_direction", mutates_args=())
def lstm_direction(
    x: Tensor, w_ih: Tensor, gain_ih: Tensor, bias: Tensor | None, w_hh: Tensor, gain_hh: Tensor, gain_c: Tensor,
    bias_c: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None, reverse: bool, mask: Tensor | None,
    zoneout_p: float, grad_clip: float | None, flow_record: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`LayerNormLSTMFunction`'s forward: ``(y (T, B, H), h_n (B, H), c_n (B, H))``."""
    return LayerNormLSTMFunction.forward(OperatorContext(), x, w_ih, gain_ih, bias, w_hh, gain_hh, gain_c, bias_c, h0, c0,
                                         lengths, reverse, mask, zoneout_p, grad_clip, None)


@lstm_direction.register_fake
def _(x, w_ih, gain_ih, bias, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, reverse, mask, zoneout_p, grad_clip,
      flow_record):
    return x.new_empty(x.shape[0], x.shape[1], h0.shape[-1]), torch.empty_like(h0), torch.empty_like(c0)


@torch.library.custom_op("fastrnn::layer_norm_lstm_direction_backward", mutates_args=())
def lstm_direction_backward(
    x: Tensor, w_ih: Tensor, gain_ih: Tensor, bias: Tensor | None, w_hh: Tensor, gain_hh: Tensor, gain_c: Tensor,
    bias_c: Tensor, h0: Tensor, c0: Tensor, lengths: Tensor | None, reverse: bool, mask: Tensor | None,
    zoneout_p: float, grad_clip: float | None, dy: Tensor, dh_n: Tensor, dc_n: Tensor, record_flow: bool,
) -> list[Tensor]:
    """``[dx, d w_ih, d gain_ih, d bias (empty without), d w_hh, d gain_hh, d gain_c, d bias_c, dh0, dc0,
    flow (T,) float64 (empty unless record_flow)]``: the forward again, then the hand-written backward."""
    flow = x.new_zeros(x.shape[0], dtype=torch.float64) if record_flow else None
    ctx = OperatorContext((True,))
    LayerNormLSTMFunction.forward(ctx, x, w_ih, gain_ih, bias, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, reverse,
                                  mask, zoneout_p, grad_clip, flow)
    grads = LayerNormLSTMFunction.backward(ctx, dy, dh_n, dc_n)[:10]
    return [no_tensor(x) if g is None else g for g in grads] + [no_tensor(x) if flow is None else flow]


@lstm_direction_backward.register_fake
def _(x, w_ih, gain_ih, bias, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, reverse, mask, zoneout_p, grad_clip,
      dy, dh_n, dc_n, record_flow):
    like = (x, w_ih, gain_ih, bias, w_hh, gain_hh, gain_c, bias_c, h0, c0)
    flow = x.new_empty(x.shape[0], dtype=torch.float64) if record_flow else no_tensor(x)
    return [no_tensor(x) if t is None else t.new_empty(t.shape) for t in like] + [flow]  # contiguous, as computed


def _lstm_setup(ctx, inputs, output):
    *tensors, lengths, reverse, mask, zoneout_p, grad_clip, flow_record = inputs
    ctx.save_for_backward(*tensors, lengths, mask)
    ctx.options = reverse, zoneout_p, grad_clip, flow_record


def _lstm_backward(ctx, dy, dh_n, dc_n):
    *tensors, lengths, mask = ctx.saved_tensors
    reverse, zoneout_p, grad_clip, flow_record = ctx.options
    grads = lstm_direction_backward(*tensors, lengths, reverse, mask, zoneout_p, grad_clip, dy, dh_n, dc_n,
                                    flow_record is not None)
    if flow_record is not None:
        flow_record.copy_(grads[-1])
    grads = [None if (tensor is None) else g for tensor, g in zip(tensors, grads)]
    return (*grads, None, None, None, None, None, None)


lstm_direction.register_autograd(_lstm_backward, setup_context=_lstm_setup)
refuse_double_backward(lstm_direction_backward, _DOUBLE_BACKWARD_THROUGH)


# ------------------------------------------------------------------------------------- GRU
@torch.library.custom_op("fastrnn::layer_norm_gru_direction", mutates_args=())
def gru_direction(
    x: Tensor, w_ih: Tensor, gain_ih: Tensor, b_ih: Tensor | None, w_hh: Tensor, gain_hh: Tensor, b_hh: Tensor,
    h0: Tensor, lengths: Tensor | None, reverse: bool, mask: Tensor | None, zoneout_p: float,
    grad_clip: float | None, flow_record: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """:class:`LayerNormGRUFunction`'s forward: ``(y (T, B, H), h_n (B, H))``."""
    return LayerNormGRUFunction.forward(OperatorContext(), x, w_ih, gain_ih, b_ih, w_hh, gain_hh, b_hh, h0, lengths, reverse,
                                        mask, zoneout_p, grad_clip, None)


@gru_direction.register_fake
def _(x, w_ih, gain_ih, b_ih, w_hh, gain_hh, b_hh, h0, lengths, reverse, mask, zoneout_p, grad_clip, flow_record):
    return x.new_empty(x.shape[0], x.shape[1], h0.shape[-1]), torch.empty_like(h0)


@torch.library.custom_op("fastrnn::layer_norm_gru_direction_backward", mutates_args=())
def gru_direction_backward(
    x: Tensor, w_ih: Tensor, gain_ih: Tensor, b_ih: Tensor | None, w_hh: Tensor, gain_hh: Tensor, b_hh: Tensor,
    h0: Tensor, lengths: Tensor | None, reverse: bool, mask: Tensor | None, zoneout_p: float,
    grad_clip: float | None, dy: Tensor, dh_n: Tensor, record_flow: bool,
) -> list[Tensor]:
    """``[dx, d w_ih, d gain_ih, d b_ih (empty without), d w_hh, d gain_hh, d b_hh, dh0, flow]``."""
    flow = x.new_zeros(x.shape[0], dtype=torch.float64) if record_flow else None
    ctx = OperatorContext((True,))
    LayerNormGRUFunction.forward(ctx, x, w_ih, gain_ih, b_ih, w_hh, gain_hh, b_hh, h0, lengths, reverse, mask, zoneout_p,
                                 grad_clip, flow)
    grads = LayerNormGRUFunction.backward(ctx, dy, dh_n)[:8]
    return [no_tensor(x) if g is None else g for g in grads] + [no_tensor(x) if flow is None else flow]


@gru_direction_backward.register_fake
def _(x, w_ih, gain_ih, b_ih, w_hh, gain_hh, b_hh, h0, lengths, reverse, mask, zoneout_p, grad_clip, dy, dh_n,
      record_flow):
    like = (x, w_ih, gain_ih, b_ih, w_hh, gain_hh, b_hh, h0)
    flow = x.new_empty(x.shape[0], dtype=torch.float64) if record_flow else no_tensor(x)
    return [no_tensor(x) if t is None else t.new_empty(t.shape) for t in like] + [flow]  # contiguous, as computed


def _gru_setup(ctx, inputs, output):
    *tensors, lengths, reverse, mask, zoneout_p, grad_clip, flow_record = inputs
    ctx.save_for_backward(*tensors, lengths, mask)
    ctx.options = reverse, zoneout_p, grad_clip, flow_record


def _gru_backward(ctx, dy, dh_n):
    *tensors, lengths, mask = ctx.saved_tensors
    reverse, zoneout_p, grad_clip, flow_record = ctx.options
    grads = gru_direction_backward(*tensors, lengths, reverse, mask, zoneout_p, grad_clip, dy, dh_n, flow_record is not None)
    if flow_record is not None:
        flow_record.copy_(grads[-1])
    grads = [None if (tensor is None) else g for tensor, g in zip(tensors, grads)]
    return (*grads, None, None, None, None, None, None)


gru_direction.register_autograd(_gru_backward, setup_context=_gru_setup)
refuse_double_backward(gru_direction_backward, _DOUBLE_BACKWARD_THROUGH)
