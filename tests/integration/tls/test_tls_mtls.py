"""mTLS on both gRPC links (gateway → LLM → encoder) and HTTPS on the gateway, with real
certificates made for the test: the real servers and clients, a scripted LLM engine."""

from __future__ import annotations

import asyncio
import base64
import io
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
import uvicorn
from PIL import Image
from tls_certs import Certs, make_certs

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower
from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.llm_client import LLMClient
from llm_service.config import LLMConfig
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
from mmserve.rpc.tls import channel_credentials, server_credentials
from protos import common_pb2, encoder_pb2, encoder_pb2_grpc, llm_pb2
from polling import eventually

HIDDEN = 576


class EchoEngine(EngineClient):
    """Answers "Paris" token by token; remembers the embedding spans it was given."""

    hidden_size, vocab_size, max_model_len = HIDDEN, 49152, 8192

    def __init__(self, tokenizer) -> None:
        self.answer = tokenizer.encode(" Paris", add_special_tokens=False)
        self.requests: list[EngineRequest] = []

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.requests.append(request)
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


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
async def encoder(certs) -> AsyncIterator[EncoderServer]:
    config = EncoderConfig(host="127.0.0.1", port=0, tls_cert=str(certs.server.cert),
                           tls_key=str(certs.server.key), tls_ca=str(certs.ca))
    server = EncoderServer(config, tower=DemoTower(hidden_size=HIDDEN, dtype=torch.float32, seed=0))
    await server.start()
    yield server
    await server.stop(grace=0)


@pytest.fixture
async def llm(certs, encoder, smollm2_tokenizer) -> AsyncIterator[tuple[str, EchoEngine]]:
    config = LLMConfig(tls_cert=certs.server.cert, tls_key=certs.server.key, tls_ca=certs.ca,
                       encoder_address=f"localhost:{encoder.port}",
                       encoder_tls_ca=certs.ca, encoder_tls_cert=certs.client.cert,
                       encoder_tls_key=certs.client.key)
    engine = EchoEngine(smollm2_tokenizer)
    encoder_client = EncoderClient(config.encoder_address,
                                   channel_credentials(config.encoder_tls))
    generator = Generator(engine, smollm2_tokenizer, load_family("smollm2", smollm2_tokenizer),
                          encoder_client)
    servicer = LLMServicer(generator, engine, dict(model_id="m", family="smollm2"))
    server = build_server(servicer)
    port = await server.start("127.0.0.1", 0, server_credentials(config.server_tls))
    yield f"localhost:{port}", engine
    await server.stop(0)
    await encoder_client.close()


def gateway_config(address: str, certs: Certs, **overrides) -> GatewayConfig:
    tls = dict(llm_tls_ca=str(certs.ca), llm_tls_cert=str(certs.client.cert),
               llm_tls_key=str(certs.client.key))
    return GatewayConfig(llm_address=address, **{**tls, **overrides})


def image_request() -> llm_pb2.GenerateRequest:
    content = [llm_pb2.ContentPart(image=common_pb2.MediaRef(url=png_data_url())),
               llm_pb2.ContentPart(text="What is this?")]
    return llm_pb2.GenerateRequest(
        request_id="tls-1", messages=llm_pb2.Messages(messages=[
            llm_pb2.ChatMessage(role="user", content=content)]),
        sampling=llm_pb2.SamplingParams(max_tokens=4))


async def test_generate_with_an_image_over_mtls_on_both_links(llm, certs) -> None:
    address, engine = llm
    client = LLMClient.from_config(gateway_config(address, certs))
    try:
        replies = [reply async for reply in client.generate(image_request())]
    finally:
        await client.close()
    assert "".join(reply.text for reply in replies) == " Paris"
    # The image went LLM → encoder over mTLS and came back as 256 rows per tile.
    (span,) = engine.requests[0].spans
    assert span.embeddings.shape == (256, HIDDEN)


@pytest.mark.parametrize("client_cert", [None, "stranger"])
async def test_llm_service_refuses_clients_without_a_trusted_cert(llm, certs, client_cert) -> None:
    address, engine = llm
    overrides = {"llm_tls_cert": None, "llm_tls_key": None}
    if client_cert == "stranger":
        overrides = {"llm_tls_cert": str(certs.stranger.cert),
                     "llm_tls_key": str(certs.stranger.key)}
    client = LLMClient.from_config(gateway_config(address, certs, **overrides))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.model_info()
    finally:
        await client.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert engine.requests == []


async def test_plaintext_client_is_refused_by_both_servers(llm, encoder) -> None:
    address, _ = llm
    for target in (address, f"localhost:{encoder.port}"):
        async with grpc.aio.insecure_channel(target) as channel:
            stub = encoder_pb2_grpc.EncoderStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModelInfo(encoder_pb2.EncoderInfoRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_encoder_refuses_a_client_without_a_cert(encoder, certs) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes())
    async with grpc.aio.secure_channel(f"localhost:{encoder.port}", credentials) as channel:
        stub = encoder_pb2_grpc.EncoderStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetModelInfo(encoder_pb2.EncoderInfoRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_gateway_serves_https_and_reaches_the_llm_over_mtls(llm, certs) -> None:
    address, _ = llm
    config = gateway_config(address, certs, host="127.0.0.1", port=0,
                            ssl_certfile=str(certs.server.cert), ssl_keyfile=str(certs.server.key))
    server = uvicorn.Server(uvicorn.Config(
        create_app(config), host="127.0.0.1", port=0, log_level="warning",
        ssl_certfile=config.ssl_certfile, ssl_keyfile=config.ssl_keyfile))
    task = asyncio.create_task(server.serve())
    try:
        await eventually(lambda: server.started or task.done())
        assert not task.done(), task.result()
        port = server.servers[0].sockets[0].getsockname()[1]
        trusted = ssl.create_default_context(cafile=str(certs.ca))
        async with httpx.AsyncClient(verify=trusted, timeout=30) as client:
            models = await client.get(f"https://localhost:{port}/v1/models")
            reply = await client.post(f"https://localhost:{port}/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 4})
        async with httpx.AsyncClient(timeout=5) as untrusting:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await untrusting.get(f"https://localhost:{port}/health")
        async with httpx.AsyncClient(timeout=5) as plain:
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://localhost:{port}/health")
    finally:
        server.should_exit = True
        await task
    assert models.json()["data"][0]["id"] == "m"
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == " Paris"


def test_missing_certificate_files_fail_at_start(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(FileNotFoundError):
        server_credentials(LLMConfig(tls_cert=missing, tls_key=missing).server_tls)
    with pytest.raises(FileNotFoundError):
        channel_credentials(GatewayConfig(llm_tls_ca=str(missing)).llm_tls)
