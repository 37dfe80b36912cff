"""Chat messages as the LLM service sees them, independent of protobuf."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Modality(enum.IntEnum):
    IMAGE = 1
    AUDIO = 2
    VIDEO = 3  # a video file; the encoder samples frames, which become IMAGE frames


@dataclass(frozen=True, slots=True)
class MediaRef:
    """A media item to encode: a URL (http(s), data:, file:, mm://) or raw bytes."""

    modality: Modality
    url: str = ""
    data: bytes = b""
    mime_type: str = ""
    max_tiles: int = 0  # 0: the encoder's default
    frame: int = 0  # 1-based frame number when this image is a video frame
    num_frames: int = 0  # VIDEO only: frames to sample; 0: the encoder's default


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


Part = TextPart | MediaRef

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    parts: tuple[Part, ...]

    @property
    def media(self) -> tuple[MediaRef, ...]:
        return tuple(p for p in self.parts if isinstance(p, MediaRef))

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))
