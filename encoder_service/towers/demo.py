"""A small InternViT-shaped tower with seeded random weights (the embedded default).

Same data path as InternVL2's vision side: patch-14 conv embedding -> CLS + learned
positions -> pre-norm transformer layers -> drop CLS -> 32x32 grid -> pixel shuffle
(0.5, ps_version v2) -> mlp1 projector to the LLM width. Only the width and depth
are shrunk (64 wide, 2 layers) so it runs fast on a CPU. Its output is meaningless;
it exists so that every other part of the pipeline runs for real.
"""

from __future__ import annotations

import torch
from torch import nn

from encoder_service.towers.base import Tower, check_tiles

PATCH_SIZE = 14
DOWNSAMPLE_RATIO = 0.5


def pixel_shuffle(x: torch.Tensor, scale_factor: float = DOWNSAMPLE_RATIO) -> torch.Tensor:
    """InternVL's pixel shuffle, ps_version v2: [N, H, W, C] -> [N, H*s, W*s, C/s^2].

    Output (i, j) holds concat[x(2i,2j), x(2i,2j+1), x(2i+1,2j), x(2i+1,2j+1)] for s = 0.5.
    """
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor),
               int(c / (scale_factor * scale_factor)))
    # v2 swaps height and width back (v1 left the image transposed).
    return x.permute(0, 2, 1, 3).contiguous()


class _EncoderLayer(nn.Module):
    """Pre-norm attention + MLP block, as in InternViT (without its layer scale)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _VisionModel(nn.Module):
    def __init__(self, image_size: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        num_patches = (image_size // PATCH_SIZE) ** 2
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(1, num_patches + 1, width) * 0.02)
        self.layers = nn.ModuleList(_EncoderLayer(width, heads) for _ in range(layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> last hidden state [N, 1 + (S/14)^2, width], CLS first."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1) + self.position_embedding
        for layer in self.layers:
            x = layer(x)
        return x


class _DemoInternVL(nn.Module):
    def __init__(self, image_size: int, width: int, layers: int, heads: int,
                 hidden_size: int) -> None:
        super().__init__()
        self.vision_model = _VisionModel(image_size, width, layers, heads)
        shuffled = width * int(1 / DOWNSAMPLE_RATIO) ** 2
        self.mlp1 = nn.Sequential(nn.LayerNorm(shuffled), nn.Linear(shuffled, hidden_size),
                                  nn.GELU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vit_embeds = self.vision_model(pixel_values)[:, 1:, :]
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = pixel_shuffle(vit_embeds)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)


class DemoTower(Tower):
    """Seeded random InternViT-shaped tower; the same seed gives the same weights."""

    module: _DemoInternVL

    def __init__(self, hidden_size: int, dtype: torch.dtype, seed: int, image_size: int = 448,
                 width: int = 64, layers: int = 2, heads: int = 4) -> None:
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.image_size = image_size
        self.tokens_per_tile = (image_size // PATCH_SIZE) ** 2 // 4
        # Build under a private RNG state so the weights depend on the seed alone and
        # the process-wide generator is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # Public so that exporters (ONNX -> TensorRT) can trace the same network.
            self.module = _DemoInternVL(image_size, width, layers, heads, hidden_size)
        self.module.eval().requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        check_tiles(pixel_values, self.image_size)
        # Computed in float32 (CPU half-precision kernels are slow or missing), sent in
        # the LLM's dtype.
        with torch.inference_mode():
            return self.module(pixel_values.float()).to(self.dtype)
