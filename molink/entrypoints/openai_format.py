"""OpenAI's JSON shapes of a ``Job``'s answers, whole or as chunks (with ``echo``, the
prompt's text first; with a reasoning parser, the thinking as ``reasoning_content``; with
tools, the calls as ``tool_calls``, read from the whole text by ``tool_calls``)."""

from __future__ import annotations

import time
import uuid

from molink.entrypoints.job import Job
from molink.entrypoints.reasoning import ReasoningParser
from molink.entrypoints.tool_calls import ToolCallStream
from molink.outputs import CompletionOutput, Logprob, RequestOutput

# ---- formatting: outputs -> OpenAI JSON ----------------------------------------------------------


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("stop" if reason == "abort" else reason)


def _usage(outputs: list[RequestOutput], n: int) -> dict:
    # The prompt counts once per prompt, however many choices were drawn from it.
    num_prompt = sum(len(o.prompt_token_ids) for o in outputs[::n])
    num_completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


_NOT_COMPUTED = Logprob(None)  # a prompt token whose logprobs never came (shown as null)


def _top(entry: dict[int, Logprob], count: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(entry.items(), key=lambda item: item[1].rank or 1 << 62)
    return ranked[:count]


class Format:
    """Shared state of one answer: its id, and how far each choice has been sent."""
    object_name = ""
    id_prefix = ""

    def __init__(self, model: str, job: Job) -> None:
        self.model = model
        self.job = job
        self.request_id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sent_chars: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.token_offsets: dict[int, int] = {}  # completions: where the next token's text starts

    def _envelope(self, object_name: str, choices: list, **extra) -> dict:
        return {"id": self.request_id, "object": object_name, "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def _new_part(self, index: int, out: CompletionOutput) -> tuple[str, int, int]:
        """(new text, first new token, end token) since the last chunk of this choice."""
        start_chars = self.sent_chars.get(index, 0)
        start_tokens = self.sent_tokens.get(index, 0)
        end_tokens = len(out.logprobs) if out.logprobs is not None else len(out.token_ids)
        self.sent_chars[index] = len(out.text)
        self.sent_tokens[index] = end_tokens
        return out.text[start_chars:], start_tokens, end_tokens

    def _token(self, token_id: int, lp: Logprob) -> str:
        """A token as logprobs name it: its text, or ``token_id:N`` when the request asked
        for ids (``return_tokens_as_token_ids``, as in vLLM)."""
        return f"token_id:{token_id}" if self.job.tokens_as_ids else lp.decoded_token or ""

    def _prompt_logprobs(self, output: RequestOutput) -> dict:
        """vLLM's ``prompt_logprobs`` field where the request asked for it: per prompt token,
        None for the first, else {token id: {logprob, rank, decoded_token}} for the top-N
        and the prompt's own token."""
        count = self.job.num_prompt_logprobs
        if count is None or output.prompt_logprobs is None:
            return {}
        entries = []
        for token_id, entry in zip(output.prompt_token_ids, output.prompt_logprobs):
            if entry is not None:
                kept = dict(_top(entry, count))
                kept[token_id] = entry[token_id]
                entry = {str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                  "decoded_token": lp.decoded_token} for t, lp in kept.items()}
            entries.append(entry)
        return {"prompt_logprobs": entries}

    def opening_chunks(self) -> list[dict]:
        return []

    def usage_chunk(self, outputs: list[RequestOutput]) -> dict:
        return self._envelope(self.chunk_object, [], usage=_usage(outputs, self.job.n))


class CompletionFormat(Format):
    object_name = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def answer(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for index, output in enumerate(outputs):
            out = output.outputs[0]
            choices.append({"index": index, "text": self._echo(index) + out.text,
                            "logprobs": self._choice_logprobs(index, output, True),
                            "finish_reason": _finish_reason(out.finish_reason),
                            **self._prompt_logprobs(output)})
        return self._envelope(self.object_name, choices, usage=_usage(outputs, self.job.n))

    def chunk(self, index: int, output: RequestOutput) -> dict | None:
        out = output.outputs[0]
        first = index not in self.sent_chars
        echo = self._echo(index) if first else ""  # before the first part
        text, start, end = self._new_part(index, out)
        text = echo + text
        if not text and start == end and out.finish_reason is None:
            return None
        choice = {"index": index, "text": text,
                  "logprobs": self._choice_logprobs(index, output, first, start, end),
                  "finish_reason": _finish_reason(out.finish_reason),
                  **(self._prompt_logprobs(output) if first else {})}
        extra = {"usage": None} if self.job.include_usage else {}
        return self._envelope(self.object_name, [choice], **extra)

    def _echo(self, index: int) -> str:
        texts = self.job.echo_texts
        return "" if texts is None else texts[index // self.job.n]

    def _choice_logprobs(self, index: int, output: RequestOutput, first: bool,
                         start: int = 0, end: int | None = None) -> dict | None:
        """OpenAI's completions shape for the generated tokens [start, end) (all by default);
        with echo, in the first part, the prompt's tokens first. Text offsets count the
        tokens' texts, from the end of the echoed prompt (streamed: where the last part's
        tokens ended, whatever text the stop-string matcher still held back)."""
        out = output.outputs[0]
        if self.job.num_top_logprobs is None or out.logprobs is None:
            return None
        shape = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if first and self.job.echo_first_tokens is not None:
            self._add_prompt_tokens(shape, index, output)
        offset = len(self._echo(index)) if first else self.token_offsets[index]
        end = len(out.logprobs) if end is None else end
        for position in range(start, end):
            offset = self._add_token(shape, out.token_ids[position], out.logprobs[position],
                                     offset)
        self.token_offsets[index] = offset
        return shape

    def _add_prompt_tokens(self, shape: dict, index: int, output: RequestOutput) -> None:
        """Echo with logprobs: the prompt's tokens, the first with no logprob."""
        ids, entries = output.prompt_token_ids, output.prompt_logprobs or []
        first = self.job.echo_first_tokens[index // self.job.n]
        shape["tokens"].append(f"token_id:{ids[0]}" if self.job.tokens_as_ids else first)
        shape["token_logprobs"].append(None)
        shape["top_logprobs"].append(None)
        shape["text_offset"].append(0)
        offset = len(first)
        for token_id, entry in zip(ids[1:], entries[1:]):
            offset = self._add_token(shape, token_id, entry or {}, offset)

    def _add_token(self, shape: dict, token_id: int, entry: dict[int, Logprob],
                   offset: int) -> int:
        """One token's logprobs appended to ``shape``; -> the next token's text offset."""
        chosen = entry.get(token_id) or _NOT_COMPUTED
        shape["tokens"].append(self._token(token_id, chosen))
        shape["token_logprobs"].append(chosen.logprob)
        shape["top_logprobs"].append({self._token(t, lp): lp.logprob for t, lp in
                                      _top(entry, self.job.num_top_logprobs)})
        shape["text_offset"].append(offset)
        return offset + len(chosen.decoded_token or "")


class ChatFormat(Format):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, model: str, job: Job, reasoning: ReasoningParser | None = None) -> None:
        super().__init__(model, job)
        self.reasoning = reasoning
        self.sent_split: dict[int, tuple[int, int]] = {}  # reasoning, content chars sent
        self.tool_streams: dict[int, ToolCallStream] = {}  # with tools: calls sent so far

    def answer(self, outputs: list[RequestOutput]) -> dict:
        choices = []
        for index, output in enumerate(outputs):
            out = output.outputs[0]
            message = {"role": "assistant", "content": out.text}
            finish_reason = _finish_reason(out.finish_reason)
            if self.job.tool_calls is not None:
                fields, finish_reason = self.job.tool_calls.answer_fields(out.text, finish_reason)
                message |= fields
            elif self.reasoning is not None:
                reasoning, content = self.reasoning.split(out.text)
                message |= {"reasoning_content": reasoning, "content": content}
            choices.append({"index": index, "message": message,
                            "logprobs": self._logprobs(out, 0, len(out.logprobs or ())),
                            "finish_reason": finish_reason})
        # vLLM's: the prompt's logprobs beside the choices (one prompt per chat request)
        return self._envelope(self.object_name, choices, usage=_usage(outputs, self.job.n),
                              **self._prompt_logprobs(outputs[0]))

    def opening_chunks(self) -> list[dict]:
        extra = {"usage": None} if self.job.include_usage else {}
        return [self._envelope(self.chunk_object, [{
            "index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
            "finish_reason": None}], **extra) for index in range(self.job.n * len(self.job.prompt_ids))]

    def chunk(self, index: int, output: RequestOutput) -> dict | None:
        out = output.outputs[0]
        first = index not in self.sent_chars
        text, start, end = self._new_part(index, out)
        if not text and start == end and out.finish_reason is None:
            return None
        finish_reason = _finish_reason(out.finish_reason)
        if self.job.tool_calls is not None:
            stream = self.tool_streams.setdefault(index, ToolCallStream(self.job.tool_calls))
            delta = stream.delta(out.text, out.finish_reason is not None)
            if stream.called and finish_reason == "stop":
                finish_reason = "tool_calls"
        else:
            delta = self._delta(index, out, text)
        choice = {"index": index, "delta": delta, "logprobs": self._logprobs(out, start, end),
                  "finish_reason": finish_reason}
        extra = {"usage": None} if self.job.include_usage else {}
        if first:
            extra |= self._prompt_logprobs(output)
        return self._envelope(self.chunk_object, [choice], **extra)

    def _delta(self, index: int, out: CompletionOutput, text: str) -> dict:
        """The new text, as content or (with a reasoning parser) split from the thinking."""
        if self.reasoning is None:
            return {"content": text} if text else {}
        reasoning, content = self.reasoning.split(out.text, out.finish_reason is not None)
        reasoning, content = reasoning or "", content or ""
        sent_reasoning, sent_content = self.sent_split.get(index, (0, 0))
        self.sent_split[index] = len(reasoning), len(content)
        delta = {"reasoning_content": reasoning[sent_reasoning:], "content": content[sent_content:]}
        return {key: value for key, value in delta.items() if value}

    def _logprobs(self, out: CompletionOutput, start: int, end: int) -> dict | None:
        """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        if self.job.num_top_logprobs is None or out.logprobs is None:
            return None
        content = []
        for position in range(start, end):
            entry = out.logprobs[position]
            chosen = entry[out.token_ids[position]]
            item = _chat_token(self._token(out.token_ids[position], chosen), chosen)
            item["top_logprobs"] = [_chat_token(self._token(token_id, lp), lp) for token_id, lp
                                    in _top(entry, self.job.num_top_logprobs)]
            content.append(item)
        return {"content": content}


def _chat_token(token: str, lp: Logprob) -> dict:
    return {"token": token, "logprob": lp.logprob,
            "bytes": list(token.encode("utf-8", errors="replace"))}
