"""Which machine this process runs on and how many cores it may use."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

logger = logging.getLogger(__name__)
_warned: set[tuple[str, int]] = set()  # (host, processes) already warned about


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


def shared_cores(computes: list[tuple[str, str, int]]) -> int | None:
    """Cores of the one machine whose CPUs compute every stage, if that is the case (the
    stages then compete for its cores); ``computes``: (host id, device, cores) of each
    computing process. Warned once per machine and count: processes that each run as many
    threads as the machine has cores spin their OpenMP threads against each other's."""
    if len(computes) < 2 or len({(h, d) for h, d, _ in computes}) != 1 \
            or computes[0][1] != "cpu" or not computes[0][0]:
        return None
    cores = max(1, computes[0][2])
    if (computes[0][0], len(computes)) not in _warned:
        _warned.add((computes[0][0], len(computes)))
        share = max(1, cores // len(computes))
        logger.warning("%d processes compute on the CPUs of one machine (%d cores): unless "
                       "each was started with --threads %d (or OMP_NUM_THREADS=%d, its share), "
                       "their threads contend for the cores", len(computes), cores, share,
                       share)
    return cores
