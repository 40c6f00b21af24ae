"""Compile what a real launch would compile, on a machine without a GPU.

A kernel's binary depends on its arguments: pointer dtypes (fp32 scratch stays ``*fp32``),
integers equal to 1 folded into the code, divisibility-by-16 hints on integers and pointers
(``NOTES.md``: the tiled LSTM forward at L1 is 254 registers with its real fp32 scratch types and
80 once specialised as the launch is; a hand-written signature said 226). So instead of writing
signatures by hand, :func:`capture_launches` runs the real launcher (the layer function of
:mod:`fastrnn.dispatch`, forward and backward) on ``meta`` tensors with every ``kernel[grid](...)``
recorded instead of run, and :func:`compile_launch` hands each recorded call to Triton's own
argument binder (the one ``JITFunction.run`` uses) for a chosen ``sm_XX`` target, then compiles it.
Meta tensors carry the real dtypes and report address 0, i.e. 16-byte aligned, as every fresh
allocation of PyTorch's CUDA caching allocator is.

``launch_resources(row, arch)`` is the one-call form: the kernels one GPU-matrix row launches
(first layer), each with registers, spills and shared memory. Triton caches compiled binaries on
disk (``TRITON_CACHE_DIR``), so a second run is quick.

Needs Triton's 3.9 JIT internals (``create_function_from_signature``, ``JITFunction._pack_args``);
on another version :func:`compile_launch` raises a ``RuntimeError`` saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Iterator

import torch

#: Gates stacked in ``W_hh`` by cell.
CELL_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


@dataclasses.dataclass
class CapturedLaunch:
    """One ``kernel[grid](*args, **kwargs)`` call the launcher made."""

    kernel: object  # triton.runtime.jit.JITFunction
    args: tuple
    kwargs: dict
    grid: object

    @property
    def name(self) -> str:
        return self.kernel.__name__


@dataclasses.dataclass(frozen=True)
class CompiledLaunch:
    """What ``ptxas`` made of one captured launch for ``sm_{arch}``."""

    kernel: str
    arch: int
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constexprs: dict  # argument name -> value compiled in (the constexprs and the arguments folded)
    folded: tuple  # names of non-constexpr arguments folded into the binary (integers equal to 1)
    divisible_by_16: tuple  # names of the arguments that got the divisibility hint
    num_warps: int
    num_stages: int
    registers: int
    stack: int  # bytes of stack frame per thread (spilled values live here)
    local: int  # bytes of local memory per thread
    shared: int  # bytes of shared memory per block, static plus dynamic
    tensor_core_ops: int  # HMMA/HGMMA instructions in the SASS

    @property
    def spill_bytes(self) -> int:
        return self.stack + self.local

    def key(self) -> tuple:
        """Identity of the binary: two launches with equal keys compile to the same code."""
        return (self.kernel, self.arch, tuple(sorted(self.signature.items())), tuple(sorted(map(str, self.constexprs.items()))),
                self.divisible_by_16, self.num_warps, self.num_stages)


@contextlib.contextmanager
def capture_launches() -> Iterator[list[CapturedLaunch]]:
    """Inside the block, every ``@triton.jit`` launch is recorded into the yielded list instead of
    being compiled and run (the launch returns None)."""
    from triton.runtime.jit import JITFunction

    launches: list[CapturedLaunch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(CapturedLaunch(self, args, dict(kwargs), grid))
        return None

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def _bind(launch: CapturedLaunch, backend):
    """Triton's own binding of a launch's arguments for ``backend``: what ``JITFunction.run`` does
    before it compiles (signature from the argument types, specialisation from their values)."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for option in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, option):
            kwargs[option] = getattr(knobs.compilation, option)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    return fn._pack_args(backend, kwargs, bound_args, specialization, options)


