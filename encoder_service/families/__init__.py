"""Per-family media preprocessing (tiling, normalisation, content hashing).

Each family module exposes `build_preprocessor(config) -> Preprocessor`; adding a
family is one entry in FAMILIES. Modules are imported on first use, so reading
this registry (config validation, --print-config) does not import torch.
Preprocessing never imports a tower: towers consume what it produces.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from encoder_service.errors import InvalidRequest
from mmserve.wire.media import Modality

if TYPE_CHECKING:
    import numpy as np
    import torch

    from encoder_service.config import EncoderConfig

# family name -> module exposing build_preprocessor(config)
FAMILIES: dict[str, str] = {
    "internvl2": "encoder_service.families.internvl",
    "qwen-vl-chat": "encoder_service.families.qwenvl",
    "llava-1.6": "encoder_service.families.llava",
    "megrez-omni": "encoder_service.families.megrez",
}


@dataclass(frozen=True, slots=True)
class Plan:
    """What preprocessing will do with one media item, computed without any pixels."""

    family: str
    num_tiles: int  # tiles, slices or audio windows
    num_tokens: int  # embedding rows the tower returns for the whole item
    content_hash: str
    grid: tuple[int, int] | None = None  # (columns, rows) when the item is tiled
    details: dict[str, Any] = field(default_factory=dict)  # family-specific, JSON-ready

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "grid": list(self.grid) if self.grid else None,
                "num_tiles": self.num_tiles, "num_tokens": self.num_tokens,
                "content_hash": self.content_hash, **self.details}


@dataclass(frozen=True, slots=True)
class Preprocessed:
    """Tower input for one media item; families subclass it with what their tower reads."""

    num_tiles: int  # tiles, slices or audio windows
    num_tokens: int  # embedding rows the tower returns for the whole item


@dataclass(frozen=True, slots=True)
class Tiles(Preprocessed):
    """Same-size tiles: what the cross-request tile batcher runs."""

    pixel_values: torch.Tensor  # [num_tiles, 3, H, W] float32


class Preprocessor(ABC):
    """Media -> tower input, the plan of it, and the content hash that names the result.

    `media` is an RGB PIL image, or for audio what `decode_audio(bytes)` returns.
    """

    family: str
    modalities: tuple[Modality, ...]  # image and/or audio
    tokens_per_tile: int
    # Video files are sampled into frames, preprocessed as images with max_tiles=1.
    samples_video: bool = False

    @abstractmethod
    def plan(self, media: Any, max_tiles: int) -> Plan: ...

    def image_rows(self, width: int, height: int, max_tiles: int) -> tuple[int, int]:
        """(tiles, rows) an image of this size becomes: from its header, before any pixel
        is decoded. Families that tile by size override it; this is one fixed tile."""
        return 1, self.tokens_per_tile

    @abstractmethod
    def content_hash(self, media: Any, max_tiles: int) -> str: ...

    @abstractmethod
    def preprocess(self, media: Any, max_tiles: int) -> Preprocessed: ...

    def decode_audio(self, data: bytes) -> np.ndarray:
        """Audio file bytes -> what `preprocess` takes; families with audio override it."""
        raise InvalidRequest(f"this encoder ({self.family}) does not take audio")


def build_preprocessor(config: EncoderConfig) -> Preprocessor:
    """The configured family's preprocessor."""
    if config.family not in FAMILIES:
        raise ValueError(f"unknown family {config.family!r}; known: {sorted(FAMILIES)}")
    preprocessor: Preprocessor = importlib.import_module(
        FAMILIES[config.family]).build_preprocessor(config)
    return preprocessor
