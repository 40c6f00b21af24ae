"""GRU on the fused kernels of ``fastrnn.kernels.gru``.

Read top to bottom: launch helper, forward launcher, backward launcher, ``GRUFunction``, ``gru_layer``.

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


def gru_fwd(gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``gx (T, B, D*3H)``, ``w_hh (D, 3H, H)``, ``b_hh (D, 3H)`` or None, ``h0 (D, B, H)`` ->
    ``y (T, B, D*H)``, ``h_n (D, B, H)``, ``saved (T, B, D*4H)`` (``[r, z, n, gh_n]`` per step)."""
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
        # exchange: the ping-pong of h in the weights' dtype; carry: each program's fp32 state.
        persistent_kernel=PersistentKernel(kernels.gru_fwd_persistent_kernel, T, [((2, D, B, H), w.dtype), ((D, B, H), torch.float32)]),
    )
    return y, h_n, saved


def gru_bwd(
    dy: Tensor, dh_n: Tensor, y: Tensor, h0: Tensor, saved: Tensor, w_hh: Tensor, lengths: Tensor | None,
    grad_clip: float | None = None, record_flow: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward through time: ``dgx (T, B, D*3H)`` (gradient of ``gx``), ``dgh (T, B, D*3H)``
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
        # the gradients are exchanged through dgh itself; carry: each program's fp32 partial dh.
        persistent_kernel=PersistentKernel(kernels.gru_bwd_persistent_kernel, T + 1, [((D, B, H), torch.float32)]),
    )
    if shares is not None:
        flow.copy_(shares.sum(0))
    return dgx, dgh, dh0, flow


class GRUFunction(torch.autograd.Function):
    """The GRU recurrence of one layer (every direction): ``(gx, w_hh, b_hh, h0) -> (y, h_n)``.

    ``dW_hh = sum_t dgh_t^T h_{t-1}`` is one batched GEMM after the backward kernel and
    ``db_hh = sum_{t,b} dgh``; ``dgx`` flows back through the input projection by ordinary autograd.
    """

    @staticmethod
    def forward(ctx, gx, w_hh, b_hh, h0, lengths, grad_clip, flow_record):
        y, h_n, saved = gru_fwd(gx, w_hh, b_hh, h0, lengths)
        ctx.save_for_backward(y, saved, w_hh, h0, lengths)
        ctx.has_bias = b_hh is not None
        ctx.grad_clip, ctx.flow_record = grad_clip, flow_record
        return y, h_n

    @staticmethod
    def backward(ctx, dy: Tensor, dh_n: Tensor):
        y, saved, w_hh, h0, lengths = ctx.saved_tensors
        directions = h0.shape[0]
        dgx, dgh, dh0, flow = gru_bwd(dy, dh_n, y, h0, saved, w_hh, lengths, ctx.grad_clip, ctx.flow_record is not None)
        write_flow_record(ctx.flow_record, flow)
        dw_hh = db_hh = None
        if ctx.needs_input_grad[1]:
            dw_hh = recurrent_weight_grad(dgh, previous_states(y, h0, lengths), directions)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db_hh = dgh.sum(dim=(0, 1)).view(directions, -1)
        return dgx, dw_hh, db_hh, dh0, None, None, None


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
        y, h_n = GRUFunction.apply(gx, w_hh, b_hh, h0.to(dtype), lengths, grad_clip, flow_record)
    return y, h_n, None
