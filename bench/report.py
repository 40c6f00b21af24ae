"""Turn a results JSON into a terminal table, a markdown report and PNG plots.

Everything here reads the JSON file, never the live measurements, so a report can be redrawn
from any results file:

    python -m bench.report bench/results/cpu-2025-01-31.json [--out DIR]

writes ``<stem>.md``, ``<stem>-speedup.png`` and ``<stem>-batch-sweep.png`` next to the JSON
(or into ``--out``) and prints the table; when the file has them, also the topology section's
loss curves (``<stem>-loss-<task>.png``, one per task) and the gradient-flow plot
(``<stem>-gradient-flow.png``).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.transforms import blended_transform_factory  # noqa: E402

MODE_LABEL = {"forward": "fwd", "train": "fwd+bwd"}
#: The tables printed to the terminal fit this many columns; the markdown report holds every column.
TERMINAL_WIDTH = 120
#: fastrnn must reach this fraction of torch.nn's speed (forward+backward) on the CPU matrix.
CPU_REQUIREMENT = 0.9


def load(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------ formatting
def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _median(row: dict, variant: str | None, mode: str) -> float | None:
    if not variant:
        return None
    return row["variants"].get(variant, {}).get(mode, {}).get("median_ms")


def _variant_cell(row: dict, variant: str, mode: str) -> str:
    entry = row["variants"].get(variant)
    if entry is None:
        return "-"
    if "skipped" in entry:
        return "skip"
    if "error" in entry.get(mode, {}):
        return "error"
    return _ms(_median(row, variant, mode))


def _speedup(row: dict, mode: str) -> str:
    value = row.get("speedup", {}).get(mode)
    paired = row.get("paired_speedup", {}).get(mode)
    if value is None:
        return "-"
    return f"{value:.2f}x" + ("" if paired is None else f" (paired {paired:.2f}x)")


def _anchor_name(row: dict, mode: str) -> str:
    anchor = row.get("anchor", {}).get(mode)
    return anchor.removeprefix("torch_") if anchor else "-"


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f} MiB"


def table_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (times in ms, medians)."""
    header = ["row", "shape", "status", "rel err", "fastrnn fwd", "torch.nn fwd", "speedup fwd",
              "fastrnn f+b", "torch.nn f+b", "speedup f+b", "compiled ref f+b", "eager ref f+b",
              "us/step f+b", "TFLOP/s f+b", "peak mem f+b"]
    cells = []
    for row in data["rows"]:
        check = row.get("check", {})
        err = f"{check['max_rel_err']:.1e}" if "max_rel_err" in check else "-"
        fast_train = row["variants"].get("fastrnn", {}).get("train", {})
        line = [row["name"], row["description"], row["status"], err]
        for mode in ("forward", "train"):
            anchor = row.get("anchor", {}).get(mode)
            torch_cell = "-" if not anchor else f"{_ms(_median(row, anchor, mode))} ({_anchor_name(row, mode)})"
            line += [_variant_cell(row, "fastrnn", mode), torch_cell, _speedup(row, mode)]
        line += [_variant_cell(row, "compiled_ref", "train"), _variant_cell(row, "eager_ref", "train")]
        us = fast_train.get("us_per_step")
        tflops = fast_train.get("tflops")
        line += ["-" if us is None else f"{us:.3g}", "-" if tflops is None else f"{tflops:.3g}",
                 _bytes(fast_train.get("peak_mem_bytes"))]
        cells.append(line)
    return header, cells


def _short_ratio(value: float | None) -> str:
    """A speedup in at most five characters: ``0.99x``, ``12.3x``."""
    if value is None:
        return "-"
    return f"{value:.2f}x" if value < 9.995 else f"{value:.1f}x" if value < 99.95 else f"{value:.0f}x"


