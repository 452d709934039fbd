"""Falcon (``FalconForCausalLM``) in its three block layouts.

* Falcon-7B: ``parallel_attn``, multi-query (one kv head), one ``input_layernorm`` feeding
  both attention and MLP: ``h + attn(ln(h)) + mlp(ln(h))``.
* Falcon-40B/180B (``new_decoder_architecture``): grouped kv heads, ``ln_attn`` and
  ``ln_mlp`` (or a single ``input_layernorm`` when ``num_ln_in_parallel_attn == 1``),
  parallel: ``h + attn(ln_attn(h)) + mlp(ln_mlp(h))``.
* Falcon-RW (``parallel_attn=False``): sequential pre-norm block, usually with ALiBi.

Rotary position embedding unless ``alibi``. ``query_key_value`` stays in checkpoint layout
and is split by views, one per layout (H query heads, G kv heads, D head_dim)::

    new decoder:  [G, H/G + 2, D]  each kv group: its H/G query heads, then k, then v
    multi-query:  [H + 2, D]       all query heads, then the single k, then v
    otherwise:    [H, 3, D]        per head: q, k, v
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from molink.model.arch_config import ArchConfig, FamilyOptions
from molink.model.config_view import ConfigView
from molink.model.layers.alibi import alibi_slopes
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.mlp import DenseMLP
from molink.model.layers.rotary import RotaryEmbedding, apply_rotary
from molink.model.layers.stage_model import BodyNames, StageBody, StageModel

GROUPED, MULTI_QUERY, PER_HEAD = "grouped", "multi_query", "per_head"


@dataclass(frozen=True)
class FalconOptions(FamilyOptions):
    layer_norm_eps: float
    alibi: bool  # ALiBi instead of rotary
    qkv_layout: str  # GROUPED | MULTI_QUERY | PER_HEAD
    parallel_attn: bool
    num_ln_in_parallel_attn: int  # 2: ln_attn and ln_mlp; 1: input_layernorm


class FalconAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding | None,
                 slopes: torch.Tensor | None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.qkv_layout = cfg.options.qkv_layout
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv_size, bias=cfg.attention_bias)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim,
                                   scale=self.head_dim**-0.5, alibi_slopes=slopes)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self._split(self.query_key_value(x))
        if self.rotary is not None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.dense(self.attn(q, k, v, meta))

    def _split(self, qkv: torch.Tensor):
        """[T, (H + 2G) * D] -> q [T, H, D], k and v [T, G, D]."""
        num_tokens, dim = qkv.shape[0], self.head_dim
        heads, kv_heads = self.num_heads, self.num_kv_heads
        if self.qkv_layout == GROUPED:
            grouped = qkv.view(num_tokens, kv_heads, heads // kv_heads + 2, dim)
            q = grouped[:, :, :-2].reshape(num_tokens, heads, dim)
            return q, grouped[:, :, -2], grouped[:, :, -1]
        if self.qkv_layout == MULTI_QUERY:
            q, k, v = qkv.view(num_tokens, heads + 2, dim).split([heads, 1, 1], dim=1)
            return q, k, v
        return qkv.view(num_tokens, heads, 3, dim).unbind(2)


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, rotary: RotaryEmbedding | None,
                 slopes: torch.Tensor | None) -> None:
        super().__init__()
        options: FalconOptions = cfg.options
        eps = options.layer_norm_eps
        self.parallel = options.parallel_attn
        self.two_norms = options.num_ln_in_parallel_attn == 2
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(cfg.hidden_size, eps=eps)
            self.ln_mlp = nn.LayerNorm(cfg.hidden_size, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        self.self_attention = FalconAttention(cfg, rotary, slopes)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                            ("dense_h_to_4h", "dense_4h_to_h"), bias=cfg.mlp_bias)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(h), self.ln_mlp(h)
        else:
            attn_in = mlp_in = self.input_layernorm(h)
        attn_out = self.self_attention(attn_in, cos, sin, meta)
        if self.parallel:
            return h + (self.mlp(mlp_in) + attn_out)
        h = h + attn_out
        return h + self.mlp(self.post_attention_layernorm(h))


class FalconBody(StageBody):
    """``transformer.*`` of the checkpoint: word embeddings, a range of layers, ``ln_f``."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        rotary, slopes = None, None
        if cfg.options.alibi:
            slopes = _falcon_alibi_slopes(cfg.num_heads, cfg.head_dim)
        else:
            rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        eps = cfg.options.layer_norm_eps
        super().__init__(cfg, start_layer, end_layer,
                         lambda i: FalconDecoderLayer(cfg, rotary, slopes),
                         lambda: nn.LayerNorm(cfg.hidden_size, eps=eps),
                         BodyNames("word_embeddings", "h", "ln_f"))
        self.rotary = rotary

    def layer_inputs(self, positions: torch.Tensor) -> tuple:
        return (None, None) if self.rotary is None else self.rotary.cos_sin(positions)


def _falcon_alibi_slopes(num_heads: int, head_dim: int) -> torch.Tensor:
    """Falcon rounds its slopes to bfloat16 and scales the bias with the scores (1/sqrt(D))."""
    return alibi_slopes(num_heads).bfloat16().float() * head_dim**-0.5


class FalconForCausalLM(StageModel):
    body_cls = FalconBody
    body_attr = "transformer"

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        num_heads = hf.num_attention_heads
        if hf.new_decoder_architecture:
            # Always parallel in practice: transformers has no sequential form of this layout.
            layout, num_kv_heads, parallel = GROUPED, hf.num_kv_heads, True
            num_norms = hf.num_ln_in_parallel_attn or 2
        else:
            layout, num_kv_heads = (MULTI_QUERY, 1) if hf.multi_query else (PER_HEAD, num_heads)
            parallel, num_norms = bool(hf.parallel_attn), 1
        view = ConfigView(hf, intermediate_size=hf.ffn_hidden_size or 4 * hf.hidden_size,
                          num_key_value_heads=num_kv_heads)
        return ArchConfig.from_hf(
            view, hidden_act=hf.activation, attention_bias=bool(hf.bias), mlp_bias=bool(hf.bias),
            options=FalconOptions(layer_norm_eps=hf.layer_norm_epsilon, alibi=bool(hf.alibi),
                                  qkv_layout=layout, parallel_attn=parallel,
                                  num_ln_in_parallel_attn=num_norms),
        )
