"""Reads an HF checkpoint directory (config.json + *.safetensors) into a DecoderLM.

InternVL-style checkpoints are read too: the LLM's config sits under `llm_config` (or
`text_config`) and its weights under a `language_model.` prefix; other weights are skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open

from llm_service.engine.cpu_tuning import can_prepack
from llm_service.engine.models import FAMILIES
from llm_service.engine.models.llama import DecoderLM, DecoderSpec, Family
from llm_service.engine.models.rope import RopeSpec

log = logging.getLogger(__name__)


def read_llm_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {model_dir}")
    cfg = json.loads(path.read_text())
    cfg = cfg.get("llm_config") or cfg.get("text_config") or cfg
    if cfg.get("model_type") == "qwen":
        return _qwen_as_llama(cfg)
    if cfg.get("model_type") == "megrezo":
        # Megrez-3B-Omni's LLM is a Llama-2-style decoder under `llm.`; its config is the top level.
        return {**cfg, "model_type": "llama"}
    return cfg


def _qwen_as_llama(cfg: dict) -> dict:
    """Qwen (v1) config keys in Llama terms. Positions stay within seq_length, where the
    original's dynamic NTK and log-n attention scaling do not apply."""
    return {
        "model_type": "qwen", "architectures": cfg.get("architectures", []),
        "hidden_size": cfg["hidden_size"], "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg["num_attention_heads"],
        "head_dim": cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "intermediate_size": cfg["intermediate_size"] // 2,  # w1 and w2 are each half of it
        "vocab_size": cfg["vocab_size"], "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-6),
        "rope_theta": cfg.get("rotary_emb_base", 10000.0),
        "max_position_embeddings": cfg.get("seq_length", 2048),
        "tie_word_embeddings": cfg.get("tie_word_embeddings", False), "attention_bias": False,
    }


def family_of(cfg: dict) -> Family:
    names = [cfg.get("model_type", "")] + list(cfg.get("architectures") or [])
    for name in names:
        for family in FAMILIES.values():
            if name == family.model_type or name in family.architectures:
                return family
    raise ValueError(f"unsupported model (model_type={cfg.get('model_type')!r}, architectures="
                     f"{cfg.get('architectures')}); supported: {sorted(FAMILIES)}")


def read_spec(model_dir: Path) -> DecoderSpec:
    cfg = read_llm_config(model_dir)
    family = family_of(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (the Llama family uses 'silu')")
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    max_pos = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window:  # attention is exact (no window) as long as sequences stay inside it
        max_pos = min(max_pos, window)
    return DecoderSpec(
        family=family.model_type,
        hidden_size=cfg["hidden_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        intermediate_size=cfg["intermediate_size"],
        vocab_size=cfg["vocab_size"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope=RopeSpec.from_config(cfg, head_dim),
        max_position_embeddings=max_pos,
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
        qkv_bias=family.qkv_bias or cfg.get("attention_bias", cfg.get("bias", False)),
        o_bias=cfg.get("attention_bias", cfg.get("bias", False)),
        mlp_bias=cfg.get("mlp_bias", False),
    )


def llm_weight_name(name: str) -> str:
    """Strips the multimodal wrappers' prefixes from an LLM weight name."""
    if name.startswith("language_model."):
        return name[len("language_model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("llm."):
        return name[len("llm."):]
    return name


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype,
               max_len: int | None = None, prepack: int | None = None,
               keep_dense: bool = False, panels: bool = False) -> DecoderLM:
    """Builds the model on `device` in `dtype`; rope tables cover `max_len` positions.
    `prepack`: on CPU, move the projections to oneDNN's packed layout, tuned for steps of
    about this many rows, or with `panels` (the kernels loaded; fp32, or bf16 on AVX-512
    BF16) to mmserve::panel_linear's (the packed matmuls are much faster; see llama.Linear)."""
    spec = read_spec(model_dir)
    family = FAMILIES[spec.family]
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    with torch.device("meta"):
        model = DecoderLM(spec).to(dtype)  # no memory is touched before the weights arrive
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    filled = dict.fromkeys(params, 0)
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                target = family.map_name(llm_weight_name(name))
                if target is None or target[0] not in params:
                    continue  # vision tower, projector, a tied lm_head, rotary buffers
                param_name, shard, transform = target
                tensor = f.get_tensor(name)
                if transform is not None:
                    tensor = transform(tensor, spec)
                dest = params[param_name]
                if shard is not None:
                    dest = dest.narrow(0, *_shard_range(spec, shard))
                if dest.shape != tensor.shape:
                    raise ValueError(f"{name} in {file.name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(dest.shape)}")
                dest.copy_(tensor)
                filled[param_name] += tensor.numel()
    missing = [n for n, p in params.items() if filled[n] != p.numel()]
    if missing:
        raise ValueError(f"{model_dir} lacks {len(missing)} {spec.family} weights, "
                         f"e.g. {missing[:3]}")
    model.setup_rotary(max_len or spec.max_position_embeddings)
    if prepack and can_prepack(device, dtype):
        model.prepack(prepack, keep_dense, panels)
    elif prepack and device.type == "cpu":
        log.warning("%s projections stay unpacked: this CPU or torch build has no native %s "
                    "matmuls (float32 is faster here)", dtype, dtype)
    return model.eval()


def _shard_range(spec: DecoderSpec, shard: str) -> tuple[int, int]:
    """(first row, rows) of a part of a fused qkv or gate_up weight."""
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    return {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter),
            "up": (inter, inter)}[shard]
