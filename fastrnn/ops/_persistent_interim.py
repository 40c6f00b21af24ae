"""INTERIM stand-in for p12a's fastrnn/ops/persistent.py (replaced at merge)."""
import dataclasses
import os
import torch
import triton
from fastrnn.ops.recurrence import count_launch, triton_next_power_of_2


@dataclasses.dataclass(frozen=True)
class PPlan:
    slice: int
    slices: int
    block_b: int
    groups: int
    directions: int
    barrier: bool


def persistent_plan(gates, hidden, batch, directions, dtype):
    if os.environ.get("FASTRNN_STRATEGY") != "persistent":
        return None
    s = int(os.environ.get("FASTRNN_PERSISTENT_SLICE", "8"))
    return PPlan(s, triton.cdiv(hidden, s), 16, triton.cdiv(batch, 16), directions, os.environ.get("FASTRNN_PERSISTENT_MODE") == "barrier")


def launch_persistent(name, kernel, p, n_stages, kwargs, fault=0):
    grid = (p.slices, p.groups, p.directions)
    dev = kwargs["T"] and next(v for v in kwargs.values() if isinstance(v, torch.Tensor)).device
    flags = torch.zeros((p.directions, p.groups, p.slices), dtype=torch.int32, device=dev)
    error = torch.zeros(1, dtype=torch.int32, device=dev)
    spans = [(0, n_stages)] if p.barrier else [(k, k + 1) for k in range(n_stages)]
    for a, b in spans:
        kernel[grid](**kwargs, flags_ptr=flags, error_ptr=error, stage_begin=a, stage_end=b, max_spins=10**6,
                     BARRIER=p.barrier, BLOCK_FLAGS=triton_next_power_of_2(p.slices), FAULT=fault, num_warps=8)
        count_launch(f"{name}_persistent")
    if error.item():
        raise RuntimeError(f"{kernel.__name__} grid {grid}: a program waited too long")
