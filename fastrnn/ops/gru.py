"""GRU on the fused kernels of ``fastrnn.kernels.gru``.

Read top to bottom: launch helper, forward launcher, backward launcher, the registered operator
``fastrnn::gru_recurrence`` (its fake, its backward operator and autograd formula), ``gru_layer``.

Bias: ``b_ih`` (all three gates) is folded into the input projection ``gx``; ``b_hh`` goes to the
kernel, since ``b_hn`` must stay inside the reset product ``r * (W_hn h + b_hn)``.

Memory the forward keeps for the backward, per row, step and direction, beyond the output ``y``:
``saved = [r, z, n, gh_n]``, ``4H`` values in the compute dtype (16H bytes fp32, 8H bytes
fp16/bf16). The backward allocates ``dgx`` and ``dgh`` (``3H`` values each); ``dgh`` is freed once
``dW_hh`` and ``db_hh`` are reduced from it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.kernels import gru as kernels
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

GATES = 3


def gru_fwd(gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, lengths: Tensor | None,
            zoneout: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``gx (T, B, D*3H)``, ``w_hh (D, 3H, H)``, ``b_hh (D, 3H)`` or None, ``h0 (D, B, H)`` ->
    ``y (T, B, D*H)``, ``h_n (D, B, H)``, ``saved (T, B, D*4H)`` (``[r, z, n, gh_n]`` per step).
    ``zoneout``: the kernels' zoneout arguments (:func:`fastrnn.ops.zoneout.zoneout_args`; the
    resident and persistent kernels take them, the tiled ones do not)."""
    T, B, _ = gx.shape
    D, _, H = h0.shape
    y = gx.new_empty((T, B, D * H))
    h_n = torch.empty_like(h0)
    saved = gx.new_empty((T, B, D * 4 * H))
    if B == 0:
        return y, h_n, saved
    gx = gx.contiguous()
    w = kernel_weight(w_hh)
    launch(
        "gru_fwd", GATES, (kernels.gru_fwd_resident_kernel, kernels.gru_fwd_tiled_kernel),
        [gx, w, gx if b_hh is None else b_hh.contiguous(), h0.contiguous(),
         kernel_lengths(lengths, gx), y, h_n, saved],
        dict(T=T, B=B, H=H, D=D, HAS_BIAS=b_hh is not None, HAS_LENGTHS=lengths is not None, INPUT_PRECISION=input_precision(gx.dtype)),
        B=B, H=H, D=D, dtype=gx.dtype, device=gx.device,
        zoneout_meta=zoneout,  # for the resident and persistent kernels
        # exchange: the ping-pong of h in the weights' dtype; carry: each program's fp32 state.
        persistent_kernel=PersistentKernel(kernels.gru_fwd_persistent_kernel, T, [((2, D, B, H), w.dtype), ((D, B, H), torch.float32)],
                                           meta=dict(persistent.register_budget(gx.dtype), SPLIT_K=gx.dtype != torch.float32),
                                           zoneout=True),
    )
    return y, h_n, saved


