"""Native forward, hand-written backpropagation through time: one registered operator per layer.

What the CPU runs when PyTorch's native RNN op alone cannot serve a layer: ``grad_clip``,
:func:`fastrnn.record_gradient_flow`, and every layer under ``torch.compile`` (inductor cannot
lower the native op, and Dynamo would unroll the reference loop step by step).

* Forward: PyTorch's native op (``torch._VF.rnn_tanh/rnn_relu/gru/lstm``, one layer, both
  directions) yields every ``h_t``. The extra Elman nonlinearities (sigmoid, hardtanh, silu, gelu),
  which the native op lacks, run a step loop of one GEMM and one activation per step instead.
* Backward (:func:`layer_backward`): from ``h_{t-1}`` of every step, the gate pre-activations of the
  whole sequence are one GEMM, and everything that does not depend on the incoming gradient (gate
  derivatives, length masks) is computed for all steps at once. Only the step-to-step product runs
  in a loop: per step a few elementwise ops on ``(B, G*H)`` and one ``(B, G*H) x (G*H, H_out)``
  GEMM. The weight gradients are GEMMs over all ``T*B`` rows after the loop.

Semantics are those of :mod:`fastrnn.reference` (the tests hold them to it at 1e-9 in float64):
``grad_clip`` clamps each step's pre-activation gradients (LSTM: the four gates; GRU: r, z, n;
Elman: the pre-activation), ``flow_record (D, T)`` receives ``||dL/dh_t||`` per direction and step,
and a row's state is frozen past its length (its output zero there).

Tensors are time-major: ``x (T, B, I)``, ``h0 (D, B, H_out)``, ``c0 (D, B, H)`` (LSTM), ``lengths
(B,)`` or None; ``weights`` is the flat list ``[w_ih, w_hh, (b_ih, b_hh), (w_hr)]`` of every
direction in turn, as ``torch._VF`` takes one layer's weights.

The operator is ``fastrnn::native_bptt_layer`` (forward) with ``fastrnn::native_bptt_layer_backward``
registered as its autograd formula: Dynamo sees one node per layer whatever ``T`` is. Its backward
is not differentiable again (double backward: ``FASTRNN_BACKEND=reference``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, _VF
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fastrnn.reference import ACTIVATIONS
from fastrnn.registered_ops import no_tensor, refuse_double_backward

#: Elman nonlinearities the native op computes; the others run the forward step loop.
NATIVE_NONLINEARITIES = ("tanh", "relu")

_NATIVE_OPS = {"gru": _VF.gru, "lstm": _VF.lstm}

_aten = torch.ops.aten
#: The derivative of each Elman activation at the pre-activation, by the same ATen backward
#: kernels autograd runs for the reference (so the slopes agree bit for bit).
ACTIVATION_SLOPES = {
    "tanh": lambda pre: _aten.tanh_backward(torch.ones_like(pre), torch.tanh(pre)),
    "relu": lambda pre: _aten.threshold_backward(torch.ones_like(pre), torch.relu(pre), 0),
    "sigmoid": lambda pre: _aten.sigmoid_backward(torch.ones_like(pre), torch.sigmoid(pre)),
    "hardtanh": lambda pre: _aten.hardtanh_backward(torch.ones_like(pre), pre, -1.0, 1.0),
    "silu": lambda pre: _aten.silu_backward(torch.ones_like(pre), pre),
    "gelu": lambda pre: _aten.gelu_backward(torch.ones_like(pre), pre, approximate="tanh"),
}


def _native_fn(cell: str, nonlinearity: str):
    if cell == "rnn":
        return _VF.rnn_tanh if nonlinearity == "tanh" else _VF.rnn_relu
    return _NATIVE_OPS[cell]


def direction_weights(weights: list[Tensor], directions: int) -> list[dict[str, Tensor | None]]:
    """Split the flat weight list into ``[{w_ih, w_hh, b_ih, b_hh, w_hr}]`` per direction
    (2 per direction: no bias; 3: projection, no bias; 4: bias; 5: bias and projection)."""
    per = len(weights) // directions
    names = {2: ("w_ih", "w_hh"), 3: ("w_ih", "w_hh", "w_hr"), 4: ("w_ih", "w_hh", "b_ih", "b_hh"),
             5: ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")}[per]
    out = []
    for d in range(directions):
        p = dict.fromkeys(("w_ih", "w_hh", "b_ih", "b_hh", "w_hr"))
        p.update(zip(names, weights[d * per:(d + 1) * per]))
        out.append(p)
    return out


def _valid_steps(lengths: Tensor | None, steps: int, device) -> Tensor | None:
    """``(T, B, 1)`` bool: step ``t`` of row ``b`` lies within its length (None: all do)."""
    if lengths is None:
        return None
    return (torch.arange(steps, device=device)[:, None] < lengths.to(device)[None, :])[..., None]


# ------------------------------------------------------------------------------------ forward
def _native_forward(cell, nonlinearity, x, h0, c0, weights, lengths):
    """One layer on PyTorch's native op: ``y (T, B, D*H_out)``, ``h_n``, ``c_n`` (or None)."""
    fn = _native_fn(cell, nonlinearity)
    directions = h0.shape[0]
    has_bias = len(weights) // directions >= 4
    hx = (h0, c0) if cell == "lstm" else h0
    flags = (has_bias, 1, 0.0, False, directions == 2)
    if lengths is None or x.shape[1] == 0:
        result = fn(x, hx, weights, *flags, False)
        return result[0], result[1], (result[2] if cell == "lstm" else None)
    packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
    order, unorder = packed.sorted_indices, packed.unsorted_indices
    hx = tuple(s.index_select(1, order) for s in hx) if cell == "lstm" else hx.index_select(1, order)
    result = fn(packed.data, packed.batch_sizes, hx, weights, *flags)
    y, _ = pad_packed_sequence(PackedSequence(result[0], packed.batch_sizes, order, unorder), total_length=x.shape[0])
    c_n = result[2].index_select(1, unorder) if cell == "lstm" else None
    return y, result[1].index_select(1, unorder), c_n


