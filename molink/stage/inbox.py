"""StageInbox: what a stage's compute thread takes next (stall-free at every stage).

A long prompt reaches a stage as prefill fragments (``PART_PREFILL``: token ranges cut by
the previous hop's link scheduler); computed first come first served, a queue of them
stalls every decode that arrives behind it. So, while decodes run here::

    put:  decodes, whole steps, control (reset, error)  -> urgent queue (arrival order)
          prefill fragments (with their step's decodes)  -> prefill queue (arrival order)
    get:  urgent first; else the oldest fragment, cut to what ``ChunkSizer`` allows
          (the rest stays at the front of the prefill queue)

A decode waits for at most one piece of prefill, whose size keeps a step carrying prefill
within ``1 + factor`` decode steps as measured on this stage (``scheduler.stall_bound``,
the bound the head's scheduler applies to whole plans). Order within a request is kept:
its fragments stay in order in one queue, and its first decode reaches this stage only
after its whole prompt went through every stage (the token had to reach the head first).
Fragments of an older route are void once a newer route's step arrives, and everything
queued is void at a reset of the worker (the head is gone): they are dropped, not computed
against state that was just cleared. With factor 0 the inbox is one FIFO queue.

Fragments are cut for the link, not for compute: a step computed per fragment pays the
stage's fixed cost per step (a CPU or a small batch re-reads every weight) once per
fragment. So ``get`` joins the fragments of one step that wait back to back into one
piece before it applies the bound: fragments still start computing as they arrive (the
first while the rest travel), but the ones that arrived meanwhile go together. Measured
(3 stages of the 151M benchmark model on 2 cores, 0 ms links, 128-token prompts): each
fragment of >= 32 tokens computed alone made a receiving stage's prefill take twice the
head's for the same tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time

import torch

from molink.messages import BatchEntry, StepPlan
from molink.scheduler.microbatch_chooser import StageFit
from molink.scheduler.stall_bound import is_decode, prefill_chunk_tokens
from molink.stage.gathering import add_into
from molink.transport.chunks import Part, cut_chunk, decoding_ids
from molink.transport.codec import PART_PREFILL

DECODES_IDLE_S = 0.5  # no decode for this long (and 4 decode intervals): prefill goes whole
_INTERVAL_WEIGHT = 0.2


class ChunkSizer:
    """This stage's side of the bound: its own step times, fitted (``fixed + per_token *
    tokens``), the size of its decode steps, and whether decodes run now (their cadence)."""

    def __init__(self) -> None:
        self.factor = 0.0  # set by the route (Configure); 0: no bound
        self.fit = StageFit()
        self._last_decode = float("-inf")
        self._interval_s = DECODES_IDLE_S  # between the decodes computed here (EWMA)
        self._prefill_since_decode = False  # (an interval with prefill in it is no cadence)
        self._decode_tokens = 1  # of the latest decode step
        self._decoding: set[str] = set()  # requests seen decoding here, until freed

    def record(self, plan, seconds: float, now: float | None = None) -> None:
        """A computed step (or piece of one)."""
        if not plan.batch:
            return
        self.fit.add(plan.num_tokens, seconds)
        self.forget(plan.freed_request_ids)
        self._decoding.update(decoding_ids(plan))
        if not is_decode(plan):
            self._prefill_since_decode = True
            return
        now = time.monotonic() if now is None else now
        if self._last_decode > float("-inf") and not self._prefill_since_decode:
            self._interval_s += _INTERVAL_WEIGHT * (now - self._last_decode - self._interval_s)
        self._last_decode, self._prefill_since_decode = now, False
        self._decode_tokens = plan.num_tokens

    def forget(self, freed_request_ids) -> None:
        """These requests finished (or left): their decodes are over."""
        self._decoding.difference_update(freed_request_ids)

    def forget_all(self) -> None:
        """The worker dropped every request's state."""
        self._decoding.clear()

    def decodes_running(self, now: float | None = None) -> bool:
        """Whether decodes run through this stage now: a request seen decoding here is not
        freed yet, and decode steps kept their cadence (the last one within 4 intervals,
        or ``DECODES_IDLE_S``). A prompt arriving after the last stream ended (its free
        rides in the prompt's first fragment) is not cut for decodes that will not come."""
        now = time.monotonic() if now is None else now
        return bool(self._decoding) and (
            now - self._last_decode < max(DECODES_IDLE_S, 4 * self._interval_s))

    def __call__(self, fragment_tokens: int, riding: int = 0) -> int:
        """Tokens of a prefill fragment to compute next (all of them: no bound now).
        ``riding``: decodes in the fragment (a step's decodes travel with its prompt
        tokens): the head planned the prompt tokens beside them, so they count as the
        bound's decodes, and on top of its allowance."""
        if self.factor <= 0 or not self.fit.samples or not self.decodes_running():
            return fragment_tokens
        decodes = max(self._decode_tokens, riding)
        return min(fragment_tokens, riding + prefill_chunk_tokens(
            [self.fit.timing()], decodes, self.factor, fragment_tokens))


