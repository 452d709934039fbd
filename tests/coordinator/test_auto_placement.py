"""AutoPlacement: the head's bookkeeping of nodes offering themselves without --layers."""

from __future__ import annotations

import asyncio
import time

from molink.coordinator.auto_placement import HEAD, AutoPlacement
from molink.scheduler.placement import ModelFootprint, NodeBudget, plan_placement

LAYER = 100
FOOTPRINT = ModelFootprint(layer_weight_bytes=(LAYER,) * 8, layer_kv_bytes=(0,) * 8)
ALL = [(0, 8)]


def _placement(**options) -> AutoPlacement:
    return AutoPlacement(FOOTPRINT, headroom=0.0, **{"settle_s": 5.0, **options})


def test_it_waits_for_the_settle_time_after_the_last_new_node_then_plans_them_together():
    auto = _placement()
    assert auto.offer("a", 10 * LAYER, 1.0, ALL, now=0.0).layers is None
    answer = auto.offer("b", 10 * LAYER, 1.0, ALL, now=3.0)
    assert answer.layers is None and "waiting 5 s more" in answer.reason
    assert auto.offer("a", 10 * LAYER, 1.0, ALL, now=7.0).layers is None  # b is new at 3 s
    assert auto.offer("a", 10 * LAYER, 1.0, ALL, now=8.0).layers == (0, 4)
    assert auto.offer("b", 10 * LAYER, 1.0, ALL, now=8.5).layers == (4, 8)
    assert "placed over 2 node(s)" in auto.last_plan


def test_a_model_that_does_not_fit_yet_waits_for_more_nodes_and_says_how_much_is_missing():
    auto = _placement(settle_s=0.0)
    answer = auto.offer("a", 3 * LAYER, 1.0, ALL, now=0.0)
    assert answer.layers is None
    assert "do not fit" in answer.reason and "start more nodes" in answer.reason
    assert auto.offer("b", 5 * LAYER, 1.0, ALL, now=1.0).layers == (3, 8)
    assert auto.offer("a", 3 * LAYER, 1.0, ALL, now=1.5).layers == (0, 3)


def test_faster_nodes_get_more_layers_and_the_result_is_the_planners():
    auto = _placement()
    auto.offer("slow", 100 * LAYER, 3.0, ALL, now=0.0)
    auto.offer("fast", 100 * LAYER, 1.0, ALL, now=0.0)
    answer = auto.offer("fast", 100 * LAYER, 1.0, ALL, now=6.0)
    assert answer.layers == (2, 8)  # bottleneck max(2 x 3, 6 x 1) = 6
    assert auto.offers["slow"].assigned == (0, 2)


def test_the_head_is_always_first_and_stops_asking_when_the_plan_leaves_it_out():
    auto = _placement(head_expected=True, settle_s=0.0)
    answer = auto.offer("stage", 100 * LAYER, 1.0, ALL, now=0.0)
    assert answer.layers is None and "the head" in answer.reason  # no plan before its offer
    assert auto.offer(HEAD, 100 * LAYER, 1.0, ALL, now=1.0).layers == (0, 4)
    assert auto.offer("stage", 100 * LAYER, 1.0, ALL, now=1.0).layers == (4, 8)
    auto = _placement(head_expected=True, settle_s=0.0)
    auto.offer("stage", 100 * LAYER, 1.0, ALL, now=0.0)
    assert auto.offer(HEAD, 100 * LAYER, 50.0, ALL, now=1.0).layers is None  # too slow to help
    assert HEAD not in auto.offers
    assert auto.offers["stage"].assigned == (0, 8)


def test_a_gap_left_by_a_node_is_planned_over_the_spares_and_never_given_to_the_head():
    auto = _placement(settle_s=0.0)
    missing = [(2, 5)]  # layers 0:2 and 5:8 are served; a node serving 2:5 left
    answer = auto.offer(HEAD, 100 * LAYER, 0.1, missing, now=0.0)
    assert answer.layers is None
    assert auto.offer("spare", 3 * LAYER, 1.0, missing, now=0.0).layers == (2, 5)
    # The footprint of a middle range holds neither the embeddings nor the LM head.
    assert auto.unplanned(missing) == []


def test_a_spare_waits_when_every_layer_is_served_or_loading():
    auto = _placement(settle_s=0.0)
    assert auto.offer("a", 100 * LAYER, 1.0, ALL, now=0.0).layers == (0, 8)
    answer = auto.offer("b", 100 * LAYER, 1.0, ALL, now=1.0)
    assert answer.layers is None and "spare" in answer.reason


def test_a_node_that_joined_with_its_range_is_done_and_a_silent_one_is_forgotten():
    auto = _placement(settle_s=0.0, offer_ttl_s=10.0, load_timeout_s=100.0)
    assert auto.offer("a", 100 * LAYER, 1.0, ALL, now=0.0).layers == (0, 8)
    auto.joined("a", 0, 8)
    assert auto.offers == {}
    auto.offer("b", 1 * LAYER, 1.0, ALL, now=0.0)  # waits: 8 layers do not fit
    auto.offer("c", 1 * LAYER, 1.0, ALL, now=20.0)
    assert "b" not in auto.offers  # no offer for 20 s > ttl


