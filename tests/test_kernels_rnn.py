"""The Elman RNN kernels against the reference path (outputs, final states, every gradient).

Runs the real Triton kernels: on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set by
the test command before triton is imported), on CUDA compiled, when a GPU is present.
"""

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import fastrnn
from fastrnn.backend import triton_interpreting
from fastrnn.ops.recurrence import LAUNCHES, plan

DEVICES = ["cuda"] if torch.cuda.is_available() else (["cpu"] if triton_interpreting() else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")


def run(module, x, h0, backend, packed):
    """Forward + backward of a scalar loss that weighs every output and state element."""
    module.zero_grad()
    h0 = h0.detach().requires_grad_(True)
    if not packed:
        x = x.detach().requires_grad_(True)
    with fastrnn.use_backend(backend):
        y, h_n = module(x, h0)
    y_data = y.data if packed else y
    weights = torch.linspace(-1, 1, y_data.numel(), dtype=y_data.dtype, device=y_data.device).view_as(y_data)
    loss = (y_data * weights).sum() + h_n.square().sum()
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    grads["h0"] = h0.grad
    if not packed:
        grads["x"] = x.grad
    return {"y": y_data, "h_n": h_n}, grads


def assert_matches(got, want, rtol):
    for name in want:
        g, w = got[name].double(), want[name].double()
        assert torch.isfinite(g).all(), f"{name}: non-finite values (unwritten output?)"
        err = ((g - w).norm() / w.norm().clamp_min(1e-30)).item()
        assert err < rtol, f"{name}: relative error {err:.2e} >= {rtol:.0e}"


CASES = {
    # id: (hidden, batch, steps, layers, bidirectional, nonlinearity, packed, bias)
    "odd-H33-B17-T1-bidir": (33, 17, 1, 1, True, "tanh", False, True),
    "relu-2layers": (16, 3, 5, 2, False, "relu", False, True),
    "tanh-2layers-bidir": (20, 4, 6, 2, True, "tanh", False, True),
    "packed-bidir": (24, 5, 7, 1, True, "tanh", True, True),
    "packed-relu-2layers": (12, 4, 6, 2, True, "relu", True, True),
    "no-bias": (16, 2, 4, 1, True, "tanh", False, False),
    "tiled-bidir-packed": (70, 3, 4, 1, True, "tanh", True, True),
    "tiled-relu": (130, 2, 3, 1, False, "relu", False, True),
}


def make(case, dtype, device, seed=0):
    hidden, batch, steps, layers, bidirectional, nonlinearity, packed, bias = CASES[case]
    torch.manual_seed(seed)
    module = fastrnn.RNN(6, hidden, layers, nonlinearity=nonlinearity, bias=bias, bidirectional=bidirectional, dtype=dtype, device=device)
    directions = 2 if bidirectional else 1
    h0 = torch.randn(layers * directions, batch, hidden, dtype=dtype, device=device)
    if packed:
        lengths = torch.randint(1, steps + 1, (batch,))
        lengths[batch // 2] = steps
        x = pack_sequence([torch.randn(int(n), 6, dtype=dtype, device=device) for n in lengths], enforce_sorted=False)
    else:
        x = torch.randn(steps, batch, 6, dtype=dtype, device=device)
    return module, x, h0, packed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_reference(case, device):
    module, x, h0, packed = make(case, torch.float32, device)
    before = sum(LAUNCHES.values())
    out, grads = run(module, x, h0, "triton", packed)
    launched = sum(LAUNCHES.values()) - before
    assert launched == 2 * module.num_layers, "one forward and one backward launch per layer"
    ref_out, ref_grads = run(module, x, h0, "reference", packed)
    tol = 1e-2 if (device == "cuda" and torch.backends.cuda.matmul.allow_tf32) else 1e-5
    assert_matches(out, ref_out, tol)
    assert_matches(grads, ref_grads, tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-2), (torch.bfloat16, 3e-2)], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["tanh-2layers-bidir", "packed-bidir", "tiled-relu"])
