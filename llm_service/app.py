"""Wires the LLM service together: checkpoint, tokenizer, engine, encoder, gRPC server."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from dataclasses import fields
from pathlib import Path

from llm_service.config import LLMConfig
from llm_service.encoder_client import EncoderClient
from llm_service.encoder_health import pool_settings, report_encoders
from llm_service.engine.protocol import EngineClient
from llm_service.errors import ServiceError
from llm_service.generator import Generator
from llm_service.prompt.families import load_family
from llm_service.server import LLMServicer, build_server, watch_health
from llm_service.tokenizer import load_tokenizer
from llm_service.weights import resolve_checkpoint
from mmserve.rpc.auth import read_token, token_interceptors
from mmserve.rpc.tls import channel_credentials, server_credentials
from mmserve.tracing import Tracing, client_interceptors

log = logging.getLogger("llm_service")


def build_engine(config: LLMConfig, model_dir: Path) -> EngineClient:
    if config.engine_kind == "trtllm":
        from llm_service.engine.trtllm import TrtllmEngine

        return TrtllmEngine.from_options(model_dir, config.engine_options)
    from llm_service.engine.async_engine import TorchEngine
    from llm_service.engine.config import EngineConfig

    known = {f.name for f in fields(EngineConfig)} - {"model_dir"}
    unknown = sorted(set(config.engine_options) - known)
    if unknown:
        raise ValueError(f"unknown engine options {unknown}; known: {sorted(known)}")
    return TorchEngine(EngineConfig(model_dir=model_dir, **config.engine_options))


async def check_encoder(encoder: EncoderClient, hidden_size: int, wait_s: float) -> None:
    """Fails fast on a hidden-size mismatch; tolerates an encoder that is not up yet."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            info = await encoder.info()
            break
        except ServiceError as exc:
            if time.monotonic() >= deadline:
                log.warning("encoder not reachable (%s); media requests will fail until it is", exc)
                return
            await asyncio.sleep(0.5)
    if info.hidden_size != hidden_size:
        raise ValueError(f"encoder hidden size {info.hidden_size} != LLM hidden size "
                         f"{hidden_size}: set encoder.hidden_size in the model config to the "
                         "LLM's")
    log.info("encoder: family=%s tower=%s hidden=%d", info.family, info.tower, info.hidden_size)


async def serve(config: LLMConfig, stop: asyncio.Event | None = None,
                ready: asyncio.Future | None = None) -> None:
    """Runs until `stop` is set (or SIGINT/SIGTERM when no event is given)."""
    started = time.monotonic()
    # Read before the model loads, so a missing certificate fails in a second, not a minute.
    server_creds = server_credentials(config.server_tls)
    encoder_creds = channel_credentials(config.encoder_tls)
    token = read_token(config.internal_token_file)
    tracing = Tracing.configure("mmserve-llm", config.otlp_endpoint)
    model_dir = await asyncio.to_thread(resolve_checkpoint, config.checkpoint, config.cache_dir)
    tokenizer = load_tokenizer(model_dir)
    family = load_family(config.family, tokenizer)
    engine = build_engine(config, model_dir)
    await engine.start()
    encoder = (EncoderClient(config.encoder_address, encoder_creds, config.encoder_shm_dir,
                             config.encoder_budget_s, pool_settings(config),
                             token_interceptors(token) + client_interceptors(tracing.enabled))
               if config.encoder_address else None)
    try:
        if encoder is not None:
            await encoder.start()
            await check_encoder(encoder, engine.hidden_size, config.encoder_wait_s)
        generator = Generator(engine, tokenizer, family, encoder, config.max_media_items)
        info = dict(model_id=config.model_name, family=config.family,
                    max_model_len=engine.max_model_len, vocab_size=engine.vocab_size,
                    hidden_size=engine.hidden_size, engine=config.engine_kind,
                    max_num_seqs=engine.max_num_seqs)
        servicer = LLMServicer(generator, engine, info)
        server = build_server(servicer, token, tracing)
        port = await server.start(config.host, config.port, server_creds)
        if config.metrics_port is not None:
            metrics_http = servicer.metrics.serve(config.host, config.metrics_port)
            log.info("metrics on http://%s:%d/metrics", config.host, metrics_http.server_port)
        watcher = asyncio.create_task(watch_health(engine, server))
        encoders = (asyncio.create_task(report_encoders(encoder.pool, server.health))
                    if encoder is not None else None)
        log.info("LLM service listening on %s:%d (%s, started in %.1f s)", config.host, port,
                 config.model_name, time.monotonic() - started)
        if ready is not None:
            ready.set_result(port)
        stop = stop or _signal_event()
        await stop.wait()
        log.info("shutting down: draining for up to %.1f s", config.shutdown_grace_s)
        watcher.cancel()
        if encoders is not None:
            encoders.cancel()
        await server.stop(config.shutdown_grace_s)
        if config.metrics_port is not None:
            metrics_http.shutdown()
    finally:
        await engine.shutdown()
        if encoder is not None:
            await encoder.close()
        tracing.shutdown()


def _signal_event() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event
