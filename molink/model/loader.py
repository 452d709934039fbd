"""Stage-aware loading of Hugging Face-format model directories and GGUF files.

A stage builds its model for ``[start_layer, end_layer)`` on the meta device (no memory,
no random init), materialises it empty on the target device, then reads from the
safetensors files exactly the tensors its parameters name, and nothing else. Sharded
checkpoints (``model.safetensors.index.json``) are read shard by shard. A GGUF file or split
set (``molink.model.gguf``) gives the config from its metadata; its quantized weights stay
quantized in memory (``molink.model.gguf_weights``). AWQ/GPTQ checkpoints (config.json's
``quantization_config``) keep their linears as integers, and ``quantization="int8" | "int4"``
quantizes a full-precision checkpoint's decoder linears as they are read
(``molink.model.int_weights``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from molink.model.arch_config import ArchConfig
from molink.model.awq_gptq import PackedScheme, packed_scheme
from molink.model.cpu_features import cpu_lacks_native_bf16
from molink.model.gguf import GGUFCheckpoint, gguf_files
from molink.model.gguf_weights import fill_from_gguf, gguf_held, swap_quantized_modules
from molink.model.int_weights import fill_int_linears, swap_int_linears
from molink.model.layers import fused16
from molink.model.layers.attention import attend_in_float32, use_decode_kernel
from molink.model.layers.cpu_linear import HALF_DTYPES, use_cpu_linears
from molink.model.layers.decode_layers import use_decode_layers
from molink.model.layers.decoder import use_cpu_operators
from molink.model.layers.packed_linear import pack_linears
from molink.model.registry import (
    get_model_class,
    registered_models,
    resolve_architecture,
)
from molink.model.weight_quant import QUANTIZATIONS

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_INDEX_FILE = "model.safetensors.index.json"
_BASE_MODEL_PREFIXES = ("transformer.", "model.")


@dataclass(frozen=True)
class LoadedConfig:
    hf_config: object  # the transformers config object
    arch: ArchConfig
    model_class: type
    gguf: GGUFCheckpoint | None = None  # the parsed GGUF header, when the model is one
    packed: PackedScheme | None = None  # AWQ / GPTQ: how its linears are stored


def check_model_dir(path: str) -> Path:
    """The model directory, or a ValueError saying what is wrong with it."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise ValueError(
            f"model {path!r} is not a directory; give a local Hugging Face-format model "
            "directory (config.json, *.safetensors, tokenizer files)"
        )
    if not (directory / "config.json").is_file():
        raise ValueError(f"model directory {path!r} has no config.json")
    return directory


def load_config(path: str) -> LoadedConfig:
    """Read ``config.json`` (never running remote code), or a GGUF file's metadata, and pick
    our model class."""
    files = gguf_files(path)
    if files is not None:
        checkpoint = GGUFCheckpoint(files)
        hf_config = checkpoint.hf_config()
        model_class = get_model_class(resolve_architecture(hf_config.architectures))
        return LoadedConfig(hf_config=hf_config, arch=model_class.arch_config(hf_config),
                            model_class=model_class, gguf=checkpoint)
    directory = check_model_dir(path)
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"config.json in {path!r} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config.json in {path!r} must hold a JSON object")
    architecture = resolve_architecture(raw.get("architectures"))
    hf_config = _hf_config(directory, raw, registered_models()[architecture].family)
    model_class = get_model_class(architecture)
    arch = model_class.arch_config(hf_config)
    return LoadedConfig(hf_config=hf_config, arch=arch, model_class=model_class,
                        packed=packed_scheme(raw))


def _hf_config(directory: Path, raw: dict, family: str):
    """The ``transformers`` config object; remote-code families get a generic one.

    Checkpoints whose config class lives in remote code (Baichuan, ChatGLM, Qwen 1) are read
    as a plain ``PretrainedConfig`` holding the JSON's keys: no remote code ever runs.
    """
    from transformers import AutoConfig, PretrainedConfig

    try:
        if family == "remote-code":
            return PretrainedConfig(**raw)
        return AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise ValueError(f"config.json in {str(directory)!r} could not be read: {exc}") from None


