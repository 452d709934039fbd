"""What this CPU's instruction set offers (read once per process)."""

from __future__ import annotations

import functools


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
