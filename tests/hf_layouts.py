"""Helpers shared by tests in several directories (importable because tests/conftest.py puts
this directory on sys.path): checkpoint layouts (LLMs and towers in their original keys),
written once for the unit, integration and e2e tiers, and audio."""

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


# --- Tower checkpoints in the original layouts, shared by the unit, integration and e2e
# tiers. `rand(*shape)` draws the values, so each caller keeps its own seed and scale.

def make_rand(seed: int, scale: float = 0.1):
    """rand(*shape, scale=...) -> N(0, scale^2) values from a private generator."""
    g = torch.Generator().manual_seed(seed)
    default = scale

    def rand(*shape: int, scale: float | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * (default if scale is None else scale)

    return rand


def whisper_reference_state(rand, n_mels: int, n_ctx: int, n_state: int, n_layer: int,
                            output_dim: int, **_: object) -> dict[str, torch.Tensor]:
    """A Megrez/Qwen-Audio Whisper encoder in OpenAI Whisper names (`blocks.N.attn.query`,
    `mlp.0`, ...), as Megrez checkpoints store it under `audio.audio.`."""
    state = {"conv1.weight": rand(n_state, n_mels, 3), "conv1.bias": rand(n_state),
             "conv2.weight": rand(n_state, n_state, 3), "conv2.bias": rand(n_state),
             "positional_embedding": rand(n_ctx, n_state),  # ignored: recomputed
             "ln_post.weight": 1 + rand(n_state), "ln_post.bias": rand(n_state),
             "proj.weight": rand(output_dim, n_state), "proj.bias": rand(output_dim),
             "audio_bos_eos_token.weight": rand(2, output_dim)}
    for i in range(n_layer):
        p = f"blocks.{i}."
        for name in ("query", "value", "out"):
            state[p + f"attn.{name}.weight"] = rand(n_state, n_state)
            state[p + f"attn.{name}.bias"] = rand(n_state)
        state[p + "attn.key.weight"] = rand(n_state, n_state)
        for ln in ("attn_ln", "mlp_ln"):
            state[p + f"{ln}.weight"] = 1 + rand(n_state)
            state[p + f"{ln}.bias"] = rand(n_state)
        state[p + "mlp.0.weight"] = rand(4 * n_state, n_state)
        state[p + "mlp.0.bias"] = rand(4 * n_state)
        state[p + "mlp.2.weight"] = rand(n_state, 4 * n_state)
        state[p + "mlp.2.bias"] = rand(n_state)
    return state


def megrez_tower_state(rand, vision: dict, hidden: int, audio: dict | None,
                       queries: int = 64) -> dict[str, torch.Tensor]:
    """Megrez-3B-Omni's towers as its checkpoints hold them: `vision.vpm.*` (SigLIP in
    transformers' Idefics2 names), `vision.resampler.*`, `audio.audio.*` (OpenAI names)."""
    # Module paths that transformers 4.57 and 5 both have.
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    with torch.device("meta"):  # shapes only
        vpm = Idefics2VisionTransformer(Idefics2VisionConfig(**vision))
    state = {f"vision.vpm.{k}": (1 + rand(*v.shape)) if "norm" in k else rand(*v.shape)
             for k, v in vpm.state_dict().items()}
    width = vision["hidden_size"]
    for name, shape in {"query": (queries, hidden), "kv_proj.weight": (hidden, width),
                        "attn.in_proj_weight": (3 * hidden, hidden),
                        "attn.in_proj_bias": (3 * hidden,),
                        "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,),
                        "proj": (hidden, hidden)}.items():
        state[f"vision.resampler.{name}"] = rand(*shape)
    for ln in ("ln_q", "ln_kv", "ln_post"):
        state[f"vision.resampler.{ln}.weight"] = 1 + rand(hidden)
        state[f"vision.resampler.{ln}.bias"] = rand(hidden)
    if audio is not None:
        state.update({f"audio.audio.{k}": v
                      for k, v in whisper_reference_state(rand, **audio).items()})
    return state


def internvit_state(rand, vision: dict, image_size: int, patch: int,
                    llm_hidden: int) -> dict[str, torch.Tensor]:
    """InternVL2's vision side in its original keys: `vision_model.*` (fused qkv, ls1/ls2,
    optional qk norms and RMS norms as the 6B tower has them) and the `mlp1.*` projector."""
    d, inner = vision["hidden_size"], vision["intermediate_size"]
    grid = image_size // patch
    e = "vision_model.embeddings."
    state = {e + "class_embedding": rand(1, 1, d),
             e + "patch_embedding.weight": rand(d, 3, patch, patch, scale=0.05),
             e + "patch_embedding.bias": rand(d),
             e + "position_embedding": rand(1, grid * grid + 1, d)}
    for n in range(vision["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{n}."
        state.update({p + "attn.qkv.weight": rand(3 * d, d), p + "attn.proj.weight": rand(d, d),
                      p + "attn.proj.bias": rand(d), p + "ls1": 1 + rand(d),
                      p + "ls2": 1 + rand(d), p + "mlp.fc1.weight": rand(inner, d),
                      p + "mlp.fc1.bias": rand(inner), p + "mlp.fc2.weight": rand(d, inner),
                      p + "mlp.fc2.bias": rand(d)})
        if vision.get("qkv_bias", True):
            state[p + "attn.qkv.bias"] = rand(3 * d)
        if vision.get("qk_normalization", False):
            state[p + "attn.q_norm.weight"] = 1 + rand(d)
            state[p + "attn.k_norm.weight"] = 1 + rand(d)
        for norm in ("norm1", "norm2"):
            state[f"{p}{norm}.weight"] = 1 + rand(d)
            if vision.get("norm_type", "layer_norm") == "layer_norm":
                state[f"{p}{norm}.bias"] = rand(d)
    state.update({"mlp1.0.weight": 1 + rand(4 * d), "mlp1.0.bias": rand(4 * d),
                  "mlp1.1.weight": rand(llm_hidden, 4 * d), "mlp1.1.bias": rand(llm_hidden),
                  "mlp1.3.weight": rand(llm_hidden, llm_hidden), "mlp1.3.bias": rand(llm_hidden)})
    return state


def qwen_visual_state(rand, visual: dict) -> dict[str, torch.Tensor]:
    """Qwen-VL's visual tower under `transformer.visual.` (ViT, then the one-layer
    cross-attention resampler with `n_queries` queries); without the sin-cos table, which
    older exports lack and the loader computes."""
    width, patch, out = visual["width"], visual["patch_size"], visual["output_dim"]
    queries, mlp = visual.get("n_queries", 256), int(visual["width"] * visual["mlp_ratio"])
    v = "transformer.visual."
    state = {v + "conv1.weight": rand(width, 3, patch, patch, scale=0.05),
             v + "positional_embedding": rand(256, width),
             v + "ln_pre.weight": 1 + rand(width), v + "ln_pre.bias": rand(width),
             v + "ln_post.weight": 1 + rand(out), v + "ln_post.bias": rand(out),
             v + "proj": rand(out, out, scale=out ** -0.5),
             v + "attn_pool.query": rand(queries, out),
             v + "attn_pool.kv_proj.weight": rand(out, width),
             v + "attn_pool.attn.in_proj_weight": rand(3 * out, out, scale=0.05),
             v + "attn_pool.attn.in_proj_bias": rand(3 * out),
             v + "attn_pool.attn.out_proj.weight": rand(out, out, scale=0.05),
             v + "attn_pool.attn.out_proj.bias": rand(out)}
    for name in ("ln_q", "ln_kv"):
        state[f"{v}attn_pool.{name}.weight"] = 1 + rand(out)
        state[f"{v}attn_pool.{name}.bias"] = rand(out)
    for n in range(visual["layers"]):
        p = f"{v}transformer.resblocks.{n}."
        state.update({p + "ln_1.weight": 1 + rand(width), p + "ln_1.bias": rand(width),
                      p + "ln_2.weight": 1 + rand(width), p + "ln_2.bias": rand(width),
                      p + "attn.in_proj.weight": rand(3 * width, width),
                      p + "attn.in_proj.bias": rand(3 * width),
                      p + "attn.out_proj.weight": rand(width, width),
                      p + "attn.out_proj.bias": rand(width),
                      p + "mlp.c_fc.weight": rand(mlp, width), p + "mlp.c_fc.bias": rand(mlp),
                      p + "mlp.c_proj.weight": rand(width, mlp),
                      p + "mlp.c_proj.bias": rand(width)})
    return state
