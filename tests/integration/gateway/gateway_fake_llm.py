"""A real grpc.aio LLM server with a scripted model, for gateway tests.

Choice i of a reply is "[i]" followed by the words of the last message's text
(or of the prompt), one word per response, choices interleaved. max_tokens
truncates it (finish "length"). It records every request and its metadata,
can fail with a given status before or after the first response, and notes
when a call is cancelled. GenerateMany serves the same script per stream, through the LLM
service's own multiplexer (llm_service/multiplex.py), each stream seen as a Generate call
with the stream's request id and tenant as its metadata. Given tools, it calls the first one (TOOL_CALL_ARGUMENTS, streamed in
FRAGMENTS after a delta with the id and name) and finishes with "tool_calls".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llm_service.multiplex import Multiplexer
from mmserve.rpc.calls import Call
from mmserve.wire.media import TENANT_METADATA
from protos import llm_pb2, llm_pb2_grpc

log = logging.getLogger(__name__)


class Aborted(Exception):
    """What the fake's context.abort raises on a GenerateMany stream: one class per status."""

    code: grpc.StatusCode


_ABORTED = {code: type(f"Aborted{code.name}", (Aborted,), {"code": code})
            for code in grpc.StatusCode}
ABORT_STATUS: Mapping[type[BaseException], grpc.StatusCode] = {
    cls: code for code, cls in _ABORTED.items()}


class StreamContext:
    """The parts of a ServicerContext the fake's Generate uses, for one GenerateMany stream."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], call: Call) -> None:
        self._metadata = metadata
        self._call = call

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        hint = dict(metadata).get("retry-after", "")
        if hint.isdigit():
            self._call.fields["retry_after_s"] = int(hint)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise _ABORTED[code](details)

MODEL_ID = "fake-vlm-1b"
TOOL_CALL_ID = "call_fake_1"
FRAGMENTS = ('{"city": ', '"Paris", ', '"days": 2}')
TOOL_CALL_ARGUMENTS = "".join(FRAGMENTS)


def prompt_words(request: llm_pb2.GenerateRequest) -> list[str]:
    kind = request.WhichOneof("input")
    if kind == "prompt":
        return request.prompt.split()
    if kind == "prompt_token_ids":
        return [str(token) for token in request.prompt_token_ids.ids]
    last = request.messages.messages[-1]
    return " ".join(part.text for part in last.content if part.WhichOneof("part") == "text").split()


def prompt_tokens(request: llm_pb2.GenerateRequest) -> int:
    if request.WhichOneof("input") != "messages":
        return len(prompt_words(request))
    return sum(len(part.text.split()) if part.WhichOneof("part") == "text" else 1
               for message in request.messages.messages for part in message.content)


MAX_NUM_SEQS = 64  # the embedded config's engine limit, which bounds n


@dataclass
class FakeLLM(llm_pb2_grpc.LLMServicer):
    fail_with: tuple[grpc.StatusCode, str] | None = None
    fail_after_first: bool = False
    trailing_metadata: tuple[tuple[str, str], ...] = ()
    first_delay_s: float = 0.0  # "prefill" time before the first response
    delay_s: float = 0.0  # between responses
    requests: list[llm_pb2.GenerateRequest] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.multiplexer = Multiplexer(self._stream, ABORT_STATUS, log)

    async def GenerateMany(self, commands: AsyncIterator[llm_pb2.GenerateCommand],
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[llm_pb2.GenerateEvents]:
        async for events in self.multiplexer.serve(commands):
            yield events

    async def _stream(self, request: llm_pb2.GenerateRequest, call: Call,
                      timeout: float | None, tenant: str
                      ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        metadata = (("x-request-id", call.request_id),
                    *(((TENANT_METADATA, tenant),) if tenant else ()))
        async for response in self.Generate(request, StreamContext(metadata, call)):  # type: ignore[arg-type]
            yield response

    async def Generate(self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        try:
            if self.fail_with and not self.fail_after_first:
                await self._fail(context)
            if request.sampling.n > MAX_NUM_SEQS:  # as the LLM service's engine refuses it
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"n={request.sampling.n} exceeds the engine's max_num_seqs="
                                    f"{MAX_NUM_SEQS}; ask for fewer choices")
            await asyncio.sleep(self.first_delay_s)
            async for response in self._replies(request):
                yield response
                if self.fail_with:
                    await self._fail(context)
                await asyncio.sleep(self.delay_s)
            self.finished.set()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def _fail(self, context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata(self.trailing_metadata)
        await context.abort(*self.fail_with)

    async def _replies(self, request: llm_pb2.GenerateRequest
                       ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        if request.tools:
            async for response in self._tool_call(request):
                yield response
            return
        sampling = request.sampling
        n = max(sampling.n, 1)
        replies = [[f"[{i}]", *(f" {word}" for word in prompt_words(request))] for i in range(n)]
        limit = sampling.max_tokens if sampling.HasField("max_tokens") else 1000
        for step in range(min(limit, max(len(reply) for reply in replies))):
            for index, reply in enumerate(replies):
                if step >= len(reply):
                    continue
                response = llm_pb2.GenerateResponse(index=index, text=reply[step],
                                                     token_ids=[100 + step])
                if sampling.HasField("logprobs"):
                    response.logprobs.append(llm_pb2.TokenLogprob(
                        token_id=100 + step, token=reply[step], logprob=-0.25 * (step + 1),
                        top=[llm_pb2.TopLogprob(token_id=k, token=f"alt{k}", logprob=-1.0 - k)
                             for k in range(sampling.logprobs)]))
                last = step == min(limit, len(reply)) - 1
                if last:
                    response.finish_reason = (llm_pb2.FINISH_REASON_STOP if limit >= len(reply)
                                              else llm_pb2.FINISH_REASON_LENGTH)
                    used = prompt_tokens(request)
                    response.usage.CopyFrom(llm_pb2.Usage(
                        prompt_tokens=used, completion_tokens=step + 1, cached_tokens=used // 2))
                yield response

    async def _tool_call(self, request: llm_pb2.GenerateRequest
                         ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        name = request.tools[0].name
        yield llm_pb2.GenerateResponse(index=0, token_ids=[1], tool_calls=[
            llm_pb2.ToolCallDelta(index=0, id=TOOL_CALL_ID, name=name)])
        for i, fragment in enumerate(FRAGMENTS):
            response = llm_pb2.GenerateResponse(index=0, token_ids=[2 + i], tool_calls=[
                llm_pb2.ToolCallDelta(index=0, arguments=fragment)])
            if i == len(FRAGMENTS) - 1:
                response.finish_reason = llm_pb2.FINISH_REASON_TOOL_CALLS
                response.usage.CopyFrom(llm_pb2.Usage(prompt_tokens=prompt_tokens(request),
                                                      completion_tokens=len(FRAGMENTS) + 1))
            yield response

    async def GetModelInfo(self, request: llm_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> llm_pb2.ModelInfo:
        return llm_pb2.ModelInfo(model_id=MODEL_ID, family="internvl2", max_model_len=4096,
                                 max_num_seqs=MAX_NUM_SEQS,
                                 engine="torch")


class FakeLLMServer:
    """The fake behind a real grpc.aio server on a free port, with the standard health service."""

    def __init__(self) -> None:
        self.llm = FakeLLM()
        self.health = health.aio.HealthServicer()
        self._server = grpc.aio.server()
        llm_pb2_grpc.add_LLMServicer_to_server(self.llm, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.address = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"

    async def start(self) -> None:
        await self._server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set("", status)

    async def stop(self) -> None:
        await self._server.stop(grace=None)
