"""What crosses between the event loop and the torch engine's thread, typed.

`Message`s go to the engine thread through its inbox; `StreamItem`s come back to each
request's stream on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.engine.protocol import EngineOutput, EngineRequest


@dataclass(frozen=True, slots=True)
class Add:
    """A validated request to schedule."""

    request: EngineRequest


@dataclass(frozen=True, slots=True)
class Abort:
    """Finish every choice of a request with ABORT and free its blocks."""

    request_id: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Finish one choice with STOP (its caller matched a stop string) and free its blocks."""

    request_id: str
    index: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop the step loop; what is still running finishes with ABORT."""


Message = Add | Abort | Finish | Shutdown


@dataclass(frozen=True, slots=True)
class Failed:
    """Ends a stream: every unfinished choice fails with this message."""

    message: str


# A step's outputs for the request, the end of a failed engine, or the error that refused
# the request (Overloaded).
StreamItem = list[EngineOutput] | Failed | Exception
