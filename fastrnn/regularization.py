"""Recurrent regularisers the layers beyond torch.nn share: zoneout and DropConnect on ``W_hh``.

* ``zoneout=p`` (Krueger et al. 2016, "Zoneout: Regularizing RNNs by Randomly Preserving Hidden
  Activations"): in training each unit of the state keeps its previous value with probability
  ``p``, ``s_t = m_t * s_{t-1} + (1 - m_t) * s_new`` with ``m_t ~ Bernoulli(p)`` drawn per step,
  row and unit (for an LSTM the same mask serves ``h`` and ``c``); in eval the expectation
  ``s_t = p * s_{t-1} + (1 - p) * s_new``.
* ``recurrent_dropout=p`` (DropConnect, Wan et al. 2013; haste's ``dropout``, AWD-LSTM's weight
  drop): in training ``W_hh`` is replaced by ``W_hh * M / (1 - p)``, ``M ~ Bernoulli(1 - p)``
  drawn once per forward call and direction (the gradient reaches ``W_hh`` through the mask); off in eval.

Random draws, in this order, per layer of a forward call in training (what makes the masks
reproducible under ``torch.manual_seed`` and the same on every path): the dropout of the layer's
input (layers above the first, torch.nn's ``dropout``), then the DropConnect mask of each direction's
recurrent weight (direction 0 first), then one zoneout mask ``(T, B, D*H)`` for the layer
(direction ``d`` in features ``d*H:(d+1)*H``, as the layer's output; row ``b`` is the caller's
row ``b``, also for an unsorted ``PackedSequence``). Every mask comes from one
``torch.rand(shape, dtype=torch.float32, device=...)`` (zoneout keeps where ``u < p``, DropConnect
keeps where ``u >= p``), so it is the same whatever the layer's dtype.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor


def check_probability(name: str, p, *, below_one: bool = False) -> float:
    """``p`` as a float in ``[0, 1]`` (``[0, 1)`` with ``below_one``), or a ValueError naming ``name``."""
    upper_ok = (lambda v: v < 1) if below_one else (lambda v: v <= 1)
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not (0 <= p and upper_ok(p)):
        interval = "[0, 1)" if below_one else "[0, 1]"
        raise ValueError(f"{name} should be a number in range {interval}, got {p!r}")
    return float(p)


def drop_connect(weight: Tensor, p: float, training: bool) -> Tensor:
    """``weight * M / (1 - p)`` with a fresh Bernoulli(1 - p) mask in training; ``weight`` otherwise."""
    if p == 0 or not training:
        return weight
    keep = torch.rand(weight.shape, dtype=torch.float32, device=weight.device) >= p
    return weight * keep.to(weight.dtype) / (1 - p)


def zoneout_mask(p: float, training: bool, shape: tuple[int, ...], like: Tensor) -> Tensor | None:
    """The training mask ``m ~ Bernoulli(p)`` (1: keep the previous state) of ``shape``, in
    ``like``'s dtype and device; None in eval or when ``p`` is 0 (eval uses ``p`` itself)."""
    if p == 0 or not training:
        return None
    return (torch.rand(shape, dtype=torch.float32, device=like.device) < p).to(like.dtype)


def zoneout(previous: Tensor, new: Tensor, mask: Tensor | None, p: float) -> Tensor:
    """``mask * previous + (1 - mask) * new`` with a mask (training), else ``p * previous + (1 - p) * new``."""
    if mask is not None:
        return mask * previous + (1 - mask) * new
    if p == 0:
        return new
    return p * previous + (1 - p) * new
