"""Per-family media preprocessing (tiling, normalisation, content hashing).

Each family module exposes `build_preprocessor(config) -> Preprocessor`; adding a
family is one entry in FAMILIES. Modules are imported on first use, so reading
this registry (config validation, --print-config) does not import torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
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
    """Tower input for one media item."""

    pixel_values: torch.Tensor  # [num_tiles, 3, H, W] float32 (audio: the family's features)
    num_tiles: int
    num_tokens: int = 0  # 0: num_tiles * tokens_per_tile


class Preprocessor(Protocol):
    family: str
    # What `media` may be: "image" (an RGB PIL image); "audio" (what the family's
    # `decode_audio(bytes)` returns). Families that also set `samples_video = True` take
    # video files, sampled into frames that are preprocessed as images with max_tiles=1.
    modalities: tuple[str, ...]
    tokens_per_tile: int

    def plan(self, media: Any, max_tiles: int) -> Plan: ...

    def content_hash(self, media: Any, max_tiles: int) -> str: ...

    def preprocess(self, media: Any, max_tiles: int) -> Preprocessed: ...


def build_preprocessor(config: EncoderConfig) -> Preprocessor:
    """The configured family's preprocessor."""
    if config.family not in FAMILIES:
        raise ValueError(f"unknown family {config.family!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[config.family]).build_preprocessor(config)
