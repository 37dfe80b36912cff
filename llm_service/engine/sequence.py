"""One generated choice of a request: its tokens, its KV blocks and how far the cache has got."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from llm_service.engine.protocol import EmbeddingSpan, EngineRequest, FinishReason, SamplingParams

if TYPE_CHECKING:
    from llm_service.engine.grammar import GrammarState


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4

    @property
    def is_finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    SequenceStatus.FINISHED_STOPPED: FinishReason.STOP,
    SequenceStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    SequenceStatus.FINISHED_ABORTED: FinishReason.ABORT,
}


class Sequence:
    """Token ids = prompt + outputs. The first `num_computed_tokens` have KV in `block_table`."""

    __slots__ = (
        "seq_id", "request_id", "index", "token_ids", "num_prompt_tokens", "sampling", "spans",
        "stop_token_ids", "priority", "arrival", "max_total_tokens", "block_table",
        "block_hashes", "num_hashed_blocks", "num_computed_tokens", "num_cached_tokens",
        "num_pending_forks", "status", "error", "grammar", "queued_at", "queue_time_s",
    )

    def __init__(self, seq_id: int, request: EngineRequest, arrival: int, max_model_len: int,
                 index: int = 0, grammar: GrammarState | None = None) -> None:
        sampling = request.sampling
        self.seq_id = seq_id
        self.request_id = request.request_id
        self.index = index  # choice index within the request
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling: SamplingParams = sampling
        self.spans: tuple[EmbeddingSpan, ...] = request.spans
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop.update(request.eos_token_ids)
        self.stop_token_ids = frozenset(stop)
        self.priority = request.priority
        self.arrival = arrival
        # max_tokens past the context length is clamped: the sequence ends with LENGTH there.
        self.max_total_tokens = min(self.num_prompt_tokens + sampling.max_tokens, max_model_len)
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # memo: chained hashes of the full blocks so far
        self.num_hashed_blocks = 0  # leading blocks already offered to the prefix cache
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.num_pending_forks = sampling.n - 1 if index == 0 else 0
        self.status = SequenceStatus.WAITING
        self.error: str | None = None
        # Structured output: this choice's place in its grammar, advanced with each token.
        self.grammar = grammar
        self.queued_at = time.monotonic()
        self.queue_time_s: float | None = None  # queued -> first scheduled

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, request={self.request_id!r}, index={self.index}, "
                f"tokens={len(self)}, computed={self.num_computed_tokens}, "
                f"blocks={self.block_table}, status={self.status.name})")

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def priority_key(self) -> tuple[int, int, int]:
        """Sort key for the waiting queue: earlier arrival first, choices in order."""
        return (-self.priority, self.arrival, self.index)

    def span_keys(self, start: int, end: int) -> tuple[tuple[str, int, int], ...]:
        """The media content behind positions [start, end): (content_hash, first row, last row + 1).

        Mixed into block hashes so that two images behind the same placeholder ids never share KV.
        """
        return tuple(
            (s.content_hash, max(start, s.start) - s.start, min(end, s.end) - s.start)
            for s in self.spans
            if s.start < end and start < s.end
        )

    def fork(self, seq_id: int, index: int) -> Sequence:
        """A sibling choice with the same prompt and no KV yet; it samples its own tokens."""
        child = object.__new__(Sequence)
        for name in Sequence.__slots__:
            setattr(child, name, getattr(self, name))
        child.seq_id = seq_id
        child.index = index
        child.token_ids = self.token_ids[: self.num_prompt_tokens]
        child.block_table = []
        child.block_hashes = []
        child.num_hashed_blocks = 0
        child.num_computed_tokens = 0
        child.num_pending_forks = 0
        child.status = SequenceStatus.RUNNING
        child.grammar = self.grammar.fresh() if self.grammar is not None else None
        return child
