"""What every cell's launcher shares: strategy table, dtype rules, direction stacking, launch count.

Strategy table (``plan``): the recurrent weights of one direction are ``G*H x H_out`` (G gates).

============ =========================================== ======================================
strategy     when                                         what the kernel does
============ =========================================== ======================================
resident     ``G * BLOCK_H**2 * itemsize <= 128 KiB``      ``W_hh`` loaded on chip once, state in
             (bf16/fp16: RNN H<=256, GRU/LSTM H<=128;      fp32 registers for the whole sequence
             fp32: RNN H<=128, GRU/LSTM H<=64)
tiled        anything larger                              ``W_hh`` re-read from L2 per step in
                                                          ``TILE x TILE`` tiles; fp32 state in a
                                                          global ping-pong buffer, a barrier per
                                                          step (one program per batch tile)
============ =========================================== ======================================

Both are one launch for the whole sequence, forward and backward. The 128 KiB budget is checked
by the ahead-of-time compile test (``tests/test_kernel_compile.py``): no spills, shared memory
within an H100's 227 KiB, at the largest size each strategy serves.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
from einops import rearrange
from torch import Tensor

from fastrnn import backend

#: Kernel launches by kernel name, so tests can prove the kernels ran.
LAUNCHES: collections.Counter[str] = collections.Counter()

RESIDENT_BYTES = 128 * 1024
TILE = 64
BLOCK_B = 16  # tl.dot needs tiles of at least 16 rows


@dataclasses.dataclass(frozen=True)
class Plan:
    strategy: str  # "resident" or "tiled"
    block_b: int
    block_h: int
    num_warps: int


def plan(gates: int, hidden: int, dtype: torch.dtype) -> Plan:
    """Pick the strategy and block sizes for ``gates`` stacked ``hidden``-wide gate blocks."""
    block_h = max(16, triton_next_power_of_2(hidden))
    itemsize = 4 if dtype == torch.float32 else 2
    if gates * block_h * block_h * itemsize <= RESIDENT_BYTES:
        warps = 4 if gates * block_h * block_h * itemsize <= 32 * 1024 else 8
        return Plan("resident", BLOCK_B, block_h, warps)
    return Plan("tiled", BLOCK_B, min(TILE, block_h), 4)


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer computes in: the autocast dtype when autocast is on, as torch.nn does."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def input_precision(dtype: torch.dtype) -> str:
    """fp32 dots use tf32 only when PyTorch allows it for matmuls; 16-bit dots are exact-accumulate."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def kernel_weight(w: Tensor) -> Tensor:
    """Weights as the kernel reads them. Triton's interpreter computes bf16 ``tl.dot`` wrongly,
    so there they are widened to fp32 (the kernel casts its left operand to the weight dtype)."""
    w = w.contiguous()
    if backend.triton_interpreting() and w.dtype == torch.bfloat16:
        return w.float()
    return w


def kernel_lengths(lengths: Tensor | None, like: Tensor) -> Tensor:
    """``lengths`` as int32 on the kernel's device, or a dummy pointer when there are none."""
    if lengths is None:
        return like
    return lengths.to(device=like.device, dtype=torch.int32).contiguous()


def stack_params(params: list[dict], key: str, dtype: torch.dtype) -> Tensor:
    """``params[d][key]`` of every direction stacked on a leading ``D`` axis, in ``dtype``."""
    return torch.stack([p[key].to(dtype) for p in params])


def input_projection(x: Tensor, params: list[dict], dtype: torch.dtype, fold_hidden_bias: bool) -> Tensor:
    """``x W_ih^T + b_ih (+ b_hh)`` for every direction in one GEMM: ``(T, B, D*G*H)``."""
    w_ih = torch.cat([p["w_ih"] for p in params]).to(dtype)
    bias = None
    if params[0]["b_ih"] is not None:
        bias = torch.cat([p["b_ih"] + p["b_hh"] if fold_hidden_bias else p["b_ih"] for p in params]).to(dtype)
    return torch.nn.functional.linear(x.to(dtype), w_ih, bias)


def previous_states(y: Tensor, h0: Tensor, lengths: Tensor | None) -> Tensor:
    """The state each step read, ``(D, T, B, H_out)``, from the outputs ``y (T, B, D*H_out)``.

    Forward direction: ``h0`` then ``y[t-1]``. Reverse: ``y[t+1]``, and ``h0`` at each row's
    last valid step (where its walk starts). Feeds the weight gradient ``sum_t g_t^T h_{t-1}``."""
    directions = h0.shape[0]
    steps = y.shape[0]
    per_direction = rearrange(y, "t b (d h) -> d t b h", d=directions)
    forward = torch.cat([h0[0, None].to(y.dtype), per_direction[0, :-1]])
    if directions == 1:
        return forward[None]
    reverse = torch.cat([per_direction[1, 1:], h0[1, None].to(y.dtype)])
    if lengths is not None:
        start = torch.arange(steps, device=y.device)[:, None] + 1 >= lengths.to(y.device)[None, :]
        reverse = torch.where(start[..., None], h0[1, None].to(y.dtype), reverse)
    return torch.stack([forward, reverse])


def recurrent_weight_grad(dgates: Tensor, prev: Tensor, directions: int) -> Tensor:
    """``dW_hh[d] = sum_{t,b} dgates[t, b, d]^T prev[d, t, b]``: one batched GEMM over all T*B rows."""
    g = rearrange(dgates, "t b (d n) -> d (t b) n", d=directions)
    return torch.bmm(g.transpose(1, 2), rearrange(prev, "d t b k -> d (t b) k").to(g.dtype))
