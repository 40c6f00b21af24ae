"""The README's features as a new user meets them after ``pip install .`` (mode ``plain``) and after
``pip install ".[bench]"`` (plot and triton; mode ``extras``).

Each feature runs in a fresh interpreter (so ``TRITON_INTERPRET`` is read before triton is
imported), from a folder outside the checkout (so the installed fastrnn is what runs; ``python -m
bench`` runs from the checkout, as the README says). In ``plain`` mode every core feature must work
and every optional one must fail with a message naming the extra that brings it; in ``extras``
mode every feature must work. Exit status 1 when one does not; the last line counts them.

    python .ci/install_check.py plain|extras
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLOT = "pip install 'fastrnn[plot]'"
TRITON = "pip install 'fastrnn[triton]'"
BENCH = """pip install -e '.[bench]'"""

# (feature, None for a core feature or the install hint its failure must name, environment, code, run from the checkout?)
FEATURES = [
    ("import fastrnn prints nothing", None, {}, """
import fastrnn
""", False),
    ("drop-in LSTM, packed input", None, {}, """
import torch, fastrnn
lstm = fastrnn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True)
lstm.load_state_dict(torch.nn.LSTM(8, 16, 2, batch_first=True, bidirectional=True).state_dict())
y, (h, c) = lstm(torch.randn(3, 5, 8))
packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(3, 5, 8), torch.tensor([5, 2, 4]), batch_first=True, enforce_sorted=False)
lstm(packed)
assert y.shape == (3, 5, 32)
""", False),
    ("topologies", None, {}, """
import torch, fastrnn
tagger = fastrnn.ManyToMany(input_size=4, hidden_size=8, output_size=3, cell="gru")
assert tagger(torch.randn(2, 5, 4), torch.tensor([5, 3])).shape == (2, 5, 3)
""", False),
    ("gradient-flow record, grad_clip, gelu", None, {}, """
import torch, fastrnn
rnn = fastrnn.RNN(1, 8, nonlinearity="gelu", grad_clip=1.0)
with fastrnn.record_gradient_flow() as flow:
    y, _ = rnn(torch.randn(6, 2, 1))
    y[-1].sum().backward()
assert flow.norms().shape == (1, 6)
""", False),
    ("plot_gradient_flow", PLOT, {}, """
import torch, fastrnn
rnn = fastrnn.RNN(1, 8, grad_clip=1.0)
with fastrnn.record_gradient_flow() as flow:
    y, _ = rnn(torch.randn(6, 2, 1))
    y[-1].sum().backward()
fastrnn.plot_gradient_flow(flow)
""", False),
    ("the Triton kernels on the CPU through the interpreter", TRITON, {"TRITON_INTERPRET": "1", "FASTRNN_BACKEND": "triton"}, """
import torch, fastrnn
lstm = fastrnn.LSTM(4, 16)
x = torch.randn(5, 2, 4, requires_grad=True)
y, _ = lstm(x)
y.sum().backward()
with fastrnn.use_backend("reference"):
    expected, _ = lstm(x)
assert (y - expected).abs().max() < 1e-4, (y - expected).abs().max()
""", False),
    ("python -m fastrnn.ops.aot (compile report)", TRITON, {}, """
import runpy, sys
sys.argv = ["aot", "--arch", "90", "--workload", "rnn-fp32-resident32-4w-plain"]
runpy.run_module("fastrnn.ops.aot", run_name="__main__")
""", False),
    ("python -m bench (from the checkout)", BENCH, {}, """
import runpy, sys
sys.argv = ["bench", "--help"]
runpy.run_module("bench", run_name="__main__")
""", True),
]


def run(feature: str, hint: str | None, env: dict, code: str, in_checkout: bool, mode: str) -> bool:
    environment = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRNN_BACKEND", "PYTHONPATH")}
    environment.update(env, MPLBACKEND="Agg")
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-c", code]
        result = subprocess.run(command, cwd=ROOT if in_checkout else folder, env=environment, capture_output=True, text=True, timeout=600)
    if hint is None or mode == "extras":
        ok = result.returncode == 0
        if feature.startswith("import fastrnn prints nothing"):
            ok = ok and not result.stderr.strip() and not result.stdout.strip()
        expectation = "works"
    else:
        ok = result.returncode != 0 and hint in result.stderr
        expectation = f"fails naming {hint}"
    print(f"{'ok  ' if ok else 'FAIL'} {feature}: {expectation}")
    if not ok:
        print("     stdout:", result.stdout[-1500:].strip())
        print("     stderr:", result.stderr[-3000:].strip())
    return ok


def main() -> None:
    mode = sys.argv[1]
    if mode not in ("plain", "extras"):
        raise SystemExit("usage: python .ci/install_check.py plain|extras")
    results = [run(*feature, mode) for feature in FEATURES]
    passed = sum(results)
    print(f"install-check {mode}: {passed} passed, {len(results) - passed} failed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
