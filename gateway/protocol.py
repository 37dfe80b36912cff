"""OpenAI request and response schemas. Pydantic stays inside the gateway."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway.request_model import FieldError, RequestModel, TopLevelRequest
from gateway.structured import StructuredFields
from gateway.tools import ToolCall, ToolFields

FinishReason = Literal["stop", "length", "abort", "tool_calls"]
# Counts and token ids travel as uint32 in the LLM service's protobuf messages.
UINT32_END = 2**32


class OpenAIModel(BaseModel):
    """Responses: clients ignore what they do not know. Requests follow request_model's rule."""

    model_config = ConfigDict(extra="ignore")


# --- requests (gateway.request_model: strict types, unknown fields are 400s) --


class ImageURL(RequestModel):
    url: str = Field(min_length=1)
    # Accepted for compatibility only: the encoder's per-family preprocessing
    # (tiling, slicing) decides the resolution.
    detail: Literal["auto", "low", "high"] = "auto"


class InputAudio(RequestModel):
    data: str = Field(min_length=1, description="base64-encoded audio file")
    format: str = Field(min_length=1, description="wav, mp3, ...")


class AudioURL(RequestModel):
    """An audio file by URL (http(s)://, data:, file://) or an `mm://sha256:` handle."""

    url: str = Field(min_length=1)


class VideoURL(RequestModel):
    """A video file the encoder samples into frames (the family's frame-index rule)."""

    url: str = Field(min_length=1)
    num_frames: int | None = Field(default=None, ge=1, le=64)


class ContentPart(RequestModel):
    """One part of a message; `type` names the field that carries the payload.

    A flat model rather than a tagged union keeps validation errors at paths a
    client can read ("messages.0.content.1.image_url.url").
    """

    type: Literal["text", "image_url", "input_audio", "audio_url", "video", "video_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    input_audio: InputAudio | None = None
    audio_url: AudioURL | None = None
    # Video frames the client already extracted (image URLs), in order.
    video: list[str] | None = Field(default=None, min_length=1, max_length=64)
    video_url: VideoURL | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if getattr(self, self.type) is None:
            raise ValueError(f"content parts of type {self.type!r} need the {self.type!r} field")
        return self


def _content_parts(content: Any) -> Any:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise ValueError("content must be a string or an array of content parts")


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A plain string arrives here as one text part; an assistant turn with tool calls may
    # have none.
    content: Annotated[list[ContentPart], BeforeValidator(_content_parts)] = Field(
        default_factory=list)
    # A participant's name (shown by templates that have a place for it, else ignored).
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages carry tool calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: a tool message needs one, and only a tool message")
        if not self.content and not self.tool_calls:
            raise ValueError("content: required unless the assistant message has tool_calls")
        return self


class StreamOptions(RequestModel):
    include_usage: bool = False


def _stop_list(stop: Any) -> Any:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else stop


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The dotted path of the first string (or key) in `value` holding a lone surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        found = _lone_surrogate(key, where) or _lone_surrogate(item, where)
        if found:
            return found
    return None


def _logit_bias(bias: Any) -> Any:
    if isinstance(bias, dict):
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(bias)} entries; the limit is {MAX_LOGIT_BIAS}")
        too_big = [key for key in bias if isinstance(key, str) and key.isdigit()
                   and int(key) >= UINT32_END]
        if too_big:
            raise ValueError(f"token id {too_big[0]} is out of range")
    return bias


# OpenAI's own limit on logit_bias entries.
MAX_LOGIT_BIAS = 300
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]
Bias = Annotated[float, Field(ge=-100, le=100)]


class GenerationRequest(TopLevelRequest, StructuredFields):
    """Fields shared by chat and completions, with vLLM's sampling extensions."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may escape a UTF-16 half ("\ud800") that no UTF-8 string can hold; it
        # would fail later, building the gRPC message.
        found = _lone_surrogate(data, "")
        if found:
            raise PydanticCustomError(
                "lone_surrogate", "{param} contains a lone UTF-16 surrogate (an unpaired "
                "\\uD800-\\uDFFF escape), which is not valid Unicode; send well-formed text",
                {"param": found})
        return data

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, lt=UINT32_END)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    # The upper bound is the LLM engine's (its max_num_seqs), which says so in its 400.
    n: int = Field(default=1, ge=1, lt=UINT32_END)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: Annotated[list[str], BeforeValidator(_stop_list)] = Field(default_factory=list)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    # Token id (as a string, as OpenAI sends it) -> bias added to its logit.
    logit_bias: Annotated[dict[TokenIdKey, Bias] | None, BeforeValidator(_logit_bias)] = None
    # vLLM extensions.
    top_k: int | None = Field(default=None, ge=-1, lt=UINT32_END,
                              description="-1 or 0 disables top-k")
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int = Field(default=0, ge=0, lt=UINT32_END)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=UINT32_END)]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        return {int(token): value for token, value in (self.logit_bias or {}).items()}


class ChatCompletionRequest(GenerationRequest, ToolFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, lt=UINT32_END)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def output_limit(self) -> int | None:
        """max_completion_tokens replaces the deprecated max_tokens when both are sent."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def _single_prompt(prompt: Any) -> Any:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if len(prompt) == 1 and isinstance(prompt[0], str):
            return prompt[0]
        if all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < UINT32_END
               for t in prompt):
            return prompt
        if all(isinstance(p, str) for p in prompt):
            raise ValueError("batched prompts are not supported: send one prompt per request")
    raise ValueError("prompt must be a string, a list with one string, or a non-empty list of "
                     "token ids")


class CompletionRequest(GenerationRequest):
    prompt: Annotated[str | list[int], BeforeValidator(_single_prompt)]
    logprobs: int | None = Field(default=None, ge=0, le=20)


# --- responses --------------------------------------------------------------


class TopLogprob(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(OpenAIModel):
    content: list[TokenLogprob] | None


class PromptTokensDetails(OpenAIModel):
    cached_tokens: int


class Usage(OpenAIModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class ResponseFunctionCall(OpenAIModel):
    name: str
    arguments: str


class ResponseToolCall(OpenAIModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    # null when the turn is only tool calls, as OpenAI sends it.
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None

    @model_serializer(mode="wrap")
    def _tool_calls_when_made(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls") is None:
            data.pop("tool_calls", None)
        return data


class ChatChoice(OpenAIModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletion(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(OpenAIModel):
    name: str | None = None
    arguments: str | None = None

    @model_serializer(mode="wrap")
    def _only_set_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ToolCallDelta(OpenAIModel):
    """OpenAI's streamed call: index, id, type and name first, then argument fragments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta

    @model_serializer(mode="wrap")
    def _only_set_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatDelta(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @model_serializer(mode="wrap")
    def _only_set_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # OpenAI sends only what a delta carries: the role first, then content, {} at the end.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatChunkChoice(OpenAIModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(OpenAIModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class Completion(OpenAIModel):
    """A whole completion, and also the shape of each streamed completion chunk."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mmserve"
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorDetail
