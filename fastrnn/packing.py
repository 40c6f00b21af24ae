"""Packed data <-> padded time-major tensors as registered operators, so ``torch.compile`` traces them.

``torch.nn.utils.rnn``'s padding and packing have output shapes that depend on the values of
``batch_sizes`` or ``lengths``, which Dynamo cannot trace without a graph break. Between the layers
fastrnn already knows every shape: ``T = len(batch_sizes)``, ``B`` from the initial state, ``N``
from the packed data. These two operators take those sizes as arguments, so their fake
implementations give static (or symbolic) shapes, and each is the other's autograd formula.

Both work in the sorted batch order of a ``PackedSequence`` (``batch_sizes`` non-increasing).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence


def lengths_from_batch_sizes(batch_sizes: Tensor, batch: int) -> Tensor:
    """``(B,)`` int64 on the CPU: row ``b`` (sorted order) runs while ``batch_sizes[t] > b``."""
    return (batch_sizes[None, :] > torch.arange(batch)[:, None]).sum(1)


@torch.library.custom_op("fastrnn::pad_packed", mutates_args=())
def pad_packed(data: Tensor, batch_sizes: Tensor, batch: int) -> Tensor:
    """Packed ``data (N, F)`` -> padded ``(T, B, F)``, zeros past each row's length."""
    padded, _ = pad_packed_sequence(PackedSequence(data, batch_sizes))
    return padded


@pad_packed.register_fake
def _(data, batch_sizes, batch):
    return data.new_empty((batch_sizes.shape[0], batch, *data.shape[1:]))


@torch.library.custom_op("fastrnn::pack_padded", mutates_args=())
def pack_padded(padded: Tensor, batch_sizes: Tensor, total: int) -> Tensor:
    """Padded ``(T, B, F)`` -> packed data ``(N, F)``, ``N = total = sum(batch_sizes)``."""
    lengths = lengths_from_batch_sizes(batch_sizes, padded.shape[1])
    return pack_padded_sequence(padded, lengths, enforce_sorted=True).data


@pack_padded.register_fake
def _(padded, batch_sizes, total):
    return padded.new_empty((total, *padded.shape[2:]))


def _save_pad(ctx, inputs, output):
    data, batch_sizes, _ = inputs
    ctx.save_for_backward(batch_sizes)
    ctx.total = data.shape[0]


def _pad_backward(ctx, grad):
    (batch_sizes,) = ctx.saved_tensors
    return pack_padded(grad.contiguous(), batch_sizes, ctx.total), None, None


def _save_pack(ctx, inputs, output):
    padded, batch_sizes, _ = inputs
    ctx.save_for_backward(batch_sizes)
    ctx.batch = padded.shape[1]


def _pack_backward(ctx, grad):
    (batch_sizes,) = ctx.saved_tensors
    return pad_packed(grad.contiguous(), batch_sizes, ctx.batch), None, None


pad_packed.register_autograd(_pad_backward, setup_context=_save_pad)
pack_padded.register_autograd(_pack_backward, setup_context=_save_pack)
