"""Writing a tiny Hugging Face model as an AWQ or GPTQ checkpoint, with loops, from the specs.

Independent of ``molink.model.awq_gptq`` on purpose: the packers below are word-by-word loops
written from the published formats (AutoAWQ's GEMM layout, AutoGPTQ's layout), the loader's
unpacking is vectorised. Each decoder linear is rounded to nearest (min/max per group, or
symmetric) with fp16 scales; the integers the test made are kept, and their straightforward
dequantization ``(q[k, n] - z[g(k), n]) * s[g(k), n]`` (a loop over input features) is both
what the loaded layer must equal exactly and the weight of a dense reference checkpoint that
``transformers`` loads.

Layouts (int32 words, value i of a word at bits [i * bits, (i + 1) * bits)):

    AWQ  qweight [in, out / 8], qzeros [groups, out / 8]: word c holds columns
         8c + AWQ_ORDER[i] (0 2 4 6 1 3 5 7); scales [groups, out] fp16
    GPTQ qweight [in * bits / 32, out]: word r holds inputs r * (32 / bits) + i;
         qzeros [groups, out * bits / 32]: word c holds columns c * (32 / bits) + i, storing
         z - 1 ("gptq") or z ("gptq_v2"); scales [groups, out] fp16; g_idx [in] int32
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class Format:
    """One checkpoint layout to write."""

    method: str  # "awq" | "gptq"
    bits: int = 4
    group_size: int = 32  # -1: one group per row
    sym: bool = False
    act_order: bool = False  # GPTQ desc_act: a random permutation decides the groups
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" (zeros stored minus one) | "gptq_v2"
    not_converted: tuple[str, ...] = ()  # module names left in full precision
    extra: dict = field(default_factory=dict)  # more quantization_config keys

    def quantization_config(self) -> dict:
        if self.method == "awq":
            config = {"quant_method": "awq", "version": "gemm", "bits": self.bits,
                      "group_size": self.group_size, "zero_point": True,
                      "modules_to_not_convert": list(self.not_converted) or None}
        else:
            config = {"quant_method": "gptq", "bits": self.bits,
                      "group_size": self.group_size, "sym": self.sym,
                      "desc_act": self.act_order, "checkpoint_format": self.checkpoint_format}
        return {**config, **self.extra}


@dataclass
class Written:
    quantized: Path  # the AWQ / GPTQ checkpoint
    dense: Path  # the same model with the reference-dequantized weights
    reference: dict[str, torch.Tensor]  # module name -> [out, in] float32 weight


def write_quantized(hf_dir: Path, root: Path, fmt: Format, seed: int = 0) -> Written:
    """Write ``hf_dir``'s model as ``fmt`` under ``root/quantized`` and its reference
    dequantization as a plain checkpoint under ``root/dense``."""
    gen = torch.Generator().manual_seed(seed)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    packed, dense, reference = {}, {}, {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if (not name.endswith(".weight") or not module.endswith(LINEARS)
                or any(entry in module for entry in fmt.not_converted)):
            packed[name] = dense[name] = tensor
            continue
        q, z, s, g_idx = _round_to_nearest(tensor.float(), fmt, gen)
        reference[module] = dequantize_reference(q, z, s, g_idx)
        dense[name] = reference[module]
        packed.update({f"{module}.{k}": v for k, v in _pack(q, z, s, g_idx, fmt).items()})
    config = json.loads((hf_dir / "config.json").read_text())
    quantized = _copy(hf_dir, root / "quantized", packed,
                      {**config, "quantization_config": fmt.quantization_config()})
    return Written(quantized, _copy(hf_dir, root / "dense", dense, config), reference)


def dequantize_reference(q, z, s, g_idx) -> torch.Tensor:
    """[out, in] float32: ``(q[k, n] - z[g, n]) * s[g, n]`` with ``g = g_idx[k]``, row by row."""
    weight = torch.empty(q.shape[0], q.shape[1])  # [in, out]
    for k in range(q.shape[0]):
        g = int(g_idx[k])
        weight[k] = (q[k] - z[g]).float() * s[g].float()
    return weight.t().contiguous()


def _round_to_nearest(weight: torch.Tensor, fmt: Format, gen):
    """[out, in] -> q [in, out], z [groups, out] (int64), s [groups, out] fp16, g_idx [in]."""
    out_features, in_features = weight.shape
    group_size = in_features if fmt.group_size == -1 else fmt.group_size
    num_groups, maxq = in_features // group_size, (1 << fmt.bits) - 1
    order = torch.randperm(in_features, generator=gen) if fmt.act_order else torch.arange(
        in_features)
    g_idx = torch.empty(in_features, dtype=torch.int64)
    g_idx[order] = torch.arange(in_features) // group_size  # act-order: groups by a permutation
    q = torch.empty(in_features, out_features, dtype=torch.int64)
    z = torch.empty(num_groups, out_features, dtype=torch.int64)
    s = torch.empty(num_groups, out_features, dtype=torch.float16)
    # GPTQ's original format stores z - 1, so a zero point of 0 cannot be written in it.
    min_zero = 1 if fmt.method == "gptq" and fmt.checkpoint_format == "gptq" else 0
    for g in range(num_groups):
        cols = (g_idx == g).nonzero().flatten()
        block = weight[:, cols]  # [out, group]
        if fmt.sym:
            scale = block.abs().amax(1) * 2 / maxq
            zero = torch.full((out_features,), (maxq + 1) // 2)
        else:
            low, high = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
            scale = (high - low) / maxq
            zero = torch.round(-low / scale).clamp(min_zero, maxq).long()
        s[g] = scale.clamp(min=1e-4).half()
        z[g] = zero
        q[cols] = torch.round(block / s[g].float()[:, None] + zero[:, None]).clamp(0, maxq).long().t()
    return q, z, s, g_idx


def _pack(q, z, s, g_idx, fmt: Format) -> dict[str, torch.Tensor]:
    if fmt.method == "awq":
        return {"qweight": _words_awq(q), "qzeros": _words_awq(z), "scales": s}
    stored_z = z - 1 if fmt.checkpoint_format == "gptq" else z
    return {"qweight": _words_along_rows(q, fmt.bits), "qzeros": _words_along_columns(
        stored_z, fmt.bits), "scales": s, "g_idx": g_idx.to(torch.int32)}


def _words_awq(values: torch.Tensor) -> torch.Tensor:
    rows, cols = values.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for c in range(cols // 8):
        for i in range(8):
            words[:, c] |= values[:, 8 * c + AWQ_ORDER[i]] << (4 * i)
    return _as_int32(words)


def _words_along_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    per_word = 32 // bits
    words = torch.zeros(values.shape[0] // per_word, values.shape[1], dtype=torch.int64)
    for r in range(words.shape[0]):
        for i in range(per_word):
            words[r] |= values[r * per_word + i] << (bits * i)
    return _as_int32(words)


def _words_along_columns(values: torch.Tensor, bits: int) -> torch.Tensor:
    return _words_along_rows(values.t(), bits).t().contiguous()


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words as the int32 the checkpoints store (same bits)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _copy(hf_dir: Path, target: Path, tensors: dict, config: dict) -> Path:
    """``hf_dir`` (tokenizer and all) with other tensors and config.json."""
    shutil.copytree(hf_dir, target)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target
