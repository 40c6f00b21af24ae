"""What every cell's launcher shares: strategy table, dtype rules, direction stacking, launch count.

Strategy table (``plan``): the recurrent weights of one direction are ``G*H x H_out`` (G gates).

============ ============================================ =====================================
strategy     when (``BLOCK_H`` = H rounded up to a power   what the kernel does
             of two, at least 16)
============ ============================================ =====================================
resident     ``BLOCK_H <= RESIDENT_MAX_BLOCK_H[G, fp32]``   ``W_hh`` loaded on chip once, state in
                                                           fp32 registers for the whole sequence
tiled        only when forced (``FASTRNN_STRATEGY=tiled``), ``W_hh`` re-read from L2 per step in
             or for a cell without persistent kernels      ``TILE x TILE`` tiles; fp32 state in a
                                                           global ping-pong buffer, a barrier per
                                                           step (one program per batch tile)
persistent   anything larger (cells in                     ``W_hh`` split by hidden units over up
             ``persistent.CELL_GATES``)                    to one program per SM, each slice on
                                                           chip; state exchanged per step through
                                                           L2 with flag barriers
                                                           (``fastrnn.ops.persistent``)
============ ============================================ =====================================

``FASTRNN_STRATEGY`` (``resident`` | ``tiled`` | ``persistent``) forces one; forcing one that cannot
serve the size (resident beyond its limit, persistent for a cell without persistent kernels)
raises ValueError. Resident and tiled are one launch for the whole sequence, forward and backward;
persistent is one launch (barrier mode) or one per step (per_step mode). The limits (``RESIDENT_MAX_BLOCK_H``, ``TILED_CONFIG``) are the largest blocks, and the warps and stages, at
which every launch compiles for sm_90 without spills on triton 3.6 and 3.9: the compile gate
(``python -m fastrnn.ops.aot``, checked by ``tests/test_kernel_compile.py``) compiles each launch as
Triton specialises it and ``bench/results/aot-compile.md`` holds the registers, stack and shared
memory it measured. The fp32 resident blocks are half the 16-bit ones: they were sized when fp32
products ran as ``ieee`` on FMA units, which replicate ``W`` across threads (they now run as
tensor-core products, ``tf32`` or the split ``tf32x3``, :func:`input_precision`; larger fp32 blocks are
not yet measured).
The tiled launches pass ``maxnreg`` (:func:`register_budget`).
"""

from __future__ import annotations

import collections
import dataclasses
import os

import torch
import triton
from einops import rearrange
from torch import Tensor

from fastrnn import backend
from fastrnn.ops import persistent

#: Kernel launches by kernel name, so tests can prove the kernels ran (eager launches only).
LAUNCHES: collections.Counter[str] = collections.Counter()

#: Triton's interpreter is decided when triton is imported, so this is fixed for the process.
INTERPRETING = backend.triton_interpreting()


def count_launch(name: str) -> None:
    """Record one launch of ``name`` (skipped while torch.compile traces: no Python side effects)."""
    if not torch.compiler.is_compiling():
        LAUNCHES[name] += 1

#: Largest BLOCK_H kept resident, by (gates, fp32?), and the warps it runs with.
RESIDENT_MAX_BLOCK_H = {
    (1, False): (128, 8), (1, True): (64, 8),
    (3, False): (64, 8), (3, True): (32, 8),
    (4, False): (64, 8), (4, True): (16, 4),
}
#: The tiled strategy's (tile width, warps, pipeline stages), by (gates, fp32?).
TILED_CONFIG = {
    (1, False): (64, 8, 2), (1, True): (64, 8, 1),
    (3, False): (64, 8, 1), (3, True): (64, 8, 1),
    (4, False): (64, 8, 1), (4, True): (64, 8, 1),
}
TILE = 64  # the widest tile any cell uses (the compile check's tiled size is 4 * TILE)
BLOCK_B = 16  # tl.dot needs tiles of at least 16 rows


STRATEGY_ENV = "FASTRNN_STRATEGY"
STRATEGIES = ("resident", "tiled", "persistent")


@dataclasses.dataclass(frozen=True)
class Plan:
    strategy: str  # "resident", "tiled" or "persistent" (its partition: persistent.persistent_plan)
    block_b: int
    block_h: int
    num_warps: int
    num_stages: int