def test_half_precision_against_float64_reference(case, dtype, rtol, device):
    """16-bit weights and inputs, fp32 state: close to the float64 reference of the same numbers.

    At ReLU's kink the comparison is ill-posed: a pre-activation within 16-bit rounding of zero
    (the input projection is a 16-bit GEMM) may take either branch, and one flipped unit moves the
    gradients by percents (measured: torch 2.11's bf16 draw of this case puts one of 780
    pre-activations at 8e-5, a 6% gradient difference). So the ReLU case's float64 reference takes
    the kernel's branch, and the test asserts that the branches differ only inside that rounding band."""
    module, x, h0, packed = make(case, dtype, device)
    out, grads = run(module, x, h0, "triton", packed)
    assert out["y"].dtype == dtype
    if module.nonlinearity == "relu":
        ref_out, ref_grads = relu_reference_on_the_kernels_branch(module, x, h0, out["y"], dtype)
    else:
        module64 = module.double()
        x64 = x.to(torch.float64) if not packed else torch.nn.utils.rnn.PackedSequence(x.data.double(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        ref_out, ref_grads = run(module64, x64, h0.double(), "reference", packed)
    assert_matches(out, ref_out, rtol)
    assert_matches(grads, ref_grads, rtol)


def relu_reference_on_the_kernels_branch(module, x, h0, y_kernel, dtype):
    """The float64 one-layer, one-direction ReLU RNN of ``run`` (same loss), with each unit's branch
    ``h_t > 0`` taken from the kernel's output ``y_kernel``; asserts the kernel's branch equals the
    float64 one wherever the pre-activation is farther from zero than twice 16-bit rounding of its
    terms (the input projection is rounded to ``dtype``; the state is fp32)."""
    assert module.num_layers == 1 and not module.bidirectional
    eps = torch.finfo(dtype).eps
    w_ih, w_hh = module.weight_ih_l0.double(), module.weight_hh_l0.double()
    b_ih, b_hh = module.bias_ih_l0.double(), module.bias_hh_l0.double()
    params = [p.detach().clone().requires_grad_(True) for p in (w_ih, w_hh, b_ih, b_hh)]
    x64 = x.double().detach().requires_grad_(True)
    h = h0.double().detach().requires_grad_(True)
    h_t, ys, flips, far = h[0], [], 0, 0
    for t in range(x64.shape[0]):
        projected = x64[t] @ params[0].T + params[2]
        recurrent = h_t @ params[1].T + params[3]
        pre = projected + recurrent
        branch = (y_kernel[t] > 0).double()
        band = 2 * eps * (x64[t].abs() @ params[0].abs().T + params[2].abs()).detach()
        disagree = (branch != (pre.detach() > 0).double())
        flips += int(disagree.sum())
        far += int((disagree & (pre.detach().abs() > band)).sum())
        h_t = pre * branch
        ys.append(h_t)
    assert far == 0, f"{far} of {flips} branch differences lie outside the 16-bit rounding band"
    y = torch.stack(ys)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    ((y * weights).sum() + h_t.square().sum()).backward()
    names = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
    grads = {name: p.grad for name, p in zip(names, params)}
    grads["h0"], grads["x"] = h.grad, x64.grad
    return {"y": y, "h_n": h_t[None]}, grads


@pytest.mark.parametrize("device", DEVICES)
def test_strategies_are_both_exercised(device):
    """The cases above cover the strategies the plan picks (guards against a plan change silently
    dropping one); the tiled kernels only run when forced (next test)."""
    strategies = {plan(1, CASES[c][0], torch.float32).strategy for c in CASES}
    assert strategies == {"resident", "persistent"}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["tiled-bidir-packed", "tiled-relu"])
def test_tiled_strategy_when_forced(case, device, monkeypatch):
    monkeypatch.setenv("FASTRNN_STRATEGY", "tiled")
    module, x, h0, packed = make(case, torch.float32, device)
    LAUNCHES.clear()
    out, grads = run(module, x, h0, "triton", packed)
    assert LAUNCHES == {"rnn_fwd_tiled": 1, "rnn_bwd_tiled": 1}
    ref_out, ref_grads = run(module, x, h0, "reference", packed)
    tol = 1e-2 if (device == "cuda" and torch.backends.cuda.matmul.allow_tf32) else 1e-5
    assert_matches(out, ref_out, tol)
    assert_matches(grads, ref_grads, tol)


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_really_ran(device):
    """Count launches by kernel: forward and backward of the resident and persistent strategies."""
    LAUNCHES.clear()
    for case in ("relu-2layers", "tiled-relu"):
        module, x, h0, packed = make(case, torch.float32, device)
        run(module, x, h0, "triton", packed)
    assert LAUNCHES == {"rnn_fwd_resident": 2, "rnn_bwd_resident": 2, "rnn_fwd_persistent": 1, "rnn_bwd_persistent": 1}


@pytest.mark.parametrize("device", DEVICES)
def test_saturation_and_nan_propagation(device):
    """Huge pre-activations saturate without NaN; NaN in the input propagates as in the reference."""
    module, x, h0, _ = make("tanh-2layers-bidir", torch.float32, device)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1e4)
    out, grads = run(module, x, h0, "triton", False)
    ref_out, ref_grads = run(module, x, h0, "reference", False)
    for name in ("y", "h_n"):
        assert torch.isfinite(out[name]).all()
        torch.testing.assert_close(out[name], ref_out[name], rtol=1e-4, atol=1e-4)
    x = x.clone()
    x[2, 1, 0] = float("nan")
    with fastrnn.use_backend("triton"):
        y, _ = module(x, h0)
    with fastrnn.use_backend("reference"):
        y_ref, _ = module(x, h0)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    module = fastrnn.RNN(4, 16, bidirectional=True, device=device)
    x = torch.randn(3, 0, 4, device=device, requires_grad=True)
    with fastrnn.use_backend("triton"):
        y, h = module(x)
    assert y.shape == (3, 0, 32) and h.shape == (2, 0, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_computes_in_autocast_dtype(device):
    module, x, h0, _ = make("tanh-2layers-bidir", torch.float32, device)
    dtype = torch.bfloat16
    with torch.autocast(device_type=device, dtype=dtype), fastrnn.use_backend("triton"):
        y, h_n = module(x, h0)
    assert y.dtype == dtype
    with fastrnn.use_backend("reference"):
        y_ref, _ = module(x, h0)
    err = ((y.float() - y_ref).norm() / y_ref.norm()).item()
    assert err < 3e-2
