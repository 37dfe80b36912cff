"""One request, one trace: gateway -> LLM -> encoder, each service with its own tracer and
the SDK's in-memory exporter, over real gRPC and HTTP (in-process, port 0); and with
tracing off, no span and no OpenTelemetry import."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
import torch
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.llm_client import LLMClient
from llm_service.encoder_client import EncoderClient
from llm_service.engine.protocol import (
    EngineClient,
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
)
from llm_service.generator import Generator
from llm_service.prompt.families import load_family
from llm_service.server import LLMServicer, build_server
from mmserve.tracing import Tracing, client_interceptors

HIDDEN = 576


class EchoEngine(EngineClient):
    hidden_size, vocab_size, max_model_len = HIDDEN, 49152, 8192

    def __init__(self, tokenizer) -> None:
        self.answer = tokenizer.encode(" Paris", add_special_tokens=False)

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        for i, token in enumerate(self.answer):
            finish = FinishReason.STOP if i == len(self.answer) - 1 else None
            yield EngineOutput(request.request_id, 0, [token], finish,
                               len(request.prompt_token_ids), i + 1)

    async def finish(self, request_id: str, index: int) -> None: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats:
        return EngineStats()

    @property
    def healthy(self) -> bool:
        return True


def png_data_url() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (448, 448), (200, 30, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def exporters() -> dict[str, InMemorySpanExporter]:
    return {name: InMemorySpanExporter() for name in ("gateway", "llm", "encoder")}


@pytest.fixture
async def stack(exporters, smollm2_tokenizer) -> AsyncIterator[str]:
    tracing = {name: Tracing.configure(f"mmserve-{name}", None, exporter)
               for name, exporter in exporters.items()}
    encoder = EncoderServer(EncoderConfig(host="127.0.0.1", port=0, shm_dir=""),
                            tower=DemoTower(hidden_size=HIDDEN, dtype=torch.float32, seed=0),
                            tracing=tracing["encoder"])
    await encoder.start()
    engine = EchoEngine(smollm2_tokenizer)
    encoder_client = EncoderClient(f"127.0.0.1:{encoder.port}",
                                   interceptors=client_interceptors(True))
    generator = Generator(engine, smollm2_tokenizer, load_family("smollm2", smollm2_tokenizer),
                          encoder_client)
    llm = build_server(LLMServicer(generator, engine, dict(model_id="m", family="smollm2")),
                       tracing=tracing["llm"])
    port = await llm.start("127.0.0.1", 0)
    config = GatewayConfig(llm_address=f"127.0.0.1:{port}")
    app = create_app(config, lambda c: LLMClient(c.llm_address, 60, traced=True),
                     tracing=tracing["gateway"])
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client
    await llm.stop(0)
    await encoder_client.close()
    await encoder.stop(grace=0)


async def test_one_request_is_one_trace_across_three_services(stack, exporters):
    reply = await stack.post("/v1/chat/completions", json={"max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}},
                                     {"type": "text", "text": "What is this?"}]}]})
    assert reply.status_code == 200, reply.text
    spans = {name: exporter.get_finished_spans() for name, exporter in exporters.items()}
    names = {service: {s.name for s in got} for service, got in spans.items()}
    assert "gateway POST /v1/chat/completions" in names["gateway"]
    assert {"LLM Generate", "encode", "prefill", "decode"} <= names["llm"]
    assert {"Encoder Encode", "decode", "preprocess", "tower", "transfer"} <= names["encoder"]
    every = [s for got in spans.values() for s in got]
    assert len({s.context.trace_id for s in every}) == 1  # one trace
    by_id = {s.context.span_id: s for s in every}
    roots = [s for s in every if s.parent is None]
    assert [s.name for s in roots] == ["gateway POST /v1/chat/completions"]
    # The encoder's server span hangs under the LLM's encode span, that under Generate.
    (encode_call,) = [s for s in spans["encoder"] if s.name == "Encoder Encode"]
    encode = by_id[encode_call.parent.span_id]
    assert encode.name == "encode"
    assert by_id[encode.parent.span_id].name == "LLM Generate"
    services = {s.resource.attributes["service.name"] for s in every}
    assert services == {"mmserve-gateway", "mmserve-llm", "mmserve-encoder"}


def _otel_modules(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", "import sys\n" + code + "\nprint(' '.join("
                          "sorted(m for m in sys.modules if m.startswith('opentelemetry'))))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_tracing_off_imports_no_opentelemetry():
    """Off, the LLM service and the encoder import no OpenTelemetry at all; the gateway
    none of the SDK (FastAPI itself imports the API package when it is installed)."""
    services = ("import llm_service.app, llm_service.server, encoder_service.server\n"
                "from mmserve.tracing import Tracing, span\n"
                "assert not Tracing.configure('x', None).enabled\n"
                "with span('fetch'):\n"
                "    pass\n")
    assert _otel_modules(services) == []
    gateway = ("from gateway.app import create_app\n"
               "from gateway.config import GatewayConfig\n"
               "create_app(GatewayConfig())\n")
    loaded = _otel_modules(gateway)
    assert not [m for m in loaded if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))]
