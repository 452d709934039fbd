"""transformers loading the GGUF (the reference; it also writes the bf16 directory), and MoLink
in this process: greedy tokens and prompt logits."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.gguf_smollm2.common import MAX_TOKENS, log


def transformers_reference(path: Path, prompts: list[list[int]], dense_dir: Path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    log("transformers: loading the GGUF (dequantized to float32)")
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens, logits = [], []
    start = time.perf_counter()
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            mask = torch.ones_like(x)  # explicit: the pad id is <|im_end|>
            logits.append(model(x, attention_mask=mask).logits[0])
            out = model.generate(x, attention_mask=mask, max_new_tokens=MAX_TOKENS,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id)
            tokens.append(out[0, len(ids):].tolist())
    log(f"transformers: 5 greedy generations in {time.perf_counter() - start:.1f} s")
    log(f"writing the dequantized weights as bf16 safetensors to {dense_dir}")
    model.to(torch.bfloat16).save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    return tokens, logits


# ---- MoLink in this process: greedy tokens and prompt logits ---------------------------------

def molink_single(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    from molink import LLM, SamplingParams

    log("MoLink single process: loading the GGUF (float32 compute)")
    llm = LLM(model=str(path), dtype="float32", device="cpu")
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    log(f"MoLink single process: 5 greedy generations (batched) in "
        f"{time.perf_counter() - start:.1f} s")
    return [o.outputs[0].token_ids for o in outs]


@torch.no_grad()
def molink_prompt_logits(path: Path, ranges, prompts: list[list[int]]) -> list[torch.Tensor]:
    from molink.messages import BatchEntry
    from molink.model.loader import load_model
    from molink.runtime.kv_cache import allocate_kv_cache
    from molink.runtime.step_inputs import build_step_inputs

    cpu, block = torch.device("cpu"), 16
    stages = []
    for start, end in ranges:
        model, _ = load_model(str(path), start, end, "float32", cpu)
        allocate_kv_cache(model.attention_layers(), 16, block, torch.float32, cpu)
        stages.append(model)
    result = []
    for ids in prompts:
        blocks = list(range(-(-len(ids) // block)))
        hidden = None
        for stage in stages:
            inputs = build_step_inputs([BatchEntry("r", 0, len(ids), True)], {"r": ids},
                                       {"r": blocks}, block, cpu, with_input_ids=stage.is_first)
            hidden = stage(inputs.positions, inputs.meta, input_ids=inputs.input_ids,
                           hidden_states=hidden)
        result.append(stages[-1].compute_logits(hidden))
    return result
