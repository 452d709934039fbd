"""Which machine this process runs on and how many cores it may use."""

from __future__ import annotations

import functools
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


MAX_CPU_SET_CHARS = 4096  # a peer's claim: longer is treated as unknown
MAX_CPU = 1 << 16


def cpu_set() -> str:
    """The CPUs this process may run on, as Linux lists them ("0-3,8"); "" where unknown."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return ""
    ranges: list[list[int]] = []
    for cpu in cpus:
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in ranges)


@functools.lru_cache(maxsize=64)  # the head asks for each stage's after every result
def parse_cpu_set(text: str) -> frozenset[int] | None:
    """The CPUs of a ``cpu_set()`` string; None where empty or malformed (it comes from a
    peer: bounded, and never trusted to be well formed)."""
    if not text or len(text) > MAX_CPU_SET_CHARS:
        return None
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            a, b = int(first), int(last or first)
            if not 0 <= a <= b < MAX_CPU:
                return None
            cpus.update(range(a, b + 1))
    except ValueError:
        return None
    return frozenset(cpus)


def shared_cores(computes: list[tuple[str, str, int, str, int]]) -> int | None:
    """Cores of the one machine whose CPUs compute every stage, if they compete for them;
    ``computes``: (host id, device, cores, ``cpu_set()``, compute threads) of each computing
    process. Processes pinned to disjoint CPUs of the machine do not compete (None); where a
    set is unknown, a process may use any core. Warned once per machine and count, unless
    every process is known to compute with no more threads than its share: processes that
    each run as many threads as the machine has cores spin their OpenMP threads against
    each other's."""
    if len(computes) < 2 or len({c[:2] for c in computes}) != 1 \
            or computes[0][1] != "cpu" or not computes[0][0]:
        return None
    sets = [parse_cpu_set(c[3]) for c in computes]
    if None in sets:
        cores = max(1, max(c[2] for c in computes))
    else:
        cores = len(frozenset().union(*sets))
        if sum(map(len, sets)) == cores:
            return None  # pinned to CPUs of their own
    share = max(1, cores // len(computes))
    threads = [c[4] for c in computes]
    within_share = all(0 < t <= share for t in threads)
    if not within_share and (computes[0][0], len(computes)) not in _warned:
        _warned.add((computes[0][0], len(computes)))
        logger.warning("%d processes compute on the CPUs of one machine (%d cores): unless "
                       "each was started with --threads %d (or OMP_NUM_THREADS=%d, its share), "
                       "their threads contend for the cores", len(computes), cores, share,
                       share)
    return cores
