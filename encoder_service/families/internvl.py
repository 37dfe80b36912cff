"""InternVL2 preprocessing: dynamic tiling into 448px tiles plus a thumbnail.

Follows InternVL's `dynamic_preprocess` / `find_closest_aspect_ratio` and its
per-tile transform (ToTensor + ImageNet normalisation) exactly; resizes use PIL's
default filter (bicubic) as the reference does, for bit-identical tiles.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from PIL import Image

from encoder_service.families import Plan, Preprocessor, Tiles
from encoder_service.families.imaging import IMAGENET_MEAN, IMAGENET_STD, image_hash, normalise, rgb
from mmserve.wire.media import Modality

if TYPE_CHECKING:
    from encoder_service.config import EncoderConfig

FAMILY = "internvl2"


def tokens_per_tile(image_size: int = 448) -> int:
    """Embedding rows per tile: (448 / 14)^2 = 1024 patches, pixel-shuffled by 0.5 -> 256."""
    return (image_size // 14) ** 2 // 4


def target_ratios(max_num: int, min_num: int = 1) -> list[tuple[int, int]]:
    """Candidate grids (columns, rows), ordered by tile count as the reference orders them.

    The reference sorts a set; the order within one tile count is CPython's set
    order, reproduced here by building the same set.
    """
    ratios = {(i, j) for n in range(min_num, max_num + 1)
              for i in range(1, n + 1) for j in range(1, n + 1) if min_num <= i * j <= max_num}
    return sorted(ratios, key=lambda r: r[0] * r[1])


def find_closest_aspect_ratio(aspect_ratio: float, ratios: list[tuple[int, int]],
                              width: int, height: int, image_size: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest; on a tie, the larger grid if the image
    covers more than half of its canvas."""
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for ratio in ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff = diff
            best = ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    return best


def tile_grid(width: int, height: int, image_size: int = 448, max_num: int = 12,
              min_num: int = 1) -> tuple[int, int]:
    """The (columns, rows) grid dynamic_preprocess picks for an image of this size."""
    ratios = target_ratios(max_num, min_num)
    return find_closest_aspect_ratio(width / height, ratios, width, height, image_size)


def dynamic_preprocess(image: Image.Image, image_size: int = 448, max_num: int = 12,
                       use_thumbnail: bool = True, min_num: int = 1) -> list[Image.Image]:
    """Row-major tiles of the resized image, then the thumbnail if there is more than one tile."""
    columns, rows = tile_grid(image.width, image.height, image_size, max_num, min_num)
    resized = image.resize((image_size * columns, image_size * rows))
    tiles = []
    for k in range(columns * rows):
        left, top = (k % columns) * image_size, (k // columns) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    return tiles


def to_pixel_values(tiles: list[Image.Image]) -> torch.Tensor:
    """ToTensor (/255) then ImageNet Normalize, in float32: [N, 3, H, W]."""
    return normalise(tiles, IMAGENET_MEAN, IMAGENET_STD)


class InternVL2Preprocessor(Preprocessor):
    """Image -> tiles -> normalised pixel values, and the content hash that names the result."""

    family = FAMILY
    modalities = (Modality.IMAGE,)
    samples_video = True  # video files become frames of one tile each (video.py)

    def __init__(self, image_size: int = 448, use_thumbnail: bool = True) -> None:
        self.image_size = image_size
        self.use_thumbnail = use_thumbnail
        self.tokens_per_tile = tokens_per_tile(image_size)

    def num_tiles(self, width: int, height: int, max_tiles: int) -> int:
        columns, rows = tile_grid(width, height, self.image_size, max_tiles)
        tiles = columns * rows
        return tiles + 1 if self.use_thumbnail and tiles != 1 else tiles

    def image_rows(self, width: int, height: int, max_tiles: int) -> tuple[int, int]:
        tiles = self.num_tiles(width, height, max_tiles)
        return tiles, tiles * self.tokens_per_tile

    def plan(self, image: Image.Image, max_tiles: int) -> Plan:
        grid = tile_grid(image.width, image.height, self.image_size, max_tiles)
        tiles = self.num_tiles(image.width, image.height, max_tiles)
        thumbnail = self.use_thumbnail and grid != (1, 1)
        return Plan(FAMILY, tiles, tiles * self.tokens_per_tile,
                    self.content_hash(image, max_tiles), grid,
                    {"thumbnail": thumbnail, "resized": [grid[0] * self.image_size,
                                                         grid[1] * self.image_size]})

    def preprocess(self, image: Image.Image, max_tiles: int) -> Tiles:
        # RGB before resizing, as the reference loads it (PIL resizes RGBA premultiplied).
        tiles = dynamic_preprocess(rgb(image), self.image_size, max_tiles, self.use_thumbnail)
        return Tiles(num_tiles=len(tiles), num_tokens=len(tiles) * self.tokens_per_tile,
                     pixel_values=to_pixel_values(tiles))

    def content_hash(self, image: Image.Image, max_tiles: int) -> str:
        """sha256 (hex) of the RGB pixels, the size and every parameter that shapes the output."""
        return image_hash(f"family={FAMILY};image_size={self.image_size};max_tiles={max_tiles};"
                          f"thumbnail={int(self.use_thumbnail)};", image)


def build_preprocessor(config: EncoderConfig) -> InternVL2Preprocessor:
    return InternVL2Preprocessor(config.image_size, config.use_thumbnail)
