"""Tiny random multimodal checkpoints, one directory per family in the family's original layout.

Each directory holds what the real hub checkpoint holds: config.json (the multimodal config
with the LLM's config nested the way the family nests it), safetensors weights for both the
vision/audio tower and the LLM, and a tokenizer carrying the family's special tokens.

The tokenizers are byte-level with no merges (Qwen-VL: a qwen.tiktoken of the 256 single
bytes plus two merges of byte pairs that never occur in the tests' text), so every ordinary
character of UTF-8 text is one token per byte and each special token is one token. That
makes the expected prompt lengths countable by hand.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import torch
from hf_layouts import internvit_state, megrez_tower_state, qwen_v1_state, qwen_visual_state
from safetensors.torch import save_file

SEED = 0
LLM = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6)
# Families whose resampler uses hidden // 128 heads need an LLM at least 128 wide.
WIDE_LLM = {**LLM, "hidden_size": 128}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)


def _rand_fn(seed: int):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.1):
        return torch.randn(*shape, generator=g) * scale

    return rand


# --- tokenizers -----------------------------------------------------------------------------

def byte_level_tokenizer(directory: Path, specials: list[str], *, bos: str | None = None,
                         eos: str, unk: str | None = None, pad: str | None = None,
                         add_bos: bool = False) -> int:
    """A tokenizer.json with the 256 byte symbols (no merges) plus `specials`; returns its size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE({ch: i for i, ch in enumerate(alphabet)}, [],
                                   unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if add_bos:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                        unk_token=unk, pad_token=pad or eos)
    tokenizer.save_pretrained(directory)
    return backend.get_vocab_size()


# Qwen's own tokenizer numbers these after the BPE ranks, in this order.
QWEN_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
                 + [f"<|extra_{i}|>" for i in range(205)]
                 + ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>",
                    "<imgpad>"])
QWEN_MERGES = (b"zq", b"qz")  # never occur in the tests' text


def qwen_tiktoken(directory: Path) -> int:
    """qwen.tiktoken: `base64(token) rank` per line; returns ranks + specials."""
    tokens = [bytes([b]) for b in range(256)] + list(QWEN_MERGES)
    lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
    (directory / "qwen.tiktoken").write_text("\n".join(lines) + "\n")
    return len(tokens) + len(QWEN_SPECIALS)


def _vocab(size: int) -> int:
    return (size + 63) // 64 * 64


# --- InternVL2 (InternVL2-1B style: InternViT + Qwen2) ---------------------------------------

INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                     "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNVIT = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, num_hidden_layers=2,
                 qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
                 layer_norm_eps=1e-6, image_size=448, patch_size=14, hidden_act="gelu")


def build_internvl2(directory: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(byte_level_tokenizer(directory, INTERNVL_SPECIALS, eos="<|im_end|>",
                                        pad="<|endoftext|>"))
    llm_config = Qwen2Config(**LLM, vocab_size=vocab, tie_word_embeddings=True)
    llm = Qwen2ForCausalLM(llm_config)
    _randomize(llm, SEED)
    state = {"language_model." + k: v for k, v in llm.state_dict().items()
             if k != "lm_head.weight"}
    state.update(internvit_state(_rand_fn(SEED + 1), INTERNVIT, 448, 14, LLM["hidden_size"]))
    save_file({k: v.contiguous() for k, v in state.items()},
              str(directory / "model.safetensors"))
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
              "downsample_ratio": 0.5, "ps_version": "v2", "select_layer": -1,
              "force_image_size": 448, "max_dynamic_patch": 12, "template": "Hermes-2",
              "torch_dtype": "float32", "llm_config": json.loads(llm_config.to_json_string()),
              "vision_config": INTERNVIT}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# --- Qwen-VL-Chat (ViT + 256-query resampler + Qwen v1 LLM) ---------------------------------

QWEN_VISUAL = dict(image_size=448, patch_size=14, width=32, heads=4, layers=2, mlp_ratio=2.5,
                   output_dim=WIDE_LLM["hidden_size"], n_queries=256, image_start_id=0)


