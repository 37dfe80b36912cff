"""One log line and one set of metric observations per request, when it ends."""

from __future__ import annotations

import logging
import time
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import CLIENT_CLOSED_REQUEST
from gateway.metrics import GatewayMetrics
from gateway.request_record import NO_ID, RequestRecord, attach

logger = logging.getLogger("gateway.requests")

# Requests answered before routing (401, 413) or matching no route.
UNROUTED = "unrouted"
# Polled by probes and scrapers every few seconds: logged at DEBUG so they do not drown requests.
PROBES = frozenset({"/health", "/ready", "/metrics"})


class RequestLogMiddleware:
    """Outermost middleware: it sees every response, including the 401s and
    413s that never reach a route, and a streamed response only once it ended.
    It also returns the request id as the `x-request-id` header."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(started=time.perf_counter())
        attach(scope.setdefault("state", {}), record)
        status = 500  # what the server sends if the app fails before responding
        ended = gone = False  # the response's last byte was sent; the client left first

        async def receive_and_note_disconnect() -> Message:
            nonlocal gone
            message = await receive()
            gone = gone or (message["type"] == "http.disconnect" and not ended)
            return message

        async def send_and_note_status(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True
            if message["type"] == "http.response.start":
                status = message["status"]
                if record.request_id != NO_ID:
                    # Errors included, so a client can quote the id found in the logs.
                    MutableHeaders(scope=message)["x-request-id"] = record.request_id
            await send(message)

        self._metrics.in_flight.inc()
        try:
            await self.app(scope, receive_and_note_disconnect, send_and_note_status)
        finally:
            if gone:  # a stream cut short is not a 200, whatever its first line said
                status = CLIENT_CLOSED_REQUEST
            self._metrics.in_flight.dec()
            elapsed_s = time.perf_counter() - record.started
            # The router leaves the matched route in the scope; its path template,
            # not the raw path, keeps the metric labels bounded.
            route = getattr(scope.get("route"), "path", UNROUTED)
            self._metrics.observe(record, route, status, elapsed_s)
            ttft = "-" if record.ttft_s is None else f"{record.ttft_s * 1000:.1f}"
            level = logging.DEBUG if route in PROBES and status < 500 else logging.INFO
            # The keys of the LLM service's and the encoder's call lines (mmserve.rpc.calls):
            # one grep for request_id=<id> finds the request in all three services.
            logger.log(level, "http=%s request_id=%s status=%d ms=%.1f method=%s "
                       "prompt_tokens=%d completion_tokens=%d ttft_ms=%s", route,
                       record.request_id, status, elapsed_s * 1000, scope["method"],
                       record.prompt_tokens, record.completion_tokens, ttft)

