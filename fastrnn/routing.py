"""Which path serves a recurrent call: the Triton kernels, cuDNN, PyTorch's native kernels, or the loop.

A drop-in library must never make its user slower by default, so under ``FASTRNN_BACKEND=auto``
the kernels run only where they are the only fused option or where a measurement says they win:

============================================== ===============================================
call                                           path (``auto``)
============================================== ===============================================
CUDA, with ``grad_clip``, gradient-flow        ``triton``: cuDNN can do none of these and the
recording, an extra nonlinearity (sigmoid,     alternative is the reference loop (``reference``
hardtanh, silu, gelu) or fused free-running    when the kernels cannot take the call: float64,
generation                                     triton missing)
CUDA, anything else                            ``triton`` where the shipped dispatch table says
                                               the kernels beat cuDNN forward+backward by at least
                                               :data:`MIN_SPEEDUP` (and forward too, for a call that
                                               needs no gradient); else ``cudnn``, PyTorch's native
                                               path, exactly what ``torch.nn`` runs (``native`` when
                                               cuDNN is switched off). A missing entry means cuDNN.
CUDA, while ``torch.compile`` traces           ``triton`` (``reference`` for float64): inside a
                                               traced graph PyTorch decomposes its RNN op into an
                                               unrolled loop, so cuDNN is out of reach there
CPU (any other device)                         ``native`` (``torch._VF``, what ``torch.nn`` runs);
                                               ``native-bptt`` under ``torch.compile`` (inductor
                                               cannot lower the native CPU op) and for what the
                                               native kernels cannot do (the features above): one
                                               operator per layer, the native forward inside and
                                               fastrnn's backward (:mod:`fastrnn.native_bptt`)
LSTM/GRU with ``zoneout`` (training or eval)   CUDA: ``triton`` where the size plans to kernels
                                               that zone out (LSTM and GRU: resident and
                                               persistent; ``CallInfo.zoneout_fits``; cuDNN cannot
                                               zone out), else ``reference`` (the loop of
                                               :mod:`fastrnn.regularized_rnn`; under
                                               ``torch.compile`` one operator per layer
                                               either way). CPU: ``reference``.
============================================== ===============================================

``recurrent_dropout`` (DropConnect) in training masks ``W_hh`` on the host
(:mod:`fastrnn.regularized_rnn`); the masked weights then run wherever the call without it would.

``FASTRNN_BACKEND=triton`` forces the kernels on every call (an error where they cannot run:
no CUDA without the interpreter, float64; a zoneout call whose size plans to kernels that do not
zone out runs the loop, and says so); ``reference`` forces the loop.

The decision is :func:`decide`, a pure function of a :class:`DeviceInfo`, a :class:`CallInfo`,
the table, the requested backend, whether ``torch.compile`` is tracing and the autocast dtype;
everything that runs a layer or a generation asks it (:func:`route_stack`,
:func:`route_generation`), and :func:`explain` shows its answer.

The dispatch table (``fastrnn/dispatch_table.json``, package data) holds one entry per GPU
(name and compute capability), cell, compute dtype, directions, projection, packed input and the
size classes of H and B (:func:`size_class`); each entry keeps the measured forward and
forward+backward ratios ``cuDNN time / kernel time`` with the date and versions of the run. T is
not in the key: both sides cost per step, so a ratio holds across sequence lengths (an entry
records the T it was measured at). Sizes between measured classes: :func:`lookup`.
``python -m bench --update-dispatch`` on a GPU writes them (:mod:`bench.dispatch_table`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.resources
import json
from pathlib import Path

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from fastrnn import backend, gradient_flow

#: The kernels replace cuDNN only where they measured at least this much faster forward+backward
#: (``cuDNN time / kernel time``): below it a difference is within run-to-run noise.
MIN_SPEEDUP = 1.05

#: Dtypes the kernels compute in (state and accumulation in fp32).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

#: Elman nonlinearities cuDNN has; any other one only the kernels fuse.
TORCH_NONLINEARITIES = (None, "tanh", "relu")

#: Short dtype names, as the table and the messages write them.
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}

TABLE_FILE = "dispatch_table.json"
#: Where the source checkout's table lives (what ``--update-dispatch`` writes).
TABLE_PATH = Path(__file__).with_name(TABLE_FILE)
TABLE_SCHEMA = 1


# ------------------------------------------------------------------------------ descriptions
@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """Where a call runs. ``type`` is ``torch.device.type``; for CUDA, ``name`` is
    ``torch.cuda.get_device_name`` and ``capability`` ``"major.minor"``; ``cudnn``: cuDNN is
    available and enabled; ``triton``: the package is installed; ``interpreting``: Triton's
    interpreter is on (kernels on CPU tensors)."""

    type: str
    name: str | None = None
    capability: str | None = None
    cudnn: bool = True
    triton: bool = True
    interpreting: bool = False

    def describe(self) -> str:
        if self.type != "cuda":
            return self.type.upper()
        cc = f" (sm_{self.capability.replace('.', '')})" if self.capability else ""
        return f"{self.name or 'an unnamed CUDA device'}{cc}"


@dataclasses.dataclass(frozen=True)
class CallInfo:
    """What a call computes, as far as the choice of path depends on it.

    ``cell``: ``"rnn"``, ``"gru"`` or ``"lstm"``; ``dtype``: the input's dtype (the compute dtype
    unless autocast is on); ``hidden``, ``batch``, ``steps``: H, B and T (padded T for packed
    input); ``needs_grad``: autograd will differentiate the call; ``generation``: free-running
    generation with feedback (:mod:`fastrnn.topologies`), ``fusable``: in a shape the fused
    generation kernel takes (one layer, one direction, no projection, a head it knows; its size
    limits are checked by :func:`route_generation`); ``zoneout``: an LSTM/GRU call with zoneout
    (training or eval), ``zoneout_fits``: its size plans to kernels that zone out (the LSTM's and
    the GRU's resident and persistent ones: :func:`fastrnn.ops.zoneout.zoneout_fits`)."""

    cell: str
    dtype: torch.dtype
    hidden: int
    batch: int
    steps: int = 1
    layers: int = 1
    directions: int = 1
    projection: bool = False
    packed: bool = False
    nonlinearity: str | None = None
    grad_clip: bool = False
    flow: bool = False
    needs_grad: bool = True
    generation: bool = False
    fusable: bool = False
    zoneout: bool = False
    zoneout_fits: bool = False

    def describe(self, dtype: torch.dtype | None = None) -> str:
        """E.g. ``LSTM bf16 H768 B16``, ``GRU bidir packed fp32 H256 B64``."""
        parts = [self.cell.upper()]
        if self.cell == "rnn" and self.nonlinearity not in (None, "tanh"):
            parts[0] += f"-{self.nonlinearity}"
        if self.layers > 1:
            parts.append(f"{self.layers}L")
        if self.directions == 2:
            parts.append("bidir")
        if self.projection:
            parts.append("proj")
        if self.packed:
            parts.append("packed")
        parts.append(DTYPE_NAMES.get(dtype or self.dtype, str(dtype or self.dtype)))
        parts.append(f"H{self.hidden} B{self.batch}")
        return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class Route:
    """The answer: ``path`` (``triton``, ``cudnn``, ``native``, ``native-bptt`` or ``reference``), a one-line
    ``reason``, and the table entries it rests on (if any)."""

    path: str
    reason: str
    entries: tuple[dict, ...] = ()

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


# ----------------------------------------------------------------------------------- the table
def size_class(n: int) -> int:
    """The size class of an H or B: the smallest power of two >= ``n`` (the kernels round H up
    to a power-of-two block and B to 16-row tiles, so their cost moves in these steps)."""
    return 1 << max(0, int(n) - 1).bit_length()


def entry_key(entry: dict) -> tuple:
    """What an entry is keyed by: GPU, capability, cell, dtype, directions, projection, packed,
    H class, B class (two entries with one key are one measurement and its refresh)."""
    return (entry["gpu"], entry["capability"], entry["cell"], entry["dtype"], entry["directions"],
            entry["projection"], entry["packed"], entry["h_class"], entry["b_class"])


def empty_table() -> dict:
    return {"schema": TABLE_SCHEMA, "entries": []}


@functools.lru_cache(maxsize=1)
def shipped_table() -> dict:
    """The dispatch table installed with the package (read once per process)."""
    text = importlib.resources.files("fastrnn").joinpath(TABLE_FILE).read_text()
    return validate_table(json.loads(text))


def validate_table(table: dict) -> dict:
    """``table`` itself, after checking it is a table of this schema with well-formed entries."""
    if not isinstance(table, dict) or table.get("schema") != TABLE_SCHEMA or not isinstance(table.get("entries"), list):
        raise ValueError(f"not a fastrnn dispatch table of schema {TABLE_SCHEMA}: {str(table)[:200]}")
    for entry in table["entries"]:
        missing = [k for k in ("gpu", "capability", "cell", "dtype", "directions", "projection", "packed",
                               "h_class", "b_class", "forward_ratio", "train_ratio") if k not in entry]
        if missing:
            raise ValueError(f"dispatch table entry lacks {', '.join(missing)}: {entry}")
    return table


def merge_entries(table: dict, entries: list[dict]) -> dict:
    """A new table: ``table``'s entries with ``entries`` added, a new measurement replacing the
    old one of the same key (:func:`entry_key`); sorted by key so diffs stay readable."""
    merged = {entry_key(e): e for e in validate_table(table)["entries"]}
    merged.update({entry_key(e): e for e in entries})
    return {**table, "entries": [merged[k] for k in sorted(merged, key=lambda k: tuple(map(str, k)))]}


def write_table(table: dict, path: Path | str = TABLE_PATH) -> Path:
    """Write ``table`` as JSON (the package's own table by default) and forget the cached copy."""
    path = Path(path)
    path.write_text(json.dumps(validate_table(table), indent=1) + "\n")
    shipped_table.cache_clear()
    return path


def lookup(table: dict, device: DeviceInfo, call: CallInfo, dtype: torch.dtype) -> tuple[list[dict], str]:
    """The entries that speak for ``call`` on ``device`` in ``dtype``, and how they were found
    (``"exact"``, ``"between"``, ``"no entry"``, ``"unknown gpu"``).

    Sizes between measured classes: when the call's H class has no entry but measured H classes
    lie on both sides of it (at the call's B class), or likewise for B (at the call's H class),
    the nearer measured class on each side speaks, and the slower of them wins (the smaller
    ratio: :func:`decide` takes the minimum). Outside the measured range there is no entry."""
    entries = [e for e in table["entries"] if e["gpu"] == device.name and e["capability"] == device.capability]
    if not entries:
        return [], "unknown gpu"
    kind = (call.cell, DTYPE_NAMES.get(dtype), call.directions, call.projection, call.packed)
    entries = [e for e in entries if (e["cell"], e["dtype"], e["directions"], e["projection"], e["packed"]) == kind]
    h, b = size_class(call.hidden), size_class(call.batch)
    exact = [e for e in entries if (e["h_class"], e["b_class"]) == (h, b)]
    if exact:
        return exact, "exact"
    neighbours = []
    for axis, other, value, fixed in (("h_class", "b_class", h, b), ("b_class", "h_class", b, h)):
        line = [e for e in entries if e[other] == fixed]
        below = [e[axis] for e in line if e[axis] < value]
        above = [e[axis] for e in line if e[axis] > value]
        if below and above:
            nearest = (max(below), min(above))
            neighbours += [e for e in line if e[axis] in nearest]
    if neighbours:
        return neighbours, "between"
    return [], "no entry"


# -------------------------------------------------------------------------------- the decision
def _features(call: CallInfo) -> list[str]:
    """What in ``call`` cuDNN and PyTorch's native kernels cannot do."""
    features = []
    if call.grad_clip:
        features.append("grad_clip")
    if call.flow:
        features.append("gradient-flow recording")
    if call.nonlinearity not in TORCH_NONLINEARITIES:
        features.append(f"nonlinearity {call.nonlinearity!r}")
    if call.generation:
        features.append("free-running generation with feedback")
    return features


def _forced_triton(device: DeviceInfo, call: CallInfo, dtype: torch.dtype) -> Route:
    if not device.triton:
        raise RuntimeError(f"FASTRNN_BACKEND=triton, but the triton package is not installed: {backend.TRITON_EXTRA}")
    if device.type != "cuda" and not device.interpreting:
        raise RuntimeError(
            f"FASTRNN_BACKEND=triton needs CUDA tensors (got a tensor on {device.type}); set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU "
            "through Triton's interpreter"
        )
    if device.type != "cuda" and backend.interpreter_problem():
        raise RuntimeError(backend.interpreter_problem())
    if call.generation and not call.fusable:
        return Route("reference", "the fused generation kernel takes one layer, one direction, no projection and "
                                  "an identity/tanh/sigmoid head: the loop of cell steps runs")
    if not call.generation and dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"fastrnn's Triton kernels compute in float32, float16 or bfloat16, not {dtype}; "
            "use FASTRNN_BACKEND=auto or reference for this dtype"
        )
    where = "" if device.type == "cuda" else " (through Triton's interpreter)"
    return Route("triton", f"FASTRNN_BACKEND=triton forces the kernels{where}")


