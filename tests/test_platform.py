"""``molink serve`` and ``molink join`` run on Linux, macOS and Windows, on CPU, CUDA or MPS.

A scan of ``molink/``'s syntax finds POSIX-only calls (modules, ``os``/``signal``/``select``
names, loop signal handlers, ``/proc``-style paths, POSIX-only subprocess options). Each one
found must be listed in ``ALLOWED`` with the reason it is safe, and that reason is checked
where it can be: the code sits under a guard (``try`` catching the error a platform without it
raises, or an ``if`` testing ``hasattr``/``sys.platform``/``os.name``/``is not None``). The
same for CUDA-only calls: each sits under a test of the device type. The signal fallback
(Windows' event loop has no ``add_signal_handler``) is run, and ``--device auto`` is checked
to pick MPS where it is available.
"""

from __future__ import annotations

import ast
import asyncio
import signal
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "molink"
GENERATED = {"transport/molink_pb2.py", "transport/molink_pb2_grpc.py"}

POSIX_MODULES = {"fcntl", "resource", "pwd", "grp", "termios", "tty", "pty", "posix", "crypt",
                 "syslog", "spwd", "nis", "posixpath"}
POSIX_NAMES = {
    "os": {"fork", "forkpty", "setsid", "setpgid", "getpgid", "setpgrp", "killpg", "getuid",
           "geteuid", "getgid", "getegid", "getgroups", "setuid", "setgid", "sysconf", "pathconf",
           "fchmod", "fchown", "chown", "lchown", "sched_getaffinity", "sched_setaffinity",
           "getloadavg", "nice", "mkfifo", "mknod", "uname", "wait3", "wait4", "statvfs",
           "WNOHANG", "sync", "ttyname", "openpty"},
    "signal": {"SIGKILL", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGCHLD", "SIGALRM", "SIGPIPE",
               "SIGQUIT", "SIGSTOP", "SIGCONT", "SIGWINCH", "alarm", "setitimer", "getitimer",
               "pause", "siginterrupt", "pthread_kill", "pthread_sigmask", "sigwait"},
    "select": {"select", "poll", "epoll", "kqueue"},  # Windows: select() on sockets only
    "socket": {"AF_UNIX", "SO_REUSEPORT"},
}
LOOP_SIGNAL_METHODS = {"add_signal_handler", "remove_signal_handler"}  # not on Windows
POSIX_KEYWORDS = {"preexec_fn", "start_new_session", "pass_fds", "process_group"}
POSIX_PATH_PREFIXES = ("/proc/", "/sys/", "/tmp", "/dev/", "/etc/", "/var/", "/run/")
# Errors a platform without the feature raises: catching one of them guards the call.
GUARD_ERRORS = {"ImportError", "ModuleNotFoundError", "AttributeError", "OSError",
                "NotImplementedError", "ValueError", "FileNotFoundError", "RuntimeError"}

# (module path under molink/, symbol) -> why it is safe on every platform. Every use of the
# symbol in that module must also be guarded (checked below), except where the reason says
# "unguarded" and why that is harmless.
ALLOWED: dict[tuple[str, str], str] = {
    ("transport/tls.py", "fcntl"):
        "imported in try/except ImportError (None on Windows); the identity lock is taken "
        "only under `if fcntl is not None`",
    ("transport/tls.py", "os.fchmod"):
        "under `if hasattr(os, 'fchmod')`: Windows has no POSIX modes to force",
    ("runtime/host.py", "os.sched_getaffinity"):
        "try/except AttributeError: os.cpu_count() on macOS and Windows",
    ("runtime/host.py", "/etc/"):
        "machine-id files read under try/except OSError: the host name alone elsewhere",
    ("runtime/host.py", "/var/"): "the second machine-id file, read the same way",
    ("runtime/kv_cache.py", "os.sysconf"):
        "try/except AttributeError/ValueError/OSError: a fixed 2 GiB budget when unknown",
    ("runtime/node_budget.py", "/proc/"):
        "/proc/meminfo read under try/except OSError, then sysconf, then a stated guess",
    ("runtime/node_budget.py", "os.sysconf"):
        "under `if hasattr(os, 'sysconf')` and try/except ValueError/OSError",
    ("runtime/intra_op.py", "/proc/"):
        "/proc/self/maps read under try/except OSError: without it no OpenMP runtime is "
        "looked for and every thread keeps its width",
    ("model/cpu_features.py", "/proc/"):
        "/proc/cpuinfo read under try/except OSError: unknown CPU flags mean 'has bf16' and "
        "'try the fused kernels' (their self-check decides)",
    ("entrypoints/signals.py", "add_signal_handler"):
        "try/except NotImplementedError/RuntimeError: signal.signal fallback (Windows), "
        "run by test_signal_fallback_calls_back_without_loop_signal_handlers",
}


