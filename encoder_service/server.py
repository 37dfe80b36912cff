"""The gRPC edge: protobuf <-> domain objects, and the server around the servicer.

Errors map to status codes once (mmserve.rpc.calls with errors.STATUS); health, reflection
and the graceful stop come from mmserve.rpc.server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from wsgiref.simple_server import WSGIServer

import grpc

from encoder_service.config import EncoderConfig
from encoder_service.encoder import Encoder
from encoder_service.errors import STATUS, InvalidRequest, Unavailable
from encoder_service.families import Preprocessor, build_preprocessor
from encoder_service.metrics import EncoderMetrics, serve_metrics
from encoder_service.regions import RegionPool
from encoder_service.towers import Tower, build_tower
from mmserve.rpc.auth import read_token
from mmserve.tracing import Tracing, record_span
from mmserve.rpc.calls import Call, rpc_method, status_for
from mmserve.rpc.server import GrpcServer, bind_address
from mmserve.rpc.tls import server_credentials
from mmserve.wire.chunks import dtype_to_pb, tensor_to_chunks, torch_dtype
from mmserve.wire.convert import header_to_pb, item_from_pb, modality_to_pb
from mmserve.wire.media import TENANT_METADATA, EncodedItem, MediaItem, valid_tenant
from mmserve.wire.shm import ShmOffers
from protos import encoder_pb2, encoder_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name
rpc = rpc_method(STATUS, log)


def items_from_pb(request: encoder_pb2.EncodeRequest) -> list[MediaItem]:
    try:
        return [item_from_pb(item) for item in request.items]
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None


def tenant_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's tenant from the call's metadata (the default tenant when absent)."""
    tenant = dict(context.invocation_metadata() or ()).get(TENANT_METADATA, "")
    if not isinstance(tenant, str) or not valid_tenant(tenant):
        raise InvalidRequest(f"metadata {TENANT_METADATA} must be 1-64 lowercase hex digits")
    return tenant


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    """Thin: decodes requests, calls the Encoder, encodes responses."""

    def __init__(self, config: EncoderConfig, preprocessor: Preprocessor) -> None:
        self._config = config
        self._preprocessor = preprocessor
        self.encoder: Encoder | None = None  # set once the tower is loaded
        self._shm = ShmOffers(config.shm_dir or "")
        self.regions = RegionPool(self._shm.directory, config.shm_quota_bytes,
                                  config.shm_stale_s)
        self.metrics = EncoderMetrics(lambda: self.encoder.stats() if self.encoder else None)

    @rpc
    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext,
                     call: Call) -> AsyncIterator[encoder_pb2.EncodeResponse]:
        encoder = self.encoder
        if encoder is None:
            raise Unavailable("the encoder is still loading its tower; retry shortly")
        self.metrics.stages.activate()
        shm = request.HasField("shm") and self._shm.accept(request.shm)
        regions: list[str] = []  # created by this call; removed unless it ends well
        sent = tiles = cached = 0
        outcome = "INTERNAL"
        call.fields.update(items=len(request.items), tiles=0, cached=0, shm="yes" if shm else "no")
        try:
            items = items_from_pb(request)
            async with contextlib.aclosing(encoder.encode_all(items,
                                                              tenant_of(context))) as results:
                media_index = 0
                async for encoded in results:
                    for item in encoded:
                        async for response in self._responses(sent, item, media_index, shm,
                                                              regions):
                            yield response
                        sent += 1
                        tiles += item.num_tiles
                        cached += item.cached
                    media_index += 1
            outcome = "OK"
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        except Exception as error:
            outcome = status_for(error, STATUS).name
            raise
        finally:
            if outcome != "OK":
                self.regions.discard(regions)
            self.metrics.record(outcome, sent, cached, tiles)
            call.fields.update(tiles=tiles, cached=cached)

    async def _responses(self, index: int, item: EncodedItem, media_index: int, shm: bool,
                         regions: list[str]) -> AsyncIterator[encoder_pb2.EncodeResponse]:
        """One encoded item: its header, then its rows as a region file or in-band chunks."""
        yield encoder_pb2.EncodeResponse(item_index=index, header=header_to_pb(item, media_index))
        started, started_ns, nbytes = time.perf_counter(), time.time_ns(), item.embeddings.nbytes
        region = await asyncio.to_thread(self.regions.write, item.embeddings, regions) \
            if shm else None
        if region is not None:
            yield encoder_pb2.EncodeResponse(item_index=index, shm=region)
        else:
            for chunk in tensor_to_chunks(item.embeddings, self._config.chunk_bytes):
                yield encoder_pb2.EncodeResponse(item_index=index, chunk=chunk)
        transport = "shm" if region is not None else "inband"
        self.metrics.stages.transfer(transport, time.perf_counter() - started, nbytes)
        record_span("transfer", started_ns, transport=transport, bytes=nbytes)

    @rpc
    async def Plan(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext,
                   call: Call) -> encoder_pb2.PlanResponse:
        encoder = self.encoder
        if encoder is None:
            raise Unavailable("the encoder is still loading its tower; retry shortly")
        estimates = await encoder.plan_all(items_from_pb(request), tenant_of(context))
        call.fields.update(items=len(estimates), rows=sum(e.num_tokens for e in estimates))
        return encoder_pb2.PlanResponse(items=[
            encoder_pb2.ItemPlan(num_tokens=e.num_tokens, num_tiles=e.num_tiles, pixels=e.pixels)
            for e in estimates])

    @rpc
    async def GetModelInfo(self, request: encoder_pb2.EncoderInfoRequest,
                           context: grpc.aio.ServicerContext,
                           call: Call) -> encoder_pb2.EncoderInfo:
        if self.encoder is None:
            # The hidden size is the loaded tower's: callers retry until it is known.
            raise Unavailable("the encoder is still loading its tower; retry shortly")
        config, preprocessor = self._config, self._preprocessor
        return encoder_pb2.EncoderInfo(
            family=config.family, hidden_size=self.encoder.hidden_size,
            dtype=dtype_to_pb(torch_dtype(config.dtype)),
            modalities=[modality_to_pb(m) for m in preprocessor.modalities],
            tokens_per_tile=preprocessor.tokens_per_tile, max_tiles=config.max_tiles,
            tower=config.tower)


