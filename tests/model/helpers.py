"""Running a loaded MoLink model directly (no scheduler) to read its logits."""

from __future__ import annotations

import torch

from molink.messages import BatchEntry
from molink.model.loader import load_model
from molink.runtime.kv_cache import allocate_kv_cache
from molink.runtime.state_cache import StateCache, state_layers_of
from molink.runtime.step_inputs import build_step_inputs

CPU = torch.device("cpu")


def load_stages(directory, ranges: list[tuple[int, int | None]], block_size: int = 4,
                num_blocks: int = 64):
    stages = []
    for start, end in ranges:
        model, _ = load_model(str(directory), start, end, "float32", CPU)
        allocate_kv_cache(model.attention_layers(), num_blocks, block_size, torch.float32, CPU)
        if state_layers_of(model):  # state-space layers: one slot, for request "r"
            StateCache(state_layers_of(model), 1, torch.float32, CPU)
        stages.append(model)
    return stages


@torch.no_grad()
def prompt_logits(stages, token_ids: list[int], chunks: list[int] | None = None,
                  block_size: int = 4) -> torch.Tensor:
    """Logits for every prompt position, computing the prompt in ``chunks`` (sizes)."""
    chunks = chunks or [len(token_ids)]
    num_blocks_needed = -(-len(token_ids) // block_size)
    blocks = list(range(num_blocks_needed - 1, -1, -1))  # deliberately not in order
    start, logits = 0, []
    for size in chunks:
        entry = BatchEntry("r", start, size, True)
        hidden = None
        for stage in stages:
            inputs = build_step_inputs([entry], {"r": token_ids}, {"r": blocks}, block_size, CPU,
                                       with_input_ids=stage.is_first, state_slots={"r": 0})
            hidden = stage(inputs.positions, inputs.meta, input_ids=inputs.input_ids,
                           hidden_states=hidden)
        logits.append(stages[-1].compute_logits(hidden))
        start += size
    return torch.cat(logits)  # [len(token_ids), vocab]
