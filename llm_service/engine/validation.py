"""Checks a request against the loaded model before it reaches the engine thread."""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.engine.protocol import EngineRequest
from llm_service.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class Limits:
    max_model_len: int
    vocab_size: int
    hidden_size: int
    max_num_seqs: int


def validate_request(request: EngineRequest, limits: Limits) -> None:
    """Raises InvalidRequest with what to change.

    max_tokens is not checked: a request asking for more tokens than fit in max_model_len is
    clamped and finishes with LENGTH when it reaches the context length.
    """
    ids = request.prompt_token_ids
    n = len(ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty")
    if n >= limits.max_model_len:
        raise InvalidRequest(f"the prompt has {n} tokens but max_model_len is "
                             f"{limits.max_model_len}; shorten it to at most "
                             f"{limits.max_model_len - 1} tokens to leave room for output")
    if request.sampling.n > limits.max_num_seqs:
        raise InvalidRequest(f"n={request.sampling.n} exceeds the engine's max_num_seqs="
                             f"{limits.max_num_seqs}")
    _check_spans(request, limits.hidden_size)
    if min(ids) < 0 or max(ids) >= limits.vocab_size:
        covered = {p for s in request.spans for p in range(s.start, s.end)}
        for position, token in enumerate(ids):
            if not 0 <= token < limits.vocab_size and position not in covered:
                raise InvalidRequest(f"token id {token} at position {position} is outside the "
                                     f"vocabulary [0, {limits.vocab_size})")


def _check_spans(request: EngineRequest, hidden_size: int) -> None:
    n = len(request.prompt_token_ids)
    end = 0
    for i, span in enumerate(sorted(request.spans, key=lambda s: s.start)):
        shape = tuple(getattr(span.embeddings, "shape", ()))
        if len(shape) != 2:
            raise InvalidRequest(f"span {i}: embeddings must be 2-D [rows, hidden], got {shape}")
        if shape[1] != hidden_size:
            raise InvalidRequest(f"span {i}: embedding width {shape[1]} != the model's hidden "
                                 f"size {hidden_size}")
        if not getattr(span.embeddings.dtype, "is_floating_point", False):
            raise InvalidRequest(f"span {i}: embeddings must be floating point, "
                                 f"got {span.embeddings.dtype}")
        if span.length < 1 or span.start < 0 or span.end > n:
            raise InvalidRequest(f"span {i} covers positions [{span.start}, {span.end}), outside "
                                 f"the prompt's [0, {n})")
        if span.start < end:
            raise InvalidRequest(f"span {i} at position {span.start} overlaps the previous span")
        if not span.content_hash:
            raise InvalidRequest(f"span {i} has no content_hash (it keys the prefix cache)")
        end = span.end
