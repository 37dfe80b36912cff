"""Megrez-3B-Omni's image side: NaViT SigLIP + a cross-attention Resampler (64 rows per slice),
and `MegrezTower`, which also carries the Whisper audio tower (towers/whisper.py).

The SigLIP is transformers' `Idefics2VisionTransformer`, whose layers run here on one
unpacked image (or a batch of same-size slices). The reference (vLLM `megrezo.py`, as
MiniCPM-V) packs each slice as a [3, 14, L*14] strip and takes the patch grid from
`tgt_sizes`; an unpacked image gives the same patches in the same order. The bucketed
position ids are computed here as the reference computes them: transformers 4.57 scales the
patch coordinates by (1 - 1e-6) first and lands in a different bucket on some grids.

Checkpoint names follow the reference: `vision.vpm.*` (SigLIP), `vision.resampler.*`,
`audio.audio.*`; `drop_vision_last_layer` drops SigLIP's last layer as the reference does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from encoder_service.checkpoint import load_state_dict, read_config
from encoder_service.config import EncoderConfig
from encoder_service.families import Preprocessed
from encoder_service.families.audio import AudioFeatures
from encoder_service.families.megrez import QUERY_NUM, MegrezImageInputs
from encoder_service.towers.base import Tower
from encoder_service.towers.whisper import WhisperAudioEncoder
from mmserve.wire.chunks import torch_dtype

VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")


def sincos_pos_embed_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """[height, width, dim] fixed positions: first half encodes the column, second the row
    (MiniCPM-V's get_2d_sincos_pos_embed, version 2.5)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    cols, rows = np.meshgrid(np.arange(width, dtype=np.float32),
                             np.arange(height, dtype=np.float32))
    return torch.from_numpy(np.concatenate([encode(cols), encode(rows)], axis=-1)).float()


