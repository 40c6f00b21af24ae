"""LayerNormLSTM and LayerNormGRU on the fused kernels of ``fastrnn.kernels.layer_norm_rnn``.

Read top to bottom: which kernels serve a size (``strategy``: resident where one program holds
its direction's ``W_hh`` on chip, ``kernel_blocks``; tiled beyond; for the LayerNormLSTM in 16-bit
up to ``H`` 256, and the LayerNormGRU from 129, persistent: ``persistent_planned``), the LSTM's forward and backward
launchers and autograd Function, the GRU's, then the layer functions the modules of
:mod:`fastrnn.layer_norm_rnn` call.

The persistent LayerNormLSTM kernels (``layer_norm_lstm_{fwd,bwd}_persistent_kernel``, launched
by :func:`fastrnn.ops.persistent.launch`: the plain LSTM's partition, barrier mode on a GPU,
per_step under the interpreter or where the grid does not fit) read and write the same saved
tensors as the resident and tiled ones, so forward and backward choose apart (the backward plans
persistent where the plan's backward sub-tiles are one per program; else it runs tiled from what
the persistent forward saved). Each step takes three exchange rounds each way (forward ``h``, the
moments of the recurrent norm and of the cell norm; backward the two norms' means and the
partials of ``dh``), where the plain cells take one; ``python -m bench --plan`` reports them
(``exchange_rounds_per_step``). The LayerNormGRU's persistent kernels
(``layer_norm_gru_{fwd,bwd}_persistent_kernel``, the plain GRU's partitions, planned on the LSTM's
conditions from ``BLOCK_K`` :data:`GRU_PERSISTENT_MIN_BLOCK_K`) take two exchange rounds per step
each way (forward the recurrent norm's moments, then ``h``; backward the norm's means, then
``d_r``), and read and write the same saved tensors as its resident and tiled kernels.

Split of the work. Before the loop, on the host, in PyTorch: the input side
``ax = LN(W_ih x; gain_ih) + b_ih (+ b_hh, LSTM)`` of every step and direction (one GEMM and one
layer-norm pass; its backward is autograd's, from the kernel's ``d_ax``). In the kernel: the
recurrence with the recurrent-side norm (and the LSTM's cell norm) fused in each step. After the
backward kernel, on the host: ``dW_hh = sum_t d_r_t^T h_{t-1}`` as one batched GEMM over every
step, and the gains' (and biases') gradients as the sum of the kernel's per-tile partials.

DropConnect (``recurrent_dropout``) needs nothing here: :class:`fastrnn.stacked.StackedRecurrence`
masks ``W_hh`` before the layer runs, so the kernel reads the masked weight and autograd takes the
gradient through the mask. Zoneout runs inside the kernels with the mask
:func:`fastrnn.regularization.zoneout_mask` drew (the reference path's mask, under the same seed).

What the forward saves per row, step and direction (compute dtype; ``G`` gates): LSTM ``gates`` 4H,
``r_hat`` 4H, ``c`` H, ``c_hat`` H and two fp32 ``rstd``; GRU ``gates`` (with ``b_n``) 4H,
``r_hat`` 3H and one ``rstd``. The state each step read comes from the output ``y``.
"""

from __future__ import annotations

import os

import torch
import triton
from torch import Tensor

from fastrnn.kernels import layer_norm_rnn as kernels
from fastrnn.layer_norm_rnn import input_side
from fastrnn.ops import persistent
from fastrnn.ops.lstm import final_cell_state
from fastrnn.ops.recurrence import (
    BLOCK_B,
    STRATEGY_ENV,
    compute_dtype,
    count_launch,
    flow_buffer,
    input_precision,
    kernel_lengths,
    kernel_weight,
    previous_states,
    recurrent_weight_grad,
    register_budget,
    triton_next_power_of_2,
    write_flow_record,
)

#: Largest ``BLOCK_H`` (``H`` rounded up to a power of two, at least 16) at which a program holds
#: its direction's whole ``W_hh`` on chip, and its warps, by (gates, fp32?): the resident limits
#: of the plain cells' kernels (``fastrnn.ops.recurrence.RESIDENT_MAX_BLOCK_H``), held to the same
#: compile gate (``python -m fastrnn.ops.aot``; workloads ``layer-norm-*``).
MAX_BLOCK_H = {(4, False): (64, 8), (4, True): (16, 4), (3, False): (64, 8), (3, True): (32, 8)}
#: Dtypes the kernels compute in (state, norms and accumulators in fp32 always).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


#: The tiled kernels' unit tile and warps (the plain LSTM tiled kernels' 16-bit
#: configuration, ``fastrnn.ops.recurrence.TILED_CONFIG``); their launches pass ``maxnreg``.
TILED_BLOCK_H, TILED_WARPS = 64, 8


