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

FinishReason = Literal["stop", "length", "abort"]
# Counts and token ids travel as uint32 in the LLM service's protobuf messages.
UINT32_END = 2**32


class OpenAIModel(BaseModel):
    # OpenAI ignores fields it does not know; clients written for newer API
    # versions (or other servers) must keep working here.
    model_config = ConfigDict(extra="ignore")


# --- requests ---------------------------------------------------------------


class ImageURL(OpenAIModel):
    url: str = Field(min_length=1)
    # Accepted for compatibility only: the encoder's per-family preprocessing
    # (tiling, slicing) decides the resolution.
    detail: Literal["auto", "low", "high"] = "auto"


class InputAudio(OpenAIModel):
    data: str = Field(min_length=1, description="base64-encoded audio file")
    format: str = Field(min_length=1, description="wav, mp3, ...")


class AudioURL(OpenAIModel):
    """An audio file by URL (http(s)://, data:, file://) or an `mm://sha256:` handle."""

    url: str = Field(min_length=1)


class VideoURL(OpenAIModel):
    """A video file the encoder samples into frames (the family's frame-index rule)."""

    url: str = Field(min_length=1)
    num_frames: int | None = Field(default=None, ge=1, le=64)


class ContentPart(OpenAIModel):
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
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return content
    raise ValueError("content must be a string or an array of content parts")


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant"]
    # A plain string arrives here as one text part.
    content: Annotated[list[ContentPart], BeforeValidator(_content_parts)]


class StreamOptions(OpenAIModel):
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


class GenerationRequest(OpenAIModel):
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
    user: str | None = None
    # vLLM extensions.
    top_k: int | None = Field(default=None, ge=-1, lt=UINT32_END,
                              description="-1 or 0 disables top-k")
    min_p: float = Field(default=0.0, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int = Field(default=0, ge=0, lt=UINT32_END)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[Annotated[int, Field(ge=0, lt=UINT32_END)]] = Field(default_factory=list)

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(GenerationRequest):
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


class AssistantMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class ChatDelta(OpenAIModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

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
