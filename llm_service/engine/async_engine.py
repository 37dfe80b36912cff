"""TorchEngine: the paged torch engine behind the async EngineClient interface.

The step loop (`engine_core.EngineCore`) runs in a process of its own (the default) or in a
thread (`EngineConfig.placement`). Requests, aborts and finished choices reach it as typed
messages; each step's outputs come back as one message, routed on the event loop to
per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import AsyncGenerator
from dataclasses import dataclass, replace

from llm_service.engine.config import EngineConfig
from llm_service.engine.core_messages import (
    Abort, Add, Failed, Finish, FromCore, Outputs, Rejected, Started, Stop)
from llm_service.engine.core_placement import CoreProcess, CoreThread
from llm_service.engine.errors import EngineDead, InvalidRequest, Overloaded
from llm_service.engine.protocol import (
    EngineClient, EngineOutput, EngineRequest, EngineStats, FinishReason)
from llm_service.engine.validation import Limits, validate_request

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Failed:
    """Ends a stream: every unfinished choice fails with this message."""

    message: str


# What a request's stream carries: a step's outputs, the end of a dead engine, or the
# error that refused the request.
_StreamItem = list[EngineOutput] | _Failed | Exception


class TorchEngine(EngineClient):
    """Paged-KV, continuously batching engine for Llama-family checkpoints, on CPU or CUDA.

        engine = TorchEngine(EngineConfig(model_dir=path))
        await engine.start()  # loads the model off the event loop, then starts the step loop
        async for out in engine.generate(EngineRequest("id", token_ids, SamplingParams())):
            ...  # one EngineOutput per choice per step; out.index is the choice
        await engine.shutdown()

    Use it from the event loop that started it. `hidden_size`, `vocab_size` and
    `max_model_len` are known once start() returns (0 before).
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.dtype = ""  # the dtype the model runs in, e.g. "float32"
        self._core: CoreProcess | CoreThread | None = None
        self._limits: Limits | None = None
        self._streams: dict[str, asyncio.Queue[_StreamItem]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started: asyncio.Future[Started] | None = None
        self._dead: str | None = None
        self._stats = EngineStats(block_size=config.block_size)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started = self._loop.create_future()
        if self.config.placement == "process":
            # The engine's process owns the cores' compute; torch ops left here (embedding
            # rows from the encoder) must not start a second OpenMP pool that competes with it.
            import torch

            torch.set_num_threads(1)
            self._core = CoreProcess(self.config, self._from_core)
        else:
            self._core = CoreThread(self.config, self._from_core)
        try:
            info: Started = await self._started
        except Exception as exc:
            self._dead = f"the engine failed to start: {exc}"
            raise
        self.dtype = info.dtype
        self._limits = Limits(info.max_model_len, info.vocab_size, info.hidden_size,
                              self.config.max_num_seqs)
        log.info("torch engine started (%s): %s on %s/%s, %d KV blocks of %d tokens, "
                 "max_model_len %d", self.config.placement, info.family, info.device, info.dtype,
                 info.num_blocks, info.block_size, self.max_model_len)

    @property
    def hidden_size(self) -> int:
        return self._limits.hidden_size if self._limits else 0

    @property
    def vocab_size(self) -> int:
        return self._limits.vocab_size if self._limits else 0

    @property
    def max_model_len(self) -> int:
        return self._limits.max_model_len if self._limits else 0

    @property
    def max_num_seqs(self) -> int:
        return self._limits.max_num_seqs if self._limits else 0

    async def shutdown(self) -> None:
        if self._core is None:
            return
        if self._core.alive:
            self._core.send(Stop())
        await asyncio.to_thread(self._core.join, 30)
        self._dead = self._dead or "the engine is shut down"
        self._fail_all(self._dead)

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        return self._generate(request)

    async def abort(self, request_id: str) -> None:
        if self._core is not None:
            self._core.send(Abort(request_id))

    async def finish(self, request_id: str, index: int) -> None:
        if self._core is not None:
            self._core.send(Finish(request_id, index))

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._core is not None and self._core.alive

    async def _generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        if self._dead is not None or self._limits is None or self._core is None:
            raise EngineDead(self._dead or "the engine is not started")
        core = self._core
        validate_request(request, self._limits)
        rid = request.request_id
        if rid in self._streams:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        stream: asyncio.Queue[_StreamItem] = asyncio.Queue()
        self._streams[rid] = stream
        core.send(Add(request))
        unfinished = set(range(request.sampling.n))
        try:
            while unfinished:
                # Everything that arrived while the caller was busy goes out merged, one
                # output per choice: a stream that falls behind catches up in fewer messages.
                outputs: list[EngineOutput] = []
                item = await stream.get()
                while True:
                    if isinstance(item, Exception):
                        unfinished.clear()
                        raise item
                    if isinstance(item, _Failed):
                        outputs += [EngineOutput(rid, i, [], FinishReason.ABORT,
                                                 error=item.message) for i in sorted(unfinished)]
                        break
                    outputs += item
                    if stream.empty():
                        break
                    item = stream.get_nowait()
                for out in merge_outputs(outputs):
                    if out.finished:
                        unfinished.discard(out.index)
                    yield out
        finally:
            if self._streams.get(rid) is stream:
                del self._streams[rid]
            if unfinished:  # the caller stopped listening: free what the request holds
                core.send(Abort(rid))

    # --- messages from the core, on whichever thread receives them ----------------------------

    def _from_core(self, message: FromCore) -> None:
        assert self._loop is not None  # start() set it before the core could send anything
        self._loop.call_soon_threadsafe(self._handle, message)

    def _handle(self, message: FromCore) -> None:
        if isinstance(message, Outputs):
            self._stats = message.stats  # whoever sees these outputs sees the state behind them
            grouped: dict[str, list[EngineOutput]] = defaultdict(list)
            for out in message.outputs:
                grouped[out.request_id].append(out)
            for rid, outputs in grouped.items():
                stream = self._streams.get(rid)
                if stream is not None:
                    stream.put_nowait(outputs)
        elif isinstance(message, Rejected):
            stream = self._streams.get(message.request_id)
            if stream is not None:
                error = InvalidRequest if message.invalid else Overloaded
                stream.put_nowait(error(message.message))
        elif isinstance(message, Started):
            assert self._started is not None
            self._started.set_result(message)
        elif isinstance(message, Failed):
            if message.at_start:
                assert self._started is not None
                self._started.set_exception(_start_error(message))
                return
            log.error("torch engine died: %s", message.message)
            self._dead = message.message
            self._fail_all(message.message)

    def _fail_all(self, message: str) -> None:
        for stream in self._streams.values():
            stream.put_nowait(_Failed(message))


def merge_outputs(outputs: list[EngineOutput]) -> list[EngineOutput]:
    """Consecutive outputs of each choice as one: their tokens and logprobs in order, the
    counts and finish reason of the last."""
    if len(outputs) < 2:
        return outputs
    merged: dict[int, EngineOutput] = {}
    for out in outputs:
        before = merged.get(out.index)
        if before is None:
            merged[out.index] = out
            continue
        merged[out.index] = replace(out, new_token_ids=before.new_token_ids + out.new_token_ids,
                                    logprobs=before.logprobs + out.logprobs)
    return list(merged.values())


def _start_error(failed: Failed) -> Exception:
    """A start-up failure as the exception type callers handle (bad paths, bad values)."""
    kind = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(failed.kind)
    return kind(failed.message) if kind else RuntimeError(f"{failed.kind}: {failed.message}")
