"""Placement: the even split tiles the model with ranges that differ by at most one layer;
the planned split places every layer once, respects every node's memory and makes the
slowest stage as fast as a brute-force search over every split finds."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from molink.scheduler.placement import (
    GB,
    ModelFootprint,
    NodeBudget,
    plan_placement,
    split_layers,
)


def test_known_splits():
    assert split_layers(6, 3) == [(0, 2), (2, 4), (4, 6)]  # the bundled model in `molink demo`
    assert split_layers(4, 3) == [(0, 2), (2, 3), (3, 4)]
    assert split_layers(5, 3) == [(0, 2), (2, 4), (4, 5)]
    assert split_layers(64, 3) == [(0, 22), (22, 43), (43, 64)]  # benchmarks/results/weak_links.md
    assert split_layers(7, 1) == [(0, 7)]


@pytest.mark.parametrize("num_layers", range(1, 41))
def test_every_split_tiles_the_model_evenly(num_layers):
    for num_stages in range(1, num_layers + 1):
        ranges = split_layers(num_layers, num_stages)
        assert len(ranges) == num_stages
        assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous
        sizes = [end - start for start, end in ranges]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert sizes == sorted(sizes, reverse=True)  # the last stage never has more


@pytest.mark.parametrize("num_stages", [0, 5])
def test_impossible_splits_are_refused(num_stages):
    with pytest.raises(ValueError, match="num_stages"):
        split_layers(4, num_stages)


# ---- plan_placement -------------------------------------------------------------------


def _uniform(num_layers, weight=1 * GB, kv=0, first=0, last=0, **work):
    return ModelFootprint((weight,) * num_layers, (kv,) * num_layers, first, last, **work)


def test_a_twice_as_fast_node_gets_twice_the_layers():
    nodes = [NodeBudget("slow", 100 * GB, 2.0), NodeBudget("fast", 100 * GB, 1.0)]
    placement = plan_placement(_uniform(12), nodes, headroom=0.0)
    assert placement.ranges == [(0, 4), (4, 12)]
    assert placement.bottleneck_s == 8.0


def test_memory_caps_a_fast_node_and_the_rest_goes_elsewhere():
    # The fast node could take everything, but holds only 3 layers (+ the 10% headroom).
    nodes = [NodeBudget("fast-small", int(3.4 * GB), 1.0), NodeBudget("slow-big", 100 * GB, 3.0)]
    placement = plan_placement(_uniform(8), nodes)
    assert placement.ranges == [(0, 3), (3, 8)]
    assert placement.bottleneck_s == 15.0
    assert [s.weight_bytes for s in placement.stages] == [3 * GB, 5 * GB]


def test_a_node_that_would_only_slow_the_pipeline_gets_no_layers():
    nodes = [NodeBudget("gpu", 100 * GB, 1.0), NodeBudget("cpu", 100 * GB, 50.0)]
    placement = plan_placement(_uniform(10), nodes)
    assert placement.ranges == [(0, 10)]
    assert placement.stages[1].num_layers == 0 and placement.stages[1].weight_bytes == 0


def test_embeddings_and_lm_head_count_on_the_end_stages():
    footprint = _uniform(4, weight=GB, kv=GB // 2, first=3 * GB, last=5 * GB,
                         last_stage_work=2.0)
    nodes = [NodeBudget("a", 100 * GB, 1.0), NodeBudget("b", 100 * GB, 1.0)]
    placement = plan_placement(footprint, nodes)
    first, last = placement.stages
    assert placement.ranges == [(0, 3), (3, 4)]  # the LM head is worth 2 layers of time
    assert first.weight_bytes == 3 * GB + 3 * GB and first.kv_bytes == 3 * GB // 2
    assert last.weight_bytes == GB + 5 * GB and last.seconds == 3.0
    assert last.free_bytes == 100 * GB - 6 * GB - GB // 2


def test_too_little_memory_says_how_much_is_missing():
    nodes = [NodeBudget("rtx3090", 24 * GB, 1.0), NodeBudget("rtx4090", 24 * GB, 1.0)]
    with pytest.raises(ValueError) as info:
        plan_placement(_uniform(50), nodes, headroom=0.1)
    message = str(info.value)
    assert "does not fit" in message and "needs 50.0 GB" in message
    assert "offer 43.2 GB after 10% headroom" in message and "rtx3090 21.6 GB" in message
    assert "6.8 GB short" in message


def test_a_layer_too_large_for_any_node_is_named_even_when_the_total_fits():
    footprint = ModelFootprint((GB, 5 * GB, GB), (0, 0, 0))
    nodes = [NodeBudget("a", 4 * GB, 1.0), NodeBudget("b", 4 * GB, 1.0)]
    with pytest.raises(ValueError, match=r"no split into contiguous ranges fits.*only layers "
                                         r"0:1 of 3 fit"):
        plan_placement(footprint, nodes, headroom=0.0)


@pytest.mark.parametrize(("nodes", "headroom", "match"), [
    ([], 0.1, "at least one node"),
    ([NodeBudget("a", GB, 1.0)], 1.0, "headroom"),
])
def test_bad_arguments_are_refused(nodes, headroom, match):
    with pytest.raises(ValueError, match=match):
        plan_placement(_uniform(2), nodes, headroom)


def test_a_footprint_needs_layers_and_one_kv_size_per_layer():
    with pytest.raises(ValueError, match="at least one layer"):
        ModelFootprint((), ())
    with pytest.raises(ValueError, match="one entry per layer"):
        ModelFootprint((1, 2), (1,))


# ---- properties against brute force -----------------------------------------------------


def _brute_force(footprint, nodes, headroom):
    """(least bottleneck, fewest stages at it) over every split, or None if none fits."""
    n, best = footprint.num_layers, None
    for cuts in itertools.combinations_with_replacement(range(n + 1), len(nodes) - 1):
        bounds = [0, *cuts, n]
        times = []
        for node, (start, end) in zip(nodes, itertools.pairwise(bounds)):
            if start == end:
                continue
            memory = (sum(footprint.layer_weight_bytes[start:end])
                      + sum(footprint.layer_kv_bytes[start:end])
                      + (footprint.first_stage_bytes if start == 0 else 0)
                      + (footprint.last_stage_bytes if end == n else 0))
            if memory > int(node.memory_bytes * (1 - headroom)):
                break
            work = (end - start + (footprint.first_stage_work if start == 0 else 0)
                    + (footprint.last_stage_work if end == n else 0))
            times.append(work * node.seconds_per_layer)
        else:
            candidate = (max(times), len(times))
            best = candidate if best is None else min(best, candidate)
    return best


footprints = st.integers(1, 7).flatmap(lambda n: st.builds(
    ModelFootprint,
    st.lists(st.integers(1, 10), min_size=n, max_size=n).map(tuple),
    st.lists(st.integers(0, 4), min_size=n, max_size=n).map(tuple),
    st.integers(0, 10), st.integers(0, 10),
    st.sampled_from([0.0, 0.5, 2.0]), st.sampled_from([0.0, 1.0, 3.5])))
node_lists = st.lists(st.builds(NodeBudget, st.sampled_from("abcdef"), st.integers(0, 40),
                                st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 7.0])),
                      min_size=1, max_size=4)


@settings(max_examples=400, deadline=None)
@given(footprints, node_lists, st.sampled_from([0.0, 0.1, 0.25]))
def test_the_plan_is_a_valid_optimal_split(footprint, nodes, headroom):
    expected = _brute_force(footprint, nodes, headroom)
    if expected is None:
        with pytest.raises(ValueError, match="does not fit"):
            plan_placement(footprint, nodes, headroom)
        return
    placement = plan_placement(footprint, nodes, headroom)
    stages = placement.stages
    assert [s.node for s in stages] == list(nodes)  # node order kept
    # every layer placed exactly once, contiguously, in order
    assert stages[0].start_layer == 0 and stages[-1].end_layer == footprint.num_layers
    assert all(a.end_layer == b.start_layer for a, b in itertools.pairwise(stages))
    assert all(s.num_layers >= 0 for s in stages)
    for s in stages:  # memory respected
        assert s.weight_bytes + s.kv_bytes <= int(s.node.memory_bytes * (1 - headroom))
        assert s.kv_bytes == sum(footprint.layer_kv_bytes[s.start_layer:s.end_layer])
    used = [s for s in stages if s.num_layers]
    assert placement.bottleneck_s == max(s.seconds for s in used)
    assert (placement.bottleneck_s, len(used)) == pytest.approx(expected, rel=1e-12)
