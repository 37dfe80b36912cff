"""Per-family prompt settings: which template, how media appears, BOS handling."""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.prompt.builder import MediaFormat, PromptBuilder
from llm_service.prompt.template import ChatTemplate, HFChatTemplate


@dataclass(frozen=True, slots=True)
class PromptFamily:
    template: ChatTemplate
    builder: PromptBuilder
    stop_token_ids: tuple[int, ...]


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise ValueError(f"the tokenizer has no {token!r} token")
    return int(token_id)


def _chatml(tokenizer) -> PromptFamily:
    # The checkpoint's own template. Media rows use <|endoftext|> as the slot id:
    # the ids never reach the model (the embeddings replace them) and the prefix
    # cache hashes slots by content hash, not by id.
    slot = _token_id(tokenizer, "<|endoftext|>")
    stops = {_token_id(tokenizer, "<|im_end|>")}
    if tokenizer.eos_token_id is not None:
        stops.add(int(tokenizer.eos_token_id))
    return PromptFamily(
        template=HFChatTemplate(tokenizer),
        builder=PromptBuilder(tokenizer, MediaFormat(slot_token_id=slot)),
        stop_token_ids=tuple(sorted(stops)),
    )


FAMILIES = {"smollm2": _chatml, "chatml": _chatml}


def load_family(name: str, tokenizer) -> PromptFamily:
    try:
        factory = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown prompt family {name!r}; known: {sorted(FAMILIES)}") from None
    return factory(tokenizer)
