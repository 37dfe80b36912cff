"""LLaVA-1.6's vision side: CLIP ViT (transformers' CLIP vision transformer) + mlp2x_gelu projector,
then the "spatial_unpad" merge with `image_newline` at the end of every feature row.

Loads llava-hf checkpoints (`vision_tower.vision_model.*`, `multi_modal_projector.linear_1/2`,
`image_newline`, optionally under `model.`) and original liuhaotian ones
(`model.vision_tower.vision_tower.vision_model.*`, `model.mm_projector.0/2`, `model.image_newline`;
their config names only the CLIP tower, whose ViT-L/14-336 shape is filled in here).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig

from encoder_service.checkpoint import load_state_dict, read_config
from encoder_service.config import EncoderConfig
from encoder_service.families import Preprocessed
from encoder_service.families.llava import LlavaInputs, unpadded_grid
from encoder_service.towers.base import Tower
from mmserve.transformers_compat import clip_vision_transformer
from mmserve.wire.chunks import torch_dtype

CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
# (vision tower prefix, projector prefix, projector layer names, image_newline key)
# The CLIP weights sit under `vision_model.` in hub checkpoints, directly under the prefix in
# ones saved by transformers 5; the original layout comes first as its prefix is the longest.
LAYOUTS = (
    ("model.vision_tower.vision_tower.", "model.mm_projector.", ("0", "2"), "model.image_newline"),
    ("vision_tower.", "multi_modal_projector.", ("linear_1", "linear_2"), "image_newline"),
    ("model.vision_tower.", "model.multi_modal_projector.", ("linear_1", "linear_2"),
     "model.image_newline"),
)


class LlavaVision(nn.Module):
    """Crops -> projected CLIP patch features (penultimate layer by default, CLS dropped)."""

    def __init__(self, vision_config: CLIPVisionConfig, hidden_size: int, feature_layer: int = -2,
                 drop_cls: bool = True) -> None:
        super().__init__()
        self.vision_tower = clip_vision_transformer(vision_config)
        # Layers past the selected one never influence the output, so they are not run.
        depth = vision_config.num_hidden_layers
        keep = feature_layer if feature_layer >= 0 else depth + 1 + feature_layer
        self.vision_tower.encoder.layers = self.vision_tower.encoder.layers[:keep]
        self.drop_cls = drop_cls
        width = vision_config.hidden_size
        self.projector = nn.Sequential(nn.Linear(width, hidden_size), nn.GELU(),
                                       nn.Linear(hidden_size, hidden_size))
        self.image_newline = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N, (S/14)^2, hidden]."""
        hidden = self.vision_tower(pixel_values).last_hidden_state
        return self.projector(hidden[:, 1:] if self.drop_cls else hidden)

    def merge(self, features: torch.Tensor, inputs: LlavaInputs, side: int) -> torch.Tensor:
        """Base features, then the unpadded grid row by row, each row ending in image_newline."""
        base, grid = features[0], features[1:]
        grid_h, grid_w = inputs.grid
        channels = grid.shape[-1]
        # [gh*gw, side*side, C] -> [gh*side, gw*side, C], crops placed row-major.
        grid = grid.view(grid_h, grid_w, side, side, channels).permute(0, 2, 1, 3, 4)
        grid = grid.reshape(grid_h * side, grid_w * side, channels)
        rows, cols = unpadded_grid(*inputs.image_size, grid_h, grid_w, side)
        top, left = (grid.shape[0] - rows) // 2, (grid.shape[1] - cols) // 2
        grid = grid[top:top + rows, left:left + cols]
        newline = self.image_newline.to(grid.device, grid.dtype).expand(rows, 1, channels)
        return torch.cat([base, torch.cat([grid, newline], dim=1).reshape(-1, channels)])


class LlavaTower(Tower):
    """LLaVA-1.6 vision tower. Crops are all S x S, so `encode` runs any crops (of several
    images, batched across requests); `merge` turns one image's crop features into its
    full, variable-length rows."""

    module: LlavaVision

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype, device: str = "cpu") -> None:
        config = read_config(checkpoint_dir)
        if "vision_config" in config:
            vision_config = CLIPVisionConfig(**config["vision_config"])
        else:
            vision_config = CLIPVisionConfig(**CLIP_L_336)
        layer = config.get("vision_feature_layer", config.get("mm_vision_select_layer", -2))
        strategy = config.get("vision_feature_select_strategy",
                              config.get("mm_vision_select_feature", "patch"))
        self.module = LlavaVision(vision_config, output_width(checkpoint_dir), layer,
                                  drop_cls=strategy in ("default", "patch"))
        # Not strict: the checkpoint also holds the layers past the selected one.
        missing = self.module.load_state_dict(_read_weights(checkpoint_dir),
                                              strict=False).missing_keys
        if missing:
            raise ValueError(f"checkpoint {checkpoint_dir} lacks {len(missing)} LLaVA vision "
                             f"tensors, e.g. {missing[:3]}")
        self.side = vision_config.image_size // vision_config.patch_size
        self.tokens_per_tile = self.side ** 2
        self.hidden_size = self.module.image_newline.shape[0]
        self.dtype = dtype
        self.device = torch.device(device)
        # float32 on CPU (half-precision CPU kernels are slow or missing), bfloat16 on GPUs.
        self.compute_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        self.module.to(self.device, self.compute_dtype).eval().requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Crops -> [N, tokens_per_tile, hidden] (before unpadding)."""
        with torch.inference_mode():
            rows = self.module(pixel_values.to(self.device, self.compute_dtype))
        return rows.to("cpu", self.dtype)

    def merge(self, tiles: torch.Tensor, prepared: Preprocessed) -> torch.Tensor:
        """One image's [1 + crops, 576, hidden] features -> its [576 + rows*cols + rows, hidden]
        rows, as the LLM consumes them."""
        if not isinstance(prepared, LlavaInputs):
            raise TypeError(f"LlavaTower merges LlavaInputs, got {type(prepared).__name__}")
        with torch.inference_mode():
            return self.module.merge(tiles, prepared, self.side)


def output_width(checkpoint_dir: str | Path) -> int:
    """The LLM hidden size the projector maps to."""
    config = read_config(checkpoint_dir)
    return int(config.get("text_config", {}).get("hidden_size") or config["hidden_size"])


def build(config: EncoderConfig) -> LlavaTower:
    return LlavaTower(config.checkpoint_dir, torch_dtype(config.dtype), config.device)


def _read_weights(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The tower's tensors under our module's names, from whichever layout the checkpoint has."""
    for vision_prefix, projector_prefix, (first, second), newline_key in LAYOUTS:
        try:
            vision = load_state_dict(checkpoint_dir, vision_prefix)
        except ValueError:
            continue
        projector = load_state_dict(checkpoint_dir, projector_prefix)
        newline = load_state_dict(checkpoint_dir, newline_key)[""]
        state = {f"vision_tower.{k.removeprefix('vision_model.')}": v for k, v in vision.items()}
        for ours, theirs in (("0", first), ("2", second)):
            for param in ("weight", "bias"):
                state[f"projector.{ours}.{param}"] = projector[f"{theirs}.{param}"]
        state["image_newline"] = newline
        return state
    raise ValueError(f"{checkpoint_dir} has no LLaVA vision tower (looked for "
                     f"{', '.join(layout[0] + '*' for layout in LAYOUTS)})")

