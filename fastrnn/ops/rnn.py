"""Elman RNN on the fused kernels of ``fastrnn.kernels.rnn``.

Read top to bottom: the launch helper, forward launcher, backward launcher, the registered
operator ``fastrnn::rnn_recurrence`` (its fake, its backward operator and autograd formula),
``rnn_layer``. Nonlinearities: torch.nn's tanh and relu, plus sigmoid, hardtanh, silu and gelu
(tanh approximation). For silu and gelu the forward also saves the pre-activations (one more
``(T, B, D*H)`` tensor), since their derivative is not a function of the output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.kernels import rnn as kernels
from fastrnn.ops import persistent
from fastrnn.ops.recurrence import (
    PersistentKernel,
    compute_dtype,
    flow_buffer,
    input_precision,
    input_projection,
    kernel_lengths,
    kernel_weight,
    launch,
    previous_states,
    recurrent_weight_grad,
    stack_params,
    write_flow_record,
)

#: Nonlinearity name -> the kernels' code (see ``fastrnn.kernels.activations``).
NONLINEARITIES = {"tanh": 0, "relu": 1, "sigmoid": 2, "hardtanh": 3, "silu": 4, "gelu": 5}
#: Nonlinearities whose derivative needs the pre-activation.
NEEDS_PRE = {"silu", "gelu"}


def rnn_fwd(gx: Tensor, w_hh: Tensor, h0: Tensor, lengths: Tensor | None, nonlinearity: str) -> tuple[Tensor, Tensor, Tensor | None]:
    """``gx (T, B, D*H)``, ``w_hh (D, H, H)``, ``h0 (D, B, H)`` -> ``y (T, B, D*H)``, ``h_n (D, B, H)``,
    and the pre-activations ``(T, B, D*H)`` when the nonlinearity's derivative needs them (else None)."""
    T, B, _ = gx.shape
    D, _, H = h0.shape
    y = torch.empty_like(gx)
    h_n = torch.empty_like(h0)
    pre = torch.empty_like(gx) if nonlinearity in NEEDS_PRE else None
    if B == 0:
        return y, h_n, pre
    w = kernel_weight(w_hh)
    launch(
        "rnn_fwd", 1, (kernels.rnn_fwd_resident_kernel, kernels.rnn_fwd_tiled_kernel),
        [gx.contiguous(), w, h0.contiguous(), kernel_lengths(lengths, gx), y, h_n, y if pre is None else pre],
        dict(T=T, B=B, H=H, D=D, NONLINEARITY=NONLINEARITIES[nonlinearity], HAS_LENGTHS=lengths is not None, INPUT_PRECISION=input_precision(gx.dtype)),
        B=B, H=H, D=D, dtype=gx.dtype, device=gx.device,
        # exchange: the ping-pong of h in the weights' dtype; carry: each program's fp32 state.
        persistent_kernel=PersistentKernel(kernels.rnn_fwd_persistent_kernel, T, [((2, D, B, H), w.dtype), ((D, B, H), torch.float32)],
                                           meta=persistent.register_budget(gx.dtype, fp32=True)),
    )
    return y, h_n, pre