def kernel_blocks(gates: int, hidden: int, dtype: torch.dtype) -> tuple[int, int] | None:
    """``(BLOCK_H, num_warps)`` of the resident kernels for this size, or None where they can't hold it."""
    if dtype not in KERNEL_DTYPES:
        return None
    block_h = max(16, triton_next_power_of_2(hidden))
    largest, warps = MAX_BLOCK_H[gates, dtype == torch.float32]
    if block_h > largest:
        return None
    return block_h, (warps if block_h == largest else 4)


def strategy(gates: int, hidden: int, dtype: torch.dtype, batch: int | None = None, directions: int = 1,
             device=None, backward: bool = False) -> str | None:
    """``"resident"``, ``"tiled"`` (beyond the resident size), ``"persistent"`` (the LayerNormLSTM
    forward, or with ``backward`` its backward, given its ``batch``, where :func:`persistent_planned`)
    or None (no kernel for the dtype). The LayerNormGRU likewise (``gates=3``). Without ``batch``:
    resident or tiled."""
    if dtype not in KERNEL_DTYPES:
        return None
    if batch is not None and persistent_planned(gates, hidden, batch, directions, dtype, device, backward):
        return "persistent"
    if kernel_blocks(gates, hidden, dtype) is not None:
        return "resident"
    return "tiled"


#: Widest ``BLOCK_K`` (``H`` rounded up to a power of two) at which the LayerNormLSTM forward plans
#: persistent by itself: its kernel reads its slice whole, one sub-tile of ``BLOCK_B`` rows per
#: program (the GPU matrix's LayerNormLSTM row, B64 H256 bf16: 32 slices of 8 units x 4 groups).
#: Held to the compile gate (``python -m fastrnn.ops.aot``, workloads ``layer-norm-lstm-*-persistent-barrier-*``).
PERSISTENT_MAX_BLOCK_K = 256
#: Most bytes of ``W_hh`` one program of the persistent LayerNormLSTM forward holds where it plans
#: by itself (``4 * BLOCK_S * BLOCK_K`` 16-bit values): every form of the compile gate compiles with
#: no stack frame at up to 32 KB (sm_90, H256 B64: one direction 8-unit slices, bidirectional
#: 16 units; sm_80 one direction 16 units), and at 64 KB (an A100's plan for the bidirectional
#: B64 H248, 32-unit slices) the forward spills 496 B (Triton 3.9) / 112 B (3.6) on sm_80.
PERSISTENT_MAX_SLICE_BYTES = 32 * 1024
#: Narrowest ``BLOCK_K`` at which the LayerNormGRU forward plans persistent by itself (so 16-bit
#: ``H`` 129..256). At 128 the plan gives its programs 4 warps (at most 16 KB of weights each) and
#: Triton 3.6 spills the kernel's full form (255 registers, 8-24 B of stack on sm_90 at H120 B16 and
#: B64 bidirectional with lengths and zoneout; Triton 3.9 205-218 registers, none); at 256 (8 warps)
#: every form measured, forward and backward, compiles with no stack frame on sm_90 and sm_80 on
#: both (``python -m fastrnn.ops.aot``, workloads ``layer-norm-gru-*-persistent-barrier-*``).
GRU_PERSISTENT_MIN_BLOCK_K = 256


def persistent_plan(hidden: int, batch: int, directions: int, dtype: torch.dtype, device=None, gates: int = 4):
    """The persistent LayerNormLSTM kernels' partition: the plain LSTM's
    (:func:`fastrnn.ops.persistent.persistent_plan`, 4 gates) for this card; ``gates=3`` the
    LayerNormGRU forward's, the plain GRU's."""
    return persistent.persistent_plan(gates, hidden, batch, directions, dtype, persistent.sm_count(device),
                                      persistent.shared_per_block(device))


def persistent_planned(gates: int, hidden: int, batch: int, directions: int, dtype: torch.dtype, device=None,
                       backward: bool = False) -> bool:
    """Whether the LayerNormLSTM forward (``backward``: its backward) runs on its persistent kernel
    (``gates=3``: the LayerNormGRU's, on the same conditions and from ``BLOCK_K``
    :data:`GRU_PERSISTENT_MIN_BLOCK_K`):
    forced by ``FASTRNN_STRATEGY=persistent`` (any size and dtype; ``FASTRNN_PERSISTENT_SLICE`` and
    ``FASTRNN_PERSISTENT_MODE`` as for the plain cells), never with ``FASTRNN_STRATEGY`` ``resident``
    or ``tiled`` (then the resident or tiled kernels serve it as their sizes say), else in 16-bit
    beyond the resident size up to :data:`PERSISTENT_MAX_BLOCK_K`, where the plan holds each
    program to one sub-tile of rows read whole (``fwd_tiles``, ``fwd_chunk``; the backward's
    ``bwd_tiles``, ``bwd_chunk``), at most :data:`PERSISTENT_MAX_SLICE_BYTES` of weights, and fits
    the card at one program per SM. fp32 keeps the tiled kernels unless forced (its persistent
    backward spills on sm_90: ``fastrnn.ops.aot.LAYER_NORM_PERSISTENT_ROW``). The forward and the
    backward decide apart: each reads and writes the same saved tensors whichever kernel the other
    ran on."""
    if gates not in (3, 4) or dtype not in KERNEL_DTYPES:
        return False
    forced = os.environ.get(STRATEGY_ENV, "").strip().lower()
    if forced:  # persistent: forced; resident or tiled: the kernels' own choice without it
        return forced == "persistent"
    if dtype == torch.float32 or kernel_blocks(gates, hidden, dtype) is not None:
        return False
    block_k = max(16, triton_next_power_of_2(hidden))
    if block_k > PERSISTENT_MAX_BLOCK_K or (gates == 3 and block_k < GRU_PERSISTENT_MIN_BLOCK_K):
        return False
    p = persistent_plan(hidden, batch, directions, dtype, device, gates)
    slice_bytes = gates * p.block_s * p.block_k * dtype.itemsize
    one_tile = p.bwd_tiles == 1 and p.bwd_chunk == 0 if backward else p.fwd_tiles == 1 and p.fwd_chunk == 0
    return one_tile and p.programs <= persistent.sm_count(device) and slice_bytes <= PERSISTENT_MAX_SLICE_BYTES


