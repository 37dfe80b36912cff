"""Reading OpenAI-style server-sent events in tests."""

from __future__ import annotations

import json


def sse_data(text: str) -> list[dict | str]:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    events = [block for block in text.split("\n\n") if block]
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    payloads = [event.removeprefix("data: ") for event in events]
    return [data if data == "[DONE]" else json.loads(data) for data in payloads]