def _loop_forward(nonlinearity, x, h0, weights, lengths):
    """An Elman layer whose nonlinearity the native op lacks: one GEMM and activation per step."""
    act = ACTIVATIONS[nonlinearity]
    steps = x.shape[0]
    valid = _valid_steps(lengths, steps, x.device)
    ys, hs = [], []
    for d, p in enumerate(direction_weights(weights, h0.shape[0])):
        gx = F.linear(x, p["w_ih"], p["b_ih"])
        y = torch.zeros(steps, *h0.shape[1:], dtype=x.dtype, device=x.device)
        h = h0[d]
        for t in (range(steps - 1, -1, -1) if d == 1 else range(steps)):
            h_new = act(torch.addmm(gx[t], h, p["w_hh"].t()) if p["b_hh"] is None else
                        torch.addmm(gx[t] + p["b_hh"], h, p["w_hh"].t()))
            if valid is None:
                h = h_new
                y[t] = h_new
            else:
                h = torch.where(valid[t], h_new, h)
                y[t] = torch.where(valid[t], h_new, 0.0)
        ys.append(y)
        hs.append(h)
    return torch.cat(ys, dim=-1), torch.stack(hs)


def layer_forward(cell, nonlinearity, x, h0, c0, weights, lengths):
    """The forward of one layer: ``y (T, B, D*H_out)``, ``h_n (D, B, H_out)``, ``c_n (D, B, H)`` or None."""
    if cell == "rnn" and nonlinearity not in NATIVE_NONLINEARITIES:
        y, h_n = _loop_forward(nonlinearity, x, h0, weights, lengths)
        return y, h_n, None
    return _native_forward(cell, nonlinearity, x, h0, c0, weights, lengths)


# ----------------------------------------------------------------------------------- backward
def _previous(y_d: Tensor, first: Tensor, reverse: bool, valid: Tensor | None) -> Tensor:
    """The state each step read, ``(T, B, K)``: the step before in walking order (``first`` for
    the first step; reverse with lengths: ``first`` at each row's last valid step too)."""
    if not reverse:
        return torch.cat([first[None], y_d[:-1]])
    prev = torch.cat([y_d[1:], first[None]])
    if valid is not None:
        starts = torch.cat([~valid[1:], torch.ones_like(valid[:1])])  # step t+1 is past the row's end
        prev = torch.where(starts, first[None], prev)
    return prev


