"""AWQ and GPTQ checkpoints: which settings we read, and their packed tensors as ``IntWeight``.

``packed_scheme(config)`` reads config.json's ``quantization_config`` (None: not quantized)
and raises ``ValueError`` naming any method or setting we do not read. Both formats store,
per linear ``X``, int32 words holding ``32 / bits`` values each, fp16 ``X.scales`` of shape
``[num_groups, out]`` and, for GPTQ, ``X.g_idx`` (the group of each input feature)::

    AWQ (GEMM)  X.qweight [in, out / 8]      along out; nibble i of a word holds column
                X.qzeros  [groups, out / 8]  8c + AWQ_ORDER[i], AWQ_ORDER = 0 2 4 6 1 3 5 7
    GPTQ        X.qweight [in * bits / 32, out]    along in, value i at bits [i*bits, +bits)
                X.qzeros  [groups, out * bits / 32] along out, same order

    W[n, k] = (q[k, n] - z[g(k), n]) * scales[g(k), n]   g(k) = k // group_size, or g_idx[k]

GPTQ's original ``checkpoint_format`` ("gptq") stores ``z - 1`` (read back as nibble + 1, as
AutoGPTQ does); "gptq_v2" stores ``z``. Symmetric GPTQ is the same with z = 2^(bits-1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molink.model.layers.int_linear import IntWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # column (within 8) held by nibble i of a word
AWQ_UNDO_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # nibble holding column c
REQUIRED_TENSORS = ("qweight", "qzeros", "scales")  # what every packed linear X stores as X.<name>
PACKED_TENSORS = (*REQUIRED_TENSORS, "g_idx")  # g_idx: GPTQ only, and optional
_SUPPORTED = "awq (version gemm, 4-bit) and gptq (checkpoint_format gptq or gptq_v2, 4 or 8 bits)"


@dataclass(frozen=True)
class PackedScheme:
    """How a checkpoint's quantized linears are stored (from ``quantization_config``)."""

    method: str  # "awq" | "gptq"
    bits: int
    group_size: int  # -1: one group per row
    zero_offset: int = 0  # added to stored zeros: 1 for GPTQ's original format
    not_converted: tuple[str, ...] = ()  # module names (substrings) stored unquantized

    @property
    def label(self) -> str:
        return f"{self.method.upper()} {self.bits}-bit, group {self.group_size}"

    def tensor_suffixes(self, is_stored) -> list[str]:
        """What one quantized linear stores; ``is_stored(suffix)``: whether an optional one
        is there (GPTQ's ``g_idx`` may be absent: groups in input order)."""
        optional = ["g_idx"] if self.method == "gptq" and is_stored("g_idx") else []
        return [*REQUIRED_TENSORS, *optional]

    def skips(self, module_name: str) -> bool:
        return any(entry in module_name for entry in self.not_converted)

    def int_weight(self, tensors: dict[str, torch.Tensor], where: str) -> IntWeight:
        """One linear's stored tensors (keyed by suffix) -> its ``IntWeight``."""
        if self.method == "awq":
            return awq_weight(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                              self.group_size, where)
        return gptq_weight(tensors["qweight"], tensors["qzeros"], tensors["scales"],
                           tensors.get("g_idx"), self, where)


