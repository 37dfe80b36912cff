"""The gRPC edge: protobuf <-> domain objects, error -> status mapping, health, reflection."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import uuid

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from encoder_service.config import EncoderConfig
from encoder_service.encoder import EncodedItem, Encoder, MediaItem
from encoder_service.errors import EncoderError, Unavailable, status_code
from encoder_service.families import build_preprocessor
from encoder_service.media import MediaRef
from encoder_service.metrics import EncoderMetrics, serve_metrics
from encoder_service.towers import Tower, build_tower
from encoder_service.wire import (
    SHM_MIN_BYTES, ShmOffers, dtype_to_pb, new_region_name, remove_regions,
    remove_stale_regions, tensor_to_chunks, torch_dtype, write_region,
)
from protos.stubs import load

common_pb2 = load("common_pb2")
encoder_pb2 = load("encoder_pb2")
encoder_pb2_grpc = load("encoder_pb2_grpc")

log = logging.getLogger(__name__)

SERVICE_NAME = encoder_pb2.DESCRIPTOR.services_by_name["Encoder"].full_name
# Region files are taken at once; older ones were left by callers that went away.
STALE_REGION_S = 300.0
SWEEP_INTERVAL_S = 60.0
_MODALITY = {common_pb2.MODALITY_UNSPECIFIED: "image", common_pb2.MODALITY_IMAGE: "image",
             common_pb2.MODALITY_AUDIO: "audio", common_pb2.MODALITY_VIDEO: "video"}


def request_id(context: grpc.aio.ServicerContext, fallback: str = "") -> str:
    """The `x-request-id` metadata value (propagated by the LLM service), else a new id."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)
    return fallback or uuid.uuid4().hex[:16]


def _map_errors(handler):
    """Turns every exception leaving an RPC into a status, once: encoder errors keep their
    message; anything else is logged here and reaches the client as a bare INTERNAL."""

    async def abort(request, context: grpc.aio.ServicerContext, error: Exception) -> None:
        if isinstance(error, EncoderError):
            await context.abort(status_code(error), str(error))
        rid = request_id(context, getattr(request, "request_id", "") or "-")
        log.error("%s failed request_id=%s", handler.__name__, rid, exc_info=error)
        await context.abort(grpc.StatusCode.INTERNAL, "internal encoder error; see the server log")

    if inspect.isasyncgenfunction(handler):
        @functools.wraps(handler)
        async def stream(self, request, context):
            try:
                async for response in handler(self, request, context):
                    yield response
            except Exception as error:
                await abort(request, context, error)
        return stream

    @functools.wraps(handler)
    async def unary(self, request, context):
        try:
            return await handler(self, request, context)
        except Exception as error:
            await abort(request, context, error)
    return unary


def item_from_pb(item: encoder_pb2.MediaItem) -> MediaItem:
    ref = MediaRef(url=item.ref.url, data=item.ref.data, mime_type=item.ref.mime_type)
    modality = _MODALITY.get(item.modality, f"unknown ({item.modality})")
    return MediaItem(ref=ref, modality=modality, max_tiles=item.max_tiles,
                     num_frames=item.num_frames)


