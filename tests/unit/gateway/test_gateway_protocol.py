from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from gateway.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    CompletionRequest,
)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields})


def error_locs(exc: pytest.ExceptionInfo[ValidationError]) -> list[tuple]:
    return [error["loc"] for error in exc.value.errors()]


def test_string_content_becomes_one_text_part() -> None:
    part, = chat().messages[0].content
    assert (part.type, part.text) == ("text", "hi")


def test_array_content_with_image_and_audio() -> None:
    request = chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "describe"},
        {"type": "image_url", "image_url": {"url": "https://x/cat.png", "detail": "high"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ]}])
    text, image, audio = request.messages[0].content
    assert text.text == "describe"
    assert (image.image_url.url, image.image_url.detail) == ("https://x/cat.png", "high")
    assert (audio.input_audio.data, audio.input_audio.format) == ("UklGRg==", "wav")


def test_informational_fields_are_accepted_and_dropped() -> None:
    request = chat(messages=[{"role": "user", "name": "ann", "content": "hi"}],
                   user="u-1", metadata={"a": "b"}, store=False, response_format={"type": "text"})
    assert request.messages[0].name == "ann"
    assert request.structured_to_pb() is None
    assert "user" not in request.model_fields_set and not hasattr(request, "metadata")


@pytest.mark.parametrize(("fields", "loc"), [
    ({"audio": {"format": "wav"}}, ("audio",)),
    ({"functions": []}, ("functions",)),
    ({"prediction": {"type": "content", "content": "x"}}, ("prediction",)),
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]},
     ("messages", 0, "content", 0, "cache_control")),
])
def test_unsupported_fields_are_refused_by_name(fields, loc) -> None:
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    assert error_locs(info) == [loc]
    assert info.value.errors()[0]["type"] == "extra_forbidden"


@pytest.mark.parametrize(("field", "value"), [
    ("stream", "yes"), ("stream", 1), ("n", 1.5), ("n", "2"), ("max_tokens", "8"),
    ("logprobs", "true"), ("seed", 3.0), ("temperature", "0.5"),
])
def test_types_are_strict_where_openai_is(field, value) -> None:
    with pytest.raises(ValidationError) as info:
        chat(**{field: value})
    assert error_locs(info) == [(field,)]


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant"])
def test_accepted_roles(role: str) -> None:
    assert chat(messages=[{"role": role, "content": "x"}]).messages[0].role == role


def test_unknown_role_is_rejected_at_its_path() -> None:
    with pytest.raises(ValidationError) as info:
        chat(messages=[{"role": "function", "content": "x"}])
    assert error_locs(info) == [("messages", 0, "role")]


def test_part_without_its_payload_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        chat(messages=[{"role": "user", "content": [{"type": "image_url", "text": "x"}]}])
    assert error_locs(info) == [("messages", 0, "content", 0)]
    assert "content parts of type 'image_url' need the 'image_url' field" in str(info.value)


def test_unknown_part_type_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        chat(messages=[{"role": "user", "content": [{"type": "file", "file": {}}]}])
    assert error_locs(info)[0] == ("messages", 0, "content", 0, "type")


def test_stop_accepts_a_string_or_a_list() -> None:
    assert chat(stop="###").stop == ["###"]
    assert chat(stop=["a", "b"]).stop == ["a", "b"]
    assert chat(stop=None).stop == []
    assert chat().stop == []


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert chat(max_tokens=50, max_completion_tokens=7).output_limit == 7
    assert chat(max_tokens=50).output_limit == 50
    assert chat().output_limit is None


def test_logprob_counts() -> None:
    assert chat().num_logprobs is None
    assert chat(logprobs=True).num_logprobs == 0
    assert chat(logprobs=True, top_logprobs=3).num_logprobs == 3
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs to be true"):
        chat(top_logprobs=2)


def test_include_usage_only_applies_to_streams() -> None:
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True, stream_options={"include_usage": False}).include_usage
    assert not chat(stream=True).include_usage


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0), ("n", 0), ("seed", -1),
    ("presence_penalty", 3), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0),
    ("max_tokens", 0), ("max_completion_tokens", 0), ("top_logprobs", 21),
])
def test_out_of_range_sampling_is_rejected_at_its_field(field: str, value: float) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(ValidationError) as info:
        chat(**{field: value}, **extra)
    assert error_locs(info) == [(field,)]


@pytest.mark.parametrize(("prompt", "expected"), [
    ("Once upon", "Once upon"), (["Once upon"], "Once upon"), ([1, 2, 3], [1, 2, 3]),
])
def test_completion_prompt_forms(prompt, expected) -> None:
    assert CompletionRequest(prompt=prompt).prompt == expected


@pytest.mark.parametrize(("prompt", "message"), [
    (["a", "b"], "batched prompts are not supported"),
    ([], "prompt must be a string"),
    ([1, -2], "prompt must be a string"),
    ([True], "prompt must be a string"),
    ([[1, 2]], "prompt must be a string"),
    (7, "prompt must be a string"),
])
def test_completion_prompt_rejects(prompt, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        CompletionRequest(prompt=prompt)
    assert error_locs(info) == [("prompt",)]


def test_chunk_delta_carries_only_what_it_sets() -> None:
    chunk = ChatCompletionChunk(id="chatcmpl-1", created=1, model="m", choices=[
        ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content="")),
        ChatChunkChoice(index=1, delta=ChatDelta(content="Hel")),
        ChatChunkChoice(index=2, delta=ChatDelta(), finish_reason="stop"),
    ])
    assert json.loads(chunk.model_dump_json()) == {
        "id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "system_fingerprint": None, "usage": None, "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None},
            {"index": 1, "delta": {"content": "Hel"}, "logprobs": None, "finish_reason": None},
            {"index": 2, "delta": {}, "logprobs": None, "finish_reason": "stop"},
        ]}
