"""Logprobs under the model's raw distribution (vLLM's "raw_logprobs"): of the sampled
tokens (``compute_logprobs``, for the sampler) and of prompt tokens (``prompt_logprobs``, for
the last stage, where a request asks for them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from molink.messages import TokenLogprobs

if TYPE_CHECKING:
    from molink.runtime.sampler import SamplingRequestState


def compute_logprobs(
    raw: torch.Tensor, token_ids: torch.Tensor, states: list[SamplingRequestState]
) -> list[TokenLogprobs | None]:
    """Logprobs of the sampled tokens under the raw distribution (vLLM's "raw_logprobs").

    raw: [num_rows, vocab_size] float32; token_ids: [num_rows]. None for rows that asked
    for no logprobs.
    """
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    result: list[TokenLogprobs | None] = [None] * len(states)
    if not rows:
        return result
    if len(rows) < len(states):
        index = torch.tensor(rows, device=raw.device)
        raw, token_ids = raw[index], token_ids[index]
    num_top = [states[i].params.logprobs for i in rows]
    for row, logprobs in zip(rows, _token_logprobs(raw, token_ids, num_top)):
        result[row] = logprobs
    return result


PROMPT_LOGPROBS_ROWS = 256  # rows of [rows, vocab] logits held at once for prompt logprobs


def prompt_logprobs(compute_logits, hidden: torch.Tensor, next_token_ids: list[int],
                    num_top: int, first_position: int) -> dict[int, TokenLogprobs]:
    """The logprobs of a request's prompt tokens: row i of ``hidden`` ([rows, hidden], the
    last stage's output) predicts ``next_token_ids[i]``, the prompt token at position
    ``first_position + i``. -> position -> logprobs, from the raw distribution as
    ``compute_logprobs``; in slices, so a long prompt never holds all its logits at once."""
    result = {}
    for start in range(0, len(next_token_ids), PROMPT_LOGPROBS_ROWS):
        end = min(start + PROMPT_LOGPROBS_ROWS, len(next_token_ids))
        raw = compute_logits(hidden[start:end])  # [end - start, vocab] float32
        targets = torch.tensor(next_token_ids[start:end], dtype=torch.long, device=raw.device)
        for i, logprobs in enumerate(_token_logprobs(raw, targets, [num_top] * (end - start))):
            result[first_position + start + i] = logprobs
    return result


def _token_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, num_top: list[int]) -> list[TokenLogprobs]:
    """raw: [num_rows, vocab_size]; token_ids: [num_rows]; num_top: top-N size per row.

    The rank counts tokens at least as likely as the sampled one (vLLM's rule), so 1 means
    most likely.
    """
    logprobs = raw.log_softmax(dim=-1)  # [num_rows, vocab_size]
    chosen = logprobs.gather(1, token_ids[:, None])  # [num_rows, 1]
    ranks = (logprobs >= chosen).sum(dim=-1)  # [num_rows]
    top_logprobs, top_ids = logprobs.topk(min(max(num_top), raw.shape[1]), dim=-1)  # [num_rows, N]
    rows = zip(token_ids.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(),
               top_ids.tolist(), top_logprobs.tolist(), num_top)
    return [TokenLogprobs(token, logprob, rank, list(zip(ids[:n], lps[:n])))
            for token, logprob, rank, ids, lps, n in rows]
