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
    bias = p.get("bias_ih")
    if bias is not None and fold_hidden_bias:
        bias = bias + p["bias_hh"]
    return F.layer_norm(F.linear(x, p["weight_ih"]), (p["weight_ih"].shape[0],), p["gain_ih"], bias, EPS)  # LN's shift: one pass


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
#: Elements of one ``(steps, B, G*H)`` buffer of a time chunk (2 MiB in float32). The hand-written
#: path walks time in chunks of this size: the input-side GEMM and norm run per chunk (read by
#: the chunk's steps soon after), the weight gradients are summed chunk by chunk, and no buffer of
#: the whole sequence is allocated. Measured here (glibc, 2026-12-01): a 16 MiB tensor allocated
#: on every call page-faults each time (4096 faults; whole-sequence buffers cost 13k faults per
#: training step at B16 T256 H256), while 2 MiB blocks are reused from the heap without a fault.
CHUNK_ELEMENTS = 1 << 19


def _chunks(steps: int, batch: int, width: int, reverse: bool) -> list[tuple[int, int]]:
    """``[lo, hi)`` time chunks covering ``range(steps)`` in walk order."""
    size = max(1, CHUNK_ELEMENTS // max(1, batch * width))
    chunks = [(lo, min(lo + size, steps)) for lo in range(0, steps, size)]
    return chunks[::-1] if reverse else chunks


def _walk(steps: int, reverse: bool):
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _slots(step: int, reverse: bool) -> tuple[int, int]:
    """Where step ``step`` of a chunk reads its state and writes the new one in the chunk's
    ``(steps+1, B, H)`` state buffer: walking forward slot ``k`` holds the state entering step
    ``k``; walking back slot ``k+1`` does. Either way the slots before the steps are contiguous."""
    return (step + 1, step) if reverse else (step, step + 1)


def _valid(lengths: Tensor | None, steps: int, like: Tensor) -> Tensor | None:
    """``(T, B, 1)`` bool, or None without lengths."""
    if lengths is None:
        return None
    return torch.arange(steps, device=like.device)[:, None, None] < lengths.to(like.device)[None, :, None]


def _keep(mask: Tensor | None, zoneout_p: float, t: int):
    """The zoneout weight of the previous state at step ``t`` (a mask row, ``p``, or 0)."""
    return mask[t] if mask is not None else zoneout_p


def _tanh_by_sigmoid_(v: Tensor) -> Tensor:
    """``2 v - 1`` in place: with ``v = sigmoid(2x)`` this is ``tanh(x)``. ATen's CPU ``tanh``
    costs about seven ``sigmoid``\\ s per element (measured here); the doubling is exact, so the
    two differ only in rounding."""
    return v.mul_(2).sub_(1)


def _total(per_step: list[Tensor]) -> Tensor:
    """The sum of per-step (or per-chunk) gradients of one parameter."""
    return torch.stack(per_step).sum(0)


class _Chunk:
    """What the forward of one time chunk ``[lo, hi)`` keeps for the backward: the input-side
    product ``z (n*B, G*H)`` and its norm's statistics, the states ``hs``/``cs`` ``(n+1, B, H)``
    (see :func:`_slots`), the step outputs ``y (n, B, H)`` and the cell's per-step tensors."""

    def __init__(self, lo: int, hi: int, z: Tensor, x_stats: tuple[Tensor, Tensor], hs: Tensor):
        self.lo, self.hi, self.z, self.x_stats, self.hs = lo, hi, z, x_stats, hs


def _input_chunk(x: Tensor, lo: int, hi: int, w_ih: Tensor, gain_ih: Tensor, bias: Tensor | None):
    """``LN(W_ih x_t; gain_ih, bias)`` of the steps ``[lo, hi)``: ``(a (n, B, G*H), z, mean, rstd)``."""
    z = torch.mm(x[lo:hi].reshape((hi - lo) * x.shape[1], x.shape[2]), w_ih.T)
    a, mean, rstd = torch.native_layer_norm(z, (z.shape[1],), gain_ih, bias, EPS)
    return a.view(hi - lo, x.shape[1], -1), z, mean, rstd


def _input_chunk_backward(d_a: Tensor, chunk: _Chunk, x: Tensor, w_ih: Tensor, gain_ih: Tensor, bias: Tensor | None,
                          grads: dict) -> None:
    """Back through :func:`_input_chunk`: adds into ``grads`` (``w_ih``, lists ``gain_ih``/``bias``,
    ``x`` when it is wanted)."""
    width = chunk.z.shape[1]
    d_z, d_gain, d_bias = torch.ops.aten.native_layer_norm_backward(
        d_a.view(-1, width), chunk.z, (width,), *chunk.x_stats, gain_ih, bias, [True, True, bias is not None])
    grads["gain_ih"].append(d_gain)
    if bias is not None:
        grads["bias"].append(d_bias)
    grads["w_ih"].addmm_(d_z.T, x[chunk.lo:chunk.hi].reshape(d_z.shape[0], x.shape[2]))
    if grads["x"] is not None:
        torch.mm(d_z, w_ih, out=grads["x"][chunk.lo:chunk.hi].view(d_z.shape[0], x.shape[2]))


def _input_grads(x: Tensor, w_ih: Tensor, wants_x: bool) -> dict:
    return {"x": x.new_empty(x.shape) if wants_x else None, "w_ih": torch.zeros_like(w_ih), "gain_ih": [], "bias": []}


def _outputs(chunks: list[_Chunk], reverse: bool) -> Tensor:
    """The step outputs of every chunk, in time order: ``(T, B, H)``."""
    return torch.cat([chunk.y for chunk in (chunks[::-1] if reverse else chunks)])


def _lstm_chunk_slopes(ch: _Chunk, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """What the LSTM backward of a chunk needs per step that does not depend on the incoming
    gradient, computed for the whole chunk at once: ``d gates / d c_t`` for ``i, f, g`` and
    ``d gates / d h_t`` for ``o`` (``(n, B, 4H)``: ``i' g``, ``f' c_{t-1}``, ``g' i``, ``o' tanh(LN c_t)``
    with ``s' = s (1 - s)`` and ``g' = 1 - g^2 = 4 s_g (1 - s_g)``), ``d LN(c_t) / d h_t = o (1 -
    tanh^2)`` ``(n, B, H)``, and ``f`` (a view)."""
    s_i, s_f, s_g, s_o = ch.gates.split(ch.sig_c.shape[-1], dim=2)
    slope = torch.addcmul(ch.gates, ch.gates, ch.gates, value=-1)  # s (1 - s), one pass
    tanh_c = ch.sig_c * 2 - 1
    d_c_norm_dh = torch.addcmul(s_o, s_o * tanh_c, tanh_c, value=-1)
    i_slope, f_slope, g_slope, o_slope = slope.split(ch.sig_c.shape[-1], dim=2)
    i_slope.mul_(s_g * 2 - 1)
    f_slope.mul_(ch.cs[1:] if reverse else ch.cs[:-1])
    g_slope.mul_(s_i).mul_(4)
    o_slope.mul_(tanh_c)
    return slope, d_c_norm_dh, s_f


class LayerNormLSTMFunction(torch.autograd.Function):
    """One direction of a LayerNormLSTM layer, input side included: ``(x (T,B,I), w_ih, gain_ih,
    bias (4H,) = b_ih + b_hh or None, w_hh, gain_hh, gain_cell, bias_cell, h0, c0) -> (y (T,B,H),
    h_n, c_n)`` with a hand-written backward through time.

    Time runs in chunks (:data:`CHUNK_ELEMENTS`). Per step the forward is one GEMM and eleven
    elementwise ops: the ``g`` gate's ``tanh`` and the cell's are ``2 sigmoid(2x) - 1`` (the
    factor 2 folded into the gains, so one ``sigmoid`` covers the four gates; the sigmoids are
    kept), the states are written straight into the chunk's state buffers, and the norms'
    statistics are kept for the backward. The backward is one GEMM (which also adds the next step's
    ``dy``, where there are neither lengths nor zoneout) and eight ops per step, after
    :func:`_lstm_chunk_slopes` per chunk; the weight, gain and bias gradients are summed per chunk
    (one GEMM each) and over the chunks."""

    @staticmethod
    def forward(ctx, x, w_ih, gain_ih, bias, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, reverse, mask, zoneout_p,
                grad_clip, flow_record):
        steps, batch, hidden = x.shape[0], x.shape[1], h0.shape[-1]
        valid = _valid(lengths, steps, x)
        plain = valid is None and not zoneout_p  # every new state is the step's output: written in place
        scale = torch.ones_like(gain_hh)
        scale[2 * hidden:3 * hidden] = 2  # the g gate's pre-activation doubled: sigmoid(2x) gives tanh(x)
        gain_ih_2, bias_2 = gain_ih * scale, None if bias is None else bias * scale  # on both sides of the sum
        gain_hh_2, gain_c_2, bias_c_2 = gain_hh * scale, 2 * gain_c, 2 * bias_c
        h, c, chunks = h0, c0, []
        for lo, hi in _chunks(steps, batch, 4 * hidden, reverse):
            n = hi - lo
            ax, z, x_mean, x_rstd = _input_chunk(x, lo, hi, w_ih, gain_ih_2, bias_2)
            ch = _Chunk(lo, hi, z, (x_mean, x_rstd), x.new_empty(n + 1, batch, hidden))
            hs, cs = ch.hs, x.new_empty(n + 1, batch, hidden)
            r = x.new_empty(n, batch, 4 * hidden)  # W_hh h_{t-1}
            gates = x.new_empty(n, batch, 4 * hidden)  # sigmoid of i, f, 2 g, o: g's tanh is 2 sigmoid(2x) - 1
            sig_c = x.new_empty(n, batch, hidden)  # sigmoid(2 LN(c_t)): tanh(LN(c_t)) = 2 sig_c - 1
            cell = (cs[:-1] if reverse else cs[1:]) if plain else x.new_empty(n, batch, hidden)  # c_t before zoneout
            y = (hs[:-1] if reverse else hs[1:]) if valid is None else x.new_empty(n, batch, hidden)
            stats_r, stats_c = [None] * n, [None] * n
            hs[n if reverse else 0], cs[n if reverse else 0] = h, c
            # one view per step of every buffer, made at once (indexing a tensor per step costs a call each)
            hs_t, cs_t, r_t, gates_t, sig_c_t, cell_t, ax_t = (v.unbind(0) for v in (hs, cs, r, gates, sig_c, cell, ax))
            i_t, f_t, s_g_t, o_t = (v.unbind(0) for v in gates.split(hidden, dim=2))
            for k in _walk(n, reverse):
                prev, nxt = _slots(k, reverse)
                h, c = hs_t[prev], cs_t[prev]
                torch.mm(h, w_hh.T, out=r_t[k])
                r_norm, r_mean, r_rstd = torch.native_layer_norm(r_t[k], (4 * hidden,), gain_hh_2, None, EPS)
                stats_r[k] = r_mean, r_rstd
                torch.add(r_norm, ax_t[k], out=gates_t[k]).sigmoid_()
                i, o = i_t[k], o_t[k]
                c_new = torch.mul(f_t[k], c, out=cell_t[k]).addcmul_(i, s_g_t[k], value=2).sub_(i)  # f c + i (2 s_g - 1)
                c_norm, c_mean, c_rstd = torch.native_layer_norm(c_new, (hidden,), gain_c_2, bias_c_2, EPS)
                stats_c[k] = c_mean, c_rstd
                s_c = torch.sigmoid(c_norm, out=sig_c_t[k])
                h_new = torch.mul(o, s_c, out=hs_t[nxt] if plain else None).mul_(2).sub_(o)  # o (2 s_c - 1)
                if plain:
                    continue
                if zoneout_p:
                    keep = _keep(mask, zoneout_p, lo + k)
                    h_new, c_new = keep * h + (1 - keep) * h_new, keep * c + (1 - keep) * c_new
                if valid is None:
                    hs[nxt], cs[nxt] = h_new, c_new
                else:
                    v = valid[lo + k]
                    torch.where(v, h_new, h, out=hs[nxt])
                    torch.where(v, c_new, c, out=cs[nxt])
                    y[k] = torch.where(v, h_new, 0.0)
            h, c = hs[0 if reverse else n], cs[0 if reverse else n]
            ch.cs, ch.r, ch.gates, ch.sig_c, ch.cell, ch.y, ch.stats_r, ch.stats_c = cs, r, gates, sig_c, cell, y, stats_r, stats_c
            chunks.append(ch)
        ctx.save_for_backward(x, w_ih, gain_ih, bias, w_hh, gain_hh, gain_c, mask)
        ctx.chunks, ctx.lengths = chunks, lengths
        ctx.options = (reverse, zoneout_p, grad_clip, flow_record)
        return _outputs(chunks, reverse), h.clone(), c.clone()  # the final states as tensors of their own

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        x, w_ih, gain_ih, bias, w_hh, gain_hh, gain_c, mask = ctx.saved_tensors
        reverse, zoneout_p, grad_clip, flow_record = ctx.options
        steps, hidden = dy.shape[0], dh_n.shape[-1]
        valid = _valid(ctx.lengths, steps, dy)
        dh, dc, d_state_h, dy_t = dh_n, dc_n, None, dy.unbind(0)
        folds_dy = valid is None and not zoneout_p  # dy[t] + dh is the addmm of the step after
        step, last = (1, steps - 1) if reverse else (-1, 0)  # the walk's direction in t, and its last step
        grads = _input_grads(x, w_ih, ctx.needs_input_grad[0])
        d_w_hh, d_gain_hh, d_gain_c, d_bias_c = torch.zeros_like(w_hh), [], [], []
        for ch in reversed(ctx.chunks):
            n, batch = ch.hi - ch.lo, dy.shape[1]
            slope, d_c_norm_dh, f = _lstm_chunk_slopes(ch, reverse)
            d_pre = x.new_empty(n, batch, 4 * hidden)  # the gate pre-activation gradient (what reaches ax)
            d_r_all = torch.empty_like(d_pre)  # the gradient of W_hh h_{t-1}
            # one view per step of every buffer, made at once (as in the forward)
            d_pre_t, d_r_t, cell_t, r_t, f_t, d_c_norm_dh_t = (
                v.unbind(0) for v in (d_pre, d_r_all, ch.cell, ch.r, f, d_c_norm_dh))
            slope_cell_t = slope[..., :3 * hidden].view(n, batch, 3, hidden).unbind(0)  # i, f, g: through c_t
            slope_o_t = slope[..., 3 * hidden:].unbind(0)  # o: through h_t
            d_cell_gates_t = d_pre[..., :3 * hidden].view(n, batch, 3, hidden).unbind(0)
            d_o_t = d_pre[..., 3 * hidden:].unbind(0)
            for k in _walk(n, not reverse):
                t = ch.lo + k
                v = None if valid is None else valid[t]
                if d_state_h is None:  # not already dy[t] + dh (from the last step's product)
                    d_state_h = dy_t[t] + dh if v is None else torch.where(v, dy_t[t] + dh, 0.0)
                d_state_c = dc if v is None else torch.where(v, dc, 0.0)
                if flow_record is not None:
                    flow_record[t] = d_state_h.double().norm().to(flow_record.dtype)
                keep = _keep(mask, zoneout_p, t)
                d_h_new, d_c_zoned = (d_state_h * (1 - keep), d_state_c * (1 - keep)) if zoneout_p else (d_state_h, d_state_c)
                d_c, dg_c, db_c = torch.ops.aten.native_layer_norm_backward(  # the bias argument only marks that
                    d_c_norm_dh_t[k] * d_h_new, cell_t[k], (hidden,), *ch.stats_c[k], gain_c, gain_c, [True, True, True])  # one exists
                d_gain_c.append(dg_c)
                d_bias_c.append(db_c)
                d_c_new = d_c.add_(d_c_zoned)
                torch.mul(slope_cell_t[k], d_c_new[:, None], out=d_cell_gates_t[k])
                torch.mul(slope_o_t[k], d_h_new, out=d_o_t[k])
                d_gates = d_pre_t[k]
                if grad_clip is not None:
                    d_gates.clamp_(-grad_clip, grad_clip)
                d_r, dg_hh, _ = torch.ops.aten.native_layer_norm_backward(
                    d_gates, r_t[k], (4 * hidden,), *ch.stats_r[k], gain_hh, None, [True, True, False])
                d_gain_hh.append(dg_hh)
                d_r_t[k].copy_(d_r)
                dc_prev = d_c_new * f_t[k]
                if folds_dy and t != last:  # the next step's dy[t'] + dh in the product itself
                    d_state_h, dc = torch.addmm(dy_t[t + step], d_r, w_hh), dc_prev
                    continue
                dh_prev = torch.mm(d_r, w_hh)
                if zoneout_p:
                    dh_prev, dc_prev = dh_prev + d_state_h * keep, dc_prev + d_state_c * keep
                if v is None:
                    dh, dc = dh_prev, dc_prev
                else:
                    dh, dc = torch.where(v, dh_prev, dh), torch.where(v, dc_prev, dc)
                d_state_h = None
            h_prev = ch.hs[1:] if reverse else ch.hs[:-1]
            d_w_hh.addmm_(d_r_all.view(-1, 4 * hidden).T, h_prev.reshape(-1, hidden))
            _input_chunk_backward(d_pre, ch, x, w_ih, gain_ih, bias, grads)
        return (grads["x"], grads["w_ih"], _total(grads["gain_ih"]), None if bias is None else _total(grads["bias"]), d_w_hh,
                _total(d_gain_hh), _total(d_gain_c), _total(d_bias_c), dh, dc, None, None, None, None, None, None)


def _gru_chunk_slopes(ch: _Chunk, reverse: bool) -> Tensor:
    """The GRU backward's per-step factors that do not depend on the incoming gradient, for the
    whole chunk at once, ``(n, B, 3H)``: ``r (1 - r)``, ``(h_{t-1} - n) z (1 - z)`` and ``1 - n^2``."""
    hidden = ch.hs.shape[-1]
    slope, rz, n = torch.empty_like(ch.gates), ch.gates[..., :2 * hidden], ch.gates[..., 2 * hidden:]
    torch.addcmul(rz, rz, rz, value=-1, out=slope[..., :2 * hidden])  # s (1 - s), one pass each
    torch.addcmul(n.new_ones(()), n, n, value=-1, out=slope[..., 2 * hidden:])  # 1 - n^2
    slope[..., hidden:2 * hidden].mul_((ch.hs[1:] if reverse else ch.hs[:-1]) - ch.gates[..., 2 * hidden:])
    return slope


class LayerNormGRUFunction(torch.autograd.Function):
    """One direction of a LayerNormGRU layer, input side included: ``(x (T,B,I), w_ih, gain_ih, b_ih
    (3H,) or None, w_hh, gain_hh, b_hh (3H,), h0) -> (y (T,B,H), h_n)`` with a hand-written backward
    through time, in time chunks as :class:`LayerNormLSTMFunction`. Per step the forward is one GEMM
    and eight ops (``n``'s ``tanh`` as ``2 sigmoid(2x) - 1``, the 2 folded into the input norm's
    gain and shift for ``n``; ``h = lerp(n, h_{t-1}, z)``), the backward one GEMM and about fifteen."""

    @staticmethod
    def forward(ctx, x, w_ih, gain_ih, b_ih, w_hh, gain_hh, b_hh, h0, lengths, reverse, mask, zoneout_p, grad_clip, flow_record):
        steps, batch, hidden = x.shape[0], x.shape[1], h0.shape[-1]
        valid = _valid(lengths, steps, x)
        plain = valid is None and not zoneout_p
        scale = torch.ones_like(gain_ih)
        scale[2 * hidden:] = 2  # a_n doubled: sigmoid(2 (a_n + r b_n)) gives n's tanh
        gain_ih_2, b_ih_2 = gain_ih * scale, None if b_ih is None else b_ih * scale
        h, chunks = h0, []
        for lo, hi in _chunks(steps, batch, 3 * hidden, reverse):
            n = hi - lo
            ax, z, x_mean, x_rstd = _input_chunk(x, lo, hi, w_ih, gain_ih_2, b_ih_2)
            ch = _Chunk(lo, hi, z, (x_mean, x_rstd), x.new_empty(n + 1, batch, hidden))
            hs = ch.hs
            rec = x.new_empty(n, batch, 3 * hidden)  # W_hh h_{t-1}
            gates = x.new_empty(n, batch, 3 * hidden)  # r, z, n after their activations
            y = (hs[:-1] if reverse else hs[1:]) if valid is None else x.new_empty(n, batch, hidden)
            stats, b_n = [None] * n, [None] * n
            hs[n if reverse else 0] = h
            for k in _walk(n, reverse):
                prev, nxt = _slots(k, reverse)
                h = hs[prev]
                torch.mm(h, w_hh.T, out=rec[k])
                b, r_mean, r_rstd = torch.native_layer_norm(rec[k], (3 * hidden,), gain_hh, b_hh, EPS)
                stats[k], b_n[k] = (r_mean, r_rstd), b[:, 2 * hidden:]
                gate = gates[k]
                torch.add(ax[k, :, :2 * hidden], b[:, :2 * hidden], out=gate[:, :2 * hidden]).sigmoid_()
                r, zg, ng = gate.split(hidden, dim=1)
                _tanh_by_sigmoid_(torch.addcmul(ax[k, :, 2 * hidden:], r, b_n[k], value=2, out=ng).sigmoid_())
                if plain:
                    torch.lerp(ng, h, zg, out=hs[nxt])  # (1 - z) n + z h
                    continue
                h_new = torch.lerp(ng, h, zg)
                if zoneout_p:
                    keep = _keep(mask, zoneout_p, lo + k)
                    h_new = keep * h + (1 - keep) * h_new
                if valid is None:
                    hs[nxt] = h_new
                else:
                    v = valid[lo + k]
                    torch.where(v, h_new, h, out=hs[nxt])
                    y[k] = torch.where(v, h_new, 0.0)
            h = hs[0 if reverse else n]
            ch.rec, ch.gates, ch.y, ch.stats, ch.b_n = rec, gates, y, stats, b_n
            chunks.append(ch)
        ctx.save_for_backward(x, w_ih, gain_ih, b_ih, w_hh, gain_hh, mask)
        ctx.chunks, ctx.lengths = chunks, lengths
        ctx.options = (reverse, zoneout_p, grad_clip, flow_record)
        return _outputs(chunks, reverse), h.clone()

    @staticmethod
    def backward(ctx, dy, dh_n):
        x, w_ih, gain_ih, b_ih, w_hh, gain_hh, mask = ctx.saved_tensors
        reverse, zoneout_p, grad_clip, flow_record = ctx.options
        steps, hidden = dy.shape[0], dh_n.shape[-1]
        valid = _valid(ctx.lengths, steps, dy)
        dh = dh_n
        grads = _input_grads(x, w_ih, ctx.needs_input_grad[0])
        d_w_hh, d_gain_hh, d_b_hh = torch.zeros_like(w_hh), [], []
        for ch in reversed(ctx.chunks):
            n = ch.hi - ch.lo
            r_all, z_all, _ = ch.gates.split(hidden, dim=2)
            slope = _gru_chunk_slopes(ch, reverse)
            d_ax = x.new_empty(n, dy.shape[1], 3 * hidden)  # the gradient of the input side a_t, (r, z, n)
            d_r_all = torch.empty_like(d_ax)  # the gradient of W_hh h_{t-1}
            for k in _walk(n, not reverse):
                t = ch.lo + k
                v = None if valid is None else valid[t]
                d_state = dy[t] + dh if v is None else torch.where(v, dy[t] + dh, 0.0)
                if flow_record is not None:
                    flow_record[t] = d_state.double().norm().to(flow_record.dtype)
                keep = _keep(mask, zoneout_p, t)
                d_h_new = d_state * (1 - keep) if zoneout_p else d_state
                d_a = d_ax[k]
                d_r_pre, d_z_pre, d_n_pre = d_a.split(hidden, dim=1)
                d_through_z = d_h_new * z_all[k]  # what reaches h_{t-1} directly
                torch.sub(d_h_new, d_through_z, out=d_n_pre)  # (1 - z) dh, then n's slope
                torch.mul(slope[k, :, hidden:2 * hidden], d_h_new, out=d_z_pre)
                d_n_pre.mul_(slope[k, :, 2 * hidden:])
                if grad_clip is not None:
                    d_a[:, hidden:].clamp_(-grad_clip, grad_clip)
                torch.mul(d_n_pre, ch.b_n[k], out=d_r_pre).mul_(slope[k, :, :hidden])
                if grad_clip is not None:
                    d_r_pre.clamp_(-grad_clip, grad_clip)
                d_b = d_a.clone()  # the gradient reaching b_t = LN(W_hh h; gain_hh) + b_hh: (d_r, d_z, r d_n)
                d_b[:, 2 * hidden:].mul_(r_all[k])
                d_r, dg, db = torch.ops.aten.native_layer_norm_backward(  # the bias argument only marks that
                    d_b, ch.rec[k], (3 * hidden,), *ch.stats[k], gain_hh, gain_hh, [True, True, True])  # one exists
                d_gain_hh.append(dg)
                d_b_hh.append(db)
                d_r_all[k] = d_r
                dh_prev = torch.addmm(d_through_z, d_r, w_hh)
                if zoneout_p:
                    dh_prev = dh_prev + d_state * keep
                dh = dh_prev if v is None else torch.where(v, dh_prev, dh)
            h_prev = ch.hs[1:] if reverse else ch.hs[:-1]
            d_w_hh.addmm_(d_r_all.view(-1, 3 * hidden).T, h_prev.reshape(-1, hidden))
            _input_chunk_backward(d_ax, ch, x, w_ih, gain_ih, b_ih, grads)
        return (grads["x"], grads["w_ih"], _total(grads["gain_ih"]), None if b_ih is None else _total(grads["bias"]), d_w_hh,
                _total(d_gain_hh), _total(d_b_hh), dh, None, None, None, None, None, None)


# ------------------------------------------------------------------------------------ layers
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _widened(x, h0, c0, params, zoneout_mask):
    """``x``, ``h0``, ``c0``, the parameters and the zoneout mask in float32 (differentiably): the
    hand-written loop keeps fp16/bf16 layers' states and sums in float32, as the kernels do."""
    def wide(t):
        return None if t is None else t.float()

    return wide(x), wide(h0), wide(c0), [{k: wide(v) for k, v in p.items()} for p in params], wide(zoneout_mask)


def layer_norm_lstm_layer(x, h0, c0, params, lengths, zoneout_mask, zoneout_p, grad_clip, flow_record, fast: bool):
    """One LayerNormLSTM layer, every direction: ``x (T, B, I)``, ``h0``/``c0`` ``(D, B, H)``,
    ``zoneout_mask (T, B, D*H)`` or None. Returns ``y (T, B, D*H)``, ``h_n``, ``c_n`` ``(D, B, H)``.
    The hand-written path computes fp16/bf16 layers in float32 (:func:`_widened`)."""
    if fast and x.dtype in HALF_DTYPES:
        x_, h0_, c0_, params_, mask_ = _widened(x, h0, c0, params, zoneout_mask)
        y, h, c = layer_norm_lstm_layer(x_, h0_, c0_, params_, lengths, mask_, zoneout_p, grad_clip, flow_record, fast=True)
        return y.to(x.dtype), h.to(x.dtype), c.to(x.dtype)
    hidden = h0.shape[-1]
    ys, hs, cs = [], [], []
    for d, p in enumerate(params):
        mask = None if zoneout_mask is None else zoneout_mask[..., d * hidden:(d + 1) * hidden]
        record = None if flow_record is None else flow_record[d]
        if fast:
            bias = None if p.get("bias_ih") is None else p["bias_ih"] + p["bias_hh"]
            run = layer_norm_op.lstm_direction if torch.compiler.is_compiling() else LayerNormLSTMFunction.apply
            y, h, c = run(x, p["weight_ih"], p["gain_ih"], bias, p["weight_hh"], p["gain_hh"], p["gain_cell"], p["bias_cell"],
                          h0[d], c0[d], lengths, d == 1, mask, zoneout_p, grad_clip, record)
        else:
            ax = input_side(x, p, fold_hidden_bias=True)
            y, h, c = lstm_reference_direction(ax, h0[d], c0[d], p, lengths, d == 1, mask, zoneout_p, grad_clip, record)
        ys.append(y)
        hs.append(h)
        cs.append(c)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)), torch.stack(hs), torch.stack(cs)