def _ratio_text(entries: list[dict]) -> str:
    train = min(e["train_ratio"] for e in entries)
    forward = min(e["forward_ratio"] for e in entries)
    return f"{train:.2f}x cuDNN's speed forward+backward ({forward:.2f}x forward)"


def _measured_where(device: DeviceInfo, call: CallInfo, dtype: torch.dtype, entries: list[dict], how: str) -> str:
    dates = sorted({str(e.get("date", "?"))[:10] for e in entries})
    text = f"on {device.describe()}, {call.describe(dtype)} (measured {', '.join(dates)}"
    if how == "between":
        classes = sorted({(e["h_class"], e["b_class"]) for e in entries})
        text += "; between measured classes " + " and ".join(f"H{h}/B{b}" for h, b in classes) + ", the slower speaks"
    return text + ")"


def decide(device: DeviceInfo, call: CallInfo, table: dict, requested: str = "auto", compiling: bool = False,
           autocast: torch.dtype | None = None) -> Route:
    """The path of ``call`` on ``device`` (the rule is this module's docstring).

    ``table``: a dispatch table (:func:`shipped_table`); ``requested``: ``auto``, ``triton`` or
    ``reference``; ``compiling``: ``torch.compile`` is tracing; ``autocast``: the autocast dtype
    when autocast is on for the device (it becomes the compute dtype), else None. Raises what the
    call would raise where a forced backend cannot run it."""
    dtype = autocast if autocast is not None else call.dtype
    if requested == "reference":
        return Route("reference", "FASTRNN_BACKEND=reference forces the reference loop")
    if requested == "triton":
        forced = _forced_triton(device, call, dtype)
        if call.zoneout and not call.zoneout_fits:
            return Route("reference", f"FASTRNN_BACKEND=triton, but zoneout runs on {_ZONEOUT_KERNELS} only and "
                                      f"{call.describe(dtype)} plans past them: {_ZONEOUT_LOOP}")
        return forced
    if requested != "auto":
        raise ValueError(f"unknown fastrnn backend {requested!r}; choose one of {', '.join(backend.BACKENDS)}")
    if call.zoneout:
        return _zoneout_route(device, call, dtype)

    features = _features(call)
    needs = " and ".join(features)
    if call.generation and not call.fusable:
        return Route("reference", "free-running generation outside the fused kernel's shapes (one layer, one "
                                  "direction, no projection, an identity/tanh/sigmoid head): the loop of cell steps")
    if device.type != "cuda":
        if call.generation:
            return Route("reference", f"free-running generation on the {device.type.upper()}: the fused kernel "
                                      "needs CUDA, so the loop of cell steps runs")
        forward = ("a step loop forward (PyTorch's native op lacks the nonlinearity)"
                   if call.nonlinearity not in TORCH_NONLINEARITIES else "PyTorch's native forward")
        if features:
            return Route("native-bptt", f"{needs} on the {device.type.upper()}: PyTorch's native kernels cannot, so "
                                        f"one fastrnn operator per layer runs {forward} and fastrnn's hand-written "
                                        "backward through time")
        if compiling:
            return Route("native-bptt", "torch.compile is tracing a CPU call: inductor cannot lower PyTorch's native "
                                        f"CPU RNN op, so each layer is one fastrnn operator ({forward} inside, "
                                        "fastrnn's hand-written backward)")
        return Route("native", f"{device.type.upper()} tensor: PyTorch's native RNN kernels, what torch.nn runs")

    kernels_can = device.triton and dtype in KERNEL_DTYPES
    why_not = (f"the kernels compute in fp32/fp16/bf16, not {DTYPE_NAMES.get(dtype, dtype)}" if device.triton
               else "triton is not installed")
    if features:
        if kernels_can:
            return Route("triton", f"{needs}: cuDNN cannot, and the kernels are the only fused path")
        return Route("reference", f"{needs}: cuDNN cannot and {why_not}, so the reference loop runs")
    if compiling:
        if kernels_can:
            return Route("triton", "torch.compile is tracing: PyTorch decomposes its RNN op into an unrolled loop "
                                   "there (cuDNN is out of reach), so the kernels are the fused option")
        return Route("reference", f"torch.compile is tracing and {why_not}: the reference loop is traced")
    native = "cudnn" if device.cudnn else "native"
    torch_path = "cuDNN" if device.cudnn else "PyTorch's native CUDA path (cuDNN is off)"
    if not kernels_can:
        return Route(native, f"{why_not}: {torch_path}, what torch.nn runs")

    entries, how = lookup(table, device, call, dtype)
    force = "set FASTRNN_BACKEND=triton to force the kernels"
    if how == "unknown gpu":
        return Route(native, f"no measured entry for {device.describe()}, {call.describe(dtype)} (the dispatch "
                             f"table holds no measurement on this GPU); {force}")
    if not entries:
        return Route(native, f"no measured entry for {device.describe()}, {call.describe(dtype)}; {force}")
    train = min(e["train_ratio"] for e in entries)
    forward = min(e["forward_ratio"] for e in entries)
    where = _measured_where(device, call, dtype, entries, how)
    measured = f"the kernels measured {_ratio_text(entries)} {where}"
    if train >= MIN_SPEEDUP and (call.needs_grad or forward >= MIN_SPEEDUP):
        return Route("triton", measured, tuple(entries))
    if train < 1.0 or (not call.needs_grad and forward < 1.0):
        return Route(native, f"{measured}: {torch_path} is faster", tuple(entries))
    return Route(native, f"{measured}: within run-to-run noise (the kernels need >= {MIN_SPEEDUP}x), "
                         f"so {torch_path} runs", tuple(entries))


