"""Tiny random checkpoints saved in each family's real HF layout, with a transformers reference.

InternLM2 has no transformers class. Its reference is the conversion to Llama: a random
LlamaForCausalLM is written out in InternLM2's remote-code layout (`model.tok_embeddings`,
`attention.wqkv` grouped per KV head as [q..q, k, v], `attention.wo`, `feed_forward.w1/w2/w3`,
`attention_norm`, `ffn_norm`, `output`), interleaving q, k, v the way de-interleaving wqkv undoes
it. The engine loads that checkpoint and must match the LlamaForCausalLM. The interleaving here
is written independently of the engine's loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_layouts import qwen_v1_state
from safetensors.torch import save_file
from transformers import (LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

VOCAB = 320
DIMS = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=256,
            rms_norm_eps=1e-6)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that logits differ clearly (HF's init gives near-uniform logits)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.15 * noise)


def _reference(family: str, seed: int, **overrides):
    if family in ("llama", "internlm2"):
        cfg = LlamaConfig(**DIMS, tie_word_embeddings=family == "llama", **overrides)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(**DIMS, tie_word_embeddings=True, **overrides)
        model = Qwen2ForCausalLM(cfg)
    elif family == "qwen":  # Qwen (v1) computes what Qwen2 does with full multi-head attention
        dims = {**DIMS, "num_key_value_heads": DIMS["num_attention_heads"]}
        model = Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=False, **overrides))
    elif family == "phi3":
        cfg = Phi3Config(**DIMS, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                         **overrides)
        model = Phi3ForCausalLM(cfg)
    else:
        raise ValueError(family)
    _randomize(model, seed)
    return model.eval()


def _interleave_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int):
    """The InternLM2 layout: for each KV head, its query heads, then its key, then its value."""
    hd = k.shape[0] // kv_heads
    groups = []
    for h in range(kv_heads):
        per_group = q.shape[0] // kv_heads
        groups += [q[h * per_group:(h + 1) * per_group], k[h * hd:(h + 1) * hd],
                   v[h * hd:(h + 1) * hd]]
    return torch.cat(groups)


def _internlm2_state(llama_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    state = {
        "model.tok_embeddings.weight": llama_state["model.embed_tokens.weight"],
        "model.norm.weight": llama_state["model.norm.weight"],
        "output.weight": llama_state["lm_head.weight"],
    }
    for i in range(layers):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        state[dst + "attention.wqkv.weight"] = _interleave_wqkv(
            *(llama_state[src + f"self_attn.{x}_proj.weight"] for x in "qkv"),
            DIMS["num_key_value_heads"])
        state[dst + "attention.wo.weight"] = llama_state[src + "self_attn.o_proj.weight"]
        state[dst + "feed_forward.w1.weight"] = llama_state[src + "mlp.gate_proj.weight"]
        state[dst + "feed_forward.w3.weight"] = llama_state[src + "mlp.up_proj.weight"]
        state[dst + "feed_forward.w2.weight"] = llama_state[src + "mlp.down_proj.weight"]
        state[dst + "attention_norm.weight"] = llama_state[src + "input_layernorm.weight"]
        state[dst + "ffn_norm.weight"] = llama_state[src + "post_attention_layernorm.weight"]
    return state


def _qwen_state(qwen2_state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The Qwen (v1) layout, plus a vision weight the engine must skip."""
    return {**qwen_v1_state(qwen2_state, layers),
            "transformer.visual.conv1.weight": torch.zeros(8, 3, 2, 2)}


QWEN_CONFIG = {
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen",
    "hidden_size": DIMS["hidden_size"], "num_attention_heads": DIMS["num_attention_heads"],
    "num_hidden_layers": DIMS["num_hidden_layers"],
    "intermediate_size": 2 * DIMS["intermediate_size"], "kv_channels": 16,
    "layer_norm_epsilon": DIMS["rms_norm_eps"], "rotary_emb_base": 10000, "seq_length": 256,
    "max_position_embeddings": 8192, "vocab_size": VOCAB, "no_bias": True,
    "use_dynamic_ntk": True, "use_logn_attn": True, "visual": {"image_size": 448},
}

INTERNLM2_CONFIG = {
    "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
    "hidden_act": "silu", "rope_theta": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": False, **DIMS,
}


def save_checkpoint(directory: Path, family: str, seed: int = 0, wrapped: bool | str = False,
                    **overrides):
    """Writes a checkpoint of `family` into `directory`; returns the transformers reference.

    wrapped: InternVL layout (config under `llm_config`, weights under `language_model.`,
    plus vision weights the engine must skip).
    """
    directory.mkdir(parents=True, exist_ok=True)
    reference = _reference(family, seed, **overrides)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    if family == "internlm2":
        state = _internlm2_state(state, DIMS["num_hidden_layers"])
        config = dict(INTERNLM2_CONFIG)
    elif family == "qwen":
        state = _qwen_state(state, DIMS["num_hidden_layers"])
        config = dict(QWEN_CONFIG)
    else:
        config = json.loads(reference.config.to_json_string())
        if reference.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
    if wrapped == "megrez":  # LLM under `llm.`, its config at the top level (UNCONFIRMED layout)
        state = {"llm." + k: v for k, v in state.items()}
        state["vision.resampler.query"] = torch.zeros(4, 8)
        config = {**config, "architectures": ["MegrezO"], "model_type": "megrezo"}
    elif wrapped:
        state = {"language_model." + k: v for k, v in state.items()}
        state["vision_model.embeddings.patch.weight"] = torch.zeros(8, 3, 2, 2)
        state["mlp1.0.weight"] = torch.ones(8)
        config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
                  "llm_config": config, "vision_config": {"hidden_size": 8}}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return reference
