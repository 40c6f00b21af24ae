r"""``fastrnn.LayerNormLSTM`` and ``fastrnn.LayerNormGRU``: layer-normalised recurrent layers as haste
defines them (lmnt-com/haste, ``frameworks/pytorch/layer_norm_lstm.py`` and ``layer_norm_gru.py``;
Ba et al. 2016, "Layer Normalization", arXiv:1607.06450), with torch.nn's gate order and names.

``LN(v; g, b)`` normalises each row of ``v`` over its whole width (all gates together),
``(v - mean) / sqrt(var + 1e-5)`` with the biased variance, then ``* g (+ b)``.

LayerNormLSTM (haste's LayerNormLSTM; gates ``i, f, g, o``)::

    gates_t = LN(W_ih x_t; gain_ih) + LN(W_hh h_{t-1}; gain_hh) + b_ih + b_hh
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
    h_t = sigmoid(o) * tanh(LN(c_t; gain_cell, bias_cell))

LayerNormGRU (haste's LayerNormGRU, which computes ``Wx = LN(x W; gamma[0]) + bias``,
``Rh = LN(h R; gamma[1]) + recurrent_bias``, ``z = sigmoid(Wx_z + Rh_z)``, ``r = sigmoid(Wx_r +
Rh_r)``, ``g = tanh(Wx_g + r * Rh_g)``, ``h = z * h + (1 - z) * g``; here in torch.nn's order
``r, z, n``)::

    a_t = LN(W_ih x_t; gain_ih) + b_ih          b_t = LN(W_hh h_{t-1}; gain_hh) + b_hh
    r = sigmoid(a_r + b_r)    z = sigmoid(a_z + b_z)    n = tanh(a_n + r * b_n)
    h_t = (1 - z) * n + z * h_{t-1}

The input-side norm ``LN(W_ih x_t)`` is one pass over all steps before the time loop; the
recurrent-side and cell norms are in it. Options: ``zoneout`` (on ``h``, and with the same mask
on ``c``), ``recurrent_dropout`` (DropConnect on ``W_hh``), ``grad_clip`` (the gradient of each
step's gate pre-activations clamped), ``forget_bias`` (LSTM: the forget gate's ``b_ih`` starts
at that value and its ``b_hh`` at zero); see :mod:`fastrnn.regularization`.

Paths: the ``reference`` backend runs the plain autograd loop (:func:`lstm_reference_direction`,
:func:`gru_reference_direction`; differentiable twice). Every other backend runs
:class:`LayerNormLSTMFunction` / :class:`LayerNormGRUFunction`: the same equations with a
hand-written backward through time (no autograd graph per step; the ``W_hh`` gradient is one GEMM
over all steps). With ``FASTRNN_BACKEND=triton`` (and ``auto`` on CUDA) fp32/fp16/bf16 layers run
the fused Triton kernels of :mod:`fastrnn.ops.layer_norm_rnn` (``W_hh`` on chip where one program
holds it, re-read per step in tiles beyond; zoneout, DropConnect, lengths, ``grad_clip`` and the
gradient-flow record included); other dtypes run :class:`LayerNormLSTMFunction` /
:class:`LayerNormGRUFunction`, and :func:`fastrnn.explain` says which ran and why.

Parameters per layer ``k`` (and ``_reverse``): torch.nn's ``weight_ih_l{k}``, ``weight_hh_l{k}``,
``bias_ih_l{k}``, ``bias_hh_l{k}`` (uniform in ``+-1/sqrt(H)``), and ``gain_ih_l{k}``,
``gain_hh_l{k}`` ``(G*H,)`` (ones); the LSTM also ``gain_cell_l{k}`` (ones) and ``bias_cell_l{k}``
(zeros), ``(H,)``.
"""

from __future__ import annotations

import importlib
import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastrnn import backend
from fastrnn.layers import init_forget_bias
from fastrnn.reference import clip_grad
from fastrnn.stacked import StackedRecurrence, time_loop

EPS = 1e-5


