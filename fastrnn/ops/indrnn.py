"""IndRNN on the fused scan kernels of ``fastrnn.kernels.indrnn``.

Read top to bottom: the block sizes, forward launcher, backward launcher, ``IndRNNFunction``,
``indrnn_layer`` (which, while ``torch.compile`` traces, calls the registered operator of
:mod:`fastrnn.indrnn_op` instead of the Function). The input projection (with both biases folded
in) is one GEMM before the launch; its gradient flows back by ordinary autograd from ``dgx``. The gradient of ``u`` is
reduced in the backward kernel per batch tile, and the tiles are summed here.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from fastrnn.indrnn_op import indrnn_recurrence
from fastrnn.kernels import indrnn as kernels
from fastrnn.ops.recurrence import compute_dtype, count_launch, input_projection, kernel_lengths, write_flow_record

#: Nonlinearity name -> the kernels' code (``fastrnn.kernels.activations``).
NONLINEARITIES = {"tanh": 0, "relu": 1}
#: Tile of (rows, units) per program, and its warps. Not tuned on a GPU yet: a tile of 8 x 64
#: gives B64 H1024 128 programs, about one per SM of an H100/H200.
BLOCK_B, BLOCK_H, NUM_WARPS = 8, 64, 4


def blocks(B: int, H: int) -> tuple[int, int]:
    """The tile ``(BLOCK_B, BLOCK_H)``: powers of two, no wider than needed."""
    return min(BLOCK_B, triton.next_power_of_2(max(B, 1))), min(BLOCK_H, max(16, triton.next_power_of_2(H)))


def zoneout_mode(keep: Tensor | None, zoneout_p: float) -> int:
    """0 no zoneout, 1 training (a mask), 2 eval (the expectation with ``zoneout_p``)."""
    if keep is not None:
        return 1
    return 2 if zoneout_p else 0


def indrnn_fwd(
    gx: Tensor, u: Tensor, h0: Tensor, lengths: Tensor | None, keep: Tensor | None, zoneout_p: float, nonlinearity: str,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``gx (T, B, D*H)``, ``u (D, H)``, ``h0 (D, B, H)``, ``keep (T, B, D*H)`` or None ->
    ``y (T, B, D*H)``, ``h_n (D, B, H)``, and with zoneout the candidates ``(T, B, D*H)``."""
    T, B, _ = gx.shape
    D, _, H = h0.shape
    mode = zoneout_mode(keep, zoneout_p)
    y = torch.empty_like(gx)
    h_n = torch.empty_like(h0)
    cand = torch.empty_like(gx) if mode else None
    if B == 0:
        return y, h_n, cand
    block_b, block_h = blocks(B, H)
    grid = (triton.cdiv(B, block_b), triton.cdiv(H, block_h), D)
    kernels.indrnn_fwd_kernel[grid](
        gx.contiguous(), u.contiguous(), h0.contiguous(), kernel_lengths(lengths, gx), y if keep is None else keep.contiguous(),
        y, h_n, y if cand is None else cand,
        T, B, H, D, float(zoneout_p),
        NONLINEARITY=NONLINEARITIES[nonlinearity], HAS_LENGTHS=lengths is not None, ZONEOUT=mode,
        BLOCK_B=block_b, BLOCK_H=block_h, num_warps=NUM_WARPS,
    )
    count_launch("indrnn_fwd")
    return y, h_n, cand


