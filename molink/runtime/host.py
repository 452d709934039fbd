"""Which machine this process runs on and how many cores it may use."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def host_id() -> str:
    """Equal for processes on the same machine (host name + machine id where there is one)."""
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            machine = Path(path).read_text().strip()
            break
        except OSError:
            continue
    return f"{socket.gethostname()}:{machine}"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