def _sources():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name not in GENERATED:
            yield name, ast.parse(path.read_text())


def _dotted(node: ast.AST) -> str | None:
    """``os.sysconf`` for ``os.sysconf``; None for anything but names joined by dots."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _symbol(node: ast.AST) -> str | None:
    """The POSIX-only thing ``node`` names, if any."""
    if isinstance(node, ast.Import):
        names = [alias.name.split(".")[0] for alias in node.names]
        return next((name for name in names if name in POSIX_MODULES), None)
    if isinstance(node, ast.ImportFrom) and node.module:
        if node.module.split(".")[0] in POSIX_MODULES:
            return node.module.split(".")[0]
        names = POSIX_NAMES.get(node.module, set())
        hit = [f"{node.module}.{alias.name}" for alias in node.names if alias.name in names]
        return hit[0] if hit else None
    if isinstance(node, ast.Attribute):
        if node.attr in LOOP_SIGNAL_METHODS:
            return node.attr
        dotted = _dotted(node)
        if dotted and dotted.count(".") == 1:
            module, name = dotted.split(".")
            if name in POSIX_NAMES.get(module, ()):
                return dotted
    if isinstance(node, ast.keyword) and node.arg in POSIX_KEYWORDS:
        return node.arg
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return next((p for p in POSIX_PATH_PREFIXES if node.value.startswith(p)), None)
    return None


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _ancestors(node: ast.AST, parents: dict) -> list[ast.AST]:
    chain = []
    while node in parents:
        chain.append((parents[node], node))
        node = parents[node]
    return chain


def _handler_names(handler: ast.ExceptHandler) -> set[str]:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return {_dotted(kind) or "" for kind in kinds if kind is not None}


def _is_platform_test(test: ast.AST) -> bool:
    text = ast.unparse(test)
    return any(word in text for word in ("hasattr(", "sys.platform", "os.name",
                                         "platform.system", "is not None", "is None"))


def _is_guarded(node: ast.AST, parents: dict) -> bool:
    """Inside a try catching a platform's error, or an if/else testing the platform; or (a
    path constant) in a function that catches OSError when it reads the path."""
    for parent, child in _ancestors(node, parents):
        if isinstance(parent, ast.Try) and child in parent.body and any(
                _handler_names(h) & GUARD_ERRORS for h in parent.handlers):
            return True
        if isinstance(parent, (ast.If, ast.IfExp)) and child is not parent.test \
                and _is_platform_test(parent.test):
            return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)) \
                and isinstance(node, ast.Constant):
            return any(isinstance(n, ast.ExceptHandler) and "OSError" in _handler_names(n)
                       for n in ast.walk(parent))
    return False


def _findings() -> list[tuple[str, str, int, bool]]:
    """(module, symbol, line, guarded) of every POSIX-only use in molink/."""
    found = []
    for name, tree in _sources():
        parents = _parents(tree)
        for node in ast.walk(tree):
            symbol = _symbol(node)
            if symbol:
                guarded = _is_guarded(node, parents)
                found.append((name, symbol, getattr(node, "lineno", 0), guarded))
    return found


def test_the_scan_finds_what_it_looks_for():
    """The scanner itself: each kind of POSIX-only use is recognised, and guards are told
    apart from unguarded uses (else an empty result would prove nothing)."""
    code = ("import fcntl\nimport os, signal\nfrom os import fork\n"
            "os.setsid()\nsignal.SIGKILL\nloop.add_signal_handler(1, f)\n"
            "subprocess.Popen(a, preexec_fn=g)\nopen('/proc/meminfo')\n"
            "try:\n    os.getuid()\nexcept AttributeError:\n    pass\n"
            "x = os.sysconf('A') if hasattr(os, 'sysconf') else 0\n")
    tree = ast.parse(code)
    parents = _parents(tree)
    hits = {(_symbol(n), _is_guarded(n, parents)) for n in ast.walk(tree) if _symbol(n)}
    assert hits == {("fcntl", False), ("os.fork", False), ("os.setsid", False),
                    ("signal.SIGKILL", False), ("add_signal_handler", False),
                    ("preexec_fn", False), ("/proc/", False), ("os.getuid", True),
                    ("os.sysconf", True)}


def test_no_posix_only_call_outside_the_allowlist():
    unlisted = sorted(f"{name}:{line} {symbol}" for name, symbol, line, _ in _findings()
                      if (name, symbol) not in ALLOWED)
    assert not unlisted, ("POSIX-only calls (guard them and list them in ALLOWED with the "
                          f"reason, or use a portable call): {unlisted}")


def test_every_allowed_posix_call_is_guarded():
    unguarded = sorted(f"{name}:{line} {symbol}" for name, symbol, line, guarded in _findings()
                       if (name, symbol) in ALLOWED and not guarded)
    assert not unguarded, f"allowed POSIX-only calls must sit under a guard: {unguarded}"


def test_every_allowlist_entry_is_still_needed():
    found = {(name, symbol) for name, symbol, _, _ in _findings()}
    assert not set(ALLOWED) - found, f"stale ALLOWED entries: {set(ALLOWED) - found}"


# ---------------------------------------------------------------- signals


def test_signal_fallback_calls_back_without_loop_signal_handlers():
    """Windows' event loop raises NotImplementedError from add_signal_handler: the stage
    still stops at SIGINT / SIGTERM, through signal.signal."""
    from molink.entrypoints.signals import on_signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    tried, called = [], []

    def no_loop_handlers(sig, callback, *args):
        tried.append(sig)
        raise NotImplementedError

    async def main() -> None:
        stopped = asyncio.Event()
        loop = asyncio.get_running_loop()
        with mock.patch.object(loop, "add_signal_handler", no_loop_handlers):
            on_signal(lambda: (called.append(1), stopped.set()))
        for sig in (signal.SIGINT, signal.SIGTERM):
            stopped.clear()
            signal.raise_signal(sig)
            await asyncio.wait_for(stopped.wait(), 5)

    try:
        asyncio.run(main())
        assert tried == [signal.SIGINT, signal.SIGTERM]
        assert called == [1, 1]
        # After the loop has closed, the fallback behaves as Python's default handler.
        with pytest.raises(KeyboardInterrupt):
            signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows' loops have no signal handlers")
def test_loop_signal_handlers_are_used_where_they_exist():
    """On Linux and macOS the loop's own handlers, as before (remove_signal_handler is True
    only for a handler the loop holds)."""
    from molink.entrypoints.signals import on_signal

    async def main() -> None:
        on_signal(lambda: None)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            assert loop.remove_signal_handler(sig)

    asyncio.run(main())


# ---------------------------------------------------------------- what a platform lacks


def test_no_sysconf_no_affinity_no_proc(monkeypatch):
    """Windows has no os.sysconf, no os.sched_getaffinity and no /proc: the KV budget, core
    count and offered memory fall back to their stated defaults instead of failing."""
    import builtins

    from molink.runtime import host, kv_cache, node_budget

    real_open = builtins.open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.delattr("os.sysconf")
    monkeypatch.delattr("os.sched_getaffinity")
    monkeypatch.setattr(builtins, "open", no_proc)
    assert kv_cache.default_kv_budget_bytes(torch.device("cpu")) == 2 * 1024**3
    assert host.cpu_cores() >= 1
    assert host.cpu_set() == ""  # unknown: the head assumes any core
    assert node_budget.available_host_memory() == 8 * 2**30


# ---------------------------------------------------------------- CUDA, MPS, CPU


@pytest.mark.parametrize(("cuda", "mps", "expected"), [
    (True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_device_picks_cuda_then_mps_then_cpu(cuda, mps, expected):
    from molink.runtime.stage_executor import resolve_device

    with mock.patch.object(torch.cuda, "is_available", return_value=cuda), \
            mock.patch.object(torch.backends.mps, "is_available", return_value=mps):
        assert resolve_device("auto") == torch.device(expected)


def test_mps_path_asks_nothing_of_cuda():
    """On MPS: timing synchronizes MPS, the KV budget and the dtype rules are not CUDA's."""
    from molink.model.loader import load_config, resolve_dtype
    from molink.runtime import kv_cache, node_budget

    mps = torch.device("mps")
    with mock.patch.object(torch.mps, "synchronize") as mps_sync, \
            mock.patch.object(torch.cuda, "synchronize", side_effect=AssertionError("cuda")), \
            mock.patch.object(torch.cuda, "mem_get_info", side_effect=AssertionError("cuda")):
        node_budget._synchronize(mps)
        node_budget._synchronize(torch.device("cpu"))
        assert mps_sync.call_count == 1
        assert kv_cache.default_kv_budget_bytes(mps) > 0
        assert node_budget.offered_memory(mps, None, None) > 0
    arch = load_config(str(PACKAGE / "assets" / "default_model")).arch
    assert resolve_dtype("auto", arch, mps) == torch.float16  # the checkpoint's, as on CUDA


