"""Peer authentication: every RPC carries the cluster token; servers refuse the rest.

The token travels in the ``x-molink-token`` metadata of every call and stream and is
compared in constant time. A peer that fails it is refused with ``UNAUTHENTICATED`` and a
message saying so, before any of its payload is parsed.
"""

from __future__ import annotations

import hmac
import logging

import grpc

logger = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "x-molink-token"
REFUSAL = "cluster token mismatch: this peer was started with a different --cluster-token"


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_METADATA_KEY, token),)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token.encode()

    async def intercept_service(self, continuation, handler_call_details):
        presented = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_METADATA_KEY, "")
        if hmac.compare_digest(presented.encode(), self._token):
            return await continuation(handler_call_details)
        logger.warning("refused %s: wrong or missing cluster token", handler_call_details.method)
        return _refusal_handler(await continuation(handler_call_details))


def _refusal_handler(handler):
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED."""

    async def abort_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)

    async def abort_stream(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    # The handler's deserializer is dropped: nothing from an unauthenticated peer is parsed.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort_unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    return grpc.unary_unary_rpc_method_handler(abort_unary)
