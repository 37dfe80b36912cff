"""/v1/completions and /v1/models through the whole app."""

from __future__ import annotations

from gateway_fake_llm import MODEL_ID
from gateway_sse import sse_data


async def test_completion_from_a_string_prompt(client, fake_llm) -> None:
    response = await client.post("/v1/completions", json={"model": MODEL_ID,
                                                          "prompt": "Once upon a time"})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": "[0] Once upon a time", "logprobs": None,
                                "finish_reason": "stop"}]
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 5
    assert fake_llm.requests[0].prompt == "Once upon a time"


async def test_completion_from_token_ids(client, fake_llm) -> None:
    response = await client.post("/v1/completions", json={"prompt": [101, 102], "max_tokens": 2})
    assert response.json()["choices"][0] == {"index": 0, "text": "[0] 101", "logprobs": None,
                                             "finish_reason": "length"}
    assert list(fake_llm.requests[0].prompt_token_ids.ids) == [101, 102]


async def test_completion_logprobs_in_the_legacy_shape(client) -> None:
    response = await client.post("/v1/completions", json={"prompt": "a bc", "logprobs": 1})
    assert response.json()["choices"][0]["logprobs"] == {
        "tokens": ["[0]", " a", " bc"], "token_logprobs": [-0.25, -0.5, -0.75],
        "top_logprobs": [{"alt0": -1.0}] * 3, "text_offset": [0, 3, 5]}


async def test_completion_stream(client) -> None:
    response = await client.post("/v1/completions", json={
        "prompt": ["x y"], "stream": True, "stream_options": {"include_usage": True}})
    *chunks, usage_chunk, done = sse_data(response.text)
    assert done == "[DONE]"
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert [chunk["choices"][0]["text"] for chunk in chunks] == ["[0]", " x", " y"]
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, "stop"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 3


async def test_completion_rejects_batched_prompts(client, fake_llm) -> None:
    response = await client.post("/v1/completions", json={"prompt": ["a", "b"]})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert "batched prompts are not supported" in response.json()["error"]["message"]
    assert fake_llm.requests == []


async def test_models_list_and_retrieve(client) -> None:
    listed = await client.get("/v1/models")
    assert listed.status_code == 200
    card, = listed.json()["data"]
    assert listed.json()["object"] == "list"
    assert isinstance(card.pop("created"), int)
    assert card == {"id": MODEL_ID, "object": "model", "owned_by": "mmserve",
                    "max_model_len": 4096}
    retrieved = await client.get(f"/v1/models/{MODEL_ID}")
    assert retrieved.json()["id"] == MODEL_ID
    missing = await client.get("/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_models_use_the_advertised_name(configured_client) -> None:
    async with configured_client(model_name="vision-small") as client:
        listed = await client.get("/v1/models")
        assert [card["id"] for card in listed.json()["data"]] == ["vision-small"]
