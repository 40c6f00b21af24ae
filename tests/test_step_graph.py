"""The CPU-checkable part of the per_step mode's CUDA graphs (``fastrnn.ops.step_graph``): the knob,
when a call may be captured, what a captured graph is keyed on, and the cache's policy (plain
launches at a key's first sighting, capture at the second, replay after; bounded; failed captures
never retried). The capture and replay themselves run in ``tests/test_gpu.py`` on CUDA."""

import pytest
import torch
import triton
import triton.language as tl

import fastrnn
from fastrnn.backend import triton_interpreting
from fastrnn.ops import step_graph
from fastrnn.ops.step_graph import GraphCache, launch_key, why_not


@triton.jit
def prefix_sum_per_phase_kernel(x_ptr, out_ptr, N, carry_ptr, flags_ptr, error_ptr, phase_begin, phase_end, max_spins,
                                BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    """A per_step kernel in miniature (the interface ``launch_steps`` launches): phase ``p`` sets
    ``carry = x[0]`` (p = 0) or ``carry + x[p]`` and writes ``out[p] = carry``, so the phases must run
    in order, each after the last. ``x``, ``out``: fp32 ``(phases, N)``; ``carry``: fp32 ``(N,)``
    scratch; ``flags_ptr``, ``error_ptr``, ``max_spins``, ``BARRIER``: unused (no barrier)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < N
    for p in range(phase_begin, phase_end):
        value = tl.load(x_ptr + p * N + offsets, mask=inside)
        if p > 0:
            value += tl.load(carry_ptr + offsets, mask=inside)
        tl.store(carry_ptr + offsets, value, mask=inside)
        tl.store(out_ptr + p * N + offsets, value, mask=inside)


PREFIX_BLOCK = 32


def prefix_sum_steps(x, out, on_gpu: bool) -> str:
    """``out = x.cumsum(0)`` as ``x.shape[0]`` per_step launches through ``launch_steps``."""
    phases, n = x.shape

    def state():
        return [torch.empty(n, device=x.device, dtype=torch.float32),
                torch.zeros(1, device=x.device, dtype=torch.int32), torch.zeros(1, device=x.device, dtype=torch.int32)]

    return step_graph.launch_steps("prefix_sum", prefix_sum_per_phase_kernel, (triton.cdiv(n, PREFIX_BLOCK),), [x, out, n],
                                   state, dict(BLOCK=PREFIX_BLOCK), phases=phases, max_spins=1, device=x.device, on_gpu=on_gpu)


@pytest.mark.skipif(not triton_interpreting(), reason="the interpreter's plain launches")
def test_launch_steps_runs_every_phase_in_order():
    x = torch.randn(5, 40)
    out = torch.full_like(x, float("nan"))
    before = step_graph.EVENTS.copy()
    assert prefix_sum_steps(x, out, on_gpu=False) == "launches"
    assert step_graph.EVENTS - before == {"launches": 1}
    torch.testing.assert_close(out, x.cumsum(0))


def test_knob_values(monkeypatch):
    monkeypatch.delenv(step_graph.GRAPH_ENV, raising=False)
    assert step_graph.enabled()
    monkeypatch.setenv(step_graph.GRAPH_ENV, "0")
    assert not step_graph.enabled()
    assert why_not(on_gpu=True) == "FASTRNN_CUDA_GRAPH=0"
    monkeypatch.setenv(step_graph.GRAPH_ENV, "yes")
    with pytest.raises(ValueError, match="FASTRNN_CUDA_GRAPH must be 0 or 1"):
        step_graph.enabled()


def test_plain_launches_off_the_gpu_and_under_launch_blocking(monkeypatch):
    monkeypatch.delenv(step_graph.GRAPH_ENV, raising=False)
    assert "not on a CUDA device" in why_not(on_gpu=False)
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    assert "CUDA_LAUNCH_BLOCKING" in why_not(on_gpu=True)


def _key(args, meta=None, phases=5, grid=(4, 1, 2), kernel=test_knob_values):
    return launch_key(kernel, grid, args, dict(BLOCK_K=32, num_warps=4) if meta is None else meta, phases, 100, "cpu")


def test_key_is_the_launch_parameters():
    """Equal keys for the same tensors and values; any pointer, layout, value, constexpr, phase
    count, grid or kernel that differs gives another key (a graph replays fixed parameters)."""
    x = torch.randn(6, 8)
    w = torch.randn(8, 8)
    base = _key([x, w, 3, None])
    assert _key([x, w, 3, None]) == base
    same_values_new_memory = x.clone()
    different = [
        _key([same_values_new_memory, w, 3, None]),
        _key([torch.randn(12, 8)[6:], w, 3, None]),  # same shape at another address
        _key([x.view(8, 6), w, 3, None]),  # same pointer, another shape
        _key([x.t(), w, 3, None]),  # same pointer, other strides
        _key([x.view(torch.int32), w, 3, None]),  # same bytes, another dtype
        _key([x, w, 4, None]),
        _key([x, w, 3.0, None]),  # 3 and 3.0 specialise differently
        _key([x, w, 3, None], meta=dict(BLOCK_K=64, num_warps=4)),
        _key([x, w, 3, None], phases=6),
        _key([x, w, 3, None], grid=(8, 1, 2)),
        _key([x, w, 3, None], kernel=test_key_is_the_launch_parameters),
    ]
    assert all(k != base for k in different)
    assert len(set(different)) == len(different)
    assert _key([x, w, True, None]) != _key([x, w, 1, None])  # bool and int: other types
    # a tensor in meta (zoneout's mask) counts by its memory too, not by its printed values
    keep = torch.ones(6, 8)
    with_keep = _key([x, w, 3, None], meta=dict(BLOCK_K=32, keep_ptr=keep, ZONEOUT=1))
    assert _key([x, w, 3, None], meta=dict(BLOCK_K=32, keep_ptr=keep, ZONEOUT=1)) == with_keep
    assert _key([x, w, 3, None], meta=dict(BLOCK_K=32, keep_ptr=keep.clone(), ZONEOUT=1)) != with_keep


def test_policy_launch_capture_replay():
    cache = GraphCache()
    assert cache.decide("a") == "launch"  # first sighting: plain launches (they compile)
    assert cache.decide("a") == "capture"  # second: capture
    cache.store("a", "graph a")
    assert [cache.decide("a") for _ in range(3)] == ["replay"] * 3
    assert cache.decide("b") == "launch"  # another key starts over
    eager = GraphCache(capture_on_sighting=1)
    assert eager.decide("a") == "capture"


def test_failed_capture_is_never_retried():
    cache = GraphCache()
    assert [cache.decide("k"), cache.decide("k")] == ["launch", "capture"]
    cache.fail("k")
    assert [cache.decide("k") for _ in range(4)] == ["launch"] * 4


def test_cache_is_bounded_least_recently_used_first():
    cache = GraphCache(capacity=2, capture_on_sighting=1)
    for key in "ab":
        assert cache.decide(key) == "capture"
        assert cache.store(key, f"graph {key}") == []
    assert cache.decide("a") == "replay"  # a is now the most recently used
    assert cache.decide("c") == "capture"
    assert cache.store("c", "graph c") == ["graph b"]
    assert list(cache.graphs) == ["a", "c"]
    assert cache.decide("b") == "capture"  # dropped: captured again, not replayed


def test_cache_is_bounded_by_scratch_bytes():
    """The graphs' scratch buffers stay allocated between calls: the cache drops the least recently
    used past ``max_bytes`` (keeping the newest), and never admits a graph over ``max_graph_bytes``."""
    cache = GraphCache(capacity=10, capture_on_sighting=1, max_bytes=100, max_graph_bytes=60)
    assert cache.admits(60) and not cache.admits(61)
    assert cache.store("a", "graph a", 40) == []
    assert cache.store("b", "graph b", 40) == []
    assert cache.decide("a") == "replay"
    assert cache.store("c", "graph c", 30) == ["graph b"]  # 110 bytes: b is the least recently used
    assert (list(cache.graphs), cache.bytes) == (["a", "c"], 70)
    assert cache.store("d", "graph d", 60) == ["graph a"]
    assert (list(cache.graphs), cache.bytes) == (["c", "d"], 90)
    cache.clear()
    assert (cache.graphs, cache.bytes, cache.decide("c")) == ({}, 0, "capture")


def test_sightings_are_bounded():
    cache = GraphCache(sightings=2)
    for key in "abc":
        assert cache.decide(key) == "launch"
    assert list(cache.seen) == ["b", "c"]
    assert cache.decide("a") == "launch"  # forgotten: a first sighting again
    assert cache.decide("c") == "capture"


@pytest.mark.skipif(not triton_interpreting(), reason="the interpreter's per_step path")
def test_interpreted_per_step_runs_plain_launches(monkeypatch):
    """Under Triton's interpreter a per_step layer goes through ``launch_steps`` (once forward, once
    backward) as plain launches: nothing is captured."""
    monkeypatch.setenv("FASTRNN_STRATEGY", "persistent")
    monkeypatch.setenv("FASTRNN_PERSISTENT_SLICE", "8")
    monkeypatch.setenv("FASTRNN_PERSISTENT_MODE", "per_step")
    torch.manual_seed(0)
    layer = fastrnn.RNN(4, 32)
    x = torch.randn(3, 2, 4, requires_grad=True)
    before = step_graph.EVENTS.copy()
    with fastrnn.use_backend("triton"):
        layer(x)[0].square().sum().backward()
    assert step_graph.EVENTS - before == {"launches": 2}
