"""InternVL2 dynamic tiling against the worked examples of model-formats.md §1.3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from encoder_service.families.internvl import (
    IMAGENET_MEAN, IMAGENET_STD, InternVL2Preprocessor, dynamic_preprocess, target_ratios,
    tile_grid, to_pixel_values,
)

# W, H, max_num, grid (cols, rows), grid tiles, thumbnail, total tiles, <IMG_CONTEXT> tokens
WORKED_EXAMPLES = [
    (1000, 600, 12, (3, 2), 6, True, 7, 1792),
    (600, 1000, 12, (2, 3), 6, True, 7, 1792),
    (800, 600, 12, (4, 3), 12, True, 13, 3328),
    (1920, 1080, 12, (4, 2), 8, True, 9, 2304),
    (1280, 720, 12, (4, 2), 8, True, 9, 2304),
    (1000, 1000, 12, (3, 3), 9, True, 10, 2560),
    (500, 500, 12, (1, 1), 1, False, 1, 256),
    (448, 448, 12, (1, 1), 1, False, 1, 256),
    (300, 200, 12, (3, 2), 6, True, 7, 1792),
    (2000, 200, 12, (10, 1), 10, True, 11, 2816),
    (1920, 1080, 6, (2, 1), 2, True, 3, 768),
]


@pytest.mark.parametrize("width,height,max_num,grid,grid_tiles,thumb,total,tokens", WORKED_EXAMPLES)
def test_worked_examples(width, height, max_num, grid, grid_tiles, thumb, total, tokens):
    assert tile_grid(width, height, 448, max_num) == grid
    assert grid[0] * grid[1] == grid_tiles
    tiles = dynamic_preprocess(Image.new("RGB", (width, height)), 448, max_num, True)
    assert len(tiles) == total
    assert (len(tiles) == grid_tiles + 1) is thumb
    assert all(tile.size == (448, 448) for tile in tiles)
    preprocessor = InternVL2Preprocessor()
    assert preprocessor.num_tiles(width, height, max_num) == total
    assert total * preprocessor.tokens_per_tile == tokens


def test_candidate_order_matches_the_reference_set_order():
    assert target_ratios(12)[:14] == [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1),
                                      (1, 4), (5, 1), (1, 5), (1, 6), (6, 1), (3, 2), (2, 3)]
    assert all(i * j <= 12 for i, j in target_ratios(12))


def test_tie_rule_prefers_more_tiles_only_above_half_coverage():
    # 1000x1000 covers more than half of a 3x3 canvas (1e6 > 903,168): 3x3; 500x500 does not.
    assert tile_grid(1000, 1000) == (3, 3)
    assert tile_grid(951, 951) == (3, 3)  # 904,401 > 0.5 * 448^2 * 9 = 903,168
    assert tile_grid(950, 950) == (2, 2)  # 902,500: not > 903,168, but > 401,408 (2x2)
    assert tile_grid(634, 634) == (2, 2)  # 401,956 > 401,408
    assert tile_grid(633, 633) == (1, 1)  # 400,689: not > 401,408


def test_no_thumbnail_when_disabled():
    tiles = dynamic_preprocess(Image.new("RGB", (1000, 600)), 448, 12, use_thumbnail=False)
    assert len(tiles) == 6


def block_image(columns: int, rows: int, block: int) -> tuple[Image.Image, list[tuple]]:
    """An image of columns x rows uniform blocks, each its own colour, row-major."""
    colors = [(40 * k + 10, 255 - 30 * k, (97 * k) % 256) for k in range(columns * rows)]
    image = Image.new("RGB", (columns * block, rows * block))
    for k, color in enumerate(colors):
        left, top = (k % columns) * block, (k // columns) * block
        image.paste(color, (left, top, left + block, top + block))
    return image, colors


def test_tiles_are_cropped_row_major_from_the_resized_image():
    # 1500x1000 -> 3x2 grid; the resize to 1344x896 maps each 500px block onto one tile.
    image, colors = block_image(3, 2, 500)
    tiles = dynamic_preprocess(image, 448, 12, True)
    assert len(tiles) == 7
    for k, color in enumerate(colors):
        center = tiles[k].getpixel((224, 224))
        assert center == color, f"tile {k}"
        # The tile interior is the block's colour, away from the resampling seams.
        inner = np.asarray(tiles[k])[40:400, 40:400]
        assert (inner == np.array(color, dtype=np.uint8)).all(), f"tile {k}"
    thumbnail = tiles[-1]
    assert thumbnail.getpixel((5, 5)) == colors[0]
    assert thumbnail.getpixel((442, 442)) == colors[-1]


def test_pixel_values_are_imagenet_normalised():
    image, colors = block_image(3, 2, 448)
    pixels = to_pixel_values(dynamic_preprocess(image, 448, 12, True))
    assert pixels.shape == (7, 3, 448, 448) and pixels.dtype == torch.float32
    for k, color in enumerate(colors):
        expected = (np.array(color) / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        assert torch.allclose(pixels[k, :, 100, 100], torch.tensor(expected, dtype=torch.float32),
                              atol=1e-6)


def test_content_hash_covers_pixels_size_and_parameters():
    preprocessor = InternVL2Preprocessor()
    image = Image.new("RGB", (100, 50), (1, 2, 3))
    digest = preprocessor.content_hash(image, 12)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert preprocessor.content_hash(image.copy(), 12) == digest
    changed = image.copy()
    changed.putpixel((99, 49), (1, 2, 4))
    assert preprocessor.content_hash(changed, 12) != digest
    assert preprocessor.content_hash(image, 6) != digest
    assert InternVL2Preprocessor(use_thumbnail=False).content_hash(image, 12) != digest
    # Same bytes, different shape: 100x50 vs 50x100 of one colour.
    assert preprocessor.content_hash(Image.new("RGB", (50, 100), (1, 2, 3)), 12) != digest
