"""Video -> sampled frames, as InternVL2's video recipe does it.

Frames are picked with the reference `get_index` rule (the middle of each of
`num_segments` equal segments); the encoder makes each one an item of its own, one 448
tile (`max_num=1`: squash resize, no thumbnail) of 256 rows, and the LLM side writes the
`Frame{i}: <image>` prompt.
Frames are counted from the packets (no decoding) and each picked frame is decoded from
the keyframe before it, so a long video costs one demux pass plus a GOP per frame.
Decoding uses PyAV (`pip install av`), imported on first use; without it video
requests fail with a clear error and images keep working.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from encoder_service.errors import InvalidMedia, InvalidRequest

MAX_SCANNED_FRAMES = 108_000  # EncoderConfig.max_video_scanned_frames' default
# Demuxers of video containers. FFmpeg also opens a still image (png_pipe, image2, ...)
# or a GIF as a "video"; those are images and belong in image parts.
VIDEO_CONTAINERS = frozenset({"mov", "mp4", "matroska", "webm", "avi", "mpegts", "mpeg"})


def get_index(max_frame: int, num_segments: int, fps: float | None = None,
              bound: tuple[float, float] | None = None, first_idx: int = 0) -> list[int]:
    """Frame indices to sample; `max_frame` is the last frame index (frame count - 1).

    `bound` (start, end) in seconds, with `fps`, restricts sampling to that span.
    """
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if bound is None:
        start_idx, end_idx = first_idx, max_frame
    elif fps is None:
        raise ValueError("a time bound needs the video's fps")
    else:
        start_idx = max(first_idx, round(bound[0] * fps))
        end_idx = min(round(bound[1] * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return [int(start_idx + seg_size / 2 + np.round(seg_size * k)) for k in range(num_segments)]


def _open(data: bytes) -> Any:
    try:
        import av
    except ImportError:
        raise InvalidRequest("this encoder cannot decode video: PyAV is not installed "
                             "(pip install av); send the frames as images instead") from None
    try:
        return av.open(io.BytesIO(data))
    except av.FFmpegError as exc:
        raise InvalidMedia(f"media is not a decodable video ({exc})") from None


def has_video_stream(data: bytes) -> bool:
    """Whether `data` is a container PyAV opens with at least one video stream."""
    try:
        with _open(data) as container:
            return bool(container.streams.video)
    except InvalidMedia:
        return False


def sample_frames(data: bytes, num_segments: int, max_pixels: int = 40_000_000,
                  max_scanned: int = MAX_SCANNED_FRAMES) -> list[Image.Image]:
    """`num_segments` RGB frames of the encoded video `data`, picked by `get_index`."""
    return sample_frames_counted(data, num_segments, max_pixels, max_scanned)[0]


def sample_frames_counted(data: bytes, num_segments: int, max_pixels: int = 40_000_000,
                          max_scanned: int = MAX_SCANNED_FRAMES,
                          ) -> tuple[list[Image.Image], int]:
    """The sampled frames and how many frames were decoded to get them.

    The frames are counted from the packets, without decoding (the container's own count
    is missing or approximate in some formats); each wanted frame is then decoded from the
    keyframe before it, seeking forward past the frames in between.
    """
    with _open(data) as container:
        if not container.streams.video:
            raise InvalidMedia("media has no video stream")
        if VIDEO_CONTAINERS.isdisjoint(container.format.name.split(",")):
            raise InvalidMedia(f"media is a {container.format.name} file, not a video "
                               f"(mp4, webm, mkv, avi, mpeg-ts); send an image as an "
                               f"image_url part")
        stream = container.streams.video[0]
        if stream.width * stream.height > max_pixels:
            raise InvalidMedia(f"video frames are {stream.width}x{stream.height}; the limit is "
                               f"{max_pixels} pixels per frame")
        timeline = _timeline(container, stream, max_scanned)
        if not timeline.pts:
            raise InvalidMedia("video has no frames")
        wanted = get_index(len(timeline.pts) - 1, num_segments)
        picked, decoded = _decode_at(container, stream, timeline,
                                     sorted({timeline.pts[i] for i in wanted}))
    return [picked[timeline.pts[index]] for index in wanted], decoded


@dataclass(slots=True)
class _Timeline:
    pts: list[int]  # every frame's presentation timestamp, in presentation order
    keyframes: list[int]  # the keyframes' timestamps, ascending


def _timeline(container: Any, stream: Any, max_scanned: int) -> _Timeline:
    pts, keyframes = [], []
    for packet in container.demux(stream):
        if packet.size == 0 or packet.pts is None:
            continue  # the flushing packet at the end; no frame
        pts.append(packet.pts)
        if packet.is_keyframe:
            keyframes.append(packet.pts)
        if len(pts) > max_scanned:
            raise InvalidMedia(f"the video has more than {max_scanned} frames; send a shorter "
                               f"clip or sampled frames as images")
    pts.sort()
    keyframes.sort()
    return _Timeline(pts, keyframes)


def _decode_at(container: Any, stream: Any, timeline: _Timeline,
               targets: list[int]) -> tuple[dict[int, Image.Image], int]:
    """The frames at `targets` (ascending pts), by frame pts; and the count decoded."""
    picked: dict[int, Image.Image] = {}
    decoded, position = 0, None  # position: pts of the last frame decoded
    frames: Iterator[Any] = iter(())
    for target in targets:
        keyframe = timeline.keyframes[max(0, bisect.bisect_right(timeline.keyframes, target) - 1)]
        if position is None or position >= target or keyframe > position:
            container.seek(keyframe, stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            decoded += 1
            position = frame.pts
            if frame.pts is not None and frame.pts >= target:
                picked[target] = frame.to_image().convert("RGB")
                break
        else:
            raise InvalidMedia("the video ended before a frame its packets announced; "
                               "the file is truncated or corrupt")
    return picked, decoded
