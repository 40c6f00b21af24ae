r"""``fastrnn.IndRNN``: the independently recurrent network (Li et al. 2018, "Independently Recurrent
Neural Network (IndRNN): Building A Longer and Deeper RNN", arXiv:1803.04831).

Per layer and direction, every unit is its own scalar recurrence:

.. math:: h_t = \mathrm{act}(W_{ih} x_t + b_{ih} + u \odot h_{t-1} + b_{hh})

with ``u`` a vector (``weight_hh``, shape ``(H,)``) and ``act`` relu or tanh. With
``zoneout=p`` the state is zoned out as :mod:`fastrnn.regularization` says; with
``recurrent_dropout=p`` DropConnect drops entries of ``u``.

Paths: on CUDA (or with ``FASTRNN_BACKEND=triton`` under Triton's interpreter) one fused scan
kernel per layer forward and one backward (``fastrnn.ops.indrnn``: no product per step, so it is
bound by memory bandwidth); elsewhere the reference loop of :func:`indrnn_reference_layer`, which
is also the kernels' oracle. Under ``torch.compile`` the recurrence of each layer (either path) is
one registered operator, ``fastrnn::indrnn_recurrence`` (:mod:`fastrnn.indrnn_op`).
"""

from __future__ import annotations

import importlib
import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from fastrnn import backend
from fastrnn.reference import clip_grad
from fastrnn.stacked import StackedRecurrence, time_loop

NONLINEARITIES = {"tanh": torch.tanh, "relu": torch.relu}
#: Dtypes the scan kernel computes in (state in fp32 always).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def indrnn_reference_layer(
    x: Tensor, h0: Tensor, params: list[dict], lengths: Tensor | None, nonlinearity: str,
    zoneout_mask: Tensor | None = None, zoneout_p: float = 0.0, grad_clip: float | None = None,
    flow_record: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One layer, every direction, in plain PyTorch: ``x (T, B, I)``, ``h0 (D, B, H)``; the
    signature of :func:`fastrnn.ops.indrnn.indrnn_layer`. ``grad_clip`` clamps the gradient of
    each step's pre-activation. Returns ``y (T, B, D*H)``, ``h_n (D, B, H)``."""
    gx = [F.linear(x, p["weight_ih"], None if p.get("bias_ih") is None else p["bias_ih"] + p["bias_hh"]) for p in params]
    return indrnn_reference_scan(gx, [p["weight_hh"] for p in params], h0, lengths, nonlinearity, zoneout_mask, zoneout_p,
                                 grad_clip, flow_record)


