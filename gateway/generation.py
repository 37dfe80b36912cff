"""One Generate call as the HTTP side sees it.

Whatever ends the HTTP request (the last chunk, an error, the client going
away) ends the gRPC call too, so the LLM engine frees the request's KV cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
from starlette.types import Receive

from gateway.errors import ClientDisconnected, from_rpc_error
from gateway.llm_client import LLMClient, llm_pb2
from gateway.llm_streams import StreamCall
from gateway.protocol import FinishReason, PromptTokensDetails, Usage
from gateway.request_record import RequestRecord

FINISH_REASONS: dict[int, FinishReason] = {
    llm_pb2.FINISH_REASON_STOP: "stop",
    llm_pb2.FINISH_REASON_LENGTH: "length",
    llm_pb2.FINISH_REASON_ABORT: "abort",
    llm_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


# The request's media items as `mm://sha256:` handles, in order, comma-separated: a later turn
# may send a handle in place of the item's bytes.
MEDIA_HANDLES_HEADER = "X-Media-Handles"
# The LLM service's own durations up to the first token (W3C Server-Timing, milliseconds):
# encode (the media's Encode calls) and prefill (queueing and prefill in the engine).
SERVER_TIMING_HEADER = "Server-Timing"


@dataclass(slots=True)
class ChoiceOutput:
    """One choice of a finished generation."""

    text: str = ""
    logprobs: list[llm_pb2.TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # The choice's tool calls, each its streamed deltas concatenated.
    tool_calls: list[llm_pb2.ToolCall] = field(default_factory=list)

    def add_tool_call_delta(self, delta: llm_pb2.ToolCallDelta) -> None:
        while len(self.tool_calls) <= delta.index:
            self.tool_calls.append(llm_pb2.ToolCall())
        call = self.tool_calls[delta.index]
        call.id += delta.id
        call.name += delta.name
        call.arguments += delta.arguments


class Generation:
    """A started Generate call: its responses in order, usage summed over choices,
    TTFT and token counts written to the request record.

    `close()` must be called when the HTTP side is done with it; it cancels the
    call if it is still running and is safe to call more than once.
    """

    def __init__(self, call: grpc.aio.UnaryStreamCall | StreamCall, receive: Receive,
                 record: RequestRecord) -> None:
        self._call = call
        self._record = record
        self._client_gone = False
        self._first: llm_pb2.GenerateResponse | None = None
        self._prompt_tokens = 0
        self._cached_tokens = 0
        self._completion_tokens = 0
        self.media_handles: list[str] = []  # one `mm://sha256:` handle per media item
        self.server_timing = ""  # the Server-Timing header, from the first response
        self._watcher = asyncio.create_task(self._cancel_on_disconnect(receive))

    @classmethod
    async def start(cls, llm: LLMClient, request: llm_pb2.GenerateRequest, receive: Receive,
                    record: RequestRecord, tenant: str = "") -> Generation:
        """Opens the call and waits for its first response, so that a request the
        LLM service rejects still gets its proper HTTP status."""
        record.request_id = request.request_id
        generation = cls(llm.generate(request, tenant), receive, record)
        try:
            generation._first = await generation._read()
        except BaseException:
            generation.close()
            raise
        return generation

    async def responses(self) -> AsyncIterator[llm_pb2.GenerateResponse]:
        """Every response, the first included. Raises APIError when the call
        fails and ClientDisconnected when the client went away."""
        response, self._first = self._first, None
        while response is not None:
            yield response
            response = await self._read()

    async def collect(self, n: int) -> list[ChoiceOutput]:
        """Runs the generation to its end and returns the n choices."""
        choices = [ChoiceOutput() for _ in range(n)]
        try:
            async for response in self.responses():
                choice = choices[response.index]
                choice.text += response.text
                choice.logprobs.extend(response.logprobs)
                for delta in response.tool_calls:
                    choice.add_tool_call_delta(delta)
                if response.finish_reason:
                    choice.finish_reason = FINISH_REASONS[response.finish_reason]
        finally:
            self.close()
        return choices

    @property
    def headers(self) -> dict[str, str]:
        """Response headers known once the call has started (the first response is in)."""
        headers = {SERVER_TIMING_HEADER: self.server_timing} if self.server_timing else {}
        if self.media_handles:
            headers[MEDIA_HANDLES_HEADER] = ", ".join(self.media_handles)
        return headers

    @property
    def usage(self) -> Usage:
        details = PromptTokensDetails(cached_tokens=self._cached_tokens)
        return Usage(prompt_tokens=self._prompt_tokens, completion_tokens=self._completion_tokens,
                     total_tokens=self._prompt_tokens + self._completion_tokens,
                     prompt_tokens_details=details)

    def close(self) -> None:
        self._watcher.cancel()
        self._call.cancel()

    async def _read(self) -> llm_pb2.GenerateResponse | None:
        try:
            response = await self._call.read()
        except asyncio.CancelledError:
            if self._client_gone:
                raise ClientDisconnected() from None
            raise
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        if response is grpc.aio.EOF:
            return None
        self._note(response)
        return response

    def _note(self, response: llm_pb2.GenerateResponse) -> None:
        if response.media_handles:
            self.media_handles = list(response.media_handles)
        if response.HasField("timings"):
            t = response.timings
            self.server_timing = f"encode;dur={t.encode_ms:.1f}, prefill;dur={t.prefill_ms:.1f}"
        if self._record.ttft_s is None and (response.text or response.token_ids):
            self._record.ttft_s = time.perf_counter() - self._record.started
        if response.HasField("usage"):
            # Each choice reports usage on its last message: the prompt is shared
            # by all choices, the completions add up.
            usage = response.usage
            self._prompt_tokens = max(self._prompt_tokens, usage.prompt_tokens)
            self._cached_tokens = max(self._cached_tokens, usage.cached_tokens)
            self._completion_tokens += usage.completion_tokens
            self._record.prompt_tokens = self._prompt_tokens
            self._record.completion_tokens = self._completion_tokens

    async def _cancel_on_disconnect(self, receive: Receive) -> None:
        # The body has been read by now, so the next message the server has
        # for us is the disconnect.
        while (await receive())["type"] != "http.disconnect":
            pass
        self._client_gone = True
        self._call.cancel()