def bucketed_position_ids(height: int, width: int, per_side: int) -> torch.Tensor:
    """NaViT position ids of an (height, width) patch grid on the per_side x per_side table:
    each patch's fractional row and column, bucketed (vLLM's Idefics2 with tgt_sizes)."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)
    rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / height), boundaries, right=True)
    cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / width), boundaries, right=True)
    return (rows[:, None] * per_side + cols).flatten()


class Resampler(nn.Module):
    """64 learned queries attend over the slice's patch features (+ 2D sincos positions on keys)."""

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int,
                 num_queries: int = QUERY_NUM) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = (nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim
                        else nn.Identity())
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[N, h*w, kv_dim] features of same-size slices on an (h, w) patch grid -> [N, 64, D]."""
        pos = sincos_pos_embed_2d(self.query.shape[1], *grid).flatten(0, 1).to(x)
        x = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).expand(x.shape[0], -1, -1)
        out = self.attn(q, x + pos, x, need_weights=False)[0]
        return self.ln_post(out) @ self.proj


class MegrezVision(nn.Module):
    def __init__(self, vision_config: Idefics2VisionConfig, hidden_size: int,
                 drop_last_layer: bool) -> None:
        super().__init__()
        self.vpm = Idefics2VisionTransformer(vision_config)
        if drop_last_layer:
            self.vpm.encoder.layers = self.vpm.encoder.layers[:-1]
        self.resampler = Resampler(hidden_size, vision_config.hidden_size, hidden_size // 128)
        self.patch_size = vision_config.patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Same-size images in 0..255 [N, 3, H, W] -> [N, 64, hidden]."""
        grid = (pixels.shape[2] // self.patch_size, pixels.shape[3] // self.patch_size)
        embeddings = self.vpm.embeddings
        x = embeddings.patch_embedding((pixels - 127.5) / 127.5).flatten(2).transpose(1, 2)
        ids = bucketed_position_ids(*grid, embeddings.num_patches_per_side).to(x.device)
        x = x + embeddings.position_embedding(ids)[None]
        features = self.vpm.post_layernorm(self.vpm.encoder(inputs_embeds=x).last_hidden_state)
        return self.resampler(features, grid)


class MegrezTower(Tower):
    """Images -> 64 rows per source/slice; audio (when the checkpoint has it) -> span rows.

    Source and slices differ in size and audio is no tile, so items do not share tower
    calls: `encode_item` takes one item's preprocessed inputs (families/megrez.py).
    """

    batches_tiles = False

    def __init__(self, checkpoint_dir: str | Path, dtype: torch.dtype, device: str = "cpu") -> None:
        config = read_config(checkpoint_dir)
        vision_config = Idefics2VisionConfig(
            **{k: v for k, v in config["vision_config"].items() if k in VISION_KEYS})
        self.vision = MegrezVision(vision_config, output_width(checkpoint_dir),
                                   bool(config.get("drop_vision_last_layer", False)))
        state = {f"vpm.{k}": v for k, v in _load(checkpoint_dir, "vision.vpm.", "vpm.").items()}
        state.update({f"resampler.{k}": v for k, v in
                      _load(checkpoint_dir, "vision.resampler.", "resampler.").items()})
        # Not strict: a dropped last layer stays in the checkpoint.
        missing = self.vision.load_state_dict(state, strict=False).missing_keys
        if missing:
            raise ValueError(f"checkpoint {checkpoint_dir} lacks {len(missing)} Megrez vision "
                             f"tensors, e.g. {missing[:3]}")
        self.audio = None
        if "audio_config" in config:
            self.audio = WhisperAudioEncoder.from_config(config["audio_config"])
            self.audio.load_reference_state(_load(checkpoint_dir, "audio.audio.", "audio."))
        self.hidden_size = self.vision.resampler.query.shape[1]
        self.dtype = dtype
        self.tokens_per_tile = QUERY_NUM
        self.device = torch.device(device)
        # float32 on CPU (half-precision CPU kernels are slow or missing), bfloat16 on GPUs.
        self.compute_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        for module in (self.vision, self.audio):
            if module is not None:
                module.to(self.device, self.compute_dtype).eval().requires_grad_(False)

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Same-size images in 0..255 -> [N, 64, hidden]."""
        with torch.inference_mode():
            rows = self.vision(pixel_values.to(self.device, self.compute_dtype))
        return rows.to("cpu", self.dtype)

    def encode_item(self, prepared: Preprocessed) -> torch.Tensor:
        """Image: source then slices -> [64 * (1 + n), hidden]; audio -> [span, hidden]."""
        inputs = prepared
        if isinstance(inputs, AudioFeatures):
            if self.audio is None:
                raise ValueError("this Megrez checkpoint has no audio tower")
            with torch.inference_mode():
                return self.audio(inputs).to("cpu", self.dtype)
        if not isinstance(inputs, MegrezImageInputs):
            raise TypeError(f"MegrezTower takes Megrez images or audio, "
                            f"got {type(inputs).__name__}")
        parts = [inputs.source] + ([inputs.slices] if inputs.slices is not None else [])
        return torch.cat([self.encode(part).flatten(0, 1) for part in parts])


def output_width(checkpoint_dir: str | Path) -> int:
    """The LLM hidden size (the resampler's width and the audio projection's output)."""
    config = read_config(checkpoint_dir)
    width = int(config["hidden_size"])
    audio_width = config.get("audio_config", {}).get("output_dim", width)
    if audio_width != width:
        raise ValueError(f"audio_config.output_dim {audio_width} != hidden_size {width}")
    return width


def build(config: EncoderConfig) -> MegrezTower:
    return MegrezTower(config.checkpoint_dir, torch_dtype(config.dtype), config.device)


def _load(checkpoint_dir: str | Path, *prefixes: str) -> dict[str, torch.Tensor]:
    """The tensors under the first prefix present in the checkpoint."""
    for prefix in prefixes:
        try:
            return load_state_dict(checkpoint_dir, prefix)
        except ValueError:
            continue
    raise ValueError(f"checkpoint {checkpoint_dir} has no tensors under {' or '.join(prefixes)}")
