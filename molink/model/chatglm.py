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

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.config_view import ConfigView
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import RotaryEmbedding
from molink.model.layers.stage_model import StageModel


def apply_interleaved_half_rotary(x: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos, sin: [T, 1, D // 4]. Rotates pairs (2i, 2i+1) of dims [0, D // 2)."""
    num_pairs = cos.shape[-1]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rot, passed = x[..., :2 * num_pairs], x[..., 2 * num_pairs:]
    even, odd = rot[..., 0::2], rot[..., 1::2]  # [T, heads, D // 4] each
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    return torch.cat((rotated.flatten(-2), passed), dim=-1)


class GLMRMSNorm(RMSNorm):
    """ChatGLM's order: normalise and scale in fp32, cast once (differs from HF only below fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(torch.float32)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


def _norm(cfg: ArchConfig) -> nn.Module:
    if cfg.extra["rmsnorm"]:
        return GLMRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


class GLMSelfAttention(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.multi_query = cfg.extra["multi_query_attention"]
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


class GLMMLP(nn.Module):
    """dense_4h_to_h(silu(a) * b), where a | b = dense_h_to_4h(x)."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size,
                                       bias=cfg.mlp_bias)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(x).chunk(2, dim=-1)  # [T, ffn] each
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.residual_from_norm = cfg.extra["apply_residual_connection_post_layernorm"]
        self.input_layernorm = _norm(cfg)
        self.self_attention = GLMSelfAttention(cfg)
        self.post_attention_layernorm = _norm(cfg)
        self.mlp = GLMMLP(cfg)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        normed = self.input_layernorm(h)
        h = (normed if self.residual_from_norm else h) + self.self_attention(normed, cos, sin, meta)
        normed = self.post_attention_layernorm(h)
        return (normed if self.residual_from_norm else h) + self.mlp(normed)


class GLMEmbedding(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)


class GLMTransformer(nn.Module):
    """``transformer.encoder``: a range of blocks and, on the last stage, the final norm."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int, is_last: bool) -> None:
        super().__init__()
        # Keys are absolute layer indices so names match the checkpoint.
        self.layers = nn.ModuleDict({str(i): GLMBlock(cfg) for i in range(start_layer, end_layer)})
        if is_last and cfg.extra["post_layer_norm"]:
            self.final_layernorm = _norm(cfg)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        for layer in self.layers.values():
            h = layer(h, cos, sin, meta)
        final_norm = getattr(self, "final_layernorm", None)
        return h if final_norm is None else final_norm(h)


class ChatGLMModel(nn.Module):
    """``transformer.*`` of the checkpoint, restricted to a layer range."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        if self.is_first:
            self.embedding = GLMEmbedding(cfg)
        # Frequencies over the rotated half of a head: RotaryEmbedding(D // 2) has exactly
        # ChatGLM's D // 4 frequencies (base ** (-2i / (D // 2))).
        self.rotary = RotaryEmbedding(cfg.head_dim // 2, cfg.rope_theta)
        self.encoder = GLMTransformer(cfg, start_layer, end_layer, self.is_last)
        if self.is_last:
            self.output_layer = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embedding.word_embeddings(input_ids) if self.is_first else hidden_states
        cos, sin = self.rotary.cos_sin(positions)  # [T, 1, D // 2]: each frequency twice
        num_pairs = self.rotary.head_dim // 2
        return self.encoder(h, cos[..., :num_pairs], sin[..., :num_pairs], meta)  # [T, hidden]


class ChatGLMForConditionalGeneration(StageModel):
    """Serves both ``ChatGLMModel`` and ``ChatGLMForConditionalGeneration`` checkpoints."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.attach_body(cfg, start_layer, end_layer, "transformer",
                         ChatGLMModel(cfg, start_layer, end_layer), lm_head_bias=None)

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
            extra=dict(
                multi_query_attention=multi_query,
                rmsnorm=bool(getattr(hf, "rmsnorm", True)),
                post_layer_norm=bool(getattr(hf, "post_layer_norm", True)),
                apply_residual_connection_post_layernorm=bool(
                    getattr(hf, "apply_residual_connection_post_layernorm", False)),
            ),
        )

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: final hidden states on the last stage, else the residual stream."""
        return self.transformer(positions, meta, input_ids=input_ids, hidden_states=hidden_states)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        return self.transformer.output_layer(hidden_states).float()

    def checkpoint_names(self, param_name: str) -> list[str]:
        return [param_name]  # every parameter carries its checkpoint name


def _refuse_unsupported(hf) -> None:
    if getattr(hf, "pre_seq_len", None) is not None:
        raise ValueError("pre_seq_len: ChatGLM p-tuning prefixes are not supported")
    if getattr(hf, "quantization_bit", 0):
        raise ValueError("quantization_bit: quantised ChatGLM checkpoints are not supported")
