"""Mamba (``MambaForCausalLM``): selective state-space layers, a per-request state instead of KV.

Each layer is ``h + mixer(norm(h))``; the mixer is::

    x, z   = in_proj(h)                       # [T, d_inner] each
    x      = act(causal depthwise conv(x))    # window of conv_kernel tokens, per channel
    dt,B,C = x_proj(x);  dt = softplus(dt_proj(dt))
    s_t    = exp(dt_t * A) * s_{t-1} + dt_t * B_t * x_t     # [d_inner, state_size], fp32
    y_t    = s_t @ C_t + D * x_t;   out = out_proj(y * silu(z))

So a request's whole past is summarised per layer by two fixed-size tensors, kept in a
state slot on the stage that owns the layer (see ``molink.model.layers.state``):

    conv state [d_inner, conv_kernel - 1]  the last inputs of the conv window (model dtype)
    ssm state  [d_inner, state_size]       s_t above (fp32)

A chunk starting at position 0 clears its slot first; later chunks of the same request (a
chunked prefill, or decode steps) continue from the slot, so chunked prefill, decode and
recomputation after preemption all reduce to "continue the recurrence from the slot".

Parameter names follow the Hugging Face checkpoint (``backbone.layers.3.mixer.A_log``). With
``residual_in_fp32`` (the default) the residual stream is fp32 from the first layer on, as in
``transformers``; that single tensor is what crosses a hop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molink.model.arch_config import ArchConfig, FamilyOptions, dtype_name, eos_ids
from molink.model.layers.attention import AttentionMetadata
from molink.model.layers.mlp import get_activation
from molink.model.layers.norm import RMSNorm
from molink.model.layers.stage_model import BodyNames, StageBody, StageModel
from molink.model.layers.state import StateLayer, StateMetadata, StateSpec

# Mamba checkpoints declare no context limit; this is the length the reference models were
# trained at, and what the head assumes unless ``max_model_len`` says otherwise.
DEFAULT_MAX_MODEL_LEN = 2048
# Tokens of one request scanned per batch of discretised (A, B*x) tensors: bounds the
# [tokens, d_inner, state_size] temporaries of a long prefill chunk.
_SCAN_TOKENS = 256


@dataclass(frozen=True)
class MambaOptions(FamilyOptions):
    state_size: int
    conv_kernel: int
    time_step_rank: int
    use_bias: bool  # on in_proj and out_proj
    use_conv_bias: bool
    residual_in_fp32: bool


class MambaMixer(StateLayer):
    """The selective SSM of one layer, continuing each request's recurrence from its slot."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        options: MambaOptions = cfg.options
        self.d_inner = cfg.intermediate_size
        self.state_size = options.state_size
        self.conv_kernel = options.conv_kernel
        self.time_step_rank = options.time_step_rank
        self.in_proj = nn.Linear(cfg.hidden_size, 2 * self.d_inner, bias=options.use_bias)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, self.conv_kernel, groups=self.d_inner,
                                padding=self.conv_kernel - 1, bias=options.use_conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.time_step_rank + 2 * self.state_size,
                                bias=False)
        self.dt_proj = nn.Linear(self.time_step_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.state_size))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.hidden_size, bias=options.use_bias)
        self.act = get_activation(cfg.hidden_act)

    def state_specs(self) -> list[StateSpec]:
        return [StateSpec((self.d_inner, self.conv_kernel - 1)),  # conv window, model dtype
                StateSpec((self.d_inner, self.state_size), torch.float32)]  # ssm state

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """h: [T, hidden] (normed) -> [T, hidden]."""
        state = meta.state
        assert state is not None and self.state is not None, "state slots not bound / not given"
        x, z = self.in_proj(h).chunk(2, dim=-1)  # [T, d_inner] each
        x = self._conv(x, state)
        dt, B, C = self.x_proj(x).split(
            [self.time_step_rank, self.state_size, self.state_size], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # [T, d_inner]; bias added before softplus
        dt = F.softplus(dt + self.dt_proj.bias.to(dt.dtype))
        y = self._scan(x, dt, B, C, state)  # [T, d_inner] fp32
        y = (y + x * self.D.float()) * F.silu(z)
        return self.out_proj(y.to(h.dtype))

    def _conv(self, x: torch.Tensor, meta: StateMetadata) -> torch.Tensor:
        """Causal depthwise conv of each entry's tokens after its slot's last inputs.

        One entry of L tokens, K = conv_kernel::

            window: [ conv state (K-1 past inputs) | x_0 ... x_{L-1} ]   -> L outputs
            new conv state: the last K-1 columns of the window
        """
        conv_states = self.state[0]  # [slots, d_inner, K-1]
        weight, bias = self.conv1d.weight, self.conv1d.bias  # [d_inner, 1, K], [d_inner]
        out = torch.empty_like(x)  # [T, d_inner]
        for slot, (lo, hi), reset in zip(meta.slots, meta.row_ranges, meta.resets):
            if reset:
                conv_states[slot].zero_()
            window = torch.cat([conv_states[slot], x[lo:hi].t().to(conv_states.dtype)], dim=1)
            conv_states[slot].copy_(window[:, window.shape[1] - (self.conv_kernel - 1):])
            conv = F.conv1d(window[None].to(weight.dtype), weight, bias, groups=self.d_inner)
            out[lo:hi] = self.act(conv[0]).t().to(x.dtype)
        return out

    def _scan(self, x, dt, B, C, meta: StateMetadata) -> torch.Tensor:
        """The selective scan of each entry, in fp32, from its slot's ssm state -> [T, d_inner]."""
        ssm_states = self.state[1]  # [slots, d_inner, state_size] fp32
        A = -torch.exp(self.A_log.float())  # [d_inner, N]
        y = x.new_empty(x.shape, dtype=torch.float32)
        for slot, (lo, hi), reset in zip(meta.slots, meta.row_ranges, meta.resets):
            s = ssm_states[slot].zero_() if reset else ssm_states[slot].clone()  # [d_inner, N]
            for start in range(lo, hi, _SCAN_TOKENS):
                end = min(start + _SCAN_TOKENS, hi)
                s = self._scan_tokens(s, A, x[start:end], dt[start:end], B[start:end],
                                      C[start:end], y[start:end])
            ssm_states[slot].copy_(s)
        return y

    @staticmethod
    def _scan_tokens(s, A, x, dt, B, C, y_out) -> torch.Tensor:
        """Advance state s [d_inner, N] over L tokens, writing y_out [L, d_inner]; -> new s."""
        dt32 = dt.float()[:, :, None]  # [L, d_inner, 1]
        decay = torch.exp(A[None] * dt32)  # [L, d_inner, N]
        inject = (dt32 * B.float()[:, None, :]) * x.float()[:, :, None]  # [L, d_inner, N]
        for t in range(x.shape[0]):
            s = decay[t] * s + inject[t]
            y_out[t] = torch.matmul(s.to(C.dtype), C[t])  # [d_inner]
        return s


class MambaBlock(nn.Module):
    """``backbone.layers.N``: pre-norm residual around the mixer."""

    def __init__(self, cfg: ArchConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mixer = MambaMixer(cfg)
        self.residual_in_fp32 = cfg.options.residual_in_fp32

    def forward(self, h: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        residual = h.float() if self.residual_in_fp32 else h
        return residual + self.mixer(self.norm(h.to(self.norm.weight.dtype)), meta)


class MambaForCausalLM(StageModel):
    """Mamba restricted to ``[start_layer, end_layer)``: ``backbone.*`` of the checkpoint is
    embeddings, a range of layers, ``norm_f``. ``positions`` is unused: Mamba has no position
    encoding; order comes from the scan. No attention layers, so no KV cache."""

    body_attr = "backbone"

    def build_body(self, cfg: ArchConfig, start_layer: int, end_layer: int) -> StageBody:
        return StageBody(cfg, start_layer, end_layer, lambda i: MambaBlock(cfg),
                         lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
                         BodyNames("embeddings", "layers", "norm_f"))

    @staticmethod
    def arch_config(hf) -> ArchConfig:
        rank = hf.time_step_rank
        if rank == "auto":  # older configs; transformers resolves it the same way
            rank = math.ceil(hf.hidden_size / 16)
        return ArchConfig(
            architecture=(getattr(hf, "architectures", None) or ["MambaForCausalLM"])[0],
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=0, num_kv_heads=0, head_dim=0,  # no attention
            max_position_embeddings=(getattr(hf, "max_position_embeddings", None)
                                     or DEFAULT_MAX_MODEL_LEN),
            rms_norm_eps=hf.layer_norm_epsilon,
            hidden_act=hf.hidden_act,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
            dtype=dtype_name(hf),
            eos_token_ids=eos_ids(hf),
            options=MambaOptions(state_size=hf.state_size, conv_kernel=hf.conv_kernel,
                                 time_step_rank=int(rank), use_bias=bool(hf.use_bias),
                                 use_conv_bias=bool(hf.use_conv_bias),
                                 residual_in_fp32=bool(hf.residual_in_fp32)),
        )

    def state_layers(self) -> list[MambaMixer]:
        """This stage's mixers in layer order (one state slot per request each)."""
        return [m for m in self.modules() if isinstance(m, MambaMixer)]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] in float32."""
        dtype = next(self.lm_head.parameters()).dtype  # not .weight: a packed head unpacks
        return self.lm_head(hidden_states.to(dtype)).float()
