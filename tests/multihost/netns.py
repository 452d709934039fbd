"""Separate hosts made of Linux network namespaces: tests that run MoLink as on separate machines.

Multi-process tests on ``127.0.0.1`` share one loopback, one port space and an unlimited link,
so they cannot show what breaks when the head and the stages sit on different machines: an
address bound to loopback, a port clash that cannot happen, a slow link, a connection cut
mid-stream. ``Network`` builds a small switched LAN instead::

    switch namespace (private)            host namespaces
    +---------------------------+
    |  br0 +-- p0 (tbf) ========|=== eth0 (tbf) mlk<pid>a0h0   10.213.X.1
    |      +-- p1 (tbf) ========|=== eth0 (tbf) mlk<pid>a0h1   10.213.X.2
    |      +-- p2 (tbf) ========|=== eth0 (tbf) mlk<pid>a0h2   10.213.X.3
    +---------------------------+

Every host has its own loopback, address and ports. ``tbf`` shapes the egress of both ends of
each veth pair, so traffic into and out of a host is limited to ``bandwidth_mbit``. (``netem``
is not built into the CI kernel, so there is no added delay or loss.) Nothing is made in the
root namespace, so parallel runs cannot collide on interface names.

Needs root and ``ip``, ``tc`` and ``ss`` (iproute2). When they are missing the harness raises
``RuntimeError``; it never skips, so a CI job that lost its privileges fails instead of passing
with nothing tested.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

_HOST_IFACE = "eth0"  # inside each host namespace
_BRIDGE = "br0"  # inside the switch namespace
_TBF_LATENCY_MS = 50
_KILL_WAIT_S = 10.0
_SBIN_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"  # a caller's PATH may lack /usr/sbin
_network_seq = itertools.count()


def require_root_and_netns() -> None:
    """Raise ``RuntimeError`` unless this process can create network namespaces."""
    if os.geteuid() != 0:
        raise RuntimeError("tests/multihost needs root: hosts are made with `ip netns add`")
    missing = [tool for tool in ("ip", "tc", "ss") if _find(tool) is None]
    if missing:
        raise RuntimeError(f"tests/multihost needs iproute2; not found: {', '.join(missing)}")
    probe = f"mlk{os.getpid()}probe"
    _ip("netns", "del", probe, check=False)
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        raise RuntimeError("`ip netns add` failed, so tests/multihost cannot make hosts: "
                           + result.stderr.strip())
    _ip("netns", "del", probe)


class Host:
    """One namespace on the test LAN: a machine with its own loopback, address and ports."""

    def __init__(self, name: str, ip: str) -> None:
        self.name = name
        self.ip = ip
        self.procs: list[subprocess.Popen] = []  # every process started by popen()
        self._group_leaders: set[int] = set()  # pids started with start_new_session=True

    def __repr__(self) -> str:
        return f"Host({self.name!r}, ip={self.ip!r})"

    def popen(self, argv: Sequence[str], env: Mapping[str, str] | None = None,
              **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` on this host; ``env`` and ``kwargs`` as for ``subprocess.Popen``.

        The process gets its own session (unless ``start_new_session=False`` is passed) so that
        ``Network`` can kill it together with its children.
        """
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self._exec_argv(argv), env=env, **kwargs)
        self.procs.append(proc)
        if kwargs["start_new_session"]:
            self._group_leaders.add(proc.pid)
        return proc

    def kill_all(self) -> None:
        """SIGKILL every process started by ``popen`` (with its process group) and reap it."""
        for proc in self.procs:
            _kill(proc, leads_group=proc.pid in self._group_leaders)

    def run(self, argv: Sequence[str], timeout: float = 30.0,
            **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host to completion; output captured as text, never raises on rc."""
        return subprocess.run(self._exec_argv(argv), timeout=timeout, capture_output=True,
                              text=True, check=False, **kwargs)

    def cut_connections(self, port: int | None = None, peer_ip: str | None = None) -> int:
        """Reset this host's established TCP connections; return how many sockets were killed.

        ``port`` matches either end's port, ``peer_ip`` the remote address; no filter kills
        every connection. Uses ``ss -K`` (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY): the local
        socket fails with ECONNABORTED and the peer receives an RST (ECONNRESET), as when a
        machine drops a connection.
        """
        terms = []
        if port is not None:
            terms.append(f"( dport = :{port} or sport = :{port} )")
        if peer_ip is not None:
            terms.append(f"dst {peer_ip}")
        result = _run(["ip", "netns", "exec", self.name, "ss", "-K", "-t", "-n", "-H",
                       "state", "established", *" and ".join(terms).split()])
        if result.stderr.strip():  # e.g. a kernel without SOCK_DESTROY
            raise RuntimeError(f"`ss -K` failed on {self.name}: {result.stderr.strip()}")
        return len(result.stdout.splitlines())

    def freeze_link(self) -> None:
        """Take this host's link down: traffic stops and connections stall, but none is reset."""
        _ip("-n", self.name, "link", "set", _HOST_IFACE, "down")

    def thaw_link(self) -> None:
        """Bring the link back up after ``freeze_link``."""
        _ip("-n", self.name, "link", "set", _HOST_IFACE, "up")

    def _exec_argv(self, argv: Sequence[str]) -> list[str]:
        return [_which("ip"), "netns", "exec", self.name, *argv]


class Network:
    """A switch and ``num_hosts`` hosts on one /24, each link shaped to ``bandwidth_mbit``.

    Use as a context manager. On exit (also when the body raised, and at interpreter exit as a
    fallback) every process started on a host is killed and all namespaces are deleted.
    ``bandwidth_mbit=None`` leaves the links unshaped.
    """

    def __init__(self, num_hosts: int = 3, bandwidth_mbit: float | None = 100,
                 prefix: str | None = None) -> None:
        if not 1 <= num_hosts <= 250:
            raise ValueError(f"num_hosts must be in [1, 250], got {num_hosts}")
        if bandwidth_mbit is not None and bandwidth_mbit <= 0:
            raise ValueError(f"bandwidth_mbit must be positive, got {bandwidth_mbit}")
        self.num_hosts = num_hosts
        self.bandwidth_mbit = bandwidth_mbit
        # A default name holds our pid, so an existing one is left over from a dead run.
        self._stale_names_are_ours = prefix is None
        self.prefix = prefix or f"mlk{os.getpid()}a{next(_network_seq)}"
        self.subnet = f"10.213.{os.getpid() % 250 + 1}"  # in private namespaces, so cosmetic
        self.switch = f"{self.prefix}sw"
        self.hosts = [Host(f"{self.prefix}h{i}", f"{self.subnet}.{i + 1}")
                      for i in range(num_hosts)]
        self._namespaces: list[str] = []  # made so far, deleted by close()

    def __enter__(self) -> Network:
        require_root_and_netns()
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process started on the hosts, then delete the namespaces. Idempotent."""
        atexit.unregister(self.close)
        for host in self.hosts:
            host.kill_all()
        for name in reversed(self._namespaces):
            _kill_namespace_pids(name)  # e.g. a child that left its process group
            _ip("netns", "del", name, check=False)
        self._namespaces.clear()

    def _build(self) -> None:
        self._add_namespace(self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", _BRIDGE, "type", "bridge")
        _ip("-n", self.switch, "link", "set", _BRIDGE, "up")
        for i, host in enumerate(self.hosts):
            port = f"p{i}"
            self._add_namespace(host.name)
            _ip("-n", self.switch, "link", "add", port, "type", "veth",
                "peer", "name", _HOST_IFACE, "netns", host.name)
            _ip("-n", self.switch, "link", "set", port, "master", _BRIDGE, "up")
            _ip("-n", host.name, "addr", "add", f"{host.ip}/24", "dev", _HOST_IFACE)
            _ip("-n", host.name, "link", "set", _HOST_IFACE, "up")
            _ip("-n", host.name, "link", "set", "lo", "up")
            if self.bandwidth_mbit is not None:
                self._shape(host.name, _HOST_IFACE)  # host -> switch
                self._shape(self.switch, port)  # switch -> host

    def _add_namespace(self, name: str) -> None:
        if self._stale_names_are_ours:
            _ip("netns", "del", name, check=False)
        _ip("netns", "add", name)
        self._namespaces.append(name)

    def _shape(self, namespace: str, iface: str) -> None:
        rate_bytes_per_s = self.bandwidth_mbit * 1e6 / 8
        # tbf needs burst >= rate / HZ; 1/250 s covers the usual kernel HZ values.
        burst_bytes = int(max(4000, rate_bytes_per_s / 250))
        _run(["tc", "-n", namespace, "qdisc", "add", "dev", iface, "root", "tbf",
              "rate", f"{self.bandwidth_mbit}mbit", "burst", str(burst_bytes),
              "latency", f"{_TBF_LATENCY_MS}ms"])


def _kill(proc: subprocess.Popen, leads_group: bool) -> None:
    """SIGKILL ``proc`` (and its process group when it leads one), reap it, close its pipes."""
    if leads_group:
        # The kernel keeps a group's id from being reused while any member lives, so this
        # cannot hit a stranger, even after the leader was reaped.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()  # a no-op once reaped
    try:
        proc.wait(timeout=_KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        logger.error("process %d survived SIGKILL for %.0f s", proc.pid, _KILL_WAIT_S)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def _kill_namespace_pids(namespace: str) -> None:
    """SIGKILL whatever still runs in ``namespace``: only our own processes can be there."""
    result = _ip("netns", "pids", namespace, check=False)
    for pid in result.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(["ip", *args], check=check)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([_which(argv[0]), *argv[1:]], capture_output=True, text=True,
                            timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed (rc={result.returncode}): "
                           + result.stderr.strip())
    return result


def _which(tool: str) -> str:
    path = _find(tool)
    if path is None:
        raise RuntimeError(f"{tool} (iproute2) not found; tests/multihost needs it")
    return path


def _find(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path=_SBIN_PATH)
