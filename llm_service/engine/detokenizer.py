"""Incremental, byte-correct detokenization with stop strings.

Token-by-token decoding breaks multi-byte UTF-8 characters (one Chinese
character can span several byte-level tokens) and merges spaces differently
from a one-shot decode. We decode a short window of recent tokens and only emit
text once it no longer ends in an incomplete character, the scheme used by
vLLM and TGI. Stop strings are held back until they can no longer match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

_REPLACEMENT = "\ufffd"


@dataclass(slots=True)
class Delta:
    text: str
    stopped: bool = False  # a stop string matched; text is cut before it
    consumed: int = 0  # of the tokens given to add(): how many it used (all unless stopped)


@dataclass(slots=True)
class IncrementalDetokenizer:
    tokenizer: Any  # a Hugging Face tokenizer (decode(ids, skip_special_tokens=...))
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _pending: str = ""  # decoded text held back for stop-string matching
    _emitted: str = ""

    def add(self, token_ids: list[int]) -> Delta:
        """Appends tokens and returns the text that is now safe to stream. With stop strings,
        tokens are taken one at a time and those after a match are left unused."""
        if not self.stop:
            for token_id in token_ids:
                self._ids.append(token_id)
                self._pending += self._decode_step()
            delta = self._release(final=False)
            delta.consumed = len(token_ids)
            return delta
        texts = []
        for used, token_id in enumerate(token_ids, start=1):
            self._ids.append(token_id)
            self._pending += self._decode_step()
            delta = self._release(final=False)
            texts.append(delta.text)
            if delta.stopped:
                return Delta("".join(texts), stopped=True, consumed=used)
        return Delta("".join(texts), consumed=len(token_ids))

    def finish(self) -> Delta:
        """Flushes held-back text at the end of generation."""
        tail = self._decode(self._ids[self._prefix_offset:])
        head = self._decode(self._ids[self._prefix_offset:self._read_offset])
        self._pending += tail[len(head):]
        self._read_offset = len(self._ids)
        return self._release(final=True)

    @property
    def text(self) -> str:
        return self._emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decode_step(self) -> str:
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            new = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return new
        return ""

    def _release(self, final: bool) -> Delta:
        for stop in self.stop:
            at = (self._emitted + self._pending).find(stop, max(0, len(self._emitted) - len(stop)))
            if at >= 0:
                out = (self._emitted + self._pending)[len(self._emitted):at]
                self._emitted += out
                self._pending = ""
                return Delta(out, stopped=True)
        hold = 0 if final else self._partial_stop_len()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self._emitted += out
        return Delta(out)

    def _partial_stop_len(self) -> int:
        """Length of the longest pending suffix that is a proper prefix of a stop string."""
        text = self._emitted + self._pending
        best = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return min(best, len(self._pending))
