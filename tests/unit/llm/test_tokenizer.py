"""Tokenizers load from each on-disk format without running checkpoint code."""

from __future__ import annotations

import base64
import json

import pytest

from llm_service.tokenizer import QWEN_SPECIALS, load_tokenizer


def test_qwen_tiktoken_ranks_and_special_ids(tmp_path):
    ranks = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b" wo"]
    (tmp_path / "qwen.tiktoken").write_text(
        "".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks)))
    tok = load_tokenizer(tmp_path)
    n = len(ranks)
    # Special ids follow the ranks in Qwen's order: <|endoftext|> first, <imgpad> last.
    assert tok.convert_tokens_to_ids("<|endoftext|>") == n
    assert tok.convert_tokens_to_ids("<|im_end|>") == n + 2
    assert tok.convert_tokens_to_ids("<img>") == n + len(QWEN_SPECIALS) - 3
    assert tok.convert_tokens_to_ids("<imgpad>") == n + len(QWEN_SPECIALS) - 1
    ids = tok.encode("hello world 北京<|im_end|>", add_special_tokens=False)
    assert ids[0] == ranks.index(b"hello")
    assert ids[-1] == n + 2
    assert tok.decode(ids) == "hello world 北京<|im_end|>"


def test_sentencepiece_with_remote_tokenizer_class(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["hello world this is a tiny corpus"] * 50 + ["北京是中国的首都"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=320,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], byte_fallback=True,
        character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    ids = tok("hello <|im_end|>")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert ids[1:] == reference.encode("hello <|im_end|>")


def test_hf_tokenizer_json(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