def layer_norm_gru_layer(x, h0, params, lengths, zoneout_mask, zoneout_p, grad_clip, flow_record, fast: bool):
    """One LayerNormGRU layer, every direction: as :func:`layer_norm_lstm_layer` without ``c``."""
    if fast and x.dtype in HALF_DTYPES:
        x_, h0_, _, params_, mask_ = _widened(x, h0, None, params, zoneout_mask)
        y, h = layer_norm_gru_layer(x_, h0_, params_, lengths, mask_, zoneout_p, grad_clip, flow_record, fast=True)
        return y.to(x.dtype), h.to(x.dtype)
    hidden = h0.shape[-1]
    ys, hs = [], []
    for d, p in enumerate(params):
        mask = None if zoneout_mask is None else zoneout_mask[..., d * hidden:(d + 1) * hidden]
        record = None if flow_record is None else flow_record[d]
        if fast:
            b_hh = p.get("bias_hh")
            if b_hh is None:
                b_hh = x.new_zeros(3 * hidden)
            run = layer_norm_op.gru_direction if torch.compiler.is_compiling() else LayerNormGRUFunction.apply
            y, h = run(x, p["weight_ih"], p["gain_ih"], p.get("bias_ih"), p["weight_hh"], p["gain_hh"], b_hh, h0[d], lengths,
                       d == 1, mask, zoneout_p, grad_clip, record)
        else:
            ax = input_side(x, p, fold_hidden_bias=False)
            y, h, _ = gru_reference_direction(ax, h0[d], p, lengths, d == 1, mask, zoneout_p, grad_clip, record)
        ys.append(y)
        hs.append(h)
    return (ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)), torch.stack(hs)


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

    def _kernel_choice(self, x: Tensor) -> tuple[object, str | None]:
        """``(layer function, strategy)`` of the fused kernels (:mod:`fastrnn.ops.layer_norm_rnn`)
        where they run a call with input ``x``; else ``(None, why not)`` (why: None where the
        backend does not ask for kernels)."""
        from fastrnn.indrnn import scan_path  # the kernels-or-loop choice every fastrnn layer makes

        if scan_path(x.device) != "triton" or x.numel() == 0:
            return None, None
        ops = importlib.import_module("fastrnn.ops.layer_norm_rnn")  # imports triton: only when asked for
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        reason = ops.why_not(self.GATES, self.hidden_size, dtype)
        if reason is not None:
            return None, reason
        layer = ops.layer_norm_lstm_kernel_layer if self.HAS_CELL else ops.layer_norm_gru_kernel_layer
        return layer, ops.strategy(self.GATES, self.hidden_size, dtype)

    def own_route(self, input):
        """For :func:`fastrnn.explain`: the fused kernels, or which PyTorch loop runs and why."""
        from torch.nn.utils.rnn import PackedSequence

        from fastrnn.routing import Route

        data = input.data if isinstance(input, PackedSequence) else input
        layer, detail = self._kernel_choice(data)
        if layer is not None:
            where = "W_hh on chip" if detail == "resident" else "W_hh re-read per step in tiles"
            batch = int(input.batch_sizes[0]) if isinstance(input, PackedSequence) else (
                1 if data.dim() == 2 else data.shape[0 if self.batch_first else 1])
            ops = importlib.import_module("fastrnn.ops.layer_norm_rnn")
            dtype = torch.get_autocast_dtype(data.device.type) if torch.is_autocast_enabled(data.device.type) else data.dtype
            directions = 2 if self.bidirectional else 1
            ways = [ops.strategy(self.GATES, self.hidden_size, dtype, batch, directions, data.device, backward) == "persistent"
                    for backward in (False, True)]
            spread = "W_hh spread over the programs, the norms' statistics exchanged between them"
            if all(ways):
                where = f"persistent: {spread}"
            elif ways[0]:
                where = f"the forward persistent ({spread}), the backward {where}"
            return Route("triton", f"{self.NAME}: the fused Triton kernels ({where}, the recurrent and cell norms in "
                                   "the step), one launch per layer each way")
        if detail is not None:
            return Route("reference", f"{self.NAME}: the PyTorch loop with a hand-written backward through time ({detail})")
        if self._fast():
            return Route("reference", f"{self.NAME}: the PyTorch loop with a hand-written backward through time "
                                      f"(on {data.device.type}; the Triton kernels run on CUDA or with FASTRNN_BACKEND=triton)")
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
        kernel_layer, _ = self._kernel_choice(x)
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
        kernel_layer, _ = self._kernel_choice(x)
        if kernel_layer is not None:
            return (*kernel_layer(x, h0, params, lengths, zoneout_mask, self.zoneout, self.grad_clip, flow_record), None)
        y, h_n = layer_norm_gru_layer(x, h0, params, lengths, zoneout_mask, self.zoneout, self.grad_clip, flow_record, self._fast())
        return y, h_n, None


from fastrnn import layer_norm_op  # noqa: E402  (registers the operators torch.compile traces; it imports the Functions above)
