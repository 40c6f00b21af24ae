"""LSTM (with and without projection) on the fused kernels of ``fastrnn.kernels.lstm``.

Read top to bottom: strategy choice, launch helper, forward launcher, backward launcher, the
registered operator ``fastrnn::lstm_recurrence`` (its fake, its backward operator and autograd
formula), ``lstm_layer``.

Strategy (``lstm_plan``): ``plan(4, H, dtype)`` of :mod:`fastrnn.ops.recurrence` (resident for
``BLOCK_H <= 16`` in fp32, ``<= 64`` in fp16/bf16; beyond, persistent in fp16/bf16 and tiled in
fp32, whose FMA dots spill in the persistent form; ``FASTRNN_STRATEGY`` forces any), warps and
stages included. The persistent kernels (partition: :func:`fastrnn.ops.persistent.persistent_plan`)
take the resident kernels' arguments plus their scratch (``PersistentKernel`` below: exchanges,
fp32 partials and carries, shapes in ``fastrnn.kernels.lstm``). With
projection the resident kernels pad ``h`` (``P`` units) to ``BLOCK_H`` and keep ``W_hr`` on chip as
a fifth ``BLOCK_H x BLOCK_H`` block, so ``P`` does not change the choice. Registers, stack and
shared memory of every launch: ``bench/results/aot-compile.md`` (``python -m fastrnn.ops.aot``).

The tiled kernels' reduction loops run unpipelined (``tl.range(..., num_stages=1)``, so the
launch's stage count does not matter) and reduce over ``REDUCE_TILE = 32``: pipelined, or 64 wide,
the fp32 tiled kernels spill.

What the forward saves for the backward (besides the layer output ``y``, which the next layer or
the loss holds anyway, the weights and the initial state):

* ``gates (T, B, D*4H)``: the activated gates ``sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)``;
* ``c (T, B, D*H)``: the cell state after every step;

both in the compute dtype: ``5H`` values per row, step and direction, i.e. ``20H`` bytes in fp32
and ``10H`` bytes in fp16/bf16 -- the ``4H + H`` values of cuDNN's LSTM reserve space for the same
shape, no more. The backward kernel recomputes only ``tanh(c_t)``; with projection
``m_t = sigmoid(o_t) tanh(c_t)`` is recomputed on the host (one elementwise pass) for ``dW_hr``.
The cell state is fp32 inside the kernels; only its saved copy is in the compute dtype, and
``c_n`` is sliced from it (each direction's last step). The backward allocates ``dgates`` (``4H``
values per row, step, direction) and, projecting, ``dhp`` (``P``) and a transient ``m`` (``H``).

Backward: one launch writes ``dgates (T, B, D*4H)`` (the gradient of ``gx``, hence of ``W_ih``,
``b_ih``, ``b_hh`` and ``x`` by autograd of the input GEMM) and, projecting, ``dhp (T, B, D*P)``;
then ``dW_hh = sum_t dgates_t^T h_{t-1}`` and ``dW_hr = sum_t dhp_t^T m_t`` are batched GEMMs.
``grad_clip`` clamps the four gate pre-activation gradients of every step (as the reference's
hook on ``gx + h W_hh^T + b_hh`` does); ``flow_record`` receives ``||dL/dh_t||`` per direction and
step, ``h_t`` being the (projected) output of the step.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from fastrnn.kernels import lstm as kernels
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
    plan,
    Plan,
    previous_states,
    recurrent_weight_grad,
    stack_params,
    triton_next_power_of_2,
    write_flow_record,
)


GATES = 4


def lstm_plan(hidden: int, proj: int, dtype: torch.dtype) -> Plan:
    """Strategy and block sizes for cell size ``hidden`` and projection size ``proj`` (0: none):
    ``plan(4, hidden, dtype)``. The projection does not change the choice: the resident kernels pad
    ``h`` (``proj`` units) to ``BLOCK_H`` and hold ``W_hr`` as a fifth ``BLOCK_H x BLOCK_H`` block,
    and that form compiles without spills at the largest resident size (module docstring)."""
    return plan(GATES, hidden, dtype)


def lstm_fwd(gx: Tensor, w_hh: Tensor, w_hr: Tensor | None, h0: Tensor, c0: Tensor, lengths: Tensor | None,
             zoneout: dict | None = None):
    """``gx (T, B, D*4H)``, ``w_hh (D, 4H, K)``, ``w_hr (D, P, H)`` or None, ``h0 (D, B, K)``,
    ``c0 (D, B, H)`` -> ``y (T, B, D*K)``, ``h_n (D, B, K)``, ``c_n (D, B, H)`` and the saved
    ``gates (T, B, D*4H)``, ``c (T, B, D*H)`` (compute dtype). ``zoneout``: the kernels' zoneout
    arguments (:func:`fastrnn.ops.zoneout.zoneout_args`; the resident and persistent kernels take
    them, the tiled ones do not), None without zoneout."""
    T, B, _ = gx.shape
    D, _, H = c0.shape
    K = h0.shape[2]
    y = gx.new_empty((T, B, D * K))
    h_n = torch.empty_like(h0)
    gates = torch.empty_like(gx)
    c = gx.new_empty((T, B, D * H))
    if B == 0 or T == 0:
        return y, h0.clone() if T == 0 else h_n, c0.clone(), gates, c
    proj = w_hr is not None
    w_hh_k = kernel_weight(w_hh)
    weight_rows = persistent.launch_plan(GATES, H, B, D, gx.dtype, gx.device, K if proj else 0).weight_rows
    args = [
        gx.contiguous(), w_hh_k, kernel_weight(w_hr) if proj else w_hh_k, h0.contiguous(), c0.contiguous(),
        kernel_lengths(lengths, gx), y, h_n, gates, c,
    ]
    launch(
        "lstm_fwd", GATES, (kernels.lstm_fwd_resident_kernel, kernels.lstm_fwd_tiled_kernel), args,
        dict(T=T, B=B, H=H, K=K, D=D, HAS_PROJ=proj, HAS_LENGTHS=lengths is not None, INPUT_PRECISION=input_precision(gx.dtype)),
        B=B, H=H, D=D, dtype=gx.dtype, device=gx.device, scratch=[(2, D, B, K), (2, D, B, H), (D, B, H) if proj else None],
        zoneout_meta=zoneout,  # for the resident and persistent kernels
        # exchanges: the ping-pong of h and, projecting, m, in the compute dtype; carry: c in fp32.
        persistent_kernel=PersistentKernel(
            kernels.lstm_fwd_persistent_kernel, 2 * T if proj else T,
            [((2, D, B, K), gx.dtype), ((D, B, H) if proj else (1,), gx.dtype), ((D, B, H), torch.float32)],
            dict(zip(("BLOCK_HOUT", "BLOCK_HTAIL"), persistent.reduction_split(K, weight_rows)), **_fp32_register_budget(gx.dtype)),
            forward=True, zoneout=True,
        ),
    )
    return y, h_n, final_cell_state(c, D), gates, c


def _fp32_register_budget(dtype: torch.dtype) -> dict:
    """The persistent kernels' ``maxnreg`` in fp32 (:func:`fastrnn.ops.persistent.register_budget`):
    the whole budget with tf32 products (L5's plan compiles clean with it, and the forward with
    lengths keeps an 8 B frame at 80 registers without), none with the split ones. The 16-bit LSTM
    kernels launch without it, as their compile rows (L1, L4) were measured, except a forward the
    plan has read its slice in chunks for lack of shared memory (``fwd_maxnreg``:
    :data:`fastrnn.ops.persistent.FWD_WHOLE_SHARED_HEADROOM`)."""
    if dtype != torch.float32:
        return {}
    return persistent.register_budget(dtype, input_precision(dtype, "persistent", GATES))


def _zoneout_chunk(zoneout: dict | None, proj: bool) -> dict:
    """The persistent backward's ``ZONEOUT_KC`` with zoneout and without projection: its partial of
    ``dh_{t-1}`` in chunks of :data:`fastrnn.ops.persistent.BWD_NARROW_CHUNK` where the plan holds
    the head part whole (measured: ``kernels/lstm.py``); none otherwise."""
    return {"ZONEOUT_KC": persistent.BWD_NARROW_CHUNK} if zoneout and not proj else {}


def final_cell_state(c: Tensor, directions: int) -> Tensor:
    """``c_n (D, B, H)`` from the saved cell states ``c (T, B, D*H)``: the state after each
    direction's last step (``t = T-1`` forward, ``t = 0`` reverse; a row past its length keeps its
    state, so this holds with lengths too)."""
    per_direction = rearrange(c, "t b (d h) -> d t b h", d=directions)
    last = [per_direction[0, -1]] + ([per_direction[1, 0]] if directions == 2 else [])
    return torch.stack(last)


def lstm_bwd(
    dy: Tensor, dh_n: Tensor, dc_n: Tensor, gates: Tensor, c: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Tensor | None,
    lengths: Tensor | None, grad_clip: float | None = None, record_flow: bool = False, zoneout: dict | None = None,
):
    """Backward through time (``zoneout`` as :func:`lstm_fwd` takes it): ``dgates (T, B, D*4H)`` (gradient of ``gx``; gate pre-activation
    gradients clamped to ``[-grad_clip, grad_clip]`` when given), ``dhp (T, B, D*P)`` (gradient of
    each step's projected ``h``; None without projection), ``dh0``, ``dc0``, and with
    ``record_flow`` the squared norms ``||dL/dh_t||^2`` per direction, step and row ``(D, T, B)``."""
    T, B, _ = gates.shape
    D, _, H = c0.shape
    K = dh_n.shape[2]
    proj = w_hr is not None
    dgates = torch.empty_like(gates)
    dhp = gates.new_empty((T, B, D * K)) if proj else None
    dh0 = torch.empty_like(dh_n)
    dc0 = torch.empty_like(dc_n)
    flow = flow_buffer(record_flow, D, T, B, gates.device)
    if B == 0:
        return dgates, dhp, dh0, dc0, flow
    w_hh_k = kernel_weight(w_hh)
    # the partition the launch runs (its slices size the partials): the card's, with the projection
    partition = persistent.launch_plan(GATES, H, B, D, gates.dtype, gates.device, K if proj else 0)
    shares = persistent.flow_shares(flow, GATES, H, B, D, gates.dtype, K if proj else 0)
    args = [
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), gates, c, c0.contiguous(), w_hh_k,
        kernel_weight(w_hr) if proj else w_hh_k, kernel_lengths(lengths, gates),
        dgates, dhp if proj else dgates, dh0, dc0, dh0 if flow is None else flow if shares is None else shares,
    ]
    launch(
        "lstm_bwd", GATES, (kernels.lstm_bwd_resident_kernel, kernels.lstm_bwd_tiled_kernel), args,
        dict(T=T, B=B, H=H, K=K, D=D, grad_clip=float(grad_clip or 0.0), HAS_PROJ=proj, HAS_LENGTHS=lengths is not None,
             INPUT_PRECISION=input_precision(gates.dtype), CLIP=grad_clip is not None, RECORD_FLOW=record_flow),
        B=B, H=H, D=D, dtype=gates.dtype, device=gates.device, scratch=[(2, D, B, K), (2, D, B, H), (D, B, H) if proj else None],
        zoneout_meta=zoneout,  # for the resident and persistent kernels
        # fp32 per-program partials of dh (and dm), ping-pong by step; carry: dh and dc in fp32.
        persistent_kernel=PersistentKernel(
            kernels.lstm_bwd_persistent_kernel, 2 * T + 1 if proj else T + 1,
            # with zoneout dh_partial has one plane more: each program's kept part of dh_t (kernels/lstm.py)
            [((2, partition.slices + (zoneout is not None), D, B, K), torch.float32),
             ((2, partition.slices, D, B, H) if proj else (1,), torch.float32),
             ((D, B, K), torch.float32), ((D, B, H), torch.float32)],
            dict(zip(("BLOCK_HOUT", "BLOCK_HTAIL"), persistent.reduction_split(K, partition.weight_rows)),
                 **_fp32_register_budget(gates.dtype), **_zoneout_chunk(zoneout, proj)),
            zoneout=True,
        ),
    )
    if shares is not None:
        flow.copy_(shares.sum(0))
    return dgates, dhp, dh0, dc0, flow


def projection_weight_grad(dhp: Tensor, gates: Tensor, c: Tensor, directions: int) -> Tensor:
    """``dW_hr[d] = sum_{t,b} dhp[t, b, d]^T m[t, b, d]`` with ``m = sigmoid(o) tanh(c)`` recomputed
    from the saved gates and cell states: one batched GEMM, ``(D, P, H)``."""
    o = rearrange(gates, "t b (d q h) -> q d (t b) h", d=directions, q=4)[3]
    m = (o.float() * torch.tanh(rearrange(c, "t b (d h) -> d (t b) h", d=directions).float())).to(dhp.dtype)
    return torch.bmm(rearrange(dhp, "t b (d p) -> d p (t b)", d=directions), m)


@torch.library.custom_op("fastrnn::lstm_recurrence", mutates_args=())
def lstm_recurrence(
    gx: Tensor, w_hh: Tensor, w_hr: Tensor | None, h0: Tensor, c0: Tensor, lengths: Tensor | None,
    grad_clip: float | None, flow_record: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The LSTM recurrence of one layer (every direction) as a registered operator:
    ``(gx, w_hh, w_hr, h0, c0) -> (y, h_n, c_n, gates, c)``. ``grad_clip`` and ``flow_record``
    (a ``(D, T)`` tensor filled in backward) are read by the backward only."""
    return lstm_fwd(gx, w_hh, w_hr, h0, c0, lengths)


@lstm_recurrence.register_fake
def _(gx, w_hh, w_hr, h0, c0, lengths, grad_clip, flow_record):
    T, B, _ = gx.shape
    D, _, H = c0.shape
    K = h0.shape[2]
    return (gx.new_empty((T, B, D * K)), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(gx),
            gx.new_empty((T, B, D * H)))


@torch.library.custom_op("fastrnn::lstm_recurrence_backward", mutates_args=())
def lstm_recurrence_backward(
    dy: Tensor, dh_n: Tensor, dc_n: Tensor, y: Tensor, gates: Tensor, c: Tensor, w_hh: Tensor, w_hr: Tensor | None,
    h0: Tensor, c0: Tensor, lengths: Tensor | None, grad_clip: float | None, record_flow: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dgates, dW_hh, dW_hr, dh0, dc0, flow)``: the backward kernel, then ``dW_hh`` and ``dW_hr``
    (empty without projection) as batched GEMMs; ``flow (D, T, B)`` squared norms (empty unless
    ``record_flow``)."""
    directions = h0.shape[0]
    dgates, dhp, dh0, dc0, flow = lstm_bwd(dy, dh_n, dc_n, gates, c, c0, w_hh, w_hr, lengths, grad_clip, record_flow)
    dw_hh = recurrent_weight_grad(dgates, previous_states(y, h0, lengths), directions)
    dw_hr = projection_weight_grad(dhp, gates, c, directions) if w_hr is not None else y.new_empty(0)
    return dgates, dw_hh, dw_hr, dh0, dc0, (y.new_empty(0) if flow is None else flow)


@lstm_recurrence_backward.register_fake
def _(dy, dh_n, dc_n, y, gates, c, w_hh, w_hr, h0, c0, lengths, grad_clip, record_flow):
    D, B, _ = h0.shape
    flow = y.new_empty((D, y.shape[0], B), dtype=torch.float32) if record_flow else y.new_empty(0)
    dw_hr = torch.empty_like(w_hr) if w_hr is not None else y.new_empty(0)
    return torch.empty_like(gates), torch.empty_like(w_hh), dw_hr, torch.empty_like(dh_n), torch.empty_like(dc_n), flow


def _lstm_setup_context(ctx, inputs, output):
    gx, w_hh, w_hr, h0, c0, lengths, grad_clip, flow_record = inputs
    y, _, _, gates, c = output
    ctx.save_for_backward(y, gates, c, w_hh, w_hr, h0, c0, lengths)
    ctx.grad_clip, ctx.flow_record = grad_clip, flow_record


def _lstm_backward(ctx, dy, dh_n, dc_n, _gates, _c):
    y, gates, c, w_hh, w_hr, h0, c0, lengths = ctx.saved_tensors
    dgates, dw_hh, dw_hr, dh0, dc0, flow = lstm_recurrence_backward(
        dy, dh_n, dc_n, y, gates, c, w_hh, w_hr, h0, c0, lengths, ctx.grad_clip, ctx.flow_record is not None
    )
    write_flow_record(ctx.flow_record, flow)
    return dgates, dw_hh, (dw_hr if w_hr is not None else None), dh0, dc0, None, None, None


lstm_recurrence.register_autograd(_lstm_backward, setup_context=_lstm_setup_context)


def lstm_layer(
    cell: str, x: Tensor, h0: Tensor, c0: Tensor, params: list[dict], lengths: Tensor | None, nonlinearity: str,
    grad_clip: float | None = None, flow_record: Tensor | None = None,
):
    """One LSTM layer, every direction in one launch; the signature of
    :func:`fastrnn.reference.reference_layer`. Returns ``y (T, B, D*H_out)``, ``h_n (D, B, H_out)``,
    ``c_n (D, B, H)``."""
    dtype = compute_dtype(x)
    gx = input_projection(x, params, dtype, fold_hidden_bias=True)
    w_hh = stack_params(params, "w_hh", dtype)
    w_hr = stack_params(params, "w_hr", dtype) if params[0]["w_hr"] is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y, h_n, c_n, _, _ = lstm_recurrence(gx, w_hh, w_hr, h0.to(dtype), c0.to(dtype), lengths, grad_clip, flow_record)
    return y, h_n, c_n
