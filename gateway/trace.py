"""The root span of each API request, when tracing is configured (mmserve.tracing).

It continues a trace the client started (a `traceparent` header) and is the parent of
the LLM service's spans: the LLM client's interceptor sends it as gRPC metadata.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from mmserve.tracing import Tracing

UNTRACED = frozenset({"/health", "/ready", "/metrics"})


class TraceMiddleware:
    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self._tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (not self._tracing.enabled or scope["type"] != "http"
                or scope["path"] in UNTRACED):
            await self.app(scope, receive, send)
            return
        carrier = {key.decode("latin-1"): value.decode("latin-1")
                   for key, value in scope.get("headers", ())
                   if key in (b"traceparent", b"tracestate")}
        with self._tracing.request(f"gateway {scope['method']} {scope['path']}", carrier,
                                   **{"http.method": scope["method"],
                                      "http.target": scope["path"]}):
            await self.app(scope, receive, send)
