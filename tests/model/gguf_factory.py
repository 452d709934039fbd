"""Writing a tiny Hugging Face model directory as GGUF, the way llama.cpp's converter does.

``write_gguf`` takes a directory made by ``tests.model_factory`` (safetensors, config.json,
tokenizer.json) and writes it with the ``gguf`` package's ``GGUFWriter``: llama.cpp's
metadata keys and tensor names, q/k rows permuted for llama-arch files (llama.cpp's
``permute``), the byte-level BPE tokenizer and chat template as ``tokenizer.*`` keys.

2-D weights are stored in ``weight_type`` (norms and biases stay F32). Q4_0, Q4_1 and Q8_0
use ``gguf.quants.quantize``. The ``gguf`` package has no quantizer for the K-quants, so
Q4_K / Q6_K tensors are random blocks with f16 super-scales chosen for weights of the
magnitude of the tiny models' (the format is any bytes; both readers must agree on them).
``Q4_K_M`` mimics llama.cpp's mix: Q4_K, with v_proj, down_proj and the output in Q6_K.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from molink.model.gguf_quants import FORMATS, Q4_0, Q4_1, Q4_K, Q6_K, Q8_0
from tests.model import hf_configs
from tests.model_factory import build_model_from_config

GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
             "lm_head": "output"}
Q4_K_M = "Q4_K_M"


def _wide():
    """Rows of 256 values (K-quant blocks): hidden 256, 4 heads of 64, intermediate 512."""
    return hf_configs.llama_config(hidden_size=256, intermediate_size=512)


# name -> (config, GGUF architecture, weight type): the models of the ``gguf_model`` fixture
MODELS = {
    "llama-q4_0": (hf_configs.llama_config, "llama", Q.Q4_0),
    "llama-q4_1": (hf_configs.llama_config, "llama", Q.Q4_1),
    "llama-q8_0": (hf_configs.llama_config, "llama", Q.Q8_0),
    "qwen2-q8_0": (hf_configs.qwen2_config, "qwen2", Q.Q8_0),  # no permute, biases, tied
    "mistral-q8_0": (hf_configs.mistral_config, "llama", Q.Q8_0),  # head_dim 32, 4 heads
    "llama256-q4_k": (_wide, "llama", Q.Q4_K),
    "llama256-q6_k": (_wide, "llama", Q.Q6_K),
    "llama256-q4_k_m": (_wide, "llama", Q4_K_M),
}


def make_model(name: str, root: Path) -> Path:
    """``MODELS[name]`` built under ``root`` (its Hugging Face directory in ``root / "hf"``)
    and written as GGUF; the file's path."""
    config, arch, weight_type = MODELS[name]
    hf_dir = build_model_from_config(config(), root / "hf")
    return write_gguf(hf_dir, root / f"{name}.gguf", weight_type, arch=arch)


def gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    _, _, layer, rest = base.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{GGUF_NAMES[rest]}.{suffix}"


def write_gguf(model_dir: Path, path: Path, weight_type, arch: str = "llama",
               max_tensors_per_file: int = 0, seed: int = 0) -> Path:
    """Write ``model_dir`` as ``path`` (split into several files when max_tensors_per_file)."""
    import gguf

    config = json.loads((model_dir / "config.json").read_text())
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=max_tensors_per_file)
    writer.add_name(config["model_type"])  # llama.cpp writes Mistral as llama, named so
    _write_config(writer, config)
    _write_tokenizer(writer, model_dir, config)
    rng = np.random.default_rng(seed)
    for name, tensor in load_file(model_dir / "model.safetensors").items():
        data = tensor.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = config["num_attention_heads" if ".q_proj." in name else "num_key_value_heads"]
            data = _permute(data, heads)
        _add_tensor(writer, gguf_name(name), data, _type_of(name, weight_type), rng)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _type_of(hf_name: str, weight_type):
    import gguf

    t = gguf.GGMLQuantizationType
    if not hf_name.endswith(".weight") or "norm" in hf_name:
        return t.F32
    if weight_type != Q4_K_M:
        return weight_type
    heavy = ("v_proj", "down_proj", "lm_head")
    return t.Q6_K if any(part in hf_name for part in heavy) else t.Q4_K


def _permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation: per head, rows (2, D/2) become (D/2, 2)."""
    shape = weights.shape
    return (weights.reshape(num_heads, 2, shape[0] // num_heads // 2, *shape[1:])
            .swapaxes(1, 2).reshape(shape))


def _add_tensor(writer, name: str, data: np.ndarray, qtype, rng) -> None:
    import gguf

    t = gguf.GGMLQuantizationType
    if qtype == t.F32:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype in (t.Q4_K, t.Q6_K):
        writer.add_tensor(name, _random_k_blocks(data.shape, qtype, rng), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _random_k_blocks(shape: tuple[int, int], qtype, rng) -> np.ndarray:
    """Random K-quant rows whose values are about +-0.5 (the tiny models' weight scale)."""
    import gguf

    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    num_blocks = shape[0] * shape[1] // block_elems
    blocks = rng.integers(0, 256, size=(num_blocks, block_bytes), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q4_K:  # w = d*sc*q - dmin*m, sc, m < 64, q < 16
        d = rng.uniform(0.0005, 0.001, (num_blocks, 1)).astype(np.float16)
        dmin = rng.uniform(0.0002, 0.0005, (num_blocks, 1)).astype(np.float16)
        blocks[:, 0:2], blocks[:, 2:4] = d.view(np.uint8), dmin.view(np.uint8)
    else:  # Q6_K: w = d*sc*(q-32), sc int8
        d = rng.uniform(0.00005, 0.0001, (num_blocks, 1)).astype(np.float16)
        blocks[:, 208:210] = d.view(np.uint8)
    return blocks.reshape(shape[0], -1)


def _write_config(writer, config: dict) -> None:
    heads = config["num_attention_heads"]
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
    writer.add_rope_freq_base(float(config.get("rope_theta") or _rope_theta(config)))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(1)


def _rope_theta(config: dict) -> float:
    return (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)


def _write_tokenizer(writer, model_dir: Path, config: dict) -> None:
    from tests.tokenizer_factory import CHAT_TEMPLATE, SPECIAL_TOKENS

    model = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def resident_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers."""
    storages = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


_SCALE_OFFSETS = {Q4_0: [0], Q4_1: [0, 2], Q8_0: [0], Q4_K: [0, 2], Q6_K: [208]}


def random_blocks(ggml_type: int, rows: int, cols: int, rng) -> np.ndarray:
    """[rows, row_bytes] random bytes of a GGUF type, its f16 scales finite (random bits may
    be NaN) and within +-0.05."""
    fmt = FORMATS[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // fmt.block_elems * fmt.block_bytes),
                       dtype=np.uint8)
    blocks = raw.reshape(-1, fmt.block_bytes)
    for offset in _SCALE_OFFSETS.get(ggml_type, []):
        halfs = rng.uniform(-0.05, 0.05, (blocks.shape[0], 1)).astype(np.float16)
        blocks[:, offset:offset + 2] = halfs.view(np.uint8)
    return raw