_ZONEOUT_LOOP = "fastrnn.regularized_rnn's loop of reference cell steps"
_ZONEOUT_KERNELS = "the LSTM's and the GRU's resident and persistent kernels"


def _zoneout_route(device: DeviceInfo, call: CallInfo, dtype: torch.dtype) -> Route:
    """``auto`` for a zoneout call: the kernels that zone out on CUDA where the size plans to them
    (:data:`_ZONEOUT_KERNELS`), else the loop."""
    if device.type != "cuda":
        return Route("reference", f"zoneout on the {device.type.upper()}: PyTorch's native kernels cannot zone out, "
                                  f"so {_ZONEOUT_LOOP} runs (the kernels only under FASTRNN_BACKEND=triton)")
    if not device.triton or dtype not in KERNEL_DTYPES:
        why_not = "triton is not installed" if not device.triton else f"the kernels compute in fp32/fp16/bf16, not {DTYPE_NAMES.get(dtype, dtype)}"
        return Route("reference", f"zoneout: cuDNN cannot zone out and {why_not}, so {_ZONEOUT_LOOP} runs")
    if not call.zoneout_fits:
        return Route("reference", f"zoneout: cuDNN cannot zone out and only {_ZONEOUT_KERNELS} do, which "
                                  f"{call.describe(dtype)} does not plan to: {_ZONEOUT_LOOP}")
    return Route("triton", "zoneout: cuDNN cannot zone out, and the kernels fuse it (one launch per layer "
                           "each way, masks drawn on the host as fastrnn.regularization documents)")


