"""Free-running Elman generation on the fused kernels of ``fastrnn.kernels.feedback``.

One launch runs the whole generation forward (recurrence, output head, feedback of each output
as the next input) and one launch runs it backward (backpropagation through time with the extra
``dy_t -> dx_{t+1}`` edge). The weight gradients are GEMMs on the host over the per-step gradients
the backward kernel writes::

    dW_ih = sum_t g_t^T x_t     (x_0 = x0, x_t = y_{t-1})      db    = sum_t g_t
    dW_hh = sum_t g_t^T h_{t-1} (h_{-1} = h0)
    dW_out = sum_t dz_t^T h_t                                  db_out = sum_t dz_t

Read top to bottom: the size limits (``supports``), forward and backward launchers,
``RNNFeedbackFunction``, ``rnn_generate`` (what :mod:`fastrnn.topologies` calls).

Served: one unidirectional Elman layer (any nonlinearity of ``fastrnn.ops.rnn``, optional
``grad_clip``) with a ``Linear`` head and an identity, tanh or sigmoid output activation, the
three weight matrices resident on chip: ``H`` and ``O`` up to the limits of ``MAX_BLOCK``.
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from fastrnn.kernels import feedback as kernels
from fastrnn.ops.recurrence import BLOCK_B, compute_dtype, count_launch, input_precision, kernel_weight, triton_next_power_of_2
from fastrnn.ops.rnn import NEEDS_PRE, NONLINEARITIES

#: Output activation name -> the kernels' ``HEAD`` code.
HEADS = {"identity": 0, "tanh": 1, "sigmoid": 2}

#: Largest (BLOCK_H, BLOCK_O) kept on chip, by fp32?. From ahead-of-time compiles (triton 3.9,
#: gelu + sigmoid head + clip, the heaviest form): no spills on sm_90 or sm_80 at 8 warps; bf16
#: (128, 128) takes 228 registers forward and 226 backward, fp32 (64, 64) 112 and 72 (fp32 ``ieee``
#: dots keep the weights in shared memory: 79 KB backward). Blocks up to (32, 32) run 4 warps.
#: ``tests/test_topologies.py`` recompiles the corners (``compile_corners``) for sm_90.
MAX_BLOCK = {False: (128, 128), True: (64, 64)}


def blocks(hidden: int, output: int) -> tuple[int, int]:
    """``BLOCK_H``, ``BLOCK_O``: the sizes rounded up to a power of two, at least 16 (``tl.dot``)."""
    return max(16, triton_next_power_of_2(hidden)), max(16, triton_next_power_of_2(output))


def supports(hidden: int, output: int, dtype: torch.dtype) -> bool:
    """True for fp32, fp16 and bf16 when one program can hold ``W_ih``, ``W_hh`` and ``W_out`` on chip."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    block_h, block_o = blocks(hidden, output)
    max_h, max_o = MAX_BLOCK[dtype == torch.float32]
    return block_h <= max_h and block_o <= max_o


def num_warps(block_h: int, block_o: int) -> int:
    return 4 if block_h <= 32 and block_o <= 32 else 8


def compile_corners() -> list[tuple[torch.dtype, int, int, int]]:
    """``(dtype, BLOCK_H, BLOCK_O, num_warps)``: the largest blocks at each warp count, per dtype."""
    corners = []
    for dtype in (torch.float32, torch.bfloat16):
        block_h, block_o = MAX_BLOCK[dtype == torch.float32]
        corners += [(dtype, block_h, block_o, num_warps(block_h, block_o)), (dtype, 32, 32, num_warps(32, 32))]
    return corners


def _meta(H: int, O: int, dtype: torch.dtype, nonlinearity: str, head: str) -> dict:
    block_h, block_o = blocks(H, O)
    return dict(
        NONLINEARITY=NONLINEARITIES[nonlinearity], HEAD=HEADS[head], SAVE_PRE=nonlinearity in NEEDS_PRE,
        INPUT_PRECISION=input_precision(dtype), BLOCK_B=BLOCK_B, BLOCK_H=block_h, BLOCK_O=block_o,
        num_warps=num_warps(block_h, block_o),
    )


def feedback_fwd(x0: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor, w_out: Tensor, b_out: Tensor, steps: int, nonlinearity: str, head: str):
    """``x0 (B, O)``, ``h0 (B, H)``, ``w_ih (H, O)``, ``w_hh (H, H)``, ``b (H,)``, ``w_out (O, H)``,
    ``b_out (O,)`` -> ``y (T, B, O)``, ``h (T, B, H)``, ``pre (T, B, H)`` or None, ``h_n (B, H)``."""
    B, O = x0.shape
    H = h0.shape[1]
    y = x0.new_empty((steps, B, O))
    h = h0.new_empty((steps, B, H))
    pre = h0.new_empty((steps, B, H)) if nonlinearity in NEEDS_PRE else None
    h_n = torch.empty_like(h0)
    if B == 0:
        return y, h, pre, h_n
    kernels.rnn_feedback_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        x0.contiguous(), h0.contiguous(), kernel_weight(w_ih), kernel_weight(w_hh), b.contiguous(), kernel_weight(w_out), b_out.contiguous(),
        y, h, h if pre is None else pre, h_n,
        steps, B, H, O, **_meta(H, O, x0.dtype, nonlinearity, head),
    )
    count_launch("rnn_feedback_fwd")
    return y, h, pre, h_n


