"""The persistent kernels' ``per_step`` mode captured in a CUDA graph and replayed.

Unmeasured, and untested on a GPU until the first GPU session runs ``bench/gpu_check.sh`` (its test
step runs ``tests/test_gpu.py``'s ``per_step_cuda_graph`` tests first). On CPU only the decision,
the keying and the cache are tested (``tests/test_step_graph.py``); the capture itself needs CUDA.

Why. ``per_step`` mode (``fastrnn.ops.persistent``) runs a persistent kernel with its barrier
compiled out, one launch per phase: ``T`` per forward and ``T + 1`` per backward (twice that with a
projection), for all directions of a layer at once. Issued from
Python each costs Triton's host-side launch (unmeasured here; several us: ``NOTES.md`` quotes about
5.6 us per launch for a public per-step design), and the GPU idles between steps whenever that is
longer than the step's own work. Inside a CUDA graph the cost model counts one launch as
``graph_launch_us`` = 2.0 us of GPU time (``fastrnn.ops.cost_model.FIGURES``) and the host pays one
``replay()`` for all the phases. At L1 (LSTM T1024, 1024 forward phases) that is 2.0 ms of launch
time per forward instead of ``1024 x`` the host cost (about 5.7 ms at 5.6 us).

Knob: ``FASTRNN_CUDA_GRAPH`` = ``1`` (default: capture when valid) | ``0`` (plain launches always,
for debugging; read at every launch). ``CUDA_LAUNCH_BLOCKING=1`` also means plain launches, so a
fault is reported by the launch of the step that made it.

When (:func:`why_not`): only on a CUDA device outside Triton's interpreter; not while
``torch.compile`` traces; and not when the current stream is already being captured (the caller's
own ``torch.cuda.graph``, or torch.compile's cudagraphs recording the registered operator): then
the plain launches go into that capture, which is what its owner wants.

Keyed on (:func:`launch_key`) everything the launches' parameters are made of: the kernel, the
grid, the constexprs and launch options (``meta``), ``phases``, ``max_spins``, the device, and each
of the cell's arguments: a tensor by its data pointer, dtype, shape and strides, any other value by
type and value. A graph replays fixed pointers, so a key match means the replay does exactly what
the plain launches would: same kernels, same parameters, reading the memory's current contents
(new values in reused memory are read, not stale ones). The scratch buffers, flags and error the
kernel takes after the cell's arguments are not in the key: each cached graph owns the set it was
captured with (a ``per_step`` kernel, ``BARRIER=False``, never touches the flags or the error:
``fastrnn.kernels.sync``'s calls sit under ``if BARRIER``).

Pointers, not copies. The other way to reuse one graph for new tensors is static buffers: copy
every input into the graph's own tensors before a replay and every output out after. Per call that
moves at least twice the layer's inputs and outputs (L1 forward: ``gx`` 100.7 MB and ``y`` 25 MB in
bf16, so >= 250 MB, ~75 us at the H100's published 3.35 TB/s, plus a copy launch per tensor, about
4% of the 2.0 ms replay), keeps a second copy of them per cached shape (>= 126 MB at L1), needs
every cell to say which arguments are read and which written (an interface change in every cell),
and a copy back into a tensor autograd saved would bump its version counter. Keying on the
pointers costs no copies and no memory beyond the scratch; it hits when a loop repeats its
allocations (a training step at a fixed shape: PyTorch's caching allocator then hands out the
same addresses, to be confirmed on a GPU by
``tests/test_gpu.py::test_per_step_cuda_graph_replays_in_a_training_loop``). A key seen for the
first time costs what today's launches cost: it runs them (which also compiles and loads every
specialisation, so nothing compiles during a capture); seen a second time (:data:`CAPTURE_ON_SIGHTING`)
it is captured (Triton's host-side launch runs once per phase to record it, plus the graph's
instantiation, unmeasured) and replayed; after that, replayed. Calls whose pointers never repeat
thus run plain launches, plus the key (Python over a dozen or so arguments: tens of us per call,
unmeasured).

Memory: a cached graph holds its scratch buffers between calls (plain launches free theirs), so
the cache is bounded by count and by their bytes: at most :data:`CACHE_SIZE` graphs and
:data:`CACHE_BYTES` of scratch (least recently used dropped first), and a call whose scratch
exceeds :data:`MAX_GRAPH_BYTES` is never captured. For scale (``(shape, dtype)`` of the cells'
``scratch``): the LSTM backward's fp32 partials ``(2, slices, D, B, K)`` are 9.4 MB at L1 (96
slices, B16, K768) and 134 MB at L4 (64 slices, B256, K1024: plain launches), the forwards' at
most a few MB. Each graph also holds ``phases`` kernel nodes. Every tensor a graph touches is
allocated before its capture, so its private memory pool stays empty. Keys seen once are
remembered up to :data:`SIGHTINGS_SIZE`. A loop cycling through more keys than the cache holds
captures at every call and replays once (about what plain launches cost, plus instantiation):
raise the bounds or set ``FASTRNN_CUDA_GRAPH=0``. A dropped graph in flight is
freed by CUDA when it completes (``cuGraphExecDestroy``); its scratch buffers carry
``record_stream`` for any stream a replay ran on other than the one they were allocated on, so the
allocator does not hand them out before that replay is done.

Streams: the capture runs on a side stream of the device (as ``torch.cuda.graph`` does: capture is
not allowed on the legacy default stream, and nothing else the caller queues gets recorded), in
``thread_local`` error mode so other threads' CUDA calls are not refused meanwhile. Capturing
executes nothing, so it needs no ordering with the caller's stream; ``replay()`` runs on the
caller's current stream, in order with its work before and after, as the plain launches would.

Errors: ``per_step`` mode has no spin, so no error flag to read. A fault in a replayed kernel is a
sticky CUDA error raised by the next synchronising call, as with plain launches; a replay that
cannot be launched raises in ``replay()``. A capture that fails (a launch raising while recording,
or the capture invalidated) warns once per key, is remembered, and that call and every later one
with the key run plain launches, so a genuine kernel error then raises from its own launch.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import warnings
from typing import Callable

import torch

GRAPH_ENV = "FASTRNN_CUDA_GRAPH"
#: Captured graphs kept (least recently used dropped first).
CACHE_SIZE = 64
#: Bytes of scratch buffers the cached graphs hold together, at most (all devices).
CACHE_BYTES = 512 << 20
#: A call whose scratch buffers exceed this runs plain launches (never captured).
MAX_GRAPH_BYTES = 64 << 20
#: Keys seen but not yet captured that are remembered (least recently seen forgotten first).
SIGHTINGS_SIZE = 64
#: The sighting of a key at which its launches are captured: 2, so a call whose pointers never
#: come back runs plain launches only, and the first call of a key compiles before any capture.
CAPTURE_ON_SIGHTING = 2
#: What :func:`launch_steps` did, by ``"<action>"`` (``launches``, ``captured``, ``replayed``,
#: ``capture_failed``), so tests can tell the paths apart (eager calls only, like ``LAUNCHES``).
EVENTS: collections.Counter[str] = collections.Counter()


def enabled() -> bool:
    """``$FASTRNN_CUDA_GRAPH``: ``1`` or unset (True), ``0`` (False); anything else is a ValueError."""
    raw = os.environ.get(GRAPH_ENV, "1").strip() or "1"
    if raw not in ("0", "1"):
        raise ValueError(f"{GRAPH_ENV} must be 0 or 1, got {raw!r}")
    return raw == "1"


def why_not(on_gpu: bool) -> str | None:
    """None when the ``per_step`` launches may be captured into a graph of their own; else why they
    run as plain launches. ``on_gpu``: a CUDA device and not Triton's interpreter (the launcher's
    ``on_gpu``). The checks that need CUDA run only when ``on_gpu``."""
    if not enabled():
        return f"{GRAPH_ENV}=0"
    if not on_gpu:
        return "not on a CUDA device, or under Triton's interpreter"
    if os.environ.get("CUDA_LAUNCH_BLOCKING", "0").strip() not in ("", "0"):
        return "CUDA_LAUNCH_BLOCKING is set: each step's launch reports its own fault"
    if torch.compiler.is_compiling():
        return "traced by torch.compile"
    if torch.cuda.is_current_stream_capturing():
        return "the current stream is being captured already: the launches go into that graph"
    return None


def launch_key(kernel, grid: tuple, args: list, meta: dict, phases: int, max_spins: int, device) -> tuple:
    """What the parameters of the ``phases`` launches of ``kernel[grid](*args, <state>, phase,
    phase + 1, max_spins, **meta)`` are made of (the state buffers excluded: a graph owns its own).
    Tensors (in ``args`` or ``meta``, such as zoneout's mask) count by data pointer, dtype, shape
    and strides; other values of ``args`` by type and value, of ``meta`` by name and ``repr``.
    Equal keys: a replay launches what the plain launches would."""

    def part(value) -> tuple:
        return ("tensor", value.data_ptr(), str(value.dtype), tuple(value.shape), value.stride())

    parts = [part(arg) if isinstance(arg, torch.Tensor) else (type(arg).__name__, arg) for arg in args]
    named = sorted((k, part(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in meta.items())
    return (id(kernel), tuple(grid), tuple(parts), tuple(named), phases, max_spins, str(torch.device(device)))


class GraphCache:
    """Captured graphs by key (at most ``capacity`` of them and ``max_bytes`` of their scratch,
    least recently used dropped first), the keys seen but not captured yet with their sightings (at
    most ``sightings``), and the keys never to capture (their capture failed, or their scratch
    exceeds ``max_graph_bytes``; as many as ``sightings``). :meth:`decide` is the policy."""

    def __init__(self, capacity: int = CACHE_SIZE, sightings: int = SIGHTINGS_SIZE,
                 capture_on_sighting: int = CAPTURE_ON_SIGHTING, max_bytes: int = CACHE_BYTES,
                 max_graph_bytes: int = MAX_GRAPH_BYTES):
        self.capacity, self.sightings, self.capture_on_sighting = capacity, sightings, capture_on_sighting
        self.max_bytes, self.max_graph_bytes = max_bytes, max_graph_bytes
        self.graphs: collections.OrderedDict = collections.OrderedDict()
        self.sizes: dict = {}
        self.bytes = 0
        self.seen: collections.OrderedDict = collections.OrderedDict()
        self.failed: collections.OrderedDict = collections.OrderedDict()

    def decide(self, key) -> str:
        """``replay`` (a graph is cached), ``capture`` (this is the key's ``capture_on_sighting``-th
        sighting) or ``launch`` (an earlier sighting, or its capture failed)."""
        if key in self.graphs:
            self.graphs.move_to_end(key)
            return "replay"
        if key in self.failed:
            return "launch"
        count = self.seen.pop(key, 0) + 1
        if count >= self.capture_on_sighting:
            return "capture"
        self.seen[key] = count
        _trim(self.seen, self.sightings)
        return "launch"

    def admits(self, nbytes: int) -> bool:
        """Whether a graph holding ``nbytes`` of scratch may be captured at all."""
        return nbytes <= min(self.max_graph_bytes, self.max_bytes)

    def store(self, key, graph, nbytes: int = 0) -> list:
        """Cache ``graph`` (holding ``nbytes`` of scratch) under ``key``; returns the graphs dropped,
        least recently used first, to stay within ``capacity`` and ``max_bytes``."""
        self.graphs[key] = graph
        self.sizes[key] = nbytes
        self.bytes += nbytes
        dropped = []
        while len(self.graphs) > self.capacity or (self.bytes > self.max_bytes and len(self.graphs) > 1):
            old, graph = self.graphs.popitem(last=False)
            self.bytes -= self.sizes.pop(old)
            dropped.append(graph)
        return dropped

    def fail(self, key) -> None:
        """Never capture ``key`` (its capture failed, or its scratch is too large): plain launches."""
        self.failed[key] = None
        _trim(self.failed, self.sightings)

    def clear(self) -> None:
        self.graphs.clear()
        self.sizes.clear()
        self.bytes = 0
        self.seen.clear()
        self.failed.clear()


def _trim(entries: collections.OrderedDict, size: int) -> None:
    while len(entries) > size:
        entries.popitem(last=False)


@dataclasses.dataclass
class _Captured:
    graph: object  # torch.cuda.CUDAGraph
    state: list  # the scratch buffers, flags and error its launches point at
    stream: object  # the stream ``state`` was allocated on


#: The process's graphs (one cache: keys carry the device), and the lock around it and the captures.
CACHE = GraphCache()
_LOCK = threading.Lock()
_SIDE_STREAMS: dict[str, object] = {}


def launch_steps(name: str, kernel, grid: tuple, args: list, state: Callable[[], list], meta: dict, *,
                 phases: int, max_spins: int, device, on_gpu: bool) -> str:
    """Run phases ``0 .. phases - 1`` of ``kernel`` (``BARRIER=False``), one launch each, as
    ``kernel[grid](*args, *state(), phase, phase + 1, max_spins, **meta, BARRIER=False)``: replayed
    from a CUDA graph, captured now, or launched plainly, as the module docstring says. ``state()``
    makes the buffers the kernel takes after ``args`` (a captured graph keeps the set it made).
    Returns what it did: ``replayed``, ``captured`` (and replayed) or ``launches``."""

    def launches(tensors: list) -> None:
        for phase in range(phases):
            kernel[grid](*args, *tensors, phase, phase + 1, max_spins, **meta, BARRIER=False)

    action, tensors = "launch", None
    if why_not(on_gpu) is None:
        key = launch_key(kernel, grid, args, meta, phases, max_spins, device)
        with _LOCK:
            action = CACHE.decide(key)
            if action == "capture":
                tensors = state()  # before the capture: the graph's private pool stays empty
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
                captured = _capture(name, launches, tensors, device) if CACHE.admits(nbytes) else None
                if captured is None:
                    CACHE.fail(key)
                    action = "launch"
                else:
                    CACHE.store(key, captured, nbytes)
            if action != "launch":
                _replay(CACHE.graphs[key], device)
    if action == "launch":
        launches(state() if tensors is None else tensors)
    done = {"launch": "launches", "capture": "captured", "replay": "replayed"}[action]
    if not torch.compiler.is_compiling():
        EVENTS[done] += 1
    return done


def _capture(name: str, launches: Callable[[list], None], tensors: list, device) -> _Captured | None:
    """Record ``launches(tensors)`` into a new graph on the device's side stream; None (with a
    warning) when the capture fails."""
    device = torch.device(device)
    stream = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(str(device))
    if side is None:
        side = _SIDE_STREAMS[str(device)] = torch.cuda.Stream(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                launches(tensors)
            finally:
                graph.capture_end()  # after a failed launch this raises too, chained to that failure
    except Exception as error:  # any failure to record means: run plain launches
        cause = f" (while: {error.__context__!r})" if error.__context__ is not None else ""
        warnings.warn(f"{name}: capturing the per_step launches in a CUDA graph failed: {error!r}{cause}; "
                      f"running plain launches for this call and its key ({GRAPH_ENV}=0 turns capture off)",
                      RuntimeWarning, stacklevel=3)
        EVENTS["capture_failed"] += 1
        return None
    return _Captured(graph, tensors, stream)


def _replay(captured: _Captured, device) -> None:
    stream = torch.cuda.current_stream(torch.device(device))
    if stream != captured.stream:
        for tensor in captured.state:
            tensor.record_stream(stream)
    captured.graph.replay()
