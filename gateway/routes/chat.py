"""POST /v1/chat/completions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from gateway.generation import FINISH_REASONS, ChoiceOutput, Generation
from gateway.llm_client import chat_request_to_pb, llm_pb2
from gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    ErrorResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from gateway.auth import tenant_of
from gateway.request_record import record_of
from gateway.sse import EventStreamResponse, event, with_ending

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None,
             responses={200: {"model": ChatCompletion}, 400: {"model": ErrorResponse}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    identity = await request.app.state.served_model.resolve(body.model)
    identity.check_output_limit(body.output_limit, "max_completion_tokens"
                                if body.max_completion_tokens is not None else "max_tokens")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    generation = await Generation.start(
        request.app.state.llm, chat_request_to_pb(body, request_id, identity.model_id),
        request.receive, record_of(request), tenant_of(request))
    envelope = identity.envelope(request_id)
    if body.stream:
        return EventStreamResponse(with_ending(_chunks(generation, body, envelope)), generation)
    choices = await generation.collect(body.n)
    completion = _completion(choices, generation.usage, body, envelope)
    return JSONResponse(completion.model_dump(mode="json"), headers=generation.headers)


def _completion(choices: list[ChoiceOutput], usage: Usage, body: ChatCompletionRequest,
                envelope: dict[str, Any]) -> ChatCompletion:
    return ChatCompletion(**envelope, usage=usage, choices=[
        ChatChoice(index=index, message=AssistantMessage(content=choice.text),
                   logprobs=_logprobs(choice.logprobs) if body.logprobs else None,
                   finish_reason=choice.finish_reason)
        for index, choice in enumerate(choices)
    ])


async def _chunks(generation: Generation, body: ChatCompletionRequest,
                  envelope: dict[str, Any]) -> AsyncIterator[str]:
    # Usage appears on chunks only when asked for: null on each, the totals on the last.
    exclude = None if body.include_usage else {"usage"}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return event(ChatCompletionChunk(**envelope, choices=choices, usage=usage), exclude)

    for index in range(body.n):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    async for response in generation.responses():
        if response.text or response.logprobs:
            logprobs = _logprobs(response.logprobs) if body.logprobs else None
            yield chunk([ChatChunkChoice(index=response.index, logprobs=logprobs,
                                         delta=ChatDelta(content=response.text))])
        if response.finish_reason:
            yield chunk([ChatChunkChoice(index=response.index, delta=ChatDelta(),
                                         finish_reason=FINISH_REASONS[response.finish_reason])])
    if body.include_usage:
        yield chunk([], usage=generation.usage)


def _logprobs(entries: Sequence[llm_pb2.TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[
        TokenLogprob(token=entry.token, logprob=entry.logprob, bytes=list(entry.token.encode()),
                     top_logprobs=[
                         TopLogprob(token=top.token, logprob=top.logprob,
                                    bytes=list(top.token.encode()))
                         for top in entry.top
                     ])
        for entry in entries
    ])
