"""Client for the encoder pool: media refs in, embedding tensors out.

Each media item is its own Encode call, all issued concurrently, placed on a replica
by encoder_pool.py: known content (a handle, or bytes whose hash is computed here) on
the replica that most likely holds its embeddings, new content spread over the pool.
Every call has a deadline: the request's remaining time, capped by the encode budget.

With a shared-memory directory, every call offers it (backed by a probe file made
once); an encoder on the same host then hands rows over as files there instead
of streaming them, and any other encoder streams them as usual.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from llm_service.errors import (
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    ServiceError,
    Unavailable,
)
from llm_service.encoder_pool import Endpoint, EncoderPool, PoolSettings
from mmserve.wire.chunks import chunks_to_tensor
from mmserve.wire.convert import item_from_header, item_to_pb
from mmserve.wire.media import (
    MEDIA_STORE_UNAVAILABLE,
    TENANT_METADATA,
    EncodedItem,
    MediaItem,
    routing_key,
)
from mmserve.wire.shm import create_probe, read_region, remove_probe
from protos import encoder_pb2

log = logging.getLogger(__name__)
_MAX_MESSAGE = 64 * 1024 * 1024
DEFAULT_BUDGET_S = 20.0
_STATUS_ERRORS: dict[grpc.StatusCode, type[ServiceError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}


@dataclass(frozen=True, slots=True)
class PlannedItem:
    """An item's cost, planned from its header: rows (0: unknown), tiles, pixels."""

    num_tokens: int
    num_tiles: int
    pixels: int


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    family: str
    hidden_size: int
    dtype: int
    tower: str


