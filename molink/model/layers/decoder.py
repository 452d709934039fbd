"""The Llama-like decoder over a layer range, with the parts architectures swap.

Llama, Mistral, Qwen2/3, the MoE decoders, Gemma 1/2/3, Cohere, GLM-4 and Phi-3 are one
decoder that differs in a handful of parts: the norm, where the norms sit in a block, how
attention scores are scaled or soft-capped, the rotary convention, and what happens to the
embeddings and logits. ``DecoderParts`` names those parts (the defaults are Llama's); a
model class says which it uses (``decoder_parts``). Block layouts::

    sequential (Llama, GLM, Phi-3):  h = h + attn(n1(h));       h = h + mlp(n2(h))
    sandwich   (Gemma 2, Gemma 3):   h = h + n2(attn(n1(h)));   h = h + n4(mlp(n3(h)))
    parallel   (Cohere):             x = n1(h);  h = h + attn(x) + mlp(x)
    parallel_sum (Phi):              x = n1(h);  h = h + (attn(x) + mlp(x))

Parameter names equal the Hugging Face checkpoint names (``model.layers.12.mlp.up_proj``),
except projections fused here and read from their parts (``qkv_proj`` <- q/k/v_proj). Across
a hop only the hidden state travels: each layer adds its residual, so no separate residual
tensor exists (one tensor per token per hop).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.alibi import alibi_slopes
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.cpu_linear import HALF_DTYPES
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import (
    RotaryEmbedding,
    apply_interleaved_rotary,
    apply_partial_rotary,
    apply_rotary,
    interleave_rotary_tables,
)
from molink.model.layers.stage_model import (
    DEFAULT_NAMES,
    BodyNames,
    StageBody,
    StageModel,
    register_as,
)

SEQUENTIAL, SANDWICH = "sequential", "sandwich"
PARALLEL, PARALLEL_SUM = "parallel", "parallel_sum"
DEFAULT_ROPE = "rope"

# Our fused projection -> the checkpoint's separate ones (concatenated along dim 0).
QKV_FROM_PARTS = (".qkv_proj.", (".q_proj.", ".k_proj.", ".v_proj."))
FUSED_PROJECTIONS = (QKV_FROM_PARTS, (".gate_up_proj.", (".gate_proj.", ".up_proj.")))


@dataclass(frozen=True)
class DecoderParts:
    """What sets one Llama-like architecture apart; the defaults are Llama's."""

    norm: Callable[[int], nn.Module]  # hidden_size -> norm module (eps already bound)
    layout: str = SEQUENTIAL  # SEQUENTIAL | SANDWICH | PARALLEL | PARALLEL_SUM
    qk_norm: Callable[[int, int], nn.Module] | None = None  # (num_heads, head_dim) -> module
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_softcap: float | None = None  # tanh soft-capping of attention scores (Gemma 2)
    attention_sinks: bool = False  # one learned sink logit per head (gpt-oss)
    alibi: bool = False  # ALiBi biases instead of RoPE (Baichuan 13B)
    rope_interleaved: bool = False  # rotate-every-two pairs (Cohere, GLM) instead of halves
    rope_in_fp32: bool = False  # rotate q/k in float32, cast back (Qwen 1, Baichuan, Cohere)
    round_rope_tables: bool = False  # fp32 rotation with tables rounded to the dtype (Cohere)
    embed_scale: float | None = None  # embeddings times this, rounded to the model dtype (Gemma)
    logit_scale: float | None = None  # logits times this (Cohere)
    final_softcap: float | None = None  # tanh soft-capping of logits (Gemma 2/3)
    # Projections the checkpoint stores already fused ("qkv_proj", "gate_up_proj").
    fused_in_checkpoint: frozenset[str] = frozenset()


def rms_norm(cfg: ArchConfig) -> Callable[[int], nn.Module]:
    return functools.partial(RMSNorm, eps=cfg.rms_norm_eps)


def head_rms_norm(cfg: ArchConfig) -> Callable[[int, int], nn.Module]:
    """(num_heads, head_dim) -> an RMSNorm over each head's dims."""
    return lambda num_heads, head_dim: RMSNorm(head_dim, cfg.rms_norm_eps)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), in Hugging Face's operation order."""
    return torch.tanh(x / cap) * cap