def text_table(data: dict) -> str:
    """The results table for the terminal, at most :data:`TERMINAL_WIDTH` wide: status, error and
    the forward and forward+backward medians of fastrnn and torch.nn with the speedup (the paired
    estimate where there is one). The markdown report holds every column."""
    header = ["row", "shape", "status", "rel err", "fwd fastrnn", "fwd torch", "fwd x", "f+b fastrnn", "f+b torch",
              "f+b x"]
    cells = []
    for row in data["rows"]:
        check = row.get("check", {})
        line = [row["name"], row["description"], row["status"],
                f"{check['max_rel_err']:.1e}" if "max_rel_err" in check else "-"]
        for mode in ("forward", "train"):
            anchor = row.get("anchor", {}).get(mode)
            torch_cell = "-" if not anchor else _ms(_median(row, anchor, mode))
            if anchor and not row["description"].endswith(" " + _anchor_name(row, mode)):
                torch_cell += f" {_anchor_name(row, mode)}"  # torch.nn timed in another dtype (GPU half rows)
            speedup = _plotted_speedup(row, mode)
            line += [_variant_cell(row, "fastrnn", mode), torch_cell, _short_ratio(speedup)]
        cells.append(line)
    legend = ("ms, medians; torch: torch.nn (with its dtype where it differs from the row's); "
              "x: torch.nn time / fastrnn time")
    return _align(header, cells) + "\n" + legend


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in cells]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ plots
def _plotted_speedup(row: dict, mode: str) -> float | None:
    """The paired estimate where there is one (CPU), else the ratio of medians."""
    paired = row.get("paired_speedup", {}).get(mode)
    return paired if paired is not None else row.get("speedup", {}).get(mode)


