"""What real clients send (Open WebUI, LibreChat, LangChain, the Agents SDK), through the
official ``openai`` client against a real 2-stage pipeline: ``molink serve`` (layers 0:2,
``--chat-template`` FILE, CORS for one origin, ``--api-key``) + ``molink join`` (layers
2:4, where tokens are sampled, so ``logit_bias`` must cross the wire to get there).

The test template renders every message field it is given, so the rendered prompt (read
back through ``/tokenize`` and ``/detokenize``) shows what reached the template.
"""

from __future__ import annotations

import math
import os
import subprocess

import httpx
import openai
import pytest

from tests.entrypoints.test_openai_api import API_KEY, Server, start_server, stop_all

MAX_MODEL_LEN = 96
ORIGIN = "http://app.example"
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
TEMPLATE = (
    "{%- for m in messages -%}"
    "[{{ m.role }}{% if m.name %} name={{ m.name }}{% endif %}"
    "{% if m.tool_call_id %} id={{ m.tool_call_id }}{% endif %}]{{ m.content }}"
    "{%- for call in m.tool_calls or [] %}(call {{ call.id }} {{ call.function.name }} "
    "city={{ call.function.arguments.city }}){% endfor %}"
    "{%- endfor -%}"
    "{%- if enable_thinking is defined and not enable_thinking %}[no-think]{% endif -%}"
    "{%- if add_generation_prompt %}[assistant]{% endif -%}")
TOOL_CHAT = [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    directory = str(tiny_model_dir("llama"))
    template = tmp_path_factory.mktemp("template") / "echo.jinja"
    template.write_text(TEMPLATE)
    procs: list[subprocess.Popen] = []
    try:
        url = start_server(directory, procs, ["2:"], "0:2", (
            "--api-key", API_KEY, "--max-model-len", str(MAX_MODEL_LEN),
            "--chat-template", str(template), "--allowed-origins", ORIGIN))
        yield Server(url, directory, os.path.basename(directory))
    finally:
        stop_all(procs)


def _rendered(server: Server, messages: list[dict], **options) -> str:
    """The prompt the server renders for ``messages``, read back as text."""
    tokens = server.post("/tokenize", json={"messages": messages, **options})
    assert tokens.status_code == 200, tokens.text
    text = server.post("/detokenize", json={"tokens": tokens.json()["tokens"]})
    return text.json()["prompt"]


def _chat(server: Server, messages: list[dict], **extra_body):
    return server.client().chat.completions.create(
        model=server.model, messages=messages, max_tokens=6, temperature=0,
        extra_body={"ignore_eos": True, **extra_body})


# ---- chat messages ----------------------------------------------------------------------------


def test_content_parts_answer_as_the_same_text(server):
    as_text = _chat(server, [{"role": "user", "content": "Name a colour."}])
    as_part = _chat(server, [{"role": "user", "content": [
        {"type": "text", "text": "Name a colour."}]}])
    assert as_part.choices[0].message.content == as_text.choices[0].message.content
    assert as_part.usage == as_text.usage
    # Several text parts are joined by newlines, as vLLM joins them.
    joined = _chat(server, [{"role": "user", "content": "Name a\ncolour."}])
    parts = _chat(server, [{"role": "user", "content": [
        {"type": "text", "text": "Name a"}, {"type": "text", "text": "colour."}]}])
    assert parts.choices[0].message.content == joined.choices[0].message.content
    assert parts.usage.prompt_tokens == joined.usage.prompt_tokens


def test_tool_calls_and_tool_messages_reach_the_template(server):
    expected = ("[user]Weather in Paris?[assistant](call call_1 get_weather city=Paris)"
                "[tool name=get_weather id=call_1]sunny[assistant]")
    assert _rendered(server, TOOL_CHAT) == expected
    answer = _chat(server, TOOL_CHAT)  # the same messages answer
    count = server.post("/tokenize", json={"messages": TOOL_CHAT}).json()["count"]
    assert answer.usage.prompt_tokens == count


def test_an_image_part_is_400_naming_it(server):
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(server, messages)
    message = caught.value.body["message"]
    assert "'image_url'" in message and "messages[1]" in message
    assert caught.value.body["param"] == "messages"


def test_chat_template_kwargs_and_options_reach_the_template(server):
    chat = [{"role": "user", "content": "hi"}]
    assert _rendered(server, chat) == "[user]hi[assistant]"
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    assert _rendered(server, chat, **off) == "[user]hi[no-think][assistant]"
    assert _rendered(server, chat, add_generation_prompt=False) == "[user]hi"
    # The chat endpoint renders the same: its prompt is one [no-think] longer.
    plain = _chat(server, chat).usage.prompt_tokens
    thinking_off = _chat(server, chat, **off).usage
    marker = server.post("/tokenize", json={"prompt": "[no-think]"}).json()["count"]
    assert thinking_off.prompt_tokens == plain + marker


def test_the_chat_template_option_replaces_the_tokenizers(server):
    from transformers import AutoTokenizer

    chat = [{"role": "user", "content": "hi"}]
    own = AutoTokenizer.from_pretrained(server.directory).apply_chat_template(
        chat, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>" in own  # the tiny tokenizer's ChatML
    assert _rendered(server, chat) == "[user]hi[assistant]" != own


# ---- sampling on the last stage ------------------------------------------------------------


def test_logit_bias_reaches_the_last_stage(server):
    forced = server.post("/tokenize", json={"prompt": "blue"}).json()["tokens"][-1]
    six = server.post("/detokenize", json={"tokens": [forced] * 6}).json()["prompt"]
    client = server.client()
    plain = client.completions.create(model=server.model, prompt="Hello there", max_tokens=6,
                                      **GREEDY)
    assert plain.choices[0].text != six
    for temperature in (0, 1.0):  # the greedy and the drawing paths of the sampler
        biased = client.completions.create(
            model=server.model, prompt="Hello there", max_tokens=6, temperature=temperature,
            seed=3, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})
        assert biased.choices[0].text == six
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=server.model, prompt="hi", logit_bias={"99999": 5})


