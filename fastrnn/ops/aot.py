"""Ahead-of-time compilation of the kernels for a GPU architecture, on a machine without a GPU.

Triton compiles for a target without a driver, with the ``ptxas`` it ships; ``cuobjdump`` from the
same folder reports the resources. Used by ``tests/test_kernel_compile.py`` and
``python -m fastrnn.ops.aot`` (a table of every kernel at every size class).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import tempfile

import torch

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: Shared memory one block may use: H100/H200 (sm_90) and A100 (sm_80).
SHARED_LIMIT = {90: 232_448, 80: 166_912}


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    stack: int  # bytes of stack frame per thread (spilled values live here)
    local: int  # bytes of local memory per thread
    shared: int  # bytes of shared memory per block, static plus dynamic
    tensor_core_ops: int  # HMMA/HGMMA instructions in the SASS

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def signature(kernel, dtype: torch.dtype, constexprs: dict) -> dict[str, str]:
    """A signature from the argument names: ``*_ptr`` are tensors of ``dtype`` except ``lengths_ptr``
    (int32), ``state_ptr`` and ``flow_ptr`` (fp32); ``grad_clip`` is fp32, other scalars int32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("lengths_ptr", "flags_ptr", "error_ptr"):
            sig[name] = "*i32"
        elif name in ("state_ptr", "flow_ptr") or name.endswith(("carry_ptr", "partial_ptr")):
            sig[name] = "*fp32"
        elif name == "grad_clip":
            sig[name] = "fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + _TRITON_TYPES[dtype]
        else:
            sig[name] = "i32"
    return sig