def why_not(gates: int, hidden: int, dtype: torch.dtype) -> str | None:
    """Why the kernels can't run a layer of this size and dtype (None: they can), for ``fastrnn.explain``."""
    if dtype not in KERNEL_DTYPES:
        return f"no kernel computes in {str(dtype).replace('torch.', '')}"
    return None


def zoneout_mode(keep: Tensor | None, zoneout_p: float) -> int:
    """The kernels' ``ZONEOUT``: 0 off, 1 training (the mask ``keep``), 2 eval (``zoneout_p``)."""
    if keep is not None:
        return 1
    return 2 if zoneout_p else 0


def _meta(gates: int, hidden: int, dtype: torch.dtype, lengths, keep, zoneout_p) -> dict:
    meta = dict(HAS_LENGTHS=lengths is not None, ZONEOUT=zoneout_mode(keep, zoneout_p), INPUT_PRECISION=input_precision(dtype),
                BLOCK_B=BLOCK_B)
    if strategy(gates, hidden, dtype) == "tiled":
        return dict(meta, BLOCK_H=TILED_BLOCK_H, num_warps=TILED_WARPS, num_stages=1, maxnreg=register_budget(TILED_WARPS))
    block_h, warps = kernel_blocks(gates, hidden, dtype)
    if dtype == torch.float32:
        return dict(meta, BLOCK_H=block_h, num_warps=warps)
    # 16-bit: left to itself ptxas stops two one-row (B = 1) forms at 128 registers with an 8-byte
    # stack frame on sm_90; given the whole budget they compile clean. fp32 gets no cap: with it
    # the GRU backward at BLOCK_H 32 uses all 255 registers and a 32-byte frame (the compile gate).
    return dict(meta, BLOCK_H=block_h, num_warps=warps, maxnreg=register_budget(warps))


def _scratch(*shapes, device) -> list[Tensor]:
    """The tiled kernels' fp32 scratch (each element written before it is read)."""
    return [torch.empty(shape, device=device, dtype=torch.float32) for shape in shapes]


