"""Connection hygiene for uvicorn's h11 server: a deadline for a request's headers.

uvicorn closes idle keep-alive connections (`timeout_keep_alive`) and can answer 503 past
a connection count (`limit_concurrency`), but a client that opens a connection and sends
nothing, or dribbles its headers a byte at a time, holds it forever. This protocol gives
every request `header_timeout_s` from its first byte (or from the connection's opening) to
the end of its headers, then closes the connection. Once the headers are in, the timer is
off: the body has its own deadline (body_limit.py) and a response, an SSE stream included,
may take as long as it takes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


def header_timeout_protocol(header_timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header-read deadline of `header_timeout_s`."""

    class HeaderTimeoutProtocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_headers():
                self._arm()  # a later request on a kept-alive connection: a new deadline
            super().data_received(data)
            if not self._waiting_for_headers():
                self._disarm()

        def _waiting_for_headers(self) -> bool:
            return self.conn.their_state is h11.IDLE

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                logger.info("closing a connection from %s: no complete request headers "
                            "within %gs", self.client, header_timeout_s)
                self.transport.close()

    return HeaderTimeoutProtocol
