"""The typed step contract: scheduler -> runner -> scheduler. No torch here."""

from __future__ import annotations

from dataclasses import dataclass, field

from llm_service.engine.protocol import TokenLogprob
from llm_service.engine.sequence import Sequence


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    start: int  # first position computed this step (= tokens already in the KV cache)
    num_tokens: int  # positions [start, start + num_tokens) are computed this step
    sample: bool  # the step reaches the last token, so it yields a new one


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    # Sequences released since the previous step; the runner drops their per-sequence state.
    finished_seq_ids: list[int] = field(default_factory=list)
    num_preempted: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class RunnerOutput:
    # Aligned with SchedulerOutput.scheduled: the sampled token, or None for a prefill chunk
    # that does not reach the end of its sequence.
    token_ids: list[int | None]
    logprobs: list[TokenLogprob | None] | None = None  # None when nobody asked for logprobs
