"""The whole local stack as a user runs it: `python -m mmserve.run`, then the openai client."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(smollm2_dir):
    ports = {"gateway": free_port(), "llm": free_port(), "encoder": free_port()}
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"mmserve-e2e-{ports['gateway']}.log"),
               "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmserve.run", "--port", str(ports["gateway"]),
         "--llm-port", str(ports["llm"]), "--encoder-port", str(ports["encoder"])],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    base = f"http://127.0.0.1:{ports['gateway']}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        log.seek(0)
        if "mmserve is up" in log.read():
            break
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the stack exited during start-up:\n{log.read()[-4000:]}")
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the stack did not come up in 300 s")
    yield base, ports, proc, log
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI

    return OpenAI(base_url=stack[0] + "/v1", api_key="unused", max_retries=0)


def png_data_url(width: int, height: int) -> str:
    image = Image.new("RGB", (width, height))
    for x in range(0, width, 50):  # some structure so the content hash is not trivial
        image.paste((x % 256, 80, 160), (x, 0, min(x + 25, width), height))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(client, content, **kw):
    return client.chat.completions.create(
        model="smollm2-135m-instruct", temperature=0, max_tokens=24,
        messages=[{"role": "user", "content": content}], **kw)


def test_text_chat_answers_paris(client):
    reply = chat(client, QUESTION)
    text = reply.choices[0].message.content
    assert "Paris" in text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10 and reply.usage.completion_tokens > 0


def test_streamed_text_is_identical(client):
    full = chat(client, QUESTION).choices[0].message.content
    pieces, finish = [], None
    for chunk in chat(client, QUESTION, stream=True):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len(pieces) > 2
    assert "".join(pieces) == full
    assert finish in ("stop", "length")


def test_image_chat_counts_embedding_slots(client):
    text_only = chat(client, [{"type": "text", "text": "Describe the image."}], max_tokens=4)
    with_image = chat(client, [
        {"type": "image_url", "image_url": {"url": png_data_url(1000, 600)}},
        {"type": "text", "text": "Describe the image."},
    ], max_tokens=4)
    assert with_image.choices[0].finish_reason in ("stop", "length")
    # 1000x600 -> 3x2 grid + thumbnail = 7 tiles of 256 rows (model-formats §1.3).
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens == 7 * 256


def test_bad_base64_image_is_a_400_with_openai_error(client, stack):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        chat(client, [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}},
                      {"type": "text", "text": "hi"}])
    assert info.value.status_code == 400
    body = info.value.body
    error = body.get("error", body)  # openai clients differ in whether they unwrap "error"
    assert error["type"] == "invalid_request_error"
    assert "base64" in error["message"]


def test_services_still_healthy(stack, client):
    base, ports, proc, _ = stack
    assert proc.poll() is None
    assert httpx.get(base + "/ready", timeout=5).status_code == 200
    assert "Paris" in chat(client, QUESTION).choices[0].message.content


def test_ctrl_c_stops_everything(stack):
    _, _, proc, log = stack
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0