CUDA_QUERIES = {"is_available", "device_count"}  # safe to ask on any machine


def _mentions_cuda(test: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == "cuda" for n in ast.walk(test))


def _under_device_check(node: ast.AST, parents: dict) -> bool:
    """Inside ``if ... "cuda" ...``, or after an ``if ... != "cuda": return`` in its function."""
    for parent, child in _ancestors(node, parents):
        if isinstance(parent, (ast.If, ast.IfExp)) and child is not parent.test \
                and _mentions_cuda(parent.test):
            return True
        if isinstance(parent, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return any(isinstance(s, ast.If) and _mentions_cuda(s.test) and s.lineno < node.lineno
                       and isinstance(s.body[-1], (ast.Return, ast.Raise))
                       for s in ast.walk(parent))
    return False


def _cuda_problem(node: ast.Call, parents: dict) -> str | None:
    """What assumes CUDA in this call, if anything."""
    called = _dotted(node.func) or ""
    if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
        return "a .cuda() call"
    if not called.startswith("torch.cuda.") or called.split(".")[2] in CUDA_QUERIES:
        return None
    if not _under_device_check(node, parents):
        return f"{called} without a device check"
    if called == "torch.cuda.synchronize":
        function = next(p for p, _ in _ancestors(node, parents)
                        if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)))
        if "torch.mps.synchronize" not in ast.unparse(function):
            return f"{called} with no MPS counterpart beside it"
    return None