def resolve_dtype(dtype: str, arch: ArchConfig, device: torch.device,
                  int4_weights: bool = False) -> torch.dtype:
    """``auto``: what computes fast on ``device``: the checkpoint's dtype, except on a CPU,
    where fp16 becomes bf16 (same size, no overflow) and int4 weights (``int4_weights``)
    compute in bf16 (PyTorch's int4 CPU kernel runs in bf16 only). A CPU without native bf16
    arithmetic (x86 without AVX512-BF16 or AMX) keeps 16-bit weights, which decode reads at
    half the bytes of float32, and computes products of many rows in float32
    (``CpuLinear``, applied by ``load_model``): there a plain bf16 prefill runs ~3.5x
    slower than float32 (``benchmarks/results/cpu_dtypes.md``)."""
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    chosen = TORCH_DTYPES.get(arch.dtype or "float32", torch.float32)
    if device.type != "cpu":
        return chosen
    if int4_weights or chosen == torch.float16:
        return torch.bfloat16
    return chosen


def holds_int4(loaded: LoadedConfig, quantization: str | None) -> bool:
    """Whether the layers' linears will be int4 (an AWQ/GPTQ 4-bit checkpoint, a GGUF file
    with 4-bit layers, or int4 at load)."""
    return (quantization == "int4" or (loaded.packed is not None and loaded.packed.bits == 4)
            or (loaded.gguf is not None and loaded.gguf.four_bit_layers()))


def stored_name(name: str, stored_names) -> str | None:
    """The key holding ``name`` among ``stored_names`` (None: absent): checkpoints saved
    from a bare base model (the original GPT-2 and BLOOM) store ``h.0...`` where the model
    names ``transformer.h.0...``."""
    if name in stored_names:
        return name
    for prefix in _BASE_MODEL_PREFIXES:
        if name.startswith(prefix) and name[len(prefix):] in stored_names:
            return name[len(prefix):]
    return None


