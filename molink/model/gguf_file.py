"""GGUFFile: one GGUF file's header (metadata and tensor table), its tensor bytes on demand.

Layout (little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)::

    "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type u32, value)
    tensor_count x (name: string, n_dims u32, dims u64[n_dims] (columns first),
                    ggml_type u32, offset u64 (from the data section))
    padding to general.alignment (default 32) | data section

A string is a u64 length and UTF-8 bytes; an array is an element type u32, a u64 count and
the elements. Arrays of more than ``MAX_KEPT_ARRAY`` elements (a tokenizer's vocabulary and
merges) are skipped and kept as their length: the config needs none of them, and the
tokenizer is built by ``transformers`` from the file itself. The file is memory-mapped, so
reading one tensor touches only that tensor's pages.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

MAX_KEPT_ARRAY = 1024
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class ArrayLength(int):
    """Stands for an array the reader skipped: its number of elements."""


class TensorEntry(NamedTuple):
    ggml_type: int
    dims: tuple[int, ...]  # ggml order: columns first
    offset: int  # from the start of the file


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        if path.stat().st_size < 24:  # magic, version, two counts
            raise ValueError(f"{str(path)!r} is not a GGUF file (only {path.stat().st_size} bytes)")
        self._map = np.memmap(path, dtype=np.uint8, mode="r")
        try:
            self.metadata, self.tensors = self._parse()
        except (struct.error, UnicodeDecodeError, KeyError, IndexError) as exc:
            raise ValueError(f"{str(path)!r} is not a readable GGUF file: {exc!r}") from None

    def tensor_bytes(self, name: str, num_bytes: int) -> np.ndarray:
        """A copy of ``num_bytes`` bytes of tensor ``name`` (uint8)."""
        start = self.tensors[name].offset
        if start + num_bytes > self._map.shape[0]:
            raise ValueError(f"GGUF file {str(self.path)!r} is truncated (tensor {name})")
        return np.array(self._map[start:start + num_bytes])

    def _parse(self) -> tuple[dict, dict[str, TensorEntry]]:
        self._pos = 0
        if bytes(self._map[:4]) != b"GGUF":
            raise ValueError(f"{str(self.path)!r} is not a GGUF file (no GGUF magic)")
        self._pos = 4
        version, num_tensors, num_kv = self._unpack("<I"), self._unpack("<Q"), self._unpack("<Q")
        if version < 2:
            raise ValueError(f"GGUF version {version} of {str(self.path)!r} is too old")
        metadata = {}
        for _ in range(num_kv):
            key = self._string()
            metadata[key] = self._value(self._unpack("<I"))
        entries = []
        for _ in range(num_tensors):
            name = self._string()
            dims = tuple(self._unpack("<Q") for _ in range(self._unpack("<I")))
            entries.append((name, self._unpack("<I"), dims, self._unpack("<Q")))
        alignment = int(metadata.get("general.alignment", 32))
        data_start = -(-self._pos // alignment) * alignment
        tensors = {name: TensorEntry(ggml_type, dims, data_start + offset)
                   for name, ggml_type, dims, offset in entries}
        return metadata, tensors

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        (value,) = struct.unpack(fmt, self._map[self._pos:self._pos + size].tobytes())
        self._pos += size
        return value

    def _string(self) -> str:
        length = self._unpack("<Q")
        text = self._map[self._pos:self._pos + length].tobytes().decode("utf-8")
        self._pos += length
        return text

    def _value(self, value_type: int):
        if value_type == _STRING:
            return self._string()
        if value_type != _ARRAY:
            return self._unpack(_SCALARS[value_type])
        element_type, count = self._unpack("<I"), self._unpack("<Q")
        if count <= MAX_KEPT_ARRAY:
            return [self._value(element_type) for _ in range(count)]
        if element_type == _STRING:  # skip: step over each length-prefixed string
            for _ in range(count):
                length = self._unpack("<Q")  # (not `_pos += _unpack()`: it moves _pos)
                self._pos += length
        elif element_type == _ARRAY:
            raise ValueError("nested arrays longer than MAX_KEPT_ARRAY are not supported")
        else:
            self._pos += count * struct.calcsize(_SCALARS[element_type])
        return ArrayLength(count)
