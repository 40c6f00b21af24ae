"""The cost model's byte counts are exact for the partitions it is given, its times move with the
figures they are built from, and every figure names its source (fastrnn/ops/cost_model.py)."""

import dataclasses

import pytest
import torch

from bench.matrix import GPU_MATRIX
from fastrnn.ops import cost_model
from fastrnn.ops.cost_model import FIGURES, Workload, estimate, persistent_partition, today_partition

ROWS = {row.name: row for row in GPU_MATRIX}


def test_every_figure_names_a_source_and_a_kind():
    for name, f in FIGURES.items():
        assert f.value > 0, name
        assert f.unit and len(f.source) > 20, name
        assert f.kind in ("published", "measured", "derived", "assumption"), name


def test_tiled_l1_streams_all_of_w_hh_through_one_sm():
    """The issue's figure: L1 (LSTM B16 H768 bf16) on the tiled strategy, one program, 4.7 MB of
    W_hh from L2 per step."""
    w = Workload.from_row(ROWS["L1"])
    p = today_partition(w, "tiled")
    assert p.programs == 1
    assert estimate(w, p).weight_bytes_reread_per_step == 4 * 768 * 768 * 2


def test_persistent_bytes_by_hand():
    """LSTM B32 H64 bf16, 2 directions, slices of 8 units, 2 batch groups: 8 x 2 x 2 = 32 programs;
    each reads the 16 x 64 h of its group (fp32 exchange: 4 KB) and the owners write B x H per direction."""
    w = Workload("lstm", 4, 64, 32, 2, 2, False)
    p = persistent_partition(w, 8, 2, exchange_bytes=4, bwd_exchange="all_gather")
    assert (p.programs, p.batch_per_group, p.slices) == (32, 16, 8)
    e = estimate(w, p)
    assert e.weight_bytes_reread_per_step == 0
    assert e.exchange_bytes_per_step == 32 * 16 * 64 * 4 + 2 * 32 * 64 * 4
    assert e.exchange_bytes_per_step_bwd == 32 * 16 * 4 * 64 * 4 + 2 * 32 * 4 * 64 * 4
    # the reduce exchange: every program writes its fp32 partial of dh (all K units of its group's
    # 16 rows) and reads the 8 partials of its own 8 units
    reduce = estimate(w, dataclasses.replace(p, bwd_exchange="reduce"))
    assert reduce.exchange_bytes_per_step_bwd == 32 * (64 * 16 * 4 + 8 * 8 * 16 * 4)
    per_step = estimate(w, dataclasses.replace(p, mode="per_step"))
    # one launch per step loads every program's slice again: all of W_hh, once per batch group
    assert per_step.weight_bytes_reread_per_step == 2 * 2 * (4 * 64 * 64 * 2)
    assert per_step.fwd_terms_us["launch"] == FIGURES["graph_launch_us"].value
    assert e.fwd_terms_us["flag"] > 0 and per_step.fwd_terms_us["flag"] == 0


@pytest.mark.parametrize("name", ["l2_latency_clk", "mma_latency_clk", "flag_round_trip_l2_latencies"])
def test_persistent_estimate_grows_with_the_latencies_it_is_built_from(monkeypatch, name):
    w = Workload.from_row(ROWS["L1"])
    p = persistent_partition(w, 8, 1)
    before = estimate(w, p).fwd_us
    f = FIGURES[name]
    monkeypatch.setitem(FIGURES, name, dataclasses.replace(f, value=2 * f.value))
    assert estimate(w, p).fwd_us > before * 1.05


def test_candidates_fit_the_card():
    for row in GPU_MATRIX:
        w = Workload.from_row(row)
        candidates = cost_model.candidate_partitions(w)
        assert candidates, row.name
        for p in candidates:
            assert p.programs <= FIGURES["sm_count"].value
            assert w.gates * p.hidden_slice * w.k * w.dtype_bytes <= FIGURES["shared_limit_bytes"].value
            assert p.slices * p.hidden_slice >= w.hidden and p.batch_groups * p.batch_per_group >= w.batch


def test_fp32_persistent_products_on_tensor_cores_by_hand():
    """L5 (LSTM B64 H256 fp32, slices of 8): the persistent products run as ``tf32x4`` (one tf32
    product 2K = 512 deep: 64 dependent m16n8k8 mmas) unless PyTorch allows tf32 (then ``tf32``, 32
    mmas); the slice's weights are held twice over (its tf32 halves), so reading them from shared
    memory costs twice the bytes. The LSTM follows cuDNN's RNN flag (``recurrence.input_precision``)."""
    flag = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        w = Workload.from_row(ROWS["L5"])
        torch.backends.cudnn.allow_tf32 = True
        tf32 = Workload.from_row(ROWS["L5"])
    finally:
        torch.backends.cudnn.allow_tf32 = flag
    assert (w.precision, w.persistent_precision) == ("tf32x3", "tf32x4")
    p = persistent_partition(w, 8, 4, weights_in="shared")
    lat = FIGURES["mma_latency_clk"].value
    terms = estimate(w, p).fwd_terms_us
    assert terms["tensor_core"] == pytest.approx(cost_model.clk_to_us(64 * lat))
    slice_bytes = 4 * 8 * 256 * 4
    assert terms["weights_from_shared"] == pytest.approx(cost_model.clk_to_us(2 * slice_bytes / FIGURES["shared_bytes_per_clk_per_sm"].value))
    assert tf32.persistent_precision == "tf32"
    assert estimate(tf32, p).fwd_terms_us["tensor_core"] == pytest.approx(cost_model.clk_to_us(32 * lat))


def test_backward_sub_tiles_are_counted_apart_from_the_forward():
    """``bwd_batch_tiles``: each direction's step is estimated with its own sub-tiles (L4's plan:
    the forward walks 4 sub-tiles of 32 rows, the backward 2 of 64), exactly as a partition whose
    both directions walk that many."""
    w = Workload.from_row(ROWS["L4"])
    mixed = persistent_partition(w, 16, 2, batch_tiles=4, bwd_batch_tiles=2, weights_in="shared")
    fwd_like = estimate(w, dataclasses.replace(mixed, bwd_batch_tiles=0))
    bwd_like = estimate(w, dataclasses.replace(mixed, batch_tiles=2, bwd_batch_tiles=0))
    e = estimate(w, mixed)
    assert (e.fwd_us, e.fwd_terms_us) == (fwd_like.fwd_us, fwd_like.fwd_terms_us)
    assert (e.bwd_us, e.bwd_terms_us) == (bwd_like.bwd_us, bwd_like.bwd_terms_us)
    assert e.bwd_us < fwd_like.bwd_us  # fewer, wider backward sub-tiles: fewer latencies and shared reads