def _norm_partials(directions: int, batch: int, hidden: int, device) -> Tensor:
    """The backward kernels' ``d_norm`` output, ``(D, cdiv(B, BLOCK_B), 6, H)`` fp32."""
    return torch.empty((directions, triton.cdiv(batch, BLOCK_B), 6, hidden), device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------- LayerNormLSTM
def layer_norm_lstm_fwd(ax, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, keep, zoneout_p):
    """``ax (T, B, D*4H)``, ``w_hh (D, 4H, H)``, ``gain_hh (D, 4H)``, ``gain_c``/``bias_c (D, H)``,
    ``h0``/``c0 (D, B, H)``, ``keep (T, B, D*H)`` or None -> ``y (T, B, D*H)``, ``h_n``, ``c_n``
    ``(D, B, H)`` and the saved ``(gates, r_hat, c, c_hat, stats)``."""
    T, B, _ = ax.shape
    D, _, H = h0.shape
    y = ax.new_empty((T, B, D * H))
    h_n = torch.empty_like(h0)
    gates, r_hat = torch.empty_like(ax), torch.empty_like(ax)
    c, c_hat = torch.empty_like(y), torch.empty_like(y)
    stats = torch.empty((T, B, D, 2), device=ax.device, dtype=torch.float32)
    if strategy(4, H, ax.dtype, B, D, ax.device) == "persistent":
        _layer_norm_lstm_fwd_persistent(ax, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, keep, zoneout_p,
                                        (y, h_n, gates, r_hat, c, c_hat, stats))
        return y, h_n, final_cell_state(c, D), (gates, r_hat, c, c_hat, stats)
    tiled = strategy(4, H, ax.dtype) == "tiled"
    kernel = kernels.layer_norm_lstm_fwd_tiled_kernel if tiled else kernels.layer_norm_lstm_fwd_kernel
    # tiled scratch: h ping-pong, c, the raw products, the new cell
    scratch = _scratch((2, D, B, H), (D, B, H), (D, B, 4 * H), (D, B, H), device=ax.device) if tiled else []
    kernel[(triton.cdiv(B, BLOCK_B), D)](
        ax.contiguous(), kernel_weight(w_hh), gain_hh.contiguous(), gain_c.contiguous(), bias_c.contiguous(),
        h0.contiguous(), c0.contiguous(), kernel_lengths(lengths, ax), y if keep is None else keep.contiguous(),
        y, h_n, gates, r_hat, c, c_hat, stats, *scratch,
        T, B, H, D, float(zoneout_p), **_meta(4, H, ax.dtype, lengths, keep, zoneout_p),
    )
    count_launch("layer_norm_lstm_fwd_tiled" if tiled else "layer_norm_lstm_fwd")
    return y, h_n, final_cell_state(c, D), (gates, r_hat, c, c_hat, stats)


def _layer_norm_lstm_fwd_persistent(ax, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, keep, zoneout_p, outputs):
    """:func:`layer_norm_lstm_fwd` on ``layer_norm_lstm_fwd_persistent_kernel`` (``fastrnn.ops.persistent.launch``:
    barrier or per-step mode), three phases per step; ``outputs`` ``(y, h_n, gates, r_hat, c, c_hat, stats)``."""
    T, B, _ = ax.shape
    D, _, H = h0.shape
    partition = persistent_plan(H, B, D, ax.dtype, ax.device)
    if partition.fwd_tiles != 1 or partition.fwd_chunk:
        raise ValueError(f"layer_norm_lstm_fwd: the persistent kernel holds one sub-tile of rows read whole, and the plan for "
                         f"H {H}, B {B} walks {partition.fwd_tiles} sub-tiles (chunk {partition.fwd_chunk}): unset {STRATEGY_ENV}")
    slices = partition.slices
    args = [ax.contiguous(), kernel_weight(w_hh), gain_hh.contiguous(), gain_c.contiguous(), bias_c.contiguous(),
            h0.contiguous(), c0.contiguous(), kernel_lengths(lengths, ax), outputs[0] if keep is None else keep.contiguous(),
            *outputs]
    meta = dict(T=T, B=B, H=H, D=D, zoneout_p=float(zoneout_p), HAS_LENGTHS=lengths is not None,
                ZONEOUT=zoneout_mode(keep, zoneout_p), INPUT_PRECISION=input_precision(ax.dtype))
    if ax.dtype != torch.float32:
        meta["maxnreg"] = persistent.REGISTER_BUDGET
    # fp32 scratch: the h ping-pong, the moments of r and of c_new, the raw product, c_new and o, the carried c
    scratch = [((2, D, B, H), torch.float32), ((D, B, slices, 2), torch.float32), ((D, B, slices, 2), torch.float32),
               ((D, B, 4 * H), torch.float32), ((2, D, B, H), torch.float32), ((D, B, H), torch.float32)]
    persistent.launch("layer_norm_lstm_fwd", kernels.layer_norm_lstm_fwd_persistent_kernel, args, meta, gates=4, B=B, H=H, D=D,
                      dtype=ax.dtype, device=ax.device, phases=3 * T, scratch=scratch, forward=True)
    count_launch("layer_norm_lstm_fwd_persistent")


def layer_norm_lstm_bwd(dy, dh_n, dc_n, saved, c0, keep, zoneout_p, w_hh, gain_hh, gain_c, bias_c, lengths, grad_clip, record_flow):
    """Backward through time: ``d_ax (T, B, D*4H)`` (clamped with ``grad_clip``), ``d_r`` (the
    gradient of ``W_hh h_{t-1}``, same shape), ``dh0``, ``dc0``, the summed ``d_norm (D, 6, H)``
    fp32 and, with ``record_flow``, the squared norms ``||dL/dh_t||^2`` ``(D, T, B)``."""
    gates, r_hat, c, c_hat, stats = saved
    T, B, _ = gates.shape
    D, _, H = c0.shape
    d_ax, d_r = torch.empty_like(gates), torch.empty_like(gates)
    dh0, dc0 = torch.empty_like(c0), torch.empty_like(c0)
    if strategy(4, H, gates.dtype, B, D, gates.device, backward=True) == "persistent":
        return _layer_norm_lstm_bwd_persistent(dy, dh_n, dc_n, saved, c0, keep, zoneout_p, w_hh, gain_hh, gain_c, bias_c, lengths,
                                               grad_clip, record_flow)
    tiled = strategy(4, H, gates.dtype) == "tiled"
    d_norm = _norm_partials(D, B, H, gates.device)
    if tiled:
        d_norm.zero_()  # the tiled kernel adds into it step by step
    flow = flow_buffer(record_flow, D, T, B, gates.device)
    kernel = kernels.layer_norm_lstm_bwd_tiled_kernel if tiled else kernels.layer_norm_lstm_bwd_kernel
    # tiled scratch: dh ping-pong, dc, dL/dchat, the gate gradients times gain_hh (then d_r)
    scratch = _scratch((2, D, B, H), (D, B, H), (D, B, H), (D, B, 4 * H), device=gates.device) if tiled else []
    kernel[(triton.cdiv(B, BLOCK_B), D)](
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), gates, r_hat, c, c_hat, stats, c0.contiguous(),
        c if keep is None else keep.contiguous(), kernel_weight(w_hh), gain_hh.contiguous(), gain_c.contiguous(),
        bias_c.contiguous(), kernel_lengths(lengths, gates),
        d_ax, d_r, dh0, dc0, d_norm, d_norm if flow is None else flow, *scratch,
        T, B, H, D, float(zoneout_p), float(grad_clip or 0.0),
        CLIP=grad_clip is not None, RECORD_FLOW=record_flow, **_meta(4, H, gates.dtype, lengths, keep, zoneout_p),
    )
    count_launch("layer_norm_lstm_bwd_tiled" if tiled else "layer_norm_lstm_bwd")
    return d_ax, d_r, dh0, dc0, d_norm.sum(1), flow


