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
    FunctionCallDelta,
    ResponseFunctionCall,
    ResponseToolCall,
    TokenLogprob,
    ToolCallDelta,
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
    identity.check_n(body.n)
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
        ChatChoice(index=index, message=_message(choice),
                   logprobs=_logprobs(choice.logprobs) if body.logprobs else None,
                   finish_reason=choice.finish_reason)
        for index, choice in enumerate(choices)
    ])


def _message(choice: ChoiceOutput) -> AssistantMessage:
    if not choice.tool_calls:
        return AssistantMessage(content=choice.text)
    return AssistantMessage(content=choice.text or None, tool_calls=[
        ResponseToolCall(id=call.id, function=ResponseFunctionCall(name=call.name,
                                                                   arguments=call.arguments))
        for call in choice.tool_calls])


def _tool_call_deltas(deltas: Sequence[llm_pb2.ToolCallDelta]) -> list[ToolCallDelta] | None:
    # The first delta of a call carries its id and name, later ones argument fragments.
    return [ToolCallDelta(index=delta.index, id=delta.id or None,
                          type="function" if delta.id else None,
                          function=FunctionCallDelta(name=delta.name or None,
                                                     arguments=delta.arguments))
            for delta in deltas] or None


async def _chunks(generation: Generation, body: ChatCompletionRequest,
                  envelope: dict[str, Any]) -> AsyncIterator[str]:
    # Usage appears on chunks only when asked for: null on each, the totals on the last.
    exclude = None if body.include_usage else {"usage"}

    def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        return event(ChatCompletionChunk(**envelope, choices=choices, usage=usage), exclude)

    for index in range(body.n):
        yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))])
    async for response in generation.responses():
        if response.text or response.logprobs or response.tool_calls:
            logprobs = _logprobs(response.logprobs) if body.logprobs else None
            delta = ChatDelta(content=response.text or (None if response.tool_calls else ""),
                              tool_calls=_tool_call_deltas(response.tool_calls))
            yield chunk([ChatChunkChoice(index=response.index, logprobs=logprobs,
                                         delta=delta)])
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