def indrnn_bwd(
    dy: Tensor, dh_n: Tensor, y: Tensor, cand: Tensor | None, keep: Tensor | None, zoneout_p: float, u: Tensor, h0: Tensor,
    lengths: Tensor | None, nonlinearity: str, grad_clip: float | None = None, record_flow: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Backward scan: ``dgx (T, B, D*H)`` (the pre-activation gradient, clamped with ``grad_clip``),
    ``dh0 (D, B, H)``, ``du (D, H)`` fp32, and with ``record_flow`` the squared norms
    ``||dL/dh_t||^2`` per direction, step and row ``(D, T, B)``."""
    T, B, _ = y.shape
    D, _, H = dh_n.shape
    block_b, block_h = blocks(B, H)
    tiles_b, tiles_h = triton.cdiv(B, block_b), triton.cdiv(H, block_h)
    dgx = torch.empty_like(y)
    dh0 = torch.empty_like(dh_n)
    du = torch.zeros((D, tiles_b, H), device=y.device, dtype=torch.float32)
    flow = torch.zeros((D, T, B, tiles_h), device=y.device, dtype=torch.float32) if record_flow else None
    if B > 0:
        kernels.indrnn_bwd_kernel[(tiles_b, tiles_h, D)](
            dy.contiguous(), dh_n.contiguous(), y, y if cand is None else cand, y if keep is None else keep.contiguous(),
            u.contiguous(), h0.contiguous(), kernel_lengths(lengths, y), dgx, dh0, du, du if flow is None else flow,
            T, B, H, D, float(zoneout_p), float(grad_clip or 0.0),
            NONLINEARITY=NONLINEARITIES[nonlinearity], HAS_LENGTHS=lengths is not None, ZONEOUT=zoneout_mode(keep, zoneout_p),
            CLIP=grad_clip is not None, RECORD_FLOW=record_flow,
            BLOCK_B=block_b, BLOCK_H=block_h, num_warps=NUM_WARPS,
        )
        count_launch("indrnn_bwd")
    return dgx, dh0, du.sum(1), (None if flow is None else flow.sum(-1))


class IndRNNFunction(torch.autograd.Function):
    """The IndRNN recurrence of one layer (every direction): ``(gx, u, h0) -> (y, h_n)``.
    ``flow_record``, a ``(D, T)`` tensor, receives ``||dL/dh_t||`` per step in backward."""

    @staticmethod
    def forward(ctx, gx, u, h0, lengths, keep, zoneout_p, nonlinearity, grad_clip, flow_record):
        y, h_n, cand = indrnn_fwd(gx, u, h0, lengths, keep, zoneout_p, nonlinearity)
        ctx.save_for_backward(y, cand, keep, u, h0, lengths)
        ctx.zoneout_p, ctx.nonlinearity, ctx.grad_clip, ctx.flow_record = zoneout_p, nonlinearity, grad_clip, flow_record
        return y, h_n

    @staticmethod
    def backward(ctx, dy, dh_n):
        y, cand, keep, u, h0, lengths = ctx.saved_tensors
        dgx, dh0, du, flow = indrnn_bwd(
            dy, dh_n, y, cand, keep, ctx.zoneout_p, u, h0, lengths, ctx.nonlinearity, ctx.grad_clip, ctx.flow_record is not None
        )
        write_flow_record(ctx.flow_record, flow)
        return dgx, du.to(u.dtype), dh0, None, None, None, None, None, None


def indrnn_layer(
    x: Tensor, h0: Tensor, params: list[dict], lengths: Tensor | None, nonlinearity: str, zoneout_mask: Tensor | None = None,
    zoneout_p: float = 0.0, grad_clip: float | None = None, flow_record: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One IndRNN layer, every direction in one launch: ``x (T, B, I)``, ``h0 (D, B, H)``,
    ``params[d]`` with ``weight_ih (H, I)``, ``weight_hh (H,)``, ``bias_ih``, ``bias_hh`` (or
    without biases), ``zoneout_mask (T, B, D*H)`` in training. Returns ``y (T, B, D*H)``, ``h_n``."""
    dtype = compute_dtype(x)
    gx = input_projection(x, [{"w_ih": p["weight_ih"], "b_ih": p.get("bias_ih"), "b_hh": p.get("bias_hh")} for p in params],
                          dtype, fold_hidden_bias=True)
    u = torch.stack([p["weight_hh"].to(dtype) for p in params])
    keep = None if zoneout_mask is None else zoneout_mask.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():  # one registered operator Dynamo traces (its kernels run inside)
            return indrnn_recurrence(gx, u, h0.to(dtype).contiguous(), lengths, keep, zoneout_p, nonlinearity, grad_clip, True)
        return IndRNNFunction.apply(gx, u, h0.to(dtype), lengths, keep, zoneout_p, nonlinearity, grad_clip, flow_record)