def indrnn_reference_scan(
    gx: list[Tensor], u: list[Tensor], h0: Tensor, lengths: Tensor | None, nonlinearity: str,
    zoneout_mask: Tensor | None = None, zoneout_p: float = 0.0, grad_clip: float | None = None,
    flow_record: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence of :func:`indrnn_reference_layer` after the input projection: ``gx[d] (T, B, H)``
    (``W_ih x_t + b_ih + b_hh`` of direction ``d``), ``u[d] (H,)``, the rest as that function takes
    them. Returns ``y (T, B, D*H)``, ``h_n (D, B, H)``."""
    act = NONLINEARITIES[nonlinearity]
    hidden = h0.shape[-1]
    ys, hs = [], []
    for d, (gx_d, u_d) in enumerate(zip(gx, u)):
        steps = gx_d.unbind(0)  # one view per step, one backward node for all

        def step(t, state, steps=steps, u_d=u_d):
            return (act(clip_grad(steps[t] + u_d * state[0], grad_clip)),)

        mask = None if zoneout_mask is None else zoneout_mask[..., d * hidden:(d + 1) * hidden]
        y, (h,) = time_loop(step, gx_d.shape[0], (h0[d],), lengths, reverse=d == 1, zoneout_mask=mask,
                            zoneout_p=zoneout_p, flow_record=None if flow_record is None else flow_record[d])
        ys.append(y)
        hs.append(h)
    return torch.cat(ys, dim=-1), torch.stack(hs)


def scan_path(device: torch.device) -> str:
    """``"triton"`` (the scan kernel) or ``"reference"``: the kernel on CUDA with triton installed
    (backend ``auto``; while ``torch.compile`` traces, inside :mod:`fastrnn.indrnn_op`'s operator) or when the ``triton`` backend is asked
    for (on CPU tensors only under Triton's interpreter, else a RuntimeError); the reference
    loop otherwise."""
    asked = backend.get_backend()
    if asked == "reference":
        return "reference"
    if asked == "triton":
        if not backend.triton_available():
            raise RuntimeError(f"FASTRNN_BACKEND=triton, but the triton package is not installed: {backend.TRITON_EXTRA}")
        if device.type != "cuda" and not backend.triton_interpreting():
            raise RuntimeError(
                f"FASTRNN_BACKEND=triton needs CUDA tensors (got a tensor on {device}); set TRITON_INTERPRET=1 "
                "before importing triton to run the kernels on the CPU through Triton's interpreter"
            )
        return "triton"
    if device.type == "cuda" and backend.triton_available():
        return "triton"
    return "reference"


def scan_layer():
    """:func:`fastrnn.ops.indrnn.indrnn_layer`, imported on first use (it imports triton).
    ``torch.compile`` cannot trace an import: while it traces, :func:`_import_scan_kernels` runs
    untraced and the layer function is read from ``sys.modules``, which it can trace."""
    _import_scan_kernels()
    return sys.modules["fastrnn.ops.indrnn"].indrnn_layer


@torch.compiler.assume_constant_result  # while dynamo traces: called, not traced
def _import_scan_kernels() -> bool:
    importlib.import_module("fastrnn.ops.indrnn")
    return True


class IndRNN(StackedRecurrence):
    r"""Independently recurrent network, ``h_t = act(x_t W_ih^T + b_ih + u * h_{t-1} + b_hh)``.

    Arguments as ``torch.nn.RNN``: ``input_size, hidden_size, num_layers=1, nonlinearity='relu',
    bias=True, batch_first=False, dropout=0.0, bidirectional=False, device=None, dtype=None``;
    keyword-only ``zoneout=0.0``, ``recurrent_dropout=0.0`` (DropConnect on ``u``) and
    ``grad_clip=None``. Forward forms, ``h0`` and outputs as ``torch.nn.RNN``.

    Parameters per layer ``k`` (and ``_reverse``): ``weight_ih_l{k}`` ``(H, I_k)`` and the biases
    ``bias_ih_l{k}``, ``bias_hh_l{k}`` ``(H,)`` uniform in ``+-1/sqrt(H)`` as torch.nn's;
    ``weight_hh_l{k}`` ``(H,)`` (the vector ``u``) uniform in ``[0, 1]``, so that no unit's state
    grows by itself (Li et al. bound ``|u|`` to keep gradients from exploding).
    """

    NAME = "IndRNN"

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, nonlinearity: str = "relu", *args, **kwargs):
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh', 'relu'.")
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, num_layers, *args, **kwargs)

    def _parameter_shapes(self, layer_input_size: int) -> dict[str, tuple[int, ...]]:
        shapes = {"weight_ih": (self.hidden_size, layer_input_size), "weight_hh": (self.hidden_size,)}
        if self.bias:
            shapes |= {"bias_ih": (self.hidden_size,), "bias_hh": (self.hidden_size,)}
        return shapes

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for name, weight in self.named_parameters():
            if name.startswith("weight_hh"):
                nn.init.uniform_(weight, 0.0, 1.0)
            else:
                nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", nonlinearity={self.nonlinearity!r}"

    def own_route(self, input):
        """For :func:`fastrnn.explain`: the scan kernel or the reference loop, and why."""
        from fastrnn.routing import Route

        data = input.data if isinstance(input, PackedSequence) else input
        if scan_path(data.device) == "triton" and (data.dtype in KERNEL_DTYPES or torch.is_autocast_enabled(data.device.type)):
            return Route("triton", "IndRNN: the fused scan kernel, one launch per layer each way")
        return Route("reference", f"IndRNN on {data.device.type} {str(data.dtype).replace('torch.', '')}: the reference loop")

    def _run_layer(self, x, h0, c0, params, lengths, zoneout_mask, flow_record):
        kernel = scan_path(x.device) == "triton" and (x.dtype in KERNEL_DTYPES or torch.is_autocast_enabled(x.device.type))
        if kernel:
            layer = scan_layer()
        elif torch.compiler.is_compiling() and backend.get_backend() != "reference":
            layer = indrnn_op.reference_layer  # one operator per layer, Dynamo does not unroll the loop (reference: it does)
        else:
            layer = indrnn_reference_layer
        y, h_n = layer(x, h0, params, lengths, self.nonlinearity, zoneout_mask, self.zoneout, self.grad_clip, flow_record)
        return y, h_n, None


from fastrnn import indrnn_op  # noqa: E402  (registers the operators torch.compile traces; it imports the scan above)