def input_side(x: Tensor, p: dict, fold_hidden_bias: bool) -> Tensor:
    """``LN(W_ih x_t; gain_ih) + b_ih (+ b_hh)`` for every step at once: ``(T, B, G*H)``."""
    a = F.layer_norm(F.linear(x, p["weight_ih"]), (p["weight_ih"].shape[0],), p["gain_ih"], None, EPS)
    if p.get("bias_ih") is not None:
        a = a + (p["bias_ih"] + p["bias_hh"] if fold_hidden_bias else p["bias_ih"])
    return a


# ----------------------------------------------------------------------------- reference loops
def lstm_reference_direction(ax, h0, c0, p, lengths, reverse, mask, zoneout_p, grad_clip, flow_record):
    """One direction of a LayerNormLSTM layer by autograd: ``ax (T, B, 4H)`` from :func:`input_side`."""
    w_hh, gain_hh, gain_c, bias_c = p["weight_hh"], p["gain_hh"], p["gain_cell"], p["bias_cell"]
    hidden = h0.shape[-1]
    ax = ax.unbind(0)  # one view per step, one backward node for all (indexing ax[t] would cost O(T) each)

    def step(t, state):
        h, c = state
        gates = clip_grad(ax[t] + F.layer_norm(F.linear(h, w_hh), (4 * hidden,), gain_hh, None, EPS), grad_clip)
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(F.layer_norm(c, (hidden,), gain_c, bias_c, EPS)), c

    y, (h, c) = time_loop(step, len(ax), (h0, c0), lengths, reverse, mask, zoneout_p, flow_record)
    return y, h, c


def gru_reference_direction(ax, h0, p, lengths, reverse, mask, zoneout_p, grad_clip, flow_record):
    """One direction of a LayerNormGRU layer by autograd: ``ax (T, B, 3H)`` with ``b_ih`` only."""
    w_hh, gain_hh, b_hh = p["weight_hh"], p["gain_hh"], p.get("bias_hh")
    hidden = h0.shape[-1]
    ax = ax.unbind(0)  # one view per step, one backward node for all

    def step(t, state):
        (h,) = state
        b = F.layer_norm(F.linear(h, w_hh), (3 * hidden,), gain_hh, b_hh, EPS)
        a_r, a_z, a_n = ax[t].chunk(3, dim=-1)
        b_r, b_z, b_n = b.chunk(3, dim=-1)
        r = torch.sigmoid(clip_grad(a_r + b_r, grad_clip))
        z = torch.sigmoid(clip_grad(a_z + b_z, grad_clip))
        n = torch.tanh(clip_grad(a_n + r * b_n, grad_clip))
        return ((1 - z) * n + z * h,)

    y, (h,) = time_loop(step, len(ax), (h0,), lengths, reverse, mask, zoneout_p, flow_record)
    return y, h, None