def plan(gates: int, hidden: int, dtype: torch.dtype) -> Plan:
    """Pick the strategy and block sizes for ``gates`` stacked ``hidden``-wide gate blocks."""
    forced = os.environ.get(STRATEGY_ENV, "").strip().lower() or None
    if forced is not None and forced not in STRATEGIES:
        raise ValueError(f"{STRATEGY_ENV} must be one of {', '.join(STRATEGIES)}, got {forced!r}")
    block_h = max(16, triton_next_power_of_2(hidden))
    max_block, warps = RESIDENT_MAX_BLOCK_H[gates, dtype == torch.float32]
    if forced == "resident" and block_h > max_block:
        raise ValueError(f"{STRATEGY_ENV}=resident cannot serve hidden size {hidden} ({dtype}): the resident "
                         f"kernels hold at most {max_block} units per gate on chip")
    if forced == "persistent" and gates not in persistent.CELL_GATES:
        raise ValueError(f"{STRATEGY_ENV}=persistent: no persistent kernels for a cell with {gates} gates yet")
    if forced == "resident" or (forced is None and block_h <= max_block):
        return Plan("resident", BLOCK_B, block_h, warps if block_h == max_block else 4, 3)
    if forced == "persistent" or (forced is None and persistent.planned(gates, dtype, hidden)):
        return Plan("persistent", BLOCK_B, block_h, 4, 1)  # the launch-time partition decides the rest
    tile, warps, stages = TILED_CONFIG[gates, dtype == torch.float32]
    return Plan("tiled", BLOCK_B, tile, warps, stages)


@dataclasses.dataclass(frozen=True)
class PersistentKernel:
    """A cell's persistent kernel and what its launch needs beyond the resident kernel's
    arguments: the number of phases (``T`` forward, ``T + 1`` backward for RNN/GRU) and the
    ``(shape, dtype)`` of each scratch buffer it takes (``fastrnn.ops.persistent``)."""

    kernel: object
    phases: int
    scratch: list
    meta: dict = dataclasses.field(default_factory=dict)  # constexprs only the persistent kernel takes
    forward: bool = False  # a forward kernel: takes the plan's forward constexprs (PersistentPlan.constexprs)
    zoneout: bool = False  # takes the zoneout arguments the resident kernels take (launch's zoneout_meta)


def launch(
    name: str, gates: int, kernel_pair: tuple, args: list, meta: dict, *,
    B: int, H: int, D: int, dtype: torch.dtype, device, scratch: list | None = None,
    persistent_kernel: PersistentKernel | None = None, zoneout_meta: dict | None = None,
) -> None:
    """Launch the resident or the tiled kernel of ``kernel_pair`` as :func:`plan` says, on the
    grid ``(cdiv(B, BLOCK_B), D)``, or ``persistent_kernel`` on its own grid
    (:func:`fastrnn.ops.persistent.launch`; same ``args`` and ``meta``, no ``BLOCK_B``/``BLOCK_H``).
    The tiled kernel takes trailing fp32 scratch buffers, one per
    shape in ``scratch`` (default: one ping-pong state ``(2, D, B, H)``; a ``None`` shape passes a
    dummy pointer the kernel never reads). ``meta`` holds the scalar and constexpr arguments.
    One launch is counted per call, also when the persistent kernel runs one launch per step.
    ``zoneout_meta``: the zoneout arguments (``fastrnn.ops.zoneout``), which the resident kernels
    take and a persistent kernel with ``PersistentKernel.zoneout``; any other plan then raises
    ValueError."""
    p = plan(gates, H, dtype)
    zones_out = p.strategy == "resident" or (
        p.strategy == "persistent" and persistent_kernel is not None and persistent_kernel.zoneout)
    if zoneout_meta and not zones_out:
        raise ValueError(f"{name}: {', '.join(zoneout_meta)} run on the resident kernels (and some persistent ones) only, "
                         f"and hidden size {H} ({dtype}) plans to the {p.strategy} strategy")
    if p.strategy == "persistent":
        if persistent_kernel is None:
            raise ValueError(f"{name}: the plan is persistent, but no persistent kernel was given")
        meta = dict(meta, **persistent_kernel.meta, **(zoneout_meta or {}))
        if "INPUT_PRECISION" in meta:  # the launcher's choice, made before the strategy was known
            meta["INPUT_PRECISION"] = input_precision(dtype, "persistent", gates)
        persistent.launch(name, persistent_kernel.kernel, args, meta, gates=gates, B=B, H=H, D=D, dtype=dtype,
                          device=device, phases=persistent_kernel.phases, scratch=persistent_kernel.scratch,
                          forward=persistent_kernel.forward)
        count_launch(f"{name}_persistent")
        return
    grid = (triton.cdiv(B, p.block_b), D)
    meta = dict(meta, BLOCK_B=p.block_b, BLOCK_H=p.block_h, num_warps=p.num_warps, num_stages=p.num_stages)
    if "INPUT_PRECISION" in meta:
        meta["INPUT_PRECISION"] = input_precision(dtype, p.strategy, gates)
    if p.strategy == "tiled" or (p.strategy == "resident" and (name, meta.get("INPUT_PRECISION")) in RESIDENT_BUDGET):
        meta["maxnreg"] = register_budget(p.num_warps)
    resident, tiled = kernel_pair
    if p.strategy == "resident":
        resident[grid](*args, **meta, **(zoneout_meta or {}))
    else:
        shapes = [(2, D, B, H)] if scratch is None else scratch
        buffers = [args[0] if shape is None else torch.empty(shape, device=device, dtype=torch.float32) for shape in shapes]
        tiled[grid](*args, *buffers, **meta)
    count_launch(f"{name}_{p.strategy}")


