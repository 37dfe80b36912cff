"""Rotary position embeddings: the HF rope types the Llama family uses, as one cos/sin table."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    theta: float = 10000.0
    rope_type: str = "default"
    rotary_dim: int = 0  # leading dims of each head that rotate (partial_rotary_factor)
    factor: float | None = None  # linear, llama3, longrope
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 0  # llama3, longrope
    short_factor: tuple[float, ...] = ()  # longrope
    long_factor: tuple[float, ...] = ()  # longrope
    attention_factor: float | None = None  # longrope; None: derived from factor
    max_position_embeddings: int = 0

    @staticmethod
    def from_config(cfg: dict, head_dim: int) -> RopeSpec:
        """Reads transformers 5 `rope_parameters` as well as older `rope_theta`, `rope_scaling`."""
        params = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
        rope_type = params.get("rope_type", params.get("type", "default"))
        rope_type = {"su": "longrope"}.get(rope_type, rope_type)
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: {ROPE_TYPES})")
        partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        max_pos = cfg.get("max_position_embeddings", 2048)
        return RopeSpec(
            theta=float(params.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            rotary_dim=int(head_dim * partial),
            factor=params.get("factor"),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            # Phi-3 keeps it at the top level, which wins (as in transformers); Llama 3.1 nests it.
            original_max_position_embeddings=int(
                cfg.get("original_max_position_embeddings")
                or params.get("original_max_position_embeddings", max_pos)),
            short_factor=tuple(params.get("short_factor") or ()),
            long_factor=tuple(params.get("long_factor") or ()),
            attention_factor=params.get("attention_factor"),
            max_position_embeddings=max_pos,
        )


def _inv_freq(spec: RopeSpec, ext_factors: tuple[float, ...] = ()) -> torch.Tensor:
    dim = spec.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    if ext_factors:  # longrope
        return 1.0 / (torch.tensor(ext_factors, dtype=torch.float32) * spec.theta**exponents)
    inv_freq = 1.0 / (spec.theta**exponents)
    factor = spec.factor or 1.0
    if spec.rope_type == "linear":
        return inv_freq / factor
    if spec.rope_type == "llama3":
        old_len = spec.original_max_position_embeddings
        low_wavelen = old_len / spec.low_freq_factor
        high_wavelen = old_len / spec.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - spec.low_freq_factor) / (
            spec.high_freq_factor - spec.low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    # "dynamic" (NTK) only rescales past max_position_embeddings, which max_model_len never exceeds.
    return inv_freq


def _table(inv_freq: torch.Tensor, positions: torch.Tensor, scale: float):
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


class RotaryEmbedding:
    """cos/sin for every position up to max_len, looked up once per step and shared by layers."""

    def __init__(self, spec: RopeSpec, max_len: int, device: torch.device, dtype: torch.dtype):
        self.rotary_dim = spec.rotary_dim
        positions = torch.arange(max_len)
        if spec.rope_type == "longrope":
            old_len = spec.original_max_position_embeddings
            factor = spec.factor or spec.max_position_embeddings / old_len
            scale = spec.attention_factor or (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len)))
            # Positions past the original context rotate with the long factors.
            cos, sin = _table(_inv_freq(spec, spec.short_factor), positions, scale)
            if max_len > old_len:
                cos_l, sin_l = _table(_inv_freq(spec, spec.long_factor), positions, scale)
                cos[old_len:], sin[old_len:] = cos_l[old_len:], sin_l[old_len:]
        else:
            cos, sin = _table(_inv_freq(spec), positions, 1.0)
        self.cos = cos.to(device=device, dtype=dtype)
        self.sin = sin.to(device=device, dtype=dtype)

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin of shape [T, 1, rotary_dim]."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; rotates the first rotary_dim dims (HF rotate_half layout)."""
    rd = cos.shape[-1]
    rot = x[..., :rd]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    if rd == x.shape[-1]:
        return out
    return torch.cat((out, x[..., rd:]), dim=-1)