class CheckpointFiles:
    """Which safetensors file holds which tensor."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / _INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            self.file_of = {name: directory / file for name, file in weight_map.items()}
        else:
            files = sorted(directory.glob("*.safetensors"))
            if not files:
                raise ValueError(f"model directory {str(directory)!r} holds no *.safetensors files")
            self.file_of = {}
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        self.file_of[name] = file

    def read(self, names: list[str], device: torch.device, on_tensor=None) -> dict[str, torch.Tensor]:
        """Read exactly ``names``; ``on_tensor(name, numel)`` is called after each one."""
        stored = {name: self._stored_name(name) for name in names}
        missing = [name for name, key in stored.items() if key is None]
        if missing:
            raise ValueError(
                f"checkpoint in {str(self.directory)!r} lacks tensors {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.file_of[stored[name]]].append(name)
        tensors = {}
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device=str(device)) as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(stored[name])
                    if on_tensor is not None:
                        on_tensor(name, tensors[name].numel())
        return tensors

    def _stored_name(self, name: str) -> str | None:
        return stored_name(name, self.file_of)

    def __contains__(self, name: str) -> bool:
        return self._stored_name(name) is not None


def load_model(path: str, start_layer: int, end_layer: int | None, dtype: str,
               device: torch.device, quantization: str | None = None,
               ) -> tuple[nn.Module, LoadedConfig]:
    """Build the model for ``[start_layer, end_layer)`` and fill it from the checkpoint;
    ``quantization`` ("int8" | "int4"): keep its decoder linears as integers."""
    loaded = load_config(path)
    int_scheme = _int_scheme(path, loaded, quantization)
    arch = loaded.arch
    end_layer = arch.num_layers if end_layer is None else end_layer
    if not 0 <= start_layer < end_layer <= arch.num_layers:
        raise ValueError(
            f"layers {start_layer}:{end_layer} are outside the model's 0:{arch.num_layers}"
        )
    torch_dtype = resolve_dtype(dtype, arch, device, holds_int4(loaded, quantization))
    checkpoint = loaded.gguf  # header parsed once, by load_config
    files = None if checkpoint is not None else CheckpointFiles(check_model_dir(path))
    with torch.device("meta"):
        model = loaded.model_class(arch, start_layer, end_layer)
        if checkpoint is not None:
            swap_quantized_modules(model, checkpoint, torch_dtype, device)
        elif int_scheme is not None:
            swap_int_linears(model, int_scheme, files)
    model = model.to(dtype=torch_dtype).to_empty(device=device)
    if checkpoint is not None:
        fill_from_gguf(model, checkpoint, torch_dtype, device)
    else:
        _fill_parameters(model, files, device)
        if int_scheme is not None:
            fill_int_linears(model, files, int_scheme, torch_dtype, device)
    model.eval().requires_grad_(False)
    if device.type == "cpu" and (torch_dtype == torch.float32 or (
            torch_dtype in HALF_DTYPES and cpu_lacks_native_bf16())):
        use_cpu_linears(model)  # fast orientations; 16-bit weights: float32 products
        if torch_dtype in HALF_DTYPES:
            attend_in_float32(model)
    elif device.type == "cpu" and torch_dtype == torch.bfloat16:
        pack_linears(model)  # native bf16: AMX or oneDNN products, the weights packed once
    kernels = fused16.kernels() if device.type == "cpu" and torch_dtype in HALF_DTYPES else None
    if kernels is not None:
        use_decode_kernel(model, kernels)  # decode attention over the cache in place
        use_cpu_operators(model, kernels)  # norms, RoPE, SwiGLU: one call each
        use_decode_layers(model, kernels)  # where the layers qualify: a decode step's in one
    label = getattr(int_scheme, "label", int_scheme)
    held = (gguf_held(model, checkpoint, torch_dtype, device) if checkpoint is not None
            else label and f"{label} weights")
    logger.info("loaded %s layers %d:%d (%s%s) on %s", arch.architecture, start_layer, end_layer,
                str(torch_dtype).removeprefix("torch."), f", {held}" if held else "", device)
    return model, loaded


def _int_scheme(path: str, loaded: LoadedConfig, quantization: str | None):
    """How linears are kept as integers: the checkpoint's own format, ``quantization``, or
    None (full precision); a ValueError for an unknown value or a double quantization."""
    if quantization is None:
        return loaded.packed
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, "
                         f"got {quantization!r}")
    already = "GGUF" if loaded.gguf is not None else (loaded.packed and loaded.packed.label)
    if already:
        raise ValueError(f"quantization={quantization!r} applies to full-precision checkpoints; "
                         f"{path!r} is already quantized ({already})")
    return quantization


def _fill_parameters(model: nn.Module, files: CheckpointFiles, device: torch.device) -> None:
    params = dict(model.named_parameters())
    select_layout = getattr(model, "select_checkpoint_layout", None)
    if select_layout is not None:  # models whose tensors come in several layouts (MoE experts)
        select_layout(frozenset(files.file_of))
    sources = {name: model.checkpoint_names(name) for name in params}
    needed = sorted({source for names in sources.values() for source in names})
    with _progress(len(needed)) as bar:
        tensors = files.read(needed, device, on_tensor=lambda name, numel: bar.update(1))
    for name, param in params.items():
        parts = [tensors[source] for source in sources[name]]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if param.dim() > 2 and tensor.shape == (param.shape[0] * param.shape[1], *param.shape[2:]):
            tensor = tensor.view(param.shape)  # per-expert matrices stacked: [E, rows, cols]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"tensor(s) {sources[name]} have shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(param.shape)} for {name}"
            )
        with torch.no_grad():
            param.copy_(tensor)


def _progress(total: int):
    """A progress bar on an interactive terminal; silent otherwise (tests, logs)."""
    from tqdm import tqdm

    return tqdm(total=total, desc="Loading weights", unit="tensor",
                disable=not sys.stderr.isatty(), leave=False)


_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "use_cache", "_attn_implementation_autoset", "output_attentions"}


def config_fingerprint(path: str) -> str:
    """sha256 of config.json without keys that do not change the model's math.

    Two nodes agree on the model iff their fingerprints match (dtype is compared apart).
    A GGUF model's covers its config and every tensor's name, type and shape.
    """
    import hashlib

    files = gguf_files(path)
    if files is not None:
        return GGUFCheckpoint(files).fingerprint()
    raw = json.loads((check_model_dir(path) / "config.json").read_text())
    kept = {k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
