"""Multi-head latent attention (MLA, DeepSeek V2/V3) over the paged KV cache.

Per token, keys and values come from a small latent::

    x -> kv_a_proj_with_mqa -> [latent (kv_lora_rank) | k_rope (qk_rope_head_dim, shared by heads)]
    latent -> kv_a_layernorm -> kv_b_proj -> per head [k_nope (qk_nope_head_dim) | v (v_head_dim)]
    key of head h = [k_nope_h | rope(k_rope)]        query of head h = [q_nope_h | rope(q_rope_h)]

q comes from ``q_proj`` or, with ``q_lora_rank`` set, from ``q_b_proj(q_a_layernorm(q_a_proj(x)))``.

The cache holds the decompressed per-head keys and values (exact and simple). Keys are
``qk_nope_head_dim + qk_rope_head_dim`` wide and values ``v_head_dim``; ``PagedAttention``
keeps one width for both, so the narrower of the two is zero-padded to the wider: a zero
tail changes no dot product, and the padded tail of the output is cut off. (Caching the
latent plus ``k_rope`` instead is far smaller — 576 vs 40,960 values per token and layer for
DeepSeek-V3 — and is the next optimisation; it needs an attention path of its own.)

RoPE: interleaved checkpoints (all of V2, V3 with ``rope_interleave``) pair dimensions
``(x0, x1), (x2, x3), ...``; ``to_rotate_half_layout`` regroups them as
``(x0, x2, ...), (x1, x3, ...)`` so the shared rotate-half rotation applies. q and k are
regrouped alike, so their dot products are those of the interleaved rotation. With YaRN
scaling the shared ``RotaryEmbedding`` multiplies cos/sin by its attention factor, and
``softmax_scale`` grows by ``mscale(factor, mscale_all_dim) ** 2`` as DeepSeek defines it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import apply_rotary

# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default eps, not
# config.rms_norm_eps; so did the original DeepSeek code.
_LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        options = cfg.options  # DeepseekOptions
        self.num_heads = cfg.num_heads
        self.q_lora_rank = options.q_lora_rank
        self.kv_lora_rank = options.kv_lora_rank
        self.nope_dim = options.qk_nope_head_dim
        self.rope_dim = options.qk_rope_head_dim
        self.v_dim = options.v_head_dim
        self.rope_interleave = options.rope_interleave
        qk_dim = self.nope_dim + self.rope_dim
        self.qk_dim = qk_dim
        hidden, heads, bias = cfg.hidden_size, self.num_heads, cfg.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_lora_rank, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim),
                                   bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias)
        self.cache_dim = max(qk_dim, self.v_dim)  # one width for cached k and v (see above)
        self.attn = PagedAttention(heads, heads, self.cache_dim,
                                   scale=softmax_scale(qk_dim, cfg.rope_scaling),
                                   window=cfg.window_of(layer))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, heads = x.shape[0], self.num_heads
        q_nope, q_rope = self._queries(x).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim],
                                                          dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))  # [T, H * (nope + v)]
        k_nope, v = kv.view(num_tokens, heads, -1).split([self.nope_dim, self.v_dim], dim=-1)
        q_rope = self._rotate(q_rope, cos, sin)  # [T, H, rope]
        k_rope = self._rotate(k_rope.view(num_tokens, 1, self.rope_dim), cos, sin)  # [T, 1, rope]
        q = torch.cat([q_nope, q_rope], dim=-1)  # [T, H, qk]
        k = torch.cat([k_nope, k_rope.expand(num_tokens, heads, self.rope_dim)], dim=-1)
        out = self.attn(self._pad(q), self._pad(k), self._pad(v), meta)  # [T, H * cache_dim]
        out = out.view(num_tokens, heads, self.cache_dim)[..., :self.v_dim]
        return self.o_proj(out.reshape(num_tokens, heads * self.v_dim))

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, H, qk_dim]."""
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return q.view(x.shape[0], self.num_heads, self.qk_dim)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.rope_interleave:
            x = to_rotate_half_layout(x)
        return apply_rotary(x, cos, sin)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H, d] -> [T, H, cache_dim], zeros appended."""
        missing = self.cache_dim - x.shape[-1]
        return F.pad(x, (0, missing)) if missing else x


def to_rotate_half_layout(x: torch.Tensor) -> torch.Tensor:
    """[..., d] interleaved pairs (x0, x1), (x2, x3) -> [..., d] as (x0, x2, ...), (x1, x3, ...)."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def softmax_scale(qk_head_dim: int, scaling: dict[str, Any] | None) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` for scaled RoPE."""
    scale = qk_head_dim**-0.5
    mscale_all_dim = (scaling or {}).get("mscale_all_dim")
    if scaling and scaling.get("rope_type", "default") != "default" and mscale_all_dim:
        factor = float(scaling.get("factor") or 1.0)
        mscale = 1.0 if factor <= 1 else 0.1 * float(mscale_all_dim) * math.log(factor) + 1.0
        scale = scale * mscale * mscale
    return scale
