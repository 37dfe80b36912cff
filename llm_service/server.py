"""gRPC servicer: protobuf <-> domain at the edge; errors map to status codes once
(mmserve.rpc.calls with errors.STATUS), health and reflection come from mmserve.rpc.server."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc

from llm_service.engine.protocol import (
    EngineClient,
    FinishReason,
    SamplingParams,
    StructuredOutput,
)
from llm_service.errors import STATUS, InvalidRequest, Overloaded
from llm_service.generator import Chunk, GenerateInput, Generator
from llm_service.metrics import LLMMetrics
from llm_service.multiplex import Multiplexer
from llm_service.prompt.messages import MediaItem, Message, Modality, Part, TextPart, ToolCall
from llm_service.tool_calls import ChoiceMode, ToolRequest, tools_from
from mmserve.rpc.calls import Call, rpc_method, status_for
from mmserve.rpc.server import GrpcServer
from mmserve.tracing import Tracing, record_span
from mmserve.wire.convert import ref_from_pb
from mmserve.wire.media import TENANT_METADATA
from protos import common_pb2, llm_pb2, llm_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name
rpc = rpc_method(STATUS, log)
_FINISH = {
    None: llm_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: llm_pb2.FINISH_REASON_ABORT,
}
_CHOICE_MODE = {llm_pb2.TOOL_CHOICE_AUTO: ChoiceMode.AUTO,
                llm_pb2.TOOL_CHOICE_REQUIRED: ChoiceMode.REQUIRED}


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The status an error leaves the service with."""
    return status_for(exc, STATUS)


# Optional fields left unset keep SamplingParams' defaults (there is one place for each).
_OPTIONAL = ("max_tokens", "temperature", "top_p", "seed", "repetition_penalty", "logprobs")


def structured_from_pb(pb: llm_pb2.StructuredOutput) -> StructuredOutput | None:
    """SamplingParams.structured; unset (or json_object false) is free text."""
    kind = pb.WhichOneof("kind")
    try:
        if kind is None or (kind == "json_object" and not pb.json_object):
            return None
        if kind == "json_object":
            return StructuredOutput("json_object")
        if kind == "choice":
            return StructuredOutput("choice", choices=tuple(pb.choice.choices))
        return StructuredOutput(kind, spec=getattr(pb, kind))
    except ValueError as exc:
        raise InvalidRequest(f"sampling.structured.{kind}: {exc}") from None


def sampling_from_pb(pb: llm_pb2.SamplingParams) -> tuple[SamplingParams, tuple[str, ...], bool]:
    optional = {name: getattr(pb, name) for name in _OPTIONAL if pb.HasField(name)}
    structured = structured_from_pb(pb.structured) if pb.HasField("structured") else None
    try:
        params = SamplingParams(
            top_k=pb.top_k, min_p=pb.min_p, stop_token_ids=tuple(pb.stop_token_ids),
            ignore_eos=pb.ignore_eos, min_tokens=pb.min_tokens,
            presence_penalty=pb.presence_penalty, frequency_penalty=pb.frequency_penalty,
            n=pb.n or 1, logit_bias=tuple(sorted(pb.logit_bias.items())),
            structured=structured, **optional)
    except ValueError as exc:
        raise InvalidRequest(f"sampling.{exc}") from None
    if any(not s for s in pb.stop):
        raise InvalidRequest("stop strings must not be empty")
    skip = pb.skip_special_tokens if pb.HasField("skip_special_tokens") else True
    return params, tuple(pb.stop), skip


def _ref(pb: common_pb2.MediaRef) -> Any:
    if pb.WhichOneof("source") is None:
        raise InvalidRequest("a media part has neither a url nor data")
    return ref_from_pb(pb)


def _part_from_pb(part: llm_pb2.ContentPart) -> Part | None:
    kind = part.WhichOneof("part")
    if kind == "text":
        return TextPart(part.text)
    if kind == "image":
        return MediaItem(_ref(part.image), Modality.IMAGE)
    if kind == "audio":
        return MediaItem(_ref(part.audio), Modality.AUDIO)
    if kind == "video":
        video = part.video
        if video.frames:
            return MediaItem(modality=Modality.VIDEO,
                             frames=tuple(_ref(frame) for frame in video.frames))
        if not video.HasField("file"):
            raise InvalidRequest("a video part needs frames or a file")
        return MediaItem(_ref(video.file), Modality.VIDEO, num_frames=video.num_frames)
    return None


def messages_from_pb(messages: Iterable[llm_pb2.ChatMessage]) -> list[Message]:
    out = []
    for m in messages:
        parts = tuple(p for p in map(_part_from_pb, m.content) if p is not None)
        calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls)
        out.append(Message(role=m.role, parts=parts, tool_calls=calls,
                           tool_call_id=m.tool_call_id, name=m.name))
    return out


