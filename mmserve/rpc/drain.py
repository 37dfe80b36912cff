"""Graceful drain of a gRPC server: count in-flight calls, refuse new ones once draining.

On SIGTERM a server first reports NOT_SERVING (Kubernetes takes the pod out of its
Service), then refuses new calls with UNAVAILABLE and a message saying why, while the
calls already running (a 300-token stream) finish, for at most the grace period. The grace
period must be below the pod's `terminationGracePeriodSeconds`, after which the kubelet
sends SIGKILL. Health checks and reflection are never refused or counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

DRAINING_MESSAGE = "the server is shutting down; retry on another replica"
# Health and reflection answer while draining: a probe must see NOT_SERVING, not an error.
EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class Drain(grpc.aio.ServerInterceptor):
    """Counts calls in flight; after `start()` new calls end UNAVAILABLE at once."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self.draining = True

    async def wait(self, grace_s: float) -> float:
        """Waits until no call is in flight or `grace_s` passed; returns the seconds left."""
        deadline = time.monotonic() + grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=grace_s)
        return max(0.0, deadline - time.monotonic())

    def enter(self) -> None:
        """One more unit of work in flight (a call, or one generation of a multiplexed call)."""
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary), handler.request_deserializer,
                handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream), handler.request_deserializer,
                handler.response_serializer)
        if handler.stream_stream is not None:
            # A multiplexed call lives as long as its client: it is refused once draining but
            # not counted; its handler counts each generation it carries (enter / leave).
            return grpc.stream_stream_rpc_method_handler(
                self._refused_when_draining(handler.stream_stream),
                handler.request_deserializer, handler.response_serializer)
        return handler  # client-streaming calls: none in mmserve

    def _unary(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if self.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            self.enter()
            try:
                return await behavior(request, context)
            finally:
                self.leave()
        return unary

    def _refused_when_draining(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            async for response in behavior(requests, context):
                yield response
        return stream

    def _stream(self, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if self.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
            self.enter()
            try:
                async for response in behavior(request, context):
                    yield response
            finally:
                self.leave()
        return stream
