"""fastrnn.IndRNN against a hand-written float64 IndRNN (Li et al. 2018) written here, row by row.

The oracle walks each row on its own up to its length (so padding and the reverse direction's
start are handled by construction, not by masks), with zoneout (Krueger et al. 2016) and
DropConnect drawn in the order :mod:`fastrnn.regularization` documents. Both the reference path
(float64, 1e-9) and the fused scan kernel under Triton's interpreter (float32) are held to it:
outputs, final states and the gradients of the input, the initial state and every parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn
from fastrnn.ops.recurrence import LAUNCHES
from tests.conftest import assert_close

ACT = {"tanh": torch.tanh, "relu": torch.relu}


def handwritten_indrnn(module, x, lengths, h0, seed, grad_clip=None):
    """``x (T, B, I)`` time-major; returns ``y (T, B, D*H)`` (zero past a row's length), ``h_n (L*D, B, H)``."""
    torch.manual_seed(seed)
    T, B, _ = x.shape
    H, D = module.hidden_size, 2 if module.bidirectional else 1
    act, p_zone = ACT[module.nonlinearity], module.zoneout
    h_n = []
    for layer in range(module.num_layers):
        if layer > 0 and module.dropout and module.training:
            x = F.dropout(x, module.dropout, training=True)
        weights = []
        for d in range(D):
            sfx = f"l{layer}" + ("_reverse" if d else "")
            u = getattr(module, f"weight_hh_{sfx}").double()
            if module.recurrent_dropout and module.training:
                u = u * (torch.rand(u.shape) >= module.recurrent_dropout) / (1 - module.recurrent_dropout)
            weights.append((getattr(module, f"weight_ih_{sfx}").double(), u,
                            getattr(module, f"bias_ih_{sfx}").double() + getattr(module, f"bias_hh_{sfx}").double()))
        mask = None
        if p_zone and module.training:
            mask = (torch.rand(T, B, D * H) < p_zone).double()  # float32 uniforms, as documented
        out = [[x.new_zeros(H) for _ in range(B)] for _ in range(T * D)]
        for d, (w_ih, u, b) in enumerate(weights):
            for row in range(B):
                h = h0[layer * D + d, row]
                steps = range(int(lengths[row]))
                for t in (reversed(steps) if d else steps):
                    pre = x[t, row] @ w_ih.T + b + u * h
                    if grad_clip is not None and pre.requires_grad:
                        pre.register_hook(lambda g: g.clamp(-grad_clip, grad_clip))
                    new = act(pre)
                    if p_zone:
                        keep = mask[t, row, d * H:(d + 1) * H] if mask is not None else p_zone
                        new = keep * h + (1 - keep) * new
                    h = new
                    out[t * D + d][row] = h
                h_n.append((layer * D + d, row, h))
        x = torch.stack([torch.cat([torch.stack(out[t * D + d]) for d in range(D)], -1) for t in range(T)])
    final = torch.stack([torch.stack([h for (k, r, h) in h_n if k == i]) for i in range(module.num_layers * D)])
    return x, final


CASES = {
    "relu-2layer-bidir-packed-zoneout-train": dict(nonlinearity="relu", num_layers=2, bidirectional=True, zoneout=0.3, train=True, packed=True),
    "tanh-zoneout-eval-packed": dict(nonlinearity="tanh", num_layers=1, bidirectional=True, zoneout=0.4, train=False, packed=True),
    "relu-dropconnect-dropout-clip": dict(nonlinearity="relu", num_layers=2, bidirectional=False, recurrent_dropout=0.5, dropout=0.3, train=True, packed=False, grad_clip=0.05),
    "tanh-plain-bidir": dict(nonlinearity="tanh", num_layers=1, bidirectional=True, train=True, packed=False),
}


def run_case(case: dict, dtype, seed=5):
    torch.manual_seed(0)
    T, B, I, H = 6, 3, 4, 20
    case = dict(case)
    train, packed, clip = case.pop("train"), case.pop("packed"), case.get("grad_clip")
    module = fastrnn.IndRNN(I, H, dtype=dtype, **case).train(train)
    D = 2 if module.bidirectional else 1
    x = torch.randn(T, B, I, dtype=dtype, requires_grad=True)
    h0 = torch.randn(module.num_layers * D, B, H, dtype=dtype, requires_grad=True)
    lengths = torch.tensor([6, 2, 4]) if packed else torch.full((B,), T)
    w_y, w_h = torch.randn(T, B, D * H, dtype=torch.float64), torch.randn(module.num_layers * D, B, H, dtype=torch.float64)
    torch.manual_seed(seed)
    if packed:
        out, h_n = module(pack_padded_sequence(x, lengths, enforce_sorted=False), h0)
        y, _ = pad_packed_sequence(out, total_length=T)
    else:
        y, h_n = module(x, h0)
    inputs = [x, h0, *module.parameters()]
    grads = torch.autograd.grad((y.double() * w_y).sum() + (h_n.double() * w_h).sum(), inputs)
    y_ref, h_ref = handwritten_indrnn(module, x.double(), lengths, h0.double(), seed, clip)
    grads_ref = torch.autograd.grad((y_ref * w_y).sum() + (h_ref * w_h).sum(), inputs)
    return (y, h_n, grads), (y_ref, h_ref, grads_ref)


@pytest.mark.parametrize("name", CASES)
def test_reference_path_matches_handwritten_float64(name):
    with fastrnn.use_backend("reference"):
        (y, h_n, grads), (y_ref, h_ref, grads_ref) = run_case(CASES[name], torch.float64)
    assert_close(y, y_ref, atol=1e-9)
    assert_close(h_n, h_ref, atol=1e-9)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, atol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_scan_kernel_matches_handwritten(name):
    LAUNCHES.clear()
    with fastrnn.use_backend("triton"):
        (y, h_n, grads), (y_ref, h_ref, grads_ref) = run_case(CASES[name], torch.float32)
    assert LAUNCHES["indrnn_fwd"] == CASES[name]["num_layers"] and LAUNCHES["indrnn_bwd"] == CASES[name]["num_layers"]
    assert_close(y.double(), y_ref, atol=2e-6, rtol=1e-6)  # fp32 state: relu outputs grow to ~40
    assert_close(h_n.double(), h_ref, atol=2e-6, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g.double(), g_ref.double(), atol=2e-5, rtol=1e-5)


def test_scan_kernel_records_the_gradient_flow_and_reduces_tiles_as_the_reference():
    torch.manual_seed(0)
    module = fastrnn.IndRNN(3, 80, bidirectional=True, nonlinearity="tanh", zoneout=0.2, grad_clip=0.3)
    x = torch.randn(5, 9, 3, requires_grad=True)  # 9 rows, 80 units: two row tiles, two unit tiles (masked lanes)
    lengths = torch.tensor([5, 1, 3, 5, 2, 4, 5, 3, 1])
    norms, grads = {}, {}
    for name in ("reference", "triton"):
        with fastrnn.use_backend(name), fastrnn.record_gradient_flow() as flow:
            torch.manual_seed(1)
            out, h_n = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
            grads[name] = torch.autograd.grad(out.data.square().sum() + h_n.sum(), [x, *module.parameters()])
        norms[name] = flow.norms()
    assert norms["triton"].shape == (2, 5) and (norms["triton"] > 0).all()
    assert_close(norms["triton"], norms["reference"], atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads["triton"], grads["reference"]):
        assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_forward_forms_and_errors():
    module = fastrnn.IndRNN(4, 8, batch_first=True)
    assert dict(module.named_parameters())["weight_hh_l0"].shape == (8,)
    y, h = module(torch.randn(2, 5, 4))
    assert y.shape == (2, 5, 8) and h.shape == (1, 2, 8)
    y1, h1 = module(torch.randn(5, 4))  # unbatched
    assert y1.shape == (5, 8) and h1.shape == (1, 8)
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        fastrnn.IndRNN(4, 8, nonlinearity="gelu")
    with pytest.raises(ValueError, match="zoneout"):
        fastrnn.IndRNN(4, 8, zoneout=1.5)
    with pytest.raises(ValueError, match="recurrent_dropout"):
        fastrnn.IndRNN(4, 8, recurrent_dropout=1.0)
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        module(torch.randn(2, 5, 4), torch.zeros(1, 3, 8))


#: Compiles both scan kernels for sm_90 in their heaviest form (lengths, zoneout mask, clipping,
#: flow record), fp32 and bf16, typed as the launcher calls them; prints their resources as JSON.
COMPILE_SCRIPT = r"""
import json, os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastrnn.kernels import indrnn
from fastrnn.ops.indrnn import BLOCK_B, BLOCK_H, NUM_WARPS
tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
rows = []
for name in ("indrnn_fwd_kernel", "indrnn_bwd_kernel"):
    kernel = getattr(indrnn, name)
    for dtype in ("fp32", "bf16"):
        const = dict(NONLINEARITY=1, HAS_LENGTHS=True, ZONEOUT=1, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H)
        if name == "indrnn_bwd_kernel":
            const.update(CLIP=True, RECORD_FLOW=True)
        sig = {}
        for arg in kernel.arg_names:
            if arg in const: sig[arg] = "constexpr"
            elif arg == "lengths_ptr": sig[arg] = "*i32"
            elif arg in ("du_ptr", "flow_ptr"): sig[arg] = "*fp32"
            elif arg in ("zoneout_p", "grad_clip"): sig[arg] = "fp32"
            elif arg.endswith("_ptr"): sig[arg] = "*" + dtype
            else: sig[arg] = "i32"
        k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": NUM_WARPS})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(k.asm["cubin"]); cubin.flush()
            usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                                   capture_output=True, text=True, check=True).stdout
        fields = {key: int(v) for key, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", usage)}
        rows.append(dict(kernel=name, dtype=dtype, **fields))
print(json.dumps(rows))
"""


def test_scan_kernels_compile_for_sm90_without_spills():
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.splitlines()[-1])
    assert len(rows) == 4
    for row in rows:
        assert row["STACK"] == 0 and row["LOCAL"] == 0 and row["REG"] <= 255, row
