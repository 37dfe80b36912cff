"""The demo tower: InternVL2's shapes, pixel shuffle mapping, seeded determinism."""

from __future__ import annotations

import pytest
import torch

from encoder_service.towers.demo import DemoTower, pixel_shuffle


@pytest.fixture(scope="module")
def tiles() -> torch.Tensor:
    return torch.randn(3, 3, 448, 448, generator=torch.Generator().manual_seed(7))


def test_output_is_256_rows_per_tile_of_the_llm_width(tiles):
    out = DemoTower(hidden_size=576, dtype=torch.float32, seed=0).encode(tiles)
    assert out.shape == (3, 256, 576) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert not torch.equal(out[0], out[1])  # different tiles give different rows


def test_output_dtype_and_width_follow_the_config(tiles):
    out = DemoTower(hidden_size=96, dtype=torch.bfloat16, seed=0).encode(tiles[:1])
    assert out.shape == (1, 256, 96) and out.dtype == torch.bfloat16


def test_same_seed_same_weights_and_global_rng_untouched(tiles):
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = DemoTower(hidden_size=64, dtype=torch.float32, seed=5).encode(tiles[:1])
    assert torch.equal(torch.rand(3), expected_draw)
    second = DemoTower(hidden_size=64, dtype=torch.float32, seed=5).encode(tiles[:1])
    other = DemoTower(hidden_size=64, dtype=torch.float32, seed=6).encode(tiles[:1])
    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_tiles_do_not_influence_each_other_in_a_batch(tiles):
    tower = DemoTower(hidden_size=64, dtype=torch.float32, seed=0)
    together = tower.encode(tiles)
    alone = tower.encode(tiles[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_wrong_tile_shape_is_refused():
    tower = DemoTower(hidden_size=64, dtype=torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"expected pixel values \[N, 3, 448, 448\]"):
        tower.encode(torch.zeros(1, 3, 224, 224))


def test_pixel_shuffle_matches_the_reference_formula():
    n, side, c = 2, 32, 5
    x = torch.randn(n, side, side, c)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (n, 16, 16, 4 * c)
    for b in range(n):
        for i in range(16):
            for j in range(16):
                expected = torch.cat([x[b, 2 * i, 2 * j], x[b, 2 * i, 2 * j + 1],
                                      x[b, 2 * i + 1, 2 * j], x[b, 2 * i + 1, 2 * j + 1]])
                assert torch.equal(out[b, i, j], expected), (b, i, j)