class RotaryAttention(nn.Module):
    """Fused q/k/v projection, optional per-head q/k norm, RoPE (or ALiBi), paged attention,
    output projection.

    ``qkv_proj_name``, ``o_proj_name`` and ``qk_norm_names`` are the checkpoint's names for
    those modules (Phi: ``dense``, ``q_layernorm`` / ``k_layernorm``; Qwen 1: ``c_attn``,
    ``c_proj``; Baichuan: ``W_pack``).
    """

    qkv_proj_name = "qkv_proj"
    o_proj_name = "o_proj"
    qk_norm_names = ("q_norm", "k_norm")

    def __init__(self, cfg: ArchConfig, layer: int, parts: DecoderParts) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        # Registered under the checkpoint's names; the forward pass uses plain handles.
        # q, k and v in one matmul (rows q | k | v; Llama: filled from q_proj, k_proj, v_proj).
        register_as(self, self.qkv_proj_name, "_qkv_proj", nn.Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias))
        register_as(self, self.o_proj_name, "_out_proj",
                    nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias))
        self.has_qk_norm = parts.qk_norm is not None
        if self.has_qk_norm:
            q_name, k_name = self.qk_norm_names
            register_as(self, q_name, "_q_norm", parts.qk_norm(self.num_heads, self.head_dim))
            register_as(self, k_name, "_k_norm", parts.qk_norm(self.num_kv_heads, self.head_dim))
        # ALiBi: no rotation; the attention adds per-head distance biases instead.
        self.rotate = None if parts.alibi else _rotate_fn(parts, cfg.rotary_dim, self.head_dim)
        self.rope_in_fp32, self.round_rope_tables = parts.rope_in_fp32, parts.round_rope_tables
        self.rope_kernel = None  # fused16's kernels (use_cpu_operators)
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if parts.attention_sinks else None
        scale = self.head_dim**-0.5 if parts.attn_scale is None else parts.attn_scale
        slopes = alibi_slopes(self.num_heads) if parts.alibi else None
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim, scale=scale,
                                   window=cfg.window_of(layer), softcap=parts.attn_softcap,
                                   alibi_slopes=slopes)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self._qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.has_qk_norm:
            q, k = self._q_norm(q), self._k_norm(k)
        if self.rotate is not None and self._rope_in_place(q, k, cos):
            self.rope_kernel.rotary(q, cos, sin)  # in the qkv output: same roundings
            self.rope_kernel.rotary(k, cos, sin)
        elif self.rotate is not None:
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        return self._out_proj(self.attn(q, k, v, meta, sinks=self.sinks))

    def _rope_in_place(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> bool:
        """Whether fused16's rotary kernel (``use_cpu_operators``) computes this rotation:
        16-bit q and k whose heads lie side by side in each row, full-width float32 tables."""
        return (self.rope_kernel is not None and self.rotate is apply_rotary
                and not self.rope_in_fp32 and q.dtype in HALF_DTYPES
                and q.shape[-1] % 16 == 0 and cos.shape[-1] == q.shape[-1]
                and cos.dtype == torch.float32 and cos.is_contiguous()
                and all(t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (q, k)))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if not self.rope_in_fp32:
            return self.rotate(x, cos, sin)
        if self.round_rope_tables:  # tables rounded to the model dtype first (as HF Cohere)
            cos, sin = cos.to(x.dtype).float(), sin.to(x.dtype).float()
        return self.rotate(x.float(), cos, sin).to(x.dtype)


def _rotate_fn(parts: DecoderParts, rotary_dim: int | None, head_dim: int):
    if parts.rope_interleaved:
        return apply_interleaved_rotary
    if rotary_dim is None or rotary_dim == head_dim:
        return apply_rotary
    return apply_partial_rotary


class DecoderLayer(nn.Module):
    """One block in the layout ``parts.layout``; MoE models override ``build_mlp``."""

    def __init__(self, cfg: ArchConfig, layer: int, parts: DecoderParts) -> None:
        super().__init__()
        self.layout = parts.layout
        self.sequential = parts.layout == SEQUENTIAL
        self.parallel = parts.layout in (PARALLEL, PARALLEL_SUM)
        self.sum_branches_first = parts.layout == PARALLEL_SUM
        hidden = cfg.hidden_size
        self.input_layernorm = parts.norm(hidden)
        self.self_attn = self.build_attention(cfg, layer, parts)
        if not self.parallel:
            self.post_attention_layernorm = parts.norm(hidden)
        if parts.layout == SANDWICH:
            self.pre_feedforward_layernorm = parts.norm(hidden)
            self.post_feedforward_layernorm = parts.norm(hidden)
        self.mlp = self.build_mlp(cfg, layer)

    def build_attention(self, cfg: ArchConfig, layer: int, parts: DecoderParts) -> nn.Module:
        return RotaryAttention(cfg, layer, parts)

    def build_mlp(self, cfg: ArchConfig, layer: int) -> nn.Module:
        """The feed-forward block of ``layer``; MoE models return a sparse block here."""
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        if self.parallel:
            x = self.input_layernorm(h)
            if self.sum_branches_first:
                return h + (self.self_attn(x, cos, sin, meta) + self.mlp(x))
            return h + self.self_attn(x, cos, sin, meta) + self.mlp(x)
        attn = self.self_attn(self.input_layernorm(h), cos, sin, meta)
        if self.sequential:
            h = h + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(attn)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def use_cpu_operators(model: nn.Module, kernel) -> int:
    """Let ``model``'s RMSNorms, rotate-half RoPE and SwiGLU gates run through fused16's
    operators (``kernel``: ``fused16.kernels()``) on 16-bit activations: one call each
    instead of 3-18 PyTorch operators, in the same operation order and roundings (up to
    float32 summation order and ``exp``'s last bit). How many modules."""
    count = 0
    for module in model.modules():
        if type(module) is RMSNorm or isinstance(module, GatedMLP):
            module.kernel = kernel
        elif isinstance(module, RotaryAttention):
            module.rope_kernel = kernel
        else:
            continue
        count += 1
    return count


class DecoderBody(StageBody):
    """``model.*`` of the checkpoint: embeddings, a range of layers, final norm.

    ``rotaries`` holds the step's rotary tables by key; layer ``i`` rotates with
    ``rope_keys[i]`` (Gemma 3: local and global layers use different thetas).
    """

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int, parts: DecoderParts,
                 layer_cls: type[DecoderLayer], rotaries: dict[str, RotaryEmbedding],
                 rope_keys: dict[int, str], names: BodyNames = DEFAULT_NAMES) -> None:
        super().__init__(cfg, start_layer, end_layer, lambda i: layer_cls(cfg, i, parts),
                         lambda: parts.norm(cfg.hidden_size), names)
        self.embed_scale = parts.embed_scale
        self.rope_interleaved = parts.rope_interleaved
        # A plain dict (no parameters): only the tables this stage's layers use.
        self.rotaries = {key: rotaries[key] for key in set(rope_keys.values())}
        self.layer_keys = [rope_keys[i] for i in range(start_layer, end_layer)]

    # decode_layers.DecodeLayers where a decode step runs the layers in one call
    # (use_decode_layers; one rotary table)
    decode_layers = None

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(input_ids, positions) if self.is_first else hidden_states  # [T, hidden]
        tables = {key: self._tables(rotary, positions) for key, rotary in self.rotaries.items()}
        at_once = None if self.decode_layers is None else self.decode_layers(
            h, *tables[self.layer_keys[0]], meta)
        if at_once is not None:
            h = at_once
        else:
            for layer, key in zip(self.layer_list, self.layer_keys):
                h = layer(h, *tables[key], meta)
        return self.final_norm(h) if self.is_last else h

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embedding(input_ids)
        if self.embed_scale is None:
            return h
        # The scale is rounded (via fp32, as HF) to the model dtype before multiplying:
        # sqrt(3072) is 55.5 in bf16.
        scale = torch.tensor(self.embed_scale, dtype=torch.float32, device=h.device)
        return h * scale.to(h.dtype)

    def _tables(self, rotary: RotaryEmbedding, positions: torch.Tensor):
        cos, sin = rotary.cos_sin(positions)  # [T, 1, rotary_dim] each
        return interleave_rotary_tables(cos, sin) if self.rope_interleaved else (cos, sin)


