"""gRPC servicer: protobuf <-> domain at the edge, errors mapped to status codes once."""

from __future__ import annotations

import asyncio
import logging
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llm_service.engine.protocol import EngineClient, FinishReason, SamplingParams
from llm_service.errors import (
    DeadlineExceeded, InvalidRequest, NotFound, Overloaded, PermissionDenied, ServiceError,
    Unavailable,
)
from llm_service.generator import Chunk, GenerateInput, Generator
from llm_service.prompt.messages import MediaRef, Message, Modality, TextPart
from protos.stubs import load

common_pb2 = load("common_pb2")
llm_pb2 = load("llm_pb2")
llm_pb2_grpc = load("llm_pb2_grpc")

log = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LLM"].full_name
_STATUS = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}
_FINISH = {
    None: llm_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: llm_pb2.FINISH_REASON_ABORT,
}


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind in type(exc).__mro__:
        if kind in _STATUS:
            return _STATUS[kind]
    return grpc.StatusCode.INTERNAL


def sampling_from_pb(pb) -> tuple[SamplingParams, tuple[str, ...], bool]:
    try:
        params = SamplingParams(
            max_tokens=pb.max_tokens if pb.HasField("max_tokens") else 256,
            temperature=pb.temperature if pb.HasField("temperature") else 1.0,
            top_p=pb.top_p if pb.HasField("top_p") else 1.0,
            top_k=pb.top_k,
            min_p=pb.min_p,
            seed=pb.seed if pb.HasField("seed") else None,
            stop_token_ids=tuple(pb.stop_token_ids),
            ignore_eos=pb.ignore_eos,
            min_tokens=pb.min_tokens,
            repetition_penalty=pb.repetition_penalty if pb.HasField("repetition_penalty") else 1.0,
            presence_penalty=pb.presence_penalty,
            frequency_penalty=pb.frequency_penalty,
            logprobs=pb.logprobs if pb.HasField("logprobs") else None,
            n=pb.n or 1,
        )
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if any(not s for s in pb.stop):
        raise InvalidRequest("stop strings must not be empty")
    skip = pb.skip_special_tokens if pb.HasField("skip_special_tokens") else True
    return params, tuple(pb.stop), skip


def _media_from_pb(ref, modality: Modality, **extra) -> MediaRef:
    if ref.WhichOneof("source") == "data":
        return MediaRef(modality, data=ref.data, mime_type=ref.mime_type, **extra)
    if not ref.url:
        raise InvalidRequest("a media part has neither a url nor data")
    return MediaRef(modality, url=ref.url, mime_type=ref.mime_type, **extra)


def _video_from_pb(video) -> list[MediaRef]:
    if video.frames:
        # Frames are single-tile images, as the families' video prompts expect.
        return [_media_from_pb(f, Modality.IMAGE, max_tiles=1, frame=i + 1)
                for i, f in enumerate(video.frames)]
    if not video.HasField("file"):
        raise InvalidRequest("a video part needs frames or a file")
    return [_media_from_pb(video.file, Modality.VIDEO, num_frames=video.num_frames)]


def messages_from_pb(messages) -> list[Message]:
    out = []
    for m in messages:
        parts = []
        for part in m.content:
            kind = part.WhichOneof("part")
            if kind == "text":
                parts.append(TextPart(part.text))
            elif kind == "image":
                parts.append(_media_from_pb(part.image, Modality.IMAGE))
            elif kind == "audio":
                parts.append(_media_from_pb(part.audio, Modality.AUDIO))
            elif kind == "video":
                parts.extend(_video_from_pb(part.video))
        role = "system" if m.role == "developer" else m.role
        out.append(Message(role=role, parts=tuple(parts)))
    return out


def input_from_pb(request, context: grpc.aio.ServicerContext) -> GenerateInput:
    sampling, stop, skip = sampling_from_pb(request.sampling)
    kind = request.WhichOneof("input")
    metadata = dict(context.invocation_metadata() or ())
    return GenerateInput(
        request_id=request.request_id or metadata.get("x-request-id") or uuid.uuid4().hex,
        messages=messages_from_pb(request.messages.messages) if kind == "messages" else None,
        prompt=request.prompt if kind == "prompt" else None,
        prompt_token_ids=list(request.prompt_token_ids.ids) if kind == "prompt_token_ids" else None,
        sampling=sampling,
        stop=stop,
        skip_special_tokens=skip,
        priority=request.priority,
        timeout=context.time_remaining(),
    )


def chunk_to_pb(chunk: Chunk):
    reply = llm_pb2.GenerateResponse(
        index=chunk.index, text=chunk.text, token_ids=chunk.token_ids,
        finish_reason=_FINISH[chunk.finish_reason], media_handles=chunk.media_handles,
    )
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
    def __init__(self, generator: Generator, engine: EngineClient, model_info: dict) -> None:
        self._generator = generator
        self._engine = engine
        self._info = model_info

    async def Generate(self, request, context):
        try:
            inp = input_from_pb(request, context)
            async for chunk in self._generator.generate(inp):
                yield chunk_to_pb(chunk)
        except ServiceError as exc:
            await context.abort(status_for(exc), str(exc))
        except asyncio.CancelledError:
            raise  # the client went away; the generator's cleanup aborted the engine request
        except Exception:
            log.exception("Generate failed")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")

    async def GetModelInfo(self, request, context):
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


async def watch_health(engine: EngineClient, health_servicer: health.aio.HealthServicer,
                       interval: float = 1.0) -> None:
    """Flips the health status to NOT_SERVING when the engine dies."""
    serving = None
    while True:
        now = engine.healthy
        if now != serving:
            status = (health_pb2.HealthCheckResponse.SERVING if now
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in ("", SERVICE_NAME):
                await health_servicer.set(name, status)
            serving = now
        await asyncio.sleep(interval)


def build_server(servicer: LLMServicer, address: str,
                 credentials: grpc.ServerCredentials | None = None):
    """A grpc.aio server with the LLM, health and reflection services; returns (server, port, health)."""
    limit = 64 * 1024 * 1024  # above the gateway body cap: inline media must fit
    server = grpc.aio.server(options=[("grpc.max_send_message_length", limit),
                                      ("grpc.max_receive_message_length", limit)])
    llm_pb2_grpc.add_LLMServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(address, credentials) if credentials
            else server.add_insecure_port(address))
    return server, port, health_servicer
