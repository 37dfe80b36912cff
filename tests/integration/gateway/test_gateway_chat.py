"""/v1/chat/completions through the whole app, against the fake LLM service."""

from __future__ import annotations

import base64

from gateway_fake_llm import MODEL_ID
from gateway_sse import sse_data

USER_HELLO = [{"role": "user", "content": "hello big world"}]


async def test_non_stream_completion_shape(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions",
                                 json={"model": MODEL_ID, "messages": USER_HELLO})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and len(body["id"]) == len("chatcmpl-") + 32
    assert isinstance(body.pop("created"), int)
    assert body == {
        "id": body["id"], "object": "chat.completion", "model": MODEL_ID,
        "system_fingerprint": "fp_torch",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "[0] hello big world"},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 1}},
    }
    # One id everywhere: response, header, GenerateRequest and gRPC metadata.
    assert response.headers["x-request-id"] == body["id"]
    assert fake_llm.requests[0].request_id == body["id"]
    assert fake_llm.metadata[0]["x-request-id"] == body["id"]


async def test_generate_request_carries_roles_parts_and_sampling(client, fake_llm) -> None:
    audio = base64.b64encode(b"RIFF....WAVE").decode()
    response = await client.post("/v1/chat/completions", json={
        "messages": [
            {"role": "developer", "content": "Answer in French."},
            {"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                {"type": "audio_url", "audio_url": {"url": "mm://sha256:" + "ab" * 32}},
                {"type": "text", "text": "what do you see and hear"},
            ]},
        ],
        "max_tokens": 50, "max_completion_tokens": 3, "temperature": 0.2, "top_p": 0.8,
        "seed": 42, "stop": ["\n", "###"], "frequency_penalty": 0.3, "top_k": 20,
        "repetition_penalty": 1.05, "ignore_eos": True, "skip_special_tokens": False,
    })
    assert response.status_code == 200
    assert response.json()["choices"][0]["finish_reason"] == "length"
    assert response.json()["choices"][0]["message"]["content"] == "[0] what do"
    sent = fake_llm.requests[0]
    assert sent.model == MODEL_ID
    system, user = sent.messages.messages
    # Forwarded as sent; the LLM service reads "developer" as system.
    assert (system.role, system.content[0].text) == ("developer", "Answer in French.")
    image, sound, handle, text = user.content
    assert image.image.url == "data:image/png;base64,iVBORw0KGgo="
    assert (sound.audio.data, sound.audio.mime_type) == (b"RIFF....WAVE", "audio/wav")
    assert (handle.audio.url, handle.audio.data) == ("mm://sha256:" + "ab" * 32, b"")
    assert text.text == "what do you see and hear"
    s = sent.sampling
    assert (s.max_tokens, s.seed, list(s.stop), s.top_k, s.ignore_eos, s.skip_special_tokens) == (
        3, 42, ["\n", "###"], 20, True, False)
    assert round(s.temperature, 3) == 0.2 and round(s.top_p, 3) == 0.8
    assert round(s.frequency_penalty, 3) == 0.3 and round(s.repetition_penalty, 3) == 1.05


async def test_stream_chunks_in_openai_order(client) -> None:
    response = await client.post("/v1/chat/completions",
                                 json={"messages": USER_HELLO, "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {chunk["id"] for chunk in chunks} == {response.headers["x-request-id"]}
    assert all(chunk["object"] == "chat.completion.chunk" and "usage" not in chunk
               for chunk in chunks)
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": "[0]"},
                      {"content": " hello"}, {"content": " big"}, {"content": " world"}, {}]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None] * 5 + ["stop"]


async def test_stream_with_usage_ends_with_a_usage_chunk(client) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": USER_HELLO, "stream": True, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk, done = sse_data(response.text)
    assert done == "[DONE]"
    assert all(chunk["usage"] is None for chunk in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                    "prompt_tokens_details": {"cached_tokens": 1}}


async def test_n_choices_are_aggregated_per_index(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions",
                                 json={"messages": USER_HELLO, "n": 2, "max_tokens": 3})
    body = response.json()
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "[0] hello big", "length"), (1, "[1] hello big", "length")]
    assert body["usage"]["completion_tokens"] == 6  # both choices
    assert body["usage"]["prompt_tokens"] == 3  # the prompt once
    assert fake_llm.requests[0].sampling.n == 2


async def test_n_choices_stream(client) -> None:
    response = await client.post("/v1/chat/completions",
                                 json={"messages": USER_HELLO, "n": 2, "stream": True})
    chunks = sse_data(response.text)[:-1]
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant",
                                                               "content": ""}] * 2
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in chunks:
        choice, = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content", "")
        if choice["finish_reason"]:
            finishes[choice["index"]] = choice["finish_reason"]
    assert texts == {0: "[0] hello big world", 1: "[1] hello big world"}
    assert finishes == {0: "stop", 1: "stop"}


async def test_logprobs(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2})
    assert fake_llm.requests[0].sampling.logprobs == 2
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert content[1] == {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105],
                          "top_logprobs": [
                              {"token": "alt0", "logprob": -1.0, "bytes": [97, 108, 116, 48]},
                              {"token": "alt1", "logprob": -2.0, "bytes": [97, 108, 116, 49]}]}
    streamed = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "stream": True})
    entries = [entry for chunk in sse_data(streamed.text)[:-1]
               for choice in chunk["choices"] if choice["logprobs"]
               for entry in choice["logprobs"]["content"]]
    assert [(entry["token"], entry["top_logprobs"]) for entry in entries] == [("[0]", []),
                                                                            (" hi", [])]


async def test_unknown_model_is_404(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions",
                                 json={"model": "gpt-4o", "messages": USER_HELLO})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert response.json()["error"]["param"] == "model"
    assert fake_llm.requests == []


async def test_advertised_name_is_accepted_and_echoed(configured_client, fake_llm) -> None:
    async with configured_client(model_name="my-vlm") as client:
        response = await client.post("/v1/chat/completions",
                                     json={"model": "my-vlm", "messages": USER_HELLO})
        assert response.json()["model"] == "my-vlm"
        assert fake_llm.requests[0].model == MODEL_ID  # the LLM service's own id


async def test_unknown_fields_are_refused_by_name(client, fake_llm) -> None:
    response = await client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi", "name": "ann"}], "user": "u-1",
        "response_format": {"type": "text"}, "some_future_field": {"x": 1}})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "some_future_field"
    assert error["message"].startswith("some_future_field: not supported by this server")
    assert fake_llm.requests == []