def _layer_norm_lstm_bwd_persistent(dy, dh_n, dc_n, saved, c0, keep, zoneout_p, w_hh, gain_hh, gain_c, bias_c, lengths, grad_clip,
                                    record_flow):
    """:func:`layer_norm_lstm_bwd` on ``layer_norm_lstm_bwd_persistent_kernel`` (``3T + 1`` phases)."""
    gates, r_hat, c, c_hat, stats = saved
    T, B, _ = gates.shape
    D, _, H = c0.shape
    partition = persistent_plan(H, B, D, gates.dtype, gates.device)
    if partition.bwd_tiles != 1:
        raise ValueError(f"layer_norm_lstm_bwd: the persistent kernel holds one sub-tile of rows, and the plan for H {H}, B {B} walks "
                         f"{partition.bwd_tiles}: unset {STRATEGY_ENV}")
    slices = partition.slices
    d_ax, d_r = torch.empty_like(gates), torch.empty_like(gates)
    dh0, dc0 = torch.empty_like(c0), torch.empty_like(c0)
    d_norm = _norm_partials(D, B, H, gates.device).zero_()  # each program adds its units' sums step by step
    flow = flow_buffer(record_flow, D, T, B, gates.device)
    shares = None if flow is None else flow.new_zeros((slices, *flow.shape))
    args = [dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), gates, r_hat, c, c_hat, stats, c0.contiguous(),
            c if keep is None else keep.contiguous(), kernel_weight(w_hh), gain_hh.contiguous(), gain_c.contiguous(),
            bias_c.contiguous(), kernel_lengths(lengths, gates), d_ax, d_r, dh0, dc0, d_norm, d_norm if shares is None else shares]
    meta = dict(T=T, B=B, H=H, D=D, zoneout_p=float(zoneout_p), grad_clip=float(grad_clip or 0.0), HAS_LENGTHS=lengths is not None,
                ZONEOUT=zoneout_mode(keep, zoneout_p), CLIP=grad_clip is not None, RECORD_FLOW=record_flow,
                INPUT_PRECISION=input_precision(gates.dtype))
    if gates.dtype != torch.float32:
        meta["maxnreg"] = persistent.REGISTER_BUDGET
    # fp32 scratch: the partials of dh, the moments of the two norms' backward, (1 - k) dh_t and dL/dchat, e, the carried dh and dc
    f32 = torch.float32
    scratch = [((slices, D, B, H), f32), ((D, B, slices, 2), f32), ((D, B, slices, 2), f32), ((2, D, B, H), f32),
               ((D, B, 4 * H), f32), ((D, B, H), f32), ((D, B, H), f32)]
    persistent.launch("layer_norm_lstm_bwd", kernels.layer_norm_lstm_bwd_persistent_kernel, args, meta, gates=4, B=B, H=H, D=D,
                      dtype=gates.dtype, device=gates.device, phases=3 * T + 1, scratch=scratch)
    count_launch("layer_norm_lstm_bwd_persistent")
    if shares is not None:
        flow.copy_(shares.sum(0))
    return d_ax, d_r, dh0, dc0, d_norm.sum(1), flow


