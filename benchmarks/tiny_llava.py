"""A tiny random LLaVA-1.6 checkpoint in the llava-hf layout that both mmserve and vLLM load.

The weights are random and small (a 2-layer CLIP-336-shaped tower, a 4-layer Llama), so a
request costs what the serving path around the model costs: decoding, anyres preprocessing,
the tower, moving ~2,000 embedding rows, prefill. The tokenizer is SmolLM2's (ChatML template)
with an `<image>` token added; the processor files are transformers' own, as llava-hf ships them.
"""

from __future__ import annotations

from pathlib import Path

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write(directory: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Writes the checkpoint (config, safetensors, tokenizer, processor) into `directory`."""
    import torch
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                              LlavaNextForConditionalGeneration, LlavaNextImageProcessor,
                              LlavaNextProcessor)

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=336, patch_size=14,
                                       projection_dim=64),
        text_config=LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                num_attention_heads=4, num_key_value_heads=2,
                                vocab_size=len(tokenizer), max_position_embeddings=4096,
                                tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>")),
        image_grid_pinpoints=PINPOINTS, image_token_index=image_token,
        vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.02 * torch.randn_like(p) if "norm" in name
                    else 0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(image_grid_pinpoints=PINPOINTS,
                                                crop_size={"height": 336, "width": 336},
                                                size={"shortest_edge": 336}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def mmserve_config(directory: Path) -> dict:
    """The model YAML sections serving it with mmserve (both services read them)."""
    return {
        "model": {"name": "tiny-llava-1.6", "family": "llava-chatml"},
        "llm": {"checkpoint": str(directory), "max_media_items": 4},
        "engine": {"kind": "torch", "dtype": "float32", "device": "cpu",
                   "kv_cache_bytes": 1024**3, "max_num_seqs": 64,
                   "max_num_batched_tokens": 2048},
        "encoder": {"family": "llava-1.6", "tower": "torch", "checkpoint": str(directory),
                    "hidden_size": 128, "dtype": "float32", "device": "cpu"},
    }
