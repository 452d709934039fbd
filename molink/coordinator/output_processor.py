"""OutputProcessor: turns the scheduler's updated requests into user-facing outputs.

It owns the per-request text state (incremental detokenizer, stop-string matcher,
logprobs); when a stop string matches it tells the scheduler to finish the request.
Shared by the in-process engine and the pipeline head.
"""

from __future__ import annotations

from dataclasses import dataclass

from molink.coordinator.detokenizer import IncrementalDetokenizer, StopStringMatcher
from molink.messages import StepOutput, TokenLogprobs
from molink.outputs import CompletionOutput, Logprob, RequestOutput
from molink.scheduler import Request, Scheduler


@dataclass
class _Tracked:
    request: Request
    prompt: str | None
    detokenizer: IncrementalDetokenizer
    stop_matcher: StopStringMatcher
    text: str = ""
    num_processed_tokens: int = 0
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.tracked: dict[str, _Tracked] = {}

    def add(self, request: Request, prompt: str | None) -> None:
        params = request.sampling_params
        wants_logprobs = params.logprobs is not None
        self.tracked[request.request_id] = _Tracked(
            request=request, prompt=prompt,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids,
                skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens),
            stop_matcher=StopStringMatcher(params.stop_strings, params.include_stop_str_in_output),
            logprobs=[] if wants_logprobs else None,
            cumulative_logprob=0.0 if wants_logprobs else None,
            prompt_logprobs=None if params.prompt_logprobs is None else (
                [None] * len(request.prompt_token_ids)),
        )

    def discard(self, request_id: str) -> None:
        self.tracked.pop(request_id, None)

    def process(self, requests: list[Request], output: StepOutput,
                scheduler: Scheduler) -> list[RequestOutput]:
        """Outputs of the requests that got a token in ``output`` (finished ones included)."""
        for request_id, positions in output.prompt_logprobs.items():
            tracked = self.tracked.get(request_id)
            if tracked is not None and tracked.prompt_logprobs is not None:
                for position, lp in positions.items():  # a replay computes them again
                    if 0 < position < len(tracked.prompt_logprobs):
                        tracked.prompt_logprobs[position] = self._entry(lp)
        return [self._process_one(r, output, scheduler) for r in requests
                if r.request_id in self.tracked]

    def _process_one(self, request: Request, output: StepOutput,
                     scheduler: Scheduler) -> RequestOutput:
        tracked = self.tracked[request.request_id]
        new_tokens = request.output_token_ids[tracked.num_processed_tokens:]
        tracked.num_processed_tokens = len(request.output_token_ids)
        if new_tokens:
            self._record_logprobs(tracked, output)
            emit, stop = tracked.stop_matcher.feed(tracked.detokenizer.add_tokens(new_tokens))
            tracked.text += emit
            if stop is not None and not request.is_finished:
                scheduler.finish_request(request.request_id, "stop", stop)
        if request.is_finished:
            if not isinstance(request.stop_reason, str):  # no stop string matched: release the tail
                emit, _ = tracked.stop_matcher.feed(tracked.detokenizer.flush())
                tracked.text += emit + tracked.stop_matcher.flush()
            del self.tracked[request.request_id]
        return self._request_output(tracked)

    def _record_logprobs(self, tracked: _Tracked, output: StepOutput) -> None:
        lp = output.logprobs.get(tracked.request.request_id)
        if tracked.logprobs is None or lp is None:
            return
        tracked.logprobs.append(self._entry(lp))
        tracked.cumulative_logprob += lp.logprob

    def _entry(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        """The top-N and the chosen token (its own rank, wherever it ranks)."""
        entry = {token: Logprob(value, rank=i + 1, decoded_token=self._decode_one(token))
                 for i, (token, value) in enumerate(lp.top)}
        entry[lp.token_id] = Logprob(lp.logprob, rank=lp.rank,
                                     decoded_token=self._decode_one(lp.token_id))
        return entry

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    @staticmethod
    def _request_output(tracked: _Tracked) -> RequestOutput:
        request = tracked.request
        completion = CompletionOutput(
            index=0, text=tracked.text, token_ids=list(request.output_token_ids),
            cumulative_logprob=tracked.cumulative_logprob,
            logprobs=list(tracked.logprobs) if tracked.logprobs is not None else None,
            finish_reason=request.finish_reason, stop_reason=request.stop_reason)
        return RequestOutput(request_id=request.request_id, prompt=tracked.prompt,
                             prompt_token_ids=list(request.prompt_token_ids),
                             outputs=[completion], finished=request.is_finished,
                             prompt_logprobs=None if tracked.prompt_logprobs is None
                             else tracked.prompt_logprobs)  # complete once a token is out
