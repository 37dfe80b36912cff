"""Loads a checkpoint's tokenizer without running any code shipped with the checkpoint.

- `tokenizer.json` (most HF checkpoints): the fast tokenizer as is.
- `qwen.tiktoken` (Qwen-VL-Chat): the tiktoken ranks converted to a fast BPE tokenizer,
  with Qwen's special tokens numbered after the ranks as its own tokenizer does.
- `tokenizer.model` (InternLM2 and other SentencePiece checkpoints whose tokenizer class is
  remote code): a Llama-style SentencePiece tokenizer plus the added tokens from
  tokenizer_config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmserve.transformers_compat import load_fast_tokenizer, tiktoken_backend

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIALS = (
    ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    + [f"<|extra_{i}|>" for i in range(205)]
    + ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"]
)


def load_tokenizer(model_dir: str | Path):
    model_dir = Path(model_dir)
    if (model_dir / "qwen.tiktoken").is_file():
        return _qwen_tiktoken(model_dir / "qwen.tiktoken")
    if (model_dir / "tokenizer.json").is_file() or not (model_dir / "tokenizer.model").is_file():
        return load_fast_tokenizer(model_dir)
    return _sentencepiece(model_dir)


def _qwen_tiktoken(path: Path):
    from transformers import PreTrainedTokenizerFast

    backend = tiktoken_backend(str(path), QWEN_PATTERN, QWEN_SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def _sentencepiece(model_dir: Path):
    # The checkpoint names a remote-code tokenizer class; its SentencePiece model and
    # added tokens load as a Llama tokenizer, which is what that class wraps.
    from transformers import LlamaTokenizer

    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return LlamaTokenizer.from_pretrained(model_dir,
                                          add_bos_token=config.get("add_bos_token", True),
                                          add_eos_token=config.get("add_eos_token", False))
