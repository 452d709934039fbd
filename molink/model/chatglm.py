"""ChatGLM2 / ChatGLM3 (``ChatGLMModel`` / ``ChatGLMForConditionalGeneration``), read natively.

These ``trust_remote_code`` checkpoints are a pre-norm decoder under their own names::

    transformer.embedding.word_embeddings
    transformer.encoder.layers.N.input_layernorm            RMSNorm (LayerNorm if not rmsnorm)
    transformer.encoder.layers.N.self_attention.query_key_value   fused q|k|v (bias: add_qkv_bias)
    transformer.encoder.layers.N.self_attention.dense       output projection
    transformer.encoder.layers.N.post_attention_layernorm
    transformer.encoder.layers.N.mlp.dense_h_to_4h          fused gate|up, SwiGLU
    transformer.encoder.layers.N.mlp.dense_4h_to_h
    transformer.encoder.final_layernorm                     (when post_layer_norm)
    transformer.output_layer                                LM head

Attention is multi-query (``multi_query_group_num`` k/v heads of ``kv_channels`` dims). Without
multi-query attention the fused rows are grouped per head instead: ``[head][q|k|v]``.

ChatGLM's rotary embedding differs from Llama's: it rotates only the FIRST HALF of each
head's dims, and it pairs ADJACENT dims (2i, 2i+1) rather than i and i + half::

    head dims:  [x0 x1 | x2 x3 | ... | x(r-2) x(r-1)] [x(r) ... x(D-1)]     r = D / 2
                 pair 0  pair 1        pair r/2-1      passed through unchanged
    pair i at position p is rotated by the angle p * theta_i,
    theta_i = (10000 * rope_ratio) ** (-2i / r)

Not supported: p-tuning prefixes (``pre_seq_len``) and quantised checkpoints
(``quantization_bit``); both are refused with a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.config_view import ConfigView
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.block import ResidualBlock
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import Fp32WeightRMSNorm
from molink.model.layers.rotary import RotaryEmbedding
from molink.model.layers.stage_model import BodyNames, StageBody, StageModel


@dataclass(frozen=True)
class ChatGLMOptions(FamilyOptions):
    multi_query_attention: bool  # else q|k|v rows grouped per head
    rmsnorm: bool  # else LayerNorm
    post_layer_norm: bool  # a final norm after the last layer
    apply_residual_connection_post_layernorm: bool


def apply_interleaved_half_rotary(x: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, 1, D // 4]. Rotates pairs (2i, 2i+1) of dims [0, D // 2)."""
    num_pairs = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, passed = x[..., :2 * num_pairs], x[..., 2 * num_pairs:]
    even, odd = rot[..., 0::2], rot[..., 1::2]  # [T, heads, D // 4] each
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return torch.cat((rotated.flatten(-2), passed), dim=-1)


def _norm(cfg: ArchConfig) -> nn.Module:
    if cfg.options.rmsnorm:
        return Fp32WeightRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class GLMSelfAttention(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.multi_query = cfg.options.multi_query_attention
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                         bias=cfg.attention_bias)
        self.dense = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scale=self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.query_key_value(x)
        if self.multi_query:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
            k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
            v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        else:  # rows grouped per head: [T, H, 3 * D] -> 3 x [T, H, D]
            q, k, v = qkv.reshape(num_tokens, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)
        q = apply_interleaved_half_rotary(q, cos, sin)
        k = apply_interleaved_half_rotary(k, cos, sin)
        return self.dense(self.attn(q, k, v, meta))


def _block(cfg: ArchConfig) -> ResidualBlock:
    # dense_4h_to_h(silu(a) * b), where a | b = dense_h_to_4h(x).
    mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu", cfg.mlp_bias,
                   ("dense_h_to_4h", "dense_4h_to_h"))
    return ResidualBlock(lambda: _norm(cfg), GLMSelfAttention(cfg), mlp,
                         cfg.options.apply_residual_connection_post_layernorm)


class ChatGLMModel(StageBody):
    """``transformer.*`` of the checkpoint, restricted to a layer range; the last stage also
    holds the LM head (``output_layer``)."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        names = BodyNames("embedding.word_embeddings", "encoder.layers", "encoder.final_layernorm")
        super().__init__(cfg, start_layer, end_layer, lambda i: _block(cfg),
                         (lambda: _norm(cfg)) if cfg.options.post_layer_norm else None, names)
        # Frequencies over the rotated half of a head: RotaryEmbedding(D // 2) has exactly
        # ChatGLM's D // 4 frequencies (base ** (-2i / (D // 2))).
        self.rotary = RotaryEmbedding(cfg.head_dim // 2, cfg.rope_theta)
        if self.is_last:
            self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def layer_inputs(self, positions: torch.Tensor) -> tuple:
        cos, sin = self.rotary.cos_sin(positions)  # [T, 1, D // 2]: each frequency twice
        num_pairs = self.rotary.head_dim // 2
        return cos[..., :num_pairs], sin[..., :num_pairs]


class ChatGLMForConditionalGeneration(StageModel):
    """Serves both ``ChatGLMModel`` and ``ChatGLMForConditionalGeneration`` checkpoints.

    Every parameter carries its checkpoint name; ``output_layer`` is never tied.
    """

    body_cls = ChatGLMModel
    body_attr = "transformer"
    lm_head_bias = None

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        _refuse_unsupported(hf)
        num_heads = hf.num_attention_heads
        multi_query = bool(getattr(hf, "multi_query_attention", False))
        add_bias_linear = bool(getattr(hf, "add_bias_linear", False))
        llama_names = ConfigView(
            hf,
            vocab_size=getattr(hf, "padded_vocab_size", None) or hf.vocab_size,
            intermediate_size=hf.ffn_hidden_size,
            num_hidden_layers=hf.num_layers,
            num_key_value_heads=hf.multi_query_group_num if multi_query else num_heads,
            head_dim=getattr(hf, "kv_channels", None) or hf.hidden_size // num_heads,
            max_position_embeddings=getattr(hf, "seq_length", None) or 2048,
            rms_norm_eps=getattr(hf, "layernorm_epsilon", 1e-5),
            rope_theta=10000.0 * float(getattr(hf, "rope_ratio", 1.0) or 1.0),
        )
        return ArchConfig.from_hf(
            llama_names,
            rope_scaling=None,
            tie_word_embeddings=False,  # output_layer is always its own tensor
            attention_bias=add_bias_linear or bool(getattr(hf, "add_qkv_bias", False)),
            mlp_bias=add_bias_linear,  # also the bias of self_attention.dense
            sliding_window=None,
            options=ChatGLMOptions(
                multi_query_attention=multi_query,
                rmsnorm=bool(getattr(hf, "rmsnorm", True)),
                post_layer_norm=bool(getattr(hf, "post_layer_norm", True)),
                apply_residual_connection_post_layernorm=bool(
                    getattr(hf, "apply_residual_connection_post_layernorm", False)),
            ),
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.body.output_layer(hidden_states).float()


def _refuse_unsupported(hf) -> None:
    if getattr(hf, "pre_seq_len", None) is not None:
        raise ValueError("pre_seq_len: ChatGLM p-tuning prefixes are not supported")
    if getattr(hf, "quantization_bit", 0):
        raise ValueError("quantization_bit: quantised ChatGLM checkpoints are not supported")