def header_to_pb(result: EncodedItem) -> encoder_pb2.ItemHeader:
    return encoder_pb2.ItemHeader(num_tokens=result.num_tokens,
                                  hidden_size=result.embeddings.shape[1],
                                  dtype=dtype_to_pb(result.embeddings.dtype),
                                  content_hash=result.content_hash, num_tiles=result.num_tiles)


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    """Thin: decodes requests, calls the Encoder, encodes responses."""

    def __init__(self, config: EncoderConfig) -> None:
        self._config = config
        preprocessor = build_preprocessor(config)
        self._tokens_per_tile = preprocessor.tokens_per_tile
        self._modalities = [pb for pb, name in _MODALITY.items()
                            if pb != common_pb2.MODALITY_UNSPECIFIED
                            and name in preprocessor.modalities]
        self.encoder: Encoder | None = None  # set once the tower is loaded
        self._shm = ShmOffers(config.shm_dir)
        self._next_sweep = 0.0
        self.metrics = EncoderMetrics(lambda: self.encoder)

    @_map_errors
    async def Encode(self, request: encoder_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext):
        if self.encoder is None:
            raise Unavailable("the encoder is still loading its tower; retry shortly")
        rid = request_id(context, request.request_id)
        started = time.perf_counter()
        tiles = cached = 0
        outcome = "INTERNAL"
        shm = request.HasField("shm") and self._accept_shm(request.shm)
        regions: list[str] = []  # created by this call; removed unless it ends well
        index = 0  # items sent
        try:
            items = [item_from_pb(item) for item in request.items]
            async with contextlib.aclosing(self.encoder.encode_all(items)) as results:
                async for result in results:
                    yield encoder_pb2.EncodeResponse(item_index=index, header=header_to_pb(result))
                    region = (await asyncio.to_thread(self._write_region, result, regions)
                              if shm else None)
                    if region is not None:
                        yield encoder_pb2.EncodeResponse(item_index=index, shm=region)
                    else:
                        for chunk in tensor_to_chunks(result.embeddings, self._config.chunk_bytes):
                            yield encoder_pb2.EncodeResponse(item_index=index, chunk=chunk)
                    tiles += result.num_tiles
                    cached += result.cached
                    index += 1
            outcome = "OK"
        except EncoderError as error:
            outcome = status_code(error).name
            raise
        except asyncio.CancelledError:
            outcome = "CANCELLED"
            raise
        finally:
            if outcome != "OK":
                remove_regions(self._shm.directory, regions)
            self.metrics.record(outcome, index, cached, tiles)
            log.info("encode request_id=%s items=%d tiles=%d cached=%d status=%s ms=%.1f "
                     "shm=%s", rid, len(request.items), tiles, cached, outcome,
                     (time.perf_counter() - started) * 1000, "yes" if shm else "no")

    def _accept_shm(self, offer: encoder_pb2.ShmOffer) -> bool:
        """Whether this call's rows may go through the shared directory; sweeps it now and then."""
        if not self._shm.accept(offer):
            return False
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL_S
            try:
                remove_stale_regions(self._shm.directory, STALE_REGION_S)
            except OSError as exc:
                log.warning("cannot sweep %s: %s", self._shm.directory, exc)
        return True

    def _write_region(self, result: EncodedItem,
                      regions: list[str]) -> encoder_pb2.ShmRegion | None:
        """The item's rows as a new file in the shared directory, or None: send them in-band."""
        embeddings = result.embeddings
        if embeddings.numel() * embeddings.element_size() < SHM_MIN_BYTES:
            return None
        name = new_region_name()
        regions.append(name)
        try:
            return write_region(self._shm.directory, name, embeddings)
        except OSError as exc:
            log.warning("cannot write %s in %s, sending in-band: %s",
                        name, self._shm.directory, exc)
            return None

    @_map_errors
    async def GetModelInfo(self, request: encoder_pb2.EncoderInfoRequest,
                           context: grpc.aio.ServicerContext) -> encoder_pb2.EncoderInfo:
        config = self._config
        return encoder_pb2.EncoderInfo(
            family=config.family, hidden_size=config.hidden_size,
            dtype=dtype_to_pb(torch_dtype(config.dtype)), modalities=self._modalities,
            tokens_per_tile=self._tokens_per_tile, max_tiles=config.max_tiles,
            tower=config.tower)


def server_credentials(config: EncoderConfig) -> grpc.ServerCredentials | None:
    """TLS from the configured PEM files (mutual when a client CA is given), or None."""
    if config.tls_cert is None:
        return None
    with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
        pair = (key.read(), cert.read())
    ca = None
    if config.tls_ca is not None:
        with open(config.tls_ca, "rb") as file:
            ca = file.read()
    return grpc.ssl_server_credentials([pair], root_certificates=ca,
                                       require_client_auth=ca is not None)


class EncoderServer:
    """The encoder gRPC server: binds, loads the tower, reports health, stops gracefully."""

    def __init__(self, config: EncoderConfig, tower: Tower | None = None) -> None:
        self.config = config
        self._tower = tower  # injected (tests) or built from the config in start()
        self._servicer = EncoderServicer(config)
        self._health = health.aio.HealthServicer()
        # One request may carry one maximum-size image as a base64 data: URL (4/3 of the
        # bytes); several large images go in separate calls, as the LLM service sends them.
        max_request = config.max_media_bytes * 4 // 3 + 1024 * 1024
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_request),
            # Connections end after a few minutes (in-flight calls get a grace period), so
            # LLM pods re-resolve the encoders' DNS name and spread over pods added since.
            ("grpc.max_connection_age_ms", 300_000),
            ("grpc.max_connection_age_grace_ms", 60_000),
        ])
        self.port = 0
        self.metrics_port = 0
        self._metrics_server = None

    @property
    def encoder(self) -> Encoder | None:
        return self._servicer.encoder

    async def start(self) -> int:
        """Binds and serves; health turns SERVING once the tower is loaded. Returns the port."""
        encoder_pb2_grpc.add_EncoderServicer_to_server(self._servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), self._server)
        host = self.config.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        try:
            address = f"{host}:{self.config.port}"
            credentials = server_credentials(self.config)
            self.port = (self._server.add_secure_port(address, credentials) if credentials
                         else self._server.add_insecure_port(address))
        except RuntimeError as exc:
            raise OSError(f"cannot bind {host}:{self.config.port}: {exc}") from exc
        await self._server.start()
        if self.config.metrics_port is not None:
            self._metrics_server = serve_metrics(self._servicer.metrics, self.config.host,
                                                 self.config.metrics_port)
            self.metrics_port = self._metrics_server.server_port
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        tower = self._tower or await asyncio.to_thread(build_tower, self.config)
        encoder = Encoder(self.config, tower)
        encoder.start()
        self._servicer.encoder = encoder
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("encoder serving on %s:%d family=%s tower=%s hidden_size=%d dtype=%s",
                 host, self.port, self.config.family, self.config.tower,
                 self.config.hidden_size, self.config.dtype)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for `grace` seconds, then stops."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.config.shutdown_grace_s if grace is None else grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        if self._servicer.encoder is not None:
            await self._servicer.encoder.stop()

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)
