"""Megrez's (Qwen-Audio style) Whisper audio encoder: log-mel -> `span` LLM-width rows.

conv1 (k3 p1) + GELU, conv2 (k3 s2 p1) + GELU, fixed sinusoidal positions, Whisper encoder
layers (transformers' native `WhisperEncoderLayer`), AvgPool1d(2), ln_post, a linear
projection to the LLM width, then the learned audio bos/eos rows around the result.

transformers' `WhisperEncoder.forward` insists on 3000 mel frames; the reference runs the
convolutions on the mel cut to `2 * after_cnn` frames, which changes the last frame's conv
context, so the layers are driven here on the cut mel. Reference checkpoints use OpenAI
Whisper names (`blocks.N.attn.query`, `mlp.0`, ...); `load_reference_state` maps them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

from encoder_service.families.audio import AudioFeatures
from mmserve.transformers_compat import run_whisper_layer

# OpenAI Whisper block names -> transformers WhisperEncoderLayer names.
BLOCK_NAMES = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
                "attn.value": "self_attn.v_proj", "attn.out": "self_attn.out_proj",
                "attn_ln": "self_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2",
                "mlp_ln": "final_layer_norm"}


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> torch.Tensor:
    """Whisper's fixed positions: [length, channels], sines then cosines."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class WhisperAudioEncoder(nn.Module):
    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int,
                 output_dim: int) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state), persistent=False)
        layer_config = WhisperConfig(d_model=n_state, encoder_attention_heads=n_head,
                                     encoder_ffn_dim=4 * n_state, activation_function="gelu",
                                     num_mel_bins=n_mels, max_source_positions=n_ctx)
        layer_config._attn_implementation = "sdpa"
        self.layers = nn.ModuleList(WhisperEncoderLayer(layer_config) for _ in range(n_layer))
        self.avg_pooler = nn.AvgPool1d(2, stride=2)
        self.ln_post = nn.LayerNorm(n_state)
        self.proj = nn.Linear(n_state, output_dim)
        self.audio_bos_eos_token = nn.Embedding(2, output_dim)

    @classmethod
    def from_config(cls, audio_config: dict[str, Any]) -> WhisperAudioEncoder:
        """From the checkpoint's `audio_config`: n_mels, n_ctx, n_state, n_head, n_layer,
        output_dim."""
        return cls(*(int(audio_config[key]) for key in
                     ("n_mels", "n_ctx", "n_state", "n_head", "n_layer", "output_dim")))

    def load_reference_state(self, state: dict[str, torch.Tensor]) -> None:
        """Loads OpenAI-Whisper-named tensors (the positions are recomputed, not loaded)."""
        mapped = {}
        for key, value in state.items():
            if key == "positional_embedding":
                continue
            if key.startswith("blocks."):
                _, index, rest = key.split(".", 2)
                name, param = rest.rsplit(".", 1)
                key = f"layers.{index}.{BLOCK_NAMES.get(name, name)}.{param}"
            mapped[key] = value
        self.load_state_dict(mapped, strict=True)

    def forward(self, features: AudioFeatures) -> torch.Tensor:
        """[n_mels, 2 * after_cnn] log-mel -> [span, output_dim]."""
        lengths = features.lengths
        x = features.mel[None, :, :2 * lengths.after_cnn].to(self.conv1.weight)
        x = F.gelu(self.conv2(F.gelu(self.conv1(x)))).transpose(1, 2)
        x = x + self.positional_embedding[:x.shape[1]].to(x)
        for layer in self.layers:
            x = run_whisper_layer(layer, x)
        x = self.avg_pooler(x.transpose(1, 2)).transpose(1, 2)
        x = self.proj(self.ln_post(x))[0, :lengths.tokens]
        bos, eos = self.audio_bos_eos_token.weight
        return torch.cat([bos[None], x, eos[None]])
