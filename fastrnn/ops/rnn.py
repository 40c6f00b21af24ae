"""Elman RNN (tanh, relu) on the fused kernels of ``fastrnn.kernels.rnn``.

Read top to bottom: forward launcher, backward launcher, ``RNNFunction``, ``rnn_layer``.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from fastrnn.kernels import rnn as kernels
from fastrnn.ops.recurrence import (
    LAUNCHES,
    compute_dtype,
    input_precision,
    input_projection,
    kernel_lengths,
    kernel_weight,
    plan,
    previous_states,
    recurrent_weight_grad,
    stack_params,
)

NONLINEARITIES = {"tanh": 0, "relu": 1}


def _launch(name: str, resident_kernel, tiled_kernel, args: list, scratch_like: Tensor, *, B: int, H: int, D: int, T: int, nonlinearity: str, has_lengths: bool, dtype: torch.dtype):
    p = plan(1, H, dtype)
    grid = (triton.cdiv(B, p.block_b), D)
    meta = dict(
        T=T, B=B, H=H, D=D,
        NONLINEARITY=NONLINEARITIES[nonlinearity], HAS_LENGTHS=has_lengths, INPUT_PRECISION=input_precision(dtype),
        BLOCK_B=p.block_b, BLOCK_H=p.block_h, num_warps=p.num_warps, num_stages=p.num_stages,
    )
    if p.strategy == "resident":
        resident_kernel[grid](*args, **meta)
    else:
        scratch = torch.empty((2, D, B, H), device=scratch_like.device, dtype=torch.float32)
        tiled_kernel[grid](*args, scratch, **meta)
    LAUNCHES[f"{name}_{p.strategy}"] += 1


def rnn_fwd(gx: Tensor, w_hh: Tensor, h0: Tensor, lengths: Tensor | None, nonlinearity: str) -> tuple[Tensor, Tensor]:
    """``gx (T, B, D*H)``, ``w_hh (D, H, H)``, ``h0 (D, B, H)`` -> ``y (T, B, D*H)``, ``h_n (D, B, H)``."""
    T, B, _ = gx.shape
    D, _, H = h0.shape
    y = torch.empty_like(gx)
    h_n = torch.empty_like(h0)
    if B == 0:
        return y, h_n
    _launch(
        "rnn_fwd", kernels.rnn_fwd_resident_kernel, kernels.rnn_fwd_tiled_kernel,
        [gx.contiguous(), kernel_weight(w_hh), h0.contiguous(), kernel_lengths(lengths, gx), y, h_n], gx,
        B=B, H=H, D=D, T=T, nonlinearity=nonlinearity, has_lengths=lengths is not None, dtype=gx.dtype,
    )
    return y, h_n


def rnn_bwd(dy: Tensor, dh_n: Tensor, y: Tensor, w_hh: Tensor, lengths: Tensor | None, nonlinearity: str) -> tuple[Tensor, Tensor]:
    """Backward through time: ``dgx (T, B, D*H)`` (gradient of the pre-activations) and ``dh0 (D, B, H)``."""
    T, B, _ = y.shape
    D, _, H = dh_n.shape
    dgx = torch.empty_like(y)
    dh0 = torch.empty_like(dh_n)
    if B == 0:
        return dgx, dh0
    _launch(
        "rnn_bwd", kernels.rnn_bwd_resident_kernel, kernels.rnn_bwd_tiled_kernel,
        [dy.contiguous(), dh_n.contiguous(), y, kernel_weight(w_hh), kernel_lengths(lengths, y), dgx, dh0], y,
        B=B, H=H, D=D, T=T, nonlinearity=nonlinearity, has_lengths=lengths is not None, dtype=y.dtype,
    )
    return dgx, dh0


class RNNFunction(torch.autograd.Function):
    """The Elman recurrence of one layer (every direction): ``(gx, w_hh, h0) -> (y, h_n)``.

    The weight gradient ``dW_hh = sum_t g_t^T h_{t-1}`` is one batched GEMM after the backward
    kernel; ``dgx`` flows back through the input projection GEMM by ordinary autograd.
    """

    @staticmethod
    def forward(ctx, gx: Tensor, w_hh: Tensor, h0: Tensor, lengths: Tensor | None, nonlinearity: str):
        y, h_n = rnn_fwd(gx, w_hh, h0, lengths, nonlinearity)
        ctx.save_for_backward(y, w_hh, h0, lengths)
        ctx.nonlinearity = nonlinearity
        return y, h_n

    @staticmethod
    def backward(ctx, dy: Tensor, dh_n: Tensor):
        y, w_hh, h0, lengths = ctx.saved_tensors
        dgx, dh0 = rnn_bwd(dy, dh_n, y, w_hh, lengths, ctx.nonlinearity)
        dw_hh = recurrent_weight_grad(dgx, previous_states(y, h0, lengths), h0.shape[0]) if ctx.needs_input_grad[1] else None
        return dgx, dw_hh, dh0, None, None


def rnn_layer(cell: str, x: Tensor, h0: Tensor, c0: Tensor | None, params: list[dict], lengths: Tensor | None, nonlinearity: str):
    """One Elman layer, every direction in one launch; the signature of
    :func:`fastrnn.reference.reference_layer`. Returns ``y (T, B, D*H)``, ``h_n (D, B, H)``, None."""
    dtype = compute_dtype(x)
    gx = input_projection(x, params, dtype, fold_hidden_bias=True)
    w_hh = stack_params(params, "w_hh", dtype)
    with torch.autocast(x.device.type, enabled=False):
        y, h_n = RNNFunction.apply(gx, w_hh, h0.to(dtype), lengths, nonlinearity)
    return y, h_n, None
