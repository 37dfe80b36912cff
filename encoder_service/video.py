"""Video -> sampled frames, as InternVL2's video recipe does it.

Frames are picked with the reference `get_index` rule (the middle of each of
`num_segments` equal segments); the encoder makes each one an item of its own, one 448
tile (`max_num=1`: squash resize, no thumbnail) of 256 rows, and the LLM side writes the
`Frame{i}: <image>` prompt.
Decoding uses PyAV (`pip install av`), imported on first use; without it video
requests fail with a clear error and images keep working.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from encoder_service.errors import InvalidMedia, InvalidRequest


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


def sample_frames(data: bytes, num_segments: int,
                  max_pixels: int = 40_000_000) -> list[Image.Image]:
    """`num_segments` RGB frames of the encoded video `data`, picked by `get_index`."""
    with _open(data) as container:
        if not container.streams.video:
            raise InvalidMedia("media has no video stream")
        stream = container.streams.video[0]
        if stream.width * stream.height > max_pixels:
            raise InvalidMedia(f"video frames are {stream.width}x{stream.height}; the limit is "
                               f"{max_pixels} pixels per frame")
        # The container's frame count is missing or approximate in some formats: count.
        total = sum(1 for _ in container.decode(stream))
    if total == 0:
        raise InvalidMedia("video has no frames")
    wanted = get_index(total - 1, num_segments)
    picked: dict[int, Image.Image] = {}
    with _open(data) as container:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if index in wanted:
                picked[index] = frame.to_image().convert("RGB")
            if index >= wanted[-1]:
                break
    return [picked[index] for index in wanted]