# ------------------------------------------------------------------------- the live call sites
@functools.lru_cache(maxsize=16)
def _cuda_identity(index: int) -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


@functools.lru_cache(maxsize=1)
def _triton_installed() -> bool:
    return backend.triton_available()  # a package search (tens of microseconds): once per process


def describe_device(device: torch.device) -> DeviceInfo:
    """The :class:`DeviceInfo` of a tensor on ``device`` in this process."""
    common = dict(triton=_triton_installed(), interpreting=backend.triton_interpreting())
    if device.type != "cuda":
        return DeviceInfo(device.type, **common)
    name, capability = _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())
    cudnn = torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled
    return DeviceInfo("cuda", name, capability, cudnn=cudnn, **common)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def _route(device: torch.device, call: CallInfo) -> Route:
    requested, autocast = backend.get_backend(), _autocast_dtype(device)
    if torch.compiler.is_compiling():
        # While dynamo traces, decide consults neither the table nor the GPU's name (the kernels or
        # the loop, whatever they measured), and dynamo cannot trace reading either: leave them out.
        info = DeviceInfo(device.type, triton=backend.triton_available(), interpreting=backend.triton_interpreting())
        return decide(info, call, empty_table(), requested, True, autocast)
    return decide(describe_device(device), call, shipped_table(), requested, False, autocast)


