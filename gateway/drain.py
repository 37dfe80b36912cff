"""Graceful drain of the gateway, and uvicorn told to exit only once it has drained.

On SIGTERM the gateway keeps listening (a client already routed here gets an answer, not
a refused connection) but `/ready` turns 503, so Kubernetes stops sending traffic; new API
requests get a 503 OpenAI error; requests in flight (SSE streams) finish. Once none is left,
or the grace period (`--shutdown-grace-s`, below the pod's terminationGracePeriodSeconds)
ends, uvicorn shuts down as usual. A second signal stops at once.
"""

from __future__ import annotations

import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.errors import APIError

# Probes and scrapes answer while draining: /ready is how the drain is announced.
UNCOUNTED = frozenset({"/health", "/ready", "/metrics"})
DRAINING_MESSAGE = "The gateway is shutting down; retry the request (another replica serves it)."


class Drain:
    """Whether the gateway drains, and how many API requests are in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    def start(self) -> None:
        self.draining = True


class DrainMiddleware:
    """Refuses new API requests with 503 once draining; counts the ones in flight."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self._drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNCOUNTED:
            await self.app(scope, receive, send)
            return
        if self._drain.draining:
            error = APIError(503, DRAINING_MESSAGE, type="server_error",
                             code="service_unavailable",
                             headers={"Connection": "close", "Retry-After": "1"})
            await error.response()(scope, receive, send)
            return
        self._drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._drain.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT starts a drain instead of closing the socket."""

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_s: float) -> None:
        super().__init__(config)
        self._drain = drain
        self._grace_s = grace_s
        self._deadline = 0.0

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain.draining or self._grace_s <= 0:
            super().handle_exit(sig, frame)
            return
        self._drain.start()
        self._deadline = time.monotonic() + self._grace_s

    async def on_tick(self, counter: int) -> bool:
        # Ticks come every 0.1 s: the drain ends within that of the last request.
        if (self._drain.draining and not self.should_exit
                and (self._drain.in_flight == 0 or time.monotonic() >= self._deadline)):
            self.should_exit = True  # a drained exit is a clean one: status 0
        return await super().on_tick(counter)
