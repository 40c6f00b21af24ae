"""The gradient-flow section of ``python -m bench``: ``||dL/dh_t||`` against ``t`` on the adding problem.

Untrained ``ManyToOne`` modules (H=32) read one batch of the adding problem (T=100, B=32); the
loss is the MSE of the single prediction made from the last step's state, as in the task. Inside
:func:`fastrnn.record_gradient_flow` the backward pass records the norm of the gradient reaching
every step's hidden state (on the CPU the layer switches to the reference path to record; on
CUDA the kernels record it). The ratio ``||dL/dh_0|| / ||dL/dh_{T-1}||`` says how much of the
loss's gradient survives the trip back to the first step.

Cells: a tanh RNN and an LSTM with ``torch.nn``'s initialisation, and the same LSTM with its
forget-gate bias set to 1 (``b_ih`` forget slice 1, ``b_hh`` forget slice 0; the usual LSTM
initialisation of Gers et al. and Jozefowicz et al., Keras' ``unit_forget_bias``): with
``torch.nn``'s init the forget gate starts near 0.5, which shrinks the cell-state path by about
half per step, so the untrained LSTM's gradient vanishes as fast as the RNN's.
"""

from __future__ import annotations

import contextlib
import time
import traceback

import torch
import torch.nn.functional as F

import fastrnn
from bench import tasks, timing

BATCH, STEPS, HIDDEN = 32, 100, 32
DATA_SEED, WEIGHT_SEED = 1, 0

#: (label, cell, forget-gate bias or None for torch.nn's initialisation)
CELLS = (
    ("tanh RNN", "rnn", None),
    ("LSTM", "lstm", None),
    ("LSTM, forget bias 1", "lstm", 1.0),
)


def _set_forget_bias(module: fastrnn.ManyToOne, value: float) -> None:
    """LSTM gates are stacked (input, forget, cell, output): the second quarter is the forget gate."""
    rnn = module.rnn
    h = rnn.hidden_size
    with torch.no_grad():
        rnn.bias_ih_l0[h : 2 * h].fill_(value)
        rnn.bias_hh_l0[h : 2 * h].zero_()


def _backend(name: str | None):
    return contextlib.nullcontext() if name in (None, "auto") else fastrnn.use_backend(name)


def recording_path(device: torch.device, backend: str | None) -> str:
    """What records the norms: the Triton kernels, or the reference loop (the native kernels
    cannot record, so the layers switch to it while recording)."""
    probe = fastrnn.ManyToOne(2, HIDDEN, 1, cell="lstm").to(device)
    try:
        with _backend(backend), fastrnn.record_gradient_flow():
            path = fastrnn.routing.route(probe, torch.zeros(1, 1, 2, device=device)).path
    except RuntimeError:
        return "nothing (the backend raised, see the errors below)"
    return "the Triton kernels" if path == "triton" else f"the reference loop (on the {device.type.upper()})"


def measure_cell(cell: str, forget_bias: float | None, batch, device: torch.device, backend: str | None = None) -> dict:
    torch.manual_seed(WEIGHT_SEED)
    module = fastrnn.ManyToOne(2, HIDDEN, 1, cell=cell).to(device)
    if forget_bias is not None:
        _set_forget_bias(module, forget_bias)
    x, y = batch
    with fastrnn.record_gradient_flow() as flow, _backend(backend):
        loss = F.mse_loss(module(x), y)
        loss.backward()
    norms = flow.norms()[0].double().cpu()
    first, last = float(norms[0]), float(norms[-1])
    return {
        "cell": cell,
        "forget_bias": forget_bias,
        "init": "torch.nn default" if forget_bias is None else f"torch.nn default, forget-gate bias {forget_bias:g}",
        "loss": loss.item(),
        "norms": [float(v) for v in norms],
        "ratio_first_last": first / last if last else None,
        # the first step (counting back from T-1) where the norm falls below 1e-6 of the last step's
        "steps_back_to_1e-6": next((STEPS - 1 - t for t in range(STEPS - 1, -1, -1) if norms[t] < 1e-6 * last), None),
    }


def run_section(device: torch.device, backend: str | None = None, log=None) -> dict:
    """Record the per-step gradient norms of each of :data:`CELLS` (fastrnn on ``backend``)."""
    log = log or (lambda line: None)
    started = time.perf_counter()
    section = {"task": "adding problem", "batch": BATCH, "steps": STEPS, "hidden": HIDDEN,
               "loss": "MSE of the prediction from the last step's state", "device": str(device),
               "backend": backend or "auto", "path": recording_path(device, backend), "cells": {}}
    batch = tasks.adding_problem(BATCH, STEPS, torch.Generator().manual_seed(DATA_SEED), device)
    for label, cell, forget_bias in CELLS:
        try:
            record = measure_cell(cell, forget_bias, batch, device, backend)
            log(f"    {label:<20} ||dL/dh_0|| / ||dL/dh_{STEPS - 1}|| = {record['ratio_first_last']:.2e}")
        except Exception as error:  # noqa: BLE001 - report it, carry on
            record = {"cell": cell, "forget_bias": forget_bias, "error": timing.describe_error(error),
                      "traceback": traceback.format_exc(limit=8)[-4000:]}
            log(f"    {label:<20} error: {record['error']}")
        section["cells"][label] = record
    section["seconds"] = round(time.perf_counter() - started, 1)
    return section