def compile_launch(launch: CapturedLaunch, arch: int = 90) -> CompiledLaunch:
    """Compile one captured launch for ``sm_{arch}`` exactly as a launch on that card would bind
    it, and read registers, stack, local and shared memory and the tensor-core instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    if triton.knobs.runtime.interpret if hasattr(triton, "knobs") else os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("ahead-of-time compiles need a process without TRITON_INTERPRET=1")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    try:
        options, signature, constexprs, attrs = _bind(launch, backend)
    except (ImportError, AttributeError, TypeError) as error:
        raise RuntimeError(f"triton {triton.__version__}: cannot bind {launch.name}'s launch arguments "
                           f"the way JITFunction.run does ({error!r}); this needs triton 3.9's JIT internals") from error
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    names = [p.name for p in launch.kernel.params]
    values = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
    declared = {p.name for p in launch.kernel.params if p.is_constexpr}
    hinted = tuple(sorted(names[path[0]] for path, values in attrs.items()
                          if len(path) == 1 and any(v == ["tt.divisibility", 16] or tuple(v) == ("tt.divisibility", 16) for v in values)))
    usage = read_resources(compiled)
    return CompiledLaunch(
        kernel=launch.name, arch=arch, signature=signature, constexprs=values,
        folded=tuple(sorted(set(values) - declared)), divisible_by_16=hinted,
        num_warps=options.num_warps, num_stages=options.num_stages, **usage,
    )


def read_resources(compiled) -> dict:
    """Registers, stack, local and shared memory and HMMA/HGMMA count of a compiled kernel, from
    ``cuobjdump --dump-resource-usage`` and ``nvdisasm`` (shipped with Triton) on its cubin."""
    import triton

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "nvdisasm"), cubin.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return dict(
        registers=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]),
        shared=int(fields["SHARED"]) + int(compiled.metadata.shared),
        tensor_core_ops=len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass)),
    )


def row_launches(row, heaviest: bool = False) -> list[CapturedLaunch]:
    """The kernel launches of one recurrent layer of a :class:`bench.matrix.Row`-like workload
    (``cell``, ``batch``, ``steps``, ``hidden``, ``bidirectional``, ``dtype`` name, ``packed``,
    ``nonlinearity``), forward then backward, captured from the cell's launchers
    (``<cell>_fwd``, ``<cell>_bwd`` of ``fastrnn.ops.<cell>``) on meta tensors. Packed rows get
    per-row lengths (all that packing changes for a kernel). ``heaviest`` turns every optional
    feature on as a user could: lengths, ``grad_clip``, the gradient-flow record, and gelu for the
    Elman cell (its derivative reads the saved pre-activations)."""
    import importlib

    ops = importlib.import_module(f"fastrnn.ops.{row.cell}")
    dtype = getattr(torch, row.dtype)
    T, B, H = row.steps, row.batch, row.hidden
    D = 2 if row.bidirectional else 1
    G = CELL_GATES[row.cell]

    def meta(*shape):
        return torch.empty(shape, device="meta", dtype=dtype)

    lengths = None
    if row.packed or heaviest:  # sorted, longest first, as pad_packed_sequence hands them over
        lengths = torch.linspace(T, max(1, T // 4), B).round().to(torch.int32)
    clip = dict(grad_clip=1.0, record_flow=True) if heaviest else {}
    gx, w_hh, h0 = meta(T, B, D * G * H), meta(D, G * H, H), meta(D, B, H)
    with capture_launches() as launches:
        if row.cell == "rnn":
            nonlinearity = "gelu" if heaviest else row.nonlinearity
            y, h_n, pre = ops.rnn_fwd(gx, w_hh, h0, lengths, nonlinearity)
            ops.rnn_bwd(torch.empty_like(y), torch.empty_like(h_n), y, pre, w_hh, lengths, nonlinearity, **clip)
        elif row.cell == "gru":
            y, h_n, saved = ops.gru_fwd(gx, w_hh, meta(D, G * H), h0, lengths)
            ops.gru_bwd(torch.empty_like(y), torch.empty_like(h_n), y, h0, saved, w_hh, lengths, **clip)
        else:
            c0 = meta(D, B, H)
            y, h_n, c_n, gates, c = ops.lstm_fwd(gx, w_hh, None, h0, c0, lengths)
            ops.lstm_bwd(torch.empty_like(y), torch.empty_like(h_n), torch.empty_like(c_n), gates, c, c0, w_hh, None,
                         lengths, **clip)
    return launches


def launch_resources(row, arch: int = 90, heaviest: bool = False) -> list[CompiledLaunch]:
    """:func:`compile_launch` of every launch of :func:`row_launches` (duplicates compiled once)."""
    out, seen = [], set()
    for launch in row_launches(row, heaviest):
        compiled = compile_launch(launch, arch)
        if compiled.key() not in seen:
            seen.add(compiled.key())
            out.append(compiled)
    return out
