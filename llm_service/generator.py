"""One generation request, end to end: prompt, media, engine, detokenization.

Transport-free: the gRPC servicer converts protobuf to `GenerateInput` and
`Chunk`s back; everything here is plain Python and torch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llm_service.admission import check_media_fit
from llm_service.encoder_client import EncoderClient
from llm_service.engine.detokenizer import IncrementalDetokenizer
from llm_service.engine.protocol import (
    EmbeddingSpan,
    EngineClient,
    EngineRequest,
    FinishReason,
    SamplingParams,
    TokenLogprob,
)
from llm_service.errors import InvalidRequest, Unavailable
from llm_service.prompt.families import PromptFamily
from llm_service.prompt.messages import MediaItem, Message, Modality, media_count
from llm_service.prompt.template import check_messages
from llm_service.prompt.tools import ToolFormat
from llm_service.tool_calls import Parsed, ToolCallDelta, ToolCallParser, ToolRequest
from mmserve.tracing import span
from mmserve.wire.media import EncodedItem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GenerateInput:
    request_id: str
    messages: list[Message] | None = None
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    priority: int = 0
    timeout: float | None = None
    tools: ToolRequest | None = None  # chat only: the functions the model may call
    tenant: str = ""  # whose media handles the request may name


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class LogprobEntry:
    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...]


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    logprobs: tuple[LogprobEntry, ...] = ()
    media_handles: tuple[str, ...] = ()  # on the first chunk: one handle per media item
    timings: Timings | None = None  # on the first chunk
    tool_calls: tuple[ToolCallDelta, ...] = ()
    made_tool_calls: bool = False  # with a finish reason: the choice ended in tool calls


@dataclass(frozen=True, slots=True)
class Timings:
    encode_ms: float  # the media's Encode calls (concurrent); 0 without media
    prefill_ms: float  # engine submission -> first token: queueing and prefill
    queue_ms: float = 0.0  # of that, waiting in the engine's queue


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request ready for the engine."""

    token_ids: list[int]
    spans: tuple[EmbeddingSpan, ...] = ()
    handles: tuple[str, ...] = ()  # one per media item
    encode_ms: float = 0.0


@dataclass(slots=True)
class _Choice:
    detok: IncrementalDetokenizer
    tools: ToolCallParser | None = None
    tokens: int = 0
    done: bool = False

    def parse(self, text: str, finished: bool) -> Parsed:
        """The text as plain text and tool-call deltas (all plain text without tools)."""
        if self.tools is None:
            return Parsed(text)
        parsed = self.tools.feed(text)
        if finished:
            rest = self.tools.finish()
            parsed.text += rest.text
            parsed.calls += rest.calls
        return parsed


