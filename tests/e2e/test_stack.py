"""The whole local stack as a user runs it: `python -m mmserve.run`, then the openai client."""

from __future__ import annotations

import httpx
import pytest
from e2e_stack import MODEL, data_url, png_bytes, stop

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "What is the capital of France?"


def chat(client, content, **kw):
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(
        model=MODEL, temperature=0, messages=[{"role": "user", "content": content}], **kw)


def test_text_chat_answers_paris(openai_client):
    reply = chat(openai_client, QUESTION)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0


def test_streamed_text_is_identical(openai_client):
    full = chat(openai_client, QUESTION).choices[0].message.content
    pieces, finish = [], None
    for chunk in chat(openai_client, QUESTION, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 2
    assert "".join(pieces) == full
    assert finish in ("stop", "length")


def test_image_chat_counts_embedding_slots(openai_client):
    text_only = chat(openai_client, [{"type": "text", "text": "Describe the image."}], max_tokens=4)
    with_image = chat(openai_client, [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(1000, 600))}},
        {"type": "text", "text": "Describe the image."},
    ], max_tokens=4)
    assert with_image.choices[0].finish_reason in ("stop", "length")
    # 1000x600 -> 3x2 grid + thumbnail = 7 tiles of 256 rows (model-formats §1.3).
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 7 * 256


def _server_timing(header: str) -> dict[str, float]:
    parts = (part.strip().split(";dur=") for part in header.split(","))
    return {name: float(ms) for name, ms in parts}


def test_server_timing_says_where_the_time_to_the_first_token_went(openai_client):
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(1000, 601))}}
    question = {"type": "text", "text": "Describe the image."}
    for stream in (False, True):
        reply = openai_client.chat.completions.with_raw_response.create(
            model=MODEL, temperature=0, max_tokens=2, stream=stream,
            messages=[{"role": "user", "content": [image, question]}])
        timing = _server_timing(reply.headers["server-timing"])
        assert set(timing) == {"encode", "prefill"}
        assert timing["encode"] > 0 and timing["prefill"] > 0
    text = openai_client.completions.with_raw_response.create(
        model=MODEL, prompt="Hello", max_tokens=2)
    timing = _server_timing(text.headers["server-timing"])
    assert timing["encode"] == 0 and timing["prefill"] > 0


def test_media_handles_come_back_and_stand_in_for_the_image(openai_client):
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(640, 480))}}
    question = {"type": "text", "text": "Describe the image."}
    first = openai_client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0, max_tokens=4,
        messages=[{"role": "user", "content": [image, question]}])
    (handle,) = first.headers["x-media-handles"].split(", ")
    assert handle.startswith("mm://sha256:") and len(handle) == len("mm://sha256:") + 64
    by_handle = openai_client.chat.completions.with_raw_response.create(
        model=MODEL, temperature=0, max_tokens=4, stream=True,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": handle}}, question]}],
        stream_options={"include_usage": True})
    assert by_handle.headers["x-media-handles"] == handle
    chunks = list(by_handle.parse())
    original = first.parse()
    assert chunks[-1].usage.prompt_tokens == original.usage.prompt_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == original.choices[0].message.content


def test_bad_base64_image_is_a_400_with_openai_error(openai_client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        chat(openai_client, [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}},
            {"type": "text", "text": "hi"}])
    assert info.value.status_code == 400
    body = info.value.body
    error = body.get("error", body)  # openai clients differ in whether they unwrap "error"
    assert error["type"] == "invalid_request_error"
    assert "base64" in error["message"]


def test_services_still_healthy(mmserve_stack, openai_client):
    assert mmserve_stack.alive()
    assert httpx.get(mmserve_stack.base + "/ready", timeout=5).status_code == 200
    assert "Paris" in chat(openai_client, QUESTION).choices[0].message.content


@pytest.mark.stops_stack
def test_ctrl_c_stops_everything(mmserve_stack):
    stop(mmserve_stack.proc)
    assert mmserve_stack.proc.returncode == 0
