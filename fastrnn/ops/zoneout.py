"""LSTM and GRU with zoneout on the kernels of ``fastrnn.kernels.lstm`` / ``gru`` that zone out.

Read top to bottom: which sizes the kernels take (:func:`zoneout_fits`), the kernels' zoneout
arguments (:func:`zoneout_args`), the autograd Functions, the same Functions as registered
operators (``fastrnn::lstm_zoneout_recurrence``, ``gru_zoneout_recurrence``: what ``torch.compile``
traces, one node per layer; their backward operators keep only the inputs and run the forward
kernel again before the backward), the layer function :func:`zoneout_layer`
that :mod:`fastrnn.regularized_rnn` calls where :mod:`fastrnn.routing` sends a zoneout call to the
kernels.

Zoneout (Krueger et al. 2016; :mod:`fastrnn.regularization`): in training each unit of the state
keeps its previous value where the mask ``keep (T, B, D*H)`` is 1, ``s_t = keep * s_{t-1} +
(1 - keep) * s_new`` (``h``, and ``c`` of an LSTM, with the same mask; a projected ``h`` with the
mask's first ``P`` units of each direction); in eval ``keep`` is the scalar ``p``. The mask is drawn
on the host by :func:`fastrnn.regularization.zoneout_mask`, in its documented order, so the kernel
path and the reference loop agree under one seed. The kernels' constexpr ``ZONEOUT`` (0 off,
1 mask, 2 the scalar ``p``; the convention: :mod:`fastrnn.kernels.zoneout`) leaves the launches
without zoneout compiled as before.

Which kernels zone out: the resident and persistent kernels of the LSTM (with and without
projection) and of the GRU (the persistent ones mix each program's own units of the state, so
the exchanged ``h_t`` is the zoned one). The tiled kernels take no mask: a size that plans to them
runs the reference loop (:func:`zoneout_fits` is what routing asks).

What the forward keeps for the backward beyond the plain kernels' (``fastrnn.ops.lstm`` /
``gru``): the mask (it is the layer's own draw) and, for the LSTM, the cell's candidate state
``cand (T, B, D*H)`` before the mix (compute dtype: ``H`` more values per row, step and
direction), whose ``tanh`` the gate gradients need. ``dW_hh`` is the batched GEMM of the gate
gradients with the zoned states ``h_{t-1}`` read from ``y``; with projection ``dW_hr`` takes
``m_t = sigmoid(o_t) tanh(cand_t)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastrnn.ops import gru as gru_ops
from fastrnn.ops import lstm as lstm_ops
from fastrnn.ops.recurrence import (
    compute_dtype,
    input_projection,
    plan,
    previous_states,
    recurrent_weight_grad,
    stack_params,
    write_flow_record,
)
from fastrnn.registered_ops import OperatorContext, no_tensor, refuse_double_backward

#: Gates per cell with zoneout kernels.
GATES = {"lstm": lstm_ops.GATES, "gru": gru_ops.GATES}
#: The strategies whose kernels zone out, per cell.
ZONEOUT_STRATEGIES = {"lstm": frozenset({"resident", "persistent"}), "gru": frozenset({"resident", "persistent"})}


def zoneout_fits(cell: str, hidden: int, dtype: torch.dtype) -> bool:
    """Whether ``cell`` at cell size ``hidden`` in ``dtype`` plans to kernels that zone out
    (:data:`ZONEOUT_STRATEGIES`: resident and persistent, LSTM and GRU); False for a cell without
    zoneout kernels. ``FASTRNN_STRATEGY`` counts (forcing ``tiled`` sends zoneout calls to the loop)."""
    if cell not in GATES:
        return False
    try:
        return plan(GATES[cell], hidden, dtype).strategy in ZONEOUT_STRATEGIES[cell]
    except ValueError:  # a forced strategy that cannot serve this size
        return False


def zoneout_args(keep: Tensor | None, zoneout_p: float, cand: Tensor | None = None) -> dict:
    """The zoneout kernels' arguments: ``ZONEOUT=1`` with the mask ``keep (T, B, D*H)``
    (training), else ``ZONEOUT=2`` with the scalar ``zoneout_p`` (eval); ``cand`` (LSTM only) the
    ``(T, B, D*H)`` buffer of candidate cell states."""
    args = dict(ZONEOUT=1, keep_ptr=keep) if keep is not None else dict(ZONEOUT=2, zoneout_p=float(zoneout_p))
    if cand is not None:
        args["cand_ptr"] = cand
    return args


class LSTMZoneoutFunction(torch.autograd.Function):
    """One LSTM layer's recurrence (every direction) with zoneout: ``(gx, w_hh, w_hr, h0, c0) ->
    (y, h_n, c_n)``; ``keep`` the mask or None (eval, ``zoneout_p``); ``flow_record`` a ``(D, T)``
    tensor filled in backward."""

    @staticmethod
    def forward(ctx, gx, w_hh, w_hr, h0, c0, lengths, keep, zoneout_p, grad_clip, flow_record):
        T, B, _ = gx.shape
        D, _, H = c0.shape
        cand = gx.new_empty((T, B, D * H))
        y, h_n, c_n, gates, c = lstm_ops.lstm_fwd(gx, w_hh, w_hr, h0, c0, lengths, zoneout=zoneout_args(keep, zoneout_p, cand))
        ctx.save_for_backward(y, gates, c, cand, w_hh, w_hr, h0, c0, lengths, keep)
        ctx.zoneout_p, ctx.grad_clip, ctx.flow_record = zoneout_p, grad_clip, flow_record
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        y, gates, c, cand, w_hh, w_hr, h0, c0, lengths, keep = ctx.saved_tensors
        directions = h0.shape[0]
        dgates, dhp, dh0, dc0, flow = lstm_ops.lstm_bwd(
            dy, dh_n, dc_n, gates, c, c0, w_hh, w_hr, lengths, ctx.grad_clip, ctx.flow_record is not None,
            zoneout=zoneout_args(keep, ctx.zoneout_p, cand),
        )
        write_flow_record(ctx.flow_record, flow)
        dw_hh = recurrent_weight_grad(dgates, previous_states(y, h0, lengths), directions)
        dw_hr = None if w_hr is None else lstm_ops.projection_weight_grad(dhp, gates, cand, directions)
        return dgates, dw_hh, dw_hr, dh0, dc0, None, None, None, None, None


class GRUZoneoutFunction(torch.autograd.Function):
    """One GRU layer's recurrence (every direction) with zoneout: ``(gx, w_hh, b_hh, h0) -> (y, h_n)``;
    ``keep``, ``zoneout_p``, ``flow_record`` as :class:`LSTMZoneoutFunction` takes them."""

    @staticmethod
    def forward(ctx, gx, w_hh, b_hh, h0, lengths, keep, zoneout_p, grad_clip, flow_record):
        y, h_n, saved = gru_ops.gru_fwd(gx, w_hh, b_hh, h0, lengths, zoneout=zoneout_args(keep, zoneout_p))
        ctx.save_for_backward(y, saved, w_hh, h0, lengths, keep)
        ctx.has_bias, ctx.zoneout_p, ctx.grad_clip, ctx.flow_record = b_hh is not None, zoneout_p, grad_clip, flow_record
        return y, h_n

    @staticmethod
    def backward(ctx, dy, dh_n):
        y, saved, w_hh, h0, lengths, keep = ctx.saved_tensors
        directions = h0.shape[0]
        dgx, dgh, dh0, flow = gru_ops.gru_bwd(dy, dh_n, y, h0, saved, w_hh, lengths, ctx.grad_clip,
                                              ctx.flow_record is not None, zoneout=zoneout_args(keep, ctx.zoneout_p))
        write_flow_record(ctx.flow_record, flow)
        dw_hh = recurrent_weight_grad(dgh, previous_states(y, h0, lengths), directions)
        db_hh = dgh.sum(dim=(0, 1)).view(directions, -1) if ctx.has_bias else None
        return dgx, dw_hh, db_hh, dh0, None, None, None, None, None


# ------------------------------------------------------------- the Functions as registered operators
@torch.library.custom_op("fastrnn::lstm_zoneout_recurrence", mutates_args=())
def lstm_zoneout_recurrence(
    gx: Tensor, w_hh: Tensor, w_hr: Tensor | None, h0: Tensor, c0: Tensor, lengths: Tensor | None, keep: Tensor | None,
    zoneout_p: float, grad_clip: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:class:`LSTMZoneoutFunction`'s forward, ``(y, h_n, c_n)``, as what ``torch.compile`` traces."""
    return LSTMZoneoutFunction.forward(OperatorContext(), gx, w_hh, w_hr, h0, c0, lengths, keep, zoneout_p, grad_clip, None)