def stack_call(module, cell: str, nonlinearity: str | None, input: Tensor, batch_sizes: Tensor | None) -> CallInfo:
    """The :class:`CallInfo` of a layer's forward (``input`` and ``batch_sizes`` as
    :func:`fastrnn.dispatch.run_stack` takes them)."""
    if torch.compiler.is_compiling():
        # The decision reads no size while tracing; int() of a traced size (or of a value of
        # batch_sizes) would specialise the graph on it (a recompile per T) or break it.
        batch = steps = 0
    elif batch_sizes is not None:
        batch, steps = int(batch_sizes[0]) if len(batch_sizes) else 0, len(batch_sizes)
    else:
        batch, steps = (input.shape[0], input.shape[1]) if module.batch_first else (input.shape[1], input.shape[0])
    grad = torch.is_grad_enabled()
    zoneout = cell in ("lstm", "gru") and bool(getattr(module, "zoneout", 0.0))
    return CallInfo(
        cell=cell, dtype=input.dtype, hidden=module.hidden_size, batch=int(batch), steps=int(steps),
        layers=module.num_layers, directions=2 if module.bidirectional else 1,
        projection=getattr(module, "proj_size", 0) > 0, packed=batch_sizes is not None, nonlinearity=nonlinearity,
        grad_clip=getattr(module, "grad_clip", None) is not None,
        flow=grad and gradient_flow.active() is not None,
        needs_grad=grad and (input.requires_grad or any(p.requires_grad for p in module.parameters())),
        zoneout=zoneout, zoneout_fits=zoneout and _zoneout_fits(cell, module.hidden_size, input),
    )


