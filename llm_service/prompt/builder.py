"""Turns rendered prompt text plus encoded media into engine input."""

from __future__ import annotations

from dataclasses import dataclass

from llm_service.errors import InvalidRequest
from llm_service.prompt.messages import Modality
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
    def __init__(self, tokenizer, formats: dict[Modality, MediaFormat],
                 add_bos: bool | None = None) -> None:
        """add_bos None: add BOS exactly when the tokenizer itself adds one to plain text."""
        self._tokenizer = tokenizer
        self._formats = formats
        if add_bos is None:
            add_bos = tokenizer.bos_token_id is not None and (
                tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
        self._bos = [tokenizer.bos_token_id] if add_bos else []
        self._affixes = {m: (self._encode(f.prefix), self._encode(f.suffix))
                         for m, f in formats.items()}

    @property
    def modalities(self) -> frozenset[Modality]:
        return frozenset(self._formats)

    def count_media(self, text: str) -> int:
        return len(MARKER_RE.findall(text))

    def build(self, text: str, items: list[tuple[Modality, int]]) -> Prompt:
        """Tokenizes `text`, expanding the i-th marker into items[i] = (modality, rows) slots."""
        pieces = MARKER_RE.split(text)  # text, index, text, index, ..., text
        markers = [int(i) for i in pieces[1::2]]
        if markers != list(range(len(items))):
            raise InvalidRequest(f"prompt has media markers {markers} but {len(items)} "
                                 f"encoded items")
        ids = list(self._bos)
        slots = []
        for n, piece in enumerate(pieces):
            if n % 2 == 0:
                ids += self._encode(piece)
                continue
            item = int(piece)
            modality, rows = items[item]
            if modality not in self._formats:
                raise InvalidRequest(f"this model does not accept {modality.name.lower()} input")
            prefix, suffix = self._affixes[modality]
            ids += prefix
            slots.append(SlotRange(item=item, start=len(ids), length=rows))
            ids += [self._formats[modality].slot_token_id] * rows
            ids += suffix
        return Prompt(token_ids=ids, slots=tuple(slots))

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        return self._tokenizer.encode(text, add_special_tokens=False)
