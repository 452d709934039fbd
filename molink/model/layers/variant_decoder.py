"""VariantDecoderLM: the Llama decoder with some of its parts swapped, over a layer range.

Gemma 1/2/3, Cohere, GLM-4 and Phi-3 are Llama-like decoders that differ in a handful of
parts: the norm, where the norms sit in a block, how attention scores are scaled or
soft-capped, the rotary convention, and what happens to the logits. ``DecoderParts`` names
those parts; an architecture's model class says which it uses (``decoder_parts``) and
``VariantDecoderLM`` assembles the stage's layers from them. Block layouts::

    sequential (Gemma, GLM, Phi-3):  h = h + attn(n1(h));       h = h + mlp(n2(h))
    sandwich   (Gemma 2, Gemma 3):   h = h + n2(attn(n1(h)));   h = h + n4(mlp(n3(h)))
    parallel   (Cohere):             x = n1(h);  h = h + attn(x) + mlp(x)

As in ``DecoderLM``, parameter names equal the checkpoint names and only the hidden state
crosses a hop (residuals are added in place).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.decoder import FUSED_PROJECTIONS
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.rotary import (
    RotaryEmbedding,
    apply_interleaved_rotary,
    apply_partial_rotary,
    interleave_rotary_tables,
)

SEQUENTIAL, SANDWICH, PARALLEL = "sequential", "sandwich", "parallel"
DEFAULT_ROPE = "rope"


@dataclass(frozen=True)
class DecoderParts:
    """What sets one Llama-like architecture apart; the defaults are Llama's."""

    norm: Callable[[int], nn.Module]  # hidden_size -> norm module (eps already bound)
    layout: str = SEQUENTIAL  # SEQUENTIAL | SANDWICH | PARALLEL
    qk_norm: Callable[[int, int], nn.Module] | None = None  # (num_heads, head_dim) -> module
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # tanh soft-capping of attention scores (Gemma 2)
    o_proj_bias: bool = False
    embed_scale: float | None = None  # embeddings times this, rounded to the model dtype (Gemma)
    rope_interleaved: bool = False  # rotate-every-two pairs (Cohere, GLM) instead of halves
    rope_in_fp32: bool = False  # rotate q/k in float32 (Cohere)
    logit_scale: float | None = None  # logits times this (Cohere)
    final_softcap: float | None = None  # tanh soft-capping of logits (Gemma 2/3)
    # Projections the checkpoint stores already fused ("qkv_proj", "gate_up_proj").
    fused_in_checkpoint: frozenset[str] = frozenset()


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), in Hugging Face's operation order."""
    return torch.tanh(x / cap) * cap