def build_qwen_vl(directory: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(qwen_tiktoken(directory))
    dims = {**WIDE_LLM, "num_key_value_heads": WIDE_LLM["num_attention_heads"]}
    llm = Qwen2ForCausalLM(Qwen2Config(**dims, vocab_size=vocab, tie_word_embeddings=False))
    _randomize(llm, SEED)
    state = qwen_v1_state(llm.state_dict(), dims["num_hidden_layers"])
    state.update(qwen_visual_state(_rand_fn(SEED + 1), QWEN_VISUAL))
    save_file({k: t.contiguous() for k, t in state.items()}, str(directory / "model.safetensors"))
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen",
              "hidden_size": dims["hidden_size"], "num_attention_heads": dims["num_attention_heads"],
              "num_hidden_layers": dims["num_hidden_layers"],
              "intermediate_size": 2 * dims["intermediate_size"],
              "kv_channels": dims["hidden_size"] // dims["num_attention_heads"],
              "layer_norm_epsilon": dims["rms_norm_eps"], "rotary_emb_base": 10000,
              "seq_length": 2048, "max_position_embeddings": 8192, "vocab_size": vocab,
              "no_bias": True, "use_dynamic_ntk": True, "use_logn_attn": True,
              "tie_word_embeddings": False, "torch_dtype": "float32", "visual": QWEN_VISUAL}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# --- LLaVA-1.6 (llava-hf LlavaNext: CLIP-336 + llama/vicuna) --------------------------------

LLAVA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def build_llava(directory: Path) -> Path:
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    directory.mkdir(parents=True, exist_ok=True)
    size = byte_level_tokenizer(directory, ["<unk>", "<s>", "</s>", "<image>"], bos="<s>",
                                eos="</s>", unk="<unk>", pad="<unk>", add_bos=True)
    image_token = 256 + 3
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=336, patch_size=14,
                                       projection_dim=16),
        text_config=LlamaConfig(**LLM, vocab_size=_vocab(size), tie_word_embeddings=False),
        image_grid_pinpoints=LLAVA_PINPOINTS, image_token_index=image_token,
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(SEED)
    model = LlavaNextForConditionalGeneration(config).eval()
    _randomize(model, SEED)
    model.save_pretrained(directory)
    return directory


# --- Megrez-3B-Omni (SigLIP + resampler, Whisper audio, llama LLM under `llm.`) --------------

MEGREZ_SPECIALS = ["<|unk|>", "<|eos|>", "<|role_start|>", "<|role_end|>", "<|turn_end|>",
                   "<image>", "</image>", "<audio>", "</audio>"]
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
              image_size=980, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
WHISPER = dict(n_mels=16, n_ctx=1500, n_state=32, n_head=4, n_layer=2,
               output_dim=WIDE_LLM["hidden_size"])


def build_megrez(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(byte_level_tokenizer(directory, MEGREZ_SPECIALS, eos="<|eos|>", unk="<|unk|>",
                                        pad="<|eos|>"))
    llm_config = LlamaConfig(**WIDE_LLM, vocab_size=vocab, tie_word_embeddings=False)
    llm = LlamaForCausalLM(llm_config)
    _randomize(llm, SEED)
    state = {"llm." + k: v for k, v in llm.state_dict().items()}
    state.update(megrez_tower_state(_rand_fn(SEED + 1), SIGLIP, WIDE_LLM["hidden_size"],
                                    WHISPER))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    config = {**json.loads(llm_config.to_json_string()), "architectures": ["MegrezO"],
              "model_type": "megrezo", "query_num": 64, "drop_vision_last_layer": True,
              "vision_config": SIGLIP, "audio_config": WHISPER}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


BUILDERS = {"internvl2": build_internvl2, "qwen-vl-chat": build_qwen_vl,
            "llava-1.6": build_llava, "megrez-omni": build_megrez}
