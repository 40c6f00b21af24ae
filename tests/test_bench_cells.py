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


def _check(max_rel_err: float, tolerance: float = 1e-4) -> dict:
    """A :func:`bench.accuracy.check` record with one tensor's error (its ``passed`` as check sets it)."""
    return {"passed": max_rel_err <= tolerance, "tolerance": tolerance, "max_rel_err": max_rel_err,
            "worst": "dx", "errors": {"dx": max_rel_err}, "others": {}}


def test_accuracy_rule_within_tolerance_or_near_the_autograd_loop():
    """The rule on synthetic errors: within the dtype's tolerance passes without asking for the
    autograd loop's error; beyond it, within AUTOGRAD_FACTOR (1.5) times that error passes, past it fails."""
    asked = []

    def autograd(err):
        return lambda: asked.append(err) or err

    assert cells.judged(_check(9e-5), autograd(1e-9))["passed"] and asked == []  # tolerance branch
    assert "autograd_rel_err" not in cells.judged(_check(1e-4), autograd(1e-9))  # at the tolerance: passes

    near = cells.judged(_check(4.4e-4), autograd(3e-4))  # 4.4e-4 <= 1.5 * 3e-4: the autograd branch
    assert near["passed"] and near["autograd_rel_err"] == 3e-4 and asked == [3e-4]
    assert cells.judged(_check(4.5e-4), autograd(3e-4))["passed"]  # exactly at 1.5x
    far = cells.judged(_check(4.6e-4), autograd(3e-4))  # past 1.5x: fails
    assert not far["passed"] and far["autograd_rel_err"] == 3e-4
    assert not cells.judged(_check(2e-4), autograd(1e-5))["passed"]  # autograd exact, fastrnn beyond tol
    assert not cells.judged(_check(float("inf")), autograd(3e-4))["passed"]  # non-finite output


def test_a_row_that_raises_is_recorded_not_raised():
    """:func:`bench.runner.recorded`, the tail both sections' rows share: an error becomes the
    record's status ``error`` (with its traceback), a ``missing`` type the status ``missing``; the
    row's seconds are set and its progress line logged either way."""
    from bench.runner import recorded

    logged = []
    for raised, missing, status in [(ValueError("bad row"), (), "error"),
                                    (NotImplementedError("no kernel"), (NotImplementedError,), "missing")]:
        result = {"status": "ok"}
        with recorded(result, torch.device("cpu"), lambda r: f"row {r['status']}", logged.append, missing=missing):
            raise raised
        assert result["status"] == status and str(raised) in result["error"] and result["seconds"] >= 0
        assert ("traceback" in result) == (status == "error")
    result = {"status": "ok"}
    with recorded(result, torch.device("cpu"), lambda r: f"row {r['status']}", logged.append):
        pass
    assert result["status"] == "ok" and "error" not in result and logged == ["row error", "row missing", "row ok"]