class LayerNormLSTMKernelFunction(torch.autograd.Function):
    """The LayerNormLSTM recurrence of one layer (every direction) on the kernels:
    ``(ax, w_hh, gain_hh, gain_c, bias_c, h0, c0) -> (y, h_n, c_n)``. ``flow_record``, a ``(D, T)``
    tensor, receives ``||dL/dh_t||`` per step in backward."""

    @staticmethod
    def forward(ctx, ax, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, keep, zoneout_p, grad_clip, flow_record):
        y, h_n, c_n, saved = layer_norm_lstm_fwd(ax, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, keep, zoneout_p)
        ctx.save_for_backward(y, *saved, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, keep)
        ctx.options = (zoneout_p, grad_clip, flow_record)
        return y, h_n, c_n

    @staticmethod
    def backward(ctx, dy, dh_n, dc_n):
        y, gates, r_hat, c, c_hat, stats, w_hh, gain_hh, gain_c, bias_c, h0, c0, lengths, keep = ctx.saved_tensors
        zoneout_p, grad_clip, flow_record = ctx.options
        D, _, H = h0.shape
        d_ax, d_r, dh0, dc0, d_norm, flow = layer_norm_lstm_bwd(
            dy, dh_n, dc_n, (gates, r_hat, c, c_hat, stats), c0, keep, zoneout_p, w_hh, gain_hh, gain_c, bias_c, lengths,
            grad_clip, flow_record is not None,
        )
        write_flow_record(flow_record, flow)
        d_w_hh = recurrent_weight_grad(d_r, previous_states(y, h0, lengths), D)
        d_gain_hh = d_norm[:, :4].reshape(D, 4 * H).to(gain_hh.dtype)
        return (d_ax, d_w_hh, d_gain_hh, d_norm[:, 4].to(gain_c.dtype), d_norm[:, 5].to(bias_c.dtype), dh0, dc0,
                None, None, None, None, None)


# -------------------------------------------------------------------------------- LayerNormGRU
def layer_norm_gru_fwd(ax, w_hh, gain_hh, b_hh, h0, lengths, keep, zoneout_p):
    """``ax (T, B, D*3H)``, ``w_hh (D, 3H, H)``, ``gain_hh``/``b_hh (D, 3H)``, ``h0 (D, B, H)``,
    ``keep (T, B, D*H)`` or None -> ``y (T, B, D*H)``, ``h_n (D, B, H)`` and the saved
    ``(gates, r_hat, stats)``."""
    T, B, _ = ax.shape
    D, _, H = h0.shape
    y = ax.new_empty((T, B, D * H))
    h_n = torch.empty_like(h0)
    gates = ax.new_empty((T, B, D * 4 * H))
    r_hat = torch.empty_like(ax)
    stats = torch.empty((T, B, D), device=ax.device, dtype=torch.float32)
    if strategy(3, H, ax.dtype, B, D, ax.device) == "persistent":
        _layer_norm_gru_fwd_persistent(ax, w_hh, gain_hh, b_hh, h0, lengths, keep, zoneout_p, (y, h_n, gates, r_hat, stats))
        return y, h_n, (gates, r_hat, stats)
    tiled = strategy(3, H, ax.dtype) == "tiled"
    kernel = kernels.layer_norm_gru_fwd_tiled_kernel if tiled else kernels.layer_norm_gru_fwd_kernel
    scratch = _scratch((2, D, B, H), (D, B, 3 * H), device=ax.device) if tiled else []  # h ping-pong, the raw products
    kernel[(triton.cdiv(B, BLOCK_B), D)](
        ax.contiguous(), kernel_weight(w_hh), gain_hh.contiguous(), b_hh.contiguous(), h0.contiguous(),
        kernel_lengths(lengths, ax), y if keep is None else keep.contiguous(),
        y, h_n, gates, r_hat, stats, *scratch,
        T, B, H, D, float(zoneout_p), **_meta(3, H, ax.dtype, lengths, keep, zoneout_p),
    )
    count_launch("layer_norm_gru_fwd_tiled" if tiled else "layer_norm_gru_fwd")
    return y, h_n, (gates, r_hat, stats)


def _layer_norm_gru_fwd_persistent(ax, w_hh, gain_hh, b_hh, h0, lengths, keep, zoneout_p, outputs):
    """:func:`layer_norm_gru_fwd` on ``layer_norm_gru_fwd_persistent_kernel`` (``fastrnn.ops.persistent.launch``:
    barrier or per-step mode), two phases per step; ``outputs`` ``(y, h_n, gates, r_hat, stats)``."""
    T, B, _ = ax.shape
    D, _, H = h0.shape
    slices = persistent_plan(H, B, D, ax.dtype, ax.device, gates=3).slices
    args = [ax.contiguous(), kernel_weight(w_hh), gain_hh.contiguous(), b_hh.contiguous(), h0.contiguous(),
            kernel_lengths(lengths, ax), outputs[0] if keep is None else keep.contiguous(), *outputs]
    # 16-bit: the product's k side split and the whole register budget, as the plain GRU's persistent forward
    meta = dict(T=T, B=B, H=H, D=D, zoneout_p=float(zoneout_p), HAS_LENGTHS=lengths is not None,
                ZONEOUT=zoneout_mode(keep, zoneout_p), INPUT_PRECISION=input_precision(ax.dtype),
                SPLIT_K=ax.dtype != torch.float32, **persistent.register_budget(ax.dtype))
    # fp32 scratch: the h ping-pong, the moments of r, the raw products
    f32 = torch.float32
    scratch = [((2, D, B, H), f32), ((D, B, slices, 2), f32), ((D, B, 3 * H), f32)]
    persistent.launch("layer_norm_gru_fwd", kernels.layer_norm_gru_fwd_persistent_kernel, args, meta, gates=3, B=B, H=H, D=D,
                      dtype=ax.dtype, device=ax.device, phases=2 * T, scratch=scratch, forward=True)
    count_launch("layer_norm_gru_fwd_persistent")


