"""Planning from headers (issue 13, gaps 3 and 10): rows per image match what preprocessing
makes, budgets refuse before decoding, big items give memory back, EXIF turns images."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image, ImageFile

from encoder_service.config import FAMILIES, EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.errors import InvalidMedia, InvalidRequest
from encoder_service.families import build_preprocessor
from encoder_service.media import decode_image
from encoder_service.pixel_budget import PixelBudget
from encoder_service.towers.demo import DemoTower
from mmserve.wire.media import MediaItem, MediaRef, Modality


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("size", [(448, 448), (1000, 300), (300, 1500), (2000, 1100)])
def test_rows_from_the_header_are_what_preprocessing_makes(family, size):
    preprocessor = build_preprocessor(EncoderConfig(family=family))
    image = Image.new("RGB", size, (1, 2, 3))
    prepared = preprocessor.preprocess(image, 6)
    assert preprocessor.image_rows(*size, 6) == (prepared.num_tiles, prepared.num_tokens)


@pytest.fixture
def encoder() -> Encoder:
    config = EncoderConfig(max_request_pixels=5_000_000, max_request_rows=2000)
    return Encoder(config, DemoTower(hidden_size=576, dtype=torch.float32, seed=0))


def image(data: bytes, max_tiles: int = 0) -> MediaItem:
    return MediaItem(MediaRef(data=data), Modality.IMAGE, max_tiles=max_tiles)


async def test_a_plan_reads_headers_only(encoder, monkeypatch):
    def no_decoding(data):
        raise AssertionError("planning decoded an image")

    monkeypatch.setattr(encoder.resolver, "decode", no_decoding)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)  # EXIF lookups included
    plans = await encoder.plan_all([image(png(900, 448)), image(png(448, 448)),
                                    MediaItem(MediaRef(data=b"x"), Modality.VIDEO,
                                              num_frames=3)])
    assert [(p.num_tokens, p.num_tiles, p.pixels) for p in plans] == [
        (768, 3, 900 * 448), (256, 1, 448 * 448), (768, 3, 0)]


async def test_request_budgets_are_refused_from_headers(encoder):
    with pytest.raises(InvalidRequest, match="6000000 pixels in all; the limit is 5000000"):
        await encoder.plan_all([image(png(2000, 1500)), image(png(2000, 1500))])
    with pytest.raises(InvalidRequest, match="4096 embedding rows; the limit is 2000"):
        await encoder.plan_all([image(png(1344, 896))] * 1 + [image(png(900, 448))] * 3)
    with pytest.raises(InvalidMedia, match="not a supported image"):
        await encoder.plan_all([image(b"GIF89a-not-really")])


async def test_the_pixel_budget_is_released_and_big_items_trim_memory():
    budget = PixelBudget(100, trim_after_bytes=50)
    async with budget.hold(60):
        assert budget.used_bytes == 60
    assert budget.used_bytes == 0
    assert budget.trims == (1 if budget._trim is not None else 0)
    with pytest.raises(InvalidMedia, match="more than this encoder's 100-byte budget"):
        async with budget.hold(101):
            pass


def exif_jpeg(orientation: int) -> bytes:
    """A 40x20 JPEG, left half red, stored with an EXIF orientation tag."""
    picture = Image.new("RGB", (40, 20), (0, 0, 255))
    picture.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", exif=exif, quality=95)
    return buffer.getvalue()


def test_exif_orientation_is_applied_and_planned():
    upright = decode_image(exif_jpeg(6), 10**6)  # 6: rotate 90 degrees clockwise to view
    assert upright.size == (20, 40)
    red, _, blue = upright.getpixel((10, 5))
    assert red > 200 and blue < 60  # the red half is now on top
    assert decode_image(exif_jpeg(1), 10**6).size == (40, 20)


async def test_the_plan_uses_the_oriented_size(encoder):
    (plan,) = await encoder.plan_all([image(exif_jpeg(6))])
    assert plan.pixels == 800 and plan.num_tokens == 768  # a 1x2 grid and the thumbnail
    assert encoder.resolver.image_size(exif_jpeg(6)) == (20, 40)