def _backward_direction(cell, nonlinearity, p, x, gx, h0, c0, y_d, dy_d, dh, dc, valid, reverse, grad_clip, record):
    """BPTT of one direction. Returns ``dgx (T, B, G*H)`` (gradient of ``x W_ih^T + b_ih``),
    ``dgh (T, B, G*H)`` (of ``h W_hh^T + b_hh``), ``dh0``, ``dc0``, ``dw_hr``, ``dH (T, B, H_out)``
    (the gradient reaching each step's output state, before masking; None unless recording or
    projecting) and ``h_prev (T, B, H_out)``, the state each step read."""
    steps, batch, _ = x.shape
    w_hh, w_hr = p["w_hh"], p["w_hr"]
    h_prev = _previous(y_d, h0, reverse, valid)
    gh = F.linear(h_prev, w_hh, p["b_hh"])  # every step's recurrent pre-activation: one GEMM
    mask = 1.0 if valid is None else valid.to(x.dtype)
    order = range(steps) if reverse else range(steps - 1, -1, -1)
    passthrough = None if valid is None else (~valid).to(x.dtype)  # a frozen row hands dh straight back
    if valid is not None:
        dy_d = dy_d * mask
    dH = torch.empty_like(dy_d) if (record or w_hr is not None) else None

    if cell == "rnn":
        pre = gx + gh
        slope = ACTIVATION_SLOPES[nonlinearity](pre)
        if valid is not None:
            slope = slope * mask
        dpre = torch.empty_like(pre)
        for t in order:
            dh_t = dh + dy_d[t]
            if dH is not None:
                dH[t] = dh_t
            g = torch.mul(dh_t, slope[t], out=dpre[t])
            if grad_clip is not None:
                g.clamp_(-grad_clip, grad_clip)
            dh = g @ w_hh if passthrough is None else torch.addmm(dh_t * passthrough[t], g, w_hh)
        return dpre, dpre, dh, None, None, dH, h_prev

    if cell == "gru":
        hidden = w_hh.shape[1]
        x_r, x_z, x_n = gx.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        # dh_t -> (dz_pre, dn_pre) by one product with [z', n'] coefficients; dr_pre from dn_pre.
        coef_zn = torch.stack([(h_prev - n) * z * (1 - z), (1 - z) * (1 - n.square())], dim=2)
        if valid is not None:
            coef_zn = coef_zn * mask[..., None]
        coef_r = h_n * r * (1 - r)
        keep = z if valid is None else torch.where(valid, z, 1.0)
        dgx = gx.new_empty((steps, batch, 3, hidden))
        dgh = gx.new_empty((steps, batch, 3, hidden))
        for t in order:
            dh_t = dh + dy_d[t]
            if dH is not None:
                dH[t] = dh_t
            zn = torch.mul(dh_t[:, None], coef_zn[t], out=dgx[t, :, 1:])
            if grad_clip is not None:
                zn.clamp_(-grad_clip, grad_clip)
            dr = torch.mul(dgx[t, :, 2], coef_r[t], out=dgx[t, :, 0])
            if grad_clip is not None:
                dr.clamp_(-grad_clip, grad_clip)
            dgh[t, :, :2] = dgx[t, :, :2]
            torch.mul(dgx[t, :, 2], r[t], out=dgh[t, :, 2])
            dh = torch.addmm(dh_t * keep[t], dgh[t].view(batch, -1), w_hh)
        return dgx.view(steps, batch, -1), dgh.view(steps, batch, -1), dh, None, None, dH, h_prev

    # LSTM (with projection when w_hr is given: h_t = W_hr m_t, m_t = o_t tanh(c_t))
    hidden = w_hh.shape[0] // 4
    gates = gh.add_(gx).view(steps, batch, 4, hidden)  # pre-activations, then activated in place
    gates[:, :, :2].sigmoid_()
    gates[:, :, 2].tanh_()
    gates[:, :, 3].sigmoid_()
    i, f, g, o = gates.unbind(2)
    ig = i * g
    f_step = f if valid is None else torch.where(valid, f, 1.0)  # a frozen row keeps its cell state
    if valid is not None:
        ig.mul_(mask)
    c_all = torch.empty_like(ig)
    c = c0
    for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
        c = torch.addcmul(ig[t], f_step[t], c, out=c_all[t])
    # The state each step read (a frozen row's c stays c0 until its walk starts, so a shift holds).
    c_prev = torch.cat([c_all[1:], c0[None]]) if reverse else torch.cat([c0[None], c_all[:-1]])
    tc = torch.tanh(c_all)
    # Per-step factors, written in place: dc_t += dm_t * coef_c; d(i, f, g) = dc_t * coef_ifg;
    # d(o) = dm_t * coef_o (sigmoid' = s(1 - s), tanh' = 1 - t^2).
    coef_ifg = gates.new_empty((steps, batch, 3, hidden))
    torch.mul(i, 1 - i, out=coef_ifg[:, :, 0]).mul_(g)
    torch.mul(f, 1 - f, out=coef_ifg[:, :, 1]).mul_(c_prev)
    torch.mul(g, g, out=coef_ifg[:, :, 2]).neg_().add_(1).mul_(i)
    coef_o = (1 - o).mul_(o).mul_(tc)
    coef_c = (tc * tc).neg_().add_(1).mul_(o)
    if valid is not None:
        coef_ifg.mul_(mask[..., None])
        coef_o.mul_(mask)
        coef_c.mul_(mask)
    dgates = gx.new_empty((steps, batch, 4, hidden))
    # dH[t] holds the whole gradient reaching h_t: the product of step t+1 lands there directly
    # (addmm onto dy), so a step is five ops: addcmul, two products, addmm, and the f carry.
    dH = torch.empty_like(dy_d)
    torch.add(dh, dy_d[order[0]], out=dH[order[0]])
    dc = dc.clone()
    for index, t in enumerate(order):
        dh_t = dH[t]
        dm = dh_t if w_hr is None else dh_t @ w_hr
        dc.addcmul_(dm, coef_c[t])
        torch.mul(dc[:, None], coef_ifg[t], out=dgates[t, :, :3])
        torch.mul(dm, coef_o[t], out=dgates[t, :, 3])
        step = dgates[t].view(batch, -1)
        if grad_clip is not None:
            step.clamp_(-grad_clip, grad_clip)
        carry = None if passthrough is None else dh_t * passthrough[t]  # a frozen row hands dh straight back
        if index + 1 < steps:
            following = order[index + 1]
            base = dy_d[following] if carry is None else carry.add_(dy_d[following])
            torch.addmm(base, step, w_hh, out=dH[following])
        else:
            dh = step @ w_hh if carry is None else torch.addmm(carry, step, w_hh)
        dc.mul_(f_step[t])
    dw_hr = None
    if w_hr is not None:
        m = o * tc
        dw_hr = (dH * mask).flatten(0, 1).t() @ m.flatten(0, 1)
    dgates = dgates.view(steps, batch, -1)
    return dgates, dgates, dh, dc, dw_hr, dH, h_prev


