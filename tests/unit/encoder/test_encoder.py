"""The encoding pipeline with a fake tower: limits, ordering, the content store."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from encoder_service.encoder import Encoder
from encoder_service.errors import InvalidMedia, InvalidRequest
from encoder_service.towers.base import Tower
from mmserve.wire.media import MediaItem, MediaRef, Modality, handle_for, source_hash

from .images import png_bytes


class FakeTower(Tower):
    """Every row of a tile holds the tile's mean pixel value; counts tiles seen."""

    tokens_per_tile = 256

    def __init__(self, hidden_size: int = 8) -> None:
        self.hidden_size = hidden_size
        self.dtype = torch.float32
        self.tiles_seen = 0

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        self.tiles_seen += pixel_values.shape[0]
        means = pixel_values.mean(dim=(1, 2, 3))
        return means.view(-1, 1, 1).expand(-1, 256, self.hidden_size).clone()


@pytest.fixture
async def encoder(config):
    encoder = Encoder(dataclasses.replace(config, hidden_size=8), FakeTower())
    encoder.start()
    yield encoder
    await encoder.stop()


def image_item(width=64, height=48, color=(200, 30, 90), max_tiles=0) -> MediaItem:
    return MediaItem(ref=MediaRef(data=png_bytes(width, height, color)), max_tiles=max_tiles)


async def collect(encoder: Encoder, items):
    return [result async for results in encoder.encode_all(items) for result in results]


async def test_rows_and_tiles_follow_the_tiling(encoder):
    (result,) = await collect(encoder, [image_item(1000, 600)])
    assert (result.num_tiles, result.num_tokens) == (7, 1792)
    assert result.embeddings.shape == (1792, 8) and not result.cached


async def test_per_item_max_tiles(encoder):
    (result,) = await collect(encoder, [image_item(1000, 600, max_tiles=2)])
    assert result.num_tiles == 3  # (2, 1) grid + thumbnail
    with pytest.raises(InvalidRequest, match="max_tiles 13 exceeds this encoder's limit of 12"):
        await collect(encoder, [image_item(max_tiles=13)])


async def test_results_come_in_request_order(encoder):
    items = [image_item(color=(c, c, c)) for c in (250, 10, 120)]
    results = await collect(encoder, items)
    means = [float(r.embeddings[0, 0]) for r in results]
    assert means[0] > means[2] > means[1]
    assert len({r.content_hash for r in results}) == 3


async def test_repeated_content_skips_the_tower_and_handles_work(encoder):
    (first,) = await collect(encoder, [image_item(1000, 600)])
    seen = encoder.tower.tiles_seen
    (again,) = await collect(encoder, [image_item(1000, 600)])
    # The handle names the uploaded file (what the LLM service can hash without decoding);
    # the content hash names the decoded pixels and their preprocessing.
    assert first.handle == handle_for(source_hash(Modality.IMAGE, image_item(1000, 600).ref.data))
    handle = MediaItem(ref=MediaRef(url=first.handle))
    (by_handle,) = await collect(encoder, [handle])
    assert again.cached and by_handle.cached and by_handle.handle == first.handle
    assert again.content_hash == by_handle.content_hash == first.content_hash
    assert torch.equal(again.embeddings, first.embeddings)
    assert encoder.tower.tiles_seen == seen
    # The same handle with other preprocessing is new content, computed from the stored image.
    (fewer,) = await collect(encoder, [dataclasses.replace(handle, max_tiles=2)])
    assert not fewer.cached and fewer.content_hash != first.content_hash
    assert fewer.num_tiles == 3


async def test_request_limits(encoder):
    with pytest.raises(InvalidRequest, match="no media items"):
        await collect(encoder, [])
    with pytest.raises(InvalidRequest, match="17 media items; the limit is 16"):
        await collect(encoder, [image_item()] * 17)
    with pytest.raises(InvalidRequest, match="encodes image only, got a audio item"):
        await collect(encoder, [MediaItem(ref=MediaRef(data=b"RIFF"), modality=Modality.AUDIO)])


async def test_a_failing_item_fails_the_call_and_cancels_the_rest(encoder):
    items = [image_item(), MediaItem(ref=MediaRef(data=b"junk")), image_item(2000, 2000)]
    results = []
    with pytest.raises(InvalidMedia, match="not a supported image"):
        async for encoded in encoder.encode_all(items):
            results.extend(encoded)
    assert len(results) == 1
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()
                and "Encoder.encode" in repr(t.get_coro())]


def test_tower_and_config_must_agree(config):
    with pytest.raises(ValueError, match="tower output width 8 != configured hidden_size 576"):
        Encoder(config, FakeTower(hidden_size=8))
