"""JoinDesk: the head's answer to a stage's Join.

A stage that names its range joins, or is refused with the exact reason (model, dtype,
block size, overlap, KV blocks); a stage restarted before its old self was found dead
replaces it. A stage without a range (``molink join`` without ``--layers``) offers its
memory and speed and is told which range to load, or to ask again (``AutoPlacement``);
once loaded it joins with that range like any stage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from molink.coordinator.auto_placement import AutoPlacement
from molink.coordinator.membership import Membership, StageMember
from molink.coordinator.stage_peers import StagePeers
from molink.runtime.node_budget import human_bytes
from molink.scheduler.placement import ModelFootprint
from molink.transport import molink_pb2 as pb

logger = logging.getLogger(__name__)

PLANNING_CONTEXT = 4096  # tokens of KV cache a plan leaves room for without --max-model-len


def planning_footprint(model: str, dtype: str, max_model_len: int | None,
                       max_position_embeddings: int,
                       quantization: str | None = None) -> ModelFootprint:
    """What a plan places: the layers' weights in ``dtype``, and room on each stage for the
    KV cache of one request at ``max_model_len`` tokens (default: the model's length, at
    most PLANNING_CONTEXT). Memory a stage has left after the plan becomes more KV cache."""
    from molink.runtime.model_size import measure_model  # torch: only when placing

    context = max_model_len or min(max_position_embeddings, PLANNING_CONTEXT)
    return measure_model(model, dtype, None, context, quantization).footprint


class JoinDesk:
    def __init__(self, membership: Membership, peers: StagePeers,
                 footprint: Callable[[], ModelFootprint], *, settle_s: float,
                 headroom: float, head_expected: bool,
                 on_dead: Callable[[StageMember, str], None]) -> None:
        self.membership, self.peers = membership, peers
        self._footprint = footprint  # built on the first offer (a meta-device model)
        self._settle_s, self._headroom = settle_s, headroom
        self._head_expected = head_expected  # the head offers itself too (serve --layers auto)
        self._on_dead = on_dead
        self._placement: AutoPlacement | None = None
        self._building = asyncio.Lock()  # the first offers wait for one build
        self._answers: dict[str, str] = {}  # the last answer logged per node

    @property
    def placement(self) -> AutoPlacement:
        """Built by the first ``offer`` / ``place``."""
        assert self._placement is not None, "no offer was placed yet"
        return self._placement

    async def _ready(self) -> AutoPlacement:
        """The placement, its footprint built once, in a thread: a meta-device build of a
        large model takes seconds, while the head's event loop keeps serving streams,
        health checks and other joins. Raises ValueError when the model cannot be sized."""
        async with self._building:
            if self._placement is None:
                footprint = await asyncio.to_thread(self._footprint)
                self._placement = AutoPlacement(footprint, self._headroom, self._settle_s,
                                                head_expected=self._head_expected)
        return self._placement

    async def join(self, info: pb.StageInfo, address: str, min_blocks: int,
                   standby: bool = False) -> tuple[StageMember | None, str]:
        """Admit a stage with a range (``standby``: as a standby): (the member, "") or
        (None, the reason)."""
        await self._drop_dead_overlaps(info.start_layer, info.end_layer)
        reason = self.membership.check_join(info.start_layer, info.end_layer, address,
                                            info.model_fingerprint, info.dtype, info.block_size,
                                            info.num_layers, standby=standby)
        if reason is None and info.num_blocks < min_blocks:
            reason = (f"the stage holds {info.num_blocks} KV blocks; the running pipeline "
                      f"uses {min_blocks}")
        if reason is not None:
            logger.warning("refused stage %s (layers %d:%d): %s", address, info.start_layer,
                           info.end_layer, reason)
            return None, reason
        member = self.membership.add(info.start_layer, info.end_layer, address,
                                     info.num_blocks, standby=standby)
        member.host_id, member.device, member.cpu_cores = info.host_id, info.device, info.cpu_cores
        member.cpu_set = info.cpu_set
        member.threads = max(0, info.threads)
        member.fingerprint, member.node_id = info.fingerprint, info.node_id
        if self._placement is not None:
            self._placement.joined(info.node_id or address, info.start_layer, info.end_layer)
        return member, ""

    async def offer(self, key: str, info: pb.StageInfo) -> pb.JoinReply:
        """A node without a range: the range it is to load, or wait (with the reason)."""
        reason = self.membership.check_identity(info.model_fingerprint, info.dtype,
                                                info.block_size, info.num_layers)
        if reason is None and info.memory_bytes <= 0:
            reason = "the stage offered no memory for layers"
        if reason is not None:
            logger.warning("refused stage %s (asking for layers): %s", key, reason)
            return pb.JoinReply(accepted=False, reason=reason)
        try:
            answer = await self.place(key, info.memory_bytes, info.seconds_per_layer)
        except ValueError as exc:  # the model's sizes cannot be worked out for a plan
            logger.error("automatic placement is not possible: %s", exc)
            return pb.JoinReply(accepted=False, reason=f"automatic placement is not possible "
                                                       f"for this model ({exc}); give --layers")
        if answer is None:
            return pb.JoinReply(accepted=False, wait=True, reason=self._answers[key])
        return pb.JoinReply(accepted=False, assigned_start=answer[0], assigned_end=answer[1])

    async def place(self, key: str, memory_bytes: int, seconds_per_layer: float) -> tuple[
            int, int] | None:
        """The range ``key`` is to load, or None (the reason is logged once per change)."""
        placement = await self._ready()
        plan_before = placement.last_plan
        answer = placement.offer(key, memory_bytes, seconds_per_layer,
                                 self.membership.missing_ranges(), time.monotonic())
        if placement.last_plan != plan_before:
            logger.info("automatic placement: %s", placement.last_plan)
        text = (f"load layers {answer.layers[0]}:{answer.layers[1]}" if answer.layers
                else answer.reason)
        for gone in [k for k in self._answers if k != key and k not in placement.offers]:
            del self._answers[gone]  # joined or forgotten: nothing more to tell it
        if self._answers.get(key) != text:
            self._answers[key] = text
            logger.info("node %s (%s, %.2f ms per layer): %s", key, human_bytes(memory_bytes),
                        seconds_per_layer * 1e3, text)
        return answer.layers

    async def _drop_dead_overlaps(self, start: int, end: int) -> None:
        """A stage restarted before its old self was found dead would be refused for
        overlapping it: check the overlapping members now and drop those that are gone."""
        for member in self.membership.ordered():
            if member.overlaps(start, end) and not await self.peers.answers(member):
                self._on_dead(member, "replaced by a new stage for its layers "
                                      "(it no longer answers)")
