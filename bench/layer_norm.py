"""LayerNormLSTM / LayerNormGRU on the CPU: fastrnn against the ``nn.LayerNorm`` cell loop a user writes.

    python -m bench.layer_norm                 # B16 T256 I256 H256, forward+backward, float32
    python -m bench.layer_norm --out bench/results

The user's loop is the usual answer to "layer-normalised LSTM in PyTorch" (pytorch issues 7032,
11335): an ``nn.Module`` cell with ``nn.Linear`` input and recurrent maps, one ``nn.LayerNorm``
each (affine, no shift) and one on the cell state, stepped in a Python loop under autograd. It
gets fastrnn's parameters, and the two must agree before anything is timed. fastrnn is timed on
its default path (the hand-written backward through time) and on the reference backend (the
autograd loop, with the input-side norm hoisted out of the loop). Timing: interleaved rounds,
median (``bench.timing.time_cpu``); the agreement check runs in float64. Writes ``layer-norm-cpu-<date>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib

import torch
from torch import nn

import fastrnn
from bench.environment import calm_threads, cpu_model, describe
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


def user_cell_from(module, kind: str) -> nn.Module:
    """The user's cell holding ``module``'s layer-0 parameters."""
    p = {name.rsplit("_l0", 1)[0]: w for name, w in module.named_parameters()}
    I, H = module.input_size, module.hidden_size
    with torch.no_grad():
        if kind == "lstm":
            cell = UserLayerNormLSTMCell(I, H)
            cell.bias.copy_(p["bias_ih"] + p["bias_hh"])
            cell.ln_cell.weight.copy_(p["gain_cell"])
            cell.ln_cell.bias.copy_(p["bias_cell"])
        else:
            cell = UserLayerNormGRUCell(I, H)
            cell.ih.bias.copy_(p["bias_ih"])
            cell.bias_hh.copy_(p["bias_hh"])
        cell.ih.weight.copy_(p["weight_ih"])
        cell.hh.weight.copy_(p["weight_hh"])
        cell.ln_ih.weight.copy_(p["gain_ih"])
        cell.ln_hh.weight.copy_(p["gain_hh"])
    return cell


def run(kind: str, B: int, T: int, I: int, H: int) -> dict:
    torch.manual_seed(0)
    module = (fastrnn.LayerNormLSTM if kind == "lstm" else fastrnn.LayerNormGRU)(I, H)
    cell = user_cell_from(module, kind)
    x = torch.randn(T, B, I)
    zeros = torch.zeros(B, H)
    state = (zeros, zeros) if kind == "lstm" else (zeros,)

    def fastrnn_step(backend="auto"):
        with fastrnn.use_backend(backend):
            y, _ = module(x)
            y.sum().backward()
        return y

    def user_step():
        y = user_loop(cell, x, state)
        y.sum().backward()
        return y

    # Agreement in float64 (over 256 steps a layer-normalised LSTM amplifies fp32 rounding, on
    # both sides alike): the same outputs to 1e-9, then the float32 timings.
    module.double(), cell.double()
    x, state = x.double(), tuple(s.double() for s in state)
    worst = (fastrnn_step() - user_step()).abs().max().item()
    assert worst < 1e-9, f"fastrnn and the user's loop disagree by {worst}"
    module.float(), cell.float()
    x, state = x.float(), tuple(s.float() for s in state)
    timings = time_cpu({"fastrnn": fastrnn_step, "fastrnn reference backend": lambda: fastrnn_step("reference"),
                        "nn.LayerNorm cell loop": user_step}, warmup=1, budget_s=20.0, min_reps=5, max_reps=10)
    base = timings["nn.LayerNorm cell loop"]["median_ms"]
    return dict(cell=f"LayerNorm{kind.upper()}", B=B, T=T, I=I, H=H, max_abs_difference=worst, timings=timings,
                speedup={name: base / t["median_ms"] for name, t in timings.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--shape", default="16,256,256,256", help="B,T,I,H")
    args = parser.parse_args(argv)
    note = calm_threads()
    B, T, I, H = map(int, args.shape.split(","))
    rows = [run(kind, B, T, I, H) for kind in ("lstm", "gru")]
    info = describe(torch.device("cpu")) | {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(), "thread_note": note}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"layer-norm-cpu-{datetime.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = [f"# LayerNorm cells, CPU, forward+backward float32 ({info['cpu']}, torch {info['torch']}, "
             f"{info['torch_threads']} torch threads)", "",
             "Median ms of interleaved rounds (`python -m bench.layer_norm`); speedup = the user's loop / this.", "",
             "| cell | shape | implementation | median ms | speedup vs nn.LayerNorm loop |", "|---|---|---|---|---|"]
    for row in rows:
        for name, t in row["timings"].items():
            lines.append(f"| {row['cell']} | B{B} T{T} I{I} H{H} | {name} | {t['median_ms']:.1f} | {row['speedup'][name]:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
