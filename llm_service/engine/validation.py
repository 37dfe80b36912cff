"""Checks a request against the loaded model before it reaches an engine's queue.

Both engines (torch and TensorRT-LLM) call `validate_request` with their own `Limits`, so a
request is refused with the same words whichever engine serves it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from llm_service.engine.errors import InvalidRequest
from llm_service.engine.protocol import EmbeddingSpan, EngineRequest


@dataclass(frozen=True, slots=True)
class Limits:
    max_model_len: int  # prompt + output tokens of one sequence
    vocab_size: int
    hidden_size: int  # the width every embedding row must have
    max_num_seqs: int  # sequences running at once: the most choices (n) one request may have
    max_input_len: int | None = None  # a built engine's own cap on prompt tokens

    @property
    def max_prompt_len(self) -> int:
        """One position stays free for output."""
        limit = self.max_model_len - 1
        return limit if self.max_input_len is None else min(limit, self.max_input_len)


def validate_request(request: EngineRequest, limits: Limits) -> None:
    """Raises InvalidRequest with what to change.

    max_tokens is not checked: a request asking for more tokens than fit in max_model_len is
    clamped and finishes with LENGTH when it reaches the context length.
    """
    ids = request.prompt_token_ids
    n = len(ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty")
    if n > limits.max_prompt_len:
        raise InvalidRequest(f"the prompt has {n} tokens; this engine takes at most "
                             f"{limits.max_prompt_len} (max_model_len is {limits.max_model_len}, "
                             f"with room for output): shorten it")
    if request.sampling.n > limits.max_num_seqs:
        raise InvalidRequest(f"n={request.sampling.n} exceeds the engine's max_num_seqs="
                             f"{limits.max_num_seqs}; ask for fewer choices")
    check_spans(request.spans, n, limits.hidden_size)
    outside = [t for t, _ in request.sampling.logit_bias if t >= limits.vocab_size]
    if outside:
        raise InvalidRequest(f"logit_bias: token ids {outside[:5]} are outside the vocabulary "
                             f"[0, {limits.vocab_size})")
    if min(ids) < 0 or max(ids) >= limits.vocab_size:
        covered = {p for s in request.spans for p in range(s.start, s.end)}
        for position, token in enumerate(ids):
            if not 0 <= token < limits.vocab_size and position not in covered:
                raise InvalidRequest(f"token id {token} at position {position} is outside the "
                                     f"vocabulary [0, {limits.vocab_size})")


def check_spans(spans: Iterable[EmbeddingSpan], prompt_len: int, hidden_size: int) -> None:
    """Span geometry: 2-D floating-point rows of the model's width, inside the prompt, in
    order without overlap, each naming its content."""
    end = 0
    for i, span in enumerate(sorted(spans, key=lambda s: s.start)):
        shape = tuple(getattr(span.embeddings, "shape", ()))
        if len(shape) != 2 or shape[1] != hidden_size:
            width = f"width {shape[1]}" if len(shape) == 2 else f"shape {list(shape)}"
            raise InvalidRequest(f"span {i}: embedding rows have {width}; the engine expects "
                                 f"[rows, {hidden_size}] (its hidden size)")
        if not getattr(span.embeddings.dtype, "is_floating_point", False):
            raise InvalidRequest(f"span {i}: embeddings must be floating point, "
                                 f"got {span.embeddings.dtype}")
        if span.length < 1 or span.start < 0 or span.end > prompt_len:
            raise InvalidRequest(f"span {i} covers positions [{span.start}, {span.end}), outside "
                                 f"the prompt's [0, {prompt_len})")
        if span.start < end:
            raise InvalidRequest(f"span {i} at position {span.start} overlaps the previous span")
        if not span.content_hash:
            raise InvalidRequest(f"span {i} has no content_hash (it keys the prefix cache)")
        end = span.end
