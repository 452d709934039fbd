"""ApiKeyGuard: with ``--api-key``, the serving routes need ``Authorization: Bearer <key>``.

Guarded: ``/v1/*``, ``/generate``, ``/tokenize``, ``/detokenize`` and ``/version``
(everything that runs, lists or describes the model). Open:
``/health`` and ``/metrics`` (for monitors and load balancers) and the API's description
``/docs`` and ``/openapi.json`` (the schema of the request bodies, nothing of the model or
its traffic), as in vLLM. A wrong or missing key is a 401 in OpenAI's shape, answered before
the body is read.
"""

from __future__ import annotations

import secrets

from molink.entrypoints.api_errors import error


class ApiKeyGuard:
    """ASGI middleware."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and guarded(scope["path"]):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                response = error(401, "missing or incorrect API key: send 'Authorization: "
                                      "Bearer <key>'", "authentication_error")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


KEYED_PATHS = frozenset({"/generate", "/v1", "/tokenize", "/detokenize", "/version"})


def guarded(path: str) -> bool:
    return path in KEYED_PATHS or path.startswith("/v1/")
