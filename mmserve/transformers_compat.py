"""Where transformers 4.57 and 5.x differ, for the few classes mmserve drives directly.

mmserve runs on both lines: 5.x by default, 4.57 inside NVIDIA's TensorRT-LLM 1.2 container
(which pins it, and whose `tensorrt_llm` shares the process with our engine module). Every
difference is detected from the installed classes, not from version numbers, and lives here:

- `CLIPVisionModel` wraps a `CLIPVisionTransformer` under `.vision_model` in 4.57; in 5.x the
  model is the transformer itself. `clip_vision_transformer` returns the inner module, whose
  parameter names are the same in both.
- `WhisperEncoderLayer.forward` takes a required `layer_head_mask` and returns a tuple in 4.57,
  a tensor in 5.x: `run_whisper_layer`.
- `TikTokenConverter` names its special-token argument `additional_special_tokens` in 4.57,
  `extra_special_tokens` in 5.x: `tiktoken_backend`.
- A tokenizer saved by 5.x names the class `TokenizersBackend`, which 4.57 lacks; the same
  `tokenizer.json` loads as `PreTrainedTokenizerFast` there: `load_fast_tokenizer`.
- From a GGUF file, 4.57 builds a Llama tokenizer that prepends BOS and takes its EOS from
  the GGUF metadata (`<|im_start|>` for the embedded SmolLM2); 5.x adds no BOS and uses the
  model's EOS: `match_gguf_tokenizer` makes the 4.57 one behave like the 5.x one.
"""

from __future__ import annotations

import inspect
import json
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

GENERIC_TOKENIZER = "TokenizersBackend"  # what 5.x writes for a plain tokenizer.json


def clip_vision_transformer(config: Any) -> nn.Module:
    """A CLIP vision tower with children `embeddings`, `pre_layrnorm`, `encoder`,
    `post_layernorm` (checkpoint names without a `vision_model.` prefix)."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(config)
    return getattr(model, "vision_model", model)


@cache
def _whisper_layer_takes_head_mask() -> bool:
    from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

    return "layer_head_mask" in inspect.signature(WhisperEncoderLayer.forward).parameters


def run_whisper_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One `WhisperEncoderLayer` without an attention mask; returns the hidden states."""
    if _whisper_layer_takes_head_mask():
        out = layer(hidden, attention_mask=None, layer_head_mask=None)
    else:
        out = layer(hidden, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def tiktoken_backend(vocab_file: str, pattern: str, special_tokens: list[str]) -> Any:
    """A `tokenizers.Tokenizer` from tiktoken ranks, the special tokens numbered after them."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    params = inspect.signature(TikTokenConverter.__init__).parameters
    key = ("extra_special_tokens" if "extra_special_tokens" in params
           else "additional_special_tokens")
    return TikTokenConverter(vocab_file=vocab_file, pattern=pattern,
                             **{key: special_tokens}).converted()


def load_fast_tokenizer(model_dir: str | Path) -> Any:
    """`AutoTokenizer.from_pretrained`, except that a tokenizer saved by 5.x as its generic
    `TokenizersBackend` loads from `tokenizer.json` where that class does not exist (4.57)."""
    import transformers

    model_dir = Path(model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if (config.get("tokenizer_class") == GENERIC_TOKENIZER
            and not hasattr(transformers, GENERIC_TOKENIZER)
            and (model_dir / "tokenizer.json").is_file()):
        return transformers.PreTrainedTokenizerFast.from_pretrained(model_dir)
    return transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)


def match_gguf_tokenizer(tokenizer: Any, eos_token_id: int) -> None:
    """No BOS prepended, EOS = the model config's id, whichever line loaded the GGUF."""
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_token_id)
    if getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False