def test_best_of_answers_the_choices_of_highest_cumulative_logprob(server):
    client = server.client()
    common = {"model": server.model, "prompt": "Hello there", "max_tokens": 5,
              "temperature": 1.0, "seed": 11, "extra_body": {"ignore_eos": True}}
    every = client.completions.create(n=3, logprobs=0, **common)
    drawn = sorted(every.choices, key=lambda c: c.index)
    totals = [math.fsum(c.logprobs.token_logprobs) for c in drawn]
    ranked = [drawn[i].text for i in sorted(range(3), key=lambda i: -totals[i])]
    assert len(set(ranked)) == 3  # three different draws (seeds 11, 12, 13)
    best = client.completions.create(best_of=3, **common)
    assert [c.text for c in best.choices] == ranked[:1]
    assert best.choices[0].logprobs is None  # computed to rank them, not asked for
    best_two = client.completions.create(n=2, best_of=3, **common)
    assert [c.text for c in sorted(best_two.choices, key=lambda c: c.index)] == ranked[:2]
    assert best_two.usage.completion_tokens == 10
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(n=3, best_of=2, **common)


def test_echo_puts_the_prompt_first(server):
    client = server.client()
    plain = client.completions.create(model=server.model, prompt="Hello there", max_tokens=4,
                                      **GREEDY).choices[0].text
    echoed = client.completions.create(model=server.model, prompt="Hello there", max_tokens=4,
                                       echo=True, **GREEDY)
    assert echoed.choices[0].text == "Hello there" + plain
    stream = client.completions.create(model=server.model, prompt="Hello there", max_tokens=4,
                                       echo=True, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream) == "Hello there" + plain


# ---- tokenizer, version, models, CORS, key ----------------------------------------------------


def test_tokenize_and_detokenize_round_trip(server):
    text = "The capital of France is"
    tokens = server.post("/tokenize", json={"model": server.model, "prompt": text,
                                            "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == len(tokens["token_strs"]) > 1
    assert tokens["max_model_len"] == MAX_MODEL_LEN
    back = server.post("/detokenize", json={"model": server.model, "tokens": tokens["tokens"]})
    assert back.json() == {"prompt": text}
    assert server.post("/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404


def test_version_and_max_model_len(server):
    version = httpx.get(f"{server.url}/version", timeout=10,
                        headers={"Authorization": f"Bearer {API_KEY}"})
    assert version.status_code == 200 and version.json()["version"]
    entry = server.client().models.list().data[0]
    assert entry.id == server.model and entry.max_model_len == MAX_MODEL_LEN


def test_the_new_routes_need_the_api_key(server):
    for path, body in [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]})]:
        assert server.post(path, key=None, json=body).status_code == 401
        assert server.post(path, key="wrong", json=body).status_code == 401
    assert httpx.get(f"{server.url}/version", timeout=10).status_code == 401


def test_cors_headers_for_the_allowed_origin_only(server):
    preflight = httpx.options(f"{server.url}/v1/chat/completions", timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    auth = {"Authorization": f"Bearer {API_KEY}"}
    allowed = httpx.get(f"{server.url}/v1/models", timeout=10, headers=auth | {"Origin": ORIGIN})
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{server.url}/v1/models", timeout=10,
                      headers=auth | {"Origin": "http://elsewhere.example"})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
