"""Video frame sampling: the reference index rule, and decoding when PyAV is installed."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.errors import InvalidMedia, InvalidRequest
from encoder_service.families import build_preprocessor
from encoder_service.towers.demo import DemoTower
from encoder_service.video import get_index, sample_frames
from mmserve.wire.media import MediaItem, MediaRef, Modality, handle_for, source_hash


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
    preprocessor = build_preprocessor(EncoderConfig())
    prepared = [preprocessor.preprocess(frame, 1) for frame in frames]
    assert [p.pixel_values.shape for p in prepared] == [(1, 3, 448, 448)] * 3
    assert [(p.num_tiles, p.num_tokens) for p in prepared] == [(1, 256)] * 3


def test_bytes_that_are_not_a_video_are_refused():
    pytest.importorskip("av")
    with pytest.raises(InvalidMedia, match="not a decodable video"):
        sample_frames(b"definitely not a video", 4)


def expected_rows(encoder: Encoder, data: bytes, frames: int) -> list[torch.Tensor]:
    """The tower run directly on each of the video's sampled frames."""
    return [encoder.tower.encode(encoder.preprocessor.preprocess(frame, 1).pixel_values)
            .reshape(-1, encoder.tower.hidden_size) for frame in sample_frames(data, frames)]


async def test_the_encoder_returns_one_item_per_frame_with_its_own_hash(encoder):
    data = make_video(20)
    item = MediaItem(MediaRef(data=data, mime_type="video/mp4"), Modality.VIDEO, num_frames=3)
    (result,) = [r async for r in encoder.encode_all([item])]
    with pytest.raises(InvalidRequest, match="num_frames 65 exceeds the limit of 64"):
        await encoder.encode(MediaItem(MediaRef(data=data), Modality.VIDEO, num_frames=65))
    assert [(r.frame, r.num_tiles, r.num_tokens) for r in result] == [(1, 1, 256), (2, 1, 256),
                                                                     (3, 1, 256)]
    frames = sample_frames(data, 3)
    assert [r.content_hash for r in result] == [
        encoder.preprocessor.content_hash(frame, 1) for frame in frames]
    for got, want in zip(result, expected_rows(encoder, data, 3)):
        torch.testing.assert_close(got.embeddings, want)
    # Every frame names the stored file: sent back, it is sampled again.
    assert len({r.handle for r in result}) == 1 and result[0].handle.startswith("mm://sha256:")


async def test_a_video_handle_is_sampled_again_from_the_stored_file(encoder):
    data = make_video(20)
    first = await encoder.encode(MediaItem(MediaRef(data=data), Modality.VIDEO, num_frames=3))
    handle = MediaRef(url=first[0].handle)
    same = await encoder.encode(MediaItem(handle, Modality.VIDEO, num_frames=3))
    more = await encoder.encode(MediaItem(handle, Modality.VIDEO, num_frames=4))
    assert [f.cached for f in first] == [False] * 3 and [f.cached for f in same] == [True] * 3
    # Frames 2, 7, 12, 16 instead of 3, 9, 16: the one frame both samplings pick is reused.
    assert [f.cached for f in more] == [False, False, False, True]
    assert [f.content_hash for f in same] == [f.content_hash for f in first]
    assert more[3].content_hash == first[2].content_hash
    assert {f.content_hash for f in more[:3]}.isdisjoint(f.content_hash for f in first)
    assert {f.handle for f in same} == {f.handle for f in more} == {first[0].handle}
    for a, b in zip(same, first):
        torch.testing.assert_close(a.embeddings, b.embeddings, rtol=0, atol=0)
    assert len(more) == 4
    for got, want in zip(more, expected_rows(encoder, data, 4)):
        torch.testing.assert_close(got.embeddings, want)


async def test_frames_the_client_sent_are_items_with_their_own_handles(encoder):
    frames = sample_frames(make_video(20), 2)
    refs = []
    for frame in frames:
        buffer = io.BytesIO()
        frame.save(buffer, format="PNG")
        refs.append(MediaRef(data=buffer.getvalue()))
    sent = await encoder.encode(MediaItem(modality=Modality.VIDEO, frames=tuple(refs)))
    assert [(f.frame, f.num_tokens) for f in sent] == [(1, 256), (2, 256)]
    assert [f.handle for f in sent] == [handle_for(source_hash(Modality.IMAGE, r.data))
                                        for r in refs]
    # A frame's handle stands for that frame.
    again = await encoder.encode(MediaItem(modality=Modality.VIDEO,
                                           frames=(MediaRef(url=sent[1].handle),)))
    assert again[0].cached and again[0].content_hash == sent[1].content_hash


async def test_families_without_video_refuse_it(config):
    qwen = EncoderConfig(family="qwen-vl-chat", port=0)
    encoder = Encoder(qwen, DemoTower(hidden_size=qwen.hidden_size, dtype=torch.float32, seed=0),
                      build_preprocessor(qwen))
    with pytest.raises(InvalidRequest, match="encodes image only, got a video item"):
        await encoder.encode(MediaItem(MediaRef(data=b"x"), Modality.VIDEO))


def make_long_video(num_frames: int, gop: int, b_frames: int = 2) -> bytes:
    """16x16 MPEG-4 with keyframes every `gop` frames and B-frames (packets out of
    presentation order); every frame is its own random pattern."""
    av = pytest.importorskip("av")
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = 16
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.max_b_frames = b_frames
        stream.options = {"qscale": "1"}
        for k in range(num_frames):
            array = np.random.default_rng(k).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def decode_all(data: bytes) -> list[np.ndarray]:
    av = pytest.importorskip("av")
    with av.open(io.BytesIO(data)) as container:
        return [np.asarray(f.to_image().convert("RGB"))
                for f in container.decode(container.streams.video[0])]


def test_a_long_video_is_sampled_without_decoding_it_whole():
    from encoder_service.video import sample_frames_counted

    data = make_long_video(900, gop=30)
    frames, decoded = sample_frames_counted(data, 8)
    every = decode_all(data)
    assert not any(np.array_equal(a, b) for a, b in itertools.pairwise(every))
    for frame, index in zip(frames, get_index(899, 8), strict=True):
        assert np.array_equal(np.asarray(frame), every[index]), index
    # Each wanted frame costs at most the frames since its keyframe, not the whole file
    # (twice, as counting by decoding did).
    assert decoded <= 8 * 30, decoded


def test_a_video_over_the_scan_limit_is_refused():
    data = make_long_video(120, gop=30)
    with pytest.raises(InvalidMedia, match="more than 100 frames"):
        sample_frames(data, 4, max_scanned=100)


@pytest.mark.parametrize("kind", ["PNG", "GIF", "JPEG"])
def test_an_image_sent_as_a_video_is_refused(kind):
    pytest.importorskip("av")
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), (1, 2, 3)).save(buffer, format=kind)
    with pytest.raises(InvalidMedia, match="not a video .*send an image as an image_url part"):
        sample_frames(buffer.getvalue(), 4)