def plot_speedup(data: dict, path: Path) -> Path:
    """Bar chart: fastrnn's speedup over the torch.nn anchor per row, forward and forward+backward."""
    rows = data["rows"]
    names = [r["name"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.2))
    width = 0.38
    for offset, mode, color in ((-width / 2, "forward", "#4C72B0"), (width / 2, "train", "#DD8452")):
        values = [_plotted_speedup(r, mode) for r in rows]
        xs = [i + offset for i in range(len(rows))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=MODE_LABEL[mode], color=color)
        for bar, value, row in zip(bars, values, rows):
            label = f"{value:.2f}" if value is not None else row["status"]
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.axhline(1.0, color="black", linewidth=0.8)
    if data["environment"]["device_type"] == "cpu" and data.get("mode") != "dry-run":
        ax.axhline(CPU_REQUIREMENT, color="red", linewidth=0.8, linestyle="--", label=f"required {CPU_REQUIREMENT}x")
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("speedup over torch.nn (x)")
    ax.set_title(f"fastrnn vs torch.nn: {data['environment']['device']} ({data.get('mode', 'full')})")
    ax.legend(fontsize=8, loc="upper right", ncol=3)
    ax.set_ylim(0, max([1.35] + [1.3 * (_plotted_speedup(r, m) or 0) for r in rows for m in ("forward", "train")]))
    if any(r.get("paired_speedup") for r in rows):
        ax.set_ylabel("speedup over torch.nn (x), median of per-round ratios")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(data: dict, path: Path) -> Path | None:
    """Microseconds per timestep against batch size (the batch sweep), fastrnn and torch.nn."""
    sweep = data.get("sweep", {}).get("rows", [])
    if not sweep:
        return None
    series = {
        ("fastrnn", "train"): ("fastrnn fwd+bwd", "-o", "#DD8452"),
        ("anchor", "train"): ("torch.nn fwd+bwd", "--o", "#55A868"),
        ("fastrnn", "forward"): ("fastrnn fwd", "-s", "#4C72B0"),
        ("anchor", "forward"): ("torch.nn fwd", "--s", "#8172B2"),
    }
    lines = {}
    for (who, mode), style in series.items():
        points = []
        for row in sweep:
            variant = "fastrnn" if who == "fastrnn" else row.get("anchor", {}).get(mode)
            entry = row["variants"].get(variant or "", {}).get(mode, {})
            if "us_per_step" in entry:
                points.append((row["config"]["batch"], entry["us_per_step"]))
        if points:
            lines[style] = points
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    for (label, style, color), points in lines.items():
        ax.plot(*zip(*points), style, label=label, color=color, markersize=4)
    ax.set_xscale("log", base=2)
    batches = sorted({row["config"]["batch"] for row in sweep})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("microseconds per timestep (median)")
    ax.set_title(f"batch sweep: {data['sweep'].get('shape', '')}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss_curve(record: dict, path: Path) -> Path | None:
    """Training loss against step of one topology task: fastrnn and torch.nn on the same axes."""
    curves = record.get("curves", {})
    if not curves.get("fastrnn") and not curves.get("torch"):
        return None
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    heldout = record.get("heldout", {})
    styles = {"fastrnn": dict(color="#DD8452", linewidth=2.6, alpha=0.75, linestyle="-"),
              "torch": dict(color="#1f3b57", linewidth=1.0, alpha=1.0, linestyle="--")}
    for name, label in (("fastrnn", "fastrnn"), ("torch", "torch.nn")):
        values = curves.get(name)
        if not values:
            continue
        final = heldout.get(name)
        text = label + ("" if final is None else f" (held-out {final:.2g})")
        ax.plot(range(1, len(values) + 1), [max(v, 1e-12) for v in values], label=text, **styles[name])
    if record.get("baseline"):
        ax.axhline(record["baseline"], color="gray", linewidth=0.8, linestyle=":",
                   label=f"{record.get('baseline_label', 'baseline')} ({record['baseline']:.3g})")
    ax.set_yscale("log")
    ax.set_xlabel(f"training step ({record.get('optimizer', 'Adam')}, lr {record.get('lr', 0):g})")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title(f"{record['title']}: {record['topology']} {record['cell'].upper()}, {record['shape']}", fontsize=9)
    if record.get("max_curve_gap") is not None:
        ax.text(0.99, 0.02, f"largest relative gap between the curves: {record['max_curve_gap']:.1e}",
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="dimgray")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gradient_flow(section: dict, path: Path) -> Path | None:
    """``||dL/dh_t||`` against ``t`` (log scale), one line per cell, from the gradient-flow section."""
    cells = {label: c for label, c in section.get("cells", {}).items() if c.get("norms")}
    if not cells:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = ["#C44E52", "#4C72B0", "#55A868", "#8172B2"]
    bottom = blended_transform_factory(ax.transData, ax.transAxes)
    for (label, cell), color in zip(cells.items(), colors):
        norms = [v if v > 0 else float("nan") for v in cell["norms"]]  # a zero has no place on a log scale
        ratio = cell.get("ratio_first_last")
        text = label + ("" if ratio is None else f" (first/last {ratio:.1e})")
        ax.semilogy(range(len(norms)), norms, label=text, color=color, linewidth=1.6)
        zeros = [t for t, v in enumerate(cell["norms"]) if v == 0]
        if zeros:
            ax.plot(zeros, [0.04] * len(zeros), "x", color=color, transform=bottom, label=f"{label}: exactly 0")
    steps = section.get("steps")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("||dL/dh_t||")
    ax.set_title(f"gradient flow, {section.get('task', '')}: T={steps}, B={section.get('batch')}, "
                 f"H={section.get('hidden')}, untrained; loss on the last step", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ topologies
def _ran(section: dict | None) -> bool:
    return bool(section) and "skipped" not in section


def topology_tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, cells) of the topology section's tables: timing, then training."""
    section = data.get("topologies")
    if not _ran(section):
        return []
    timing_header = ["module", "cell", "shape", "torch.nn construction", "status", "rel err",
                     "fastrnn ms/step", "torch.nn ms/step", "speedup"]
    timing_cells = []
    for r in section.get("timing", []):
        check = r.get("check", {})
        err = f"{check['max_rel_err']:.1e}" if "max_rel_err" in check else "-"
        cells = [r["name"], r["cell"], r["shape"], r["torch_construction"], r["status"], err]
        for name in ("fastrnn", "torch"):
            entry = r.get("variants", {}).get(name, {})
            cells.append("error" if "error" in entry else _ms(entry.get("median_ms")))
        value, paired = r.get("speedup"), r.get("paired_speedup")
        cells.append("-" if value is None else f"{value:.2f}x" + ("" if paired is None else f" (paired {paired:.2f}x)"))
        timing_cells.append(cells)
    training_header = ["task", "module", "cell", "shape", "steps", "held-out before", "final train loss (last 20)",
                       "held-out fastrnn", "held-out torch.nn", "trivial predictor", "largest curve gap"]
    training_cells = []
    for r in section.get("training", []):
        h = r.get("heldout", {})
        fast = r.get("curves", {}).get("fastrnn") or []
        tail = fast[-20:]
        cells = [r["title"], r["topology"], r["cell"], r["shape"], str(r["steps"]),
                 _loss(h.get("initial")), _loss(sum(tail) / len(tail) if tail else None),
                 _loss(h.get("fastrnn")), _loss(h.get("torch")), f"{r['baseline']:.3g} ({r['baseline_label']})",
                 "-" if r.get("max_curve_gap") is None else f"{r['max_curve_gap']:.1e}"]
        if r.get("status") != "ok":
            cells[5] = f"{r['status']}: {r.get('error', '')[:60]}"
        training_cells.append(cells)
    return [("topologies: one training step (forward, backward, Adam), median", timing_header, timing_cells),
            ("topologies: training on synthetic tasks (MSE)", training_header, training_cells)]


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _align(header: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *cells)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    return "\n".join(line.rstrip() for line in lines)


def gradient_flow_caption(section: dict | None) -> str | None:
    """One line: the measured ``||dL/dh_0|| / ||dL/dh_{T-1}||`` of each cell."""
    if not _ran(section):
        return None
    steps = section.get("steps")
    parts = []
    for label, cell in section.get("cells", {}).items():
        if "error" in cell:
            parts.append(f"{label}: error")
            continue
        ratio = cell.get("ratio_first_last")
        back = cell.get("steps_back_to_1e-6")
        parts.append(f"{label} **{ratio:.1e}**" + ("" if back is None else f" (falls 6 decades in {back} steps)"))
    return f"Measured ||dL/dh_0|| / ||dL/dh_{steps - 1}||: " + "; ".join(parts) + "."


def _terminal_topology_tables(data: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The topology tables with the columns that fit :data:`TERMINAL_WIDTH` (the markdown report
    has all of them): timing without the torch.nn construction and with the paired speedup only,
    training with the held-out losses."""
    tables = topology_tables(data)
    if not tables:
        return []
    (timing_title, timing_header, timing_cells), (training_title, training_header, training_cells) = tables
    records = data["topologies"].get("timing", [])
    speedups = []
    for r in records:
        value = r.get("paired_speedup") if r.get("paired_speedup") is not None else r.get("speedup")
        speedups.append(_short_ratio(value))
    timing = _columns(timing_header, timing_cells, ["module", "cell", "shape", "status", "rel err", "fastrnn ms/step",
                                                    "torch.nn ms/step"])
    timing = (timing[0] + ["speedup"], [line + [x] for line, x in zip(timing[1], speedups)])
    training = _columns(training_header, training_cells, ["task", "module", "cell", "steps", "held-out before",
                                                         "held-out fastrnn", "held-out torch.nn", "largest curve gap"])
    return [(timing_title, *timing), (training_title.replace("(MSE)", "(MSE, held-out batch)"), *training)]


def _columns(header: list[str], cells: list[list[str]], keep: list[str]) -> tuple[list[str], list[list[str]]]:
    """The columns named ``keep`` of a table, in that order."""
    index = [header.index(name) for name in keep]
    return keep, [[line[i] for i in index] for line in cells]


def topology_text(data: dict) -> str:
    """The topology tables and the gradient-flow ratios as plain text for the terminal, at most
    :data:`TERMINAL_WIDTH` wide."""
    blocks = [f"{title}\n{_align(header, cells)}" for title, header, cells in _terminal_topology_tables(data)]
    caption = gradient_flow_caption(data.get("gradient_flow"))
    if caption:
        blocks.append(textwrap.fill("gradient flow: " + caption.replace("**", ""), TERMINAL_WIDTH,
                                    subsequent_indent="  "))
    return "\n\n".join(blocks)


def section_problems(data: dict) -> list[str]:
    """Names of topology cases, training runs and gradient-flow cells that failed or errored."""
    problems = []
    section = data.get("topologies")
    if _ran(section):
        problems += [f"topology {r['name']}" for r in section.get("timing", []) if r.get("status") != "ok"]
        problems += [f"training {r['task']}" for r in section.get("training", []) if r.get("status") != "ok"]
    flow = data.get("gradient_flow")
    if _ran(flow):
        problems += [f"gradient flow {label}" for label, c in flow.get("cells", {}).items() if "error" in c]
    return problems


def _timing_problem(record: dict) -> str:
    text = f"- {record['name']}: {record['status']}"
    check = record.get("check", {})
    if record["status"] == "failed" and check:
        text += f", {check['worst']} rel err {check['max_rel_err']:.2e} > {check['tolerance']:.0e}"
    if record.get("error"):
        text += f", `{record['error']}`"
    for name, variant in record.get("variants", {}).items():
        if "error" in variant:
            text += f"; {name}: `{variant['error'][:200]}`"
    return text


def _topology_lines(data: dict, loss_plots: dict[str, Path | None]) -> list[str]:
    section = data.get("topologies")
    if section is None:
        return []
    lines = ["", "## Topologies: the five modules against torch.nn", ""]
    if "skipped" in section:
        return lines + [f"Skipped: {section['skipped']}."]
    sizes = section.get("sizes", {})
    lines += [
        f"Each fastrnn topology module (backend `{section.get('backend', 'auto')}`, {section.get('device')}) against "
        "the torch.nn construction holding the same weights (`load_state_dict`): torch.nn.LSTM/GRU/RNN, batch-first, "
        "and an nn.Linear head; where fastrnn generates with feedback (OneToMany, Seq2Seq.generate) a Python loop of "
        f"torch.nn cells sharing the layer's weights. Batch {sizes.get('batch')}, hidden {sizes.get('hidden')}, one "
        "layer, float32. A step is forward, backward and an Adam step on one of three rotating batches of the task; "
        "`rel err` is the largest relative error of the loss and every parameter gradient of one step, fastrnn "
        f"against torch.nn (bound {section.get('check_tolerance', 1e-4):.0e}). Speedup = torch.nn time / fastrnn "
        "time (on the CPU the two alternate round by round; paired = median of the per-round ratios).",
        "",
    ]
    tables = topology_tables(data)
    lines.append(markdown_table(tables[0][1], tables[0][2]))
    lines += ["", "### Training on synthetic tasks", "",
              "Both constructions start from the same weights and see the same seeded batches (Adam). Held-out loss: "
              "one fixed batch, before training and after. The trivial predictor's loss is there for scale.", "",
              markdown_table(tables[1][1], tables[1][2])]
    for record in section.get("training", []):
        path = loss_plots.get(record["task"])
        if path is not None:
            lines += ["", f"![loss curve: {record['title']}]({path.name})"]
    problems = [_timing_problem(r) for r in section.get("timing", []) if r.get("status") != "ok"]
    problems += [f"- training {r['task']}: {r['status']}, `{r.get('error', '')}`"
                 for r in section.get("training", []) if r.get("status") != "ok"]
    if problems:
        lines += ["", "Problems:", "", *problems]
    lines.append(f"\n({section.get('seconds', 0):.0f} s for the topology section)")
    return lines


def _gradient_flow_lines(data: dict, plot: Path | None) -> list[str]:
    section = data.get("gradient_flow")
    if section is None:
        return []
    lines = ["", "## Gradient flow: ||dL/dh_t|| through time", ""]
    if "skipped" in section:
        return lines + [f"Skipped: {section['skipped']}."]
    lines += [
        f"Untrained ManyToOne modules (H={section.get('hidden')}) on one batch of the {section.get('task')} "
        f"(T={section.get('steps')}, B={section.get('batch')}); the loss is the {section.get('loss')}. "
        f"`fastrnn.record_gradient_flow()` records the norm of the gradient reaching each step's hidden state; "
        f"here it is recorded by {section.get('path')}. The LSTM with forget-gate bias 1 is the same LSTM with the "
        "forget slice of `bias_ih` set to 1 and of `bias_hh` to 0 (torch.nn's default init starts the forget gate "
        "near 0.5).",
        "",
    ]
    if plot is not None:
        lines += [f"![gradient flow]({plot.name})", ""]
    lines.append(gradient_flow_caption(section))
    errors = [f"- {label}: `{c['error']}`" for label, c in section.get("cells", {}).items() if "error" in c]
    return lines + (["", *errors] if errors else [])


# ------------------------------------------------------------------------------------ markdown
def _environment_lines(env: dict) -> list[str]:
    git = env.get("git", {})
    commit = (git.get("commit") or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    lines = [
        f"- device: **{env.get('card') or env.get('device')}**"
        + (f", driver {env['driver']}" if env.get("driver") else ""),
        f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, triton {env.get('triton')}, "
        f"python {env.get('python')}",
        f"- CPU: {env.get('cpu_model')} ({env.get('cpu_count')} cores; torch threads {env.get('torch_threads')})",
        f"- commit {commit}; measured {env.get('date_utc')}",
    ]
    if env.get("threads_note"):
        lines.append(f"- {env['threads_note']}")
    if env.get("load_average"):
        lines.append(f"- load average (1/5/15 min) at the start: {', '.join(f'{x:.1f}' for x in env['load_average'])}"
                     + (f"; at the end: {', '.join(f'{x:.1f}' for x in env['load_average_end'])}"
                        if env.get("load_average_end") else ""))
    if env.get("device_type") == "cuda":
        tf32 = env.get("tf32", {})
        lines.append(f"- TF32: matmul {tf32.get('matmul')}, cuDNN {tf32.get('cudnn')}")
    return lines


def _requirement_lines(data: dict) -> list[str]:
    if data["environment"]["device_type"] != "cpu" or data.get("mode") == "dry-run":
        return []
    lines = ["", f"## Requirement: fastrnn at least {CPU_REQUIREMENT}x torch.nn forward+backward (CPU)", ""]
    lines.append("torch.nn time / fastrnn time. fastrnn and torch.nn are timed in alternating rounds; the verdict "
                 "uses the median of the per-round ratios (each pair saw the same load from the rest of the "
                 "machine), the ratios of the medians and of the minimums are shown beside it.")
    lines.append("")
    for row in data["rows"]:
        value = row.get("speedup", {}).get("train")
        paired = row.get("paired_speedup", {}).get("train")
        fastest = row.get("min_speedup", {}).get("train")
        decisive = paired if paired is not None else value
        verdict = "no measurement" if decisive is None else "pass" if decisive >= CPU_REQUIREMENT else "FAIL"
        shown = "-" if decisive is None else f"**{decisive:.3f}x**"
        extra = [f"{label} {v:.3f}x" for label, v in (("medians", value), ("minimums", fastest)) if v is not None]
        lines.append(f"- {row['name']} {row['description']}: {shown} ({verdict}; {', '.join(extra)})")
    return lines


def _interpreter_lines(data: dict) -> list[str]:
    interp = data.get("interpreter")
    if not interp:
        return []
    lines = ["", "## Triton kernels through the interpreter (CPU, float64 reference)", ""]
    if interp.get("error"):
        return lines + [f"The interpreter pass did not run: `{interp['error']}`"]
    lines += ["| case | shape | status | rel err | note |", "|---|---|---|---|---|"]
    for case in interp["cases"]:
        err = f"{case['max_rel_err']:.1e}" if "max_rel_err" in case else "-"
        note = (case.get("message") or "").replace("|", "/").replace("\n", " ")[:120]
        lines.append(f"| {case['case']} | {case['description']} | {case['status']} | {err} | {note} |")
    lines.append(f"\n({interp.get('seconds', 0):.0f} s in a child process with "
                 "TRITON_INTERPRET=1 FASTRNN_BACKEND=triton)")
    return lines


def _notes(data: dict) -> list[str]:
    notes = []
    for row in data["rows"] + data.get("sweep", {}).get("rows", []):
        if row["status"] == "failed":
            c = row["check"]
            others = ", ".join(f"{k} {v:.1e}" for k, v in c.get("others", {}).items())
            notes.append(f"- {row['name']}: check failed, {c['worst']} rel err {c['max_rel_err']:.2e} > "
                         f"{c['tolerance']:.0e}" + (f" (torch.nn in the same dtype: {others})" if others else ""))
        if row.get("error"):
            kind = {"skipped": "skipped", "missing": "kernel missing"}.get(row["status"], "error")
            notes.append(f"- {row['name']}: {kind}, `{row['error']}`")
        for name, variant in row.get("variants", {}).items():
            if "skipped" in variant and variant["skipped"] != "not measured for this row":
                notes.append(f"- {row['name']} {name}: skipped, {variant['skipped']}")
            for mode in ("forward", "train"):
                if "error" in variant.get(mode, {}):
                    notes.append(f"- {row['name']} {name} {MODE_LABEL[mode]}: `{variant[mode]['error'][:200]}`")
    return ["", "## Notes", ""] + notes if notes else []


def markdown(data: dict, plots: dict[str, Path | None], loss_plots: dict[str, Path | None] | None = None,
             flow_plot: Path | None = None) -> str:
    """The markdown report of ``data``; ``plots`` maps a title to a PNG path (relative links),
    ``loss_plots`` a topology task's name to its loss-curve PNG, ``flow_plot`` the gradient-flow PNG."""
    env = data["environment"]
    plan = data.get("plan", {})
    header, cells = table_rows(data)
    title = f"# fastrnn benchmark: {env['device']}, {env['date_utc'][:10]} ({data.get('mode', 'full')})"
    if not data.get("complete", True):
        title += " -- INCOMPLETE: the run stopped before the end"
    lines = [title, ""]
    lines += _environment_lines(env)
    lines += [
        "",
        "Medians in milliseconds; the JSON next to this file holds the 20/80 percentiles and every raw figure. "
        "`fwd` is an inference forward (no_grad); `f+b` is forward and backward (input and weight gradients). "
        "The torch.nn column names the dtype of the anchor (on GPU, the faster of fp16 and bf16 for half rows). "
        "Each row is checked against float64 (output, final states, every gradient) before it is timed; a row "
        "over its tolerance is reported failed and not timed. "
        f"Skip rules: eager reference past T*layers {plan.get('eager_max_steps')}, compiled reference past "
        f"{plan.get('compile_max_steps')}" + ("" if plan.get("compile", True) else " (compile disabled)") + ".",
        "",
        markdown_table(header, cells),
    ]
    lines += _requirement_lines(data)
    for title, path in plots.items():
        if path is not None:
            lines += ["", f"## {title}", "", f"![{title}]({path.name})"]
    if data.get("sweep", {}).get("rows"):
        sweep_header, sweep_cells = table_rows({"rows": data["sweep"]["rows"]})
        lines += ["", "### Batch sweep figures", "", markdown_table(sweep_header, sweep_cells)]
    lines += _topology_lines(data, loss_plots or {})
    lines += _gradient_flow_lines(data, flow_plot)
    lines += _interpreter_lines(data)
    lines += _notes(data)
    lines.append(f"\nTotal run time {data.get('seconds', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def write_report(json_path: Path | str, out_dir: Path | str | None = None) -> Path:
    """Draw the plots and write the markdown report of the results file ``json_path``."""
    json_path = Path(json_path)
    out_dir = Path(out_dir) if out_dir else json_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load(json_path)
    stem = json_path.stem
    plots = {
        "Speedup over torch.nn": plot_speedup(data, out_dir / f"{stem}-speedup.png"),
        "Microseconds per step against batch size": plot_sweep(data, out_dir / f"{stem}-batch-sweep.png"),
    }
    loss_plots = {}
    if _ran(data.get("topologies")):
        for record in data["topologies"].get("training", []):
            loss_plots[record["task"]] = plot_loss_curve(record, out_dir / f"{stem}-loss-{record['task']}.png")
    flow = data.get("gradient_flow")
    flow_plot = plot_gradient_flow(flow, out_dir / f"{stem}-gradient-flow.png") if _ran(flow) else None
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(data, plots, loss_plots, flow_plot))
    return md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a results JSON written by python -m bench")
    parser.add_argument("--out", type=Path, help="where to write the report (default: next to the JSON)")
    args = parser.parse_args(argv)
    md_path = write_report(args.results, args.out)
    data = load(args.results)
    print(text_table(data))
    extra = topology_text(data)
    if extra:
        print("\n" + extra)
    print(f"\nwrote {md_path}")


if __name__ == "__main__":
    main()