#: (launch name, fp32 ``INPUT_PRECISION``) whose resident launches take :func:`register_budget` too:
#: the GRU backward with tf32 products. Uncapped, ptxas stops it at 96 registers with an 8 B stack
#: frame at H16 (4 warps, sm_90, Triton 3.9); with the budget every resident fp32 tf32 form of the
#: compile gate (RNN, GRU, LSTM, zoneout) compiles clean on sm_90 and sm_80 with Triton 3.6 and 3.9.
RESIDENT_BUDGET = frozenset({("gru_bwd", "tf32")})


def register_budget(num_warps: int) -> int:
    """The ``maxnreg`` launch option of the tiled kernels for ``num_warps`` warps: every register
    one block may have (65,536 per SM, at most 255 per thread). Left uncapped, ptxas parks values of
    the tiled kernels on the stack far below the limit (the LSTM tiled forward in bf16, launched
    with one direction: 80 registers and an 8-byte stack frame uncapped, 110 and none capped). Not
    for the resident and fused-generation kernels (but :data:`RESIDENT_BUDGET`): given the whole
    budget, their heaviest forms use all 255 registers and spill, where uncapped they compile clean
    (the compile gate shows both)."""
    return min(255, 65536 // (32 * num_warps))


def triton_next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer computes in: the autocast dtype when autocast is on, as torch.nn does."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def cudnn_rnn_allows_tf32() -> bool:
    """Whether PyTorch lets cuDNN's fp32 RNNs (``torch.nn.LSTM`` on CUDA) use tf32 tensor cores.

    PyTorch builds each cuDNN RNN descriptor with ``at::globalContext().allowTF32CuDNN(
    at::Float32Op::RNN)`` (``aten/src/ATen/native/cudnn/RNN.cpp``, ``RNNDescriptorParams::descriptor``,
    both the v6 and v8 API branches; pytorch/pytorch 00fc08aa). ``RNNDescriptor::set``
    (``aten/src/ATen/cudnn/Descriptors.h``: lines 302-314 and 317-335 of the header torch 2.13
    installs, the v6 and v8 branches) then calls ``cudnnSetRNNMatrixMathType`` with ``CUDNN_FMA_MATH``
    (exact fp32) only when that flag is off for fp32 inputs on sm_70+, else leaves
    ``CUDNN_DEFAULT_MATH``, which lets cuDNN use tf32 on Ampere and later. The flag is
    ``torch.backends.cudnn.allow_tf32`` (``bool allow_tf32_cudnn = true``, ``ATen/Context.h`` line 501)
    or, with the per-operator API, ``torch.backends.cudnn.rnn.fp32_precision`` (``"tf32"`` by default:
    ``{CUDA, Float32Op::RNN}`` is ``DEFAULT`` at ``ATen/Context.h`` line 551, which resolves to the
    legacy flag; measured with torch 2.13: ``"tf32"``, and ``"none"`` once ``allow_tf32`` is False).
    The docs say the same (``docs/source/notes/cuda.rst``, "TensorFloat-32 (TF32) on Ampere (and
    later) devices": ``torch.backends.cudnn.allow_tf32`` "defaults to True" and covers cuDNN).
    ``torch.backends.cuda.matmul.allow_tf32`` plays no part: an fp32 ``nn.LSTM`` on an Ampere+ GPU runs
    its products in tf32 by default."""
    rnn = getattr(torch.backends.cudnn, "rnn", None)
    precision = getattr(rnn, "fp32_precision", None) if rnn is not None else None
    if isinstance(precision, str):
        return precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def input_precision(dtype: torch.dtype, strategy: str | None = None, gates: int | None = None) -> str:
    """The kernels' ``INPUT_PRECISION`` for operands of ``dtype``. ``strategy`` (and the cell's
    ``gates``): the strategy a launch of the strategy table runs (:func:`launch` passes them); None:
    kernels outside the table (fused generation, layer-norm cells), which keep exact fp32 products.

    16-bit operands: ``"ieee"`` (products accumulate in fp32 on tensor cores either way). fp32:
    ``"tf32"`` when PyTorch allows tf32 for the operation fastrnn stands in for (below); else products
    on tensor cores at an error near fp32's where they compile clean: Triton's ``"tf32x3"`` (three tf32
    products of the operands' tf32 parts and remainders) for the resident and tiled kernels,
    ``"tf32x4"`` (``fastrnn.kernels.precision``: one tf32 product of the stacked parts) for the
    persistent kernels of the cells in ``persistent.SPLIT_TF32_GATES``; ``"ieee"`` (FMA units) for the
    other persistent kernels (RNN, GRU: either split spills more there on sm_90) and outside the table.

    Which flag (the precision contract). A fastrnn layer is drop-in for ``torch.nn``, and on CUDA an
    fp32 ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` is cuDNN, whose products are tf32 unless cuDNN's RNN
    flag is off (:func:`cudnn_rnn_allows_tf32`, with the PyTorch file and line; the three are one cuDNN
    RNN op there, each built on the same RNN descriptor). So the layer kernels of every cell (every
    strategy of the table) follow that flag: by default tf32, as
    ``torch.nn``'s; the exact forms above only when the user turns it off
    (``torch.backends.cudnn.allow_tf32 = False`` or ``torch.backends.cudnn.rnn.fp32_precision =
    "ieee"``), for fp32-level error. The kernels outside the table follow
    ``torch.backends.cuda.matmul.allow_tf32`` (default off), as ``nn.RNNCell``-style cells do
    (cuBLAS). The input projection and the weight gradients of every layer are PyTorch GEMMs
    (``torch.nn.functional.linear``, ``torch.bmm``) and follow the matmul flag whatever the cell.
    The CPU tests compare at fp32 tolerances either way (Triton's interpreter computes every
    ``tl.dot`` in exact fp32); the CUDA tests turn cuDNN's flag off (``tests/conftest.py``) unless
    they test the choice."""
    if dtype != torch.float32:
        return "ieee"
    tf32 = cudnn_rnn_allows_tf32() if strategy is not None else torch.backends.cuda.matmul.allow_tf32
    if tf32:
        return "tf32"
    if strategy in ("resident", "tiled"):
        return "tf32x3"
    if strategy == "persistent" and gates in persistent.SPLIT_TF32_GATES:
        return "tf32x4"
    return "ieee"


def kernel_weight(w: Tensor) -> Tensor:
    """Weights as the kernel reads them. Triton's interpreter computes bf16 ``tl.dot`` wrongly,
    so there they are widened to fp32 (the kernel casts its left operand to the weight dtype)."""
    w = w.contiguous()
    if INTERPRETING and w.dtype == torch.bfloat16:
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


def flow_buffer(record_flow: bool, directions: int, steps: int, batch: int, device) -> Tensor | None:
    """The backward kernel's ``(D, T, B)`` fp32 output of squared per-row norms ``||dL/dh_t||^2``
    when the gradient flow is recorded (zero where a kernel writes nothing: rows past ``B``), else None."""
    if not record_flow:
        return None
    return torch.zeros((directions, steps, batch), device=device, dtype=torch.float32)


def write_flow_record(record: Tensor | None, flow: Tensor | None) -> None:
    """Reduce the kernel's squared per-row norms to ``||dL/dh_t||`` per direction and step, into
    the ``(D, T)`` record that :func:`fastrnn.record_gradient_flow` handed the layer."""
    if record is not None:
        record.copy_(flow.sum(-1).sqrt())


def recurrent_weight_grad(dgates: Tensor, prev: Tensor, directions: int) -> Tensor:
    """``dW_hh[d] = sum_{t,b} dgates[t, b, d]^T prev[d, t, b]``: one batched GEMM over all T*B rows."""
    g = rearrange(dgates, "t b (d n) -> d (t b) n", d=directions)
    return torch.bmm(g.transpose(1, 2), rearrange(prev, "d t b k -> d (t b) k").to(g.dtype))