def layer_norm_gru_bwd(dy, dh_n, y, saved, h0, keep, zoneout_p, w_hh, gain_hh, lengths, grad_clip, record_flow):
    """Backward through time: ``d_ax (T, B, D*3H)``, ``d_r`` (the gradient of ``W_hh h_{t-1}``),
    ``dh0``, the summed ``d_norm (D, 6, H)`` fp32 (gains, then ``b_hh``) and, with ``record_flow``,
    ``||dL/dh_t||^2`` ``(D, T, B)``."""
    gates, r_hat, stats = saved
    T, B, _ = r_hat.shape
    D, _, H = h0.shape
    if strategy(3, H, y.dtype, B, D, y.device, backward=True) == "persistent":
        return _layer_norm_gru_bwd_persistent(dy, dh_n, y, saved, h0, keep, zoneout_p, w_hh, gain_hh, lengths, grad_clip, record_flow)
    d_ax, d_r = torch.empty_like(r_hat), torch.empty_like(r_hat)
    dh0 = torch.empty_like(h0)
    tiled = strategy(3, H, y.dtype) == "tiled"
    d_norm = _norm_partials(D, B, H, y.device)
    if tiled:
        d_norm.zero_()  # the tiled kernel adds into it step by step
    flow = flow_buffer(record_flow, D, T, B, y.device)
    kernel = kernels.layer_norm_gru_bwd_tiled_kernel if tiled else kernels.layer_norm_gru_bwd_kernel
    scratch = _scratch((2, D, B, H), (D, B, 3 * H), device=y.device) if tiled else []  # dh ping-pong, e then d_r
    kernel[(triton.cdiv(B, BLOCK_B), D)](
        dy.contiguous(), dh_n.contiguous(), y, gates, r_hat, stats, h0.contiguous(), y if keep is None else keep.contiguous(),
        kernel_weight(w_hh), gain_hh.contiguous(), kernel_lengths(lengths, y),
        d_ax, d_r, dh0, d_norm, d_norm if flow is None else flow, *scratch,
        T, B, H, D, float(zoneout_p), float(grad_clip or 0.0),
        CLIP=grad_clip is not None, RECORD_FLOW=record_flow, **_meta(3, H, y.dtype, lengths, keep, zoneout_p),
    )
    count_launch("layer_norm_gru_bwd_tiled" if tiled else "layer_norm_gru_bwd")
    return d_ax, d_r, dh0, d_norm.sum(1), flow


def _layer_norm_gru_bwd_persistent(dy, dh_n, y, saved, h0, keep, zoneout_p, w_hh, gain_hh, lengths, grad_clip, record_flow):
    """:func:`layer_norm_gru_bwd` on ``layer_norm_gru_bwd_persistent_kernel`` (``2T + 1`` phases)."""
    gates, r_hat, stats = saved
    T, B, _ = r_hat.shape
    D, _, H = h0.shape
    slices = persistent_plan(H, B, D, y.dtype, y.device, gates=3).slices
    d_ax, d_r = torch.empty_like(r_hat), torch.empty_like(r_hat)
    dh0 = torch.empty_like(h0)
    d_norm = _norm_partials(D, B, H, y.device).zero_()  # each program adds its units' sums step by step
    flow = flow_buffer(record_flow, D, T, B, y.device)
    shares = None if flow is None else flow.new_zeros((slices, *flow.shape))
    args = [dy.contiguous(), dh_n.contiguous(), y, gates, r_hat, stats, h0.contiguous(), y if keep is None else keep.contiguous(),
            kernel_weight(w_hh), gain_hh.contiguous(), kernel_lengths(lengths, y), d_ax, d_r, dh0, d_norm,
            d_norm if shares is None else shares]
    meta = dict(T=T, B=B, H=H, D=D, zoneout_p=float(zoneout_p), grad_clip=float(grad_clip or 0.0), HAS_LENGTHS=lengths is not None,
                ZONEOUT=zoneout_mode(keep, zoneout_p), CLIP=grad_clip is not None, RECORD_FLOW=record_flow,
                INPUT_PRECISION=input_precision(y.dtype), SPLIT_K=y.dtype != torch.float32, **persistent.register_budget(y.dtype))
    # fp32 scratch: e = d_b * gain_hh, the partial sums of the norm's backward, the carried part of dh
    f32 = torch.float32
    scratch = [((D, B, 3 * H), f32), ((D, B, slices, 2), f32), ((D, B, H), f32)]
    persistent.launch("layer_norm_gru_bwd", kernels.layer_norm_gru_bwd_persistent_kernel, args, meta, gates=3, B=B, H=H, D=D,
                      dtype=y.dtype, device=y.device, phases=2 * T + 1, scratch=scratch)
    count_launch("layer_norm_gru_bwd_persistent")
    if shares is not None:
        flow.copy_(shares.sum(0))
    return d_ax, d_r, dh0, d_norm.sum(1), flow


