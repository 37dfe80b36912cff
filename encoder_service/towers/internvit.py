"""InternVL2's vision side from an original InternVL2 checkpoint directory.

InternViT runs on transformers' `InternVLVisionModel`: the 300M tower (layer norm)
and the 6B tower (RMS norm + qk normalisation over the full width, as the original
`InternAttention` normalises q and k before splitting heads) are both its configs.
The original keys (`vision_model.encoder.layers.N.attn.qkv`, `ls1`, `norm1`, ...)
are renamed onto it, with the fused qkv split into q/k/v. The rest follows
`InternVLChatModel.extract_feature`: hidden state of `select_layer`, drop CLS,
pixel shuffle (v2), then `mlp1` (LayerNorm, Linear, GELU, Linear).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import InternVLVisionConfig, InternVLVisionModel

from encoder_service.checkpoint import load_state_dict, read_config, take
from encoder_service.config import EncoderConfig
from encoder_service.towers.base import ModuleTower
from encoder_service.towers.demo import pixel_shuffle
from mmserve.wire.chunks import torch_dtype

_LAYER_RENAMES = {"attn.proj.": "attention.projection_layer.", "attn.q_norm.": "attention.q_norm.",
                  "attn.k_norm.": "attention.k_norm.", "norm1.": "layernorm_before.",
                  "norm2.": "layernorm_after.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}


def output_width(checkpoint_dir: str) -> int:
    """The LLM hidden size mlp1 projects to."""
    return int(read_config(checkpoint_dir)["llm_config"]["hidden_size"])


def vision_config(config: dict, num_layers: int) -> InternVLVisionConfig:
    """transformers' config for the original `vision_config`, cut to `num_layers` layers."""
    vision = config["vision_config"]
    image_size = config.get("force_image_size") or vision["image_size"]
    return InternVLVisionConfig(
        hidden_size=vision["hidden_size"], num_hidden_layers=num_layers,
        num_attention_heads=vision["num_attention_heads"],
        intermediate_size=vision["intermediate_size"], hidden_act=vision.get("hidden_act", "gelu"),
        attention_bias=vision.get("qkv_bias", True),
        use_qk_norm=vision.get("qk_normalization", False),
        norm_type=vision.get("norm_type", "layer_norm"),
        layer_norm_eps=vision.get("layer_norm_eps", 1e-6),
        image_size=image_size, patch_size=vision["patch_size"],
        use_mean_pooling=True)  # no norm after the last layer, as in the original


def kept_layers(select_layer: int, num_layers: int) -> int:
    """Layers to run so that the last one's output is hidden_states[select_layer]."""
    kept = select_layer if select_layer >= 0 else num_layers + 1 + select_layer
    if not 1 <= kept <= num_layers:
        raise ValueError(f"select_layer {select_layer} is out of range for {num_layers} layers")
    return kept


def rename_vision_keys(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Original InternViT keys (prefix `vision_model.` stripped) -> InternVLVisionModel keys.

    Layers past `num_layers` are dropped (they do not contribute to select_layer).
    """
    out = {"embeddings.cls_token": take(state, "embeddings.class_embedding"),
           "embeddings.position_embeddings": take(state, "embeddings.position_embedding"),
           "embeddings.patch_embeddings.projection.weight":
               take(state, "embeddings.patch_embedding.weight"),
           "embeddings.patch_embeddings.projection.bias":
               take(state, "embeddings.patch_embedding.bias")}
    for n in range(num_layers):
        src, dst = f"encoder.layers.{n}.", f"encoder.layer.{n}."
        for part in ("weight", "bias"):
            if f"{src}attn.qkv.{part}" in state:
                q, k, v = take(state, f"{src}attn.qkv.{part}").chunk(3, dim=0)
                out.update({f"{dst}attention.q_proj.{part}": q, f"{dst}attention.k_proj.{part}": k,
                            f"{dst}attention.v_proj.{part}": v})
        out[f"{dst}lambda_1"] = take(state, f"{src}ls1")
        out[f"{dst}lambda_2"] = take(state, f"{src}ls2")
        for key, value in state.items():
            for old, new in _LAYER_RENAMES.items():
                if key.startswith(src + old):
                    out[dst + new + key[len(src + old):]] = value
    return out


class InternVisionProjector(nn.Module):
    """InternViT + pixel shuffle + mlp1: tiles -> LLM-width rows."""

    def __init__(self, config: dict, num_layers: int) -> None:
        super().__init__()
        self.downsample_ratio = config.get("downsample_ratio", 0.5)
        self.vision_model = InternVLVisionModel(vision_config(config, num_layers))
        width = config["vision_config"]["hidden_size"] * int(1 / self.downsample_ratio) ** 2
        llm_width = config["llm_config"]["hidden_size"]
        self.mlp1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm_width), nn.GELU(),
                                  nn.Linear(llm_width, llm_width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vit_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:, :]
        side = int(vit_embeds.shape[1] ** 0.5)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], side, side, -1)
        vit_embeds = pixel_shuffle(vit_embeds, self.downsample_ratio)
        vit_embeds = vit_embeds.reshape(vit_embeds.shape[0], -1, vit_embeds.shape[-1])
        return self.mlp1(vit_embeds)


class InternViTTower(ModuleTower):
    """InternVL2 vision tower + projector loaded from the original checkpoint layout."""

    def __init__(self, checkpoint_dir: str, dtype: torch.dtype, device: str = "cpu") -> None:
        config = read_config(checkpoint_dir)
        if config.get("ps_version", "v2") != "v2":
            raise ValueError(f"ps_version {config['ps_version']!r} is not supported (InternVL2 "
                             f"checkpoints use v2)")
        vision = config["vision_config"]
        num_layers = kept_layers(config.get("select_layer", -1), vision["num_hidden_layers"])
        self.image_size = config.get("force_image_size") or vision["image_size"]
        patches = (self.image_size // vision["patch_size"]) ** 2
        self.tokens_per_tile = int(patches * config.get("downsample_ratio", 0.5) ** 2)
        self.hidden_size = config["llm_config"]["hidden_size"]
        self.dtype = dtype
        self.device = torch.device(device)
        # float32 on CPU (half-precision CPU kernels are slow or missing); the checkpoint's
        # dtype on GPUs.
        self.compute_dtype = (torch.float32 if self.device.type == "cpu"
                              else getattr(torch, config.get("torch_dtype", "bfloat16")))
        # Built without memory behind it; the checkpoint's tensors become the parameters.
        with torch.device("meta"):
            self.module = InternVisionProjector(config, num_layers)
        vision_state = load_state_dict(checkpoint_dir, "vision_model.")
        self.module.vision_model.load_state_dict(rename_vision_keys(vision_state, num_layers),
                                                 assign=True)
        self.module.mlp1.load_state_dict(load_state_dict(checkpoint_dir, "mlp1."), assign=True)
        if vision.get("qk_normalization", False):
            # The original's q/k norms use the config's epsilon, transformers' a fixed 1e-6.
            for layer in self.module.vision_model.encoder.layer:
                layer.attention.q_norm.variance_epsilon = vision.get("layer_norm_eps", 1e-6)
                layer.attention.k_norm.variance_epsilon = vision.get("layer_norm_eps", 1e-6)
        self.module.to(self.device, self.compute_dtype).eval().requires_grad_(False)


def build(config: EncoderConfig) -> InternViTTower:
    tower = InternViTTower(config.checkpoint_dir, torch_dtype(config.dtype), config.device)
    if tower.image_size != config.image_size:
        raise ValueError(f"image_size {config.image_size} != the checkpoint's tile size "
                         f"{tower.image_size} (force_image_size)")
    return tower
