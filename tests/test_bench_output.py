"""Where ``python -m bench`` writes, and what it prints.

* A user's run writes to ``bench/out/`` (ignored by git) unless ``--out`` says otherwise, so the
  checkout stays clean; the committed results under ``bench/results/`` stay tracked.
* A same-day rerun takes a new name instead of overwriting the earlier run's files.
* The tables printed to the terminal fit 120 columns (the markdown report holds every column), on
  the committed CPU results and on GPU-matrix rows with the widest cells they can have.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed; it runs from the checkout
    sys.path.insert(0, str(ROOT))

from bench import matrix, report  # noqa: E402
from bench.__main__ import DEFAULT_OUT, RESULTS_DIR, fresh_results_path, parse_args  # noqa: E402

COMMITTED = ROOT / "bench" / "results" / "cpu-2026-11-26.json"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)


def test_default_output_is_ignored_by_git_and_committed_results_are_not():
    if shutil.which("git") is None or _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true":
        pytest.skip("needs a git checkout")
    assert parse_args([]).out == DEFAULT_OUT != RESULTS_DIR
    assert parse_args(["--out", "elsewhere"]).out == Path("elsewhere")
    for name in ("cpu-2026-12-01.json", "cpu-quick-2026-12-01-2.md", "cpu-2026-12-01-speedup.png"):
        path = DEFAULT_OUT / name
        assert _git("check-ignore", "-q", str(path)).returncode == 0, f"{path} is not ignored by git"
    committed = _git("ls-files", "--error-unmatch", str(COMMITTED.relative_to(ROOT)))
    assert committed.returncode == 0, "the results the README cites must stay tracked"
    assert _git("check-ignore", "-q", str(RESULTS_DIR / "cpu-2026-12-01.json")).returncode == 1


def test_rerun_takes_a_new_name(tmp_path):
    first = fresh_results_path(tmp_path, "cpu", "2026-12-01")
    assert first == tmp_path / "cpu-2026-12-01.json"
    first.write_text("{}")
    second = fresh_results_path(tmp_path, "cpu", "2026-12-01")
    assert second == tmp_path / "cpu-2026-12-01-2.json"
    (tmp_path / "cpu-2026-12-01-2.md").write_text("")  # a report without its JSON still claims the name
    assert fresh_results_path(tmp_path, "cpu", "2026-12-01") == tmp_path / "cpu-2026-12-01-3.json"
    assert fresh_results_path(tmp_path, "cpu-quick", "2026-12-01") == tmp_path / "cpu-quick-2026-12-01.json"
    assert fresh_results_path(tmp_path, "cpu", "2026-12-02") == tmp_path / "cpu-2026-12-02.json"


def _widest_gpu_rows(data: dict) -> dict:
    """The committed results with every GPU-matrix row in place of the CPU rows, each with the
    widest cells the table can show: a failed check, five-digit times, torch.nn in another dtype
    than the row (fp16 against bf16) and a two-digit speedup."""
    template = data["rows"][0]
    rows = []
    for gpu_row in matrix.GPU_MATRIX:
        row = copy.deepcopy(template)
        row.update(name=gpu_row.name, description=gpu_row.describe(), status="skipped")
        row["check"]["max_rel_err"] = 1.234e-2
        row["variants"]["torch_fp16"] = row["variants"].pop("torch_fp32")
        for variant in ("fastrnn", "torch_fp16"):
            for mode in ("forward", "train"):
                row["variants"][variant][mode]["median_ms"] = 12345.6
        row["anchor"] = {"forward": "torch_fp16", "train": "torch_fp16"}
        row["speedup"] = row["paired_speedup"] = {"forward": 12.345, "train": 12.345}
        rows.append(row)
    return {**data, "rows": rows}


@pytest.mark.parametrize("which", ["committed CPU results", "widest GPU rows"])
def test_terminal_tables_fit_120_columns(which):
    data = report.load(COMMITTED)
    if which == "widest GPU rows":
        data = _widest_gpu_rows(data)
    printed = report.text_table(data) + "\n\n" + report.topology_text(data)
    lines = printed.splitlines()
    assert len(lines) > 2 * len(data["rows"]), "the tables must be there"
    for line in lines:
        assert len(line) <= report.TERMINAL_WIDTH, f"{len(line)} columns: {line}"
    for row in data["rows"]:
        assert any(line.startswith(f"{row['name']} ") and row["description"] in line for line in lines)
    if which == "widest GPU rows":
        assert "12346 fp16" in printed and "12.3x" in printed


def test_markdown_report_keeps_every_column():
    data = report.load(COMMITTED)
    header, cells = report.table_rows(data)
    text = report.markdown(data, {})
    assert "| " + " | ".join(header) + " |" in text
    assert all("| " + " | ".join(line) + " |" in text for line in cells)
    assert "compiled ref f+b" in header and "torch.nn construction" in text


def test_gradient_flow_plot_marks_zero_norms(tmp_path, monkeypatch):
    """The report's gradient-flow plot draws a zero norm as a mark along the bottom, not as a value."""
    section = copy.deepcopy(report.load(COMMITTED)["gradient_flow"])
    cell = next(iter(section["cells"].values()))
    cell["norms"][:3] = [0.0, 0.0, 0.0]
    drawn = {}
    original = report.plt.close
    monkeypatch.setattr(report.plt, "close", lambda fig: drawn.setdefault("fig", fig))
    report.plot_gradient_flow(section, tmp_path / "flow.png")
    ax = drawn["fig"].axes[0]
    original(drawn["fig"])
    label = next(iter(section["cells"]))
    lines = {line.get_label().split(" (")[0]: line for line in ax.get_lines()}
    assert all(value != value for value in lines[label].get_ydata()[:3])  # NaN: the line breaks
    marks = lines[f"{label}: exactly 0"]
    assert list(marks.get_xdata()) == [0, 1, 2] and marks.get_marker() == "x"
    assert marks.get_transform().contains_branch_seperately(ax.transData) == (True, False)
    assert (tmp_path / "flow.png").stat().st_size > 0
