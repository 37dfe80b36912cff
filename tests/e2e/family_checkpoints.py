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
from hf_layouts import qwen_v1_state
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
    rand = _rand_fn(SEED + 1)
    d, inner, patch = INTERNVIT["hidden_size"], INTERNVIT["intermediate_size"], 14
    grid = 448 // patch
    e = "vision_model.embeddings."
    state.update({e + "class_embedding": rand(1, 1, d),
                  e + "patch_embedding.weight": rand(d, 3, patch, patch, scale=0.05),
                  e + "patch_embedding.bias": rand(d),
                  e + "position_embedding": rand(1, grid * grid + 1, d)})
    for n in range(INTERNVIT["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{n}."
        state.update({p + "attn.qkv.weight": rand(3 * d, d), p + "attn.qkv.bias": rand(3 * d),
                      p + "attn.proj.weight": rand(d, d), p + "attn.proj.bias": rand(d),
                      p + "ls1": 1 + rand(d), p + "ls2": 1 + rand(d),
                      p + "mlp.fc1.weight": rand(inner, d), p + "mlp.fc1.bias": rand(inner),
                      p + "mlp.fc2.weight": rand(d, inner), p + "mlp.fc2.bias": rand(d)})
        for norm in ("norm1", "norm2"):
            state[f"{p}{norm}.weight"] = 1 + rand(d)
            state[f"{p}{norm}.bias"] = rand(d)
    hidden = LLM["hidden_size"]
    state.update({"mlp1.0.weight": 1 + rand(4 * d), "mlp1.0.bias": rand(4 * d),
                  "mlp1.1.weight": rand(hidden, 4 * d), "mlp1.1.bias": rand(hidden),
                  "mlp1.3.weight": rand(hidden, hidden), "mlp1.3.bias": rand(hidden)})
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
    rand = _rand_fn(SEED + 1)
    width, patch, out = QWEN_VISUAL["width"], QWEN_VISUAL["patch_size"], QWEN_VISUAL["output_dim"]
    mlp, queries = int(width * QWEN_VISUAL["mlp_ratio"]), QWEN_VISUAL["n_queries"]
    v = "transformer.visual."
    state.update({v + "conv1.weight": rand(width, 3, patch, patch, scale=0.05),
                  v + "positional_embedding": rand(256, width),
                  v + "ln_pre.weight": 1 + rand(width), v + "ln_pre.bias": rand(width),
                  v + "ln_post.weight": 1 + rand(out), v + "ln_post.bias": rand(out),
                  v + "proj": rand(out, out, scale=out ** -0.5),
                  v + "attn_pool.query": rand(queries, out),
                  v + "attn_pool.kv_proj.weight": rand(out, width),
                  v + "attn_pool.attn.in_proj_weight": rand(3 * out, out, scale=0.05),
                  v + "attn_pool.attn.in_proj_bias": rand(3 * out),
                  v + "attn_pool.attn.out_proj.weight": rand(out, out, scale=0.05),
                  v + "attn_pool.attn.out_proj.bias": rand(out)})
    for name in ("ln_q", "ln_kv"):
        state[f"{v}attn_pool.{name}.weight"] = 1 + rand(out)
        state[f"{v}attn_pool.{name}.bias"] = rand(out)
    for n in range(QWEN_VISUAL["layers"]):
        p = f"{v}transformer.resblocks.{n}."
        state.update({p + "ln_1.weight": 1 + rand(width), p + "ln_1.bias": rand(width),
                      p + "ln_2.weight": 1 + rand(width), p + "ln_2.bias": rand(width),
                      p + "attn.in_proj.weight": rand(3 * width, width),
                      p + "attn.in_proj.bias": rand(3 * width),
                      p + "attn.out_proj.weight": rand(width, width),
                      p + "attn.out_proj.bias": rand(width),
                      p + "mlp.c_fc.weight": rand(mlp, width), p + "mlp.c_fc.bias": rand(mlp),
                      p + "mlp.c_proj.weight": rand(width, mlp), p + "mlp.c_proj.bias": rand(width)})
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
    from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = _vocab(byte_level_tokenizer(directory, MEGREZ_SPECIALS, eos="<|eos|>", unk="<|unk|>",
                                        pad="<|eos|>"))
    llm_config = LlamaConfig(**WIDE_LLM, vocab_size=vocab, tie_word_embeddings=False)
    llm = LlamaForCausalLM(llm_config)
    _randomize(llm, SEED)
    state = {"llm." + k: v for k, v in llm.state_dict().items()}
    torch.manual_seed(SEED)
    vpm = Idefics2VisionTransformer(Idefics2VisionConfig(**SIGLIP))
    _randomize(vpm, SEED + 2)
    state.update({f"vision.vpm.{k}": v for k, v in vpm.state_dict().items()})
    rand = _rand_fn(SEED + 1)
    hidden, width = WIDE_LLM["hidden_size"], SIGLIP["hidden_size"]
    for name, shape in {"query": (64, hidden), "kv_proj.weight": (hidden, width),
                        "attn.in_proj_weight": (3 * hidden, hidden),
                        "attn.in_proj_bias": (3 * hidden,),
                        "attn.out_proj.weight": (hidden, hidden), "attn.out_proj.bias": (hidden,),
                        "proj": (hidden, hidden)}.items():
        state[f"vision.resampler.{name}"] = rand(*shape)
    for ln in ("ln_q", "ln_kv", "ln_post"):
        state[f"vision.resampler.{ln}.weight"] = 1 + rand(hidden)
        state[f"vision.resampler.{ln}.bias"] = rand(hidden)
    # The audio tower in OpenAI Whisper names, under `audio.audio.`.
    mels, n_state, ctx = WHISPER["n_mels"], WHISPER["n_state"], WHISPER["n_ctx"]
    a = "audio.audio."
    state.update({a + "conv1.weight": rand(n_state, mels, 3), a + "conv1.bias": rand(n_state),
                  a + "conv2.weight": rand(n_state, n_state, 3), a + "conv2.bias": rand(n_state),
                  a + "positional_embedding": rand(ctx, n_state),
                  a + "ln_post.weight": 1 + rand(n_state), a + "ln_post.bias": rand(n_state),
                  a + "proj.weight": rand(hidden, n_state), a + "proj.bias": rand(hidden),
                  a + "audio_bos_eos_token.weight": rand(2, hidden)})
    for i in range(WHISPER["n_layer"]):
        p = f"{a}blocks.{i}."
        for name in ("query", "value", "out"):
            state[p + f"attn.{name}.weight"] = rand(n_state, n_state)
            state[p + f"attn.{name}.bias"] = rand(n_state)
        state[p + "attn.key.weight"] = rand(n_state, n_state)
        for ln in ("attn_ln", "mlp_ln"):
            state[p + f"{ln}.weight"] = 1 + rand(n_state)
            state[p + f"{ln}.bias"] = rand(n_state)
        state.update({p + "mlp.0.weight": rand(4 * n_state, n_state),
                      p + "mlp.0.bias": rand(4 * n_state),
                      p + "mlp.2.weight": rand(n_state, 4 * n_state), p + "mlp.2.bias": rand(n_state)})
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    config = {**json.loads(llm_config.to_json_string()), "architectures": ["MegrezO"],
              "model_type": "megrezo", "query_num": 64, "drop_vision_last_layer": True,
              "vision_config": SIGLIP, "audio_config": WHISPER}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


BUILDERS = {"internvl2": build_internvl2, "qwen-vl-chat": build_qwen_vl,
            "llava-1.6": build_llava, "megrez-omni": build_megrez}