class EncoderClient:
    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None,
                 shm_dir: str | None = None, budget_s: float = DEFAULT_BUDGET_S,
                 pool: PoolSettings | None = None,
                 interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> None:
        """`shm_dir`: offer same-host transfer through this directory when it is writable;
        None or empty: rows always come in-band. `budget_s`: the most one item's encoding
        may take, whatever the request's own deadline. `interceptors`: e.g. the internal
        token and trace propagation."""
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        chain = list(interceptors) or None

        def channel(address: str, extra: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
            return (grpc.aio.secure_channel(address, credentials, options=options + list(extra),
                                            interceptors=chain)
                    if credentials else
                    grpc.aio.insecure_channel(address, options=options + list(extra),
                                              interceptors=chain))

        self.pool = EncoderPool(target, channel, pool or PoolSettings())
        self._budget_s = budget_s
        self._shm_dir = shm_dir or None
        self._offer: encoder_pb2.ShmOffer | None = None

    async def start(self) -> None:
        """Resolves the encoder addresses and starts the health checks."""
        await self.pool.start()

    async def close(self) -> None:
        self._shm_dir = None
        if self._offer is not None:
            remove_probe(self._offer)
            self._offer = None
        await self.pool.close()

    def _shm_offer(self) -> encoder_pb2.ShmOffer | None:
        """The offer sent with every call, its probe made on first use; None: in-band only."""
        if self._offer is not None or self._shm_dir is None:
            return self._offer
        directory, self._shm_dir = self._shm_dir, None
        if not (os.path.isdir(directory) and os.access(directory, os.W_OK | os.X_OK)):
            log.info("%s is not a writable directory: embedding rows come in-band", directory)
            return None
        try:
            self._offer = create_probe(directory)
        except OSError as exc:
            log.warning("cannot create a probe in %s, embedding rows come in-band: %s",
                        directory, exc)
        return self._offer

    async def info(self, timeout: float = 5.0) -> EncoderInfo:
        endpoint = self.pool.pick(None, set()) or self.pool.endpoints[0]
        try:
            reply = await endpoint.stub.GetModelInfo(encoder_pb2.EncoderInfoRequest(),
                                                     timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _to_error(exc) from None
        return EncoderInfo(reply.family, reply.hidden_size, reply.dtype, reply.tower)

    async def encode(self, items: list[MediaItem], request_id: str,
                     timeout: float | None = None, tenant: str = "") -> list[list[EncodedItem]]:
        """Encodes every item concurrently (one call each, spread over the pool); returns,
        in order, each item's encoded items (one per frame for a video). `timeout`: the
        request's remaining time; `tenant`: whose handles these items may name."""
        return list(await asyncio.gather(*(self._encode_one(i, request_id, timeout, tenant)
                                           for i in items)))

    async def plan(self, items: list[MediaItem], request_id: str,
                   timeout: float | None = None, tenant: str = "") -> list[PlannedItem]:
        """Each item's rows, tiles and pixels, from headers only (see llm_service/admission.py)."""
        request = encoder_pb2.EncodeRequest(request_id=request_id,
                                            items=[item_to_pb(i) for i in items])
        metadata = [("x-request-id", request_id)]
        if tenant:
            metadata.append((TENANT_METADATA, tenant))
        endpoint = self.pool.pick(None, set())
        if endpoint is None:
            raise Unavailable(f"no encoder replica is up ({self.pool.describe()}); retry shortly")
        budget = self._budget_s if timeout is None else min(timeout, self._budget_s)
        try:
            reply = await endpoint.stub.Plan(request, timeout=budget, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            raise _to_error(exc) from None
        return [PlannedItem(p.num_tokens, p.num_tiles, p.pixels) for p in reply.items]

    async def _encode_one(self, item: MediaItem, request_id: str, timeout: float | None,
                          tenant: str) -> list[EncodedItem]:
        """One item on the endpoint that owns its content, retried once on another endpoint
        when the first is down or is ejected while the call waits (Encode is idempotent)."""
        budget = self._budget_s if timeout is None else min(timeout, self._budget_s)
        deadline = time.monotonic() + budget
        key = await _routing_key(item)
        request = encoder_pb2.EncodeRequest(request_id=request_id, items=[item_to_pb(item)])
        metadata = [("x-request-id", request_id)]
        if tenant:
            metadata.append((TENANT_METADATA, tenant))
        tried: set[str] = set()
        error: ServiceError | None = None
        for _ in range(2):
            endpoint = self.pool.pick(key, tried)
            remaining = deadline - time.monotonic()
            if endpoint is None or remaining <= 0:
                break
            tried.add(endpoint.address)
            try:
                return await self._attempt(endpoint, request, tuple(metadata), remaining, budget)
            except _EndpointDown as down:
                error = down.error
        if error is None and not tried:
            error = Unavailable(f"encoder service unavailable: no encoder replica is up "
                                f"({self.pool.describe()}); retry shortly")
        raise error or DeadlineExceeded(_late(budget))

    async def _attempt(self, endpoint: Endpoint, request: encoder_pb2.EncodeRequest,
                       metadata: tuple[tuple[str, str], ...], remaining: float,
                       budget: float) -> list[EncodedItem]:
        """One call, given up when the endpoint is ejected meanwhile (_EndpointDown)."""
        call = asyncio.create_task(self._call(endpoint, request, metadata, remaining))
        ejected = asyncio.create_task(endpoint.ejected.wait())
        try:
            done, _ = await asyncio.wait({call, ejected}, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            ejected.cancel()
            if not call.done():
                call.cancel()
                await asyncio.gather(call, return_exceptions=True)
        if call in done:
            try:
                return call.result()
            except grpc.aio.AioRpcError as exc:
                error = _to_error(exc)
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(_late(budget)) from None
                if isinstance(error, Unavailable) and \
                        not (exc.details() or "").startswith(MEDIA_STORE_UNAVAILABLE):
                    self.pool.eject(endpoint, f"Encode failed: {exc.details()}")
                    raise _EndpointDown(error) from None
                raise error from None
        if ejected in done:
            raise _EndpointDown(Unavailable(
                f"encoder service unavailable: the encoder replica stopped answering "
                f"({self.pool.describe()}); retry shortly"))
        raise DeadlineExceeded(_late(budget))

    async def _call(self, endpoint: Endpoint, request: encoder_pb2.EncodeRequest,
                    metadata: tuple[tuple[str, str], ...],
                    timeout: float) -> list[EncodedItem]:
        offer = self._shm_offer()
        if offer is not None:
            request.shm.CopyFrom(offer)
        results: list[EncodedItem] = []
        header: encoder_pb2.ItemHeader | None = None
        chunks: list[encoder_pb2.EmbeddingChunk] = []
        async for reply in endpoint.stub.Encode(request, timeout=timeout, metadata=metadata):
            part = reply.WhichOneof("part")
            if part == "header":
                if header is not None:
                    results.append(item_from_header(header, _rows(header, chunks)))
                header, chunks = reply.header, []
            elif header is None:
                raise Unavailable("the encoder sent embedding rows before their header")
            elif part == "chunk":
                chunks.append(reply.chunk)
            elif part == "shm":
                rows = await asyncio.to_thread(_take_region, offer, header, reply.shm)
                results.append(item_from_header(header, rows))
                header = None
        if header is not None:
            results.append(item_from_header(header, _rows(header, chunks)))
        if not results:
            raise Unavailable("the encoder returned no embedding header")
        return results


class _EndpointDown(Exception):
    """The endpoint failed as if it were down: the call may go to another one."""

    def __init__(self, error: ServiceError) -> None:
        super().__init__(str(error))
        self.error = error


def _late(budget: float) -> str:
    return (f"the encoder did not answer within {budget:g} s (the encode budget, or the "
            f"request's remaining time); retry later or send smaller media")


async def _routing_key(item: MediaItem) -> str | None:
    """The item's content key; hashing more than a few hundred KiB goes to a thread."""
    size = max([len(item.ref.data), len(item.ref.url)]
               + [len(f.data) + len(f.url) for f in item.frames[:1]])
    if size < 256 * 1024:
        return routing_key(item)
    return await asyncio.to_thread(routing_key, item)


def _rows(header: encoder_pb2.ItemHeader, chunks: list[encoder_pb2.EmbeddingChunk]) -> torch.Tensor:
    try:
        return chunks_to_tensor(header, chunks)
    except ValueError as exc:
        raise Unavailable(f"the encoder sent malformed embedding rows: {exc}") from None


def _take_region(offer: encoder_pb2.ShmOffer | None, header: encoder_pb2.ItemHeader,
                 region: encoder_pb2.ShmRegion) -> torch.Tensor:
    """Reads (and removes) the rows the encoder left in the offered directory."""
    if offer is None:
        raise Unavailable(f"the encoder sent shared-memory region {region.name!r} "
                          "although none was offered")
    try:
        return read_region(offer.dir, header, region)
    except (OSError, ValueError) as exc:
        raise Unavailable(f"cannot read embedding rows from shared-memory region "
                          f"{region.name!r} in {offer.dir}: {exc}") from None


def _to_error(exc: grpc.aio.AioRpcError) -> ServiceError:
    kind = _STATUS_ERRORS.get(exc.code(), ServiceError)
    details = exc.details() or exc.code().name
    if kind is Unavailable and not details.startswith(MEDIA_STORE_UNAVAILABLE):
        details = f"encoder service unavailable: {details}"
    return kind(details)
