"""LLaVA-1.6 anyres preprocessing (original LLaVA semantics) and the CLIP tower vs transformers."""

from __future__ import annotations

import asyncio
import io
import threading

import pytest
import torch
from PIL import Image
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.families import build_preprocessor
from encoder_service.families.llava import (
    CLIP_MEAN,
    CLIP_STD,
    LlavaPreprocessor,
    resize_and_pad,
    select_best_resolution,
)
from encoder_service.towers import build_tower, checkpoint_hidden_size
from encoder_service.towers.clip import LlavaTower
from mmserve.wire.media import MediaItem, MediaRef
from polling import eventually

PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


@pytest.mark.parametrize(("width", "height", "canvas", "tokens"), [
    (1000, 600, (672, 672), 1948),
    (600, 1000, (672, 672), 1968),
    (800, 600, (672, 672), 2340),
    (640, 480, (672, 672), 2340),
    (1000, 1000, (672, 672), 2928),
    # Exact ties: the first pinpoint, read as (width, height), wins.
    (336, 336, (336, 672), 1176),
    (300, 200, (336, 672), 976),
    (200, 300, (336, 672), 1476),
    (320, 240, (336, 672), 1026),
])
def test_worked_examples(width, height, canvas, tokens):
    preprocessor = LlavaPreprocessor()
    assert select_best_resolution(width, height, PINPOINTS) == canvas
    assert preprocessor.num_tokens(width, height) == tokens
    rows, cols = canvas[1] // 336, canvas[0] // 336
    assert preprocessor.num_tiles(width, height) == 1 + rows * cols


@pytest.mark.parametrize(("width", "height", "ours", "hf"), [
    (300, 200, (336, 672), (672, 336)),
    (200, 300, (336, 672), (672, 336)),
    (1000, 600, (672, 672), (672, 672)),
])
def test_tie_divergence_from_transformers(width, height, ours, hf):
    """transformers returns (height, width) and reads pinpoints as (height, width)."""
    assert select_best_resolution(width, height, PINPOINTS) == ours
    hf_h, hf_w = hf_select_best_resolution((height, width), [list(p) for p in PINPOINTS])
    assert (hf_w, hf_h) == hf


def test_preprocess_layout():
    image = Image.new("RGB", (1000, 600), (255, 255, 255))
    inputs = LlavaPreprocessor().preprocess(image)
    assert inputs.pixel_values.shape == (5, 3, 336, 336)
    assert inputs.grid == (2, 2) and inputs.num_tiles == 5
    white = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    black = [-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]
    # Base image: squashed, all white. Top-left crop: black band on top (403 of 672 rows used).
    assert torch.allclose(inputs.pixel_values[0, :, 0, 0], torch.tensor(white), atol=1e-5)
    assert torch.allclose(inputs.pixel_values[1, :, 0, 0], torch.tensor(black), atol=1e-5)
    assert torch.allclose(inputs.pixel_values[1, :, 200, 0], torch.tensor(white), atol=1e-5)


