"""The compile gate: every kernel compiled ahead of time exactly as the launchers launch it, for a
GPU architecture, on a machine without a GPU.

A kernel's binary depends on more than its source. At launch Triton types each pointer by the
tensor passed (fp32 scratch stays ``*fp32``; a dummy pointer for an unused argument has the dtype
of whatever stands in), marks pointers and integers divisible by 16 (so loads vectorise), and
folds integers equal to 1 into constants (``D`` of a unidirectional layer, ``B`` of a batch of
one). A check that writes signatures by hand compiles some other binary. So this gate runs the real
launchers and lets Triton's own launch path specialise each launch.

How it works
------------
* :func:`capture_launches` (a context manager): inside it, a stand-in driver reports ``sm_{arch}``
  (no GPU needed) and Triton's ``knobs.runtime.jit_cache_hook`` is set. Every ``kernel[grid](...)``
  then runs Triton's own launch code (argument binding, per-argument specialisation, launch
  options) up to the point where it would compile; the hook records the kernel, signature,
  constants, attributes and options as a :class:`Launch` and tells Triton to skip the compile, so
  nothing runs. Tensor contents are never read: CPU tensors from ``torch.empty`` serve. Works
  with triton 3.6 through 3.9 (the hook and ``ASTSource`` take the same forms there).
* :func:`compile_launch`: ``triton.compile`` of a :class:`Launch` as the launch would have done,
  then registers, stack, local and shared memory and tensor-core instructions from the cubin
  (``cuobjdump``, ``nvdisasm`` shipped with Triton).
* :func:`workloads`: named size classes, each a function that calls real launchers (forward and
  backward) with tensors of its shapes. For every cell and dtype, every distinct
  :func:`fastrnn.ops.recurrence.plan` over hidden sizes 16..1024 (resident at each block and warp
  count, tiled) in three forms: ``plain`` (torch.nn's defaults, one direction, every size
  divisible by 16: ``D`` folded), ``full`` (every option on: bidirectional, lengths, projection,
  ``b_hh``, gelu, ``grad_clip``, gradient-flow record; ``B`` and ``H`` not divisible by 16) and
  ``batch1`` (one row: ``B`` folded). A strategy the plan picks only when forced runs forced
  (``tiled-forced``: ``FASTRNN_STRATEGY=tiled``). The fp32 kernels of the cells whose precision
  follows cuDNN's RNN flag (every cell's: ``fastrnn.ops.recurrence.input_precision``) compile at the
  default (tf32) and again with the flag off (``<cell>-fp32-exact-*``: the split-tf32 or FMA forms,
  at the plan they get then); the persistent classes also in barrier mode
  (``persistent-barrier``, ``persistent512-8w-barrier``; on a CPU the launcher runs per step): for
  RNN and GRU at every size the plan gives them, one class per warp count (``persistent512-8w``); past
  :data:`PERSISTENT_GATE_HIDDEN`, the cells of :data:`PERSISTENT_GATE_CELLS` get one persistent class
  per hidden size (``persistent-H1024``; past :data:`PERSISTENT_NOPROJ_HIDDEN` also the full form without
  projection, ``-full-noproj``, and at the largest one direction of it, ``-uni-noproj``) and the GPU
  matrix's rows by shape (``lstm-bf16-persistent-barrier-L4``). Then IndRNN, the fused
  generation kernels at the corners of :func:`fastrnn.ops.feedback.compile_corners`, plain and
  full, and the zoneout forms (``*-zoneout-full``: LSTM and GRU at their largest resident class
  and at their largest persistent class in barrier mode; the GRU's bf16 also in eval, the LSTM's
  persistent ones also without projection and at the L1 row's shape). Identical launches from different workloads
  compile once.
* :func:`check`: the limits every launch is held to (``tests/test_kernel_compile.py``): no local
  memory, no stack frame on sm_90 (sm_80's small frames are reported, not failed), at most 255
  registers, shared memory within the card's block limit.

Adding a kernel (a new strategy, a new cell)
--------------------------------------------
* A kernel its cell's launcher reaches for some size class (a strategy that ``plan`` returns for
  some hidden size) is covered with no change: the class shows up as its own workloads.
* Anything else: write a function that runs its launchers for one size class with CPU tensors
  and add it to :func:`workloads` under a name saying what it is (``"persistent-lstm-bf16-L1"``);
  helper :func:`layer_workload` runs a cell's layer function (forward and backward) for given
  shapes and options. Prefer one plain and one full form per size class.
* ``tests/test_kernel_compile.py::test_every_kernel_is_covered`` fails while some ``*_kernel`` in
  any module of ``fastrnn.kernels`` is launched by no workload.

``python -m fastrnn.ops.aot --markdown bench/results/aot-compile.md`` regenerates the report;
``--workload NAME`` shows one workload; ``--jobs N`` compiles in N processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import torch

#: Shared memory one block may use: H100/H200 (sm_90) and A100 (sm_80).
SHARED_LIMIT = {90: 232_448, 80: 166_912}
#: SMs of the card each architecture's compile plans for (the persistent grid follows them): H100/H200
#: SXM (sm_90) and A100 (sm_80).
SM_COUNT = {90: 132, 80: 108}
#: The architectures the gate compiles for.
ARCHES = (90, 80)


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int
    stack: int  # bytes of stack frame per thread (spilled values live here)
    local: int  # bytes of local memory per thread
    shared: int  # bytes of shared memory per block, static plus dynamic
    tensor_core_ops: int | None  # HMMA/HGMMA instructions in the SASS (None: not disassembled)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


# ------------------------------------------------------------------------------ capture
@dataclasses.dataclass
class Launch:
    """One launch as Triton specialised it: what ``triton.compile`` would have received."""

    kernel: object  # the triton.runtime.JITFunction
    arch: int
    signature: dict  # parameter name -> "*bf16", "i32", "constexpr", ...
    constants: dict  # (index,) -> value: constexpr arguments and integers folded to 1
    attrs: dict  # (index,) -> [["tt.divisibility", 16]] ...
    options: dict  # the backend options (num_warps, num_stages, ...)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def key(self) -> str:
        """Equal for launches that compile to the same binary."""
        options = {k: v for k, v in self.options.items() if k != "extern_libs"}
        return repr((self.kernel.fn.__module__, self.name, self.arch, self.signature, sorted(self.constants.items()),
                     sorted((k, repr(v)) for k, v in self.attrs.items()), sorted(options.items())))

    def specialisation(self) -> str:
        """What the launch specialised: integers folded to 1, integers divisible by 16, fp32
        pointers, pointers without the 16-byte alignment hint."""
        names = list(self.signature)
        declared = {p.name for p in self.kernel.params if p.is_constexpr}
        # None: an optional argument left out (``keep_ptr=None``), not a value Triton folded
        folded = [f"{names[i]}={v}" for (i,), v in self.constants.items() if names[i] not in declared and v is not None]
        aligned = {names[i] for (i,), a in self.attrs.items() if ["tt.divisibility", 16] in [list(x) for x in a]}
        ints = [n for n in names if self.signature[n] in ("i32", "i64") and n in aligned]
        pointers = [n for n in names if self.signature[n].startswith("*")]
        fp32 = sum(self.signature[n] == "*fp32" for n in pointers)
        unaligned = [n for n in pointers if n not in aligned]
        parts = []
        if folded:
            parts.append("folded " + " ".join(folded))
        parts.append("÷16 " + (" ".join(ints) if ints else "none"))
        parts.append(f"*fp32 {fp32}/{len(pointers)}")
        if unaligned:
            parts.append("unaligned " + " ".join(unaligned))
        return "; ".join(parts)


class _AheadOfTimeDriver:
    """Stands in for Triton's CUDA driver: reports ``sm_{arch}`` and no device or stream."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.device = ("aot", arch)  # its own key in each kernel's per-device cache

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@contextlib.contextmanager
def capture_launches(arch: int = 90) -> Iterator[list[Launch]]:
    """Record every ``@triton.jit`` launch made in the block, as Triton specialises it for
    ``sm_{arch}``, without compiling or running anything (the launch returns None)."""
    from triton import knobs
    from triton.runtime.driver import driver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("capture_launches needs compiled kernels: unset TRITON_INTERPRET (run it in a subprocess)")
    launches: list[Launch] = []

    def record(*, key, repr, fn, compile, is_manual_warmup, already_compiled):
        options = {k: _tuples(v) for k, v in json.loads(compile["specialization_data"])["options"].items()}
        launches.append(Launch(fn.jit_function, arch, dict(compile["signature"]), dict(compile["constants"]),
                               dict(compile["configs"][0]), options))
        return True  # skip the compile; the launch then returns without running

    from fastrnn.ops import persistent

    previous_driver, previous_hook = driver._active, knobs.runtime.jit_cache_hook
    previous_card = persistent.planning_card
    driver.set_active(_AheadOfTimeDriver(arch))
    knobs.runtime.jit_cache_hook = record
    # the persistent plan follows the card: its shared memory per block and its SM count
    persistent.planning_card = persistent.PlanningCard(SM_COUNT[arch], SHARED_LIMIT[arch])
    try:
        yield launches
    finally:
        driver.set_active(previous_driver)
        knobs.runtime.jit_cache_hook = previous_hook
        persistent.planning_card = previous_card


