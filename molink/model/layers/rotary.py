"""Rotary position embedding (RoPE), including the scaled variants checkpoints use."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for absolute positions; applied to q and k of shape [T, heads, head_dim]."""

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (theta**exponents)  # built on CPU even inside a meta-device context
        rope_type = (scaling or {}).get("rope_type", "default")
        self.attention_scaling = 1.0  # multiplies cos and sin (yarn)
        if rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif rope_type == "yarn":
            inv_freq, self.attention_scaling = _yarn_inv_freq(theta**exponents, head_dim, theta,
                                                              scaling)
        elif rope_type != "default":
            raise ValueError(
                f"rope_scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        # A plain attribute, not a buffer: models are built on the meta device and
        # materialised empty, and this must survive that.
        self._inv_freq = inv_freq  # [head_dim // 2], fp32, CPU
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> cos, sin: [T, 1, head_dim] in fp32."""
        inv_freq = self._inv_freq_by_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq.to(positions.device)
            self._inv_freq_by_device[positions.device] = inv_freq
        freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, head_dim // 2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
        if self.attention_scaling != 1.0:
            return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotate-half convention (Hugging Face / GPT-NeoX)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Partial rotary (Phi): rotate the first ``cos.shape[-1]`` dims of x, pass the rest through.

    x: [T, heads, head_dim]; cos, sin: [T, 1, rotary_dim] (a ``RotaryEmbedding(rotary_dim, ...)``).
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rotary(x, cos, sin)
    return torch.cat((apply_rotary(x[..., :rotary_dim], cos, sin), x[..., rotary_dim:]), dim=-1)


def interleave_rotary_tables(cos: torch.Tensor,
                             sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half tables -> rotate-every-two tables, for ``apply_interleaved_rotary``.

    ``RotaryEmbedding.cos_sin`` lays frequencies out as two halves ``f0 f1 .. f0 f1 ..``; the
    interleaved convention needs each frequency twice in a row ``f0 f0 f1 f1 ..``.
    cos, sin: [T, 1, rotary_dim] -> [T, 1, rotary_dim]. Convert once per step, not per layer.
    """
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]  # [T, 1, rotary_dim // 2]: one per frequency
    return cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)


def apply_interleaved_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-every-two convention (GPT-J, Cohere, GLM): dims (0, 1), (2, 3), ... rotate as pairs.

    x: [T, heads, head_dim]; cos, sin: [T, 1, rotary_dim] from ``interleave_rotary_tables``.
    Dims past ``rotary_dim`` pass through unrotated (partial rotary, GLM).
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        rotated = apply_interleaved_rotary(x[..., :rotary_dim], cos, sin)
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    pairs = x.unflatten(-1, (-1, 2))  # [T, heads, rotary_dim // 2, 2]
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos + rotated * sin


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency smoothing: long wavelengths scaled, short kept, a ramp between."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(pos_freqs: torch.Tensor, dim: int, theta: float,
                   scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, keep high ones, ramp between; plus an attention factor.

    Same arithmetic as ``transformers``' ``_compute_yarn_parameters``; pos_freqs: theta^(2i/dim).
    Returns (inv_freq [dim // 2], factor that multiplies cos and sin).
    """
    if scaling.get("factor") is None:
        raise ValueError("rope_scaling of type 'yarn' needs a 'factor'")
    factor = float(scaling["factor"])
    original_max = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        turns = original_max / (num_rotations * 2 * math.pi)
        return (dim * math.log(turns)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    index = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = torch.clamp((index - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency, 0: interpolate it
    interpolated, original = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv_freq = interpolated * (1 - extrapolation) + original * extrapolation
    return inv_freq, float(attention_factor)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
