"""``/tokenize`` and ``/detokenize``: the served model's tokenizer, as vLLM's server offers it.

``/tokenize`` takes a ``prompt`` (special tokens added by default) or chat ``messages``
(rendered exactly as ``/v1/chat/completions`` renders them, the template's own special
tokens only) and answers ``{count, max_model_len, tokens, token_strs}``; ``/detokenize``
takes ``tokens`` and answers ``{prompt}``. Token ids outside the vocabulary are a 400.
"""

from __future__ import annotations

from molink.coordinator.prompts import RequestError
from molink.entrypoints.job import chat_prompt
from molink.entrypoints.protocol import DetokenizeRequest, TokenizeRequest


def tokenize(request: TokenizeRequest, head, chat_template: str | None) -> dict:
    if (request.prompt is None) == (request.messages is None):
        raise RequestError("give either prompt or messages", "prompt")
    tokenizer = head.tokenizer
    if request.messages is not None:
        text = chat_prompt(request, tokenizer, chat_template)
        add_special_tokens = bool(request.add_special_tokens)
    else:
        text = request.prompt
        add_special_tokens = request.add_special_tokens is not False
    tokens = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    strs = tokenizer.convert_ids_to_tokens(tokens) if request.return_token_strs else None
    return {"count": len(tokens), "max_model_len": head.max_model_len or None,
            "tokens": tokens, "token_strs": strs}


def detokenize(request: DetokenizeRequest, head) -> dict:
    vocab_size = head.arch.vocab_size
    for token in request.tokens:
        if not 0 <= token < vocab_size:
            raise RequestError(f"tokens must be integers in [0, {vocab_size}), got {token}",
                               "tokens")
    return {"prompt": head.tokenizer.decode(request.tokens)}
