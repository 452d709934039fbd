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
from molink.model.layers.attention import AttentionMetadata
from molink.model.layers.decoder import DecoderParts, RotaryAttention
from molink.model.layers.mlp import GatedMLP
from molink.model.layers.norm import RMSNorm
from molink.model.layers.rotary import RotaryEmbedding
from molink.model.layers.stage_model import BodyNames, StageBody, StageModel

# The attention's parts (its norm is unused: the block holds ln_1 and ln_2).
_PARTS = DecoderParts(norm=RMSNorm, rope_in_fp32=True)


class QWenAttention(RotaryAttention):
    """``c_attn`` (fused q|k|v rows, with bias) and ``c_proj``; rotary in fp32 (as the
    original) on the first ``rotary_dim`` dims of each head."""

    qkv_proj_name, o_proj_name = "c_attn", "c_proj"


class QWenBlock(nn.Module):
    def __init__(self, cfg: ArchConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = QWenAttention(cfg, layer, _PARTS)
        self.ln_2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # gate_up_proj <- (w2, w1); down_proj <- c_proj (see QWenLMHeadModel.checkpoint_splits).
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, "silu", cfg.mlp_bias)

    def forward(self, h: torch.Tensor, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h), cos, sin, meta)
        return h + self.mlp(self.ln_2(h))


class QWenModel(StageBody):
    """``transformer.*`` of the checkpoint: embeddings, a range of blocks, final norm."""

    def __init__(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> None:
        super().__init__(cfg, start_layer, end_layer, lambda i: QWenBlock(cfg, i),
                         lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
                         BodyNames("wte", "h", "ln_f"))
        self.rotary = RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta)

    def layer_inputs(self, positions: torch.Tensor) -> tuple:
        return self.rotary.cos_sin(positions)  # [T, 1, rotary_dim] each


class QWenLMHeadModel(StageModel):
    body_cls = QWenModel
    body_attr = "transformer"
    # Our fused / shared-layer names -> the checkpoint's (concatenated along dim 0, in order).
    checkpoint_splits = (
        (".mlp.gate_up_proj.", (".mlp.w2.", ".mlp.w1.")),  # gate first: w2 is Qwen 1's gate
        (".mlp.down_proj.", (".mlp.c_proj.",)),
    )

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
            sliding_window=None,
            attention_bias=True,  # c_attn always has a bias
            mlp_bias=has_bias,
            o_proj_bias=has_bias,
            rotary_dim=rotary_dim,
        )
