"""The request body cap (413) and deadline (408), with OpenAI error bodies."""

from __future__ import annotations

import asyncio
import time

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import CLIENT_CLOSED_REQUEST, APIError


class BodyLimitMiddleware:
    """Rejects bodies over `max_bytes`: at once when Content-Length says so,
    otherwise as soon as the bytes read pass the cap (chunked uploads); and bodies not
    complete `timeout_s` after the headers (a slow client holding a connection).

    The body is read here in full (the routes need it whole anyway) and replayed
    to the app; later `receive()` calls go to the server, so the routes still
    see the client disconnect.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        deadline = None if self._timeout_s is None else time.monotonic() + self._timeout_s
        while True:
            try:
                message = await asyncio.wait_for(
                    receive(), None if deadline is None else max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await self._too_slow().response()(scope, receive, send)
                return
            if message["type"] != "http.request":  # the client left mid-upload
                await Response(status_code=CLIENT_CLOSED_REQUEST)(scope, receive, send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_bytes:
                await self._too_large().response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    def _too_slow(self) -> APIError:
        return APIError(408, f"The request body did not arrive within {self._timeout_s:g} "
                        f"seconds; send it faster or make it smaller.", code="request_timeout",
                        headers={"Connection": "close"})

    def _too_large(self) -> APIError:
        return APIError(413, f"The request body is larger than {self._max_bytes} bytes.",
                        code="request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