def test_resize_and_pad_centres_on_black():
    padded = resize_and_pad(Image.new("RGB", (100, 50), (255, 0, 0)), (200, 200))
    assert padded.size == (200, 200)
    assert padded.getpixel((100, 49)) == (0, 0, 0) and padded.getpixel((100, 50)) == (255, 0, 0)
    assert padded.getpixel((100, 149)) == (255, 0, 0) and padded.getpixel((100, 150)) == (0, 0, 0)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A random llava-hf checkpoint: 28-px crops of 2x2 patches, pinpoints scaled down 12x."""
    torch.manual_seed(0)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                       num_attention_heads=4, image_size=28, patch_size=14,
                                       projection_dim=16),
        text_config=LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=4, num_key_value_heads=4, vocab_size=128),
        image_grid_pinpoints=[[w // 12, h // 12] for w, h in PINPOINTS], image_token_index=127,
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.image_newline.normal_()
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    return model, path


def striped(width: int, height: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (20, 120, 220))
    for x in range(0, width, 7):
        image.paste(((x * 9) % 256, 60, 30), (x, 0, x + 3, height))
    return image


def preprocessor_for(path):
    config = EncoderConfig(port=0, family="llava-1.6", tower="torch", checkpoint=str(path))
    assert checkpoint_hidden_size(config.family, str(path)) == 48
    return build_preprocessor(config)


@pytest.mark.parametrize(("width", "height", "tokens"), [
    (100, 60, 4 + 4 * 2 + 2), (60, 100, 4 + 2 * 4 + 4), (90, 90, 4 + 4 * 4 + 4)])
def test_tower_matches_transformers(tiny_llava, width, height, tokens):
    """Where one canvas is strictly best, both readings of the pinpoints agree."""
    model, path = tiny_llava
    tower = LlavaTower(path, torch.float32)
    preprocessor = preprocessor_for(path)
    inputs = preprocessor.preprocess(striped(width, height))
    assert inputs.num_tokens == tokens and inputs.pixel_values.shape == (5, 3, 28, 28)
    rows = tower.encode_item(inputs)
    assert rows.shape == (tokens, 48)
    with torch.no_grad():
        expected = model.model.get_image_features(
            pixel_values=inputs.pixel_values[None], image_sizes=torch.tensor([[height, width]]),
            vision_feature_layer=-2, vision_feature_select_strategy="default")
    # transformers 5 returns an output object, 4.57 the list of per-image features
    expected = getattr(expected, "pooler_output", expected)[0]
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)


def test_original_layout_loads_the_same_weights(tiny_llava, tmp_path):
    """The liuhaotian key layout (model.mm_projector.0/2 ...) gives the same tower."""
    from safetensors.torch import save_file

    model, path = tiny_llava
    inner = model.model
    # CLIPVisionModel's own names start with `vision_model.` in transformers 4.57, not in 5
    state = {f"model.vision_tower.vision_tower.vision_model.{k.removeprefix('vision_model.')}": v
             for k, v in inner.vision_tower.state_dict().items()}
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        for param in ("weight", "bias"):
            state[f"model.mm_projector.{ours}.{param}"] = getattr(
                inner.multi_modal_projector, theirs).state_dict()[param]
    state["model.image_newline"] = inner.image_newline.detach()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    inputs = preprocessor_for(path).preprocess(striped(100, 60))
    torch.testing.assert_close(LlavaTower(tmp_path, torch.float32).encode_item(inputs),
                               LlavaTower(path, torch.float32).encode_item(inputs))


async def test_the_encoder_returns_the_variable_row_count_and_reuses_it(tiny_llava):
    _, path = tiny_llava
    config = EncoderConfig(port=0, family="llava-1.6", tower="torch", checkpoint=str(path))
    encoder = Encoder(config, build_tower(config))
    encoder.start()
    try:
        buffer = io.BytesIO()
        striped(100, 60).save(buffer, format="PNG")
        item = MediaItem(MediaRef(data=buffer.getvalue()))
        first, second = [r async for rs in encoder.encode_all([item, item]) for r in rs]
        (third,) = [r async for rs in encoder.encode_all([item]) for r in rs]
    finally:
        await encoder.stop()
    assert (first.num_tiles, first.num_tokens, first.embeddings.shape[1]) == (5, 14, 48)
    assert torch.equal(first.embeddings, second.embeddings) and third.cached


async def test_crops_of_concurrent_images_share_one_tower_call(tiny_llava):
    _, path = tiny_llava
    config = EncoderConfig(port=0, family="llava-1.6", tower="torch", checkpoint=str(path))
    tower = build_tower(config)
    encode, entered, release, batches = tower.encode, threading.Event(), threading.Event(), []

    def held_encode(pixel_values):  # the first call holds the tower until released
        entered.set()
        release.wait(timeout=10)
        batches.append(pixel_values.shape[0])
        return encode(pixel_values)

    tower.encode = held_encode
    encoder = Encoder(config, tower)
    sizes = [(90, 90), (100, 60), (60, 100)]
    items = []
    for width, height in sizes:
        buffer = io.BytesIO()
        striped(width, height).save(buffer, format="PNG")
        items.append(MediaItem(MediaRef(data=buffer.getvalue())))
    encoder.start()
    try:
        busy = asyncio.create_task(encoder.encode(items[0]))
        await asyncio.to_thread(entered.wait, 10)
        rest = asyncio.gather(*(encoder.encode(item) for item in items[1:]))
        await eventually(lambda: encoder.batcher._queue.qsize() == 2)  # behind the held call
        release.set()
        results = [item for items in [await busy, *await rest] for item in items]
    finally:
        await encoder.stop()
    assert batches == [5, 10]  # the two queued images' crops went in one call
    preprocessor = preprocessor_for(path)
    for (width, height), result in zip(sizes, results):
        alone = tower.encode_item(preprocessor.preprocess(striped(width, height)))
        assert result.num_tokens == alone.shape[0] == preprocessor.num_tokens(width, height)
        torch.testing.assert_close(result.embeddings, alone, rtol=1e-5, atol=1e-5)
