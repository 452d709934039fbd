"""RequestLog: one INFO line when an API request is received and one when it ends.

As vLLM does, the lines carry the request's id, its prompt lengths and a summary of its
sampling parameters, so an operator can follow traffic without a debugger. The prompt
itself never goes above DEBUG (prompts are user data); at DEBUG its token ids are logged.
``molink serve --disable-log-requests`` turns the lines off.
"""

from __future__ import annotations

import logging

from molink.outputs import RequestOutput

logger = logging.getLogger(__name__)


class RequestLog:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled

    def received(self, request_id: str, job) -> None:
        if not self.enabled:
            return
        params = job.choice_params[0]
        logger.info("received request %s: prompt tokens %s, n=%d, max_tokens=%s, "
                    "temperature=%s, top_p=%s, top_k=%s, seed=%s, logprobs=%s, stream=%s",
                    request_id, [len(ids) for ids in job.prompt_ids], job.n, params.max_tokens,
                    params.temperature, params.top_p, params.top_k, params.seed,
                    job.num_top_logprobs, job.stream)
        logger.debug("request %s prompt token ids: %s", request_id, job.prompt_ids)

    def finished(self, request_id: str, outputs: dict[int, RequestOutput],
                 failure: BaseException | None) -> None:
        """``outputs``: the latest output of each choice; ``failure``: why it ended early
        (None: it finished)."""
        if not self.enabled:
            return
        num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs.values())
        if failure is None:
            reasons = sorted({str(o.outputs[0].finish_reason) for o in outputs.values()})
            logger.info("finished request %s: %d completion tokens, finish reasons %s",
                        request_id, num_tokens, ",".join(reasons))
        elif isinstance(failure, Exception):
            logger.info("failed request %s after %d completion tokens: %s: %s", request_id,
                        num_tokens, type(failure).__name__, failure)
        else:  # GeneratorExit, CancelledError: the client left
            logger.info("aborted request %s after %d completion tokens: the client left",
                        request_id, num_tokens)