def _zoneout_fits(cell: str, hidden: int, input: Tensor) -> bool:
    """:func:`fastrnn.ops.zoneout.zoneout_fits` where the kernels could run the call (CUDA, or the
    triton backend asked for: importing the launchers imports triton), else False."""
    if input.device.type != "cuda" and backend.get_backend() != "triton":
        return False
    return _kernel_zoneout_fits(cell, hidden, _autocast_dtype(input.device) or input.dtype)


@torch.compiler.assume_constant_result  # while dynamo traces: called, its answer a constant (a plan of module sizes)
def _kernel_zoneout_fits(cell: str, hidden: int, dtype: torch.dtype) -> bool:
    return _triton_installed() and importlib.import_module("fastrnn.ops.zoneout").zoneout_fits(cell, hidden, dtype)


def route_stack(module, cell: str, nonlinearity: str | None, input: Tensor, batch_sizes: Tensor | None) -> Route:
    """The path of a layer's forward, as :func:`fastrnn.dispatch.run_stack` (or, with zoneout or
    DropConnect, :func:`fastrnn.regularized_rnn.run_stack`) takes it."""
    found = _route(input.device, stack_call(module, cell, nonlinearity, input, batch_sizes))
    if getattr(module, "recurrent_dropout", 0.0) and module.training and not getattr(module, "zoneout", 0.0):
        found = dataclasses.replace(found, reason="recurrent_dropout: W_hh masked on the host by "
                                                  f"fastrnn.regularized_rnn, then {found.path} as without it: {found.reason}")
    return found


