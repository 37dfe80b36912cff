"""One running request on the engine side: executor Results in, EngineOutputs out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import ModuleType

from llm_service.engine.protocol import EngineOutput, FinishReason, TokenLogprob

# Executor finish reasons by name: CANCELLED and TIMED_OUT exist in newer bindings only.
FINISH_REASONS = {
    "END_ID": FinishReason.STOP,
    "STOP_WORDS": FinishReason.STOP,
    "LENGTH": FinishReason.LENGTH,
    "CANCELLED": FinishReason.ABORT,
    "TIMED_OUT": FinishReason.ABORT,
}


def finish_reason_map(bindings: ModuleType) -> dict:
    """`bindings.FinishReason` member -> FinishReason, for the members this version has."""
    return {getattr(bindings.FinishReason, name): reason for name, reason in FINISH_REASONS.items()
            if hasattr(bindings.FinishReason, name)}


@dataclass(slots=True)
class RequestStream:
    """Where a request's outputs go (a queue ending with None) and which choices are open."""

    name: str
    executor_id: int
    prompt_len: int
    max_tokens: int
    n: int
    tokens_per_block: int = 0
    cached_tokens: int = 0  # prompt tokens in reused KV blocks, when the executor reports it
    # The request's prompt table: the executor copies it to the GPU asynchronously, so it is
    # kept until the request ends (pinned host memory freed early could be handed out again).
    table: object = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    counts: list[int] = field(default_factory=list)
    open: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.counts = [0] * self.n
        self.open = set(range(self.n))

    def push(self, result, finish_map: dict) -> bool:
        """Queues the output of one executor Result; True once every choice has finished."""
        index = result.sequence_index if self.n > 1 else 0
        final = result.is_sequence_final if self.n > 1 else result.is_final
        if index not in self.open:
            return not self.open
        tokens = list(result.output_token_ids[0])
        self.counts[index] += len(tokens)
        self._note_reuse(result)
        reason = self._finish_reason(index, result, finish_map) if final else None
        logprobs: tuple[TokenLogprob, ...] = ()
        if result.log_probs:
            # Take the tail: whether streamed log probs are deltas or cumulative is not
            # documented, and the tail is right in both cases.
            values = list(result.log_probs[0])[-len(tokens):] if tokens else []
            logprobs = tuple(TokenLogprob(t, float(lp)) for t, lp in zip(tokens, values))
        self.queue.put_nowait(self._output(index, tokens, reason, logprobs=logprobs))
        if final:
            self.open.discard(index)
        if not self.open:
            self.queue.put_nowait(None)
        return not self.open

    def _note_reuse(self, result) -> None:
        metrics = getattr(result, "request_perf_metrics", None)
        kv = getattr(metrics, "kv_cache_metrics", None)
        if kv is not None and kv.num_reused_blocks:
            reused = min(kv.num_reused_blocks * self.tokens_per_block, self.prompt_len)
            self.cached_tokens = max(self.cached_tokens, reused)

    def finish(self, index: int) -> bool:
        """Ends choice `index` with STOP now (its caller matched a stop string); later
        results for it are dropped. True once no choice is open."""
        if index in self.open:
            self.queue.put_nowait(self._output(index, [], FinishReason.STOP))
            self.open.discard(index)
            if not self.open:
                self.queue.put_nowait(None)
        return not self.open

    def close(self, reason: FinishReason, error: str | None = None) -> None:
        """Finishes every open choice with `reason` (and `error`) and ends the queue."""
        if not self.open:
            return
        for index in sorted(self.open):
            self.queue.put_nowait(self._output(index, [], reason, error=error))
        self.open.clear()
        self.queue.put_nowait(None)

    def _finish_reason(self, index: int, result, finish_map: dict) -> FinishReason:
        reasons = list(result.finish_reasons or [])
        reason = finish_map.get(reasons[0]) if reasons else None
        if reason is None:  # NOT_FINISHED on a final result (older bindings): infer it
            done = self.counts[index] >= self.max_tokens
            reason = FinishReason.LENGTH if done else FinishReason.STOP
        return reason

    def _output(self, index: int, tokens: list[int], reason: FinishReason | None,
                error: str | None = None, logprobs: tuple = ()) -> EngineOutput:
        return EngineOutput(request_id=self.name, index=index, new_token_ids=tokens,
                            finish_reason=reason, num_prompt_tokens=self.prompt_len,
                            num_output_tokens=self.counts[index],
                            num_cached_tokens=self.cached_tokens, logprobs=logprobs, error=error)
