"""The gateway's connection to the LLM service, and OpenAI requests → `GenerateRequest`.

The gateway forwards media references and bytes as they came: fetching,
decoding and tokenizing all happen behind the LLM service.
"""

from __future__ import annotations

import base64
import binascii

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.llm_streams import StreamCall, Streams
from gateway.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ContentPart,
    GenerationRequest,
)
from gateway.tools import tool_calls_to_pb
from mmserve.rpc.auth import read_token, token_interceptors
from mmserve.rpc.tls import channel_credentials
from mmserve.tracing import client_interceptors
from mmserve.wire.media import TENANT_METADATA
from protos import common_pb2, llm_pb2, llm_pb2_grpc

# The whole-server entry of the standard health service, the one Kubernetes' gRPC probes ask.
_HEALTH_SERVICE = ""
_HEALTH_TIMEOUT_S = 2.0
_ENCODER_HEALTH_SERVICE = "mmserve.encoder.v1.Encoder"  # as the LLM service publishes it
_MODEL_INFO_TIMEOUT_S = 10.0
_AUDIO_MIME = {"mp3": "audio/mpeg"}


class LLMClient:
    """One gRPC channel to the LLM service, shared by all requests.

    With round-robin balancing, a `dns:///name:port` target spreads calls over
    every address the name resolves to (e.g. a headless Kubernetes Service).
    """

    def __init__(self, address: str, request_timeout_s: float,
                 credentials: grpc.ChannelCredentials | None = None,
                 token: bytes | None = None, traced: bool = False,
                 streams: int = 1) -> None:
        options = [("grpc.lb_policy_name", "round_robin")]
        interceptors = token_interceptors(token) + client_interceptors(traced)
        self._channel = (grpc.aio.secure_channel(address, credentials, options=options,
                                                 interceptors=interceptors)
                         if credentials else grpc.aio.insecure_channel(
                             address, options=options, interceptors=interceptors))
        self._llm = llm_pb2_grpc.LLMStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._request_timeout_s = request_timeout_s
        self._streams = (Streams(lambda commands: self._llm.GenerateMany(commands), streams)
                         if streams else None)

    @classmethod
    def from_config(cls, config: GatewayConfig) -> LLMClient:
        return cls(config.llm_address, config.request_timeout_s,
                   channel_credentials(config.llm_tls), read_token(config.internal_token_file),
                   traced=config.otlp_endpoint is not None, streams=config.generate_streams)

    def generate(self, request: llm_pb2.GenerateRequest,
                 tenant: str = "") -> grpc.aio.UnaryStreamCall | StreamCall:
        """Starts the generation: `read()` its responses until EOF, `cancel()` aborts it.
        `tenant` scopes the media handles the request may name and mint."""
        if self._streams is not None:
            return self._streams.start(request, self._request_timeout_s, tenant)
        metadata = [("x-request-id", request.request_id)]
        if tenant:
            metadata.append((TENANT_METADATA, tenant))
        return self._llm.Generate(request, timeout=self._request_timeout_s,
                                  metadata=tuple(metadata))

    async def model_info(self) -> llm_pb2.ModelInfo:
        return await self._llm.GetModelInfo(llm_pb2.ModelInfoRequest(),
                                            timeout=_MODEL_INFO_TIMEOUT_S)

    async def is_serving(self) -> bool:
        """Whether the LLM service's standard health check answers SERVING."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=_HEALTH_SERVICE), timeout=_HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def encoder_serving(self) -> bool | None:
        """What the LLM service reports for its encoder pool (llm_service/encoder_health.py): None
        when it has none (text only) or does not say."""
        try:
            reply = await self._health.Check(
                health_pb2.HealthCheckRequest(service=_ENCODER_HEALTH_SERVICE),
                timeout=_HEALTH_TIMEOUT_S)
        except grpc.aio.AioRpcError:
            return None
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def close(self) -> None:
        if self._streams is not None:
            await self._streams.close()
        await self._channel.close()


def chat_request_to_pb(request: ChatCompletionRequest, request_id: str,
                       model_id: str) -> llm_pb2.GenerateRequest:
    messages = [_message_to_pb(message, f"messages.{i}")
                for i, message in enumerate(request.messages)]
    pb = llm_pb2.GenerateRequest(
        request_id=request_id, model=model_id, messages=llm_pb2.Messages(messages=messages),
        sampling=_sampling_to_pb(request, request.output_limit, request.num_logprobs))
    request.tools_to_pb(pb)
    return pb


def _message_to_pb(message: ChatMessage, param: str) -> llm_pb2.ChatMessage:
    # Roles go as sent ("developer" too): the LLM service maps aliases, for gRPC callers too.
    return llm_pb2.ChatMessage(
        role=message.role,
        content=[_part_to_pb(part, f"{param}.content.{j}")
                 for j, part in enumerate(message.content)],
        tool_calls=tool_calls_to_pb(message.tool_calls, f"{param}.tool_calls"),
        tool_call_id=message.tool_call_id or "", name=message.name or "")


def completion_request_to_pb(request: CompletionRequest, request_id: str,
                             model_id: str) -> llm_pb2.GenerateRequest:
    pb = llm_pb2.GenerateRequest(request_id=request_id, model=model_id,
                                 sampling=_sampling_to_pb(request, request.max_tokens,
                                                          request.logprobs))
    if isinstance(request.prompt, str):
        pb.prompt = request.prompt
    else:
        pb.prompt_token_ids.ids.extend(request.prompt)
    return pb


def _part_to_pb(part: ContentPart, param: str) -> llm_pb2.ContentPart:
    # ContentPart's validator guarantees the field named by `type` is set.
    if part.image_url is not None:
        return llm_pb2.ContentPart(image=common_pb2.MediaRef(url=part.image_url.url))
    if part.video is not None:
        return llm_pb2.ContentPart(video=llm_pb2.Video(
            frames=[common_pb2.MediaRef(url=url) for url in part.video]))
    if part.video_url is not None:
        return llm_pb2.ContentPart(video=llm_pb2.Video(
            file=common_pb2.MediaRef(url=part.video_url.url),
            num_frames=part.video_url.num_frames or 0))
    if part.audio_url is not None:
        return llm_pb2.ContentPart(audio=common_pb2.MediaRef(url=part.audio_url.url))
    if part.input_audio is not None:
        audio = part.input_audio
        return llm_pb2.ContentPart(audio=common_pb2.MediaRef(
            data=_decode_base64(audio.data, f"{param}.input_audio.data"),
            mime_type=_AUDIO_MIME.get(audio.format, f"audio/{audio.format}")))
    return llm_pb2.ContentPart(text=part.text)


def _decode_base64(data: str, param: str) -> bytes:
    try:
        # Line-wrapped base64 (MIME style) is common; anything else that is not
        # in the alphabet is an error rather than silently dropped.
        return base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{param} is not valid base64", param=param) from None


def _sampling_to_pb(request: GenerationRequest, max_tokens: int | None,
                    logprobs: int | None) -> llm_pb2.SamplingParams:
    return llm_pb2.SamplingParams(
        logit_bias=request.logit_bias_ids,
        structured=request.structured_to_pb(),
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=max(request.top_k or 0, 0),  # vLLM spells "disabled" as -1, the proto as 0
        min_p=request.min_p,
        seed=request.seed,
        stop=request.stop,
        stop_token_ids=request.stop_token_ids,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        repetition_penalty=request.repetition_penalty,
        min_tokens=request.min_tokens,
        ignore_eos=request.ignore_eos,
        logprobs=logprobs,
        n=request.n,
        skip_special_tokens=request.skip_special_tokens,
    )