@lstm_zoneout_recurrence.register_fake
def _(gx, w_hh, w_hr, h0, c0, lengths, keep, zoneout_p, grad_clip):
    T, B, _ = gx.shape
    return gx.new_empty((T, B, h0.shape[0] * h0.shape[2])), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


@torch.library.custom_op("fastrnn::lstm_zoneout_recurrence_backward", mutates_args=())
def lstm_zoneout_recurrence_backward(
    gx: Tensor, w_hh: Tensor, w_hr: Tensor | None, h0: Tensor, c0: Tensor, lengths: Tensor | None, keep: Tensor | None,
    zoneout_p: float, grad_clip: float | None, dy: Tensor, dh_n: Tensor, dc_n: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dgx, dW_hh, dW_hr (empty without), dh0, dc0)``: the forward kernel again (the operator keeps
    only its inputs), then the Function's backward."""
    ctx = OperatorContext()
    LSTMZoneoutFunction.forward(ctx, gx, w_hh, w_hr, h0, c0, lengths, keep, zoneout_p, grad_clip, None)
    dgx, dw_hh, dw_hr, dh0, dc0 = LSTMZoneoutFunction.backward(ctx, dy, dh_n, dc_n)[:5]
    return dgx, dw_hh, (no_tensor(gx) if dw_hr is None else dw_hr), dh0, dc0


