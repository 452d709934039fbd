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
