"""GGUFCheckpoint: a llama.cpp GGUF file (or split set) read as config + tensors by HF name.

A model path is GGUF when it is a ``.gguf`` file, or a directory without ``config.json``
that holds one GGUF file or one split set (``name-00001-of-00003.gguf``: every file is a
GGUF; the first carries the metadata, all carry tensors). The files are memory-mapped
(``GGUFFile``); a tensor's bytes are copied out only when a stage asks for it, so a stage
reads its own layers and nothing else.

Names: our parameters use Hugging Face names (``model.layers.3.self_attn.q_proj.weight``),
llama.cpp's are ``blk.3.attn_q.weight`` (the Llama family's table below). The config is
built from the metadata with ``transformers``' own table of GGUF keys.
llama.cpp permutes the rows of q and k in llama-arch files (per head, rows ``(2, D/2)``
become ``(D/2, 2)``); ``read_raw`` undoes that on the bytes (rows are whole blocks).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch

from molink.model.gguf_file import ArrayLength, GGUFFile
from molink.model.gguf_quants import FOUR_BIT_TYPES, QUANTIZED_TYPES, dequantize, row_bytes

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # the q/k permutation and names checked
_PERMUTED_ARCHS = ("llama",)  # GGUF architectures whose q/k rows llama.cpp permutes
_SPLIT = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
_TOP_NAMES = {"lm_head": "output", "model.embed_tokens": "token_embd",
              "model.norm": "output_norm"}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


class TensorInfo(NamedTuple):
    ggml_type: int
    rows: int  # 1-D tensors: their length
    cols: int  # 1-D tensors: 1

    @property
    def quantized(self) -> bool:
        return self.ggml_type in QUANTIZED_TYPES


def gguf_files(path: str) -> list[Path] | None:
    """The GGUF file(s) ``path`` names, in split order; None when it is not GGUF."""
    target = Path(path).expanduser()
    if target.is_dir():
        if (target / "config.json").is_file():
            return None
        candidates = sorted(target.glob("*.gguf"))
        if not candidates:
            return None
        first = [p for p in candidates if _SPLIT.match(p.name) is None or
                 int(_SPLIT.match(p.name)["no"]) == 1]
        if len(first) != 1:
            raise ValueError(f"directory {path!r} holds several GGUF models "
                             f"({', '.join(p.name for p in first)}); give the file")
        target = first[0]
    if target.suffix != ".gguf" or not target.is_file():
        return None
    match = _SPLIT.match(target.name)
    if match is None:
        return [target]
    count = int(match["count"])
    files = [target.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf")
             for i in range(1, count + 1)]
    missing = [p.name for p in files if not p.is_file()]
    if missing:
        raise ValueError(f"GGUF split set {path!r} lacks {', '.join(missing)}")
    return files


class GGUFCheckpoint:
    """Config and tensors of one GGUF model (one file or a split set)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        readers = [GGUFFile(p) for p in files]
        self.metadata = readers[0].metadata  # split sets: the first file carries it
        self._file_of = {name: reader for reader in readers for name in reader.tensors}
        self.tensors = {name: reader.tensors[name] for name, reader in self._file_of.items()}
        self.architecture = self.metadata.get("general.architecture")
        self._config = None

    def hf_config(self):
        """The ``transformers`` config built from the metadata (its GGUF mapping)."""
        if self._config is None:
            self._config = _hf_config(self.metadata, frozenset(self.tensors), self.files[0])
        return self._config

    def gguf_name(self, hf_name: str) -> str:
        name = _gguf_name(hf_name)
        if name is None or name not in self.tensors:
            raise ValueError(f"GGUF model {str(self.files[0])!r} has no tensor for {hf_name}")
        return name

    def four_bit_layers(self) -> bool:
        """Whether the decoder layers' weights include 4-bit ones (Q4_0, Q4_1, Q4_K)."""
        return any(name.startswith("blk.") and entry.ggml_type in FOUR_BIT_TYPES
                   for name, entry in self.tensors.items())

    def info(self, hf_name: str) -> TensorInfo:
        entry = self.tensors[self.gguf_name(hf_name)]
        dims = entry.dims  # ggml order: columns first
        if len(dims) > 2:
            raise ValueError(f"GGUF tensor for {hf_name} has {len(dims)} dimensions")
        return TensorInfo(entry.ggml_type, dims[-1], dims[0] if len(dims) == 2 else 1)

    def read_raw(self, hf_name: str) -> torch.Tensor:
        """[rows, row_bytes] uint8: the stored bytes, q/k rows put back in HF order."""
        name = self.gguf_name(hf_name)
        info = self.info(hf_name)
        num_bytes = info.rows * row_bytes(info.ggml_type, info.cols)
        data = self._file_of[name].tensor_bytes(name, num_bytes)  # only this tensor's pages
        raw = torch.from_numpy(data.reshape(info.rows, -1))
        heads = self._permuted_heads(name)
        return raw if heads is None else _unpermute_rows(raw, heads)

    def read_dense(self, hf_name: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor as floats, [rows, cols] (1-D tensors: [rows])."""
        info = self.info(hf_name)
        values = dequantize(self.read_raw(hf_name), info.ggml_type, info.cols, dtype)
        one_dim = len(self.tensors[self.gguf_name(hf_name)].dims) == 1
        return values.reshape(info.rows) if one_dim else values

    def _permuted_heads(self, gguf_name: str) -> int | None:
        if self.architecture not in _PERMUTED_ARCHS:
            return None
        config = self.hf_config()
        if ".attn_q." in gguf_name:
            return config.num_attention_heads
        if ".attn_k." in gguf_name:
            return config.num_key_value_heads or config.num_attention_heads
        return None

    def fingerprint(self) -> str:
        """sha256 of the config and every tensor's name, type and shape."""
        config = {k: v for k, v in self.hf_config().to_dict().items()
                  if k not in ("transformers_version", "_name_or_path", "dtype")}
        tensors = sorted((n, t.ggml_type, t.dims) for n, t in self.tensors.items())
        blob = json.dumps({"config": config, "tensors": tensors}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()


def _unpermute_rows(rows: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's permute: per head, rows ``(D/2, 2)`` back to ``(2, D/2)``."""
    shape = rows.shape
    half = shape[0] // num_heads // 2
    return rows.reshape(num_heads, half, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def _gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for a Llama-family tensor (``model.layers.3.mlp.up_proj.weight`` ->
    ``blk.3.ffn_up.weight``), or None."""
    base, _, suffix = hf_name.rpartition(".")
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    parts = base.split(".", 3)  # model, layers, N, rest
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in _LAYER_NAMES:
        return None
    return f"blk.{parts[2]}.{_LAYER_NAMES[parts[3]]}.{suffix}"


def _hf_config(metadata: dict, tensor_names: frozenset[str], file: Path):
    """The ``transformers`` config: metadata keys renamed by transformers' GGUF table."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    architecture = metadata.get("general.architecture")
    model_type = architecture
    if architecture == "llama" and "mistral" in str(metadata.get("general.name", "")).lower():
        model_type = "mistral"  # llama.cpp writes Mistral as llama, as transformers reads it
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"GGUF model {str(file)!r} has architecture {architecture!r}; "
                         f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    values = {}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renames = GGUF_CONFIG_MAPPING.get(model_type if prefix == architecture else prefix, {})
        if renames.get(rest) and prefix != "general" and not isinstance(value, ArrayLength):
            values[renames[rest]] = value
    values["tie_word_embeddings"] = "output.weight" not in tensor_names
    if "vocab_size" not in values:  # older files: the vocabulary's length
        tokens = metadata.get("tokenizer.ggml.tokens", ())
        values["vocab_size"] = int(tokens) if isinstance(tokens, ArrayLength) else len(tokens)
    try:
        config = AutoConfig.for_model(model_type, **values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"GGUF file {str(file)!r}: no config from its metadata: {exc}") from None
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return config