class LayerNormGRUKernelFunction(torch.autograd.Function):
    """The LayerNormGRU recurrence of one layer (every direction) on the kernels:
    ``(ax, w_hh, gain_hh, b_hh, h0) -> (y, h_n)``; ``flow_record`` as the LSTM's."""

    @staticmethod
    def forward(ctx, ax, w_hh, gain_hh, b_hh, h0, lengths, keep, zoneout_p, grad_clip, flow_record):
        y, h_n, saved = layer_norm_gru_fwd(ax, w_hh, gain_hh, b_hh, h0, lengths, keep, zoneout_p)
        ctx.save_for_backward(y, *saved, w_hh, gain_hh, b_hh, h0, lengths, keep)
        ctx.options = (zoneout_p, grad_clip, flow_record)
        return y, h_n

    @staticmethod
    def backward(ctx, dy, dh_n):
        y, gates, r_hat, stats, w_hh, gain_hh, b_hh, h0, lengths, keep = ctx.saved_tensors
        zoneout_p, grad_clip, flow_record = ctx.options
        D, _, H = h0.shape
        d_ax, d_r, dh0, d_norm, flow = layer_norm_gru_bwd(
            dy, dh_n, y, (gates, r_hat, stats), h0, keep, zoneout_p, w_hh, gain_hh, lengths, grad_clip, flow_record is not None
        )
        write_flow_record(flow_record, flow)
        d_w_hh = recurrent_weight_grad(d_r, previous_states(y, h0, lengths), D)
        d_gain_hh = d_norm[:, :3].reshape(D, 3 * H).to(gain_hh.dtype)
        d_b_hh = d_norm[:, 3:].reshape(D, 3 * H).to(b_hh.dtype)
        return d_ax, d_w_hh, d_gain_hh, d_b_hh, dh0, None, None, None, None, None


# ------------------------------------------------------------------------------------- layers
def _input_side(x: Tensor, params: list[dict], dtype: torch.dtype, fold_hidden_bias: bool) -> Tensor:
    """:func:`fastrnn.layer_norm_rnn.input_side` of every direction, side by side: ``(T, B, D*G*H)``."""
    return torch.cat([input_side(x.to(dtype), {k: v.to(dtype) for k, v in p.items()}, fold_hidden_bias) for p in params],
                     dim=-1).to(dtype)


def _stacked(params: list[dict], key: str, dtype: torch.dtype) -> Tensor:
    return torch.stack([p[key].to(dtype) for p in params])


def layer_norm_lstm_kernel_layer(x, h0, c0, params, lengths, zoneout_mask, zoneout_p, grad_clip, flow_record):
    """One LayerNormLSTM layer, every direction in one launch each way; the signature of
    :func:`fastrnn.layer_norm_rnn.layer_norm_lstm_layer` without ``fast``. ``params[d]`` holds
    ``weight_ih``, ``weight_hh`` (DropConnected already), ``gain_ih``, ``gain_hh``, ``gain_cell``,
    ``bias_cell`` and the biases (or none). Returns ``y (T, B, D*H)``, ``h_n``, ``c_n (D, B, H)``."""
    dtype = compute_dtype(x)
    ax = _input_side(x, params, dtype, fold_hidden_bias=True)
    keep = None if zoneout_mask is None else zoneout_mask.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return LayerNormLSTMKernelFunction.apply(
            ax, _stacked(params, "weight_hh", dtype), _stacked(params, "gain_hh", dtype), _stacked(params, "gain_cell", dtype),
            _stacked(params, "bias_cell", dtype), h0.to(dtype), c0.to(dtype), lengths, keep, zoneout_p, grad_clip, flow_record,
        )


def layer_norm_gru_kernel_layer(x, h0, params, lengths, zoneout_mask, zoneout_p, grad_clip, flow_record):
    """One LayerNormGRU layer, every direction in one launch each way (``b_hh`` zeros without
    bias). Returns ``y (T, B, D*H)``, ``h_n (D, B, H)``."""
    dtype = compute_dtype(x)
    ax = _input_side(x, params, dtype, fold_hidden_bias=False)
    keep = None if zoneout_mask is None else zoneout_mask.to(dtype)
    if params[0].get("bias_hh") is not None:
        b_hh = _stacked(params, "bias_hh", dtype)
    else:
        b_hh = ax.new_zeros((len(params), ax.shape[-1] // len(params)))
    with torch.autocast(x.device.type, enabled=False):
        return LayerNormGRUKernelFunction.apply(
            ax, _stacked(params, "weight_hh", dtype), _stacked(params, "gain_hh", dtype), b_hh, h0.to(dtype), lengths, keep,
            zoneout_p, grad_clip, flow_record,
        )
