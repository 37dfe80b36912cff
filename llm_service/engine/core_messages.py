"""The messages between TorchEngine and its step loop, the same in a thread or a process
(where they travel pickled through a pipe, tensors through shared memory)."""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.engine.protocol import EngineOutput, EngineRequest, EngineStats


# --- messages to the core --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Add:
    request: EngineRequest


@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class Finish:
    """Ends one choice with STOP (its caller matched a stop string) and frees its blocks."""

    request_id: str
    index: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Aborts whatever is left and ends the loop."""


# --- messages from the core ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Started:
    family: str
    device: str
    dtype: str
    num_blocks: int
    block_size: int
    hidden_size: int
    vocab_size: int
    max_model_len: int


@dataclass(frozen=True, slots=True)
class Outputs:
    """A step's outputs (or an abort's), with the state that produced them."""

    outputs: list[EngineOutput]
    stats: EngineStats


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request the core refused; it holds nothing. invalid: the request is at fault (its
    structured output cannot be compiled), else the queue is full."""

    request_id: str
    message: str
    invalid: bool = False


@dataclass(frozen=True, slots=True)
class Failed:
    """The core cannot go on (or could not start); every unfinished request fails."""

    message: str
    at_start: bool = False
    kind: str = ""  # the exception's type, for start-up failures callers tell apart


ToCore = Add | Abort | Finish | Stop
FromCore = Started | Outputs | Rejected | Failed
