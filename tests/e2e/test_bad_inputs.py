"""Bad input through HTTP against the real stack: the right status, a message that says what to
change, and services that stay up and leak nothing."""

from __future__ import annotations

import http.server
import struct
import subprocess
import sys
import threading
import time
import zlib

import httpx
import pytest
from e2e_stack import MODEL, data_url, free_port, png_bytes, stop, wait_for_line

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

API_KEY = "sk-e2e-secret"


def chat_body(content, **kw) -> dict:
    return {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}],
            **kw}


def with_image(url: str) -> dict:
    return chat_body([{"type": "image_url", "image_url": {"url": url}},
                      {"type": "text", "text": "What is this?"}])


def png_claiming(width: int, height: int) -> bytes:
    """A small, well-formed PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    rows = zlib.compress(b"\0" * 64)  # far fewer rows than claimed; never decoded
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows)
            + chunk(b"IEND", b""))


class Redirector(http.server.BaseHTTPRequestHandler):
    """Redirects every GET to the metadata address; counts the requests it gets."""

    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_response(302)
        self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def redirector():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/image.png"
    server.shutdown()


@pytest.fixture(scope="module")
def gateway(mmserve_stack):
    with httpx.Client(base_url=mmserve_stack.base, timeout=120) as client:
        yield client


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert error["message"] and error["type"], error
    return error


def assert_healthy(stack, gateway) -> None:
    assert stack.alive(), stack.log_tail()
    assert gateway.get("/ready").status_code == 200
    reply = gateway.post("/v1/chat/completions", json=chat_body("Say hi."))
    assert reply.status_code == 200, reply.text


CASES = [
    # id, keyword arguments of gateway.post, status, words the message must contain
    ("invalid-json", dict(content=b'{"model": "x", "messages": [', headers={
        "Content-Type": "application/json"}), 400, "JSON"),
    ("wrong-types", dict(json=chat_body("hi", max_tokens="many", temperature="hot")), 400,
     "max_tokens"),
    ("empty-messages", dict(json={"model": MODEL, "messages": []}), 400, "messages"),
    ("unknown-model", dict(json={**chat_body("hi"), "model": "gpt-17"}), 404, "gpt-17"),
    ("negative-max-tokens", dict(json=chat_body("hi", max_tokens=-5)), 400, "max_tokens"),
    ("oversized-max-tokens", dict(json=chat_body("hi", max_tokens=10**9)), 400, "max_tokens"),
    ("prompt-beyond-context", dict(json=chat_body("hello " * 20000)), 400, "max_model_len"),
    ("more-choices-than-the-engine-runs", dict(json=chat_body("hi", n=1000)), 400,
     "max_num_seqs=64"),
    ("non-image-bytes", dict(json=with_image(data_url(b"just some text, not an image"))), 400,
     "image"),
    ("truncated-png", dict(json=with_image(data_url(png_bytes(640, 480)[:300]))), 400, "image"),
    ("png-bomb", dict(json=with_image(data_url(png_claiming(20000, 20000)))), 400, "pixels"),
    ("too-many-images", dict(json=chat_body(
        [{"type": "image_url", "image_url": {"url": data_url(png_bytes(28, 28))}}] * 17
        + [{"type": "text", "text": "hi"}])), 400, "16"),
    ("file-url", dict(json=with_image("file:///etc/passwd")), 403, "file"),
    ("loopback-url", dict(json=with_image("http://127.0.0.1:1/x.png")), 403, "127.0.0.1"),
    ("metadata-url", dict(json=with_image("http://169.254.169.254/latest/meta-data/")), 403,
     "169.254.169.254"),
    ("unknown-handle", dict(json=with_image("mm://sha256:" + "ab" * 32)), 404, "ab" * 32),
]


@pytest.mark.parametrize(("request_kwargs", "status", "needle"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_gets_its_status_and_a_message(mmserve_stack, gateway, request_kwargs, status,
                                                 needle):
    response = gateway.post("/v1/chat/completions", **request_kwargs)
    assert response.status_code == status, response.text
    assert needle.lower() in error_of(response)["message"].lower(), response.text


def test_redirect_to_a_blocked_address_is_refused(mmserve_stack, gateway, redirector):
    response = gateway.post("/v1/chat/completions", json=with_image(redirector))
    assert response.status_code == 403, response.text
    assert "address" in error_of(response)["message"]
    assert Redirector.hits == 0  # refused before any connection to a local address


def test_services_healthy_after_the_battery(mmserve_stack, gateway):
    assert_healthy(mmserve_stack, gateway)
    stats = mmserve_stack.engine_stats()
    assert stats.running == 0 and stats.waiting == 0


def test_wrong_api_key_is_a_401(mmserve_stack):
    port = free_port()
    log = mmserve_stack.log.with_name("gateway-with-key.log")
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "--host", "127.0.0.1", "--port", str(port),
             "--llm-address", f"127.0.0.1:{mmserve_stack.llm_port}", "--api-key", API_KEY],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_line(proc, log, "Application startup complete", "the second gateway", 60)
        base = f"http://127.0.0.1:{port}"
        body = chat_body("Say hi.")
        missing = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        wrong = httpx.post(base + "/v1/chat/completions", json=body, timeout=60,
                           headers={"Authorization": "Bearer sk-wrong"})
        right = httpx.post(base + "/v1/chat/completions", json=body, timeout=60,
                           headers={"Authorization": f"Bearer {API_KEY}"})
    finally:
        stop(proc)
    for response in (missing, wrong):
        assert response.status_code == 401
        assert "API key" in error_of(response)["message"]
    assert right.status_code == 200, right.text


def test_client_disconnect_mid_stream_frees_the_request(mmserve_stack):
    idle = mmserve_stack.engine_stats()
    assert idle.running == 0
    body = chat_body("Tell me a long story about the sea.", max_tokens=2000, stream=True,
                     ignore_eos=True)
    with httpx.Client(base_url=mmserve_stack.base, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            text_chunks = 0
            for line in response.iter_lines():
                text_chunks += '"content":"' in line and '"content":""' not in line
                if text_chunks == 3:
                    break
            busy = mmserve_stack.engine_stats()
    # The engine was working on it while the stream was open ...
    assert busy.running == 1 and busy.kv_blocks_used > idle.kv_blocks_used
    # ... and frees it promptly after the client went away.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = mmserve_stack.engine_stats()
        if stats.running == 0 and stats.kv_blocks_used == idle.kv_blocks_used:
            break
        time.sleep(0.1)
    assert (stats.running, stats.waiting, stats.kv_blocks_used) == (0, 0, idle.kv_blocks_used)
