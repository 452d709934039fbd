"""In-process, against a scripted head (no model runs): reasoning models' thinking as
``reasoning_content`` (whole and streamed, through the official ``openai`` client), bad
input of the new fields as 400s naming the field, no CORS headers unless configured, and
the ``molink serve`` options (a bad ``--chat-template`` stops it with one clear line)."""

from __future__ import annotations

import asyncio
import types

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from molink.entrypoints import cli
from molink.entrypoints.api_options import ApiOptions, api_options
from molink.entrypoints.http_server import create_app
from molink.entrypoints.reasoning import ReasoningParser, reasoning_parser
from molink.outputs import CompletionOutput, RequestOutput

# What a reasoning model writes, as the detokenizer hands it over, piece by piece.
PIECES = ["<thi", "nk>Two and", " two make four.</th", "ink>", "\n\nThe answer", " is 4."]
SCRIPT = "".join(PIECES)
CHAT = [{"role": "user", "content": "What is 2 + 2?"}]


class ScriptedHead:
    """Stands in for PipelineHead: every request writes SCRIPT, one piece per step."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.arch = types.SimpleNamespace(vocab_size=len(tokenizer))
        self.max_model_len = 64
        self.listeners: list = []
        self.scheduler = types.SimpleNamespace(num_waiting=0)

    async def generate(self, prompt, params, request_id=None):
        for i in range(1, len(PIECES) + 1):
            done = i == len(PIECES)
            yield RequestOutput(request_id, None, list(prompt), [CompletionOutput(
                0, "".join(PIECES[:i]), [7] * i, finish_reason="stop" if done else None)],
                finished=done)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))


def _client(app) -> openai.AsyncOpenAI:
    transport = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(base_url="http://test/v1", api_key="unused", max_retries=0,
                              http_client=transport)


async def _whole_and_streamed(app, **extra) -> tuple[dict, dict[str, str]]:
    client = _client(app)
    whole = await client.chat.completions.create(model="tiny", messages=CHAT, extra_body=extra)
    streamed = {"reasoning_content": "", "content": ""}
    stream = await client.chat.completions.create(model="tiny", messages=CHAT, stream=True,
                                                  extra_body=extra)
    async for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            for key in streamed:
                streamed[key] += delta.get(key) or ""
    return whole.choices[0].message.model_dump(), streamed


# ---- reasoning -------------------------------------------------------------------------------


def test_split_rules():
    parser = ReasoningParser()
    assert parser.split(SCRIPT) == ("Two and two make four.", "\n\nThe answer is 4.")
    assert parser.split("no tags at all") == ("no tags at all", None)  # cut off thinking
    assert parser.split("thinking</think>") == ("thinking", None)  # R1: <think> in the prompt
    assert parser.split("<think>a</think>b", finished=True) == ("a", "b")
    assert ReasoningParser(thinking=False).split(SCRIPT) == (None, SCRIPT)
    assert reasoning_parser(None, None) is None
    assert not reasoning_parser("qwen3", {"enable_thinking": False}).thinking
    assert reasoning_parser("deepseek_r1", {"enable_thinking": False}).thinking


def test_streamed_splits_only_grow_and_add_up_to_the_whole():
    parser = ReasoningParser()
    for text in (SCRIPT, "<think>x</think>y", "abc</thinking>", "<th", "a</th"):
        seen = ("", "")
        for end in range(len(text) + 1):
            reasoning, content = parser.split(text[:end], finished=end == len(text))
            now = (reasoning or "", content or "")
            assert now[0].startswith(seen[0]) and now[1].startswith(seen[1]), (text, end)
            seen = now
        whole = parser.split(text)
        assert seen == (whole[0] or "", whole[1] or "")


def test_reasoning_content_whole_and_streamed(tokenizer):
    app = create_app(ScriptedHead(tokenizer), "tiny",
                     options=ApiOptions(reasoning_parser="deepseek_r1"))
    message, streamed = asyncio.run(_whole_and_streamed(app))
    assert message["reasoning_content"] == "Two and two make four."
    assert message["content"] == "\n\nThe answer is 4."
    assert streamed == {"reasoning_content": message["reasoning_content"],
                        "content": message["content"]}


def test_qwen3_without_thinking_and_no_parser_answer_content_only(tokenizer):
    qwen3 = create_app(ScriptedHead(tokenizer), "tiny", options=ApiOptions(reasoning_parser="qwen3"))
    message, streamed = asyncio.run(_whole_and_streamed(
        qwen3, chat_template_kwargs={"enable_thinking": False}))
    assert (message["content"], message["reasoning_content"]) == (SCRIPT, None)
    assert streamed == {"reasoning_content": "", "content": SCRIPT}
    message, _ = asyncio.run(_whole_and_streamed(qwen3))  # thinking on by default
    assert message["reasoning_content"] == "Two and two make four."
    plain = create_app(ScriptedHead(tokenizer), "tiny")
    message, streamed = asyncio.run(_whole_and_streamed(plain))
    assert message["content"] == SCRIPT and "reasoning_content" not in message
    assert streamed == {"reasoning_content": "", "content": SCRIPT}


# ---- bad input -------------------------------------------------------------------------------


def _post(app, path: str, body: dict | None, headers: dict | None = None,
          method: str = "POST") -> httpx.Response:
    async def send():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://test") as client:
            return await client.request(method, path, json=body, headers=headers)

    return asyncio.run(send())


BAD_COMPLETIONS = [
    ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "high"}}, "logit_bias"), ({"logit_bias": {"512": 1}}, "logit_bias"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias"),
    ({"logit_bias": [1, 2]}, "logit_bias"), ({"best_of": 0}, "best_of"),
    ({"best_of": 2, "n": 3}, "best_of"), ({"best_of": 3, "stream": True}, "best_of"),
    ({"best_of": 129}, "best_of"), ({"echo": "yes"}, "echo"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": "2"}, "prompt_logprobs")]
BAD_CHATS = [
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], {},
     "'input_audio'"),
    ([{"role": "user", "content": [{"type": "text"}]}], {}, "messages[0].content[0].text"),
    ([{"role": "user", "content": None}], {}, "messages[0].content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}], {},
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "x", "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}], {}, "messages[0].tool_calls"),
    ([{"role": "user", "content": [{"text": "no type"}]}], {}, "messages"),
    (CHAT, {"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    (CHAT, {"chat_template_kwargs": "x"}, "chat_template_kwargs"),
    (CHAT, {"chat_template": "{{ 1 }}"}, "chat_template"),
    (CHAT, {"continue_final_message": True}, "continue_final_message"),
    (CHAT, {"prompt_logprobs": 1.5}, "prompt_logprobs")]


def _assert_400(response: httpx.Response, param: str, text: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error


def test_bad_new_fields_are_400_naming_the_field(tokenizer):
    app = create_app(ScriptedHead(tokenizer), "tiny")
    for fields, param in BAD_COMPLETIONS:
        _assert_400(_post(app, "/v1/completions", {"prompt": "hi"} | fields), param, param)
    for messages, fields, text in BAD_CHATS:
        param = next(iter(fields), "messages")
        _assert_400(_post(app, "/v1/chat/completions", {"messages": messages} | fields), param,
                    text)
    for body, param in [({}, "prompt"), ({"prompt": "x", "messages": CHAT}, "prompt"),
                        ({"prompt": 3}, "prompt"), ({"messages": "hi"}, "messages")]:
        _assert_400(_post(app, "/tokenize", body), param, param)
    for body in ({"tokens": [-1]}, {"tokens": [512]}, {"tokens": "1 2"}, {}):
        _assert_400(_post(app, "/detokenize", body), "tokens", "tokens")


def test_no_cors_headers_unless_configured(tokenizer):
    app = create_app(ScriptedHead(tokenizer), "tiny")
    preflight = _post(app, "/v1/completions", None, method="OPTIONS", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    allowed = create_app(ScriptedHead(tokenizer), "tiny",
                         options=ApiOptions(allowed_origins=("http://app.example",)))
    answer = _post(allowed, "/v1/completions", {"prompt": "hi"}, {"Origin": "http://app.example"})
    assert answer.headers["access-control-allow-origin"] == "http://app.example"
    answer = _post(app, "/v1/completions", {"prompt": "hi"}, {"Origin": "http://app.example"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


# ---- molink serve options --------------------------------------------------------------------


def test_serve_options_parse(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    args = cli.build_parser().parse_args([
        "serve", "model", "--chat-template", str(template), "--reasoning-parser", "qwen3",
        "--allowed-origins", '["http://a.example", "http://b.example"]',
        "--allowed-methods", "GET,POST", "--allow-credentials"])
    options = api_options(args)
    assert options.chat_template == template.read_text()
    assert options.reasoning_parser == "qwen3"
    assert options.allowed_origins == ("http://a.example", "http://b.example")
    assert options.allowed_methods == ("GET", "POST") and options.allowed_headers == ("*",)
    assert options.allow_credentials
    literal = api_options(cli.build_parser().parse_args(
        ["serve", "model", "--chat-template", "{{ messages[0].content }}"]))
    assert literal.chat_template == "{{ messages[0].content }}" and not literal.allowed_origins
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "model", "--reasoning-parser", "other"])


@pytest.mark.parametrize(("value", "says"), [
    ("{% if %}oops", "not a valid Jinja template"),
    ("/no/such/template.jinja", "is not a file, nor a Jinja template")])
def test_a_bad_chat_template_stops_serve_with_one_line(tiny_model_dir, capsys, value, says):
    code = cli.main(["serve", str(tiny_model_dir("llama")), "--chat-template", value])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("molink serve: error: --chat-template") and says in error
    assert "Traceback" not in error
