"""Qwen-VL-Chat preprocessing: one 448x448 squash-resized tile per image, 256 rows.

Follows the image transform of Qwen-VL's `visual.py`: `Resize((448, 448), BICUBIC)`
on the RGB PIL image (no tiling, aspect ratio not kept), ToTensor, then the OpenAI
CLIP mean/std. The resampler always yields 256 rows, whatever the image size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from encoder_service.families import Plan, Preprocessor, Tiles
from encoder_service.families.imaging import CLIP_MEAN, CLIP_STD, image_hash, normalise, rgb
from mmserve.wire.media import Modality

if TYPE_CHECKING:
    from encoder_service.config import EncoderConfig

FAMILY = "qwen-vl-chat"
NUM_QUERIES = 256  # the resampler's query count: rows per image


def to_pixel_values(image: Image.Image, image_size: int = 448) -> torch.Tensor:
    """Squash-resize (PIL bicubic), ToTensor (/255), CLIP Normalize: [1, 3, S, S] float32."""
    resized = rgb(image).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return normalise([resized], CLIP_MEAN, CLIP_STD)


class QwenVLPreprocessor(Preprocessor):
    """Image -> one normalised 448 tile, and the content hash that names the result."""

    family = FAMILY
    modalities = (Modality.IMAGE,)
    tokens_per_tile = NUM_QUERIES

    def __init__(self, image_size: int = 448) -> None:
        self.image_size = image_size

    def plan(self, image: Image.Image, max_tiles: int) -> Plan:
        return Plan(FAMILY, 1, NUM_QUERIES, self.content_hash(image, max_tiles), (1, 1),
                    {"thumbnail": False, "resized": [self.image_size, self.image_size]})

    def preprocess(self, image: Image.Image, max_tiles: int) -> Tiles:
        return Tiles(num_tiles=1, num_tokens=NUM_QUERIES,
                     pixel_values=to_pixel_values(image, self.image_size))

    def content_hash(self, image: Image.Image, max_tiles: int) -> str:
        """sha256 (hex) of the RGB pixels and size; max_tiles does not change the output."""
        return image_hash(f"family={FAMILY};image_size={self.image_size};", image)


def build_preprocessor(config: EncoderConfig) -> QwenVLPreprocessor:
    return QwenVLPreprocessor(config.image_size)