# ------------------------------------------------------------------- hand-written backward path
def _norm(v: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``LN(v; weight, bias)`` over the last axis, with the row means and ``rstd`` ``(.., 1)`` the
    backward takes (``torch.native_layer_norm``: one fused pass)."""
    return torch.native_layer_norm(v, (v.shape[-1],), weight, bias, EPS)


def _norm_grad(d_out: Tensor, v: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None = None) -> Tensor:
    """Gradient reaching ``v`` through ``LN(v; weight)`` given ``dL/dLN`` (the fused backward)."""
    return torch.ops.aten.native_layer_norm_backward(d_out, v, (v.shape[-1],), mean, rstd, weight, None, [True, False, False])[0]


def _clamp(g: Tensor, grad_clip: float | None) -> Tensor:
    return g if grad_clip is None else g.clamp(-grad_clip, grad_clip)


def _walk(steps: int, reverse: bool):
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _valid(lengths: Tensor | None, steps: int, like: Tensor) -> Tensor | None:
    """``(T, B, 1)`` bool, or None without lengths."""
    if lengths is None:
        return None
    return torch.arange(steps, device=like.device)[:, None, None] < lengths.to(like.device)[None, :, None]


def _keep(mask: Tensor | None, zoneout_p: float, t: int):
    """The zoneout weight of the previous state at step ``t`` (a mask row, ``p``, or 0)."""
    return mask[t] if mask is not None else zoneout_p


class LayerNormLSTMFunction(torch.autograd.Function):
    """One direction of a LayerNormLSTM layer: ``(ax (T,B,4H), w_hh, gain_hh, gain_cell, bias_cell,
    h0, c0) -> (y (T,B,H), h_n, c_n)`` with a hand-written backward through time."""

    @staticmethod
    def forward(ctx, ax, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, reverse, mask, zoneout_p, grad_clip, flow_record):
        steps, hidden = ax.shape[0], h0.shape[-1]
        valid = _valid(lengths, steps, ax)
        h, c = h0, c0
        y = ax.new_empty(ax.shape[0], ax.shape[1], hidden)  # every step writes its output
        saved = {k: ax.new_empty((steps, ax.shape[1], n)) for k, n in
                 (("h_prev", hidden), ("c_prev", hidden), ("r", 4 * hidden), ("r_mean", 1), ("r_rstd", 1),
                  ("gates", 4 * hidden), ("c", hidden), ("c_mean", 1), ("c_rstd", 1), ("tanh_c", hidden))}
        for t in _walk(steps, reverse):
            r = torch.mm(h, w_hh.T, out=saved["r"][t])
            r_norm, saved["r_mean"][t], saved["r_rstd"][t] = _norm(r, gain_hh)
            gates = saved["gates"][t]
            torch.add(ax[t], r_norm, out=gates)
            torch.sigmoid(gates[:, :2 * hidden], out=gates[:, :2 * hidden])
            torch.tanh(gates[:, 2 * hidden:3 * hidden], out=gates[:, 2 * hidden:3 * hidden])
            torch.sigmoid(gates[:, 3 * hidden:], out=gates[:, 3 * hidden:])
            i, f, g, o = gates.chunk(4, dim=-1)
            saved["h_prev"][t], saved["c_prev"][t] = h, c
            c_new = torch.addcmul(f * c, i, g, out=saved["c"][t])
            c_norm, saved["c_mean"][t], saved["c_rstd"][t] = _norm(c_new, gain_c, bias_c)
            tanh_c = torch.tanh(c_norm, out=saved["tanh_c"][t])
            h_new = o * tanh_c
            keep = _keep(mask, zoneout_p, t)
            if zoneout_p:
                h_new, c_new = keep * h + (1 - keep) * h_new, keep * c + (1 - keep) * c_new
            if valid is None:
                h, c, y[t] = h_new, c_new, h_new
            else:
                h, c = torch.where(valid[t], h_new, h), torch.where(valid[t], c_new, c)
                y[t] = torch.where(valid[t], h_new, 0.0)
        ctx.save_for_backward(w_hh, gain_hh, gain_c, lengths, mask, *saved.values())
        ctx.options = (reverse, zoneout_p, grad_clip, flow_record)
        return y, h, c.clone()  # c may be a view of the saved cell states: hand out a tensor of its own

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        w_hh, gain_hh, gain_c, lengths, mask, h_prev, c_prev, r, r_mean, r_rstd, gates, c, c_mean, c_rstd, tanh_c = ctx.saved_tensors
        reverse, zoneout_p, grad_clip, flow_record = ctx.options
        steps = dy.shape[0]
        valid = _valid(lengths, steps, dy)
        dh, dc = dh_n.clone(), dc_n.clone()
        hidden = dh.shape[-1]
        d_pre = torch.empty_like(gates)  # per step: the gate pre-activation gradient
        d_r_all = torch.empty_like(gates)  # per step: the gradient of W_hh h_{t-1}
        d_gain_hh = torch.zeros_like(gain_hh)
        d_gain_c = torch.zeros_like(gain_c)
        d_bias_c = torch.zeros_like(gain_c)
        slots = [slice(k * hidden, (k + 1) * hidden) for k in range(4)]
        for t in _walk(steps, not reverse):
            v = None if valid is None else valid[t]
            d_state_h = dy[t] + dh if v is None else torch.where(v, dy[t] + dh, 0.0)
            d_state_c = dc if v is None else torch.where(v, dc, 0.0)
            if flow_record is not None:
                flow_record[t] = d_state_h.double().norm().to(flow_record.dtype)
            keep = _keep(mask, zoneout_p, t)
            d_h_new, d_c_zoned = (d_state_h * (1 - keep), d_state_c * (1 - keep)) if zoneout_p else (d_state_h, d_state_c)
            i, f, g, o = gates[t].chunk(4, dim=-1)
            tanh_ct = tanh_c[t]
            d_cn = d_h_new * o * (1 - tanh_ct * tanh_ct)
            d_c, dg_c, db_c = torch.ops.aten.native_layer_norm_backward(  # the bias argument only marks that
                d_cn, c[t], (hidden,), c_mean[t], c_rstd[t], gain_c, gain_c, [True, True, True])  # one exists
            d_gain_c += dg_c
            d_bias_c += db_c
            d_c_new = d_c_zoned + d_c
            d_gates = d_pre[t]  # the gate gradients, written in place: (i, f, g, o)
            torch.mul(d_c_new * g, i * (1 - i), out=d_gates[:, slots[0]])
            torch.mul(d_c_new * c_prev[t], f * (1 - f), out=d_gates[:, slots[1]])
            torch.mul(d_c_new * i, 1 - g * g, out=d_gates[:, slots[2]])
            torch.mul(d_h_new * tanh_ct, o * (1 - o), out=d_gates[:, slots[3]])
            if grad_clip is not None:
                d_gates.clamp_(-grad_clip, grad_clip)
            d_r, dg_hh, _ = torch.ops.aten.native_layer_norm_backward(
                d_gates, r[t], (4 * hidden,), r_mean[t], r_rstd[t], gain_hh, None, [True, True, False])
            d_gain_hh += dg_hh
            d_r_all[t] = d_r
            dh_prev = d_r @ w_hh
            dc_prev = d_c_new * f
            if zoneout_p:
                dh_prev, dc_prev = dh_prev + d_state_h * keep, dc_prev + d_state_c * keep
            if v is None:
                dh, dc = dh_prev, dc_prev
            else:
                dh, dc = torch.where(v, dh_prev, dh), torch.where(v, dc_prev, dc)
        d_w_hh = _weight_grad(d_r_all, h_prev)
        return (d_pre, d_w_hh, d_gain_hh, d_gain_c, d_bias_c, dh, dc, None, None, None, None, None, None)


def _weight_grad(d_r: Tensor, h_prev: Tensor) -> Tensor:
    """``dW_hh = sum_{t,b} d_r^T h_prev``: one GEMM over all T*B rows."""
    return d_r.reshape(-1, d_r.shape[-1]).T @ h_prev.reshape(-1, h_prev.shape[-1])


class LayerNormGRUFunction(torch.autograd.Function):
    """One direction of a LayerNormGRU layer: ``(ax (T,B,3H), w_hh, gain_hh, b_hh, h0) -> (y (T,B,H), h_n)``
    with a hand-written backward through time."""

    @staticmethod
    def forward(ctx, ax, w_hh, gain_hh, b_hh, h0, lengths, reverse, mask, zoneout_p, grad_clip, flow_record):
        steps, batch, hidden = ax.shape[0], ax.shape[1], h0.shape[-1]
        valid = _valid(lengths, steps, ax)
        h = h0
        y = ax.new_empty(steps, batch, hidden)  # every step writes its output
        saved = {k: ax.new_empty((steps, batch, n)) for k, n in
                 (("h_prev", hidden), ("rec", 3 * hidden), ("r_mean", 1), ("r_rstd", 1), ("gates", 3 * hidden), ("b_n", hidden))}
        for t in _walk(steps, reverse):
            rec = torch.mm(h, w_hh.T, out=saved["rec"][t])
            b, saved["r_mean"][t], saved["r_rstd"][t] = _norm(rec, gain_hh, b_hh)
            b_r, b_z, b_n = b.chunk(3, dim=-1)
            a_r, a_z, a_n = ax[t].chunk(3, dim=-1)
            r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
            n = torch.tanh(a_n + r * b_n)
            h_new = (1 - z) * n + z * h
            if zoneout_p:
                keep = _keep(mask, zoneout_p, t)
                h_new = keep * h + (1 - keep) * h_new
            saved["h_prev"][t], saved["b_n"][t] = h, b_n
            saved["gates"][t] = torch.cat([r, z, n], dim=-1)
            if valid is None:
                h, y[t] = h_new, h_new
            else:
                h = torch.where(valid[t], h_new, h)
                y[t] = torch.where(valid[t], h_new, 0.0)
        ctx.save_for_backward(w_hh, gain_hh, lengths, mask, *saved.values())
        ctx.options = (reverse, zoneout_p, grad_clip, flow_record)
        return y, h

    @staticmethod
    def backward(ctx, dy, dh_n):
        w_hh, gain_hh, lengths, mask, h_prev, rec, r_mean, r_rstd, gates, b_n = ctx.saved_tensors
        reverse, zoneout_p, grad_clip, flow_record = ctx.options
        steps = dy.shape[0]
        valid = _valid(lengths, steps, dy)
        dh = dh_n.clone()
        hidden = dh.shape[-1]
        d_ax = torch.empty_like(gates)  # per step: the gradient of the input side a_t, (r, z, n)
        d_r_all = torch.empty_like(gates)  # per step: the gradient of W_hh h_{t-1}
        d_gain_hh = torch.zeros_like(gain_hh)
        d_b_hh = torch.zeros_like(gain_hh)
        r_slot, z_slot, n_slot = (slice(k * hidden, (k + 1) * hidden) for k in range(3))
        d_b = torch.empty_like(gates[0])  # the gradient reaching b_t = LN(W_hh h; gain_hh) + b_hh
        for t in _walk(steps, not reverse):
            v = None if valid is None else valid[t]
            d_state = dy[t] + dh if v is None else torch.where(v, dy[t] + dh, 0.0)
            if flow_record is not None:
                flow_record[t] = d_state.double().norm().to(flow_record.dtype)
            keep = _keep(mask, zoneout_p, t)
            d_h_new = d_state * (1 - keep) if zoneout_p else d_state
            r, z, n = gates[t].chunk(3, dim=-1)
            d_a = d_ax[t]
            d_n_pre, d_z_pre, d_r_pre = d_a[:, n_slot], d_a[:, z_slot], d_a[:, r_slot]
            torch.mul(d_h_new * (1 - z), 1 - n * n, out=d_n_pre)
            torch.mul(d_h_new * (h_prev[t] - n), z * (1 - z), out=d_z_pre)
            if grad_clip is not None:
                d_n_pre.clamp_(-grad_clip, grad_clip)
                d_z_pre.clamp_(-grad_clip, grad_clip)
            torch.mul(d_n_pre * b_n[t], r * (1 - r), out=d_r_pre)
            if grad_clip is not None:
                d_r_pre.clamp_(-grad_clip, grad_clip)
            d_b[:, r_slot], d_b[:, z_slot] = d_r_pre, d_z_pre
            torch.mul(d_n_pre, r, out=d_b[:, n_slot])
            d_r, dg, db = torch.ops.aten.native_layer_norm_backward(  # the bias argument only marks that
                d_b, rec[t], (3 * hidden,), r_mean[t], r_rstd[t], gain_hh, gain_hh, [True, True, True])  # one exists
            d_gain_hh += dg
            d_b_hh += db
            d_r_all[t] = d_r
            dh_prev = torch.addmm(d_h_new * z, d_r, w_hh)
            if zoneout_p:
                dh_prev = dh_prev + d_state * keep
            dh = dh_prev if v is None else torch.where(v, dh_prev, dh)
        return (d_ax, _weight_grad(d_r_all, h_prev), d_gain_hh, d_b_hh, dh, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------ layers
def layer_norm_lstm_layer(x, h0, c0, params, lengths, zoneout_mask, zoneout_p, grad_clip, flow_record, fast: bool):
    """One LayerNormLSTM layer, every direction: ``x (T, B, I)``, ``h0``/``c0`` ``(D, B, H)``,
    ``zoneout_mask (T, B, D*H)`` or None. Returns ``y (T, B, D*H)``, ``h_n``, ``c_n`` ``(D, B, H)``."""
    hidden = h0.shape[-1]
    ys, hs, cs = [], [], []
    for d, p in enumerate(params):
        ax = input_side(x, p, fold_hidden_bias=True)
        mask = None if zoneout_mask is None else zoneout_mask[..., d * hidden:(d + 1) * hidden]
        record = None if flow_record is None else flow_record[d]
        if fast:
            y, h, c = LayerNormLSTMFunction.apply(ax, p["weight_hh"], p["gain_hh"], p["gain_cell"], p["bias_cell"], h0[d], c0[d],
                                                  lengths, d == 1, mask, zoneout_p, grad_clip, record)
        else:
            y, h, c = lstm_reference_direction(ax, h0[d], c0[d], p, lengths, d == 1, mask, zoneout_p, grad_clip, record)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    return torch.cat(ys, dim=-1), torch.stack(hs), torch.stack(cs)


def layer_norm_gru_layer(x, h0, params, lengths, zoneout_mask, zoneout_p, grad_clip, flow_record, fast: bool):
    """One LayerNormGRU layer, every direction: as :func:`layer_norm_lstm_layer` without ``c``."""
    hidden = h0.shape[-1]
    ys, hs = [], []
    for d, p in enumerate(params):
        ax = input_side(x, p, fold_hidden_bias=False)
        mask = None if zoneout_mask is None else zoneout_mask[..., d * hidden:(d + 1) * hidden]
        record = None if flow_record is None else flow_record[d]
        if fast:
            b_hh = p.get("bias_hh")
            if b_hh is None:
                b_hh = ax.new_zeros(3 * hidden)
            y, h = LayerNormGRUFunction.apply(ax, p["weight_hh"], p["gain_hh"], b_hh, h0[d], lengths, d == 1, mask, zoneout_p,
                                              grad_clip, record)
        else:
            y, h, _ = gru_reference_direction(ax, h0[d], p, lengths, d == 1, mask, zoneout_p, grad_clip, record)
        ys.append(y)
        hs.append(h)
    return torch.cat(ys, dim=-1), torch.stack(hs)


# ----------------------------------------------------------------------------------- modules
class _LayerNormRecurrence(StackedRecurrence):
    GATES = 1

    def _parameter_shapes(self, layer_input_size: int) -> dict[str, tuple[int, ...]]:
        width = self.GATES * self.hidden_size
        shapes = {"weight_ih": (width, layer_input_size), "weight_hh": (width, self.hidden_size)}
        if self.bias:
            shapes |= {"bias_ih": (width,), "bias_hh": (width,)}
        shapes |= {"gain_ih": (width,), "gain_hh": (width,)}
        if self.HAS_CELL:
            shapes |= {"gain_cell": (self.hidden_size,), "bias_cell": (self.hidden_size,)}
        return shapes

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name, weight in self.named_parameters():
            if name.startswith("gain_"):
                nn.init.ones_(weight)
            elif name.startswith("bias_cell"):
                nn.init.zeros_(weight)
            else:
                nn.init.uniform_(weight, -stdv, stdv)

    def _fast(self) -> bool:
        return backend.get_backend() != "reference"

    def _kernel_layer(self, x: Tensor):
        """The fused kernels' layer function (:mod:`fastrnn.ops.layer_norm_rnn`) where they run a
        call with input ``x``, else None; the reason they don't in ``self._no_kernel``."""
        from fastrnn.indrnn import scan_path  # the kernels-or-loop choice every fastrnn layer makes

        self._no_kernel = None
        if scan_path(x.device) != "triton" or x.numel() == 0:
            return None
        ops = importlib.import_module("fastrnn.ops.layer_norm_rnn")  # imports triton: only when asked for
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        self._no_kernel = ops.why_not(self.GATES, self.hidden_size, dtype)
        if self._no_kernel is not None:
            return None
        self._kernel_strategy = ops.strategy(self.GATES, self.hidden_size, dtype)
        return ops.layer_norm_lstm_kernel_layer if self.HAS_CELL else ops.layer_norm_gru_kernel_layer

    def own_route(self, input):
        """For :func:`fastrnn.explain`: the fused kernels, or which PyTorch loop runs and why."""
        from torch.nn.utils.rnn import PackedSequence

        from fastrnn.routing import Route

        data = input.data if isinstance(input, PackedSequence) else input
        if self._kernel_layer(data) is not None:
            where = "W_hh on chip" if self._kernel_strategy == "resident" else "W_hh re-read per step in tiles"
            return Route("triton", f"{self.NAME}: the fused Triton kernels ({where}, the recurrent and cell norms in "
                                   "the step), one launch per layer each way")
        if self._no_kernel is not None:
            return Route("reference", f"{self.NAME}: the PyTorch loop with a hand-written backward through time "
                                      f"({self._no_kernel})")
        if self._fast():
            return Route("reference", f"{self.NAME}: the PyTorch loop with a hand-written backward through time "
                                      "(no Triton kernel for this cell yet)")
        return Route("reference", f"{self.NAME}: the autograd reference loop (FASTRNN_BACKEND=reference)")


class LayerNormLSTM(_LayerNormRecurrence):
    """Layer-normalised LSTM (haste's definition, torch.nn's gate order; equations in the module
    docstring). Arguments as ``torch.nn.LSTM`` without ``proj_size``; keyword-only ``forget_bias``
    (None: torch.nn's initialisation; a number: the forget gate's ``b_ih`` starts there and its
    ``b_hh`` at zero), ``zoneout``, ``recurrent_dropout``, ``grad_clip``. Forward forms, ``(h0,
    c0)`` and outputs as ``torch.nn.LSTM``."""

    NAME = "LayerNormLSTM"
    HAS_CELL = True
    GATES = 4

    def __init__(self, input_size: int, hidden_size: int, *args, forget_bias: float | None = None, **kwargs):
        if forget_bias is not None and (isinstance(forget_bias, bool) or not isinstance(forget_bias, numbers.Real)):
            raise ValueError(f"forget_bias should be a number or None, got {forget_bias!r}")
        self.forget_bias = None if forget_bias is None else float(forget_bias)
        super().__init__(input_size, hidden_size, *args, **kwargs)
        if self.forget_bias is not None and not self.bias:
            raise ValueError("forget_bias needs bias=True")

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.forget_bias is not None and self.bias:
            init_forget_bias(self, self.forget_bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.forget_bias is None else f", forget_bias={self.forget_bias}")

    def _run_layer(self, x, h0, c0, params, lengths, zoneout_mask, flow_record):
        kernel_layer = self._kernel_layer(x)
        if kernel_layer is not None:
            return kernel_layer(x, h0, c0, params, lengths, zoneout_mask, self.zoneout, self.grad_clip, flow_record)
        return layer_norm_lstm_layer(x, h0, c0, params, lengths, zoneout_mask, self.zoneout, self.grad_clip, flow_record, self._fast())


class LayerNormGRU(_LayerNormRecurrence):
    """Layer-normalised GRU (haste's definition, torch.nn's gate order ``r, z, n``; equations in
    the module docstring). Arguments as ``torch.nn.GRU``; keyword-only ``zoneout``,
    ``recurrent_dropout``, ``grad_clip``. Forward forms, ``h0`` and outputs as ``torch.nn.GRU``."""

    NAME = "LayerNormGRU"
    GATES = 3

    def _run_layer(self, x, h0, c0, params, lengths, zoneout_mask, flow_record):
        kernel_layer = self._kernel_layer(x)
        if kernel_layer is not None:
            return (*kernel_layer(x, h0, params, lengths, zoneout_mask, self.zoneout, self.grad_clip, flow_record), None)
        y, h_n = layer_norm_gru_layer(x, h0, params, lengths, zoneout_mask, self.zoneout, self.grad_clip, flow_record, self._fast())
        return y, h_n, None

