"""The offline ``LLM`` API: vLLM-compatible calls, sampling options, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from molink import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(model=str(tiny_model_dir("llama")), dtype="float32", device="cpu", block_size=8)


def _ids(llm, text):
    return llm.get_tokenizer().encode(text)


def test_generate_accepts_strings_and_token_ids(llm):
    text = "The quick brown fox"
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    by_text = llm.generate(text, params)
    by_ids = llm.generate([{"prompt_token_ids": _ids(llm, text)}], params)
    assert len(by_text) == len(by_ids) == 1
    out = by_text[0].outputs[0]
    assert out.token_ids == by_ids[0].outputs[0].token_ids
    assert len(out.token_ids) == 8
    assert out.finish_reason == "length"
    assert out.text == llm.get_tokenizer().decode(out.token_ids, skip_special_tokens=True)
    assert by_text[0].prompt == text and by_text[0].prompt_token_ids == _ids(llm, text)


def test_outputs_come_back_in_prompt_order(llm):
    prompts = ["one", "two three four five six", "seven"]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (9, 2, 5)]
    outputs = llm.generate(prompts, params)
    assert [o.prompt for o in outputs] == prompts
    assert [len(o.outputs[0].token_ids) for o in outputs] == [9, 2, 5]


def _sample(llm, prompts, seed, extra_prompts=()):
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=seed, max_tokens=16,
                             ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    params = [sampled] * len(prompts) + [others] * len(extra_prompts)
    outputs = llm.generate(list(prompts) + list(extra_prompts), params)
    return [o.outputs[0].token_ids for o in outputs[:len(prompts)]]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    alone = _sample(llm, ["Hello there"], seed=7)
    again = _sample(llm, ["Hello there"], seed=7)
    crowded = _sample(llm, ["Hello there"], seed=7, extra_prompts=["a", "b c d", "efg hij"] * 3)
    other_seed = _sample(llm, ["Hello there"], seed=8)
    assert alone == again == crowded
    assert alone != other_seed


def test_n_completions_per_prompt(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    (output,) = llm.generate("Some prompt", params)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1


def test_logprobs_are_returned_and_consistent(llm):
    params = SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    (output,) = llm.generate("Numbers: 1 2 3", params)
    completion = output.outputs[0]
    assert len(completion.logprobs) == 5
    total = 0.0
    for token, entry in zip(completion.token_ids, completion.logprobs):
        assert token in entry
        assert entry[token].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3  # the sampled token is among the top 3
        assert all(v.logprob <= 0.0 for v in entry.values())
        total += entry[token].logprob
    assert math.isclose(completion.cumulative_logprob, total, rel_tol=1e-6)


def test_stop_string_truncates_output(llm):
    free = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=24,
                                                     ignore_eos=True))[0].outputs[0]
    assert len(free.text) > 6
    stop = free.text[3:6]  # a stop string that may span tokens
    (out,) = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=24,
                                                      ignore_eos=True, stop=[stop]))
    completion = out.outputs[0]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    assert completion.text == free.text[:free.text.index(stop)]
    (kept,) = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=24,
                                                       ignore_eos=True, stop=[stop],
                                                       include_stop_str_in_output=True))
    assert kept.outputs[0].text == free.text[:free.text.index(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    free = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=12,
                                                     ignore_eos=True))[0].outputs[0]
    stop_token = free.token_ids[4]
    first = free.token_ids.index(stop_token)
    (out,) = llm.generate("Once upon", SamplingParams(temperature=0, max_tokens=12,
                                                      stop_token_ids=[stop_token]))
    assert out.outputs[0].token_ids == free.token_ids[:first + 1]
    assert out.outputs[0].finish_reason == "stop"
    assert out.outputs[0].stop_reason == stop_token


def test_eos_ends_generation_unless_ignored(tiny_model_dir, llm):
    eos = 1
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    prompt = {"prompt_token_ids": [10, 20, 30]}
    free = llm.generate(prompt, params)[0].outputs[0].token_ids
    # Bias nothing: instead check the engine stops at an EOS it samples, by declaring the
    # first generated token an EOS through stop_token_ids semantics of min_tokens.
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, min_tokens=10,
                                              stop_token_ids=[free[0]]))[0].outputs[0]
    assert len(out.token_ids) == 10  # min_tokens masks the stop token until 10 tokens
    assert free[0] not in out.token_ids[:-1] or out.finish_reason == "length"
    assert eos in llm.llm_engine.eos_token_ids


def test_chat_uses_the_chat_template(llm):
    messages = [{"role": "user", "content": "Hi!"}]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    (out,) = llm.chat(messages, params)
    tokenizer = llm.get_tokenizer()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.prompt_token_ids == tokenizer.encode(text, add_special_tokens=False)
    assert "<|im_start|>assistant" in text
    assert len(out.outputs[0].token_ids) == 4


@pytest.mark.parametrize("make,field", [
    (lambda: SamplingParams(max_tokens=-1), "max_tokens"),
    (lambda: SamplingParams(top_p=1.5), "top_p"),
    (lambda: SamplingParams(top_p=0.0), "top_p"),
    (lambda: SamplingParams(temperature=-0.1), "temperature"),
    (lambda: SamplingParams(top_k=-2), "top_k"),
    (lambda: SamplingParams(min_p=2.0), "min_p"),
    (lambda: SamplingParams(logprobs=1000), "logprobs"),
    (lambda: SamplingParams(stop=[""]), "stop"),
    (lambda: SamplingParams(n=0), "n"),
    (lambda: SamplingParams(min_tokens=5, max_tokens=2), "min_tokens"),
    (lambda: SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
])
def test_bad_sampling_params_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bad_prompts_are_clear_errors(llm):
    params = SamplingParams(max_tokens=4)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate("", params)
    with pytest.raises(ValueError, match="prompt must not be empty"):
        llm.generate({"prompt_token_ids": []}, params)
    too_long = [10] * llm.llm_engine.max_model_len
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": too_long}, params)
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": [1, 2, 10**9]}, params)
    with pytest.raises(ValueError, match="prompt must not be empty"):  # a bad one in a batch
        llm.generate(["fine", "also fine", ""], params)
    assert not llm.llm_engine.has_unfinished_requests()


def test_bad_model_options_are_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="not a directory"):
        LLM(model=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has no config.json"):
        LLM(model=str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        LLM(model=str(tiny_model_dir("llama")), dtype="int3")
    with pytest.raises(ValueError, match="unknown LLM option"):
        LLM(model=str(tiny_model_dir("llama")), frobnicate=True)


def test_low_precision_runs(tiny_model_dir):
    llm = LLM(model=str(tiny_model_dir("qwen3")), dtype="bfloat16", device="cpu")
    (out,) = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 5
    assert llm.llm_engine.executors[0].dtype == torch.bfloat16


def test_huge_integers_in_float_fields_are_value_errors():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=10**400)


def test_vllm_options_that_would_change_nothing_are_accepted_and_the_rest_raise(tiny_model_dir,
                                                                                caplog):
    directory = str(tiny_model_dir("llama"))
    for option, value, reason in [("tensor_parallel_size", 2, "by layers, not tensors"),
                                  ("pipeline_parallel_size", 3, "stage_layers"),
                                  ("swap_space", 4, "never swapped"),
                                  ("enable_prefix_caching", True, "not implemented"),
                                  ("gpu_memory_utilization", 1.5, "fraction")]:
        with pytest.raises(ValueError, match=f"{option}.*{reason}|{reason}"):
            LLM(model=directory, dtype="float32", **{option: value})
    with caplog.at_level("INFO", logger="molink.entrypoints.llm"):
        llm = LLM(model=directory, dtype="float32", tensor_parallel_size=1, swap_space=0,
                  trust_remote_code=True, enforce_eager=True, gpu_memory_utilization=0.9)
    assert "trust_remote_code=True has no effect" in caplog.text
    assert llm.generate("hi", SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_prompt_logprobs_are_the_models_own(tiny_model_dir):
    """vLLM's prompt_logprobs: each prompt token's logprob given the tokens before it, as
    ``transformers`` computes it, with its rank and the top 3, also when the prompt is
    computed in chunks (16 tokens a step: this 40-token prompt takes three)."""
    directory = str(tiny_model_dir("llama"))
    chunked = LLM(model=directory, dtype="float32", device="cpu", block_size=8,
                  max_num_batched_tokens=16)
    ids = [(7 * i + 5) % 200 + 3 for i in range(40)]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=3)
    (output,) = chunked.generate([{"prompt_token_ids": ids}], params)
    model = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)  # [40, vocab]
    assert len(output.prompt_logprobs) == len(ids) and output.prompt_logprobs[0] is None
    for position in range(1, len(ids)):
        entry, row = output.prompt_logprobs[position], want[position - 1]
        token = ids[position]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[token].rank == int((row > row[token] + 1e-4).sum()) + 1
        top = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank <= 3)
        assert [t for _, t in top] == row.topk(3).indices.tolist()
        assert len(entry) == 3 + (entry[token].rank > 3)
    # the answer itself is not changed by asking
    plain = chunked.generate([{"prompt_token_ids": ids}], params.replace(prompt_logprobs=None))
    assert plain[0].outputs[0].token_ids == output.outputs[0].token_ids
    assert plain[0].prompt_logprobs is None
