"""``@triton.jit`` products of a weight tile with a state tile at the precision the launcher asks
for, so that an fp32 recurrent product can run on tensor cores at an error near fp32's. Used by the
LSTM persistent kernels (``fastrnn.kernels.lstm``); ``fastrnn.ops.persistent.SPLIT_TF32_GATES``
says which cells' launches ask for ``"tf32x4"``.

``INPUT_PRECISION`` is the constexpr the host chooses (``fastrnn.ops.recurrence.input_precision``):
Triton's ``tl.dot`` values (``"ieee"``, ``"tf32"``), passed through unchanged, or ``"tf32x4"``,
done here: both fp32 operands split exactly into a tf32 part and a remainder (:func:`split_tf32`),
and ``(a_hi + a_lo)(b_hi + b_lo)`` formed as ONE tf32 tensor-core product over the stacked halves
(4x the multiply-adds of one tf32 product). Each term's relative error is about ``2^-21`` (the
remainders lose their low bits to tf32), near fp32's ``2^-24``, where a tf32 product is ``2^-11``.

Why not Triton's own ``input_precision="tf32x3"`` (three products; in Triton 3.6 and 3.9): it
emits three chained ``tl.dot`` calls, for which Triton picks the chained-dot warp layout (all warps
along M: every warp holds the whole ``K``-long state operand in registers) and splits the operands
after loading them into that layout. At the persistent kernels' shapes (``K = 256`` over 16 batch
columns, fp32) that spilled 280 B to 9.9 KB of stack per thread on sm_90 (measured 2026-12-01 on the
compile gate's RNN and GRU persistent workloads and L5's LSTM forward, Triton 3.9); written out
by hand as three products, the LSTM forward at L5 still spilled 360-416 B. One product over the
stacked halves keeps the one-product layout and compiled clean there with Triton 3.9 (sm_90, sm_80). The
stacking holds the weight tile twice over (its halves, on chip for the whole sequence) and the
step's operand four times over.

Under Triton's interpreter ``tl.dot`` is numpy's fp32 product, so the halves add back to the fp32
product (up to the rounding of the sum): the parity tests hold at fp32 tolerances.
"""

import triton
import triton.language as tl

#: The fp32 bits a tensor core reads of a tf32 operand: sign, 8 exponent bits, 10 of the 23
#: mantissa bits (``0xFFFFE000`` as an int32).
TF32_MASK = tl.constexpr(-8192)


@triton.jit
def split_tf32(x):
    """``x`` (fp32) as ``hi + lo`` exactly: ``hi`` is ``x`` with its 13 low mantissa bits cleared (a
    tensor core reads it unchanged as tf32), ``lo = x - hi`` (exact; ``|lo| < 2^-10 |x|``)."""
    hi = (x.to(tl.int32, bitcast=True) & TF32_MASK).to(tl.float32, bitcast=True)
    return hi, x - hi


@triton.jit
def weight_product(w, x, INPUT_PRECISION: tl.constexpr):
    """``w @ x``: ``w (M, K)`` the weight tile (loaded once, held on chip), ``x (K, N)`` the step's
    operand; ``(M, N)`` fp32. ``"tf32x4"``: ``[w_hi | w_lo] (M, 2K) @ x4 (2K, 2N)`` where row ``2k + i``,
    column ``2n + j`` of ``x4`` is ``x_j[k, n]`` (``x_0 = x_hi``, ``x_1 = x_lo``); column pair ``(2n, 2n+1)``
    of the product sums to column ``n`` of ``w @ x``."""
    if INPUT_PRECISION == "tf32x4":
        M: tl.constexpr = w.shape[0]
        K: tl.constexpr = w.shape[1]
        N: tl.constexpr = x.shape[1]
        w_hi, w_lo = split_tf32(w)
        x_hi, x_lo = split_tf32(x)
        w2 = tl.reshape(tl.join(w_hi, w_lo), (M, 2 * K))
        x4 = tl.reshape(tl.broadcast_to(tl.expand_dims(tl.join(x_hi, x_lo), 1), (K, 2, N, 2)), (2 * K, 2 * N))
        return tl.sum(tl.reshape(tl.dot(w2, x4, input_precision="tf32"), (M, N, 2)), axis=2)
    else:
        return tl.dot(w, x, input_precision=INPUT_PRECISION)

