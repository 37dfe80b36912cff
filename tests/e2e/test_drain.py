"""Graceful drain and the internal token, with the real processes: SIGTERM mid-stream to
the gateway, then to the LLM service, then to the encoder. Each time the running stream
completes, a new request is refused with 503 / UNAVAILABLE, readiness turns, the process
exits within its grace period and leaves no shared-memory files behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from e2e_stack import data_url, free_port, png_bytes, wait_for_line
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mmserve.rpc.auth import TOKEN_KEY
from protos import llm_pb2, llm_pb2_grpc

pytestmark = pytest.mark.e2e
GRACE_S = 120  # generous: a contended CI machine may stream a few tokens a second
TOKEN = "e2e-internal-token"


def _start(name: str, args: list[str], log: Path, ready_line: str) -> subprocess.Popen:
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", name, *args], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_for_line(proc, log, ready_line, name)
    return proc


def _stream_tokens(url: str, body: dict, out: dict) -> None:
    """Streams a completion through the gateway; notes its status, text and finish."""
    pieces, finish = [], None
    with httpx.stream("POST", url, json=body, timeout=GRACE_S) as response:
        out["status"] = response.status_code
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                pieces.append(choice.get("text", ""))
                finish = choice.get("finish_reason") or finish
                out["first"] = True
    out["text"], out["finish"] = "".join(pieces), finish


def _exit_within(proc: subprocess.Popen, seconds: float) -> float:
    started = time.monotonic()
    proc.wait(timeout=seconds)
    return time.monotonic() - started


def test_sigterm_drains_each_service(smollm2_dir, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    ports = {name: free_port() for name in ("gateway", "llm", "encoder")}
    common = ["--internal-token-file", str(token_file), "--shutdown-grace-s", str(GRACE_S)]
    procs = []
    try:
        encoder = _start("encoder_service", ["--host", "127.0.0.1", "--port",
                                             str(ports["encoder"]), "--shm-dir", str(shm),
                                             *common], tmp_path / "encoder.log",
                         "encoder serving on")
        procs.append(encoder)
        llm = _start("llm_service", ["--host", "127.0.0.1", "--port", str(ports["llm"]),
                                     "--encoder-address", f"127.0.0.1:{ports['encoder']}",
                                     "--shm-dir", str(shm), *common],
                     tmp_path / "llm.log", "LLM service listening")
        procs.append(llm)
        gateway = _start("gateway", ["--host", "127.0.0.1", "--port", str(ports["gateway"]),
                                     "--llm-address", f"127.0.0.1:{ports['llm']}", *common],
                         tmp_path / "gateway.log", "Application startup complete")
        procs.append(gateway)
        base = f"http://127.0.0.1:{ports['gateway']}"
        llm_address = f"127.0.0.1:{ports['llm']}"

        # The token works on both links: an image goes gateway -> LLM -> encoder.
        image = {"model": "smollm2-135m-instruct", "max_tokens": 4, "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Describe."},
                {"type": "image_url", "image_url": {"url": data_url(png_bytes(64, 64))}}]}]}
        answered = httpx.post(base + "/v1/chat/completions", json=image, timeout=60)
        assert answered.status_code == 200
        # One line per request in each service, found by the same request_id= key.
        request_id = answered.headers["x-request-id"]
        for name, prefix in (("gateway", "http=/v1/chat/completions"),
                             ("llm", "rpc=Generate"), ("encoder", "rpc=Encode")):
            def lines(name=name) -> list[str]:  # written as the call ends: poll briefly
                return [line for line in (tmp_path / f"{name}.log").read_text().splitlines()
                        if f"request_id={request_id} " in line]
            wait_until_true(lines, 10, f"no {name} log line for {request_id}")
            assert len(lines()) == 1 and prefix in lines()[0], (name, lines())
        # ...and a caller without it is refused by the LLM service (health stays open).
        with grpc.insecure_channel(llm_address) as channel:
            with pytest.raises(grpc.RpcError) as denied:
                llm_pb2_grpc.LLMStub(channel).GetModelInfo(llm_pb2.ModelInfoRequest(), timeout=5)
            assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING

        # 1. The gateway: SIGTERM while a stream runs. The stream must outlast the checks
        # below (the gateway exits as soon as its last stream ends): 200 tokens take seconds.
        body = {"model": "smollm2-135m-instruct", "prompt": "Once upon a time",
                "max_tokens": 200, "ignore_eos": True, "stream": True}
        result: dict = {}
        streaming = threading.Thread(target=_stream_tokens,
                                     args=(base + "/v1/completions", body, result))
        streaming.start()
        wait_until_true(lambda: result.get("first"), 60, "the gateway stream never started")
        gateway.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert httpx.get(base + "/ready", timeout=5).status_code == 503
        refused = httpx.post(base + "/v1/completions", json={**body, "stream": False},
                             timeout=10)
        assert refused.status_code == 503
        assert "shutting down" in refused.json()["error"]["message"]
        streaming.join(timeout=GRACE_S)
        assert result["status"] == 200 and result["finish"] == "length", result
        assert _exit_within(gateway, GRACE_S) < GRACE_S

        # 2. The LLM service: SIGTERM mid-stream of a 100-token generation (the old fixed 5 s cut such streams).
        metadata = ((TOKEN_KEY, TOKEN),)
        with grpc.insecure_channel(llm_address) as channel:
            stub = llm_pb2_grpc.LLMStub(channel)
            request = llm_pb2.GenerateRequest(
                request_id="drain-1", prompt="Once upon a time",
                sampling=llm_pb2.SamplingParams(max_tokens=100, ignore_eos=True))
            stream = stub.Generate(request, metadata=metadata, timeout=300)
            tokens = len(next(stream).token_ids)
            llm.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                               timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as unavailable:
                next(stub.Generate(request, metadata=metadata, timeout=10))
            assert unavailable.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in unavailable.value.details()
            finish = None
            for reply in stream:
                tokens += len(reply.token_ids)
                finish = reply.finish_reason or finish
            assert tokens == 100 and finish == llm_pb2.FINISH_REASON_LENGTH
        assert _exit_within(llm, GRACE_S) < GRACE_S
        assert llm.returncode == 0, (tmp_path / "llm.log").read_text()[-3000:]

        # 3. The encoder, idle: NOT_SERVING at once and out well inside its grace.
        encoder.send_signal(signal.SIGTERM)
        assert _exit_within(encoder, GRACE_S) < 10
        assert sorted(p.name for p in shm.iterdir()) == []  # no regions, no probe files
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def wait_until_true(condition, timeout_s: float, message: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)
