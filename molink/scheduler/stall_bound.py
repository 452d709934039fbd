"""How many prompt tokens a plan may carry while requests decode (stall-free batching).

Pure arithmetic on measured step times (no torch, no I/O). A long prompt computed as one
step stalls every decode behind it, at every stage it passes. Sarathi-Serve's answer on one
GPU, applied here at the head's scheduler and at every stage that receives prefill
fragments: while requests decode, prompts go in chunks small enough that

    step(decodes + chunk) <= (1 + factor) * step(decodes)        at every stage

with ``step(tokens) = fixed + per_token * tokens`` as measured on that stage. A decode step
then takes at most ``1 + factor`` times its own time whether the chunk rides in the same
step or in a separate one just ahead of it (a chunk alone is cheaper than decodes plus
chunk), so no decode is delayed by more than ``factor`` decode steps per stage, and prefill
still moves every step. The chunk is::

    chunk = factor * (fixed / per_token + decode_tokens)

large where a step is mostly fixed cost (a GPU reading its weights: hundreds of tokens ride
along almost free), small where every token costs (a CPU). ``min_tokens`` keeps prompts
moving whatever the measurements say.

Where links, not stages, set the round (stages on their own devices, slow links: a ~10 ms
step in a ~170 ms round), a decode step is the wrong unit: the decodes of a plan wait for
the whole round anyway, and a prompt moves one chunk per round (a request is never in two
micro-batches), so chunks of 2 steps make long prompts take dozens of rounds. There the
unit is at least ``ROUND_SHARE`` of the stage's share of the modelled round (``round_s``)::

    chunk = factor * max(fixed / per_token + decode_tokens,
                         ROUND_SHARE * round_s / num_stages / per_token)

so with factor 2 a round carrying prefill takes at most twice the decode round. In the
headline's mixed workload (``benchmarks/results/stall_sweep.md``, ``stall_sweep_round.md``)
factor 2 by steps held TTFT p99 to 12.5 s; with the round's share 8.6 s (FIFO: 8.8 s), at
inter-token p99 0.36 s instead of 0.30 s. Stages that share one machine's cores get no
``round_s``: a chunk there takes the cores from every stage, and the step unit is what kept
inter-token p99 within 2x on real CPUs.

The default factor was chosen by measurement (``benchmarks/results/stall_free.md``, 3 CPU
stages over 100 Mbit/20 ms links): 1 kept short streams' inter-token p99 within 1.4-1.5x
under long prompts but made those prompts' first token 5-12x later than unbounded; 3 kept
the first token within 3x but let the p99 grow 2.3x; without a bound it grew 4.6-5.4x.
"""

from __future__ import annotations

from molink.scheduler.microbatch_chooser import StageTiming

DEFAULT_STALL_FACTOR = 2.0
MIN_CHUNK_TOKENS = 16
ROUND_SHARE = 0.5  # of a stage's share of the round: the least stall unit (see above)


def prefill_chunk_tokens(stages: list[StageTiming], decode_tokens: int, factor: float,
                         max_tokens: int, min_tokens: int = MIN_CHUNK_TOKENS,
                         round_s: float | None = None) -> int:
    """Most prompt tokens one step may carry next to ``decode_tokens`` decodes (see the
    module docstring): the largest chunk within the bound at every stage, clamped to
    ``[min(min_tokens, max_tokens), max_tokens]``. ``factor <= 0`` or nothing measured:
    ``max_tokens`` (no bound). ``round_s``: the modelled decode round, where the stages do
    not share cores (None: the unit is a decode step)."""
    if factor <= 0 or not stages or max_tokens <= 0:
        return max(0, max_tokens)
    share_s = ROUND_SHARE * round_s / len(stages) if round_s and round_s > 0 else 0.0
    chunk = max_tokens
    for stage in stages:
        if stage.per_token_s <= 0:
            continue  # a stage whose step does not grow with tokens bounds nothing
        unit = max(stage.fixed_s / stage.per_token_s + max(0, decode_tokens),
                   share_s / stage.per_token_s)
        chunk = min(chunk, int(factor * unit))
    return max(min(min_tokens, max_tokens), chunk)


def is_decode(plan) -> bool:
    """A step of running requests' single tokens only (a ``StepPlan``)."""
    return bool(plan.batch) and not plan.new_requests and all(
        entry.num_tokens == 1 for entry in plan.batch)
