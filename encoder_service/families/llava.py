"""LLaVA-1.6 (LLaVA-NeXT) preprocessing: "anyres" crops plus a squashed base image.

The reference is the original LLaVA code (haotian-liu/LLaVA `mm_utils.py` and
`llava_arch.py`), which reads each `image_grid_pinpoints` entry as (width, height)
and unpads with `int(...)`. transformers' LlavaNext reads the same entries as
(height, width), so on exact ties (small or square images that fit several
canvases equally) it picks a transposed canvas: 300x200 gives 976 rows here and
1464 there. Both agree whenever one canvas is strictly best (e.g. 1000x600).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from encoder_service.checkpoint import read_config
from encoder_service.families import Plan, Preprocessor, Tiles
from encoder_service.families.imaging import CLIP_MEAN, CLIP_STD, image_hash, normalise, rgb
from mmserve.wire.media import Modality

if TYPE_CHECKING:
    from encoder_service.config import EncoderConfig

FAMILY = "llava-1.6"
# LLaVA-1.6's default canvases, (width, height); checkpoints carry their own.
DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(width: int, height: int,
                           pinpoints: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The (width, height) canvas keeping the most resolution, then wasting the least;
    the first listed wins an exact tie."""
    best, best_effective, best_wasted = pinpoints[0], -1, math.inf
    for canvas_w, canvas_h in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (canvas_w, canvas_h), effective, wasted
    return best


def resize_and_pad(image: Image.Image, canvas: tuple[int, int]) -> Image.Image:
    """Fits the image into the canvas keeping its aspect ratio, centred on black."""
    canvas_w, canvas_h = canvas
    scale_w, scale_h = canvas_w / image.width, canvas_h / image.height
    if scale_w < scale_h:
        new_w, new_h = canvas_w, min(math.ceil(image.height * scale_w), canvas_h)
    else:
        new_w, new_h = min(math.ceil(image.width * scale_h), canvas_w), canvas_h
    padded = Image.new("RGB", canvas, (0, 0, 0))
    padded.paste(image.resize((new_w, new_h)), ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2))
    return padded


def unpadded_grid(width: int, height: int, grid_h: int, grid_w: int,
                  side: int) -> tuple[int, int]:
    """(rows, columns) of feature cells left after cutting the padding off a
    (grid_h * side) x (grid_w * side) feature map of a width x height image."""
    cur_h, cur_w = grid_h * side, grid_w * side
    if width / height > cur_w / cur_h:
        new_h = int(height * (cur_w / width))
        return cur_h - 2 * ((cur_h - new_h) // 2), cur_w
    new_w = int(width * (cur_h / height))
    return cur_h, cur_w - 2 * ((cur_w - new_w) // 2)


def to_pixel_values(crops: list[Image.Image]) -> torch.Tensor:
    """/255 then CLIP mean/std, float32 [N, 3, S, S]."""
    return normalise(crops, CLIP_MEAN, CLIP_STD)


@dataclass(frozen=True, slots=True)
class LlavaInputs(Tiles):
    """pixel_values: [1 + rows*cols, 3, S, S], the base image first, then crops row-major."""

    grid: tuple[int, int]  # (rows, cols) of crops
    image_size: tuple[int, int]  # original (width, height), for unpadding


class LlavaPreprocessor(Preprocessor):
    """Image -> base image + anyres crops, the row count it will encode to, and its hash."""

    family = FAMILY
    modalities = (Modality.IMAGE,)

    def __init__(self, crop_size: int = 336, patch_size: int = 14,
                 pinpoints: tuple[tuple[int, int], ...] = DEFAULT_PINPOINTS) -> None:
        self.crop_size = crop_size
        self.pinpoints = tuple((int(w), int(h)) for w, h in pinpoints)
        self.side = crop_size // patch_size
        self.tokens_per_tile = self.side ** 2

    def grid(self, width: int, height: int) -> tuple[int, int]:
        canvas_w, canvas_h = select_best_resolution(width, height, self.pinpoints)
        return canvas_h // self.crop_size, canvas_w // self.crop_size

    def num_tokens(self, width: int, height: int) -> int:
        """Base image rows + unpadded grid rows + one image_newline per grid row."""
        rows, cols = unpadded_grid(width, height, *self.grid(width, height), self.side)
        return self.tokens_per_tile + rows * cols + rows

    def num_tiles(self, width: int, height: int, max_tiles: int = 0) -> int:
        rows, cols = self.grid(width, height)
        return 1 + rows * cols

    def image_rows(self, width: int, height: int, max_tiles: int) -> tuple[int, int]:
        return self.num_tiles(width, height), self.num_tokens(width, height)

    def plan(self, image: Image.Image, max_tiles: int = 0) -> Plan:
        rows, cols = self.grid(image.width, image.height)
        unpadded = unpadded_grid(image.width, image.height, rows, cols, self.side)
        return Plan(FAMILY, 1 + rows * cols, self.num_tokens(image.width, image.height),
                    self.content_hash(image), (cols, rows),
                    {"thumbnail": True, "resized": [cols * self.crop_size, rows * self.crop_size],
                     "unpadded": [unpadded[1], unpadded[0]]})

    def preprocess(self, image: Image.Image, max_tiles: int = 0) -> LlavaInputs:
        """`max_tiles` is not used: the checkpoint's pinpoints bound the grid."""
        image = rgb(image)
        rows, cols = self.grid(image.width, image.height)
        size = self.crop_size
        padded = resize_and_pad(image, (cols * size, rows * size))
        crops = [image.resize((size, size))]
        crops += [padded.crop((c * size, r * size, (c + 1) * size, (r + 1) * size))
                  for r in range(rows) for c in range(cols)]
        return LlavaInputs(num_tiles=len(crops),
                           num_tokens=self.num_tokens(image.width, image.height),
                           pixel_values=to_pixel_values(crops), grid=(rows, cols),
                           image_size=(image.width, image.height))

    def content_hash(self, image: Image.Image, max_tiles: int = 0) -> str:
        return image_hash(f"family={FAMILY};crop={self.crop_size};pinpoints={self.pinpoints};",
                          image)


def build_preprocessor(config: EncoderConfig) -> LlavaPreprocessor:
    """Crop size and pinpoints from the checkpoint's config when there is one."""
    if config.checkpoint is None:
        return LlavaPreprocessor()
    checkpoint = read_config(config.checkpoint)
    vision = checkpoint.get("vision_config", {})
    pinpoints = checkpoint.get("image_grid_pinpoints") or DEFAULT_PINPOINTS
    return LlavaPreprocessor(vision.get("image_size", 336), vision.get("patch_size", 14),
                             tuple(tuple(p) for p in pinpoints))