@lstm_zoneout_recurrence_backward.register_fake
def _(gx, w_hh, w_hr, h0, c0, lengths, keep, zoneout_p, grad_clip, dy, dh_n, dc_n):
    dw_hr = no_tensor(gx) if w_hr is None else w_hr.new_empty(w_hr.shape)
    return gx.new_empty(gx.shape), w_hh.new_empty(w_hh.shape), dw_hr, h0.new_empty(h0.shape), c0.new_empty(c0.shape)


def _lstm_setup(ctx, inputs, output):
    *tensors, zoneout_p, grad_clip = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = zoneout_p, grad_clip


def _lstm_backward(ctx, dy, dh_n, dc_n):
    gx, w_hh, w_hr, h0, c0, lengths, keep = ctx.saved_tensors
    dgx, dw_hh, dw_hr, dh0, dc0 = lstm_zoneout_recurrence_backward(
        gx, w_hh, w_hr, h0, c0, lengths, keep, *ctx.options, dy.contiguous(), dh_n.contiguous(), dc_n.contiguous())
    return dgx, dw_hh, (None if w_hr is None else dw_hr), dh0, dc0, None, None, None, None


@torch.library.custom_op("fastrnn::gru_zoneout_recurrence", mutates_args=())
def gru_zoneout_recurrence(
    gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, lengths: Tensor | None, keep: Tensor | None,
    zoneout_p: float, grad_clip: float | None,
) -> tuple[Tensor, Tensor]:
    """:class:`GRUZoneoutFunction`'s forward, ``(y, h_n)``, as what ``torch.compile`` traces."""
    return GRUZoneoutFunction.forward(OperatorContext(), gx, w_hh, b_hh, h0, lengths, keep, zoneout_p, grad_clip, None)


@gru_zoneout_recurrence.register_fake
def _(gx, w_hh, b_hh, h0, lengths, keep, zoneout_p, grad_clip):
    T, B, _ = gx.shape
    return gx.new_empty((T, B, h0.shape[0] * h0.shape[2])), h0.new_empty(h0.shape)


@torch.library.custom_op("fastrnn::gru_zoneout_recurrence_backward", mutates_args=())
def gru_zoneout_recurrence_backward(
    gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, lengths: Tensor | None, keep: Tensor | None,
    zoneout_p: float, grad_clip: float | None, dy: Tensor, dh_n: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dgx, dW_hh, db_hh (empty without), dh0)``: the forward kernel again, then the Function's backward."""
    ctx = OperatorContext()
    GRUZoneoutFunction.forward(ctx, gx, w_hh, b_hh, h0, lengths, keep, zoneout_p, grad_clip, None)
    dgx, dw_hh, db_hh, dh0 = GRUZoneoutFunction.backward(ctx, dy, dh_n)[:4]
    return dgx, dw_hh, (no_tensor(gx) if db_hh is None else db_hh), dh0


