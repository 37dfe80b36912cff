"""Helpers shared by tests in several directories (importable because tests/conftest.py puts
this directory on sys.path): checkpoint layouts written from a transformers model, and audio."""

from __future__ import annotations

import io
import math
import wave

import numpy as np
import torch


def qwen_v1_state(qwen2_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A Qwen2ForCausalLM's weights in the Qwen (v1) remote-code layout: transformer.h.N.attn
    .c_attn = [q; k; v] with bias, mlp.w2 is the SiLU-gated half and mlp.w1 the other."""
    state = {
        "transformer.wte.weight": qwen2_state["model.embed_tokens.weight"],
        "transformer.ln_f.weight": qwen2_state["model.norm.weight"],
        "lm_head.weight": qwen2_state["lm_head.weight"],
    }
    for i in range(layers):
        src, dst = f"model.layers.{i}.", f"transformer.h.{i}."
        for kind in ("weight", "bias"):
            state[dst + f"attn.c_attn.{kind}"] = torch.cat(
                [qwen2_state[src + f"self_attn.{p}_proj.{kind}"] for p in "qkv"])
        state[dst + "attn.c_proj.weight"] = qwen2_state[src + "self_attn.o_proj.weight"]
        state[dst + "mlp.w2.weight"] = qwen2_state[src + "mlp.gate_proj.weight"]
        state[dst + "mlp.w1.weight"] = qwen2_state[src + "mlp.up_proj.weight"]
        state[dst + "mlp.c_proj.weight"] = qwen2_state[src + "mlp.down_proj.weight"]
        state[dst + "ln_1.weight"] = qwen2_state[src + "input_layernorm.weight"]
        state[dst + "ln_2.weight"] = qwen2_state[src + "post_attention_layernorm.weight"]
    return state


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    """A mono 16-bit WAV file of a 440 Hz tone."""
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * math.pi * 440 * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()