def route_generation(layer, head, x0: Tensor) -> Route:
    """The path of free-running generation of ``layer`` with ``head`` from ``x0 (B, I)``: ``triton``
    (the fused kernel: recurrence, head and feedback in one launch) or ``reference`` (the loop of
    cell steps)."""
    from fastrnn.layers import _MODES  # layers imports dispatch, which imports this module
    from fastrnn.stacked import StackedRecurrence

    if isinstance(layer, StackedRecurrence):  # IndRNN, LayerNorm cells: generation steps the layer itself
        step = layer.own_route(x0[:, None])
        return Route(step.path, f"free-running generation runs the layer one step at a time; each step: {step.reason}")
    cell, nonlinearity = _MODES[layer.mode]
    fusable = (layer.num_layers == 1 and not layer.bidirectional and head.kind is not None
               and not getattr(layer, "proj_size", 0))
    grad = torch.is_grad_enabled()
    call = CallInfo(cell=cell, dtype=x0.dtype, hidden=layer.hidden_size, batch=x0.shape[0], layers=layer.num_layers,
                    nonlinearity=nonlinearity, grad_clip=layer.grad_clip is not None, generation=True,
                    fusable=fusable, needs_grad=grad)
    route = _route(x0.device, call)
    if route.path != "triton":
        return route
    feedback = importlib.import_module("fastrnn.ops.feedback")  # imports triton: only once the kernels are chosen
    dtype = feedback.compute_dtype(x0)
    if not feedback.supports(layer.hidden_size, head.out_features, dtype, cell):
        return Route("reference", f"free-running generation of {call.describe(dtype)} with {head.out_features} "
                                  "outputs is past the fused kernel's on-chip limits: the loop of cell steps")
    return route


# ---------------------------------------------------------------------------------- explain
def explain(module, input, hx=None) -> str:
    """Which path ``module(input, hx)`` would take, and why, in one line (nothing heavy runs).

    ``module``: a :class:`fastrnn.RNN`, ``GRU`` or ``LSTM`` (``input`` a tensor or a
    ``PackedSequence``, as its forward takes), a topology module of :mod:`fastrnn.topologies`
    (``input`` as its forward's first argument: ``x``, ``x0`` or ``src``) or a cell. ``hx`` is
    accepted as the forward takes it; the initial state does not change the path. The answer
    starts with the path: ``triton``, ``cudnn``, ``native``, ``native-bptt`` or ``reference``, e.g.
    ``cudnn: no measured entry for NVIDIA H200 (sm_90), LSTM bf16 H768 B16; set
    FASTRNN_BACKEND=triton to force the kernels``. Raises what the call would raise where a
    forced backend cannot run it."""
    return str(route(module, input, hx))


def route(module, input, hx=None) -> Route:
    """:func:`explain`'s answer as a :class:`Route` (path, reason, the table entries it rests on)."""
    from fastrnn import cells, layers, topologies  # they import this module

    own = getattr(module, "own_route", None)  # layers that pick their path themselves (fastrnn.stacked; zoneout)
    found = None if own is None else own(input)
    if found is not None:
        return found
    if isinstance(module, layers.RecurrentBase):
        cell, nonlinearity = layers._MODES[module.mode]
        if isinstance(input, PackedSequence):
            data, batch_sizes = input.data, input.batch_sizes
        elif isinstance(input, Tensor):
            data, batch_sizes = input, None
            if input.dim() == 2:  # unbatched
                data = input.unsqueeze(0 if module.batch_first else 1)
        else:
            raise TypeError(f"explain: input must be a Tensor or a PackedSequence, got {type(input).__name__}")
        return route_stack(module, cell, nonlinearity, data, batch_sizes)
    if isinstance(module, topologies.OneToMany):
        if module.feedback:
            return route_generation(module.rnn, module.head, input)
        return route(module.rnn, input[:, None])
    if isinstance(module, topologies.Seq2Seq):
        encoder = route(module.encoder, input)
        return dataclasses.replace(encoder, reason=f"the encoder: {encoder.reason}")
    if isinstance(module, topologies.OneToOne):
        return route(module.rnn, input[:, None])
    if isinstance(module, (topologies.ManyToMany, topologies.ManyToOne)):
        return route(module.rnn, input)
    if isinstance(module, cells.RecurrentCellBase):
        return Route("reference", "a cell is one step with no time loop to fuse; every backend runs the reference step")
    raise TypeError(f"explain: expected a fastrnn layer, cell or topology module, got {type(module).__name__}")
