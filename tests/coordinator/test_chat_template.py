"""Chat templates: ``--chat-template`` as a file or a literal string, compiled at startup
(a bad one is a ValueError naming the option), and ``render_chat`` with the request's
template variables and options (bad ones are RequestErrors naming the field)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from molink.coordinator.chat_template import load_chat_template, render_chat
from molink.coordinator.prompts import RequestError

TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
            "{% if greeting is defined %}({{ greeting }}){% endif %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))


def test_a_template_from_a_file_or_a_string(tmp_path):
    path = tmp_path / "chat.jinja"
    path.write_text(TEMPLATE)
    assert load_chat_template(str(path)) == TEMPLATE
    assert load_chat_template(TEMPLATE) == TEMPLATE
    assert load_chat_template(None) is None
    looping = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{% endfor %}"
    assert load_chat_template(looping) == looping  # transformers' loop controls compile


@pytest.mark.parametrize(("value", "says"), [
    ("{% for m in messages %}no end", "not a valid Jinja template"),
    ("{{ unclosed", "not a valid Jinja template"),
    ("templates/missing.jinja", "is not a file, nor a Jinja template")])
def test_a_bad_template_names_the_option(value, says):
    with pytest.raises(ValueError, match="--chat-template") as caught:
        load_chat_template(value)
    assert says in str(caught.value)


def test_render_with_the_override_and_template_variables(tokenizer):
    assert render_chat(tokenizer, CHAT, template=TEMPLATE) == "<user>hi<assistant>"
    assert render_chat(tokenizer, CHAT, template=TEMPLATE, add_generation_prompt=False,
                       template_kwargs={"greeting": "hello"}) == "<user>hi(hello)"
    own = render_chat(tokenizer, CHAT)
    assert own == tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    continued = render_chat(tokenizer, CHAT + [{"role": "assistant", "content": "Hel"}],
                            add_generation_prompt=False, continue_final_message=True)
    assert continued.endswith("<|im_start|>assistant\nHel")


def test_bad_options_name_the_field(tokenizer):
    for kwargs, param in [({"template_kwargs": {"messages": []}}, "chat_template_kwargs"),
                          ({"continue_final_message": True}, "continue_final_message"),
                          ({"continue_final_message": True, "add_generation_prompt": False},
                           "continue_final_message"),
                          ({"template": "{{ raise_exception('no') }}"}, "messages")]:
        with pytest.raises(RequestError) as caught:
            render_chat(tokenizer, CHAT, **kwargs)
        assert caught.value.param == param
    tokenizer_without = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer_without.chat_template = None
    with pytest.raises(RequestError, match="--chat-template"):
        render_chat(tokenizer_without, CHAT)
