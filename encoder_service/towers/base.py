"""The interface every vision or audio tower (torch demo, real checkpoints, TensorRT) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from encoder_service.families import Preprocessed, Tiles

# Tensor names of a tower exported to ONNX and built into a TensorRT engine.
INPUT_NAME, OUTPUT_NAME = "pixel_values", "embeddings"


class Tower(ABC):
    """Preprocessed items in, LLM-width embedding rows out.

    The encoder runs an item one of two ways. When `batches_tiles` is true, the item's
    tiles share `encode` calls with other requests' tiles (the tile batcher calls it from
    a worker thread, one call at a time), and `merge` turns the item's tile rows into its
    rows. Otherwise the tower takes whole items only (variable-size slices, audio), one
    at a time, through `encode_item`.
    """

    hidden_size: int  # width of each output row (the LLM hidden size)
    dtype: torch.dtype  # dtype of the output rows
    tokens_per_tile: int  # rows per tile
    batches_tiles: bool = True
    # The whole tiles -> rows computation when it is one torch module (what ONNX export
    # traces); None for towers that are not (TensorRT, Megrez's two towers).
    module: torch.nn.Module | None = None

    @abstractmethod
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] tiles -> [N, tokens_per_tile, hidden_size]."""

    def merge(self, tiles: torch.Tensor, prepared: Preprocessed) -> torch.Tensor:
        """One item's [tiles, tokens_per_tile, hidden] -> its [rows, hidden]: the tiles' rows
        in order, unless the family arranges them otherwise."""
        return tiles.reshape(-1, tiles.shape[-1])

    def encode_item(self, prepared: Preprocessed) -> torch.Tensor:
        """One item's rows without the batcher: its tiles through `encode`, then `merge`."""
        if not isinstance(prepared, Tiles):
            raise TypeError(f"{type(self).__name__} takes tiles, got {type(prepared).__name__}")
        return self.merge(self.encode(prepared.pixel_values), prepared)


def check_tiles(pixel_values: torch.Tensor, image_size: int) -> None:
    """Refuses anything but a batch of square RGB tiles of the tower's size."""
    expected = (3, image_size, image_size)
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(f"expected pixel values [N, {', '.join(map(str, expected))}], "
                         f"got {list(pixel_values.shape)}")


class ModuleTower(Tower):
    """A tower whose whole computation is one torch module (tiles -> rows)."""

    module: torch.nn.Module  # always one here
    image_size: int
    device: torch.device
    compute_dtype: torch.dtype  # the module's dtype; rows leave in `dtype`

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_tiles(pixel_values, self.image_size)
        with torch.inference_mode():
            rows = self.module(pixel_values.to(self.device, self.compute_dtype))
        return rows.to("cpu", self.dtype)