def packed_scheme(config: dict) -> PackedScheme | None:
    """The scheme of config.json's ``quantization_config`` (None: a full-precision model)."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = str(quant.get("quant_method", "")).lower() if isinstance(quant, dict) else ""
    if method == "awq":
        return _awq_scheme(quant)
    if method == "gptq":
        return _gptq_scheme(quant)
    raise ValueError(f"quantization method {method or '(none)'!r} is not supported; "
                     f"supported: {_SUPPORTED}, or GGUF files")


def _awq_scheme(quant: dict) -> PackedScheme:
    version = str(quant.get("version", "gemm")).lower()
    bits = quant.get("bits", quant.get("w_bit", 4))
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported (only 'gemm')")
    if bits != 4:
        raise ValueError(f"AWQ with bits={bits!r} is not supported (only 4)")
    if not quant.get("zero_point", True):
        raise ValueError("AWQ with zero_point=false is not supported")
    group_size = _group_size(quant.get("group_size", quant.get("q_group_size", 128)))
    not_converted = tuple(quant.get("modules_to_not_convert") or ())
    return PackedScheme("awq", 4, group_size, not_converted=not_converted)


def _gptq_scheme(quant: dict) -> PackedScheme:
    fmt = str(quant.get("checkpoint_format", quant.get("format", "gptq"))).lower()
    bits = quant.get("bits", 4)
    if quant.get("is_marlin_format") or fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r}"
                         f"{' (marlin)' if quant.get('is_marlin_format') else ''} is not "
                         "supported (only 'gptq' and 'gptq_v2')")
    if bits not in (4, 8):
        raise ValueError(f"GPTQ with bits={bits!r} is not supported (only 4 and 8)")
    group_size = _group_size(quant.get("group_size", 128))
    not_converted = tuple(quant.get("modules_to_not_convert") or ())
    return PackedScheme("gptq", bits, group_size, zero_offset=1 if fmt == "gptq" else 0,
                        not_converted=not_converted)


def _group_size(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or (value <= 0 and value != -1):
        raise ValueError(f"quantization group_size must be a positive integer or -1, "
                         f"got {value!r}")
    return value


def unpack_words(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their values (value i at bits [i*bits, (i+1)*bits)) laid out along
    ``dim``, which grows ``32 / bits`` times. int32 out."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    moved = words.movedim(dim, -1)
    values = (moved.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., words, 32/bits]
    return values.flatten(-2).movedim(-1, dim)


def awq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, where: str) -> IntWeight:
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    group_size = in_features if group_size == -1 else group_size
    _check_shapes(where, in_features, out_features, group_size, scales,
                  {"qzeros": (qzeros, (in_features // max(group_size, 1), out_features // 8))})
    undo = torch.tensor(AWQ_UNDO_ORDER, device=qweight.device)

    def columns_in_order(words: torch.Tensor) -> torch.Tensor:  # [r, out / 8] -> [r, out]
        values = unpack_words(words, 4, dim=1)
        return values.view(values.shape[0], -1, 8)[:, :, undo].reshape(values.shape[0], -1)

    q, z = columns_in_order(qweight), columns_in_order(qzeros)  # [in, out], [groups, out]
    scales = scales.float()
    codes = (q - 8).t().to(torch.int8).contiguous()  # [out, in]
    return IntWeight(codes, scales, (8 - z).float() * scales, group_size, 4)


def gptq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                g_idx: torch.Tensor | None, scheme: PackedScheme, where: str) -> IntWeight:
    bits, per_word = scheme.bits, 32 // scheme.bits
    in_features, out_features = qweight.shape[0] * per_word, qweight.shape[1]
    group_size = in_features if scheme.group_size == -1 else scheme.group_size
    num_groups = in_features // max(group_size, 1)
    _check_shapes(where, in_features, out_features, group_size, scales,
                  {"qzeros": (qzeros, (num_groups, out_features // per_word))})
    q = unpack_words(qweight, bits, dim=0)  # [in, out]
    z = unpack_words(qzeros, bits, dim=1) + scheme.zero_offset  # [groups, out]
    offset = 1 << (bits - 1)
    codes = (q - offset).t().to(torch.int8)  # [out, in]
    perm = _group_order(g_idx, group_size, in_features, where)
    if perm is not None:
        codes = codes[:, perm]
    scales = scales.float()
    return IntWeight(codes.contiguous(), scales, (offset - z).float() * scales, group_size,
                     bits, perm)


def _group_order(g_idx: torch.Tensor | None, group_size: int, in_features: int,
                 where: str) -> torch.Tensor | None:
    """The input order that makes GPTQ's groups contiguous (None: already in order)."""
    if g_idx is None:
        return None
    if g_idx.shape != (in_features,):
        raise ValueError(f"{where}.g_idx has shape {tuple(g_idx.shape)}, expected "
                         f"({in_features},)")
    perm = torch.argsort(g_idx.long(), stable=True)
    in_order = torch.arange(in_features, device=g_idx.device)
    if not torch.equal(g_idx.long()[perm], in_order // group_size):
        raise ValueError(f"{where}.g_idx does not give every group exactly {group_size} "
                         "inputs; such checkpoints are not supported")
    return None if torch.equal(perm, in_order) else perm


def _check_shapes(where: str, in_features: int, out_features: int, group_size: int,
                  scales: torch.Tensor, others: dict) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(f"{where}: {in_features} inputs are not a whole number of groups of "
                         f"{group_size}; not supported")
    expected = {"scales": (scales, (in_features // group_size, out_features)), **others}
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{where}.{name} has shape {tuple(tensor.shape)}, expected "
                             f"{shape} for a {in_features}x{out_features} weight")
