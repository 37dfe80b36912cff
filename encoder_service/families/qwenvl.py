"""Qwen-VL-Chat preprocessing: one 448x448 squash-resized tile per image, 256 rows.

Follows the image transform of Qwen-VL's `visual.py`: `Resize((448, 448), BICUBIC)`
on the RGB PIL image (no tiling, aspect ratio not kept), ToTensor, then the OpenAI
CLIP mean/std. The resampler always yields 256 rows, whatever the image size.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from encoder_service.config import EncoderConfig
from encoder_service.families import Plan, Preprocessed

FAMILY = "qwen-vl-chat"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NUM_QUERIES = 256  # the resampler's query count: rows per image


def to_pixel_values(image: Image.Image, image_size: int = 448) -> torch.Tensor:
    """Squash-resize (PIL bicubic), ToTensor (/255), CLIP Normalize: [1, 3, S, S] float32."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    resized = rgb.resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())
    pixels = pixels.permute(2, 0, 1).unsqueeze(0).float().div(255)
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub(mean).div(std).contiguous()


class QwenVLPreprocessor:
    """Image -> one normalised 448 tile, and the content hash that names the result."""

    family = FAMILY
    modalities = ("image",)
    tokens_per_tile = NUM_QUERIES

    def __init__(self, image_size: int = 448) -> None:
        self.image_size = image_size

    def plan(self, image: Image.Image, max_tiles: int) -> Plan:
        return Plan(FAMILY, 1, NUM_QUERIES, self.content_hash(image, max_tiles), (1, 1),
                    {"thumbnail": False, "resized": [self.image_size, self.image_size]})

    def preprocess(self, image: Image.Image, max_tiles: int) -> Preprocessed:
        return Preprocessed(to_pixel_values(image, self.image_size), 1, NUM_QUERIES)

    def content_hash(self, image: Image.Image, max_tiles: int) -> str:
        """sha256 (hex) of the RGB pixels and size; max_tiles does not change the output."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        params = f"family={FAMILY};image_size={self.image_size};size={rgb.width}x{rgb.height};"
        digest = hashlib.sha256(params.encode())
        digest.update(rgb.tobytes())
        return digest.hexdigest()


def build_preprocessor(config: EncoderConfig) -> QwenVLPreprocessor:
    return QwenVLPreprocessor(config.image_size)