class EncoderServer:
    """The encoder gRPC server: binds, loads the tower, reports health, stops gracefully."""

    def __init__(self, config: EncoderConfig, tower: Tower | None = None,
                 tracing: Tracing | None = None) -> None:
        self.config = config
        self.tracing = tracing or Tracing.configure("mmserve-encoder", config.otlp_endpoint)
        self._tower = tower  # injected (tests) or built from the config in start()
        self.preprocessor = build_preprocessor(config)  # the one this server's encoder uses
        self._servicer = EncoderServicer(config, self.preprocessor)
        # One request may carry one maximum-size image as a base64 data: URL (4/3 of the
        # bytes); several large images go in separate calls, as the LLM service sends them.
        max_request = config.max_media_bytes * 4 // 3 + 1024 * 1024
        self._server = GrpcServer(SERVICE_NAME, options=[
            ("grpc.max_receive_message_length", max_request),
            # Connections end after a few minutes (in-flight calls get a grace period), so
            # LLM pods re-resolve the encoders' DNS name and spread over pods added since.
            ("grpc.max_connection_age_ms", 300_000),
            ("grpc.max_connection_age_grace_ms", 60_000),
        ], token=read_token(config.internal_token_file), tracing=self.tracing)
        encoder_pb2_grpc.add_EncoderServicer_to_server(self._servicer, self._server.grpc)
        self.port = 0
        self.metrics_port = 0
        self._metrics_server: WSGIServer | None = None

    @property
    def encoder(self) -> Encoder | None:
        return self._servicer.encoder

    async def start(self) -> int:
        """Binds and serves; health turns SERVING once the tower is loaded. Returns the port."""
        config = self.config
        self.port = await self._server.start(config.host, config.port,
                                             server_credentials(config.server_tls))
        if config.metrics_port is not None:
            self._metrics_server = serve_metrics(self._servicer.metrics, config.host,
                                                 config.metrics_port)
            self.metrics_port = self._metrics_server.server_port
        tower = self._tower if self._tower is not None else \
            await asyncio.to_thread(build_tower, config)
        encoder = Encoder(config, tower, self.preprocessor)
        encoder.start()
        self._servicer.regions.start()
        self._servicer.encoder = encoder
        await self._server.set_serving(True)
        log.info("encoder serving on %s family=%s tower=%s hidden_size=%d dtype=%s",
                 bind_address(config.host, self.port), config.family, config.tower,
                 encoder.hidden_size, config.dtype)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for `grace` seconds, then stops."""
        await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        await self._servicer.regions.stop()
        if self._servicer.encoder is not None:
            await self._servicer.encoder.stop()
        self.tracing.shutdown()