class Generator:
    """Turns a GenerateInput into Chunks: prompt, media, the engine, detokenization, stop
    strings. The engine's hidden and vocabulary sizes are read from the engine itself."""

    def __init__(self, engine: EngineClient, tokenizer: Any, family: PromptFamily,
                 encoder: EncoderClient | None, max_media_items: int = 16) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._family = family
        self._encoder = encoder
        self._max_media_items = max_media_items

    @property
    def tool_format(self) -> ToolFormat:
        """The family's tool syntax (its calls' wrapper key names the arguments)."""
        return self._family.tools

    async def generate(self, inp: GenerateInput) -> AsyncIterator[Chunk]:
        started = time.monotonic()
        prepared = await self._prepare(inp)
        token_ids, spans, handles = prepared.token_ids, prepared.spans, prepared.handles
        submitted = time.monotonic()
        request = EngineRequest(
            request_id=inp.request_id,
            prompt_token_ids=token_ids,
            sampling=inp.sampling,
            spans=spans,
            eos_token_ids=() if inp.sampling.ignore_eos else self._family.stop_token_ids,
            priority=inp.priority,
        )
        tool_format = self._family.tools
        # A format whose markers are special tokens needs them in the text to find the calls.
        skip = inp.skip_special_tokens and not (inp.tools and tool_format.special_markers)
        choices = [
            _Choice(IncrementalDetokenizer(self._tokenizer, inp.stop, skip),
                    ToolCallParser(inp.tools, tool_format) if inp.tools else None)
            for _ in range(inp.sampling.n)
        ]
        first_token_at = None
        first = True  # the first chunk carries the handles and timings
        outputs = self._engine.generate(request)
        try:
            async for out in outputs:
                choice = choices[out.index]
                if choice.done:
                    continue  # this choice already ended on a stop string
                if first_token_at is None and out.new_token_ids:
                    first_token_at = time.monotonic()
                delta = choice.detok.add(out.new_token_ids)
                new_ids, entries = out.new_token_ids, out.logprobs
                # Tokens after a stop string (in an output that merged several) are not output.
                unused = len(new_ids) - delta.consumed
                choice.tokens = out.num_output_tokens - unused
                finish = out.finish_reason
                if out.error:
                    raise Unavailable(f"generation failed: {out.error}")
                if delta.stopped:
                    finish = FinishReason.STOP
                    new_ids, entries = new_ids[: delta.consumed], entries[: delta.consumed]
                    if out.finish_reason is None:  # free the choice's KV blocks now
                        await self._engine.finish(inp.request_id, out.index)
                text = delta.text
                if finish is not None and not delta.stopped:
                    text += choice.detok.finish().text
                usage = None
                if finish is not None:
                    choice.done = True
                    usage = Usage(len(token_ids), choice.tokens, out.num_cached_tokens)
                timings = None
                if first:
                    timings = Timings(prepared.encode_ms,
                                      ((first_token_at or submitted) - submitted) * 1e3,
                                      out.queue_time_s * 1e3)
                parsed = choice.parse(text, finish is not None)
                made_calls = finish is not None and choice.tools is not None \
                    and choice.tools.made_calls
                yield Chunk(out.index, parsed.text, list(new_ids), finish, usage,
                            self._logprobs(entries), handles if first else (), timings,
                            tuple(parsed.calls), made_calls)
                first = False
                if all(c.done for c in choices):
                    break
        finally:
            await outputs.aclose()  # aborts the engine request if it is still running
            log.debug("request %s prompt=%d completion=%s ttft_ms=%s total_ms=%.0f",
                      inp.request_id, len(token_ids), [c.tokens for c in choices],
                      None if first_token_at is None
                      else round((first_token_at - started) * 1e3),
                      (time.monotonic() - started) * 1e3)

    async def _prepare(self, inp: GenerateInput) -> Prepared:
        """Prompt token ids, embedding spans and the media items' handles."""
        if inp.messages is not None:
            return await self._prepare_chat(inp)
        if inp.prompt is not None:
            if not inp.prompt:
                raise InvalidRequest("prompt must not be empty")
            return Prepared(self._tokenizer.encode(inp.prompt))
        ids = list(inp.prompt_token_ids or [])
        if not ids:
            raise InvalidRequest("one of messages, prompt or prompt_token_ids is required")
        vocab_size = self._engine.vocab_size
        bad = [t for t in ids if t >= vocab_size]
        if bad:
            raise InvalidRequest(f"prompt_token_ids {bad[:5]} are outside the vocabulary "
                                 f"(size {vocab_size})")
        return Prepared(ids)

    async def _prepare_chat(self, inp: GenerateInput) -> Prepared:
        messages = inp.messages or []
        check_messages(messages)  # before spending encoder time
        media = [m for message in messages for m in message.media]
        count = sum(media_count(m) for m in media)
        if count > self._max_media_items:
            raise InvalidRequest(f"{count} media items in one request; the limit is "
                                 f"{self._max_media_items}")
        # A video becomes image frames, so it needs image support.
        wanted = {Modality.IMAGE if m.modality == Modality.VIDEO else m.modality for m in media}
        unsupported = wanted - self._family.modalities
        if unsupported:
            names = ", ".join(sorted(m.label for m in unsupported))
            raise InvalidRequest(f"this model does not accept {names} input")
        if media and self._encoder is None:
            raise InvalidRequest("this deployment has no encoder service; send text only")
        encode_started = time.monotonic()
        if media and self._encoder is not None:
            await check_media_fit(self._encoder, self._tokenizer, messages, media,
                                  self._engine.max_model_len, inp.request_id, inp.timeout,
                                  inp.tenant)
        with span("encode", items=len(media)):  # the encoder's spans are its children
            encoded = (await self._encoder.encode(media, inp.request_id, inp.timeout,
                                                  inp.tenant)
                       if self._encoder is not None and media else [])
        encode_ms = (time.monotonic() - encode_started) * 1e3 if media else 0.0
        text = self._family.render(messages, encoded, inp.tools.tools if inp.tools else ())
        slots = [item for items in encoded for item in items]
        prompt = self._family.builder.build(
            text, [(Modality.IMAGE if item.frame else part.modality, item.num_tokens)
                   for part, items in zip(media, encoded) for item in items])
        spans = tuple(EmbeddingSpan(start=s.start, embeddings=slots[s.item].embeddings,
                                    content_hash=slots[s.item].content_hash)
                      for s in prompt.slots)
        handles = tuple(h for part, items in zip(media, encoded) for h in _handles(part, items))
        return Prepared(prompt.token_ids, spans, handles, encode_ms)

    def _logprobs(self, entries: tuple[TokenLogprob, ...]) -> tuple[LogprobEntry, ...]:
        decode = self._tokenizer.decode
        return tuple(
            LogprobEntry(e.token_id, decode([e.token_id]), e.logprob,
                         tuple((t, decode([t]), lp) for t, lp in e.top))
            for e in entries
        )



def _handles(part: MediaItem, items: list[EncodedItem]) -> list[str]:
    """The handles a client can send back for a media part: one for a video file (its
    frames all name it), one per frame of a frame list, one for an image or audio clip."""
    if part.modality == Modality.VIDEO and not part.frames:
        return [items[0].handle]
    return [item.handle for item in items]