@gru_zoneout_recurrence_backward.register_fake
def _(gx, w_hh, b_hh, h0, lengths, keep, zoneout_p, grad_clip, dy, dh_n):
    db_hh = no_tensor(gx) if b_hh is None else b_hh.new_empty(b_hh.shape)
    return gx.new_empty(gx.shape), w_hh.new_empty(w_hh.shape), db_hh, h0.new_empty(h0.shape)


def _gru_setup(ctx, inputs, output):
    *tensors, zoneout_p, grad_clip = inputs
    ctx.save_for_backward(*tensors)
    ctx.options = zoneout_p, grad_clip


def _gru_backward(ctx, dy, dh_n):
    gx, w_hh, b_hh, h0, lengths, keep = ctx.saved_tensors
    dgx, dw_hh, db_hh, dh0 = gru_zoneout_recurrence_backward(
        gx, w_hh, b_hh, h0, lengths, keep, *ctx.options, dy.contiguous(), dh_n.contiguous())
    return dgx, dw_hh, (None if b_hh is None else db_hh), dh0, None, None, None, None


#: What double backward is refused through (:func:`fastrnn.registered_ops.refuse_double_backward`).
_DOUBLE_BACKWARD_THROUGH = "fastrnn's zoneout kernels"


lstm_zoneout_recurrence.register_autograd(_lstm_backward, setup_context=_lstm_setup)
refuse_double_backward(lstm_zoneout_recurrence_backward, _DOUBLE_BACKWARD_THROUGH)
gru_zoneout_recurrence.register_autograd(_gru_backward, setup_context=_gru_setup)
refuse_double_backward(gru_zoneout_recurrence_backward, _DOUBLE_BACKWARD_THROUGH)


def zoneout_layer(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, params: list[dict], lengths: Tensor | None,
    keep: Tensor | None, zoneout_p: float, grad_clip: float | None = None, flow_record: Tensor | None = None,
):
    """One LSTM or GRU layer with zoneout, every direction in one launch each way: ``x (T, B, I)``,
    ``h0 (D, B, H_out)``, ``c0 (D, B, H)`` (LSTM), ``params`` as :func:`fastrnn.reference.reference_layer`
    takes them (``w_hh`` possibly DropConnect-masked), ``keep (T, B, D*H)`` the training mask or None
    (eval, ``zoneout_p``). Returns ``y (T, B, D*H_out)``, ``h_n``, ``c_n`` (None for the GRU)."""
    if cell not in GATES:
        raise ValueError(f"zoneout runs on the LSTM and GRU kernels, not {cell!r}")
    dtype = compute_dtype(x)
    if keep is not None:
        keep = keep.to(dtype).contiguous()
    gx = input_projection(x, params, dtype, fold_hidden_bias=cell == "lstm").contiguous()
    w_hh = stack_params(params, "w_hh", dtype)
    compiling = torch.compiler.is_compiling()  # then the operators above (no flow record under compile)
    with torch.autocast(x.device.type, enabled=False):
        if cell == "lstm":
            w_hr = stack_params(params, "w_hr", dtype) if params[0]["w_hr"] is not None else None
            h0, c0 = h0.to(dtype).contiguous(), c0.to(dtype).contiguous()
            if compiling:
                return lstm_zoneout_recurrence(gx, w_hh, w_hr, h0, c0, lengths, keep, zoneout_p, grad_clip)
            return LSTMZoneoutFunction.apply(gx, w_hh, w_hr, h0, c0, lengths, keep, zoneout_p, grad_clip, flow_record)
        b_hh = stack_params(params, "b_hh", dtype) if params[0]["b_hh"] is not None else None
        h0 = h0.to(dtype).contiguous()
        if compiling:
            y, h_n = gru_zoneout_recurrence(gx, w_hh, b_hh, h0, lengths, keep, zoneout_p, grad_clip)
        else:
            y, h_n = GRUZoneoutFunction.apply(gx, w_hh, b_hh, h0, lengths, keep, zoneout_p, grad_clip, flow_record)
        return y, h_n, None
