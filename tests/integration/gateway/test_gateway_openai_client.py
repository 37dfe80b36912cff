"""The official openai client against the gateway served by uvicorn on a free port."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import openai
import pytest
from gateway_fake_llm import MODEL_ID

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "hello big world"}]


@pytest.fixture
async def openai_client(gateway_url: str, auth_headers: dict[str, str]
                        ) -> AsyncIterator[openai.AsyncOpenAI]:
    api_key = auth_headers["Authorization"].removeprefix("Bearer ")
    client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0)
    yield client
    await client.close()


async def test_chat(openai_client) -> None:
    completion = await openai_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "[0] hello big world"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (6, 4)
    assert completion.usage.prompt_tokens_details.cached_tokens == 3


async def test_chat_stream(openai_client) -> None:
    stream = await openai_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,
                                                         stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "[0] hello big world"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)


async def test_chat_stream_with_usage(openai_client) -> None:
    stream = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == 10
    assert all(chunk.usage is None for chunk in chunks[:-1])


async def test_n_choices(openai_client) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, n=2, max_completion_tokens=2)
    assert [(c.index, c.message.content, c.finish_reason) for c in completion.choices] == [
        (0, "[0] hello", "length"), (1, "[1] hello", "length")]


async def test_completions(openai_client) -> None:
    completion = await openai_client.completions.create(model=MODEL_ID, prompt="one two")
    assert completion.choices[0].text == "[0] one two"
    stream = await openai_client.completions.create(model=MODEL_ID, prompt="one two", stream=True)
    assert "".join([chunk.choices[0].text async for chunk in stream]) == "[0] one two"


async def test_models(openai_client) -> None:
    models = [model.id async for model in openai_client.models.list()]
    assert models == [MODEL_ID]


async def test_bad_request_carries_the_service_message(openai_client, fake_llm) -> None:
    fake_llm.fail_with = (grpc.StatusCode.INVALID_ARGUMENT,
                          "prompt (9000 tokens) exceeds max_model_len 4096")
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    assert info.value.status_code == 400
    assert info.value.body["message"] == "prompt (9000 tokens) exceeds max_model_len 4096"
    assert "exceeds max_model_len 4096" in str(info.value)


async def test_validation_error_names_the_field(openai_client) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert info.value.body["param"] == "temperature"
    assert "temperature: Input should be less than or equal to 2" in info.value.body["message"]


async def test_unknown_fields_are_a_bad_request(openai_client) -> None:
    completion = await openai_client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, user="u-1", extra_body={"guided_json": None})
    assert completion.choices[0].message.content == "[0] hello big world"
    with pytest.raises(openai.BadRequestError) as info:
        await openai_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,
                                                    extra_body={"foo": [1, 2]})
    assert info.value.body["param"] == "foo"


async def test_wrong_key_is_401(gateway_url) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    await client.close()
    assert info.value.body["code"] == "invalid_api_key"


async def test_overload_is_a_rate_limit_error(openai_client, fake_llm) -> None:
    fake_llm.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full")
    with pytest.raises(openai.RateLimitError) as info:
        await openai_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES)
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["message"] == "waiting queue is full"


async def test_error_mid_stream_raises_in_the_client(openai_client, fake_llm) -> None:
    fake_llm.fail_with = (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline")
    fake_llm.fail_after_first = True
    stream = await openai_client.chat.completions.create(model=MODEL_ID, messages=MESSAGES,
                                                         stream=True)
    received = []
    with pytest.raises(openai.APIError, match="The request timed out."):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert received == ["", "[0]"]