def gru_bwd(
    dy: Tensor, dh_n: Tensor, y: Tensor, h0: Tensor, saved: Tensor, w_hh: Tensor, lengths: Tensor | None,
    grad_clip: float | None = None, record_flow: bool = False, zoneout: dict | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward through time (``zoneout`` as :func:`gru_fwd` takes it): ``dgx (T, B, D*3H)`` (gradient of ``gx``), ``dgh (T, B, D*3H)``
    (gradient of ``h W_hh^T + b_hh``), ``dh0 (D, B, H)``; gate gradients clamped to
    ``[-grad_clip, grad_clip]`` when given; with ``record_flow`` the squared norms
    ``||dL/dh_t||^2`` per direction, step and row ``(D, T, B)``."""
    T, B, _ = y.shape
    D, _, H = dh_n.shape
    dgx = y.new_empty((T, B, D * GATES * H))
    dgh = y.new_empty((T, B, D * GATES * H))
    dh0 = torch.empty_like(dh_n)
    flow = flow_buffer(record_flow, D, T, B, y.device)
    if B == 0:
        return dgx, dgh, dh0, flow
    shares = persistent.flow_shares(flow, GATES, H, B, D, y.dtype)
    launch(
        "gru_bwd", GATES, (kernels.gru_bwd_resident_kernel, kernels.gru_bwd_tiled_kernel),
        [dy.contiguous(), dh_n.contiguous(), y, h0.contiguous(), saved, kernel_weight(w_hh),
         kernel_lengths(lengths, y), dgx, dgh, dh0, dh0 if flow is None else flow if shares is None else shares],
        dict(T=T, B=B, H=H, D=D, grad_clip=float(grad_clip or 0.0), HAS_LENGTHS=lengths is not None,
             INPUT_PRECISION=input_precision(y.dtype), CLIP=grad_clip is not None, RECORD_FLOW=record_flow),
        B=B, H=H, D=D, dtype=y.dtype, device=y.device,
        zoneout_meta=zoneout,  # for the resident and persistent kernels
        # the gradients are exchanged through dgh itself; carry: each program's fp32 partial dh.
        # fp32 with tf32 products: the register budget (persistent.register_budget), as the LSTM's; the
        # forward keeps none (with it its full form spills, 56-80 B on sm_90).
        persistent_kernel=PersistentKernel(kernels.gru_bwd_persistent_kernel, T + 1, [((D, B, H), torch.float32)],
                                           meta=dict(persistent.register_budget(y.dtype, input_precision(y.dtype, "persistent", GATES)),
                                                     SPLIT_K=y.dtype != torch.float32),
                                           zoneout=True),
    )
    if shares is not None:
        flow.copy_(shares.sum(0))
    return dgx, dgh, dh0, flow


@torch.library.custom_op("fastrnn::gru_recurrence", mutates_args=())
def gru_recurrence(
    gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, lengths: Tensor | None, grad_clip: float | None,
    flow_record: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The GRU recurrence of one layer (every direction) as a registered operator:
    ``(gx, w_hh, b_hh, h0) -> (y, h_n, saved)``. ``grad_clip`` and ``flow_record`` (a ``(D, T)``
    tensor filled in backward) are read by the backward only."""
    return gru_fwd(gx, w_hh, b_hh, h0, lengths)


@gru_recurrence.register_fake
def _(gx, w_hh, b_hh, h0, lengths, grad_clip, flow_record):
    T, B, _ = gx.shape
    D, _, H = h0.shape
    return gx.new_empty((T, B, D * H)), torch.empty_like(h0), gx.new_empty((T, B, D * 4 * H))


@torch.library.custom_op("fastrnn::gru_recurrence_backward", mutates_args=())
def gru_recurrence_backward(
    dy: Tensor, dh_n: Tensor, y: Tensor, h0: Tensor, saved: Tensor, w_hh: Tensor, lengths: Tensor | None,
    grad_clip: float | None, record_flow: bool, has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dgx, dW_hh, db_hh, dh0, flow)``: the backward kernel, then ``dW_hh = sum_t dgh_t^T h_{t-1}``
    (one batched GEMM) and ``db_hh = sum_{t,b} dgh`` (empty without bias); ``flow (D, T, B)``
    squared norms (empty unless ``record_flow``)."""
    directions = h0.shape[0]
    dgx, dgh, dh0, flow = gru_bwd(dy, dh_n, y, h0, saved, w_hh, lengths, grad_clip, record_flow)
    dw_hh = recurrent_weight_grad(dgh, previous_states(y, h0, lengths), directions)
    db_hh = dgh.sum(dim=(0, 1)).view(directions, -1) if has_bias else y.new_empty(0)
    return dgx, dw_hh, db_hh, dh0, (y.new_empty(0) if flow is None else flow)


@gru_recurrence_backward.register_fake
def _(dy, dh_n, y, h0, saved, w_hh, lengths, grad_clip, record_flow, has_bias):
    D, B, _ = h0.shape
    T = y.shape[0]
    flow = y.new_empty((D, T, B), dtype=torch.float32) if record_flow else y.new_empty(0)
    db_hh = y.new_empty((D, w_hh.shape[1])) if has_bias else y.new_empty(0)
    return y.new_empty((T, B, D * w_hh.shape[1])), torch.empty_like(w_hh), db_hh, torch.empty_like(dh_n), flow


def _gru_setup_context(ctx, inputs, output):
    gx, w_hh, b_hh, h0, lengths, grad_clip, flow_record = inputs
    y, _, saved = output
    ctx.save_for_backward(y, saved, w_hh, h0, lengths)
    ctx.has_bias = b_hh is not None
    ctx.grad_clip, ctx.flow_record = grad_clip, flow_record


def _gru_backward(ctx, dy, dh_n, _):
    y, saved, w_hh, h0, lengths = ctx.saved_tensors
    dgx, dw_hh, db_hh, dh0, flow = gru_recurrence_backward(
        dy, dh_n, y, h0, saved, w_hh, lengths, ctx.grad_clip, ctx.flow_record is not None, ctx.has_bias
    )
    write_flow_record(ctx.flow_record, flow)
    return dgx, dw_hh, (db_hh if ctx.has_bias else None), dh0, None, None, None


gru_recurrence.register_autograd(_gru_backward, setup_context=_gru_setup_context)


def gru_layer(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, params: list[dict], lengths: Tensor | None, nonlinearity: str,
    grad_clip: float | None = None, flow_record: Tensor | None = None,
):
    """One GRU layer, every direction in one launch; the signature of
    :func:`fastrnn.reference.reference_layer`. Returns ``y (T, B, D*H)``, ``h_n (D, B, H)``, None."""
    dtype = compute_dtype(x)
    gx = input_projection(x, params, dtype, fold_hidden_bias=False)
    w_hh = stack_params(params, "w_hh", dtype)
    b_hh = stack_params(params, "b_hh", dtype) if params[0]["b_hh"] is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y, h_n, _ = gru_recurrence(gx, w_hh, b_hh, h0.to(dtype), lengths, grad_clip, flow_record)
    return y, h_n, None
