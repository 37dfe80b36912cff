"""The web chat page in headless Chromium against the real stack: an image and a question go in,
text streams back, Stop cancels the generation in the engine."""

from __future__ import annotations

import base64
import json
import os

import pytest
from e2e_stack import MODEL, artifact_dir, png_bytes
from polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright package is not installed")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, mmserve_stack):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.goto(mmserve_stack.base + "/")
    yield page
    page.close()


def test_chat_with_an_image_streams_and_stops(page, mmserve_stack, tmp_path):
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached", timeout=30_000)
    image = tmp_path / "stripes.png"
    image.write_bytes(png_bytes(448, 448))  # one tile: a short prefill on CPU
    page.set_input_files("#image-input", str(image))
    page.wait_for_selector("#attachments img")
    page.fill("#max-tokens", "500")
    page.fill("#message", "Describe this picture, then write a very long story about it.")
    page.click("#send")

    page.wait_for_selector(".msg.user img")  # the image is part of the sent message
    reply = page.locator(".msg.assistant .content").last
    first = wait_until(lambda: reply.text_content(), 120, "no text streamed in")
    # Streaming: the text keeps growing while the generation runs.
    wait_until(lambda: len(reply.text_content()) > len(first), 30, "the text stopped growing")
    assert mmserve_stack.engine_stats().running == 1
    page.click("#stop")

    page.wait_for_selector(".msg.assistant .note:text('(stopped)')", timeout=10_000)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    stopped_at = reply.text_content()
    # The gateway cancelled the gRPC call: the engine lets go of the request.
    wait_until(lambda: mmserve_stack.engine_stats().running == 0, 10,
               "the engine still runs the request after Stop")
    assert reply.text_content() == stopped_at
    page.screenshot(path=str(artifact_dir(tmp_path) / "web_chat_stopped.png"), full_page=True)


def test_api_key_is_kept_in_local_storage(page):
    page.fill("#api-key", "sk-remember-me")
    page.dispatch_event("#api-key", "change")
    page.reload()
    assert page.input_value("#api-key") == "sk-remember-me"
    assert page.evaluate("localStorage.getItem('mmserve.apiKey')") == "sk-remember-me"


def test_pasted_image_audio_and_key_go_into_the_request(page, tmp_path):
    """What the page sends, checked at the network boundary with a canned stream back."""
    sent = []

    def answer(route):
        sent.append(route.request)
        chunk = '{"choices":[{"index":0,"delta":{"content":"Heard you."},"finish_reason":null}]}'
        route.fulfill(status=200, content_type="text/event-stream",
                      body=f"data: {chunk}\n\ndata: [DONE]\n\n")

    page.route("**/v1/chat/completions", answer)
    page.fill("#api-key", "sk-typed")
    page.dispatch_event("#api-key", "change")
    audio = tmp_path / "beep.wav"
    audio.write_bytes(b"RIFF$\x00\x00\x00WAVEfmt " + bytes(28))
    page.set_input_files("#audio-input", str(audio))
    page.evaluate("""async () => {
        const canvas = document.createElement('canvas');
        canvas.width = canvas.height = 8;
        const png = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
        const data = new DataTransfer();
        data.items.add(new File([png], 'pasted.png', {type: 'image/png'}));
        const box = document.getElementById('message');
        box.dispatchEvent(new ClipboardEvent('paste', {clipboardData: data, bubbles: true}));
    }""")
    page.wait_for_selector("#attachments img")
    page.fill("#message", "What do you hear?")
    page.press("#message", "Enter")
    page.wait_for_selector(".msg.assistant .content:text('Heard you.')")

    (request,) = sent
    assert request.headers["authorization"] == "Bearer sk-typed"
    body = request.post_data_json
    assert body["stream"] is True
    audio_part, image_part, text_part = body["messages"][-1]["content"]
    assert audio_part["type"] == "input_audio" and audio_part["input_audio"]["format"] == "wav"
    assert base64.b64decode(audio_part["input_audio"]["data"]) == audio.read_bytes()
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert text_part == {"type": "text", "text": "What do you hear?"}


def test_media_already_sent_are_resent_as_handles_or_as_bytes_once_evicted(page, tmp_path):
    """Canned gateway replies: turn 1 returns a handle for the image; turn 2 sends the handle,
    which the gateway no longer knows (404), so the page resends the image itself."""
    handle = "mm://sha256:" + "ab" * 32
    sent = []

    def answer(route):
        body = route.request.post_data_json
        sent.append(body)
        image_url = body["messages"][0]["content"][0]["image_url"]["url"]
        if image_url == handle and len(sent) == 2:
            route.fulfill(status=404, content_type="application/json",
                          body='{"error": {"message": "unknown media handle", "type": '
                               '"invalid_request_error", "param": null, "code": null}}')
            return
        chunk = '{"choices":[{"index":0,"delta":{"content":"Seen."},"finish_reason":null}]}'
        route.fulfill(status=200, content_type="text/event-stream",
                      headers={"X-Media-Handles": handle},
                      body=f"data: {chunk}\n\ndata: [DONE]\n\n")

    page.route("**/v1/chat/completions", answer)
    image = tmp_path / "dot.png"
    image.write_bytes(png_bytes(16, 16))
    page.set_input_files("#image-input", str(image))
    page.wait_for_selector("#attachments img")
    for turn, question in enumerate(["What is it?", "And its colour?", "Thanks."], start=1):
        page.fill("#message", question)
        page.press("#message", "Enter")
        wait_until(lambda: page.locator(".msg.assistant .content:text('Seen.')").count() == turn,
                   10, f"no answer to turn {turn}")

    urls = [body["messages"][0]["content"][0]["image_url"]["url"] for body in sent]
    assert urls[0].startswith("data:image/png;base64,")
    assert urls[1] == handle  # turn 2 sent the handle, got a 404 ...
    assert urls[2] == urls[0]  # ... and sent the image itself again
    assert urls[3] == handle  # turn 3: the handle the retry returned
    assert [len(body["messages"]) for body in sent] == [1, 3, 3, 5]
    assert page.locator(".msg.error").count() == 0


def test_json_mode_and_tool_calls(page):
    """The JSON-mode toggle sends response_format json_object; streamed tool-call deltas show
    as a call (name and arguments) and go back to the server with the next turn."""
    sent = []
    deltas = [
        {"index": 0, "id": "call_7", "type": "function",
         "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": '}},
        {"index": 0, "function": {"arguments": '"Rome"}'}},
    ]

    def answer(route):
        sent.append(route.request.post_data_json)
        chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": [delta]},
                                "finish_reason": None}]} for delta in deltas]
        chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
        body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks)
        route.fulfill(status=200, content_type="text/event-stream", body=body + "data: [DONE]\n\n")

    page.route("**/v1/chat/completions", answer)
    page.check("#json-mode")
    page.fill("#message", "Weather in Rome?")
    page.press("#message", "Enter")
    page.wait_for_selector(".msg.assistant .tool-name:text('tool call: get_weather')")
    assert page.locator(".msg.assistant .tool-args").text_content() == '{"city": "Rome"}'
    page.uncheck("#json-mode")
    page.fill("#message", "And tomorrow?")
    page.press("#message", "Enter")
    wait_until(lambda: len(sent) == 2, 10, "the second turn was not sent")

    assert sent[0]["response_format"] == {"type": "json_object"}
    assert "response_format" not in sent[1]
    assert sent[1]["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_7", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