def compile_binary(launch: Launch):
    """``triton.compile`` of ``launch`` for its architecture, as Triton's launch would (the
    compiled kernel: ``.asm["ptx"]``, ``.asm["cubin"]``, ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(launch.kernel, launch.signature, launch.constants, launch.attrs)
    return triton.compile(source, target=GPUTarget("cuda", launch.arch, 32), options=launch.options)


def compile_launch(launch: Launch, sass: bool = True) -> Resources:
    """Compile ``launch`` (:func:`compile_binary`) and read its resources from the cubin.
    ``sass=False``: no disassembly, ``tensor_core_ops`` None. Only that count needs the SASS, and
    ``nvdisasm`` costs nearly as much as the compile itself (measured here, sm_90, the 62 fp32 RNN/GRU
    tf32 binaries, cold cache, one job: 49.1 CPU-s with it, 28.9 without on Triton 3.9, 40.9 and 21.8
    on 3.6; with a warm Triton cache it is nearly all of a report's time), so the suite's gate, whose
    limits (:func:`check`) need no count of it, skips it."""
    import triton

    compiled = compile_binary(launch)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin.name], capture_output=True, text=True, check=True).stdout
        disassembly = (subprocess.run([os.path.join(tools, "nvdisasm"), cubin.name], capture_output=True, text=True, check=True).stdout
                       if sass else None)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return Resources(
        registers=int(fields["REG"]),
        stack=int(fields["STACK"]),
        local=int(fields["LOCAL"]),
        shared=int(fields["SHARED"]) + int(compiled.metadata.shared),
        tensor_core_ops=None if disassembly is None else len(re.findall(r"\b(?:HMMA|HGMMA)\b", disassembly)),
    )


# ---------------------------------------------------------------------------- workloads
#: Steps of every workload (``T`` is never specialised: its value does not change the binary).
STEPS = 3
#: Input features of every layer workload (the input projection is a GEMM outside the kernels).
INPUT_SIZE = 16
#: Layer gates per cell.
CELL_GATES = {"rnn": 1, "gru": 3, "lstm": 4}
#: The cells of :data:`PERSISTENT_GATE_CELLS` (the LSTM) get the persistent class ``persistent`` (all
#: forms) up to this hidden size. Every other cell's persistent strategy follows the plan with no
#: limit of the gate's own: one class per warp count of its partition, at the largest hidden size
#: the plan gives it (``persistent512-8w``; :func:`size_classes`).
PERSISTENT_GATE_HIDDEN = 256
#: Cells whose persistent kernels the gate also runs past :data:`PERSISTENT_GATE_HIDDEN`, at every
#: hidden size the plan gives them the strategy (each its own size class, ``persistent-H<h>``, in
#: barrier mode only: what a GPU runs; the per-step form is covered up to the limit), and
#: at the GPU matrix's persistent LSTM rows beyond it by shape (``bench/matrix.py``: L1 B16 H768,
#: L4 B256 H1024, whose plans split the reduction and walk batch groups in sub-tiles).
PERSISTENT_GATE_CELLS = {"lstm": {"L1": (768, 16), "L4": (1024, 256)}}
#: The LSTM's persistent classes past this hidden size also compile the ``full`` form without
#: projection (``-full-noproj``: bidirectional, lengths, ``grad_clip``, the gradient-flow record, H
#: not divisible by 16): the other full forms project (``K = P``, half the reduction), and this one
#: spilled on sm_90 where they compiled clean (issue #12: forward/backward 384/16 B of stack at H1016
#: B20, Triton 3.9; ``fastrnn.ops.persistent.NARROW_FWD_CHUNK``).
PERSISTENT_NOPROJ_HIDDEN = 512
FULL_NOPROJ = dict(bidirectional=True, lengths=True, grad_clip=1.0, record_flow=True)
#: The largest persistent LSTM class also compiles that form in one direction (``-uni-noproj``, B16:
#: 8-unit slices, ``H`` not divisible by 16; ``fastrnn.ops.persistent.NARROW_BWD_CHUNK``), whose
#: backward spilled on sm_90 (issue #12: 255+24 B of stack on Triton 3.9, 255+48 on 3.6 at H1016).
UNI_NOPROJ = dict(lengths=True, grad_clip=1.0, record_flow=True)
#: Batch rows of each form: a multiple of 16, not one, and a single row (folded to 1).
FORM_BATCH = {"plain": 16, "full": 20, "batch1": 1}


def layer_workload(cell: str, dtype: torch.dtype, hidden: int, batch: int, *, bidirectional: bool = False, lengths: bool = False,
                   proj_size: int = 0, bias: bool = True, nonlinearity: str = "tanh", grad_clip: float | None = None,
                   record_flow: bool = False) -> None:
    """One layer of ``cell`` forward and backward through its kernel-backed layer function (what
    :func:`fastrnn.dispatch.run_stack` calls on CUDA), with CPU tensors of these shapes."""
    import fastrnn
    from fastrnn.dispatch import triton_layer

    kwargs = dict(bias=bias, bidirectional=bidirectional, dtype=dtype, grad_clip=grad_clip)
    if cell == "rnn":
        kwargs["nonlinearity"] = nonlinearity
    if proj_size:
        kwargs["proj_size"] = proj_size
    module = {"rnn": fastrnn.RNN, "gru": fastrnn.GRU, "lstm": fastrnn.LSTM}[cell](INPUT_SIZE, hidden, **kwargs)
    directions = 2 if bidirectional else 1
    x = torch.zeros(STEPS, batch, INPUT_SIZE, dtype=dtype, requires_grad=True)
    h0 = torch.zeros(directions, batch, proj_size or hidden, dtype=dtype)
    c0 = torch.zeros(directions, batch, hidden, dtype=dtype) if cell == "lstm" else None
    options = {"grad_clip": grad_clip}
    if record_flow:
        options["flow_record"] = torch.zeros(directions, STEPS)
    y, _, _ = triton_layer(cell)(
        cell, x, h0, c0, module._layer_params()[0], torch.full((batch,), STEPS) if lengths else None,
        nonlinearity if cell == "rnn" else None, **options,
    )
    y.float().sum().backward()


def _layer_forms(cell: str, dtype: torch.dtype, hidden: int) -> dict[str, Callable[[], None]]:
    """``plain``, ``full`` and ``batch1`` of one size class (``hidden`` the largest H it serves)."""
    odd = hidden - 8  # same class (same power-of-two block), not divisible by 16
    full = dict(bidirectional=True, lengths=True, grad_clip=1.0, record_flow=True)
    if cell == "rnn":
        full["nonlinearity"] = "gelu"  # its derivative reads the saved pre-activations
    if cell == "lstm":
        full["proj_size"] = odd // 2
    return {
        "plain": lambda: layer_workload(cell, dtype, hidden, FORM_BATCH["plain"]),
        "full": lambda: layer_workload(cell, dtype, odd, FORM_BATCH["full"], **full),
        "batch1": lambda: layer_workload(cell, dtype, hidden, FORM_BATCH["batch1"]),
    }


def size_classes(cell: str, dtype: torch.dtype) -> dict[str, int]:
    """The size classes of ``cell``: the plans over hidden sizes 16..1024 grouped by strategy, warps
    and stages, each named by its strategy, block and warps, with the largest (power-of-two) hidden
    size it serves (the largest block of a group is its heaviest binary). The persistent strategy
    of a cell outside :data:`PERSISTENT_GATE_CELLS` is grouped by the warps of its launch-time
    partition, ``persistent{H}-{warps}w``; the LSTM's as :data:`PERSISTENT_GATE_CELLS` says."""
    from fastrnn.ops.persistent import persistent_plan
    from fastrnn.ops.recurrence import plan

    classes = {}
    for exponent in range(4, 11):
        hidden = 2 ** exponent
        p = plan(CELL_GATES[cell], hidden, dtype)
        if p.strategy == "persistent" and cell not in PERSISTENT_GATE_CELLS:
            # Every size the plan gives it, grouped by the warps of its launch-time partition
            # (fastrnn.ops.persistent.persistent_plan at the plain form's batch), the largest H of
            # each group: no limit of the gate's own.
            warps = persistent_plan(CELL_GATES[cell], hidden, FORM_BATCH["plain"], 1, dtype).num_warps
            classes[p.strategy, warps] = (f"persistent{hidden}-{warps}w", hidden)
            continue
        if p.strategy == "persistent" and hidden > PERSISTENT_GATE_HIDDEN:
            classes[p.strategy, hidden] = (f"persistent-H{hidden}", hidden)
            continue
        name = f"{p.strategy}{p.block_h}-{p.num_warps}w" if p.strategy == "resident" else p.strategy
        classes[p.strategy, p.num_warps, p.num_stages] = (name, hidden)
    return dict(classes.values())


def feedback_workload(cell: str, dtype: torch.dtype, hidden: int, output: int, batch: int, *, full: bool) -> None:
    """Fused free-running generation (``fastrnn.ops.feedback.generate``, what
    :func:`fastrnn.topologies.free_run` calls on CUDA) forward and backward; ``full``: gelu (Elman),
    a sigmoid head and ``grad_clip``, else tanh, identity head, no clipping."""
    import fastrnn
    from fastrnn.ops.feedback import generate

    nonlinearity = "gelu" if full and cell == "rnn" else "tanh"
    grad_clip = 1.0 if full else None
    model = fastrnn.OneToMany(output, hidden, output, cell=cell, feedback=True, nonlinearity=nonlinearity,
                              output_activation="sigmoid" if full else None, grad_clip=grad_clip, dtype=dtype)
    x0 = torch.zeros(batch, output, dtype=dtype, requires_grad=True)
    h0 = torch.zeros(batch, hidden, dtype=dtype)
    c0 = torch.zeros(batch, hidden, dtype=dtype) if cell == "lstm" else None
    y, _, _ = generate(cell, x0, h0, c0, model.rnn._layer_params()[0][0], model.head, nonlinearity, STEPS, grad_clip)
    y.float().sum().backward()


def zoneout_workload(cell: str, dtype: torch.dtype, hidden: int, batch: int, train: bool = True, projecting: bool = True,
                     full: bool = True) -> None:
    """One LSTM or GRU layer with zoneout in training (the mask read by the forward and backward
    kernels the size plans to: resident or persistent; ``train`` False: eval, the scalar ``p``)
    forward and backward (``fastrnn.ops.zoneout.zoneout_layer``), every other option on as in the
    ``full`` form: bidirectional, lengths, ``grad_clip``, the gradient-flow record, a projection
    (LSTM, unless not ``projecting``); not ``full``: one direction, no other option, no projection."""
    import fastrnn
    from fastrnn.ops.zoneout import zoneout_layer

    proj_size = hidden // 2 if cell == "lstm" and projecting and full else 0
    directions = 2 if full else 1
    kwargs = dict(bidirectional=full, dtype=dtype, **({"proj_size": proj_size} if proj_size else {}))
    module = {"gru": fastrnn.GRU, "lstm": fastrnn.LSTM}[cell](INPUT_SIZE, hidden, **kwargs)
    x = torch.zeros(STEPS, batch, INPUT_SIZE, dtype=dtype, requires_grad=True)
    h0 = torch.zeros(directions, batch, proj_size or hidden, dtype=dtype)
    c0 = torch.zeros(directions, batch, hidden, dtype=dtype) if cell == "lstm" else None
    keep = torch.ones(STEPS, batch, directions * hidden, dtype=dtype) if train else None
    y, _, _ = zoneout_layer(cell, x, h0, c0, module._layer_params()[0], torch.full((batch,), STEPS) if full else None, keep, 0.1,
                            grad_clip=1.0 if full else None, flow_record=torch.zeros(directions, STEPS) if full else None)
    y.float().sum().backward()


@contextlib.contextmanager
def forced_env(variable: str, value: str) -> Iterator[None]:
    """Run the block with the environment variable set (a knob such as ``FASTRNN_STRATEGY=tiled``,
    for what the launchers pick only when forced or only on a GPU)."""
    previous = os.environ.get(variable)
    os.environ[variable] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[variable]
        else:
            os.environ[variable] = previous


def _forced(variable: str, value: str, run: Callable[[], None]) -> Callable[[], None]:
    def forced() -> None:
        with forced_env(variable, value):
            run()
    return forced


@contextlib.contextmanager
def cudnn_tf32(allowed: bool) -> Iterator[None]:
    """Run the block with ``torch.backends.cudnn.allow_tf32`` set (the flag the layer kernels' fp32
    products follow, :func:`fastrnn.ops.recurrence.cudnn_rnn_allows_tf32`), restored afterwards."""
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def _without_cudnn_tf32(run: Callable[[], None]) -> Callable[[], None]:
    def exact() -> None:
        with cudnn_tf32(False):
            run()
    return exact


def indrnn_workload(dtype: torch.dtype, hidden: int, batch: int, *, full: bool) -> None:
    """One IndRNN layer forward and backward (``fastrnn.ops.indrnn.indrnn_layer``); ``full``:
    bidirectional, lengths, zoneout, ``grad_clip`` and the gradient-flow record."""
    from fastrnn.ops.indrnn import indrnn_layer

    directions = 2 if full else 1
    params = [{"weight_ih": torch.zeros(hidden, INPUT_SIZE, dtype=dtype), "weight_hh": torch.zeros(hidden, dtype=dtype),
               "bias_ih": torch.zeros(hidden, dtype=dtype), "bias_hh": torch.zeros(hidden, dtype=dtype)} for _ in range(directions)]
    x = torch.zeros(STEPS, batch, INPUT_SIZE, dtype=dtype, requires_grad=True)
    h0 = torch.zeros(directions, batch, hidden, dtype=dtype)
    options = {}
    if full:
        options = dict(zoneout_mask=torch.ones(STEPS, batch, directions * hidden, dtype=dtype), zoneout_p=0.1, grad_clip=1.0,
                       flow_record=torch.zeros(directions, STEPS))
    y, _ = indrnn_layer(x, h0, params, torch.full((batch,), STEPS) if full else None, "relu", **options)
    y.float().sum().backward()


def layer_norm_workload(cell: str, dtype: torch.dtype, hidden: int, batch: int, form: str, backward: bool = True) -> None:
    """One LayerNormLSTM / LayerNormGRU layer (``cell`` ``"lstm"`` / ``"gru"``) forward and backward
    (``backward`` False: forward only) through :mod:`fastrnn.ops.layer_norm_rnn`'s kernels. ``form``
    ``plain``: one direction, no options; ``full``: bidirectional, lengths, a zoneout mask,
    ``grad_clip``, the gradient-flow record; ``batch1``: eval-mode zoneout (its own binary)."""
    from fastrnn.ops.layer_norm_rnn import layer_norm_gru_kernel_layer, layer_norm_lstm_kernel_layer

    gates, directions = (4 if cell == "lstm" else 3), (2 if form == "full" else 1)
    shapes = {"weight_ih": (gates * hidden, INPUT_SIZE), "weight_hh": (gates * hidden, hidden), "bias_ih": (gates * hidden,),
              "bias_hh": (gates * hidden,), "gain_ih": (gates * hidden,), "gain_hh": (gates * hidden,)}
    if cell == "lstm":
        shapes |= {"gain_cell": (hidden,), "bias_cell": (hidden,)}
    params = [{k: torch.zeros(shape, dtype=dtype, requires_grad=True) for k, shape in shapes.items()} for _ in range(directions)]
    x = torch.zeros(STEPS, batch, INPUT_SIZE, dtype=dtype, requires_grad=True)
    h0 = torch.zeros(directions, batch, hidden, dtype=dtype)
    full = form == "full"
    options = dict(lengths=torch.full((batch,), STEPS) if full else None,
                   zoneout_mask=torch.ones(STEPS, batch, directions * hidden, dtype=dtype) if full else None,
                   zoneout_p=0.1 if form != "plain" else 0.0, grad_clip=1.0 if full else None,
                   flow_record=torch.zeros(directions, STEPS) if full else None)
    with torch.set_grad_enabled(backward):
        if cell == "lstm":
            y, _, _ = layer_norm_lstm_kernel_layer(x, h0, torch.zeros_like(h0), params, **options)
        else:
            y, _ = layer_norm_gru_kernel_layer(x, h0, params, **options)
    if backward:
        y.float().sum().backward()


#: The hidden size the LayerNorm tiled kernels are compiled at: the GPU matrix's LayerNormLSTM
#: row (B64 T512 H256 bf16). Their binary does not depend on H beyond divisibility.
LAYER_NORM_TILED_HIDDEN = 256
#: ``(hidden, batch)`` of the persistent LayerNormLSTM kernels' workloads: the GPU matrix's
#: LayerNormLSTM row, whose plan it is (32 slices of 8 units x 4 batch groups one way; the ``full``
#: form, H248 bidirectional, 16 of 16 x 4 x 2), in barrier mode; bf16 as the card plans it, fp32
#: forced and forward only (``-fwd-``): fp32 plans the tiled kernels, and its persistent backward,
#: which runs only when forced, spills on sm_90 (FMA products; 96-896 B of stack on Triton 3.6 and
#: 3.9 in the three forms).
LAYER_NORM_PERSISTENT_ROW = (256, 64)


def layer_norm_size_classes(cell: str, dtype: torch.dtype) -> dict[str, int]:
    """The LayerNorm kernels' classes over hidden sizes 16..1024: the largest (power-of-two) hidden
    size of each resident (block, warps) the kernels serve, by name, and ``tiled`` at
    :data:`LAYER_NORM_TILED_HIDDEN`."""
    from fastrnn.ops.layer_norm_rnn import kernel_blocks, strategy

    classes = {}
    for exponent in range(4, 11):
        blocks = kernel_blocks(CELL_GATES[cell], 2 ** exponent, dtype)
        if blocks is not None:
            classes[blocks[1]] = (f"resident{blocks[0]}-{blocks[1]}w", 2 ** exponent)
    if strategy(CELL_GATES[cell], LAYER_NORM_TILED_HIDDEN, dtype) == "tiled":
        classes["tiled"] = ("tiled", LAYER_NORM_TILED_HIDDEN)
    return dict(classes.values())


def _class_workloads(cell: str, dtype: torch.dtype, classes: dict[str, int], exact: bool = False) -> dict[str, Callable[[], None]]:
    """The layer workloads of ``classes`` (:func:`size_classes`): each class in its three forms, the
    persistent classes also in barrier mode (on a CPU the launcher runs per step: the barrier form is
    what a GPU runs; past :data:`PERSISTENT_GATE_HIDDEN` only it). ``exact``: with cuDNN's RNN flag
    off (:func:`cudnn_tf32`), named ``{cell}-{dtype}-exact-{class}-{form}``."""
    out = {}
    prefix = f"{cell}-{_dtype_name(dtype)}-{'exact-' if exact else ''}"
    for size_class, hidden in classes.items():
        for form, run in _layer_forms(cell, dtype, hidden).items():
            run = _without_cudnn_tf32(run) if exact else run
            if not size_class.startswith("persistent-H"):
                out[f"{prefix}{size_class}-{form}"] = run
            if size_class.startswith("persistent"):
                barrier = (size_class.replace("persistent", "persistent-barrier", 1)
                           if size_class == "persistent" or size_class.startswith("persistent-H") else f"{size_class}-barrier")
                out[f"{prefix}{barrier}-{form}"] = _forced("FASTRNN_PERSISTENT_MODE", "barrier", run)
    return out


def workloads() -> dict[str, Callable[[], None]]:
    """Every workload of the gate by name (nothing runs until a workload is called)."""
    from fastrnn.ops.feedback import CELLS, compile_corners

    out: dict[str, Callable[[], None]] = {}
    for cell in CELL_GATES:
        for dtype in (torch.bfloat16, torch.float32):
            classes = size_classes(cell, dtype)
            out |= _class_workloads(cell, dtype, classes)
            if cell in PERSISTENT_GATE_CELLS and dtype != torch.float32:
                for size_class, hidden in classes.items():  # the full form without projection past H512
                    if size_class.startswith("persistent-H") and hidden > PERSISTENT_NOPROJ_HIDDEN:
                        out[f"{cell}-{_dtype_name(dtype)}-{size_class.replace('persistent', 'persistent-barrier', 1)}-full-noproj"] = _forced(
                            "FASTRNN_PERSISTENT_MODE", "barrier",
                            lambda c=cell, d=dtype, h=hidden - 8: layer_workload(c, d, h, FORM_BATCH["full"], **FULL_NOPROJ))
                size_class, hidden = max(((n, h) for n, h in classes.items() if n.startswith("persistent")), key=lambda item: item[1])
                out[f"{cell}-{_dtype_name(dtype)}-{size_class.replace('persistent', 'persistent-barrier', 1)}-uni-noproj"] = _forced(
                    "FASTRNN_PERSISTENT_MODE", "barrier",
                    lambda c=cell, d=dtype, h=hidden - 8: layer_workload(c, d, h, FORM_BATCH["plain"], **UNI_NOPROJ))
                for row, (hidden, batch) in PERSISTENT_GATE_CELLS[cell].items():
                    out[f"{cell}-{_dtype_name(dtype)}-persistent-barrier-{row}"] = _forced(
                        "FASTRNN_PERSISTENT_MODE", "barrier", lambda c=cell, d=dtype, h=hidden, b=batch: layer_workload(c, d, h, b))
            if "tiled" not in classes:  # tiled only when forced: its largest-H class, forced
                for form, run in _layer_forms(cell, dtype, 2 ** 10).items():
                    out[f"{cell}-{_dtype_name(dtype)}-tiled-forced-{form}"] = _forced("FASTRNN_STRATEGY", "tiled", run)
            if dtype == torch.float32:
                # cuDNN's RNN flag off: the split-tf32 / FMA forms and the plan they get (``-exact-``)
                with cudnn_tf32(False):
                    exact_classes = size_classes(cell, dtype)
                out |= _class_workloads(cell, dtype, exact_classes, exact=True)
    for dtype in (torch.bfloat16, torch.float32):
        out[f"indrnn-{_dtype_name(dtype)}-plain"] = lambda d=dtype: indrnn_workload(d, 256, 16, full=False)
        out[f"indrnn-{_dtype_name(dtype)}-full"] = lambda d=dtype: indrnn_workload(d, 250, 20, full=True)
    for cell in ("lstm", "gru"):
        for dtype in (torch.bfloat16, torch.float32):
            for size_class, hidden in layer_norm_size_classes(cell, dtype).items():
                for form in ("plain", "full", "batch1"):
                    size = hidden - 8 if form == "full" else hidden  # same block, not divisible by 16
                    run = lambda c=cell, d=dtype, h=size, f=form: layer_norm_workload(c, d, h, FORM_BATCH[f], f)  # noqa: E731
                    # the tiled forward too (the 16-bit LSTM's plans persistent at this size)
                    out[f"layer-norm-{cell}-{_dtype_name(dtype)}-{size_class}-{form}"] = (
                        _forced("FASTRNN_STRATEGY", "tiled", run) if size_class == "tiled" else run)
    hidden, batch = LAYER_NORM_PERSISTENT_ROW
    for dtype in (torch.bfloat16, torch.float32):  # the persistent LayerNormLSTM forward (and the tiled backward)
        for form in ("plain", "full", "batch1"):
            size, rows, fp32 = (hidden - 8 if form == "full" else hidden), (1 if form == "batch1" else batch), dtype == torch.float32
            run = lambda d=dtype, h=size, b=rows, f=form, bwd=not fp32: layer_norm_workload("lstm", d, h, b, f, bwd)  # noqa: E731
            if fp32:  # bf16 as the card's plan says (an A100's bidirectional B64: tiled), fp32 forced, forward only
                run = _forced("FASTRNN_STRATEGY", "persistent", run)
            name = f"layer-norm-lstm-{_dtype_name(dtype)}-persistent-barrier-{'fwd-' if fp32 else ''}{form}"
            out[name] = _forced("FASTRNN_PERSISTENT_MODE", "barrier", run)
    # the persistent LayerNormGRU kernels at the same shape, forward and backward: bf16 as the card plans
    # it (an A100's bidirectional B64 H248: 32-unit slices, 48 KB of weights, past
    # PERSISTENT_MAX_SLICE_BYTES: tiled), plain and full; fp32 forced, full (the heaviest form)
    for dtype, forms in ((torch.bfloat16, ("plain", "full")), (torch.float32, ("full",))):
        for form in forms:
            size = hidden - 8 if form == "full" else hidden
            run = lambda d=dtype, h=size, b=batch, f=form: layer_norm_workload("gru", d, h, b, f)  # noqa: E731
            if dtype == torch.float32:
                run = _forced("FASTRNN_STRATEGY", "persistent", run)
            out[f"layer-norm-gru-{_dtype_name(dtype)}-persistent-barrier-{form}"] = _forced("FASTRNN_PERSISTENT_MODE", "barrier", run)
    for cell in CELLS:
        for dtype, block_h, block_o, warps in compile_corners(cell):
            for form in ("plain", "full"):
                odd = 8 if form == "full" else 0
                out[f"{cell}-feedback-{_dtype_name(dtype)}-{block_h}x{block_o}-{warps}w-{form}"] = (
                    lambda c=cell, d=dtype, h=block_h - odd, o=block_o - odd, f=form:
                    feedback_workload(c, d, h, o, FORM_BATCH[f], full=f == "full")
                )
    for cell in ("lstm", "gru"):  # zoneout on the resident kernels: their largest class, full form
        for dtype in (torch.bfloat16, torch.float32):
            hidden, size_class = max((h, name) for name, h in size_classes(cell, dtype).items() if name.startswith("resident"))
            out[f"{cell}-{_dtype_name(dtype)}-{size_class}-zoneout-full"] = (
                lambda c=cell, d=dtype, h=hidden - 8: zoneout_workload(c, d, h, FORM_BATCH["full"]))
            if dtype == torch.float32:  # and its split-tf32 form
                out[f"{cell}-{_dtype_name(dtype)}-exact-{size_class}-zoneout-full"] = _without_cudnn_tf32(
                    lambda c=cell, d=dtype, h=hidden - 8: zoneout_workload(c, d, h, FORM_BATCH["full"]))
    for dtype in (torch.bfloat16, torch.float32):  # and on the GRU's persistent kernels: their largest class, barrier form
        hidden, size_class = max((h, name) for name, h in size_classes("gru", dtype).items() if name.startswith("persistent"))
        out[f"gru-{_dtype_name(dtype)}-{size_class}-barrier-zoneout-full"] = _forced(
            "FASTRNN_PERSISTENT_MODE", "barrier", lambda d=dtype, h=hidden - 8: zoneout_workload("gru", d, h, FORM_BATCH["full"]))
        if dtype == torch.bfloat16:  # eval's binaries too: its backward took 255 registers (sm_90, Triton 3.9), the mask's 214
            out[f"gru-{_dtype_name(dtype)}-{size_class}-barrier-zoneout-eval-full"] = _forced(
                "FASTRNN_PERSISTENT_MODE", "barrier",
                lambda d=dtype, h=hidden - 8: zoneout_workload("gru", d, h, FORM_BATCH["full"], train=False))
    # and on the LSTM's persistent kernels, barrier form: projecting at their largest class (bf16 in eval too:
    # its forward takes 255 registers, the mask's 254), and without projection (bf16: the forward's chunks
    # with zoneout, fastrnn.ops.persistent.NARROW_ZONEOUT_FWD_CHUNK)
    for dtype in (torch.bfloat16, torch.float32):
        classes = {name: h for name, h in size_classes("lstm", dtype).items() if name.startswith("persistent")}
        largest = max(classes, key=classes.get)
        forms = [(largest, "", True, True)] + [(largest, "-eval", True, False)] * (dtype != torch.float32)
        forms.append((largest, "-noproj", False, True))
        for size_class, suffix, projecting, train in forms:
            barrier = size_class.replace("persistent", "persistent-barrier", 1)
            out[f"lstm-{_dtype_name(dtype)}-{barrier}-zoneout{suffix}-full"] = _forced(
                "FASTRNN_PERSISTENT_MODE", "barrier",
                lambda d=dtype, h=classes[size_class] - 8, p=projecting, t=train:
                zoneout_workload("lstm", d, h, FORM_BATCH["full"], train=t, projecting=p))
    hidden, batch = PERSISTENT_GATE_CELLS["lstm"]["L1"]  # and at the GPU matrix's L1 row (its backward's own chunks)
    out["lstm-bf16-persistent-barrier-L1-zoneout"] = _forced(
        "FASTRNN_PERSISTENT_MODE", "barrier", lambda: zoneout_workload("lstm", torch.bfloat16, hidden, batch, full=False))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def kernel_names() -> set[str]:
    """``module:name`` of every ``*_kernel`` in every module of ``fastrnn.kernels``."""
    import fastrnn.kernels

    names = set()
    for info in pkgutil.iter_modules(fastrnn.kernels.__path__):
        module = importlib.import_module(f"fastrnn.kernels.{info.name}")
        names |= {f"{module.__name__}:{n}" for n in dir(module) if n.endswith("_kernel")}
    return names


# ------------------------------------------------------------------------------- report
def capture(arches: tuple[int, ...] = ARCHES, names: list[str] | None = None) -> list[tuple[str, Launch]]:
    """``(workload, launch)`` for every launch of every workload (or of ``names``) on each arch."""
    table = workloads()
    out = []
    for arch in arches:
        for name in names or table:
            with capture_launches(arch) as launches:
                table[name]()
            if not launches:
                raise RuntimeError(f"workload {name} launched no kernel")
            out += [(name, launch) for launch in launches]
    return out


def report(arches: tuple[int, ...] = ARCHES, names: list[str] | None = None, jobs: int = 1, shard: tuple[int, int] = (0, 1),
           sass: bool = True) -> list[dict]:
    """One row per distinct binary: its kernel, arch, options, specialisation, resources and the
    workloads that launch it. ``jobs > 1`` compiles in that many subprocesses. ``sass``: as
    :func:`compile_launch` takes it."""
    if jobs > 1:
        return _report_in_subprocesses(arches, names, jobs, sass)
    binaries: dict[str, tuple[Launch, list[str]]] = {}
    for name, launch in capture(arches, names):
        binaries.setdefault(launch.key, (launch, []))[1].append(name)
    rows = []
    for index, (launch, users) in enumerate(binaries.values()):
        if index % shard[1] != shard[0]:
            continue
        r = compile_launch(launch, sass)
        rows.append(dict(
            index=index, arch=launch.arch, kernel=f"{launch.kernel.fn.__module__}:{launch.name}",
            num_warps=launch.options["num_warps"], num_stages=launch.options["num_stages"],
            specialisation=launch.specialisation(), workloads=sorted(set(users)), **dataclasses.asdict(r),
        ))
    return rows


def _report_in_subprocesses(arches, names, jobs: int, sass: bool) -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        outs = [os.path.join(folder, f"{i}.json") for i in range(jobs)]
        command = [sys.executable, "-m", "fastrnn.ops.aot", "--arch", *map(str, arches)]
        if names:
            command += ["--workload", *names]
        if not sass:
            command.append("--no-sass")
        procs = [subprocess.Popen(command + ["--shard", f"{i}/{jobs}", "--json", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for i, out in enumerate(outs)]
        errors = [p.communicate()[1] for p in procs]
        for p, err in zip(procs, errors):
            if p.returncode:
                raise RuntimeError(f"an ahead-of-time compile shard failed:\n{err}")
        rows = [row for out in outs for row in json.load(open(out))]
    return sorted(rows, key=lambda row: row["index"])


def check(row: dict) -> list[str]:
    """What breaks the limits in one report row (empty: it holds)."""
    problems = []
    where = f"{row['kernel']} on sm_{row['arch']} ({row['specialisation']})"
    if row["local"]:
        problems.append(f"{where} uses {row['local']} B of local memory")
    if row["arch"] >= 90 and row["stack"]:
        problems.append(f"{where} spills: {row['stack']} B stack frame")
    if row["registers"] > 255:
        problems.append(f"{where} uses {row['registers']} registers")
    if row["shared"] > SHARED_LIMIT[row["arch"]]:
        problems.append(f"{where} needs {row['shared']} B of shared memory (limit {SHARED_LIMIT[row['arch']]})")
    return problems


def markdown(rows: list[dict]) -> str:
    import datetime

    import triton

    lines = [
        f"# Ahead-of-time compile report ({datetime.date.today()}, triton {triton.__version__}, torch {torch.__version__}, compiled on a CPU)",
        "",
        "Written by `python -m fastrnn.ops.aot --markdown <this file>`: every kernel as the launchers launch it, "
        "specialised by Triton's own launch code for each workload (`fastrnn/ops/aot.py` says how). One row per "
        "distinct binary; the workloads column names what launches it. Specialisation: integers folded to a "
        "constant, integers with the divisible-by-16 hint, fp32 pointers of all pointers. Shared memory limit per "
        "block: sm_90 232,448 B, sm_80 166,912 B. Stack or local bytes above 0 mean spills (held to 0 on sm_90).",
        "",
        "| arch | kernel | warps | stages | specialisation | registers | stack B | local B | shared B | tensor-core ops | workloads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| sm_{r['arch']} | {r['kernel'].split(':')[1]} | {r['num_warps']} | {r['num_stages']} | {r['specialisation']} | "
            f"{r['registers']} | {r['stack']} | {r['local']} | {r['shared']} | {'-' if r['tensor_core_ops'] is None else r['tensor_core_ops']} | {', '.join(r['workloads'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Compile every workload's launches; print and optionally write the report."""
    import argparse

    from fastrnn.backend import TRITON_EXTRA, triton_available

    if not triton_available():
        raise SystemExit(f"python -m fastrnn.ops.aot compiles with Triton, which is not installed: {TRITON_EXTRA}")
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHES))
    parser.add_argument("--workload", nargs="+", help="only these workloads (default: all; --list shows them)")
    parser.add_argument("--list", action="store_true", help="print the workload names and exit")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--markdown", help="write the markdown report here (e.g. bench/results/aot-compile.md)")
    parser.add_argument("--json", help="write the rows as JSON here")
    parser.add_argument("--no-sass", action="store_true",
                        help="skip the disassembly: no tensor-core op counts, about half the time (what the suite's gate runs)")
    args = parser.parse_args()
    if args.list:
        print("\n".join(workloads()))
        return
    shard = tuple(int(x) for x in args.shard.split("/"))
    rows = report(tuple(args.arch), args.workload, args.jobs, shard, sass=not args.no_sass)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    text = markdown(rows)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if shard == (0, 1):
        print(text)
        for row in rows:
            for problem in check(row):
                print("FAILS:", problem)


if __name__ == "__main__":
    main()
