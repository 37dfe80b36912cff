"""Qwen-VL-Chat's vision tower (ViT-bigG + resampler) from the original checkpoint layout.

transformers has no native module for it, so this follows Qwen-VL's `visual.py`:
conv1 (no bias) -> + positional_embedding (16x16 grid, bicubic-resized to the patch
grid by `get_abs_pos`) -> ln_pre -> resblocks (pre-norm; `attn.in_proj` packs q, k, v
per head) -> Resampler (256 learned queries, 2D sin-cos positions, one
cross-attention over the kv_proj'd patches) -> ln_post -> @ proj. The keys are the
checkpoint's `transformer.visual.*` ones, unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from encoder_service.checkpoint import load_state_dict, read_config
from encoder_service.config import EncoderConfig
from encoder_service.towers.base import ModuleTower
from mmserve.wire.chunks import torch_dtype

PREFIX = "transformer.visual."
EPS = 1e-6  # every LayerNorm of the visual tower


def output_width(checkpoint_dir: str) -> int:
    """The resampler's output width, which is the LLM hidden size."""
    config = read_config(checkpoint_dir)
    width = int(config["visual"]["output_dim"])
    if config.get("hidden_size", width) != width:
        raise ValueError(f"visual.output_dim {width} != LLM hidden_size {config['hidden_size']}")
    return width


def get_abs_pos(abs_pos: torch.Tensor, tgt_len: int) -> torch.Tensor:
    """[L, C] positions on a square grid, bicubic-resized to a square grid of tgt_len."""
    src, tgt = int(math.sqrt(abs_pos.shape[0])), int(math.sqrt(tgt_len))
    if src == tgt:
        return abs_pos
    grid = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).flatten(0, 2).to(abs_pos.dtype)


def sincos_pos_embed_2d(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's 2D sin-cos table [grid^2, dim], row-major; as in the original, the first half
    encodes the column index and the second the row index."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim / 4))
    cols, rows = torch.meshgrid(torch.arange(grid_size, dtype=torch.float32),
                                torch.arange(grid_size, dtype=torch.float32), indexing="xy")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


class VisualAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        # The packed projection holds [q_h, k_h, v_h] per head h, not [q, k, v].
        mixed = self.in_proj(x).view(b, n, self.heads, 3 * (width // self.heads))
        q, k, v = (t.transpose(1, 2) for t in mixed.split(width // self.heads, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, width))


class ResidualBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=EPS)
        self.attn = VisualAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=EPS)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp_width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp_width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Resampler(nn.Module):
    """Learned queries cross-attend to the patches once: [B, L, kv_dim] -> [B, Q, dim]."""

    def __init__(self, queries: int, dim: int, heads: int, kv_dim: int) -> None:
        super().__init__()
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, int(math.sqrt(queries))))
        self.query = nn.Parameter(torch.zeros(queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(dim, eps=EPS)
        self.ln_kv = nn.LayerNorm(dim, eps=EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.ln_kv(self.kv_proj(x))
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)
        k = kv + get_abs_pos(self.pos_embed, x.shape[1])
        return self.attn(q, k, kv, need_weights=False)[0]


class QwenVisionTransformer(nn.Module):
    def __init__(self, visual: dict) -> None:
        super().__init__()
        width, patch = visual["width"], visual["patch_size"]
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.positional_embedding = nn.Parameter(torch.zeros(256, width))
        self.ln_pre = nn.LayerNorm(width, eps=EPS)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualBlock(width, visual["heads"], int(width * visual["mlp_ratio"]))
            for _ in range(visual["layers"]))
        dim = visual["output_dim"]
        self.attn_pool = Resampler(visual.get("n_queries", 256), dim, dim // 128, width)
        self.ln_post = nn.LayerNorm(dim, eps=EPS)
        self.proj = nn.Parameter(torch.zeros(dim, dim))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)
        x = self.ln_pre(x + get_abs_pos(self.positional_embedding, x.shape[1]))
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(self.attn_pool(x)) @ self.proj


class QwenVLTower(ModuleTower):
    """Qwen-VL-Chat's visual tower: each 448 image -> 256 rows of the LLM width."""

    def __init__(self, checkpoint_dir: str, dtype: torch.dtype, device: str = "cpu") -> None:
        config = read_config(checkpoint_dir)
        visual = config["visual"]
        self.image_size = visual["image_size"]
        self.hidden_size = output_width(checkpoint_dir)
        self.tokens_per_tile = visual.get("n_queries", 256)
        self.dtype = dtype
        self.device = torch.device(device)
        self.compute_dtype = (torch.float32 if self.device.type == "cpu"
                              else getattr(torch, config.get("torch_dtype", "bfloat16")))
        # Built without memory behind it; the checkpoint's tensors become the parameters.
        with torch.device("meta"):
            self.module = QwenVisionTransformer(visual)
        state = load_state_dict(checkpoint_dir, PREFIX)
        # The sin-cos table is a frozen parameter in the original; older exports may lack it.
        if "attn_pool.pos_embed" not in state:
            grid = int(math.sqrt(self.tokens_per_tile))
            state["attn_pool.pos_embed"] = sincos_pos_embed_2d(visual["output_dim"], grid)
        self.module.load_state_dict(state, strict=True, assign=True)
        self.module.to(self.device, self.compute_dtype).eval().requires_grad_(False)


def build(config: EncoderConfig) -> QwenVLTower:
    tower = QwenVLTower(config.checkpoint_dir, torch_dtype(config.dtype), config.device)
    if tower.image_size != config.image_size:
        raise ValueError(f"image_size {config.image_size} != the checkpoint's visual.image_size "
                         f"{tower.image_size}")
    return tower
