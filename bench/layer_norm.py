"""LayerNormLSTM / LayerNormGRU on the CPU: fastrnn against the ``nn.LayerNorm`` cell loop a user writes.

    python -m bench.layer_norm                 # B16 T256 I256 H256, forward+backward, float32, 1 torch thread
    python -m bench.layer_norm --out bench/results
    python -m bench.layer_norm --threads 2     # torch's default thread count on a 2-core machine
    python -m bench.layer_norm --no-compile    # without the torch.compile'd cell (it compiles for a minute)

The user's loop is the usual answer to "layer-normalised LSTM in PyTorch" (pytorch issues 7032,
11335): an ``nn.Module`` cell with ``nn.Linear`` input and recurrent maps, one ``nn.LayerNorm``
each (affine, no shift) and one on the cell state, stepped in a Python loop under autograd. It
gets fastrnn's parameters, and the two must agree before anything is timed. The user's loop is
timed twice: eager, and with the cell under ``torch.compile`` (the loop stays in Python: compiling
the whole loop unrolls all T steps, which takes minutes on a CPU); the speedup the issue asks for
is against the faster of the two. fastrnn is timed on its default path (the hand-written backward
through time) and on the reference backend (the autograd loop with the input side hoisted out of
the loop: what a user who also hoists ``nn.Linear`` + ``nn.LayerNorm`` of the input gets).

Timing: interleaved rounds (``bench.timing.time_cpu``), median, and the median of the per-round
ratios (each pair of calls saw the same load); the load average at the start and end of each
cell is recorded, since on a shared machine it moves the figures. Every implementation agrees
with fastrnn in float64 (to 1e-9) before the float32 timings. Each call's CPU time (the process's
user + system time, which other processes' load moves far less than the wall clock) is recorded
beside its wall time.

Breakdown (:func:`gemm_ms`): the matrix products each side computes, at their shapes and in their
number, timed alone (CPU time, median of three walks); what is left of a side's CPU time is its
elementwise, norm, allocation and Python time. Timed alone the products find their operands in
cache more often than inside a run, so the split errs towards "the rest". They bound the speedup:
the user's loop over fastrnn's products alone is what fastrnn would reach with nothing else left.
Writes ``layer-norm-cpu-<date>.json`` and ``.md`` (``layer-norm-cpu-<date>-<N>threads.*`` with ``--threads N``
other than 1: torch's default on a machine is one thread per core, which is what a user's loop gets).
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

import torch
from torch import nn

import fastrnn
from bench.environment import cpu_model, describe, load_average
from bench.timing import time_cpu


class UserLayerNormLSTMCell(nn.Module):
    """The cell a user writes with ``nn.LayerNorm`` (haste's equations)."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size))
        self.ln_ih = nn.LayerNorm(4 * hidden_size, bias=False)
        self.ln_hh = nn.LayerNorm(4 * hidden_size, bias=False)
        self.ln_cell = nn.LayerNorm(hidden_size)

    def forward(self, x, state):
        h, c = state
        gates = self.ln_ih(self.ih(x)) + self.ln_hh(self.hh(h)) + self.bias
        i, f, g, o = gates.chunk(4, dim=-1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(self.ln_cell(c)), c


class UserLayerNormGRUCell(nn.Module):
    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.ih = nn.Linear(input_size, 3 * hidden_size)
        self.hh = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.bias_hh = nn.Parameter(torch.zeros(3 * hidden_size))
        self.ln_ih = nn.LayerNorm(3 * hidden_size, bias=False)
        self.ln_hh = nn.LayerNorm(3 * hidden_size, bias=False)

    def forward(self, x, state):
        (h,) = state
        a = self.ln_ih(x @ self.ih.weight.T) + self.ih.bias
        b = self.ln_hh(self.hh(h)) + self.bias_hh
        a_r, a_z, a_n = a.chunk(3, dim=-1)
        b_r, b_z, b_n = b.chunk(3, dim=-1)
        r, z = torch.sigmoid(a_r + b_r), torch.sigmoid(a_z + b_z)
        n = torch.tanh(a_n + r * b_n)
        return ((1 - z) * n + z * h,)


def user_loop(cell: nn.Module, x: torch.Tensor, state: tuple) -> torch.Tensor:
    outputs = []
    for t in range(x.shape[0]):
        state = cell(x[t], state)
        if not isinstance(state, tuple):
            state = (state,)
        outputs.append(state[0])
    return torch.stack(outputs)


def user_cell_from(module, kind: str, cell: nn.Module | None = None) -> nn.Module:
    """The user's cell holding ``module``'s layer-0 parameters (copied into ``cell`` if given, else
    into a new cell in ``module``'s dtype: the LSTM's one bias is ``b_ih + b_hh`` summed in that dtype,
    as fastrnn sums them)."""
    p = {name.rsplit("_l0", 1)[0]: w for name, w in module.named_parameters()}
    I, H = module.input_size, module.hidden_size
    if cell is None:
        cell = (UserLayerNormLSTMCell(I, H) if kind == "lstm" else UserLayerNormGRUCell(I, H)).to(p["weight_ih"])
    with torch.no_grad():
        if kind == "lstm":
            cell.bias.copy_(p["bias_ih"] + p["bias_hh"])
            cell.ln_cell.weight.copy_(p["gain_cell"])
            cell.ln_cell.bias.copy_(p["bias_cell"])
        else:
            cell.ih.bias.copy_(p["bias_ih"])
            cell.bias_hh.copy_(p["bias_hh"])
        cell.ih.weight.copy_(p["weight_ih"])
        cell.hh.weight.copy_(p["weight_hh"])
        cell.ln_ih.weight.copy_(p["gain_ih"])
        cell.ln_hh.weight.copy_(p["gain_hh"])
    return cell


def gemm_ms(kind: str, B: int, T: int, I: int, H: int, reps: int = 3) -> dict[str, float]:
    """CPU ms of the matrix products of one forward+backward, float32, each side's as it computes
    them (the input takes no gradient): fastrnn per time chunk (:func:`fastrnn.layer_norm_rnn._chunks`)
    the input product and the two weight gradients, per step the recurrent product and ``dh``; the
    user's loop per step both forward products, ``dh`` and the two weight gradients of the step
    (rank ``B``, as autograd computes them). Median of ``reps`` walks."""
    from fastrnn.layer_norm_rnn import _chunks

    G = (4 if kind == "lstm" else 3) * H
    x, h, dg = torch.randn(T * B, I), torch.randn(T * B, H), torch.randn(T * B, G)
    w_ih, w_hh, d_w_ih, d_w_hh = torch.randn(G, I), torch.randn(G, H), torch.zeros(G, I), torch.zeros(G, H)
    out_r = torch.empty(B, G)

    def fastrnn_products():
        for lo, hi in _chunks(T, B, G, False):
            rows = slice(lo * B, hi * B)
            torch.mm(x[rows], w_ih.T)
            d_w_hh.addmm_(dg[rows].T, h[rows])
            d_w_ih.addmm_(dg[rows].T, x[rows])
        for t in range(T):
            rows = slice(t * B, (t + 1) * B)
            torch.mm(h[rows], w_hh.T, out=out_r)
            torch.mm(dg[rows], w_hh)

    def user_products():
        for t in range(T):
            rows = slice(t * B, (t + 1) * B)
            torch.mm(x[rows], w_ih.T)
            torch.mm(h[rows], w_hh.T)
            torch.mm(dg[rows], w_hh)
            torch.mm(dg[rows].T, h[rows])
            torch.mm(dg[rows].T, x[rows])

    times = {}
    for name, fn in (("fastrnn", fastrnn_products), ("user", user_products)):
        fn()
        samples = []
        for _ in range(reps):
            started = time.process_time()
            fn()
            samples.append((time.process_time() - started) * 1e3)
        times[name] = statistics.median(samples)
    return times


def with_cpu_time(fn, samples: list):
    """``fn`` that also appends each call's CPU time (ms, :func:`time.process_time`) to ``samples``."""
    def timed():
        started = time.process_time()
        out = fn()
        samples.append((time.process_time() - started) * 1e3)
        return out

    return timed


EAGER, COMPILED = "nn.LayerNorm cell loop", "nn.LayerNorm cell loop, torch.compile(cell)"


def run(kind: str, B: int, T: int, I: int, H: int, compile_cell: bool = True, budget_s: float = 20.0) -> dict:
    torch.manual_seed(0)
    module = (fastrnn.LayerNormLSTM if kind == "lstm" else fastrnn.LayerNormGRU)(I, H)
    cell = user_cell_from(module, kind)
    compiled = torch.compile(cell) if compile_cell else None
    x = torch.randn(T, B, I)
    zeros = torch.zeros(B, H)
    state = (zeros, zeros) if kind == "lstm" else (zeros,)

    def fastrnn_step(backend="auto"):
        with fastrnn.use_backend(backend):
            y, _ = module(x)
            y.sum().backward()
        return y

    def user_step(step_cell=cell):
        y = user_loop(step_cell, x, state)
        y.sum().backward()
        return y

    fns = {"fastrnn": fastrnn_step, "fastrnn reference backend": lambda: fastrnn_step("reference"), EAGER: user_step}
    if compiled is not None:
        fns[COMPILED] = lambda: user_step(compiled)
    # Agreement in float64 (over 256 steps a layer-normalised LSTM amplifies fp32 rounding, on
    # all sides alike): the same outputs to 1e-9, then the float32 timings. The compiled cell
    # compiles here (float64) and again at the float32 warm-up; neither is timed.
    module.double(), user_cell_from(module, kind, cell.double())  # b_ih + b_hh summed in float64 too
    x, state = x.double(), tuple(s.double() for s in state)
    ours = fastrnn_step().detach()
    worst, compile_s = {}, {}
    for name, fn in fns.items():
        if name == "fastrnn":
            continue
        started = time.perf_counter()
        worst[name] = (fn() - ours).abs().max().item()
        compile_s[name] = time.perf_counter() - started
        assert worst[name] < 1e-9, f"fastrnn and {name} disagree by {worst[name]}"
    module.float(), cell.float()
    x, state = x.float(), tuple(s.float() for s in state)
    if compiled is not None:
        started = time.perf_counter()
        fns[COMPILED]()
        compile_s[COMPILED] = time.perf_counter() - started
    load_start = load_average()
    cpu_samples = {name: [] for name in fns}
    timings = time_cpu({name: with_cpu_time(fn, cpu_samples[name]) for name, fn in fns.items()}, warmup=1,
                       budget_s=budget_s, min_reps=5, max_reps=12)
    for name, t in timings.items():
        t["cpu_median_ms"] = statistics.median(cpu_samples[name][1:])  # the warm-up call left out
    products = gemm_ms(kind, B, T, I, H)
    baselines = [name for name in (EAGER, COMPILED) if name in timings]
    best = min(baselines, key=lambda name: timings[name]["median_ms"])
    speedup = {name: {base: timings[base]["median_ms"] / t["median_ms"] for base in baselines} for name, t in timings.items()}
    paired = {name: {base: statistics.median(b / a for a, b in zip(t["samples_ms"], timings[base]["samples_ms"]))
                     for base in baselines} for name, t in timings.items()}
    return dict(cell=f"LayerNorm{kind.upper()}", B=B, T=T, I=I, H=H, max_abs_difference_float64=worst,
                first_call_s={k: round(v, 2) for k, v in compile_s.items()}, load_average_start=load_start,
                load_average_end=load_average(), timings=timings, best_baseline=best, speedup=speedup, paired_speedup=paired,
                gemm_cpu_ms=products)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--shape", default="16,256,256,256", help="B,T,I,H")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: every side on one core)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd user cell")
    parser.add_argument("--budget-s", type=float, default=20.0, help="seconds of timed rounds per cell (5 to 12 rounds)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    B, T, I, H = map(int, args.shape.split(","))
    rows = [run(kind, B, T, I, H, not args.no_compile, args.budget_s) for kind in ("lstm", "gru")]
    info = describe(torch.device("cpu")) | {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()}
    command = "python -m bench.layer_norm" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = "" if info["torch_threads"] == 1 else f"-{info['torch_threads']}threads"
    stem = out / f"layer-norm-cpu-{datetime.date.today().isoformat()}{threads}"
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "machine": info, "rows": rows}, indent=1))
    lines = [f"# LayerNorm cells, CPU, forward+backward float32 ({info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, "
             f"{info['torch_threads']} torch thread{'s' if info['torch_threads'] != 1 else ''})", "",
             f"`{command}` at {info['date_utc']}, commit {info['git']['commit'][:12] if info['git']['commit'] else '?'}"
             f"{' (dirty)' if info['git']['dirty'] else ''}. Median ms of interleaved rounds; speedup = the user's loop / "
             "this (ratio of medians, and in brackets the median of the per-round ratios). The user's loop is timed "
             "eager and with `torch.compile(cell)`; the last column is against the faster of the two.", ""]
    for row in rows:
        best = row["best_baseline"]
        load = [("?" if v is None else f"{v[0]:.1f}") for v in (row["load_average_start"], row["load_average_end"])]
        lines += [f"**{row['cell']} B{B} T{T} I{I} H{H}**: load average {load[0]} at the start, {load[1]} at the end "
                  "(1-minute); first calls (float64 check, compile): "
                  + ", ".join(f"{k} {v:.1f} s" for k, v in row["first_call_s"].items()) + ".", "",
                  "| implementation | median ms | rounds | vs eager loop | vs the faster loop (" + ("compiled" if best == COMPILED else "eager") + ") "
                  "| CPU ms | of which matrix products | the rest, us per step |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, t in row["timings"].items():
            cells = [f"{row['speedup'][name][base]:.2f}x ({row['paired_speedup'][name][base]:.2f}x)" for base in (EAGER, best)]
            gemm = row["gemm_cpu_ms"]["fastrnn" if name == "fastrnn" else "user" if name in (EAGER, COMPILED) else None] \
                if name in ("fastrnn", EAGER, COMPILED) else None
            split = ("| | |" if gemm is None else f"| {gemm:.1f} | {(t['cpu_median_ms'] - gemm) * 1e3 / T:.0f} |")
            lines.append(f"| {name} | {t['median_ms']:.1f} | {t['reps']} | {cells[0]} | {cells[1]} | {t['cpu_median_ms']:.1f} {split}")
        cpu = {name: t["cpu_median_ms"] for name, t in row["timings"].items()}
        best_cpu = min(cpu[name] for name in (EAGER, COMPILED) if name in cpu)
        gemm = row["gemm_cpu_ms"]
        lines += ["", f"Matrix products timed alone (CPU ms, the same shapes and number, float32): fastrnn {gemm['fastrnn']:.1f} "
                  f"({gemm['fastrnn'] * 1e3 / T:.0f} us per step), the user's loop {gemm['user']:.1f} ({gemm['user'] * 1e3 / T:.0f} us "
                  f"per step). In CPU time fastrnn is {best_cpu / cpu['fastrnn']:.2f}x the faster user's loop; with nothing but "
                  f"its products it would be {best_cpu / gemm['fastrnn']:.2f}x (the bound of this design), and 1.5x needs "
                  f"fastrnn's rest at most {(best_cpu / 1.5 - gemm['fastrnn']) * 1e3 / T:.0f} us per step.", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
