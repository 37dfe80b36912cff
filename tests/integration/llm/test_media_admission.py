"""Admission before work (issue 13, gap 3): the LLM service plans a request's media with the
encoder (rows from image headers, nothing decoded) and refuses what cannot fit its context
before any Encode call; the encoder bounds decoded pixels in flight."""

from __future__ import annotations

import base64
import io

import pytest
import torch
from PIL import Image

from encoder_service.config import EncoderConfig
from encoder_service.server import EncoderServer
from encoder_service.towers.demo import DemoTower
from llm_service.encoder_client import EncoderClient
from llm_service.errors import InvalidRequest, Overloaded
from llm_service.generator import GenerateInput, Generator
from llm_service.prompt.families import load_family
from llm_service.prompt.messages import MediaItem, MediaRef, Message, Modality, TextPart
from test_llm_server import ScriptedEngine


def png_url(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 90, 160)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def ask(*images: str) -> GenerateInput:
    parts = (*(MediaItem(MediaRef(url=u), Modality.IMAGE) for u in images),
             TextPart("What is in these pictures?"))
    return GenerateInput("adm", messages=[Message("user", parts)])


@pytest.fixture
async def stack(smollm2_tokenizer):
    server = EncoderServer(EncoderConfig(host="127.0.0.1", port=0, shm_dir=""),
                           tower=DemoTower(hidden_size=576, dtype=torch.float32, seed=0))
    await server.start()
    client = EncoderClient(f"127.0.0.1:{server.port}")
    engine = ScriptedEngine(smollm2_tokenizer)
    generator = Generator(engine, smollm2_tokenizer, load_family("smollm2", smollm2_tokenizer),
                          client)
    yield server, engine, generator
    await client.close()
    await server.stop(grace=0)


async def test_media_that_cannot_fit_the_context_is_refused_before_encoding(stack):
    server, engine, generator = stack
    big = png_url(4000, 3000)  # 12 tiles + thumbnail: 3,328 rows each
    with pytest.raises(InvalidRequest) as info:
        async for _ in generator.generate(ask(*[big] * 3)):
            pass
    message = str(info.value)
    assert "9984 embedding rows (3328, 3328, 3328 per item)" in message
    assert "8192-token context" in message
    # Nothing was decoded, preprocessed or run through the tower.
    assert server.encoder.stats().tower_calls == 0 and len(server.encoder.store) == 0
    assert engine.requests == []


async def test_media_that_fits_is_planned_then_encoded(stack):
    server, engine, generator = stack
    async for _ in generator.generate(ask(png_url(448, 448), png_url(900, 448))):
        pass
    (request,) = engine.requests
    assert [s.embeddings.shape[0] for s in request.spans] == [256, 768]


async def test_the_decoded_pixel_budget_turns_excess_into_overloaded(stack):
    server, _, generator = stack
    budget = server.encoder.pixels
    budget.capacity_bytes = 10 * 1024 * 1024
    async with budget.hold(9 * 1024 * 1024):  # another request's image, decoding
        with pytest.raises(Overloaded, match="retry shortly"):
            async for _ in generator.generate(ask(png_url(448, 448))):
                pass
    assert budget.used_bytes == 0
    async for _ in generator.generate(ask(png_url(448, 448))):
        pass  # free again: it goes through