class StageInbox:
    def __init__(self, sizer: ChunkSizer) -> None:
        self.sizer = sizer
        self._ready = threading.Condition()
        self._urgent: collections.deque = collections.deque()
        self._prefill: collections.deque = collections.deque()  # (step, hidden, arrived_at)
        self.num_pieces = 0  # fragments cut here (a piece computed apart from its rest)
        self.num_joined = 0  # fragments computed together with the one before them

    def put(self, item) -> None:
        """A received ``(step, hidden, arrived_at)``, or a worker signal (any other object:
        everything queued before it is void)."""
        with self._ready:
            if not isinstance(item, tuple):
                self._prefill.clear()
                self._urgent.append(item)
            else:
                step = item[0]
                self._drop_older(step.epoch)
                splittable = step.part == PART_PREFILL and not step.reset and not step.error
                if splittable and self.sizer.factor > 0:
                    self._prefill.append(item)
                else:
                    self._urgent.append(item)
            self._ready.notify()

    def __len__(self) -> int:
        """Items queued (fragments, steps, signals)."""
        with self._ready:
            return len(self._urgent) + len(self._prefill)

    def get(self):
        """The next item to compute (blocks until there is one)."""
        with self._ready:
            while not self._urgent and not self._prefill:
                self._ready.wait()
            if self._urgent:
                item = self._urgent.popleft()
                return self._join_run(item, self._urgent) if isinstance(item, tuple) else item
            step, hidden, arrived_at = self._join_run(self._prefill.popleft(), self._prefill)
            self.sizer.forget(step.plan.freed_request_ids)
            total = step.plan.num_tokens
            take = self.sizer(total, len(decoding_ids(step.plan)))
            if take >= total:
                return step, hidden, arrived_at
            first, rest = split_fragment(step, hidden, take)
            self._prefill.appendleft((*rest, arrived_at))
            self.num_pieces += 1
            return (*first, arrived_at)

    def _join_run(self, item, queue: collections.deque):
        """``item`` joined with the fragments of its step queued right behind it."""
        run = [item]
        while queue and isinstance(queue[0], tuple) and continues(*run[-1][:2], *queue[0][:2]):
            run.append(queue.popleft())
        if len(run) == 1:
            return item
        self.num_joined += len(run) - 1
        return (*join_fragments([(step, hidden) for step, hidden, _ in run]), item[2])

    def _drop_older(self, epoch: int) -> None:
        """Fragments planned for an older route than ``epoch`` are void (a late one may have
        arrived after newer ones: not only the front)."""
        if any(item[0].epoch < epoch for item in self._prefill):
            self._prefill = collections.deque(i for i in self._prefill if i[0].epoch >= epoch)


def split_fragment(step, hidden, num_tokens: int):
    """-> ((first step, its hidden rows), (the rest, its rows)): tokens ``[0, num_tokens)``
    and the others of a fragment, each a self-contained chunk (request metadata and freed
    ids go with the first piece; earlier stages' timings are counted once, with it)."""
    part = Part(step.plan, None, is_prefill=True)
    total = step.plan.num_tokens
    plan_a, _ = cut_chunk(part, 0, num_tokens)
    plan_b, _ = cut_chunk(part, num_tokens, total)
    zeros = dataclasses.replace(step, plan=plan_b,
                                stage_compute_s=(0.0,) * len(step.stage_compute_s),
                                stage_wait_s=(0.0,) * len(step.stage_wait_s))
    split = (None, None) if hidden is None else (hidden[:num_tokens], hidden[num_tokens:])
    return (dataclasses.replace(step, plan=plan_a), split[0]), (zeros, split[1])


def continues(step, hidden, following, following_hidden) -> bool:
    """Whether ``following`` is the next fragment of ``step``'s step: its tokens go on where
    ``step``'s end (a request cut between them resumes at its next token), no request is in
    both otherwise, and neither carries a reset or an error."""
    if not (step.part == following.part == PART_PREFILL and step.plan.batch
            and following.plan.batch and hidden is not None and following_hidden is not None):
        return False
    if step.reset or step.error or following.reset or following.error:
        return False
    if ((step.epoch, step.plan.step_id, step.plan.microbatch_id, step.step_num_tokens)
            != (following.epoch, following.plan.step_id, following.plan.microbatch_id,
                following.step_num_tokens)):
        return False
    last, first = step.plan.batch[-1], following.plan.batch[0]
    if last.request_id == first.request_id and (
            last.sample or first.start != last.start + last.num_tokens):
        return False
    rest = following.plan.batch[1:] if last.request_id == first.request_id else following.plan.batch
    return not {e.request_id for e in step.plan.batch} & {e.request_id for e in rest}


def join_fragments(fragments: list) -> tuple:
    """-> (one fragment, its rows) from ``[(step, hidden), ...]``, each continuing the one
    before (``continues``): the metadata of all, each earlier stage's times summed (as the
    last stage sums a step's pieces), the latest hop reports."""
    first_step = fragments[0][0]
    batch: list[BatchEntry] = []
    new_requests, cached_requests, freed = [], [], {}
    compute_s: list[float] = []
    wait_s: list[float] = []
    for step, _ in fragments:
        entries = list(step.plan.batch)
        if batch and batch[-1].request_id == entries[0].request_id:  # cut between the two
            last, entry = batch.pop(), entries.pop(0)
            batch.append(BatchEntry(last.request_id, last.start,
                                    last.num_tokens + entry.num_tokens, entry.sample))
        batch += entries
        new_requests += step.plan.new_requests
        cached_requests += step.plan.cached_requests
        freed.update(dict.fromkeys(step.plan.freed_request_ids))
        add_into(compute_s, step.stage_compute_s)
        add_into(wait_s, step.stage_wait_s)
    plan = StepPlan(first_step.plan.step_id, batch, new_requests=new_requests,
                    cached_requests=cached_requests, freed_request_ids=list(freed),
                    microbatch_id=first_step.plan.microbatch_id)
    joined = dataclasses.replace(first_step, plan=plan, stage_compute_s=tuple(compute_s),
                                 stage_wait_s=tuple(wait_s),
                                 hops=fragments[-1][0].hops or first_step.hops)
    return joined, torch.cat([hidden for _, hidden in fragments])