def test_cuda_only_calls_sit_under_a_device_check():
    """Nothing on any path assumes CUDA: torch.cuda calls only where the device is CUDA,
    no ``.cuda()``, and a CUDA synchronize always has its MPS counterpart beside it."""
    bad = []
    for name, tree in _sources():
        parents = _parents(tree)
        for node in ast.walk(tree):
            problem = isinstance(node, ast.Call) and _cuda_problem(node, parents)
            if problem:
                bad.append(f"{name}:{node.lineno} {problem}")
    assert not bad, f"CUDA-only calls: {bad}"


def test_the_cuda_scan_finds_what_it_looks_for():
    code = ("def a(x):\n    x.cuda()\n    torch.cuda.synchronize()\n"
            "def b(device):\n    if device.type == 'cuda':\n        torch.cuda.synchronize()\n"
            "def c(device):\n    if device.type != 'cuda':\n        return 0\n"
            "    torch.cuda.mem_get_info(device)\n    torch.cuda.is_available()\n")
    tree = ast.parse(code)
    parents = _parents(tree)
    found = [(n.lineno, _cuda_problem(n, parents)) for n in ast.walk(tree)
             if isinstance(n, ast.Call) and _cuda_problem(n, parents)]
    assert sorted(found) == [(2, "a .cuda() call"),
                             (3, "torch.cuda.synchronize without a device check"),
                             (6, "torch.cuda.synchronize with no MPS counterpart beside it")]