def tools_from_pb(request: llm_pb2.GenerateRequest) -> ToolRequest | None:
    """The request's tools and choice; None when the model is not offered any."""
    choice = request.tool_choice
    kind = choice.WhichOneof("choice")
    if kind == "mode" and choice.mode == llm_pb2.TOOL_CHOICE_NONE:
        return None
    if not request.tools and kind is None:
        return None
    if request.WhichOneof("input") != "messages":
        raise InvalidRequest("tools need chat messages as input")
    mode = ChoiceMode.FUNCTION if kind == "function" else _CHOICE_MODE.get(
        choice.mode, ChoiceMode.AUTO)
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    tools = tools_from([(t.name, t.description, t.parameters) for t in request.tools])
    return ToolRequest(tools, mode, choice.function, parallel)


def with_tool_constraint(sampling: llm_pb2.SamplingParams, tools: ToolRequest | None,
                         arguments_key: str) -> llm_pb2.SamplingParams:
    """`required` and a named function hold the output to the call wrapper's JSON schema."""
    if tools is None or not tools.constrained:
        return sampling
    if sampling.HasField("structured"):
        raise InvalidRequest("tool_choice 'required' or a named function already constrains "
                             "the output; drop the structured output (response_format)")
    constrained = llm_pb2.SamplingParams()
    constrained.CopyFrom(sampling)
    constrained.structured.json_schema = tools.schema(arguments_key)
    return constrained