def layer_backward(cell, nonlinearity, x, h0, c0, weights, lengths, y, dy, dh_n, dc_n, grad_clip, record_flow):
    """Gradients of one layer: ``dx``, ``dh0``, ``dc0`` (or None), ``dweights`` (the flat list's
    order) and, with ``record_flow``, ``||dL/dh_t||`` per direction and step ``(D, T)`` (else None)."""
    steps = x.shape[0]
    directions = h0.shape[0]
    out = h0.shape[2]
    params = direction_weights(weights, directions)
    valid = _valid_steps(lengths, steps, x.device)
    gxs = F.linear(x, torch.cat([p["w_ih"] for p in params]),
                   None if params[0]["b_ih"] is None else torch.cat([p["b_ih"] for p in params]))
    gxs = gxs.chunk(directions, dim=-1)
    dx = torch.zeros_like(x)
    dh0, dc0, dweights, flow = [], [], [], []
    for d, p in enumerate(params):
        rows = slice(d * out, (d + 1) * out)
        dgx, dgh, dh, dc, dw_hr, dH, h_prev = _backward_direction(
            cell, nonlinearity, p, x, gxs[d], h0[d], None if c0 is None else c0[d], y[..., rows], dy[..., rows],
            dh_n[d], None if dc_n is None else dc_n[d], valid, d == 1, grad_clip, record_flow,
        )
        flat_gx, flat_gh = dgx.flatten(0, 1), dgh.flatten(0, 1)
        dx += dgx @ p["w_ih"]
        b_ih = flat_gx.sum(0)
        grads = {"w_ih": flat_gx.t() @ x.flatten(0, 1), "w_hh": flat_gh.t() @ h_prev.flatten(0, 1), "b_ih": b_ih,
                 "b_hh": b_ih.clone() if dgh is dgx else flat_gh.sum(0), "w_hr": dw_hr}
        dweights += [grads[name] for name, w in p.items() if w is not None]
        dh0.append(dh)
        dc0.append(dc)
        if record_flow:
            masked = dH if valid is None else dH * valid
            flow.append(masked.double().flatten(1).norm(dim=1).float())
    return dx, torch.stack(dh0), (torch.stack(dc0) if c0 is not None else None), dweights, (torch.stack(flow) if record_flow else None)


