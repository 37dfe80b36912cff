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
