"""Client for the encoder pool: media refs in, embedding tensors out.

Each media item is its own Encode call, all issued concurrently, so a request's
images spread over the encoder pool (gRPC round-robin over a DNS name, or our
own rotation over a comma-separated address list).

With a shared-memory directory, every call offers it (backed by a probe file made
once); an encoder on the same host then hands rows over as files there instead
of streaming them, and any other encoder streams them as usual.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from dataclasses import dataclass

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
from mmserve.wire.chunks import chunks_to_tensor
from mmserve.wire.convert import item_from_header, item_to_pb
from mmserve.wire.media import EncodedItem, MediaItem
from mmserve.wire.shm import create_probe, read_region, remove_probe
from protos import encoder_pb2, encoder_pb2_grpc

log = logging.getLogger(__name__)
_MAX_MESSAGE = 64 * 1024 * 1024
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
                 shm_dir: str | None = None,
                 interceptors: list[grpc.aio.ClientInterceptor] | None = None) -> None:
        """`shm_dir`: offer same-host transfer through this directory when it is writable;
        None or empty: rows always come in-band. `interceptors`: e.g. the internal token."""
        options = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.lb_policy_name", "round_robin"),
        ]
        addresses = [a.strip() for a in target.split(",") if a.strip()]
        if not addresses:
            raise ValueError("encoder address must not be empty")
        self._channels = [
            grpc.aio.secure_channel(a, credentials, options=options, interceptors=interceptors)
            if credentials
            else grpc.aio.insecure_channel(a, options=options, interceptors=interceptors)
            for a in addresses
        ]
        self._stubs = [encoder_pb2_grpc.EncoderStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(self._stubs)))
        self._shm_dir = shm_dir or None
        self._offer: encoder_pb2.ShmOffer | None = None

    async def close(self) -> None:
        self._shm_dir = None
        if self._offer is not None:
            remove_probe(self._offer)
            self._offer = None
        await asyncio.gather(*(c.close() for c in self._channels))

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
        try:
            reply = await self._stubs[0].GetModelInfo(encoder_pb2.EncoderInfoRequest(),
                                                      timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _to_error(exc) from None
        return EncoderInfo(reply.family, reply.hidden_size, reply.dtype, reply.tower)

    async def encode(self, items: list[MediaItem], request_id: str,
                     timeout: float | None = None) -> list[list[EncodedItem]]:
        """Encodes every item concurrently (one call each, spread over the pool); returns,
        in order, each item's encoded items (one per frame for a video)."""
        return list(await asyncio.gather(*(self._encode_one(i, request_id, timeout)
                                           for i in items)))

    async def plan(self, items: list[MediaItem], request_id: str,
                   timeout: float | None = None) -> list[PlannedItem]:
        """Each item's rows, tiles and pixels, from headers only (see llm_service/admission.py)."""
        request = encoder_pb2.EncodeRequest(request_id=request_id,
                                            items=[item_to_pb(i) for i in items])
        try:
            reply = await self._stubs[next(self._next)].Plan(
                request, timeout=timeout, metadata=(("x-request-id", request_id),))
        except grpc.aio.AioRpcError as exc:
            raise _to_error(exc) from None
        return [PlannedItem(p.num_tokens, p.num_tiles, p.pixels) for p in reply.items]

    async def _encode_one(self, item: MediaItem, request_id: str,
                          timeout: float | None) -> list[EncodedItem]:
        request = encoder_pb2.EncodeRequest(request_id=request_id, items=[item_to_pb(item)])
        offer = self._shm_offer()
        if offer is not None:
            request.shm.CopyFrom(offer)
        stub = self._stubs[next(self._next)]
        results: list[EncodedItem] = []
        header: encoder_pb2.ItemHeader | None = None
        chunks: list[encoder_pb2.EmbeddingChunk] = []
        try:
            async for reply in stub.Encode(request, timeout=timeout,
                                           metadata=(("x-request-id", request_id),)):
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
        except grpc.aio.AioRpcError as exc:
            raise _to_error(exc) from None
        if header is not None:
            results.append(item_from_header(header, _rows(header, chunks)))
        if not results:
            raise Unavailable("the encoder returned no embedding header")
        return results


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
    if kind is Unavailable:
        details = f"encoder service unavailable: {details}"
    return kind(details)
