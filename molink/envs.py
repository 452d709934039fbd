"""Every environment variable MoLink reads, in one place."""

from __future__ import annotations

import os

CLUSTER_TOKEN_VAR = "MOLINK_CLUSTER_TOKEN"


def cluster_token() -> str | None:
    """The shared cluster secret, when not given on the command line."""
    return os.environ.get(CLUSTER_TOKEN_VAR) or None
