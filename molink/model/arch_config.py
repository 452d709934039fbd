"""ArchConfig: one normalised view of a Hugging Face ``config.json``.

Hugging Face configs name the same quantity differently across families and versions
(``rope_scaling`` vs ``rope_parameters``, ``torch_dtype`` vs ``dtype``, an absent
``head_dim``). ``ArchConfig.from_hf`` resolves all of that once, so model code reads plain
fields.

What only one family has (GPT-2's attention scaling, Mamba's state size, a MoE's expert
count) lives in that family's own frozen ``FamilyOptions`` subclass, built by its
``arch_config(hf)`` normaliser and carried in ``ArchConfig.options``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclass(frozen=True)
class FamilyOptions:
    """Base of the per-family option records (frozen dataclasses, one per family)."""


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None: plain RoPE
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer: FULL_ATTENTION | SLIDING_ATTENTION
    dtype: str | None = None  # checkpoint dtype name, e.g. "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    o_proj_bias: bool = False  # bias on the attention output projection
    rotary_dim: int | None = None  # rotated dims per head (partial rotary); None: head_dim
    options: FamilyOptions | None = None  # the family's own settings

    def window_of(self, layer: int) -> int | None:
        """Sliding window of a layer (keys within ``window`` positions), or None."""
        if self.layer_types and self.layer_types[layer] == SLIDING_ATTENTION:
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, hf, **overrides) -> ArchConfig:
        """Normalise a ``transformers`` config object of a Llama-family model."""
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        rope_theta, rope_scaling = _rope_settings(hf)
        num_layers = hf.num_hidden_layers
        values = dict(
            architecture=(getattr(hf, "architectures", None) or ["?"])[0],
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 2048),
            rms_norm_eps=getattr(hf, "rms_norm_eps", 1e-6),
            hidden_act=getattr(hf, "hidden_act", "silu"),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            sliding_window=getattr(hf, "sliding_window", None),
            layer_types=_layer_types(hf, num_layers),
            dtype=dtype_name(hf),
            eos_token_ids=eos_ids(hf),
        )
        values.update(overrides)
        return cls(**values)


def _rope_settings(hf) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling dict or None) from either the v4 or the v5 layout."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and "rope_type" in params:  # transformers >= 5
        theta = float(params.get("rope_theta", getattr(hf, "rope_theta", 10000.0)))
        scaling = None if params["rope_type"] == "default" else dict(params)
        return theta, scaling
    theta = float(getattr(hf, "rope_theta", 10000.0))
    scaling = getattr(hf, "rope_scaling", None)
    if scaling:
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    return theta, scaling or None


def _layer_types(hf, num_layers: int) -> tuple[str, ...]:
    types = getattr(hf, "layer_types", None)
    if types:
        return tuple(types)[:num_layers]
    window = getattr(hf, "sliding_window", None)
    if window is None or getattr(hf, "use_sliding_window", True) is False:
        return (FULL_ATTENTION,) * num_layers
    return (SLIDING_ATTENTION,) * num_layers


def dtype_name(hf) -> str | None:
    # ``torch_dtype``: older configs' name, read as stored (transformers 5's property of that
    # name only repeats ``dtype``, with a deprecation warning on every GGUF load)
    dtype = getattr(hf, "dtype", None) or vars(hf).get("torch_dtype")
    if dtype is None:
        return None
    return str(dtype).removeprefix("torch.")


def eos_ids(hf) -> tuple[int, ...]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
