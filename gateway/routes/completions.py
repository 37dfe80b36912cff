"""POST /v1/completions: a raw prompt (string or token ids), no chat template."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.generation import FINISH_REASONS, Generation
from gateway.llm_client import completion_request_to_pb, llm_pb2
from gateway.protocol import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    ErrorResponse,
)
from gateway.auth import tenant_of
from gateway.request_record import record_of
from gateway.sse import EventStreamResponse, event, with_ending

router = APIRouter()


@router.post("/v1/completions", response_model=None,
             responses={200: {"model": Completion}, 400: {"model": ErrorResponse}})
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    identity = await request.app.state.served_model.resolve(body.model)
    identity.check_n(body.n)
    identity.check_output_limit(body.max_tokens, "max_tokens")
    request_id = f"cmpl-{uuid.uuid4().hex}"
    generation = await Generation.start(
        request.app.state.llm, completion_request_to_pb(body, request_id, identity.model_id),
        request.receive, record_of(request), tenant_of(request))
    envelope = identity.envelope(request_id)
    if body.stream:
        return EventStreamResponse(with_ending(_chunks(generation, body, envelope)), generation)
    choices = await generation.collect(body.n)
    completion = Completion(**envelope, usage=generation.usage, choices=[
        CompletionChoice(index=index, text=choice.text, finish_reason=choice.finish_reason,
                         logprobs=_logprobs(choice.logprobs, 0) if body.logprobs is not None
                         else None)
        for index, choice in enumerate(choices)
    ])
    return JSONResponse(completion.model_dump(mode="json"), headers=generation.headers)


async def _chunks(generation: Generation, body: CompletionRequest,
                  envelope: dict[str, Any]) -> AsyncIterator[str]:
    exclude = None if body.include_usage else {"usage"}
    text_offsets = [0] * body.n  # where each choice's next token starts in its text
    async for response in generation.responses():
        logprobs = None
        if body.logprobs is not None:
            logprobs = _logprobs(response.logprobs, text_offsets[response.index])
            text_offsets[response.index] += sum(len(entry.token) for entry in response.logprobs)
        finish_reason = FINISH_REASONS.get(response.finish_reason)
        if response.text or logprobs is not None or finish_reason:
            choice = CompletionChoice(index=response.index, text=response.text,
                                      logprobs=logprobs, finish_reason=finish_reason)
            yield event(Completion(**envelope, choices=[choice]), exclude)
    if body.include_usage:
        yield event(Completion(**envelope, choices=[], usage=generation.usage))


def _logprobs(entries: Sequence[llm_pb2.TokenLogprob], offset: int) -> CompletionLogprobs:
    """The legacy completions shape: parallel lists, top alternatives as token → logprob."""
    tokens, text_offsets = [], []
    for entry in entries:
        tokens.append(entry.token)
        text_offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[entry.logprob for entry in entries],
                              top_logprobs=[{top.token: top.logprob for top in entry.top}
                                            for entry in entries],
                              text_offset=text_offsets)
