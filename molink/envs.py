"""Every environment variable MoLink reads, in one place."""

from __future__ import annotations

import os

CLUSTER_TOKEN_VAR = "MOLINK_CLUSTER_TOKEN"
API_KEY_VAR = "MOLINK_API_KEY"


def cluster_token() -> str | None:
    """The shared cluster secret, when not given on the command line."""
    return os.environ.get(CLUSTER_TOKEN_VAR) or None


def api_key() -> str | None:
    """The key HTTP clients must send as ``Authorization: Bearer <key>``, when not given
    on the command line."""
    return os.environ.get(API_KEY_VAR) or None


KEEPALIVE_VAR = "MOLINK_KEEPALIVE_S"
STATE_DIR_VAR = "MOLINK_STATE_DIR"


def keepalive_s() -> float:
    """Seconds between keepalive pings on idle peer connections (default 10). Tests shorten
    it to show, in seconds, what hours of idleness would do."""
    value = os.environ.get(KEEPALIVE_VAR)
    if not value:
        return 10.0
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{KEEPALIVE_VAR} must be a number of seconds, got {value!r}") from None
    if not 0.1 <= seconds <= 3600:
        raise ValueError(f"{KEEPALIVE_VAR} must be between 0.1 and 3600 seconds, got {value}")
    return seconds


def state_dir() -> str | None:
    """Where a node keeps what must outlive a restart (its TLS identity)."""
    return os.environ.get(STATE_DIR_VAR) or None


CPU_KERNELS_VAR = "MOLINK_CPU_KERNELS"
KERNEL_DIR_VAR = "MOLINK_KERNEL_DIR"


def cpu_kernels_enabled() -> bool:
    """Whether 16-bit weights on CPU may use MoLink's compiled kernels (``0`` turns them
    off; default on)."""
    return os.environ.get(CPU_KERNELS_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def kernel_dir() -> str:
    """Where compiled kernels are kept between runs."""
    return os.environ.get(KERNEL_DIR_VAR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "molink", "kernels")
