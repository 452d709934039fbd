"""What this CPU's instruction set offers (read once per process)."""

from __future__ import annotations

import functools

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16 / AMX, ARM


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (x86 ``flags``, ARM ``Features`` of /proc/cpuinfo); None where
    they cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def has_native_bf16() -> bool:
    """True only when the CPU's flags are known and show bf16 instructions."""
    flags = cpu_flags()
    return flags is not None and bool(flags & BF16_FLAGS)


def cpu_lacks_native_bf16() -> bool:
    """True only when the CPU's flags are known and show no bf16 instructions."""
    return cpu_flags() is not None and not has_native_bf16()
