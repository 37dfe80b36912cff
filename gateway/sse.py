"""Server-sent events in the OpenAI streaming format."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.errors import APIError, ClientDisconnected, internal_error
from gateway.generation import Generation

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def event(payload: BaseModel | Mapping[str, Any], exclude: set[str] | None = None) -> str:
    """One `data: {json}` event."""
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=exclude)
    else:
        data = json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


async def with_ending(chunks: AsyncIterator[str]) -> AsyncGenerator[str, None]:
    """The OpenAI stream ending around a route's chunks: a failure after the
    response has started becomes an error event, and `[DONE]` comes last."""
    try:
        async for chunk in chunks:
            yield chunk
    except APIError as exc:
        yield event(exc.body())
    except ClientDisconnected:
        return  # nobody is listening any more
    except Exception:
        logger.exception("streaming a response failed")
        yield event(internal_error().body())
    yield DONE


class EventStreamResponse(StreamingResponse):
    """A streamed response that closes its generation however the stream ends:
    after the last event, on an error, or when the client goes away (Starlette
    then cancels the stream, possibly while the event generator waits at a yield
    and would otherwise never run its cleanup)."""

    def __init__(self, events: AsyncGenerator[str, None], generation: Generation) -> None:
        # no-cache and no proxy buffering: each event must reach the client when it is sent.
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                  **generation.headers})
        self._events = events
        self._generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._generation.close()
            await self._events.aclose()