def test_a_range_whose_node_never_joined_is_planned_again_after_the_load_timeout():
    auto = _placement(settle_s=0.0, load_timeout_s=100.0, offer_ttl_s=1000.0)
    assert auto.offer("a", 100 * LAYER, 1.0, ALL, now=0.0).layers == (0, 8)
    assert auto.offer("b", 100 * LAYER, 1.0, ALL, now=50.0).layers is None  # a is loading
    assert auto.offer("b", 100 * LAYER, 1.0, ALL, now=150.0).layers == (0, 8)


def test_nodes_keep_the_order_they_offered_in_and_the_plan_matches_plan_placement():
    auto = _placement()
    offers = [("n1", 3 * LAYER, 2.0), ("n2", 8 * LAYER, 1.0), ("n3", 4 * LAYER, 1.5)]
    for i, (key, memory, seconds) in enumerate(offers):
        auto.offer(key, memory, seconds, ALL, now=float(i))
    auto.offer("n1", 3 * LAYER, 2.0, ALL, now=10.0)
    nodes = [NodeBudget(key, memory, seconds) for key, memory, seconds in offers]
    expected = plan_placement(FOOTPRINT, nodes, 0.0)
    got = [auto.offers[key].assigned for key, _, _ in offers if auto.offers[key].assigned]
    assert got == expected.ranges and len(got) == 3


def test_a_loading_node_keeps_its_range_while_it_renews_its_offer_and_loses_it_when_it_stops():
    auto = _placement(settle_s=0.0, offer_ttl_s=10.0, load_timeout_s=1000.0)
    assert auto.offer("a", 100 * LAYER, 1.0, ALL, now=0.0).layers == (0, 8)
    for now in range(5, 60, 5):  # renewing while it loads
        assert auto.offer("a", 100 * LAYER, 1.0, ALL, now=float(now)).layers == (0, 8)
        assert auto.offer("b", 100 * LAYER, 1.0, ALL, now=float(now)).layers is None
    assert auto.offer("b", 100 * LAYER, 1.0, ALL, now=75.0).layers == (0, 8)  # a went silent


def test_the_join_desk_answers_offers_and_refuses_when_a_model_cannot_be_sized():
    from molink.coordinator.join_desk import JoinDesk
    from molink.coordinator.membership import Membership, ModelIdentity
    from molink.transport import molink_pb2 as pb

    def desk(footprint):
        membership = Membership(ModelIdentity("fp", "float32", 8, 8), None)
        return JoinDesk(membership, None, footprint, settle_s=0.0, headroom=0.0,
                        head_expected=False, on_dead=lambda member, why: None)

    info = pb.StageInfo(model_fingerprint="fp", dtype="float32", block_size=8, num_layers=8,
                        memory_bytes=100 * LAYER, seconds_per_layer=1.0, auto_layers=True)
    reply = asyncio.run(desk(lambda: FOOTPRINT).offer("node", info))
    assert (reply.accepted, reply.assigned_start, reply.assigned_end) == (False, 0, 8)

    def unsizable():
        raise ValueError("keeps no layer dict")

    reply = asyncio.run(desk(unsizable).offer("node", info))
    assert not reply.wait and "give --layers" in reply.reason and "layer dict" in reply.reason
    info.dtype = "bfloat16"
    reply = asyncio.run(desk(lambda: FOOTPRINT).offer("node", info))
    assert not reply.wait and "dtype mismatch" in reply.reason


def test_sizing_the_model_for_a_plan_does_not_block_the_heads_event_loop():
    """The first offers wait for the footprint (built once, in a thread: seconds for a large
    model), while the event loop keeps running: a timer ticks throughout."""
    from molink.coordinator.join_desk import JoinDesk
    from molink.coordinator.membership import Membership, ModelIdentity
    from molink.transport import molink_pb2 as pb

    builds = []

    def slow_footprint():
        builds.append(1)
        time.sleep(0.5)
        return FOOTPRINT

    async def scenario():
        membership = Membership(ModelIdentity("fp", "float32", 8, 8), None)
        desk = JoinDesk(membership, None, slow_footprint, settle_s=0.0, headroom=0.0,
                        head_expected=False, on_dead=lambda member, why: None)
        info = pb.StageInfo(model_fingerprint="fp", dtype="float32", block_size=8,
                            num_layers=8, memory_bytes=100 * LAYER, seconds_per_layer=1.0,
                            auto_layers=True)
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        replies = await asyncio.gather(desk.offer("a", info), desk.offer("b", info))
        ticker.cancel()
        return replies, ticks

    replies, ticks = asyncio.run(scenario())
    assert ticks >= 20 and builds == [1]  # the loop ran during the build, which ran once
    assert [(r.assigned_start, r.assigned_end) for r in replies if not r.wait] == [(0, 8)]
