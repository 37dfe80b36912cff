"""Structured outputs and logit_bias on the TensorRT-LLM executor.

The executor does guided decoding itself (`ExecutorConfig.guided_decoding_config`, with the
tokenizer's vocabulary, and `Request.guided_decoding_params` per request, compiled by its
XGrammar backend). Before a spec reaches it, llguidance checks it exactly as the torch
engine does, so a construct neither engine can enforce gets the same 400 on both (XGrammar
would silently drop some JSON Schema keywords). logit_bias becomes the request's
`embedding_bias`, a dense [vocab_size] fp32 row added to the logits.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from llm_service.engine.errors import InvalidRequest
from llm_service.engine.grammar import validate
from llm_service.engine.protocol import StructuredOutput

log = logging.getLogger(__name__)

LARK_REFUSED = ("structured output grammar: the TensorRT-LLM engine takes EBNF (GBNF) grammars "
                "only, rules written `name ::= ...` with a `root` rule; this looks like a Lark "
                "grammar: rewrite it as EBNF or use the torch engine")


def guided_decoding_config(b: ModuleType, tokenizer_dir: Path) -> tuple[Any, str | None]:
    """(GuidedDecodingConfig or None, why guided decoding is off) for the executor."""
    if not hasattr(b, "GuidedDecodingConfig"):
        return None, "this TensorRT-LLM binding has no guided decoding"
    try:
        from mmserve.transformers_compat import load_fast_tokenizer

        tokenizer = load_fast_tokenizer(tokenizer_dir)
    except Exception as exc:  # whatever the loader raises only turns structured outputs off
        return None, f"the tokenizer in {tokenizer_dir} did not load ({type(exc).__name__})"
    if not getattr(tokenizer, "is_fast", False):
        return None, f"the tokenizer in {tokenizer_dir} is not a fast (tokenizer.json) one"
    vocab = tokenizer.get_vocab()
    encoded_vocab = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    eos = tokenizer.eos_token_id
    config = b.GuidedDecodingConfig(
        backend=b.GuidedDecodingConfig.GuidedDecodingBackend.XGRAMMAR,
        encoded_vocab=encoded_vocab, tokenizer_str=tokenizer.backend_tokenizer.to_str(),
        stop_token_ids=[eos] if isinstance(eos, int) else None)
    return config, None


@functools.lru_cache(maxsize=256)
def _checked(spec: StructuredOutput) -> None:
    validate(spec)  # raises InvalidRequest; failures are not cached


def guided_params(b: ModuleType, spec: StructuredOutput) -> Any:
    """The request's GuidedDecodingParams; InvalidRequest naming what cannot be enforced."""
    kind, guide_type = spec.kind, b.GuidedDecodingParams.GuideType
    if kind == "grammar" and "::=" not in spec.spec:
        raise InvalidRequest(LARK_REFUSED)
    _checked(spec)
    if kind == "json_object":
        return b.GuidedDecodingParams(guide_type=guide_type.JSON)
    if kind == "json_schema":
        return b.GuidedDecodingParams(guide_type=guide_type.JSON_SCHEMA, guide=spec.spec)
    if kind == "regex":
        return b.GuidedDecodingParams(guide_type=guide_type.REGEX, guide=spec.spec)
    if kind == "choice":
        grammar = "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                           for c in spec.choices)
        return b.GuidedDecodingParams(guide_type=guide_type.EBNF_GRAMMAR, guide=grammar)
    return b.GuidedDecodingParams(guide_type=guide_type.EBNF_GRAMMAR, guide=spec.spec)


def embedding_bias(logit_bias: tuple[tuple[int, float], ...], vocab_size: int
                   ) -> torch.Tensor | None:
    """logit_bias as the executor's dense bias row (fp32, on the host), or None."""
    if not logit_bias:
        return None
    bias = torch.zeros(vocab_size, dtype=torch.float32)
    bias[[t for t, _ in logit_bias]] = torch.tensor([v for _, v in logit_bias])
    return bias