def rnn_bwd(
    dy: Tensor, dh_n: Tensor, y: Tensor, pre: Tensor | None, w_hh: Tensor, lengths: Tensor | None, nonlinearity: str,
    grad_clip: float | None = None, record_flow: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Backward through time: ``dgx (T, B, D*H)`` (gradient of the pre-activations, clipped to
    ``[-grad_clip, grad_clip]`` when given), ``dh0 (D, B, H)``, and with ``record_flow`` the
    squared norms ``||dL/dh_t||^2`` per direction, step and row ``(D, T, B)``."""
    T, B, _ = y.shape
    D, _, H = dh_n.shape
    dgx = torch.empty_like(y)
    dh0 = torch.empty_like(dh_n)
    flow = flow_buffer(record_flow, D, T, B, y.device)
    if B == 0:
        return dgx, dh0, flow
    shares = persistent.flow_shares(flow, 1, H, B, D, y.dtype)
    launch(
        "rnn_bwd", 1, (kernels.rnn_bwd_resident_kernel, kernels.rnn_bwd_tiled_kernel),
        [dy.contiguous(), dh_n.contiguous(), y, kernel_weight(w_hh), kernel_lengths(lengths, y), dgx, dh0,
         y if pre is None else pre, dh0 if flow is None else flow if shares is None else shares],
        dict(T=T, B=B, H=H, D=D, grad_clip=float(grad_clip or 0.0),
             NONLINEARITY=NONLINEARITIES[nonlinearity], HAS_LENGTHS=lengths is not None, INPUT_PRECISION=input_precision(y.dtype),
             CLIP=grad_clip is not None, RECORD_FLOW=record_flow),
        B=B, H=H, D=D, dtype=y.dtype, device=y.device,
        # the gradients are exchanged through dgx itself; carry: each program's fp32 partial dh.
        # fp32 with tf32 products: the register budget, as the LSTM's and GRU's backward
        persistent_kernel=PersistentKernel(kernels.rnn_bwd_persistent_kernel, T + 1, [((D, B, H), torch.float32)],
                                           meta=persistent.register_budget(y.dtype, input_precision(y.dtype, "persistent", 1))),
    )
    if shares is not None:
        flow.copy_(shares.sum(0))
    return dgx, dh0, flow


@torch.library.custom_op("fastrnn::rnn_recurrence", mutates_args=())
def rnn_recurrence(
    gx: Tensor, w_hh: Tensor, h0: Tensor, lengths: Tensor | None, nonlinearity: str, grad_clip: float | None,
    flow_record: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The Elman recurrence of one layer (every direction) as a registered operator:
    ``(gx, w_hh, h0) -> (y, h_n, pre)`` (``pre`` empty unless the nonlinearity needs it). ``grad_clip``
    and ``flow_record`` (a ``(D, T)`` tensor filled in backward) are read by the backward only."""
    y, h_n, pre = rnn_fwd(gx, w_hh, h0, lengths, nonlinearity)
    return y, h_n, (gx.new_empty(0) if pre is None else pre)


@rnn_recurrence.register_fake
def _(gx, w_hh, h0, lengths, nonlinearity, grad_clip, flow_record):
    return torch.empty_like(gx), torch.empty_like(h0), (torch.empty_like(gx) if nonlinearity in NEEDS_PRE else gx.new_empty(0))


@torch.library.custom_op("fastrnn::rnn_recurrence_backward", mutates_args=())
def rnn_recurrence_backward(
    dy: Tensor, dh_n: Tensor, y: Tensor, pre: Tensor, w_hh: Tensor, h0: Tensor, lengths: Tensor | None,
    nonlinearity: str, grad_clip: float | None, record_flow: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dgx, dW_hh, dh0, flow)``: the backward kernel, then ``dW_hh = sum_t g_t^T h_{t-1}`` as one
    batched GEMM; ``flow (D, T, B)`` squared norms (empty unless ``record_flow``)."""
    dgx, dh0, flow = rnn_bwd(dy, dh_n, y, pre if nonlinearity in NEEDS_PRE else None, w_hh, lengths, nonlinearity,
                             grad_clip, record_flow)
    dw_hh = recurrent_weight_grad(dgx, previous_states(y, h0, lengths), h0.shape[0])
    return dgx, dw_hh.to(w_hh.dtype), dh0, (y.new_empty(0) if flow is None else flow)


@rnn_recurrence_backward.register_fake
def _(dy, dh_n, y, pre, w_hh, h0, lengths, nonlinearity, grad_clip, record_flow):
    D, B, _ = h0.shape
    flow = y.new_empty((D, y.shape[0], B), dtype=torch.float32) if record_flow else y.new_empty(0)
    return torch.empty_like(y), torch.empty_like(w_hh), torch.empty_like(dh_n), flow


def _rnn_setup_context(ctx, inputs, output):
    gx, w_hh, h0, lengths, nonlinearity, grad_clip, flow_record = inputs
    y, _, pre = output
    ctx.save_for_backward(y, pre, w_hh, h0, lengths)
    ctx.nonlinearity, ctx.grad_clip, ctx.flow_record = nonlinearity, grad_clip, flow_record


def _rnn_backward(ctx, dy, dh_n, _):
    y, pre, w_hh, h0, lengths = ctx.saved_tensors
    dgx, dw_hh, dh0, flow = rnn_recurrence_backward(
        dy, dh_n, y, pre, w_hh, h0, lengths, ctx.nonlinearity, ctx.grad_clip, ctx.flow_record is not None
    )
    write_flow_record(ctx.flow_record, flow)
    return dgx, dw_hh, dh0, None, None, None, None


rnn_recurrence.register_autograd(_rnn_backward, setup_context=_rnn_setup_context)


def rnn_layer(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, params: list[dict], lengths: Tensor | None, nonlinearity: str,
    grad_clip: float | None = None, flow_record: Tensor | None = None,
):
    """One Elman layer, every direction in one launch; the signature of
    :func:`fastrnn.reference.reference_layer`. Returns ``y (T, B, D*H)``, ``h_n (D, B, H)``, None."""
    dtype = compute_dtype(x)
    gx = input_projection(x, params, dtype, fold_hidden_bias=True)
    w_hh = stack_params(params, "w_hh", dtype)
    with torch.autocast(x.device.type, enabled=False):
        y, h_n, _ = rnn_recurrence(gx, w_hh, h0.to(dtype), lengths, nonlinearity, grad_clip, flow_record)
    return y, h_n, None
