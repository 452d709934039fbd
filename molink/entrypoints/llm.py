"""``LLM``: the offline Python API, call-compatible with vLLM's.

    from molink import LLM, SamplingParams
    llm = LLM(model="/path/to/hf-model", dtype="float32")  # or a Hub repo id: "org/name"
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outputs[0].outputs[0].text)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from molink.config import CacheConfig, ModelConfig, SchedulerConfig
from molink.coordinator.llm_engine import LLMEngine
from molink.model.hub import resolve_model
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class LLM:
    """Generate text with a model held in this process (optionally as chained layer ranges)."""

    def __init__(self, model: str, *, tokenizer: str | None = None, dtype: str = "auto",
                 device: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 quantization: str | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory_bytes: int | None = None,
                 gpu_memory_utilization: float | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 2048, enable_chunked_prefill: bool = True,
                 stage_layers: list[tuple[int, int]] | None = None, **unsupported) -> None:
        _check_vllm_options(unsupported)
        model = resolve_model(model)  # a Hub repo id: fetched whole into the local cache
        if tokenizer is not None:
            tokenizer = resolve_model(tokenizer, weights=False)
        model_config = ModelConfig(model=model, tokenizer=tokenizer, dtype=dtype, device=device,
                                   seed=seed, max_model_len=max_model_len,
                                   quantization=quantization)
        cache_config = CacheConfig(block_size=block_size, num_blocks=num_kv_blocks,
                                   kv_cache_memory_bytes=kv_cache_memory_bytes,
                                   gpu_memory_utilization=gpu_memory_utilization)
        scheduler_config = SchedulerConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len or 10**9, enable_chunked_prefill=enable_chunked_prefill)
        self.llm_engine = LLMEngine(model_config, cache_config, scheduler_config, stage_layers)
        self._next_id = 0

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate for one prompt or a list; returns one RequestOutput per prompt, in order.

        A prompt is a string, ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}``.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = _as_params_list(sampling_params, len(prompt_list))
        groups: list[list[str]] = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                groups.append(self._add(prompt, params))
        except ValueError:  # one bad prompt: queue none of them
            self.llm_engine.abort_request([rid for ids in groups for rid in ids])
            raise
        finished = self._run_to_completion()
        return [_merge([finished[rid] for rid in ids]) for ids in groups]

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, chat_template: str | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list, then generate."""
        conversations = _as_conversations(messages)
        tokenizer = self.get_tokenizer()
        if chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=...")
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, chat_template=chat_template,
                                                 add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt_token_ids": ids, "prompt": text})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    # ---- helpers ------------------------------------------------------------------------

    def _add(self, prompt: dict, params: SamplingParams) -> list[str]:
        """Queue ``params.n`` requests for one prompt; returns their ids."""
        ids = []
        for index in range(params.n):
            child = params if params.n == 1 else params.replace(
                n=1, seed=None if params.seed is None else params.seed + index)
            request_id = f"{self._next_id}" if params.n == 1 else f"{self._next_id}-{index}"
            source = prompt.get("prompt_token_ids", prompt.get("prompt"))
            self.llm_engine.add_request(request_id, source, child)
            ids.append(request_id)
        self._next_id += 1
        return ids

    def _run_to_completion(self) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        engine = self.llm_engine
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return finished


def _merge(outputs: list[RequestOutput]) -> RequestOutput:
    """Children of an ``n > 1`` request become one RequestOutput with n completions."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    completions = []
    for index, output in enumerate(outputs):
        completion = output.outputs[0]
        completion.index = index
        completions.append(completion)
    return RequestOutput(request_id=first.request_id.rsplit("-", 1)[0], prompt=first.prompt,
                         prompt_token_ids=first.prompt_token_ids, outputs=completions,
                         finished=True)


def _as_prompt_list(prompts) -> list[dict]:
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a string, a dict or a non-empty list of them")
    result = []
    for prompt in prompts:
        if isinstance(prompt, str):
            result.append({"prompt": prompt})
        elif isinstance(prompt, dict) and ("prompt_token_ids" in prompt or "prompt" in prompt):
            result.append(prompt)
        else:
            raise ValueError(
                "each prompt must be a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}"
            )
    return result


def _as_params_list(params, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    for item in params:
        if not isinstance(item, SamplingParams):
            raise ValueError(  # noqa: TRY004 - vLLM's LLM raises ValueError for bad input
                f"sampling_params must be SamplingParams, got {type(item).__name__}")
    return params


def _as_conversations(messages) -> list[list[dict]]:
    if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
        return [list(messages)]
    if isinstance(messages, (list, tuple)) and messages and all(
            isinstance(conv, (list, tuple)) for conv in messages):
        return [list(conv) for conv in messages]
    raise ValueError("messages must be a list of {'role', 'content'} dicts or a list of such lists")


# vLLM options that mean nothing here, or only what MoLink does anyway: accepted, logged.
_VLLM_NO_OPS = {"trust_remote_code": ("no remote code ever runs; supported families load "
                                      "without it"),
                "enforce_eager": "MoLink runs eagerly", "disable_log_stats": "",
                "disable_custom_all_reduce": "", "max_seq_len_to_capture": ""}
# vLLM options MoLink does not implement: accepted only at the value that asks for nothing.
_VLLM_UNSUPPORTED = {
    "tensor_parallel_size": (1, ("MoLink splits a model by layers, not tensors: give "
                                "stage_layers here, or run molink serve + molink join")),
    "pipeline_parallel_size": (1, "give stage_layers=[(0, k), (k, n), ...] instead"),
    "swap_space": (0, "KV blocks are never swapped to CPU memory"),
    "cpu_offload_gb": (0, "weights are never offloaded; split the layers over more nodes"),
    "enable_prefix_caching": (False, "prefix caching is not implemented"),
    "speculative_config": (None, "speculative decoding is not implemented"),
}


def _check_vllm_options(options: dict) -> None:
    """vLLM's options: a no-op is logged; an unsupported value raises (never ignored)."""
    unknown = set(options) - set(_VLLM_NO_OPS) - set(_VLLM_UNSUPPORTED)
    if unknown:
        raise ValueError(f"unknown LLM option(s): {', '.join(sorted(unknown))}")
    for name, value in options.items():
        if name in _VLLM_NO_OPS:
            logger.info("LLM option %s=%r has no effect: %s", name, value,
                        _VLLM_NO_OPS[name] or "not applicable")
            continue
        accepted, why = _VLLM_UNSUPPORTED[name]
        if value != accepted and not (accepted == 0 and value is None):
            raise ValueError(f"{name}={value!r} is not supported: {why}")
