"""The real processes with mutual TLS on both gRPC links: `python -m mmserve.run --tls-*`."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys

import grpc
import httpx
import pytest
from PIL import Image
from tls_certs import make_certs

from protos import llm_pb2, llm_pb2_grpc
from polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_stack_answers_over_mtls_and_refuses_plaintext(smollm2_dir, tmp_path) -> None:
    certs = make_certs(tmp_path)
    gateway, llm, encoder = free_port(), free_port(), free_port()
    log = tmp_path / "stack.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmserve.run", "--port", str(gateway), "--llm-port", str(llm),
             "--encoder-port", str(encoder), "--tls-ca", str(certs.ca),
             "--tls-cert", str(certs.peer.cert), "--tls-key", str(certs.peer.key)],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-4000:]
            return "mmserve is up" in log.read_text()

        wait_until(up, 300, lambda: log.read_text()[-4000:], interval_s=0.3)
        buffer = io.BytesIO()
        Image.new("RGB", (448, 448), (10, 120, 200)).save(buffer, format="PNG")
        image = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        reply = httpx.post(f"http://127.0.0.1:{gateway}/v1/chat/completions", timeout=120, json={
            "max_tokens": 3, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "What is this?"}]}]})
        with grpc.insecure_channel(f"127.0.0.1:{llm}") as channel:
            with pytest.raises(grpc.RpcError) as refused:
                llm_pb2_grpc.LLMStub(channel).GetModelInfo(llm_pb2.ModelInfoRequest(), timeout=5)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    # Gateway → LLM → encoder, each over mTLS: the image became 256 prompt positions.
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] > 256
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