def input_from_pb(request: llm_pb2.GenerateRequest, timeout: float | None = None,
                  tenant: str = "", request_id: str = "",
                  arguments_key: str = "arguments") -> GenerateInput:
    tools = tools_from_pb(request)
    sampling, stop, skip = sampling_from_pb(with_tool_constraint(request.sampling, tools,
                                                                 arguments_key))
    kind = request.WhichOneof("input")
    return GenerateInput(
        request_id=request_id or request.request_id or uuid.uuid4().hex,
        messages=messages_from_pb(request.messages.messages) if kind == "messages" else None,
        prompt=request.prompt if kind == "prompt" else None,
        prompt_token_ids=list(request.prompt_token_ids.ids) if kind == "prompt_token_ids" else None,
        sampling=sampling,
        stop=stop,
        skip_special_tokens=skip,
        priority=request.priority,
        timeout=timeout,
        tools=tools,
        tenant=tenant,
    )


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant (`x-mmserve-tenant`, set by the gateway from the API key), passed
    on to the encoder, which checks it; "" when absent."""
    value = dict(context.invocation_metadata() or ()).get(TENANT_METADATA, "")
    return value if isinstance(value, str) else ""


def chunk_to_pb(chunk: Chunk) -> llm_pb2.GenerateResponse:
    finish = _FINISH[chunk.finish_reason]
    if chunk.made_tool_calls and chunk.finish_reason == FinishReason.STOP:
        finish = llm_pb2.FINISH_REASON_TOOL_CALLS
    reply = llm_pb2.GenerateResponse(
        index=chunk.index, text=chunk.text, token_ids=chunk.token_ids,
        finish_reason=finish, media_handles=chunk.media_handles,
        tool_calls=[llm_pb2.ToolCallDelta(index=d.index, id=d.id, name=d.name,
                                          arguments=d.arguments) for d in chunk.tool_calls],
    )
    if chunk.timings is not None:
        reply.timings.CopyFrom(llm_pb2.Timings(encode_ms=chunk.timings.encode_ms,
                                               prefill_ms=chunk.timings.prefill_ms))
    if chunk.usage is not None:
        reply.usage.CopyFrom(llm_pb2.Usage(
            prompt_tokens=chunk.usage.prompt_tokens,
            completion_tokens=chunk.usage.completion_tokens,
            cached_tokens=chunk.usage.cached_tokens,
        ))
    for e in chunk.logprobs:
        reply.logprobs.append(llm_pb2.TokenLogprob(
            token_id=e.token_id, token=e.token, logprob=e.logprob,
            top=[llm_pb2.TopLogprob(token_id=t, token=s, logprob=lp) for t, s, lp in e.top],
        ))
    return reply


class LLMServicer(llm_pb2_grpc.LLMServicer):
    """Thin: decodes requests, calls the Generator, encodes responses."""

    def __init__(self, generator: Generator, engine: EngineClient,
                 model_info: Mapping[str, Any], metrics: LLMMetrics | None = None) -> None:
        self._generator = generator
        self._engine = engine
        self._info = dict(model_info)
        self.metrics = metrics or LLMMetrics(str(self._info.get("model_id", "")), engine.stats)
        # build_server gives it the server's drain and tracing.
        self.multiplexer = Multiplexer(self.generate, STATUS, log)

    @rpc
    async def Generate(self, request: llm_pb2.GenerateRequest, context: grpc.aio.ServicerContext,
                       call: Call) -> AsyncIterator[llm_pb2.GenerateResponse]:
        try:
            async for response in self.generate(request, call, context.time_remaining(),
                                                tenant_of(context)):
                yield response
        except Overloaded:
            context.set_trailing_metadata((("retry-after", str(call.fields["retry_after_s"])),))
            raise

    async def GenerateMany(self, commands: AsyncIterator[llm_pb2.GenerateCommand],
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[llm_pb2.GenerateEvents]:
        async for events in self.multiplexer.serve(commands):
            yield events

    async def generate(self, request: llm_pb2.GenerateRequest, call: Call,
                       timeout: float | None, tenant: str
                       ) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """One generation's responses, for Generate and for each stream of GenerateMany."""
        started = time.perf_counter()
        prompt_tokens = completion_tokens = cached_tokens = 0
        timer, finish, admitted, first_ns = self.metrics.request(), None, True, 0
        try:
            # A client that goes away cancels this; the generator's cleanup aborts the engine.
            arguments_key = self._generator.tool_format.arguments_keys[0]
            async for chunk in self._generator.generate(
                    input_from_pb(request, timeout, tenant, call.request_id, arguments_key)):
                if "ttft_ms" not in call.fields and chunk.token_ids:
                    call.fields["ttft_ms"] = round((time.perf_counter() - started) * 1e3)
                timer.tokens(len(chunk.token_ids))
                if chunk.timings is not None and chunk.token_ids:
                    first_ns = time.time_ns()
                    record_span("prefill", first_ns - int(chunk.timings.prefill_ms * 1e6),
                                queue_ms=chunk.timings.queue_ms)
                if chunk.timings is not None:
                    timer.timings(chunk.timings.queue_ms / 1e3, chunk.timings.encode_ms / 1e3,
                                  bool(request.messages.messages) and chunk.timings.encode_ms > 0)
                if chunk.usage is not None:
                    prompt_tokens, cached_tokens = (chunk.usage.prompt_tokens,
                                                    chunk.usage.cached_tokens)
                    completion_tokens += chunk.usage.completion_tokens
                    finish = chunk.finish_reason
                yield chunk_to_pb(chunk)
        except Overloaded:
            admitted = False
            # Truthful back-off: the queue ahead of this request over the measured drain rate.
            call.fields["retry_after_s"] = self.metrics.drain.retry_after_s(
                self._engine.stats().waiting)
            raise
        finally:
            call.fields.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            if first_ns:
                record_span("decode", first_ns, completion_tokens=completion_tokens)
            if admitted:
                timer.finish(prompt_tokens, cached_tokens, completion_tokens,
                             None if finish is None else finish.name.lower())

    @rpc
    async def GetModelInfo(self, request: llm_pb2.ModelInfoRequest,
                           context: grpc.aio.ServicerContext, call: Call) -> llm_pb2.ModelInfo:
        s = self._engine.stats()
        return llm_pb2.ModelInfo(
            **self._info,
            stats=llm_pb2.EngineStats(
                kv_blocks_total=s.kv_blocks_total, kv_blocks_used=s.kv_blocks_used,
                kv_blocks_cached=s.kv_blocks_cached, prefix_hit_rate=s.prefix_hit_rate,
                running=s.running, waiting=s.waiting, step_time_ms=s.step_time_ms,
                block_size=s.block_size,
            ),
        )


async def watch_health(engine: EngineClient, server: GrpcServer, interval: float = 1.0) -> None:
    """Reports SERVING while the engine is healthy, NOT_SERVING once it dies."""
    serving = None
    while True:
        now = engine.healthy
        if now != serving:
            await server.set_serving(now)
            serving = now
        await asyncio.sleep(interval)


def build_server(servicer: LLMServicer, token: bytes | None = None,
                 tracing: Tracing | None = None) -> GrpcServer:
    """The LLM service, health and reflection on one server; start() binds it."""
    limit = 64 * 1024 * 1024  # above the gateway body cap: inline media must fit
    server = GrpcServer(SERVICE_NAME, options=[("grpc.max_send_message_length", limit),
                                               ("grpc.max_receive_message_length", limit)],
                        token=token, tracing=tracing)
    llm_pb2_grpc.add_LLMServicer_to_server(servicer, server.grpc)
    servicer.multiplexer.drain = server.drain
    servicer.multiplexer.tracing = tracing or Tracing.off()
    return server
