"""Compile gate of the persistent kernels: at every GPU-matrix row's plan, each kernel the launcher
launches compiles ahead of time for sm_90 and sm_80 with no spills (no stack frame, no local
memory) on either, and shared memory within the card's limit. Each arch's compile plans for its
card (``fastrnn.ops.aot.capture_launches``: an H100/H200's 132 SMs and 227 KB of shared memory per
block for sm_90, an A100's 108 and 163 KB for sm_80), so the sm_80 binaries are those an A100
launches.

The kernels are compiled as the launch binds them (``fastrnn.ops.launch_signature``: the real
launcher runs on meta tensors and each recorded launch goes through Triton's own argument binder:
fp32 buffers typed fp32, divisibility hints, integers equal to 1 folded), in their heaviest form
(lengths, grad_clip, the gradient-flow record, gelu for the Elman cell), in barrier mode (what an
H100/H200 runs). The compiles run once per session in a subprocess without ``TRITON_INTERPRET``.
A row the plan does not give the persistent strategy (``fastrnn.ops.persistent.planned``: no
persistent kernels for the cell and dtype, or kept tiled) is skipped, saying so.
"""

import json
import os
import subprocess
import sys

import pytest

from bench.matrix import GATES, GPU_MATRIX
from fastrnn.ops.aot import SHARED_LIMIT
from fastrnn.ops.persistent import planned

ARCHES = (90, 80)
#: The GPU-matrix rows the plan gives the persistent strategy.
COVERED = [row.name for row in GPU_MATRIX if planned(GATES[row.cell], row.torch_dtype, row.hidden)]


@pytest.fixture(scope="session")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("persistent-gate") / "gate.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTRNN_STRATEGY", "FASTRNN_PERSISTENT_SLICE")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.plan", "--gate", "--arch", *map(str, ARCHES), "--rows", ",".join(COVERED), "--json", str(out)],
        env=env, capture_output=True, text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records = {}
    for record in json.loads(out.read_text()):
        records.setdefault((record["row"], record["arch"]), []).append(record)
    return records


@pytest.mark.parametrize("arch", ARCHES, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("row", [r.name for r in GPU_MATRIX])
def test_persistent_kernels_compile_clean(request, row, arch):
    if row not in COVERED:
        shape = next(r for r in GPU_MATRIX if r.name == row)
        pytest.skip(f"the plan does not give {shape.cell} {shape.dtype} H{shape.hidden} the persistent strategy (fastrnn.ops.persistent.planned)")
    kernels = request.getfixturevalue("gate")[row, arch]
    names = sorted(k["kernel"] for k in kernels)
    assert any("_fwd_persistent" in n for n in names) and any("_bwd_persistent" in n for n in names), names
    assert all("persistent" in n for n in names), f"{row}: non-persistent launches at a persistent plan: {names}"
    for k in kernels:
        where = f"{k['kernel']} at {row} on sm_{arch}"
        assert k["local_bytes"] == 0, f"{where} uses local memory: {k}"
        assert k["stack_bytes"] == 0, f"{where} spills: {k}"
        assert k["shared_bytes"] <= SHARED_LIMIT[arch], f"{where} needs {k['shared_bytes']} B of shared memory"
        assert 0 < k["registers"] <= 255, where
        assert k["tensor_core_ops"] > 0 or row == "L5", f"{where}: no HMMA/HGMMA in a 16-bit kernel"
