"""Video frame sampling: the reference index rule, and decoding when PyAV is installed."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder, MediaItem
from encoder_service.errors import InvalidMedia, InvalidRequest
from encoder_service.families import build_preprocessor
from encoder_service.media import MediaRef
from encoder_service.towers.demo import DemoTower
from encoder_service.video import frames_to_pixel_values, get_index, sample_frames


@pytest.mark.parametrize("frames,segments,expected", [
    (300, 8, [18, 55, 93, 130, 168, 205, 242, 280]),  # model-formats.md §1.7
    (100, 8, [6, 18, 31, 43, 56, 68, 80, 93]),
    # np.round rounds halves to even: round(3.5) = 4 and round(14.5) = 14.
    (8, 8, [0, 1, 2, 3, 4, 4, 5, 6]),
    (30, 4, [3, 10, 17, 25]),
    (1, 4, [0, 0, 0, 0]),
    (30, 1, [14]),
])
def test_get_index_matches_the_reference_rule(frames, segments, expected):
    assert get_index(frames - 1, segments) == expected


def test_get_index_with_a_time_bound():
    # 10 fps, seconds 2..6 -> frames 20..60, 4 segments of 10: middles 25, 35, 45, 55.
    assert get_index(299, 4, fps=10, bound=(2, 6)) == [25, 35, 45, 55]
    with pytest.raises(ValueError, match="fps"):
        get_index(299, 4, bound=(2, 6))


def make_video(num_frames: int, size: int = 32) -> bytes:
    """An MPEG-4 video whose frame k is uniformly grey level 8*k (lossless enough to read back)."""
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for k in range(num_frames):
            array = np.full((size, size, 3), 8 * k, dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def test_sampled_frames_are_the_indexed_ones():
    data = make_video(30)
    frames = sample_frames(data, 4)
    expected = get_index(29, 4)
    levels = [int(np.asarray(frame).mean().round()) for frame in frames]
    assert all(abs(level - 8 * k) <= 3 for level, k in zip(levels, expected)), levels
    assert all(frame.mode == "RGB" and frame.size == (32, 32) for frame in frames)


def test_frames_become_one_tile_of_256_rows_each():
    frames = sample_frames(make_video(12), 3)
    prepared = frames_to_pixel_values(frames, build_preprocessor(EncoderConfig()))
    assert prepared.pixel_values.shape == (3, 3, 448, 448)
    assert (prepared.num_tiles, prepared.num_tokens) == (3, 768)


def test_bytes_that_are_not_a_video_are_refused():
    pytest.importorskip("av")
    with pytest.raises(InvalidMedia, match="not a decodable video"):
        sample_frames(b"definitely not a video", 4)


def expected_rows(encoder: Encoder, data: bytes, frames: int) -> torch.Tensor:
    """The tower run directly on the video's sampled frames."""
    pixels = frames_to_pixel_values(sample_frames(data, frames), encoder.preprocessor)
    return encoder.tower.encode(pixels.pixel_values).reshape(-1, encoder.config.hidden_size)


async def test_the_encoder_returns_one_item_with_a_tile_per_frame(encoder):
    data = make_video(20)
    item = MediaItem(MediaRef(data=data, mime_type="video/mp4"), "video", num_frames=3)
    (result,) = [r async for r in encoder.encode_all([item])]
    with pytest.raises(InvalidRequest, match="num_frames 65 exceeds the limit of 64"):
        await encoder.encode(MediaItem(MediaRef(data=data), "video", num_frames=65))
    assert (result.num_tiles, result.num_tokens) == (3, 768)
    torch.testing.assert_close(result.embeddings, expected_rows(encoder, data, 3))


async def test_a_video_handle_is_sampled_again_from_the_stored_file(encoder):
    data = make_video(20)
    first = await encoder.encode(MediaItem(MediaRef(data=data), "video", num_frames=3))
    handle = MediaRef(url=f"mm://sha256:{first.content_hash}")
    same = await encoder.encode(MediaItem(handle, "video", num_frames=3))
    more = await encoder.encode(MediaItem(handle, "video", num_frames=4))
    assert (first.cached, same.cached, more.cached) == (False, True, False)
    assert same.content_hash == first.content_hash != more.content_hash
    torch.testing.assert_close(same.embeddings, first.embeddings, rtol=0, atol=0)
    assert more.num_tiles == 4
    torch.testing.assert_close(more.embeddings, expected_rows(encoder, data, 4))


async def test_families_without_video_refuse_it(config):
    qwen = EncoderConfig(family="qwen-vl-chat", port=0)
    encoder = Encoder(qwen, DemoTower(hidden_size=qwen.hidden_size, dtype=torch.float32, seed=0))
    with pytest.raises(InvalidRequest, match="encodes image only, got a video item"):
        await encoder.encode(MediaItem(MediaRef(data=b"x"), "video"))