def compile_kernel(kernel, dtype: torch.dtype, constexprs: dict, arch: int = 90, num_warps: int = 4, num_stages: int = 3) -> Resources:
    """Compile ``kernel`` (a ``@triton.jit`` function) for ``sm_{arch}`` and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature=signature(kernel, dtype, constexprs), constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), cubin.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return Resources(
        registers=int(fields["REG"]),
        stack=int(fields["STACK"]),
        local=int(fields["LOCAL"]),
        shared=int(fields["SHARED"]) + int(compiled.metadata.shared),
        tensor_core_ops=len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass)),
    )


@dataclasses.dataclass(frozen=True)
class Variant:
    """One kernel at one size class, as the launcher would run it (``kernel`` names a
    ``@triton.jit`` function in ``fastrnn.kernels.<cell>``)."""

    cell: str
    kernel: str
    dtype: torch.dtype
    constexprs: dict
    num_warps: int
    num_stages: int
    hidden: int  # the largest H this variant serves

    @property
    def name(self) -> str:
        return f"{self.kernel}-{_TRITON_TYPES[self.dtype]}-H{self.hidden}"

    def jit_function(self):
        module = importlib.import_module(f"fastrnn.kernels.{self.cell}")
        return getattr(module, self.kernel)


#: Gates per cell; the cells whose kernels live in ``fastrnn.kernels.<cell>``.
CELL_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def constexpr_names(kernel) -> list[str]:
    """Names of a ``@triton.jit`` function's ``tl.constexpr`` parameters (also under the
    interpreter, whose functions carry no compiled parameter list)."""
    import triton.language as tl

    fn = getattr(kernel, "fn", kernel)
    return [
        name for name, param in inspect.signature(fn).parameters.items()
        if param.annotation is tl.constexpr or str(param.annotation).endswith("constexpr")
    ]


def heaviest_constexprs(kernel, block_b: int, block_h: int, persistent_plan=None) -> dict:
    """The kernel's constexprs set to its heaviest form: every optional feature on (``HAS_*``,
    ``CLIP``, ``RECORD_FLOW``), gelu for the Elman nonlinearity (it reads and writes the
    pre-activations), exact fp32 dots. An unknown constexpr is an error, so a new one is never
    silently left out of the check."""
    values = {}
    for name in constexpr_names(kernel):
        if name.startswith("HAS_") or name in ("CLIP", "RECORD_FLOW"):
            values[name] = True
        elif name == "NONLINEARITY":
            values[name] = 5
        elif name == "INPUT_PRECISION":
            values[name] = "ieee"
        elif name == "BLOCK_B":
            values[name] = block_b
        elif name == "BLOCK_H":
            values[name] = block_h
        elif persistent_plan is not None and name in ("SLICE", "BLOCK_S", "BLOCK_K", "BLOCK_FLAGS"):
            values[name] = persistent_plan.constexprs()[name]
        elif persistent_plan is not None and name == "BLOCK_HOUT":  # LSTM's h width: at most the cell's
            values[name] = persistent_plan.block_k
        elif name == "BARRIER":
            values[name] = True
        elif name == "FAULT":
            values[name] = 0
        else:
            raise KeyError(f"{kernel.__name__}: no ahead-of-time value for constexpr {name}")
    return values


def variants() -> list[Variant]:
    """Every kernel of every cell at the largest size its resident strategy serves, at one tiled
    size, and (cells with persistent kernels) at one persistent size with the partition the
    launcher picks for 16 rows and one direction, in fp32 and bf16, in its heaviest form."""
    from fastrnn.ops.persistent import CELL_GATES as PERSISTENT_GATES, persistent_plan, planned as persistent_planned
    from fastrnn.ops.recurrence import RESIDENT_MAX_BLOCK_H, TILE, TILED_CONFIG, plan

    out = []
    for cell, gates in CELL_GATES.items():
        module = importlib.import_module(f"fastrnn.kernels.{cell}")
        for dtype in (torch.bfloat16, torch.float32):
            largest_resident = RESIDENT_MAX_BLOCK_H[gates, dtype == torch.float32][0]
            p = plan(gates, largest_resident, dtype)
            tile, warps, stages = TILED_CONFIG[gates, dtype == torch.float32]
            sizes = [(largest_resident, "resident", p.block_b, p.block_h, p.num_warps, p.num_stages, None),
                     (4 * TILE, "tiled", p.block_b, tile, warps, stages, None)]
            if gates in PERSISTENT_GATES and persistent_planned(gates, dtype):
                pp = persistent_plan(gates, 4 * TILE, 16, 1, dtype)
                sizes.append((4 * TILE, "persistent", pp.block_b, 0, pp.num_warps, 1, pp))
            for hidden, strategy, block_b, block_h, num_warps, num_stages, pp in sizes:
                for direction in ("fwd", "bwd"):
                    name = f"{cell}_{direction}_{strategy}_kernel"
                    constexprs = heaviest_constexprs(getattr(module, name), block_b, block_h, pp)
                    out.append(Variant(cell, name, dtype, constexprs, num_warps, num_stages, hidden))
    return out


def report(arches: list[int]) -> list[dict]:
    """Compile every variant for every arch; one row of resources each."""
    rows = []
    for arch in arches:
        for v in variants():
            r = compile_kernel(v.jit_function(), v.dtype, v.constexprs, arch, v.num_warps, v.num_stages)
            rows.append(dict(arch=arch, variant=v.name, num_warps=v.num_warps, num_stages=v.num_stages, **dataclasses.asdict(r)))
    return rows


def main() -> None:
    """Print registers, spills and shared memory of every variant; optionally write a report."""
    import argparse
    import datetime
    import json

    import triton

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--markdown", help="write a markdown table here (e.g. bench/results/aot-compile.md)")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = report(args.arch)
    header = "| arch | variant | warps | stages | registers | stack B | local B | shared B | tensor-core ops |"
    table = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(
            f"| sm_{r['arch']} | {r['variant']} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
            f"{r['stack']} | {r['local']} | {r['shared']} | {r['tensor_core_ops']} |"
        )
    print("\n".join(table))
    if args.markdown:
        intro = [
            f"# Ahead-of-time compile report ({datetime.date.today()}, triton {triton.__version__}, compiled on a CPU)",
            "",
            "Written by `python -m fastrnn.ops.aot --markdown <this file>`. Shared memory limit per block: "
            "sm_90 232,448 B, sm_80 166,912 B. Stack or local bytes above 0 mean spills.",
            "",
        ]
        with open(args.markdown, "w") as f:
            f.write("\n".join(intro + table) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
