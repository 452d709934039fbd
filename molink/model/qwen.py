"""Qwen 1 (``QWenLMHeadModel``, a ``trust_remote_code`` checkpoint), read natively.

Llama-like: RMSNorm, rotary multi-head attention (no GQA) and a gated MLP, under the
checkpoint's own names::

    transformer.wte                        embeddings
    transformer.h.N.ln_1 / ln_2            RMSNorm
    transformer.h.N.attn.c_attn            fused q|k|v rows, with bias
    transformer.h.N.attn.c_proj            output projection (bias only when not no_bias)
    transformer.h.N.mlp.w1 / w2 / c_proj   c_proj(w1(x) * silu(w2(x))): w2 is the gate
    transformer.ln_f, lm_head

Rotary covers the first ``kv_channels * rotary_pct`` dims of each head (rotate-half
convention), computed in fp32 as the original does. Not reproduced: dynamic NTK scaling and
log-n attention scaling (``use_dynamic_ntk`` / ``use_logn_attn``). Both are identities up to
``seq_length`` tokens, so ``seq_length`` is the model's context limit here and outputs are
exact within it.
"""

from __future__ import annotations

import torch
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.layers.attention import AttentionMetadata, PagedAttention
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import RotaryEmbedding, apply_rotary
from molink.model.layers.stage_model import StageModel


class QWenAttention(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.rotary_dim = cfg.extra["rotary_dim"]
        hidden = cfg.hidden_size
        self.c_attn = nn.Linear(hidden, 3 * hidden, bias=cfg.attention_bias)  # rows: q | k | v
        self.c_proj = nn.Linear(hidden, hidden, bias=cfg.extra["o_proj_bias"])
        self.attn = PagedAttention(self.num_heads, self.num_heads, self.head_dim,
                                   scale=self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (t.reshape(shape) for t in self.c_attn(x).chunk(3, dim=-1))  # [T, H, D] each
        q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
        return self.c_proj(self.attn(q, k, v, meta))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary on the first ``rotary_dim`` dims, in fp32 (as the original), back to x's dtype."""
        rotated = apply_rotary(x[..., :self.rotary_dim].float(), cos, sin)
        return torch.cat((rotated, x[..., self.rotary_dim:].float()), dim=-1).to(x.dtype)


class QWenBlock(nn.Module):
    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = QWenAttention(cfg)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # gate_up_proj <- (w2, w1); down_proj <- c_proj (see QWenLMHeadModel.checkpoint_names).
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu", cfg.mlp_bias)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), cos, sin, meta)
        return h + self.mlp(self.ln_2(h))


class QWenModel(nn.Module):
    """``transformer.*`` of the checkpoint: embeddings, a range of blocks, final norm."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.is_first = start_layer == 0
        self.is_last = end_layer == cfg.num_layers
        if self.is_first:
            self.wte = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.extra["rotary_dim"], cfg.rope_theta)
        self.h = nn.ModuleDict({str(i): QWenBlock(cfg) for i in range(start_layer, end_layer)})
        if self.is_last:
            self.ln_f = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        h = self.wte(input_ids) if self.is_first else hidden_states  # [T, hidden]
        cos, sin = self.rotary.cos_sin(positions)  # [T, 1, rotary_dim]
        for block in self.h.values():
            h = block(h, cos, sin, meta)
        return self.ln_f(h) if self.is_last else h


class QWenLMHeadModel(StageModel):
    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__()
        self.attach_body(cfg, start_layer, end_layer, "transformer",
                         QWenModel(cfg, start_layer, end_layer), lm_head_bias=False)

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        num_heads, hidden = hf.num_attention_heads, hf.hidden_size
        kv_channels = getattr(hf, "kv_channels", None) or hidden // num_heads
        if kv_channels * num_heads != hidden:
            raise ValueError(f"kv_channels {kv_channels} * num_attention_heads {num_heads} "
                             f"must equal hidden_size {hidden} (Qwen 1 layout)")
        rotary_pct = float(getattr(hf, "rotary_pct", 1.0))
        rotary_dim = kv_channels if rotary_pct == 1.0 else int(kv_channels * rotary_pct)
        has_bias = not getattr(hf, "no_bias", True)
        seq_length = getattr(hf, "seq_length", None)
        return ArchConfig.from_hf(
            hf,
            intermediate_size=hf.intermediate_size // 2,  # the config gives w1 + w2 together
            num_kv_heads=num_heads,
            head_dim=hidden // num_heads,
            # Past seq_length the original switches on dynamic NTK / log-n scaling (not here).
            max_position_embeddings=seq_length or getattr(hf, "max_position_embeddings", 2048),
            rms_norm_eps=getattr(hf, "layer_norm_epsilon", 1e-6),
            rope_theta=float(getattr(hf, "rotary_emb_base", 10000.0)),
            rope_scaling=None,
            attention_bias=True,  # c_attn always has a bias
            mlp_bias=has_bias,
            extra=dict(rotary_dim=rotary_dim, o_proj_bias=has_bias),
        )

    def forward(self, positions: torch.Tensor, meta: AttentionMetadata,
                input_ids: torch.Tensor | None = None,
                hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        """-> [T, hidden]: final normed hidden states on the last stage, else the residual."""
        return self.transformer(positions, meta, input_ids=input_ids, hidden_states=hidden_states)

    def checkpoint_names(self, param_name: str) -> list[str]:
        if param_name == "lm_head.weight" and self.cfg.tie_word_embeddings:
            return ["transformer.wte.weight"]
        for ours, theirs in _RENAMED.items():
            if ours in param_name:
                return [param_name.replace(ours, part) for part in theirs]
        return [param_name]


# Our fused / shared-layer names -> the checkpoint's (concatenated along dim 0, in order).
_RENAMED = {
    ".mlp.gate_up_proj.": (".mlp.w2.", ".mlp.w1."),  # gate first: w2 is Qwen 1's gate
    ".mlp.down_proj.": (".mlp.c_proj.",),
}
