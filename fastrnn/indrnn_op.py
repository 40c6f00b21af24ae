"""IndRNN's recurrence as a registered operator: what ``torch.compile`` traces.

Dynamo would unroll the reference loop (:func:`fastrnn.indrnn.indrnn_reference_scan`) step by step
and cannot trace the scan kernel's launch on the CPU; as ``fastrnn::indrnn_recurrence`` (one layer,
every direction: ``(gx (T, B, D*H), u (D, H), h0 (D, B, H)) -> (y (T, B, D*H), h_n (D, B, H))``,
the input projection ``gx`` outside, for inductor) it sees one node whatever ``T`` is. The operator
runs what the eager layer runs: with ``kernel`` the fused scan of :mod:`fastrnn.ops.indrnn`, else
the reference loop. The backward operator (``..._backward``) keeps nothing but the operator's
inputs, so it runs the forward again first (then the backward scan kernel, or ``torch.func.vjp`` of
the reference loop): compiled, a training step costs one forward scan more than eager.

The zoneout mask ``keep (T, B, D*H)`` is an input: :func:`fastrnn.regularization.zoneout_mask`
draws it in the traced graph, where Dynamo sees the draw, and the operator draws nothing, so a
compiled call draws what an eager call draws where the backend runs ``torch.rand`` as eager does
(``aot_eager``; inductor with ``torch._inductor.config.fallback_random = True``; inductor's default
draws from its own generator: reproducible under ``torch.manual_seed``, other numbers than eager's).
Not differentiable twice (``FASTRNN_BACKEND=reference`` is: with it the layer runs the loop, which
Dynamo unrolls). The layer calls these operators only while ``torch.compile`` traces; eager calls
run :class:`fastrnn.ops.indrnn.IndRNNFunction` or the loop.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from fastrnn.indrnn import indrnn_reference_scan
from fastrnn.registered_ops import refuse_double_backward


def _scan_kernels():
    """:mod:`fastrnn.ops.indrnn` (imports triton: only on the kernel path)."""
    return importlib.import_module("fastrnn.ops.indrnn")


def _reference(gx, u, h0, lengths, keep, zoneout_p, nonlinearity, grad_clip):
    hidden = u.shape[-1]
    return indrnn_reference_scan(list(gx.split(hidden, dim=-1)), list(u.unbind(0)), h0, lengths, nonlinearity, keep,
                                 zoneout_p, grad_clip)


@torch.library.custom_op("fastrnn::indrnn_recurrence", mutates_args=())
def indrnn_recurrence(
    gx: Tensor, u: Tensor, h0: Tensor, lengths: Tensor | None, keep: Tensor | None, zoneout_p: float,
    nonlinearity: str, grad_clip: float | None, kernel: bool,
) -> tuple[Tensor, Tensor]:
    """``(y (T, B, D*H), h_n (D, B, H))``: the scan kernel's forward with ``kernel``, else the reference loop's."""
    if kernel:
        y, h_n, _ = _scan_kernels().indrnn_fwd(gx, u, h0, lengths, keep, zoneout_p, nonlinearity)
        return y, h_n
    return _reference(gx, u, h0, lengths, keep, zoneout_p, nonlinearity, grad_clip)


@indrnn_recurrence.register_fake
def _(gx, u, h0, lengths, keep, zoneout_p, nonlinearity, grad_clip, kernel):
    return gx.new_empty(gx.shape), h0.new_empty(h0.shape)


@torch.library.custom_op("fastrnn::indrnn_recurrence_backward", mutates_args=())
def indrnn_recurrence_backward(
    gx: Tensor, u: Tensor, h0: Tensor, lengths: Tensor | None, keep: Tensor | None, zoneout_p: float,
    nonlinearity: str, grad_clip: float | None, kernel: bool, dy: Tensor, dh_n: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dgx, du, dh0)``: the forward again, then the backward scan kernel (``kernel``) or the
    pullback of ``torch.func.vjp`` through the reference loop (``grad_clip`` clamps each step's
    pre-activation gradient in both)."""
    if kernel:
        scan = _scan_kernels()
        y, _, cand = scan.indrnn_fwd(gx, u, h0, lengths, keep, zoneout_p, nonlinearity)
        dgx, dh0, du, _ = scan.indrnn_bwd(dy, dh_n, y, cand, keep, zoneout_p, u, h0, lengths, nonlinearity, grad_clip)
        return dgx, du.to(u.dtype), dh0
    def forward(gx, u, h0):
        return _reference(gx, u, h0, lengths, keep, zoneout_p, nonlinearity, grad_clip)

    _, pullback = torch.func.vjp(forward, gx, u, h0)  # autograd is off inside an operator; functorch's is not
    return tuple(g.contiguous() for g in pullback((dy, dh_n)))


@indrnn_recurrence_backward.register_fake
def _(gx, u, h0, lengths, keep, zoneout_p, nonlinearity, grad_clip, kernel, dy, dh_n):
    return gx.new_empty(gx.shape), u.new_empty(u.shape), h0.new_empty(h0.shape)


def _setup(ctx, inputs, output):
    gx, u, h0, lengths, keep, *options = inputs
    ctx.save_for_backward(gx, u, h0, lengths, keep)
    ctx.options = options


def _backward(ctx, dy, dh_n):
    gx, u, h0, lengths, keep = ctx.saved_tensors
    dgx, du, dh0 = indrnn_recurrence_backward(gx, u, h0, lengths, keep, *ctx.options, dy.contiguous(), dh_n.contiguous())
    return dgx, du, dh0, None, None, None, None, None, None


indrnn_recurrence.register_autograd(_backward, setup_context=_setup)
refuse_double_backward(indrnn_recurrence_backward, "fastrnn::indrnn_recurrence (torch.compile)")


def reference_layer(
    x: Tensor, h0: Tensor, params: list[dict], lengths: Tensor | None, nonlinearity: str,
    zoneout_mask: Tensor | None = None, zoneout_p: float = 0.0, grad_clip: float | None = None,
    flow_record: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`fastrnn.indrnn.indrnn_reference_layer` (its signature) with the recurrence as the
    operator: the input projection of every direction (one ``F.linear`` each, both biases folded),
    then ``fastrnn::indrnn_recurrence``. ``flow_record`` must be None (a compiled call records nothing)."""
    if flow_record is not None:
        raise RuntimeError("the gradient flow is not recorded under torch.compile: record in an eager pass")
    gx = torch.cat([F.linear(x, p["weight_ih"], None if p.get("bias_ih") is None else p["bias_ih"] + p["bias_hh"])
                    for p in params], dim=-1)
    u = torch.stack([p["weight_hh"] for p in params])
    return indrnn_recurrence(gx, u, h0.contiguous(), lengths, zoneout_mask, zoneout_p, nonlinearity, grad_clip, False)
