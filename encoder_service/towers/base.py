"""The interface every vision tower (torch demo, real checkpoints, TensorRT) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class Tower(ABC):
    """Tiles in, LLM-width embedding rows out.

    `encode` is synchronous and may take a while; the batcher calls it from a
    worker thread, one call at a time.
    """

    hidden_size: int  # width of each output row (the LLM hidden size)
    dtype: torch.dtype  # dtype of the output rows
    tokens_per_tile: int  # rows per tile

    @abstractmethod
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] normalised float32 tiles -> [N, tokens_per_tile, hidden_size]."""


def check_tiles(pixel_values: torch.Tensor, image_size: int) -> None:
    """Refuses anything but a batch of square RGB tiles of the tower's size."""
    expected = (3, image_size, image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"expected pixel values [N, {', '.join(map(str, expected))}], "
                         f"got {list(pixel_values.shape)}")


class ModuleTower(Tower):
    """A tower whose whole computation is one torch module (tiles -> rows)."""

    module: torch.nn.Module
    image_size: int
    device: torch.device
    compute_dtype: torch.dtype  # the module's dtype; rows leave in `dtype`

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_tiles(pixel_values, self.image_size)
        with torch.inference_mode():
            rows = self.module(pixel_values.to(self.device, self.compute_dtype))
        return rows.to("cpu", self.dtype)

