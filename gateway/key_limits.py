"""Optional per-API-key concurrency limit: one tenant cannot take every generation slot.

Off by default (`--max-concurrent-per-key`). Over the limit a request gets 429 with an
OpenAI error naming the limit, and `Retry-After` from how long that key's requests take
(smoothed) spread over its slots: about when the next one of them frees a slot.
"""

from __future__ import annotations

import math
import time
from collections import Counter

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import OPEN_PATHS, OPEN_PREFIXES
from gateway.errors import APIError

_SMOOTHING = 0.2  # weight of the newest request in the smoothed duration
_MAX_TRACKED = 10_000  # an open API sees any token: the durations kept stay bounded


class KeyConcurrencyMiddleware:
    """Counts API requests in flight per bearer token (an unkeyed request is one tenant)."""

    def __init__(self, app: ASGIApp, limit: int | None) -> None:
        self.app = app
        self._limit = limit
        self._in_flight: Counter[str] = Counter()
        self._duration_s: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (self._limit is None or scope["type"] != "http" or scope["path"] in OPEN_PATHS
                or scope["path"].startswith(OPEN_PREFIXES)):
            await self.app(scope, receive, send)
            return
        key = Headers(scope=scope).get("authorization", "").partition(" ")[2].strip()
        if self._in_flight[key] >= self._limit:
            await self._refusal(key)(scope, receive, send)
            return
        self._in_flight[key] += 1
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)
        finally:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
            took = time.monotonic() - started
            if len(self._duration_s) >= _MAX_TRACKED and key not in self._duration_s:
                self._duration_s.clear()
            last = self._duration_s.get(key, took)
            self._duration_s[key] = last + _SMOOTHING * (took - last)

    def _refusal(self, key: str) -> JSONResponse:
        assert self._limit is not None
        wait = max(1, math.ceil(self._duration_s.get(key, 1.0) / self._limit))
        return APIError(
            429, f"This API key already has {self._limit} requests in flight, the gateway's "
                 f"per-key concurrency limit (max_concurrent_per_key={self._limit}); retry when "
                 "one of them has finished.",
            type="rate_limit_error", code="concurrency_limit_exceeded",
            headers={"Retry-After": str(wait)}).response()