# ------------------------------------------------------------------------- registered operators
@torch.library.custom_op("fastrnn::native_bptt_layer", mutates_args=())
def native_bptt_layer_op(
    cell: str, nonlinearity: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor],
    lengths: Tensor | None, grad_clip: float | None, flow_record: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, every direction: ``(y, h_n, c_n)`` (``c_n`` empty for RNN and GRU).
    ``flow_record`` is only handed to the backward, which fills it (eager mode)."""
    y, h_n, c_n = layer_forward(cell, nonlinearity, x, h0, c0, weights, lengths)
    return y.contiguous(), h_n.contiguous(), (no_tensor(x) if c_n is None else c_n.contiguous())


@native_bptt_layer_op.register_fake
def _(cell, nonlinearity, x, h0, c0, weights, lengths, grad_clip, flow_record):
    y = x.new_empty((x.shape[0], x.shape[1], h0.shape[0] * h0.shape[2]))
    return y, torch.empty_like(h0), (no_tensor(x) if c0 is None else torch.empty_like(c0))


@torch.library.custom_op("fastrnn::native_bptt_layer_backward", mutates_args=())
def native_bptt_layer_backward_op(
    cell: str, nonlinearity: str, x: Tensor, h0: Tensor, c0: Tensor | None, weights: list[Tensor],
    lengths: Tensor | None, y: Tensor, dy: Tensor, dh_n: Tensor, dc_n: Tensor | None, grad_clip: float | None,
    record_flow: bool,
) -> list[Tensor]:
    """``[dx, dh0, dc0 (empty without c0), *dweights, flow (D, T) (empty unless record_flow)]``."""
    dx, dh0, dc0, dweights, flow = layer_backward(
        cell, nonlinearity, x, h0, c0, weights, lengths, y, dy, dh_n, dc_n, grad_clip, record_flow
    )
    return [dx, dh0, no_tensor(x) if dc0 is None else dc0, *dweights, no_tensor(x) if flow is None else flow]


@native_bptt_layer_backward_op.register_fake
def _(cell, nonlinearity, x, h0, c0, weights, lengths, y, dy, dh_n, dc_n, grad_clip, record_flow):
    flow = x.new_empty((h0.shape[0], x.shape[0]), dtype=torch.float32) if record_flow else no_tensor(x)
    return [torch.empty_like(x), torch.empty_like(h0), no_tensor(x) if c0 is None else torch.empty_like(c0),
            *[torch.empty_like(w) for w in weights], flow]


def _setup_context(ctx, inputs, output):
    cell, nonlinearity, x, h0, c0, weights, lengths, grad_clip, flow_record = inputs
    ctx.save_for_backward(x, h0, c0, lengths, output[0], *weights)
    ctx.cell, ctx.nonlinearity, ctx.grad_clip, ctx.flow_record = cell, nonlinearity, grad_clip, flow_record


def _backward(ctx, dy, dh_n, dc_n):
    x, h0, c0, lengths, y, *weights = ctx.saved_tensors
    grads = native_bptt_layer_backward_op(
        ctx.cell, ctx.nonlinearity, x, h0, c0, weights, lengths, y, dy, dh_n, dc_n if c0 is not None else None,
        ctx.grad_clip, ctx.flow_record is not None,
    )
    dx, dh0, dc0 = grads[:3]
    if ctx.flow_record is not None:
        ctx.flow_record.copy_(grads[-1])
    return None, None, dx, dh0, (dc0 if c0 is not None else None), list(grads[3:3 + len(weights)]), None, None, None


native_bptt_layer_op.register_autograd(_backward, setup_context=_setup_context)


refuse_double_backward(native_bptt_layer_backward_op, "fastrnn's hand-written CPU backward (grad_clip, gradient-flow recording, torch.compile)")


def native_bptt_layer(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, params: list[dict], lengths: Tensor | None,
    nonlinearity: str | None, grad_clip: float | None = None, flow_record: Tensor | None = None,
):
    """One layer, every direction, through ``fastrnn::native_bptt_layer``; the signature of
    :func:`fastrnn.reference.reference_layer`. Returns ``y (T, B, D*H_out)``, ``h_n``, ``c_n`` or None."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    else:
        dtype = x.dtype
    names = ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    weights = [p[name].to(dtype) for p in params for name in names if p[name] is not None]
    with torch.autocast(x.device.type, enabled=False):
        y, h_n, c_n = native_bptt_layer_op(
            cell, nonlinearity or "tanh", x.to(dtype), h0.to(dtype), None if c0 is None else c0.to(dtype), weights,
            lengths, grad_clip, flow_record,
        )
    return y, h_n, (c_n if c0 is not None else None)