class VariantAttention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k norm, RoPE, paged attention, o_proj."""

    def __init__(self, cfg: ArchConfig, layer: int, parts: DecoderParts) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                  bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=parts.o_proj_bias)
        self.has_qk_norm = parts.qk_norm is not None
        if self.has_qk_norm:
            self.q_norm = parts.qk_norm(self.num_heads, self.head_dim)
            self.k_norm = parts.qk_norm(self.num_kv_heads, self.head_dim)
        self.rotate = apply_interleaved_rotary if parts.rope_interleaved else apply_partial_rotary
        self.rope_in_fp32 = parts.rope_in_fp32
        scale = self.head_dim**-0.5 if parts.attn_scale is None else parts.attn_scale
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale=scale,
                                   window=cfg.window_of(layer), softcap=parts.attn_softcap)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not self.rope_in_fp32:
            return self.rotate(x, cos, sin)
        # Tables rounded to the model dtype first, then the rotation in float32 (as HF Cohere).
        cos, sin = cos.to(x.dtype).float(), sin.to(x.dtype).float()
        return self.rotate(x.float(), cos, sin).to(x.dtype)


class VariantLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int, parts: DecoderParts) -> None:
        super().__init__()
        self.layout = parts.layout
        hidden = cfg.hidden_size
        self.input_layernorm = parts.norm(hidden)
        self.self_attn = VariantAttention(cfg, layer, parts)
        if self.layout != PARALLEL:
            self.post_attention_layernorm = parts.norm(hidden)
        if self.layout == SANDWICH:
            self.pre_feedforward_layernorm = parts.norm(hidden)
            self.post_feedforward_layernorm = parts.norm(hidden)
        self.mlp = GatedMLP(hidden, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        if self.layout == PARALLEL:
            x = self.input_layernorm(h)
            return h + self.self_attn(x, cos, sin, meta) + self.mlp(x)
        attn = self.self_attn(self.input_layernorm(h), cos, sin, meta)
        if self.layout == SEQUENTIAL:
            h = h + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class VariantBody(nn.Module):
    """``model.*`` of the checkpoint: embeddings, a range of layers, final norm."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int, parts: DecoderParts,
                 rotaries: dict[str, RotaryEmbedding], rope_keys: dict[int, str]) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        if self.is_first:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_scale = parts.embed_scale
        self.rope_interleaved = parts.rope_interleaved
        # A plain dict (no parameters): each layer names the table it uses (Gemma 3: local
        # layers and global layers rotate with different thetas).
        self.rotaries = {key: rotaries[key] for key in set(rope_keys.values())}
        self.rope_keys = rope_keys
        self.layers = nn.ModuleDict(
            {str(i): VariantLayer(cfg, i, parts) for i in range(start_layer, end_layer)}
        )
        if self.is_last:
            self.norm = parts.norm(cfg.hidden_size)

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        h = self._embed(input_ids) if self.is_first else hidden_states  # [T, hidden]
        tables = {key: self._tables(rotary, positions) for key, rotary in self.rotaries.items()}
        for index, layer in self.layers.items():
            cos, sin = tables[self.rope_keys[int(index)]]
            h = layer(h, cos, sin, meta)
        return self.norm(h) if self.is_last else h

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.embed_scale is None:
            return h
        # The scale is rounded (via fp32, as HF) to the model dtype before multiplying:
        # sqrt(3072) is 55.5 in bf16.
        scale = torch.tensor(self.embed_scale, dtype=torch.float32, device=h.device)
        return h * scale.to(h.dtype)

    def _tables(self, rotary: RotaryEmbedding, positions: torch.Tensor):
        cos, sin = rotary.cos_sin(positions)  # [T, 1, rotary_dim] each
        return interleave_rotary_tables(cos, sin) if self.rope_interleaved else (cos, sin)


class VariantDecoderLM(nn.Module):
    """A causal LM restricted to ``[start_layer, end_layer)``, built from ``decoder_parts``.

    Subclasses define ``arch_config`` and ``decoder_parts``; those whose layers rotate with
    different tables override ``rotaries`` and ``rope_key``.
    """

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.start_layer, self.end_layer = start_layer, end_layer
        self.parts = self.decoder_parts(cfg)
        rope_keys = {i: self.rope_key(cfg, i) for i in range(start_layer, end_layer)}
        self.model = VariantBody(cfg, start_layer, end_layer, self.parts, self.rotaries(cfg),
                                 rope_keys)
        self.is_first, self.is_last = self.model.is_first, self.model.is_last
        if self.is_last:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        raise NotImplementedError

    @staticmethod
    def rotaries(cfg: ArchConfig) -> dict[str, RotaryEmbedding]:
        """Rotary tables by key; the default is one table over ``extra["rotary_dim"]`` dims."""
        rotary_dim = cfg.extra.get("rotary_dim", cfg.head_dim)
        return {DEFAULT_ROPE: RotaryEmbedding(rotary_dim, cfg.rope_theta, cfg.rope_scaling)}

    @staticmethod
    def rope_key(cfg: ArchConfig, layer: int) -> str:
        return DEFAULT_ROPE

    def attention_layers(self) -> list[PagedAttention]:
        """This stage's attention modules in layer order (one KV cache each)."""
        return [m for m in self.modules() if isinstance(m, PagedAttention)]

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: normed final hidden states on the last stage, else the residual."""
        return self.model(positions, meta, input_ids=input_ids, hidden_states=hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32; scaling and soft-capping in the model dtype."""
        logits = self.lm_head(hidden_states)
        if self.parts.logit_scale is not None:
            logits = logits * self.parts.logit_scale
        if self.parts.final_softcap is not None:
            logits = softcap(logits, self.parts.final_softcap)
        return logits.float()

    def checkpoint_names(self, param_name: str) -> list[str]:
        """Checkpoint tensors that fill a parameter, concatenated along dim 0."""
        if param_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return ["model.embed_tokens.weight"]
        for fused, parts in FUSED_PROJECTIONS.items():
            if f".{fused}." in param_name and fused not in self.parts.fused_in_checkpoint:
                return [param_name.replace(f".{fused}.", f".{part}.") for part in parts]
        return [param_name]
