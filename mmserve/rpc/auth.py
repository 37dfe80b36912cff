"""A shared token on the internal gRPC links, for deployments without a PKI.

mTLS (`mmserve.rpc.tls`) is the production answer: it authenticates both ends and
encrypts. Where there is no PKI, every internal server can instead require one shared
secret in the `x-mmserve-token` metadata of each call (`TokenCheck`), and every internal
client sends it (`token_interceptors`). The token travels in clear text unless the channel
also uses TLS, so it stops callers that can reach the port but not read the traffic.

The standard health service and reflection stay open: Kubernetes' gRPC probes cannot send
metadata, and they reveal nothing but SERVING / NOT_SERVING and the service names.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

TOKEN_KEY = "x-mmserve-token"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
UNAUTHENTICATED_MESSAGE = (f"missing or wrong internal token: send the shared token in the "
                           f"{TOKEN_KEY} metadata (clients: --internal-token-file)")


def read_token(path: str | Path | None) -> bytes | None:
    """The token in `path` (surrounding whitespace dropped); None without a path.

    Raises ValueError when the file holds no token, so a blank file never opens a server."""
    if path is None or str(path) == "":
        return None
    token = Path(path).read_bytes().strip()
    if not token:
        raise ValueError(f"internal token file {path} is empty")
    return token


class TokenCheck(grpc.aio.ServerInterceptor):
    """Refuses every call but health and reflection without the token, UNAUTHENTICATED."""

    def __init__(self, token: bytes) -> None:
        self._token = token

    def authorized(self, metadata: Any) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == TOKEN_KEY:
                presented = value.encode() if isinstance(value, str) else bytes(value)
        # compare_digest takes the same time wherever the first differing byte is.
        return hmac.compare_digest(presented, self._token)

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if (handler is None or details.method.startswith(OPEN_PREFIXES)
                or self.authorized(details.invocation_metadata)):
            return handler
        return _refusal(handler)


def _refusal(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    async def unary(_: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    async def stream(_: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        yield  # pragma: no cover - abort raises

    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                     handler.response_serializer)
    return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                               handler.response_serializer)


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[TOKEN_KEY] = token
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(self, continuation: Any, details: Any,
                                      requests: Any) -> Any:
        return await continuation(_with_token(details, self._token), requests)


def token_interceptors(token: bytes | None) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that send `token` with every call; none without a token."""
    if token is None:
        return []
    text = token.decode()
    return [_UnaryUnary(text), _UnaryStream(text), _StreamStream(text)]