class DecoderLM(StageModel):
    """A causal LM restricted to ``[start_layer, end_layer)``; the base of every Llama-like model.

    Subclasses define ``arch_config`` and, where they differ from Llama, ``decoder_parts``
    and ``layer_cls``; those whose layers rotate with different tables override
    ``rotaries`` and ``rope_key``.
    """

    layer_cls: type[DecoderLayer] = DecoderLayer
    body_names = DEFAULT_NAMES

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        self.parts = self.decoder_parts(cfg)  # a plain attribute: set before nn.Module's init
        super().__init__(cfg, start_layer, end_layer)
        self.checkpoint_splits = tuple((ours, theirs) for ours, theirs in FUSED_PROJECTIONS
                                       if ours.strip(".") not in self.parts.fused_in_checkpoint)

    def build_body(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> DecoderBody:
        rope_keys = {i: self.rope_key(cfg, i) for i in range(start_layer, end_layer)}
        return DecoderBody(cfg, start_layer, end_layer, self.parts, self.layer_cls,
                           self.rotaries(cfg), rope_keys, self.body_names)

    @staticmethod
    def decoder_parts(cfg: ArchConfig) -> DecoderParts:
        """Llama's parts; with ``cfg.qk_norm`` an RMSNorm on each q/k head (Qwen3)."""
        return DecoderParts(norm=rms_norm(cfg), qk_norm=head_rms_norm(cfg) if cfg.qk_norm else None)

    @staticmethod
    def rotaries(cfg: ArchConfig) -> dict[str, RotaryEmbedding]:
        """Rotary tables by key; the default is one table over ``cfg.rotary_dim`` dims."""
        rotary_dim = cfg.rotary_dim or cfg.head_dim
        return {DEFAULT_ROPE: RotaryEmbedding(rotary_dim, cfg.rope_theta, cfg.rope_scaling)}

    @staticmethod
    def rope_key(cfg: ArchConfig, layer: int) -> str:
        return DEFAULT_ROPE

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32; scaling and soft-capping in the model dtype."""
        if self.parts.logit_scale is None and self.parts.final_softcap is None:
            return super().compute_logits(hidden_states)
        logits = self.lm_head(hidden_states)
        if self.parts.logit_scale is not None:
            logits = logits * self.parts.logit_scale
        if self.parts.final_softcap is not None:
            logits = softcap(logits, self.parts.final_softcap)
        return logits.float()
