"""Turns rendered prompt text plus encoded media into engine input."""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.errors import InvalidRequest
from llm_service.prompt.template import MARKER_RE


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """How one media item appears in the token stream: prefix, N slots, suffix."""

    slot_token_id: int
    prefix: str = ""  # e.g. "<img>"
    suffix: str = ""  # e.g. "</img>"


@dataclass(frozen=True, slots=True)
class SlotRange:
    item: int  # media item index
    start: int  # first slot position in token_ids
    length: int


@dataclass(frozen=True, slots=True)
class Prompt:
    token_ids: list[int]
    slots: tuple[SlotRange, ...]


class PromptBuilder:
    def __init__(self, tokenizer, media_format: MediaFormat, add_bos: bool = False) -> None:
        self._tokenizer = tokenizer
        self._format = media_format
        self._bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []

    def count_media(self, text: str) -> int:
        return len(MARKER_RE.findall(text))

    def build(self, text: str, rows_per_item: list[int]) -> Prompt:
        """Tokenizes `text`, expanding the i-th marker into rows_per_item[i] slots."""
        pieces = MARKER_RE.split(text)  # text, index, text, index, ..., text
        markers = [int(i) for i in pieces[1::2]]
        if markers != list(range(len(rows_per_item))):
            raise InvalidRequest(
                f"prompt has media markers {markers} but {len(rows_per_item)} encoded items"
            )
        ids = list(self._bos)
        slots = []
        prefix = self._encode(self._format.prefix)
        suffix = self._encode(self._format.suffix)
        for n, piece in enumerate(pieces):
            if n % 2 == 0:
                ids += self._encode(piece)
                continue
            item = int(piece)
            ids += prefix
            slots.append(SlotRange(item=item, start=len(ids), length=rows_per_item[item]))
            ids += [self._format.slot_token_id] * rows_per_item[item]
            ids += suffix
        return Prompt(token_ids=ids, slots=tuple(slots))

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._tokenizer.encode(text, add_special_tokens=False)
