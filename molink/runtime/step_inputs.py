"""StepInputs: the tensors one step of a plan needs, built once and shared by all layers.

The step's tokens are laid out flat, request after request, in plan order::

    batch:      A (prefill chunk, 3 tokens)   B (decode)   C (decode)
    flat rows:  0 1 2                         3            4
    groups:     [A: rows 0..2]  [B, C: rows 3, 4 padded to one query each]

Single-token queries share one batched attention call; each longer chunk gets its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molink.messages import BatchEntry
from molink.model.layers.attention import AttentionGroup, AttentionMetadata
from molink.model.layers.state import StateMetadata


@dataclass
class StepInputs:
    positions: torch.Tensor  # [T] long
    input_ids: torch.Tensor | None  # [T] long, first stage only
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [S] long: flat row of the last token of each sampled entry
    sample_request_ids: list[str]


def build_step_inputs(batch: list[BatchEntry], token_ids: dict[str, list[int]],
                      block_ids: dict[str, list[int]], block_size: int, device: torch.device,
                      with_input_ids: bool,
                      state_slots: dict[str, int] | None = None) -> StepInputs:
    """``state_slots``: request id -> state slot on this stage, for models with state layers."""
    positions: list[int] = []
    slots: list[int] = []
    ids: list[int] = []
    row_ranges: list[tuple[int, int]] = []
    sample_rows: list[int] = []
    for entry in batch:
        first_row = len(positions)
        table = block_ids[entry.request_id]
        end = entry.start + entry.num_tokens
        for pos in range(entry.start, end):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        positions.extend(range(entry.start, end))
        if with_input_ids:
            ids.extend(token_ids[entry.request_id][entry.start:end])
        row_ranges.append((first_row, len(positions)))
        if entry.sample:
            sample_rows.append(len(positions) - 1)
    groups = _attention_groups(batch, row_ranges, block_ids, block_size, len(positions))
    as_long = dict(dtype=torch.long)
    return StepInputs(
        positions=torch.tensor(positions, **as_long).to(device),
        input_ids=torch.tensor(ids, **as_long).to(device) if with_input_ids else None,
        meta=AttentionMetadata(slot_mapping=torch.tensor(slots, **as_long).to(device),
                               groups=[_to_device(g, device) for g in groups],
                               state=_state_metadata(batch, row_ranges, state_slots)),
        sample_rows=torch.tensor(sample_rows, **as_long).to(device),
        sample_request_ids=[e.request_id for e in batch if e.sample],
    )


def _state_metadata(batch, row_ranges, state_slots) -> StateMetadata | None:
    if state_slots is None:
        return None
    return StateMetadata(slots=[state_slots[e.request_id] for e in batch],
                         row_ranges=list(row_ranges), resets=[e.start == 0 for e in batch])


def _attention_groups(batch, row_ranges, block_ids, block_size, num_rows) -> list[AttentionGroup]:
    decode = [i for i, e in enumerate(batch) if e.num_tokens == 1]
    groups = [_group([batch[i] for i in decode], [row_ranges[i] for i in decode],
                     block_ids, block_size, num_rows)] if decode else []
    for i, entry in enumerate(batch):
        if entry.num_tokens > 1:
            groups.append(_group([entry], [row_ranges[i]], block_ids, block_size, num_rows))
    return groups


def _group(entries: list[BatchEntry], ranges, block_ids, block_size: int,
           pad_row: int) -> AttentionGroup:
    """Pad the entries' queries and block tables to common lengths (pad row = ``pad_row``)."""
    max_q = max(e.num_tokens for e in entries)
    max_blocks = max(-(-(e.start + e.num_tokens) // block_size) for e in entries)
    token_index, valid, query_pos, tables = [], [], [], []
    for entry, (lo, hi) in zip(entries, ranges):
        pad = max_q - (hi - lo)
        token_index.append(list(range(lo, hi)) + [pad_row] * pad)
        valid.append([True] * (hi - lo) + [False] * pad)
        query_pos.append(list(range(entry.start, entry.start + entry.num_tokens)) + [0] * pad)
        needed = block_ids[entry.request_id][:max_blocks]
        tables.append(needed + [0] * (max_blocks - len(needed)))
    return AttentionGroup(
        token_index=torch.tensor(token_index, dtype=torch.long),
        valid_queries=torch.tensor(valid, dtype=torch.bool),
        query_positions=torch.tensor(query_pos, dtype=torch.long),
        block_tables=torch.tensor(tables, dtype=torch.long),
        num_keys=max_blocks * block_size,
    )


def _to_device(group: AttentionGroup, device: torch.device) -> AttentionGroup:
    if device.type == "cpu":
        return group
    return AttentionGroup(
        token_index=group.token_index.to(device),
        valid_queries=group.valid_queries.to(device),
        query_positions=group.query_positions.to(device),
        block_tables=group.block_tables.to(device),
        num_keys=group.num_keys,
    )
