"""StageWatch: the head's watch over its stages, and its answer when one goes away.

Every second it checks each stage (health, a lost outgoing hop, a compute stuck on one
step), each step's deadline, and retries a route that could not be set up. A stage that is
lost, or leaves (``leave``), is removed and the pipeline fails over: the loop is suspended
with every request kept (streams open), standbys for the missing layers are promoted at
once, else a new join is awaited for up to ``failover_timeout_s``; the next route replays
every request. With no replacement in time, or with failover off (0 s), the requests fail
with ``StageUnavailable`` naming the stage. A stage leaving with no standby drains first:
no waiting request starts, the running ones may finish (up to its drain timeout), and what
is left fails over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc

from molink.coordinator.membership import StageMember
from molink.transport import molink_pb2 as pb
from molink.transport.peers import PeerUnreachable, error_detail

if TYPE_CHECKING:
    from molink.coordinator.pipeline_head import PipelineHead

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 1.0
HEALTH_FAILURES_BEFORE_DOWN = 2
CHECKS_BUDGET_S = 5.0  # one round of health checks, at most (each has a 2 s deadline)
ROUTE_RETRY_S = 3.0  # a route that could not be set up is tried again this often
MAX_DRAIN_S = 600.0  # a leaving stage's drain timeout is capped at this
DRAIN_POLL_S = 0.05


class StageWatch:
    def __init__(self, head: PipelineHead) -> None:
        self.head = head
        self._failover: tuple[float, str] | None = None  # (give up at, why) while failing over
        self.failover_started = 0.0
        self.lost_nodes: set[str] = set()  # node ids of stages lost (they may come back)

    # ---- failing over -------------------------------------------------------------------

    def describe(self) -> str:
        """Why the head is not ready while failing over ("" when it is not failing over)."""
        if self._failover is None:
            return ""
        head = self.head
        waited = time.monotonic() - self.failover_started
        return (f"failing over ({waited:.0f} s of {head.config.failover_timeout_s:.0f} s): "
                f"{self._failover[1]}; "
                + (f"layers {head.membership.describe_missing()} are not served"
                   if not head.membership.complete else
                   f"setting up the route: {head.route_error or 'connecting'}"))

    def route_ready(self) -> None:
        """A route is set up: a failover in progress is done."""
        if self._failover is not None:
            head = self.head
            logger.warning("failover done after %.1f s: %d requests go on through %s",
                           time.monotonic() - self.failover_started,
                           head.scheduler.num_unfinished if head.scheduler else 0,
                           " -> ".join(head.stage_labels()))
            self._failover = None

    def on_stage_failure(self, member: StageMember, why: str, expected: bool = False) -> None:
        """``member`` is gone (``expected``: it left on purpose)."""
        head = self.head
        if head.stopping or head.membership.remove(member.stage_id) is None:
            return  # already handled
        if member.node_id:
            self.lost_nodes.add(member.node_id)
        peer = head.peers.drop(member.stage_id)
        if peer is not None:
            head.spawn(peer.close())
        if member.role == "standby":
            (logger.info if expected else logger.warning)(
                "standby %s is gone: %s", member.label, why)
            return
        head.stats.num_stage_failures += not expected
        message = f"stage {member.label} {'left' if expected else 'became unavailable: ' + why}"
        (logger.warning if expected else logger.error)(
            "%s; layers %s are no longer served", message, head.membership.describe_missing())
        self.fail_over(message)

    def fail_over(self, message: str) -> None:
        """The route broke: keep the requests for a replay on the next route (standbys
        promoted now; else a new join within the failover timeout), or, with failover off,
        fail them."""
        head = self.head
        if head.config.failover_timeout_s <= 0:
            self.close(message)
            return
        head.mark_unready()
        head.loop.suspend(message)
        head.spawn(head.route.close_first_hop())
        if self._failover is None:
            logger.warning("failing over: %s", message)
            self.failover_started = time.monotonic()
            self._failover = (self.failover_started + head.config.failover_timeout_s, message)
        for member in head.membership.promote():
            logger.warning("standby %s takes over", member.label)
        if head.membership.complete:
            head.set_up_route()
        else:
            logger.warning("%d requests wait up to %.0f s for a stage to serve layers %s",
                           head.scheduler.num_unfinished if head.scheduler else 0,
                           self._failover[0] - time.monotonic(),
                           head.membership.describe_missing())

    def close(self, message: str) -> None:
        """Fail every request in the pipeline with ``message``; the route is set up again
        (with a new epoch, so whatever the old one still delivers is void) before traffic
        flows."""
        head = self.head
        head.mark_unready()
        self._failover = None
        head.loop.close(message)
        head.spawn(head.route.close_first_hop())

    # ---- a stage leaving ----------------------------------------------------------------

    async def leave(self, stage_id: str, drain_timeout_s: float) -> pb.LeaveReply:
        """Answered when the stage may exit. A standby just goes. An active stage's requests
        move to standbys at once when they hold its layers; else the stage drains (waiting
        requests are not started, running ones may finish, up to ``drain_timeout_s``) and
        what is left waits for a replacement."""
        head = self.head
        member = head.membership.get(stage_id)
        if member is None or head.stopping:
            return pb.LeaveReply(detail="not a member")
        if member.role == "standby" or head.membership.can_replace(member) \
                or not head.loop.accepting:
            self.on_stage_failure(member, "it left", expected=True)
            return pb.LeaveReply(detail="left" if member.role == "standby"
                                 else "its requests moved to a standby")
        member.role = "draining"
        drain_s = min(max(0.0, drain_timeout_s), MAX_DRAIN_S)
        logger.warning("%s is leaving: draining its requests (up to %.0f s; new requests wait "
                       "for a replacement)", member.label, drain_s)
        head.loop.drain(True)
        deadline = time.monotonic() + drain_s
        try:
            while (time.monotonic() < deadline and head.membership.get(stage_id)
                   and head.scheduler is not None and head.scheduler.num_running
                   and not head.membership.can_replace(member)):
                await asyncio.sleep(DRAIN_POLL_S)
        finally:
            head.loop.drain(False)
        left = head.scheduler.num_unfinished if head.scheduler is not None else 0
        self.on_stage_failure(member, "it left", expected=True)
        return pb.LeaveReply(detail=f"drained; {left} requests wait for a replacement")

    # ---- watching -----------------------------------------------------------------------

    async def run(self) -> None:
        """Every second: stages answer and are not stuck, no step is overdue, a failover
        has not run out of time, and a route that could not be set up is tried again."""
        head = self.head
        last_route_attempt = 0.0
        while True:
            await asyncio.sleep(HEALTH_INTERVAL_S)
            try:  # bounded: a check that hangs must not hold back the deadlines below
                outcomes = await asyncio.wait_for(asyncio.gather(
                    *(self._check(m) for m in head.membership.all_members()),
                    return_exceptions=True), CHECKS_BUDGET_S)
            except TimeoutError:
                logger.warning("health checks took over %.0f s; the rest wait for the next "
                               "round", CHECKS_BUDGET_S)
                outcomes = []
            # Each check's own outcome: a call cancelled under it (the head closing its
            # channels as it stops) is no failure, and an unexpected error is reported
            # without ending the watch (unretrieved, either was logged with a traceback).
            for error in outcomes:
                if isinstance(error, Exception):
                    logger.error("a health check failed: %s", error, exc_info=error)
            if head.ready and (overdue := head.loop.overdue_step()):
                head.stats.num_steps_timed_out += 1
                self.fail_over(f"{overdue} on the route {' -> '.join(head.stage_labels())}")
            now = time.monotonic()
            if self._failover is not None and not head.ready and now > self._failover[0]:
                missing = head.membership.describe_missing()
                self.close(f"{self._failover[1]}; no stage took over "
                           + (f"layers {missing}" if missing else
                              f"(the route could not be set up: {head.route_error})")
                           + f" within {head.config.failover_timeout_s:.0f} s")
            if (head.membership.complete and not head.ready and not head.configuring
                    and now - last_route_attempt > ROUTE_RETRY_S):
                last_route_attempt = now
                head.set_up_route()

    async def _check(self, member: StageMember) -> None:
        head = self.head
        if head.membership.get(member.stage_id) is None:
            return  # left meanwhile
        try:
            reply = await head.peers.health(member)
            member.consecutive_health_failures = 0
        except (grpc.aio.AioRpcError, PeerUnreachable) as exc:
            member.consecutive_health_failures += 1
            # Refused: the machine answered that nothing listens there (the process is gone),
            # unlike a timeout, which a busy network may cause once.
            refused = "refused" in error_detail(exc).lower()
            if refused or member.consecutive_health_failures >= HEALTH_FAILURES_BEFORE_DOWN:
                detail = ("connection refused" if refused else exc.code().name
                          if isinstance(exc, grpc.aio.AioRpcError) else exc)
                self.on_stage_failure(member, f"no answer to health checks ({detail})")
            return
        if member.role == "standby":
            return
        if head.ready and reply.lost_hop:
            self.on_stage_failure(member, reply.lost_hop)
        elif reply.compute_busy_s > head.loop.step_deadline_s(
                head.loop.scheduler_config.max_num_batched_tokens):
            self.on_stage_failure(member, f"its compute has been stuck on one step for "
                                          f"{reply.compute_busy_s:.0f} s")
