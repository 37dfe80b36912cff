"""What one HTTP request did, for its log line and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

_SCOPE_KEY = "record"
NO_ID = "-"  # requests that start no generation


@dataclass(slots=True)
class RequestRecord:
    """Created when the request arrives, filled in by the route, reported when
    the response (streamed or not) has ended."""

    started: float  # time.perf_counter()
    request_id: str = NO_ID
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None


def attach(scope_state: dict, record: RequestRecord) -> None:
    scope_state[_SCOPE_KEY] = record


def record_of(request: Request) -> RequestRecord:
    return getattr(request.state, _SCOPE_KEY)
