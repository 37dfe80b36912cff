"""A hung encoder (SIGSTOP), with the real processes: two encoders, one LLM service, one
gateway. One stopped: requests keep succeeding through the other. Both stopped: an image
request fails with a 503/504 OpenAI error within the encode budget and /ready says so;
SIGCONT recovers without restarting anything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from e2e_stack import MODEL, data_url, free_port, png_bytes
from polling import wait_until

BUDGET_S = 6.0


def spawn(log: Path, *args: str) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen([sys.executable, "-m", *args], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.fixture(scope="module")
def stack(smollm2_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("faults")
    encoder_ports, llm, gateway = [free_port(), free_port()], free_port(), free_port()
    # One tile per image keeps prompts short: the point is the encoder, not prefill speed.
    encoders = [spawn(logs / f"encoder{k}.log", "encoder_service", "--port", str(port),
                      "--max-tiles", "1", "--no-use-thumbnail")
                for k, port in enumerate(encoder_ports)]
    procs = [*encoders,
             spawn(logs / "llm.log", "llm_service", "--port", str(llm), "--encoder-address",
                   ",".join(f"127.0.0.1:{p}" for p in encoder_ports),
                   "--encoder-budget-s", str(BUDGET_S), "--encoder-health-interval-s", "0.5",
                   "--encoder-health-timeout-s", "0.5"),
             spawn(logs / "gateway.log", "gateway", "--port", str(gateway), "--llm-address",
                   f"127.0.0.1:{llm}")]
    base = f"http://127.0.0.1:{gateway}"
    try:
        wait_until(lambda: ready(base) == 200, 300, interval_s=0.5)
        yield base, encoders
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def ready(base: str) -> int:
    try:
        return httpx.get(base + "/ready", timeout=3).status_code
    except httpx.HTTPError:
        return 0


def ask(base: str, shade: int) -> httpx.Response:
    image = png_bytes(64 + shade, 48)
    return httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": data_url(image)}}]}]})


def test_one_hung_encoder_of_two_costs_no_request(stack):
    base, (first, second) = stack
    second.send_signal(signal.SIGSTOP)
    try:
        # Calls that were waiting on the stopped replica move on when it is ejected; new
        # ones go to the other replica.
        statuses = [ask(base, shade).status_code for shade in range(8)]
        assert statuses == [200] * 8, statuses
        assert ready(base) == 200  # one replica up is enough
    finally:
        second.send_signal(signal.SIGCONT)


def test_all_encoders_hung_is_a_bounded_503_or_504_and_recovers(stack):
    base, encoders = stack
    for proc in encoders:
        proc.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        reply = ask(base, 100)
        elapsed = time.monotonic() - started
        assert reply.status_code in (503, 504), reply.text
        assert reply.json()["error"]["type"] == "server_error"
        assert elapsed < BUDGET_S + 3
        wait_until(lambda: ready(base) == 503, 10, interval_s=0.3)
        assert httpx.get(base + "/ready", timeout=3).json()["reason"] == "encoder"
    finally:
        for proc in encoders:
            proc.send_signal(signal.SIGCONT)
    wait_until(lambda: ready(base) == 200, 30, interval_s=0.3)
    assert ask(base, 101).status_code == 200
