"""Megrez-3B-Omni image preprocessing: MiniCPM-V slicing (a source image plus up to 9 slices).

Follows MiniCPM-V's image processor (`slice_image`, `get_sliced_grid`, `find_best_resize`,
`get_refine_size`) with its defaults: 448 px scale resolution, 14 px patches, 9 slices. Each
source or slice becomes 64 rows after the resampler. Pixel values stay in 0..255: Megrez
normalises them inside the model ((x - 127.5) / 127.5), and so does our tower.

Audio items arrive as decoded 16 kHz samples (see audio.py) and become Whisper log-mel
features; the tower turns them into `span` rows (bos, audio rows, eos).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from encoder_service.checkpoint import read_config
from encoder_service.families import Plan, Preprocessed, Preprocessor
from encoder_service.families.audio import (
    SAMPLE_RATE,
    AudioFeatures,
    AudioPreprocessor,
    audio_lengths,
)
from encoder_service.families.imaging import image_hash, rgb, to_pixels
from mmserve.wire.media import Modality

if TYPE_CHECKING:
    from encoder_service.config import EncoderConfig

FAMILY = "megrez-omni"
SCALE_RESOLUTION = 448
PATCH_SIZE = 14
MAX_SLICES = 9
QUERY_NUM = 64


def ensure_divide(length: float, patch_size: int) -> int:
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(width: float, height: float, scale: int = SCALE_RESOLUTION,
                     patch_size: int = PATCH_SIZE, allow_upscale: bool = False) -> tuple[int, int]:
    """Scales to about scale^2 pixels (down only, unless allowed), sides multiples of the patch."""
    if width * height > scale * scale or allow_upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def sliced_grid(width: int, height: int, max_slices: int = MAX_SLICES,
                scale: int = SCALE_RESOLUTION) -> tuple[int, int] | None:
    """(columns, rows) of slices whose aspect ratio is closest to the image's; None: no slicing."""
    multiple = min(math.ceil(width * height / (scale * scale)), max_slices)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    best, best_error = None, math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slices:
            continue
        for columns in range(1, count + 1):
            if count % columns:
                continue
            error = abs(log_ratio - math.log(columns / (count // columns)))
            if error < best_error:
                best, best_error = (columns, count // columns), error
    return best


def refine_size(width: int, height: int, grid: tuple[int, int], scale: int = SCALE_RESOLUTION,
                patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    """The size the whole image is resized to before it is cut into grid cells."""
    columns, rows = grid
    cell_w = ensure_divide(width, columns) / columns
    cell_h = ensure_divide(height, rows) / rows
    best_w, best_h = find_best_resize(cell_w, cell_h, scale, patch_size, allow_upscale=True)
    return best_w * columns, best_h * rows


def slice_image(image: Image.Image, max_slices: int = MAX_SLICES
                ) -> tuple[Image.Image, list[Image.Image], tuple[int, int] | None]:
    """(source image, slices row-major, grid) as MiniCPM-V's `slice_image` makes them."""
    grid = sliced_grid(image.width, image.height, max_slices)
    bicubic = Image.Resampling.BICUBIC
    if grid is None:
        size = find_best_resize(image.width, image.height, allow_upscale=True)
        return image.resize(size, resample=bicubic), [], None
    source = image.resize(find_best_resize(image.width, image.height), resample=bicubic)
    refined = image.resize(refine_size(image.width, image.height, grid), resample=bicubic)
    columns, rows = grid
    cell_w, cell_h = refined.width // columns, refined.height // rows
    slices = [refined.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h))
              for r in range(rows) for c in range(columns)]
    return source, slices, grid


@dataclass(frozen=True, slots=True)
class MegrezImageInputs(Preprocessed):
    """num_tiles: 1 + n; num_tokens: 64 per source or slice."""

    source: torch.Tensor  # [1, 3, h, w], 0..255
    slices: torch.Tensor | None  # [n, 3, h', w'], 0..255, row-major; None when not sliced


class MegrezPreprocessor(Preprocessor):
    """Images -> source + slices; audio (decoded 16 kHz samples) -> log-mel features.

    For images `max_tiles` caps the slices (at most MiniCPM-V's 9); audio ignores it.
    """

    family = FAMILY
    modalities = (Modality.IMAGE, Modality.AUDIO)
    tokens_per_tile = QUERY_NUM

    def __init__(self, n_mels: int = 128, max_audio_seconds: float = 30.0) -> None:
        self.audio = AudioPreprocessor(n_mels, max_audio_seconds)

    @staticmethod
    def _max_slices(max_tiles: int) -> int:
        return min(max_tiles, MAX_SLICES) if max_tiles > 0 else MAX_SLICES

    def num_tiles(self, width: int, height: int, max_tiles: int = 0) -> int:
        grid = sliced_grid(width, height, self._max_slices(max_tiles))
        return 1 + (grid[0] * grid[1] if grid else 0)

    def num_tokens(self, width: int, height: int, max_tiles: int = 0) -> int:
        return QUERY_NUM * self.num_tiles(width, height, max_tiles)

    def decode_audio(self, data: bytes) -> np.ndarray:
        """Audio file bytes -> 16 kHz mono samples (refused above max_audio_seconds)."""
        return self.audio.decode(data)

    def image_rows(self, width: int, height: int, max_tiles: int) -> tuple[int, int]:
        tiles = self.num_tiles(width, height, max_tiles)
        return tiles, tiles * QUERY_NUM

    def plan(self, media: Image.Image | np.ndarray, max_tiles: int = 0) -> Plan:
        key = self.content_hash(media, max_tiles)
        if isinstance(media, np.ndarray):
            lengths = audio_lengths(media.shape[0])
            return Plan(FAMILY, 1, lengths.span, key, None,
                        {"seconds": media.shape[0] / SAMPLE_RATE, "audio_tokens": lengths.tokens})
        grid = sliced_grid(media.width, media.height, self._max_slices(max_tiles))
        tiles = self.num_tiles(media.width, media.height, max_tiles)
        return Plan(FAMILY, tiles, tiles * QUERY_NUM, key, grid, {"thumbnail": grid is not None})

    def preprocess(self, media: Image.Image | np.ndarray,
                   max_tiles: int = 0) -> MegrezImageInputs | AudioFeatures:
        if isinstance(media, np.ndarray):
            return self.audio.features(media)
        source, slices, _ = slice_image(rgb(media), self._max_slices(max_tiles))
        return MegrezImageInputs(num_tiles=1 + len(slices),
                                 num_tokens=QUERY_NUM * (1 + len(slices)),
                                 source=to_pixels([source]),
                                 slices=to_pixels(slices) if slices else None)

    def content_hash(self, media: Image.Image | np.ndarray, max_tiles: int = 0) -> str:
        if isinstance(media, np.ndarray):
            return self.audio.content_hash(media)
        return image_hash(f"family={FAMILY};max_slices={self._max_slices(max_tiles)};", media)


def build_preprocessor(config: EncoderConfig) -> MegrezPreprocessor:
    """Mel bins from the checkpoint's audio_config when there is one (whisper-large-v3: 128)."""
    n_mels = 128
    if config.checkpoint is not None:
        n_mels = int(read_config(config.checkpoint).get("audio_config", {}).get("n_mels", 128))
    return MegrezPreprocessor(n_mels, config.max_audio_seconds)
