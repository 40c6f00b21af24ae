"""What fastrnn's registered operators (``torch.library.custom_op``) share.

Every hand-written backward that ``torch.compile`` traces is itself a registered operator (it runs
the forward again, then the backward loop or kernels). None of them is differentiable again: rather
than let autograd fail with PyTorch's generic "no autograd formula" error, each backward operator
gets an autograd formula that raises a ``RuntimeError`` naming the path that is twice
differentiable (``FASTRNN_BACKEND=reference``).
"""

from __future__ import annotations

import torch
from torch import Tensor


class OperatorContext:
    """What a Function's ``forward`` and ``backward`` use of autograd's ``ctx`` when a registered
    operator runs them: ``save_for_backward`` (kept as ``saved_tensors``) and ``needs_input_grad``."""

    def __init__(self, needs_input_grad: tuple[bool, ...] = ()):
        self.needs_input_grad = needs_input_grad

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def no_tensor(like: Tensor) -> Tensor:
    """An empty tensor on ``like``'s device and dtype: what an operator returns where its Function
    returns None (a registered operator's outputs are tensors)."""
    return like.new_empty(0)


def _no_context(ctx, inputs, output) -> None:
    """The refusal needs nothing saved."""


def refuse_double_backward(backward_op: torch.library.CustomOpDef, through: str) -> None:
    """Register on ``backward_op`` (the registered operator that is another operator's backward) an
    autograd formula that raises a ``RuntimeError``: differentiating through it again
    (``create_graph=True``, then ``backward``) fails with "double backward is not supported through
    ``through``; the twice-differentiable path is FASTRNN_BACKEND=reference"."""
    message = f"double backward is not supported through {through}; the twice-differentiable path is FASTRNN_BACKEND=reference"

    def refuse(ctx, *grads):
        raise RuntimeError(message)

    backward_op.register_autograd(refuse, setup_context=_no_context)
