"""The namespace harness: hosts are isolated, links shaped, cuts reset, exit cleans up."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest

from tests.multihost import netns
from tests.multihost.netns import Host, Network

LINK_MBIT = 20
NUM_TRANSFER_BYTES = 2_500_000

ECHO_SERVER = r"""
import socket
srv = socket.socket()
srv.bind(("0.0.0.0", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
while True:
    conn, _ = srv.accept()
    try:
        while data := conn.recv(65536):
            conn.sendall(data)
        print("eof", flush=True)
    except OSError as e:
        print(type(e).__name__, flush=True)
    conn.close()
"""

ECHO_ONCE_CLIENT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
        c.sendall(b"ping")
        print(c.recv(4).decode())
except OSError as e:
    print(type(e).__name__)
"""

# Sends ping after ping until the connection breaks, then prints how and when.
PINGING_CLIENT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
c.sendall(b"x"); c.recv(1)
print("connected", flush=True)
while True:
    try:
        c.sendall(b"x")
        if not c.recv(1):
            print("eof", time.monotonic(), flush=True)
            break
    except OSError as e:
        print(type(e).__name__, time.monotonic(), flush=True)
        break
    time.sleep(0.02)
"""

# Receives n bytes, acknowledges, sends n bytes back.
TRANSFER_SERVER = r"""
import socket, sys
n = int(sys.argv[1])
srv = socket.socket()
srv.bind(("0.0.0.0", 0))
srv.listen()
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
received = 0
while received < n:
    received += len(conn.recv(1 << 20))
conn.sendall(b"k")
conn.sendall(b"\0" * n)
conn.close()
"""

TRANSFER_CLIENT = r"""
import json, socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = socket.create_connection((host, port))
t0 = time.monotonic()
c.sendall(b"\0" * n)
assert c.recv(1) == b"k"
t1 = time.monotonic()
received = 0
while received < n:
    received += len(c.recv(1 << 20))
t2 = time.monotonic()
print(json.dumps({"up_mbit": n * 8 / (t1 - t0) / 1e6, "down_mbit": n * 8 / (t2 - t1) / 1e6}))
"""


@pytest.fixture(scope="module")
def net():
    with Network(num_hosts=3, bandwidth_mbit=LINK_MBIT) as network:
        yield network


def start(host: Host, script: str, *args: object) -> subprocess.Popen:
    """Start a Python ``script`` on ``host`` with an unbuffered stdout pipe for ``read_line``."""
    return host.popen([sys.executable, "-c", script, *map(str, args)],
                      stdout=subprocess.PIPE, bufsize=0)


def read_line(proc: subprocess.Popen, timeout_s: float = 10.0) -> str:
    """Next line of ``proc``'s stdout; raise if none comes within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    fd = proc.stdout.fileno()
    line = b""
    while not line.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"no line from pid {proc.pid} in {timeout_s} s (so far {line!r})")
        byte = os.read(fd, 1)
        if not byte:
            raise EOFError(f"pid {proc.pid} closed stdout (rc={proc.poll()}) after {line!r}")
        line += byte
    return line.decode().strip()


def is_running(pid: int) -> bool:
    """True unless ``pid`` is gone or a zombie (orphans are reaped by init, not by us)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in listing.stdout.splitlines() if line.strip()}


def test_hosts_reach_each_other_by_ip_but_loopback_is_per_host(net):
    server_host, client_host = net.hosts[0], net.hosts[1]
    assert len({h.ip for h in net.hosts}) == len({h.name for h in net.hosts}) == 3
    server = start(server_host, ECHO_SERVER)
    port = read_line(server)

    def echo(host: Host, ip: str) -> str:
        result = host.run([sys.executable, "-c", ECHO_ONCE_CLIENT, ip, port], timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert echo(client_host, server_host.ip) == "ping"
    assert echo(net.hosts[2], server_host.ip) == "ping"
    assert echo(server_host, "127.0.0.1") == "ping"
    assert echo(client_host, "127.0.0.1") == "ConnectionRefusedError"


def test_links_are_shaped_in_both_directions(net):
    server = start(net.hosts[0], TRANSFER_SERVER, NUM_TRANSFER_BYTES)
    port = read_line(server)
    result = net.hosts[1].run([sys.executable, "-c", TRANSFER_CLIENT, net.hosts[0].ip, port,
                               str(NUM_TRANSFER_BYTES)], timeout=60)
    assert result.returncode == 0, result.stderr
    rates = json.loads(result.stdout)
    for direction, mbit in rates.items():
        # The cap is what shaping guarantees; the floor is loose for a loaded 2-core machine.
        assert 0.5 * LINK_MBIT < mbit < 1.15 * LINK_MBIT, (direction, rates)


@pytest.mark.parametrize("cut_side", ["client_by_port", "server_by_peer_ip"])
def test_cut_connections_resets_a_live_connection(net, cut_side):
    server_host, client_host = net.hosts[0], net.hosts[1]
    server = start(server_host, ECHO_SERVER)
    port = int(read_line(server))
    client = start(client_host, PINGING_CLIENT, server_host.ip, port)
    assert read_line(client) == "connected"

    if cut_side == "client_by_port":
        assert client_host.cut_connections(port=port + 1) == 0
        cut_s = time.monotonic()
        assert client_host.cut_connections(port=port) == 1
    else:
        assert server_host.cut_connections(peer_ip=net.hosts[2].ip) == 0
        cut_s = time.monotonic()
        assert server_host.cut_connections(peer_ip=client_host.ip) == 1

    how, when_s = read_line(client).split()
    assert how in {"ConnectionResetError", "ConnectionAbortedError", "BrokenPipeError", "eof"}
    assert 0 <= float(when_s) - cut_s < 1.0  # broken by the real cut, not the missed one
    assert read_line(server) in {"ConnectionResetError", "ConnectionAbortedError", "eof"}


def test_freeze_link_stops_traffic_until_thaw(net):
    host = net.hosts[2]
    server = start(net.hosts[0], ECHO_SERVER)
    port = read_line(server)
    client = [sys.executable, "-c", ECHO_ONCE_CLIENT, net.hosts[0].ip, port]
    host.freeze_link()
    try:
        assert host.run(client).stdout.strip() in {"OSError", "TimeoutError", "timeout"}
    finally:
        host.thaw_link()
    assert host.run(client).stdout.strip() == "ping"
    assert "tbf" in host.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout


class _Boom(Exception):
    pass


def test_exit_kills_processes_and_deletes_namespaces_even_after_an_error():
    with pytest.raises(_Boom):
        with Network(num_hosts=2, bandwidth_mbit=None) as network:
            made = {network.switch, *(h.name for h in network.hosts)}
            assert made <= namespaces()
            # A child in the leader's process group, and one that left it with setsid.
            leader = network.hosts[0].popen(
                ["sh", "-c", "sleep 60 >/dev/null & echo $!; exec sleep 60"],
                stdout=subprocess.PIPE, bufsize=0)
            escaper = network.hosts[1].popen(
                ["sh", "-c", "setsid sleep 60 >/dev/null & echo $!; exec sleep 60"],
                stdout=subprocess.PIPE, bufsize=0)
            pids = [leader.pid, escaper.pid, int(read_line(leader)), int(read_line(escaper))]
            assert all(is_running(pid) for pid in pids)
            raise _Boom

    assert leader.returncode is not None and escaper.returncode is not None
    assert not [pid for pid in pids if is_running(pid)]
    assert not made & namespaces()


def test_without_root_the_harness_raises_instead_of_skipping(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeError, match="needs root"):
        with Network(num_hosts=1):
            pass


def test_a_failing_ip_netns_add_raises(monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "Operation not permitted")
    monkeypatch.setattr(netns, "_ip", lambda *args, check=True: failed)
    with pytest.raises(RuntimeError, match="ip netns add.*Operation not permitted"):
        netns.require_root_and_netns()
