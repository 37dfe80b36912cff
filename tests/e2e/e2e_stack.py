"""Helpers for e2e tests: the real stack as a process, test media, artifacts."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from PIL import Image

from protos import llm_pb2, llm_pb2_grpc
from polling import wait_until

MODEL = "smollm2-135m-instruct"
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    base: str  # the gateway's URL
    llm_port: int
    encoder_port: int
    proc: subprocess.Popen
    log: Path

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def engine_stats(self) -> llm_pb2.EngineStats:
        """The LLM engine's live stats, straight from the LLM service."""
        with grpc.insecure_channel(f"127.0.0.1:{self.llm_port}") as channel:
            info = llm_pb2_grpc.LLMStub(channel).GetModelInfo(llm_pb2.ModelInfoRequest(),
                                                              timeout=10)
        return info.stats

    def alive(self) -> bool:
        return self.proc.poll() is None


def wait_for_line(proc: subprocess.Popen, log: Path, line: str, what: str,
                  timeout_s: float = START_TIMEOUT_S) -> None:
    def printed() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited during start-up:\n{log.read_text()[-4000:]}")
        return line in log.read_text(errors="replace")

    try:
        wait_until(printed, timeout_s, interval_s=0.3)
    except AssertionError:
        stop(proc)  # Ctrl-C first, so the supervisor stops its services
        pytest.fail(f"{what} did not start in {timeout_s:.0f} s:\n{log.read_text()[-4000:]}")


def start_stack(log: Path, *args: str, env: dict[str, str] | None = None) -> Stack:
    """`python -m mmserve.run` on free ports; returns once it printed that it is up."""
    gateway, llm, encoder = free_port(), free_port(), free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mmserve.run", "--port", str(gateway),
             "--llm-port", str(llm), "--encoder-port", str(encoder), *args],
            stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    wait_for_line(proc, log, "mmserve is up", "the stack")
    return Stack(f"http://127.0.0.1:{gateway}", llm, encoder, proc, log)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def png_bytes(width: int, height: int) -> bytes:
    image = Image.new("RGB", (width, height), (30, 90, 160))
    for x in range(0, width, 50):  # some structure, so the content hash is not trivial
        image.paste((x % 256, 80, 40), (x, 0, min(x + 25, width), height))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def artifact_dir(tmp_path: Path) -> Path:
    """Where screenshots go: $MMSERVE_TEST_ARTIFACTS when set (CI uploads it), else tmp."""
    directory = Path(os.environ.get("MMSERVE_TEST_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory
