"""What every family does the same way: RGB conversion, pixel tensors, content hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size images -> float32 [N, 3, H, W] in 0..255."""
    array = np.stack([np.asarray(rgb(image), dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().contiguous()


def normalise(images: Sequence[Image.Image], mean: tuple[float, float, float],
              std: tuple[float, float, float]) -> torch.Tensor:
    """ToTensor (/255) then Normalize(mean, std), in float32: [N, 3, H, W]."""
    pixels = to_pixels(images).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return pixels.sub(mean_t).div(std_t).contiguous()


def content_hash(params: str, payload: bytes) -> str:
    """sha256 (hex) of every parameter that shapes the output, then the content itself."""
    digest = hashlib.sha256(params.encode())
    digest.update(payload)
    return digest.hexdigest()


def image_hash(params: str, image: Image.Image) -> str:
    """The content hash of an image: its RGB pixels and size after `params`."""
    pixels = rgb(image)
    return content_hash(f"{params}size={pixels.width}x{pixels.height};", pixels.tobytes())
