"""Free-running generation (Elman, GRU, LSTM) on the fused kernels of ``fastrnn.kernels.feedback``.

One launch runs the whole generation forward (recurrence, output head, feedback of each output
as the next input) and one launch runs it backward (backpropagation through time with the extra
``dy_t -> dx_{t+1}`` edge). The weight gradients are GEMMs on the host over the per-step gradients
the backward kernel writes::

    dW_ih = sum_t g_t^T x_t     (x_0 = x0, x_t = y_{t-1})      db    = sum_t g_t
    dW_hh = sum_t g_t^T h_{t-1} (h_{-1} = h0)
    dW_out = sum_t dz_t^T h_t                                  db_out = sum_t dz_t

Read top to bottom: the size limits (``supports``), forward and backward launchers,
``RNNFeedbackFunction``, ``rnn_generate``; then the same for GRU and LSTM and ``generate`` (what
:mod:`fastrnn.topologies` calls).

GRU and LSTM (``GRUFeedbackFunction``, ``LSTMFeedbackFunction``, and ``generate``, the entry
for every cell) follow the same plan: the backward kernel writes the gate pre-activation gradients
of every step and the host takes ``dW_ih``, ``dW_hh``, the biases and the head from them (GRU:
``dgh = [dr, dz, dn * r]`` for ``W_hh``, ``b_hh``).

Served: one unidirectional Elman layer (any nonlinearity of ``fastrnn.ops.rnn``), GRU or LSTM
layer (no projection), optional ``grad_clip``, with a ``Linear`` head and an identity, tanh or
sigmoid output activation, the weight matrices resident on chip: ``H`` and ``O`` up to the limits
of ``MAX_BLOCKS[cell]``.
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

#: Largest (BLOCK_H, BLOCK_O) kept on chip, by cell and fp32?. From ahead-of-time compiles (triton 3.9,
#: gelu + sigmoid head + clip, the heaviest form): no spills on sm_90 or sm_80 at 8 warps; bf16
#: (128, 128) takes 228 registers forward and 226 backward, fp32 (64, 64) 112 and 72 (fp32 ``ieee``
#: dots keep the weights in shared memory: 79 KB backward). Blocks up to (32, 32) run 4 warps.
#: GRU and LSTM hold seven and nine matrices: kept at (64, 64) 16-bit and (32, 32) fp32. sm_90,
#: clip + sigmoid head, no spills: bf16 (64, 64) on 8 warps GRU 183/227 registers fwd/bwd, LSTM
#: 208/246; bf16 (32, 32) on 4 warps GRU 148/182, LSTM 152/244; fp32 (32, 32) needs 8 warps (the
#: LSTM forward spills on 4): GRU 128/74, LSTM 142/56; fp32 (16, 16) on 4 warps at most 128.
#: The compile gate (``python -m fastrnn.ops.aot``, ``tests/test_kernel_compile.py``) compiles the corners
#: (``compile_corners``) as they launch; ``bench/results/aot-compile.md`` holds the current figures.
MAX_BLOCKS = {
    "rnn": {False: (128, 128), True: (64, 64)},
    "gru": {False: (64, 64), True: (32, 32)},
    "lstm": {False: (64, 64), True: (32, 32)},
}
MAX_BLOCK = MAX_BLOCKS["rnn"]

#: Cells the fused generation serves.
CELLS = tuple(MAX_BLOCKS)


def blocks(hidden: int, output: int) -> tuple[int, int]:
    """``BLOCK_H``, ``BLOCK_O``: the sizes rounded up to a power of two, at least 16 (``tl.dot``)."""
    return max(16, triton_next_power_of_2(hidden)), max(16, triton_next_power_of_2(output))


def supports(hidden: int, output: int, dtype: torch.dtype, cell: str = "rnn") -> bool:
    """True for fp32, fp16 and bf16 when one program can hold the cell's ``W_ih``, ``W_hh`` and
    ``W_out`` on chip (``cell``: ``"rnn"``, ``"gru"`` or ``"lstm"``)."""
    if cell not in MAX_BLOCKS or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return False
    block_h, block_o = blocks(hidden, output)
    max_h, max_o = MAX_BLOCKS[cell][dtype == torch.float32]
    return block_h <= max_h and block_o <= max_o


def num_warps(block_h: int, block_o: int, cell: str = "rnn", fp32: bool = False) -> int:
    """4 up to (32, 32), else 8; GRU/LSTM fp32 run 8 at (16, 16) and 16 from a 32 block on (fewer
    warps leave a stack frame on sm_90 in some form on triton 3.6 or 3.9: the compile gate)."""
    if cell != "rnn" and fp32:
        return 16 if max(block_h, block_o) >= 32 else 8
    return 4 if block_h <= 32 and block_o <= 32 else 8


def compile_corners(cell: str = "rnn") -> list[tuple[torch.dtype, int, int, int]]:
    """``(dtype, BLOCK_H, BLOCK_O, num_warps)``: the largest blocks at each warp count, per dtype."""
    corners = []
    for dtype in (torch.float32, torch.bfloat16):
        fp32 = dtype == torch.float32
        block_h, block_o = MAX_BLOCKS[cell][fp32]
        small = 16 if cell != "rnn" and fp32 else 32  # the smaller corner (the largest block on 4 warps for the Elman cell)
        for bh, bo in ((block_h, block_o), (small, small)):
            corner = (dtype, bh, bo, num_warps(bh, bo, cell, fp32))
            if corner not in corners:
                corners.append(corner)
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
    w_out, b_out = head.weight, head.bias
    if b_out is None:
        b_out = torch.zeros(w_out.shape[0], device=x0.device, dtype=dtype)
    cast = [t.to(dtype) for t in (x0, h0, params["w_ih"], params["w_hh"], b, w_out, b_out)]
    with torch.autocast(x0.device.type, enabled=False):
        y, h_n = RNNFeedbackFunction.apply(*cast, steps, nonlinearity, head.kind, grad_clip)
    return y.transpose(0, 1), h_n


# ------------------------------------------------------------------------------------ GRU, LSTM
def _gated_meta(cell: str, H: int, O: int, dtype: torch.dtype, head: str) -> dict:
    block_h, block_o = blocks(H, O)
    return dict(
        HEAD=HEADS[head], INPUT_PRECISION=input_precision(dtype), BLOCK_B=BLOCK_B, BLOCK_H=block_h, BLOCK_O=block_o,
        num_warps=num_warps(block_h, block_o, cell, dtype == torch.float32),
    )


def gru_feedback_fwd(x0: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, w_out: Tensor, b_out: Tensor,
                     steps: int, head: str):
    """``x0 (B, O)``, ``h0 (B, H)``, ``w_ih (3H, O)``, ``w_hh (3H, H)``, ``b_ih``, ``b_hh (3H,)``,
    ``w_out (O, H)``, ``b_out (O,)`` -> ``y (T, B, O)``, ``h (T, B, H)``, ``saved (T, B, 4H)``."""
    B, O = x0.shape
    H = h0.shape[1]
    y = x0.new_empty((steps, B, O))
    h = h0.new_empty((steps, B, H))
    saved = h0.new_empty((steps, B, 4 * H))
    if B == 0:
        return y, h, saved
    kernels.gru_feedback_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        x0.contiguous(), h0.contiguous(), kernel_weight(w_ih), kernel_weight(w_hh), b_ih.contiguous(), b_hh.contiguous(),
        kernel_weight(w_out), b_out.contiguous(), y, h, saved,
        steps, B, H, O, **_gated_meta("gru", H, O, x0.dtype, head),
    )
    count_launch("gru_feedback_fwd")
    return y, h, saved


def gru_feedback_bwd(dy: Tensor, dh_n: Tensor, h0: Tensor, y: Tensor, h: Tensor, saved: Tensor, w_ih: Tensor, w_hh: Tensor, w_out: Tensor,
                     head: str, grad_clip: float | None):
    """-> ``dz (T, B, O)``, ``dgx (T, B, 3H)`` (gate pre-activation gradients, clipped),
    ``dghn (T, B, H)`` (of ``gh_n``), ``dx0 (B, O)``, ``dh0 (B, H)``."""
    T, B, O = y.shape
    H = h.shape[2]
    dz = torch.empty_like(y)
    dgx = h.new_empty((T, B, 3 * H))
    dghn = torch.empty_like(h)
    dx0 = y.new_empty((B, O))
    dh0 = torch.empty_like(dh_n)
    if B == 0:
        return dz, dgx, dghn, dx0, dh0
    kernels.gru_feedback_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        dy.contiguous(), dh_n.contiguous(), h0.contiguous(), y, h, saved,
        kernel_weight(w_ih), kernel_weight(w_hh), kernel_weight(w_out), dz, dgx, dghn, dx0, dh0,
        T, B, H, O, float(grad_clip or 0.0), CLIP=grad_clip is not None, **_gated_meta("gru", H, O, y.dtype, head),
    )
    count_launch("gru_feedback_bwd")
    return dz, dgx, dghn, dx0, dh0


class GRUFeedbackFunction(torch.autograd.Function):
    """``(x0, h0, w_ih, w_hh, b_ih, b_hh, w_out, b_out) -> (y (T, B, O), h_n (B, H))``."""

    @staticmethod
    def forward(ctx, x0, h0, w_ih, w_hh, b_ih, b_hh, w_out, b_out, steps, head, grad_clip):
        y, h, saved = gru_feedback_fwd(x0, h0, w_ih, w_hh, b_ih, b_hh, w_out, b_out, steps, head)
        ctx.save_for_backward(x0, h0, w_ih, w_hh, w_out, y, h, saved)
        ctx.head, ctx.grad_clip = head, grad_clip
        return y, h[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_n):
        x0, h0, w_ih, w_hh, w_out, y, h, saved = ctx.saved_tensors
        dz, dgx, dghn, dx0, dh0 = gru_feedback_bwd(dy, dh_n, h0, y, h, saved, w_ih, w_hh, w_out, ctx.head, ctx.grad_clip)
        H = h.shape[2]
        inputs = torch.cat([x0[None], y[:-1]])
        previous = torch.cat([h0[None], h[:-1]])
        dgx2, dz2 = _flat(dgx), _flat(dz)
        dgh2 = torch.cat([dgx2[:, : 2 * H], _flat(dghn)], dim=1)
        return (dx0, dh0, dgx2.t() @ _flat(inputs), dgh2.t() @ _flat(previous), dgx2.sum(0), dgh2.sum(0),
                dz2.t() @ _flat(h), dz2.sum(0), None, None, None)


def lstm_feedback_fwd(x0: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, b: Tensor, w_out: Tensor, b_out: Tensor,
                      steps: int, head: str):
    """``x0 (B, O)``, ``h0``, ``c0 (B, H)``, ``w_ih (4H, O)``, ``w_hh (4H, H)``, ``b (4H,)``,
    ``w_out (O, H)``, ``b_out (O,)`` -> ``y (T, B, O)``, ``h``, ``c (T, B, H)``, ``gates (T, B, 4H)``."""
    B, O = x0.shape
    H = h0.shape[1]
    y = x0.new_empty((steps, B, O))
    h = h0.new_empty((steps, B, H))
    c = h0.new_empty((steps, B, H))
    gates = h0.new_empty((steps, B, 4 * H))
    if B == 0:
        return y, h, c, gates
    kernels.lstm_feedback_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        x0.contiguous(), h0.contiguous(), c0.contiguous(), kernel_weight(w_ih), kernel_weight(w_hh), b.contiguous(),
        kernel_weight(w_out), b_out.contiguous(), y, h, c, gates,
        steps, B, H, O, **_gated_meta("lstm", H, O, x0.dtype, head),
    )
    count_launch("lstm_feedback_fwd")
    return y, h, c, gates


def lstm_feedback_bwd(dy: Tensor, dh_n: Tensor, dc_n: Tensor, c0: Tensor, y: Tensor, c: Tensor, gates: Tensor, w_ih: Tensor, w_hh: Tensor,
                      w_out: Tensor, head: str, grad_clip: float | None):
    """-> ``dz (T, B, O)``, ``dgates (T, B, 4H)`` (clipped), ``dx0 (B, O)``, ``dh0``, ``dc0 (B, H)``."""
    T, B, O = y.shape
    H = c.shape[2]
    dz = torch.empty_like(y)
    dgates = torch.empty_like(gates)
    dx0 = y.new_empty((B, O))
    dh0 = torch.empty_like(dh_n)
    dc0 = torch.empty_like(dc_n)
    if B == 0:
        return dz, dgates, dx0, dh0, dc0
    kernels.lstm_feedback_bwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        dy.contiguous(), dh_n.contiguous(), dc_n.contiguous(), c0.contiguous(), y, c, gates,
        kernel_weight(w_ih), kernel_weight(w_hh), kernel_weight(w_out), dz, dgates, dx0, dh0, dc0,
        T, B, H, O, float(grad_clip or 0.0), CLIP=grad_clip is not None, **_gated_meta("lstm", H, O, y.dtype, head),
    )
    count_launch("lstm_feedback_bwd")
    return dz, dgates, dx0, dh0, dc0


class LSTMFeedbackFunction(torch.autograd.Function):
    """``(x0, h0, c0, w_ih, w_hh, b, w_out, b_out) -> (y (T, B, O), h_n, c_n (B, H))``."""

    @staticmethod
    def forward(ctx, x0, h0, c0, w_ih, w_hh, b, w_out, b_out, steps, head, grad_clip):
        y, h, c, gates = lstm_feedback_fwd(x0, h0, c0, w_ih, w_hh, b, w_out, b_out, steps, head)
        ctx.save_for_backward(x0, h0, c0, w_ih, w_hh, w_out, y, h, c, gates)
        ctx.head, ctx.grad_clip = head, grad_clip
        return y, h[-1].clone(), c[-1].clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        x0, h0, c0, w_ih, w_hh, w_out, y, h, c, gates = ctx.saved_tensors
        dz, dgates, dx0, dh0, dc0 = lstm_feedback_bwd(dy, dh_n, dc_n, c0, y, c, gates, w_ih, w_hh, w_out, ctx.head, ctx.grad_clip)
        inputs = torch.cat([x0[None], y[:-1]])
        previous = torch.cat([h0[None], h[:-1]])
        dg2, dz2 = _flat(dgates), _flat(dz)
        return (dx0, dh0, dc0, dg2.t() @ _flat(inputs), dg2.t() @ _flat(previous), dg2.sum(0),
                dz2.t() @ _flat(h), dz2.sum(0), None, None, None)


def generate(cell: str, x0: Tensor, h0: Tensor, c0: Tensor | None, params: dict, head, nonlinearity: str, steps: int,
             grad_clip: float | None = None):
    """Any served cell: ``x0 (B, O)``, ``h0 (B, H)``, ``c0 (B, H)`` (LSTM, else None), ``params``
    of the layer's one direction, ``head`` a :class:`fastrnn.topologies.OutputHead`. Returns
    ``y (B, steps, O)``, ``h_n (B, H)`` and ``c_n (B, H)`` (LSTM, else None)."""
    if cell == "rnn":
        y, h_n = rnn_generate(x0, h0, params, head, nonlinearity, steps, grad_clip)
        return y, h_n, None
    dtype = compute_dtype(x0)
    gates = params["w_hh"].shape[0]
    zeros = torch.zeros(gates, device=x0.device, dtype=dtype)
    b_ih = params["b_ih"] if params["b_ih"] is not None else zeros
    b_hh = params["b_hh"] if params["b_hh"] is not None else zeros
    w_out, b_out = head.weight, head.bias
    if b_out is None:
        b_out = torch.zeros(w_out.shape[0], device=x0.device, dtype=dtype)
    with torch.autocast(x0.device.type, enabled=False):
        if cell == "gru":
            cast = [t.to(dtype) for t in (x0, h0, params["w_ih"], params["w_hh"], b_ih, b_hh, w_out, b_out)]
            y, h_n = GRUFeedbackFunction.apply(*cast, steps, head.kind, grad_clip)
            c_n = None
        else:
            b = b_ih + b_hh if params["b_ih"] is not None else zeros
            cast = [t.to(dtype) for t in (x0, h0, c0, params["w_ih"], params["w_hh"], b, w_out, b_out)]
            y, h_n, c_n = LSTMFeedbackFunction.apply(*cast, steps, head.kind, grad_clip)
    return y.transpose(0, 1), h_n, c_n
