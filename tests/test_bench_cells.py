"""``python -m bench``'s cells section (:mod:`bench.cells`): the user's loops compute what fastrnn's
layers compute, and the section runs its GPU rows end to end on the CPU (``--dry-run`` sizes,
shrunk further here; without torch.compile of the cell, whose first call costs tens of seconds
on 2 cores: ``python -m bench --dry-run`` runs that path)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed; it runs from the checkout
    sys.path.insert(0, str(ROOT))

from bench import cells  # noqa: E402


@pytest.mark.parametrize("cell", list(cells.LAYERS))
def test_user_loop_computes_the_layer_in_float64(cell):
    row = cells.CellRow("t", cell, batch=3, steps=6, hidden=8, dtype="float64")
    layer, loops = cells.build(row, torch.device("cpu"), compile_cell=False)
    x = cells.samples(row, torch.device("cpu"), count=1)[0].input
    y, state = layer(x)
    y_user, state_user = loops["user_loop"](x)
    torch.testing.assert_close(y_user, y, rtol=0, atol=1e-12)
    for mine, theirs in zip(state if isinstance(state, tuple) else (state,),
                            state_user if isinstance(state_user, tuple) else (state_user,)):
        torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    grads_user = torch.autograd.grad(y_user.sum(), [x, *loops["user_loop"].parameters()])
    torch.testing.assert_close(grads_user[0], grads[0], rtol=0, atol=1e-12)  # the input's gradient


def test_dry_run_section_checks_and_times_every_gpu_row():
    logged = []
    section = cells.run_section(torch.device("cpu"), "auto", dry_run=True, divisors={"steps": 64, "hidden": 32, "batch": 16},
                                compile_cell=False, cpu_options=dict(warmup=1, budget_s=0.0, min_reps=2, max_reps=2),
                                log=logged.append)
    assert [r["name"] for r in section["rows"]] == [r.name for r in cells.GPU_ROWS]
    for record in section["rows"]:
        assert record["status"] == "ok", record.get("traceback", record)
        assert record["check"]["passed"] and record["check"]["max_rel_err"] < 1e-4
        assert record["check"]["user_loop_output_rel_err"]["user_loop"] < 1e-4
        for mode in ("forward", "train"):
            assert record["anchor"][mode] == "user_loop" and record["speedup"][mode] > 0
            assert record["variants"]["fastrnn"][mode]["reps"] == 2
    table = cells.table(section)
    assert all(f"| {r.name} |" in table for r in cells.GPU_ROWS) and not cells.problems(section)
    assert any("N1" in line and "->" in line for line in logged)
