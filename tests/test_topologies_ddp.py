"""ManyToOne under DistributedDataParallel: two processes, each on half of the batch, end with the
parameters one process reaches on the whole batch.

gloo on the CPU, ``torch.multiprocessing`` spawn, ``MASTER_ADDR=127.0.0.1`` and a free port. The
model runs in float64 with variable lengths (packed sequences), so the only difference between the
two runs is the order of the gradient sums, and the parameters agree to 1e-10.
"""

from __future__ import annotations

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from fastrnn.topologies import ManyToOne

WORLD = 2
STEPS = 5
BATCH = 8  # split evenly: DDP averages the two halves' mean-loss gradients = the whole batch's
TIMEOUT_S = 120


def make_model() -> ManyToOne:
    torch.manual_seed(0)
    return ManyToOne(3, 8, 2, cell="lstm", num_layers=2, bidirectional=True, dtype=torch.float64)


def make_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 7, 3, generator=g, dtype=torch.float64)
    y = torch.randn(BATCH, 2, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, 8, (BATCH,), generator=g)
    return x, y, lengths


def train(model, x, y, lengths) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(STEPS):
        loss = F.mse_loss(model(x, lengths), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, port: int, out_path: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        model = DistributedDataParallel(make_model())
        x, y, lengths = make_data()
        rows = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        train(model, x[rows], y[rows], lengths[rows])
        if rank == 0:
            torch.save(model.module.state_dict(), out_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_matches_one_process(tmp_path):
    out_path = str(tmp_path / "ddp.pt")
    context = mp.spawn(_worker, args=(free_port(), out_path), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    ddp_state = torch.load(out_path)

    single = make_model()
    initial = {name: p.detach().clone() for name, p in single.state_dict().items()}
    train(single, *make_data())
    for name, p in single.state_dict().items():
        assert not torch.equal(p, initial[name]), f"{name} did not train"
        torch.testing.assert_close(ddp_state[name], p, atol=1e-10, rtol=0, msg=name)