def feedback_bwd(dy: Tensor, dh_n: Tensor, y: Tensor, h: Tensor, pre: Tensor | None, w_ih: Tensor, w_hh: Tensor, w_out: Tensor,
                 nonlinearity: str, head: str, grad_clip: float | None):
    """Backward through time and feedback: ``dz (T, B, O)`` (gradient of the head's pre-activations),
    ``g (T, B, H)`` (of the cell's, clipped with ``grad_clip``), ``dx0 (B, O)``, ``dh0 (B, H)``."""
    T, B, O = y.shape
    H = h.shape[2]
    dz = torch.empty_like(y)
    g = torch.empty_like(h)
    dx0 = y.new_empty((B, O))
    dh0 = torch.empty_like(dh_n)
    if B == 0:
        return dz, g, dx0, dh0
    kernels.rnn_feedback_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        dy.contiguous(), dh_n.contiguous(), y, h, h if pre is None else pre,
        kernel_weight(w_ih), kernel_weight(w_hh), kernel_weight(w_out), dz, g, dx0, dh0,
        T, B, H, O, float(grad_clip or 0.0), CLIP=grad_clip is not None, **_meta(H, O, y.dtype, nonlinearity, head),
    )
    count_launch("rnn_feedback_bwd")
    return dz, g, dx0, dh0


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


class RNNFeedbackFunction(torch.autograd.Function):
    """``(x0, h0, w_ih, w_hh, b, w_out, b_out) -> (y (T, B, O), h_n (B, H))`` for ``T = steps``."""

    @staticmethod
    def forward(ctx, x0, h0, w_ih, w_hh, b, w_out, b_out, steps, nonlinearity, head, grad_clip):
        y, h, pre, h_n = feedback_fwd(x0, h0, w_ih, w_hh, b, w_out, b_out, steps, nonlinearity, head)
        ctx.save_for_backward(x0, h0, w_ih, w_hh, w_out, y, h, pre)
        ctx.nonlinearity, ctx.head, ctx.grad_clip = nonlinearity, head, grad_clip
        return y, h_n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_n):
        x0, h0, w_ih, w_hh, w_out, y, h, pre = ctx.saved_tensors
        dz, g, dx0, dh0 = feedback_bwd(dy, dh_n, y, h, pre, w_ih, w_hh, w_out, ctx.nonlinearity, ctx.head, ctx.grad_clip)
        inputs = torch.cat([x0[None], y[:-1]])  # x_t: x0, then each output fed back
        previous = torch.cat([h0[None], h[:-1]])  # h_{t-1}
        g2, dz2 = _flat(g), _flat(dz)
        dw_ih = g2.t() @ _flat(inputs)
        dw_hh = g2.t() @ _flat(previous)
        dw_out = dz2.t() @ _flat(h)
        return dx0, dh0, dw_ih, dw_hh, g2.sum(0), dw_out, dz2.sum(0), None, None, None, None


def rnn_generate(x0: Tensor, h0: Tensor, params: dict, head, nonlinearity: str, steps: int, grad_clip: float | None = None):
    """Generate ``steps`` outputs: ``x0 (B, O)``, ``h0 (B, H)``, ``params`` of the layer's one
    direction (``w_ih, w_hh, b_ih, b_hh``), ``head`` a :class:`fastrnn.topologies.OutputHead`
    with ``head.kind`` in ``HEADS``. Returns ``y (B, steps, O)`` (batch-first) and ``h_n (B, H)``."""
    dtype = compute_dtype(x0)
    H = params["w_hh"].shape[0]
    if params["b_ih"] is not None:
        b = params["b_ih"] + params["b_hh"]
    else:
        b = torch.zeros(H, device=x0.device, dtype=dtype)
    w_out, b_out = head.linear.weight, head.linear.bias
    if b_out is None:
        b_out = torch.zeros(w_out.shape[0], device=x0.device, dtype=dtype)
    cast = [t.to(dtype) for t in (x0, h0, params["w_ih"], params["w_hh"], b, w_out, b_out)]
    with torch.autocast(x0.device.type, enabled=False):
        y, h_n = RNNFeedbackFunction.apply(*cast, steps, nonlinearity, head.kind, grad_clip)
    return y.transpose(0, 1), h_n
