"""Runs the encoder service: `python -m encoder_service [--config model.yaml] [flags]`.

One name per setting: config field `max_tiles` = YAML key `max_tiles` (section
`encoder:`) = flag `--max-tiles` = environment `MMSERVE_ENCODER_MAX_TILES` (the
environment names follow the config field: the repeatable `--allowed-domain` reads
comma-separated MMSERVE_ENCODER_ALLOWED_DOMAINS; see mmserve.rpc.flags). Environment
values are the flags' defaults; both override the model YAML.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping

import yaml

from encoder_service.config import DTYPES, FAMILIES, TOWERS, EncoderConfig
from mmserve.modelconfig import load_model_config
from mmserve.rpc.flags import parse_bool, parse_with_env
from mmserve.rpc.server import run

ENV_PREFIX = "MMSERVE_ENCODER_"
log = logging.getLogger("encoder_service")


_bool = parse_bool  # marks a switch in the table below

# flag, config field (except config/log_level), value type, help
_FLAGS: list[tuple[str, str, Callable[[str], object], str]] = [
    ("--config", "config", str, "model YAML shared with the LLM service; its encoder: section "
     "is read (default: the embedded smollm2-demo.yaml)"),
    ("--host", "host", str, "address to bind"),
    ("--port", "port", int, "port to bind; 0 picks a free one"),
    ("--family", "family", str, f"model family: {', '.join(FAMILIES)}"),
    ("--tower", "tower", str, f"vision tower: {', '.join(TOWERS)}"),
    ("--image-size", "image_size", int, "tile size in pixels"),
    ("--max-tiles", "max_tiles", int, "default and maximum tiles per image (thumbnail extra)"),
    ("--use-thumbnail", "use_thumbnail", _bool, "append a whole-image thumbnail tile"),
    ("--hidden-size", "hidden_size", int, "LLM hidden size = width of each embedding row "
     "(default: the checkpoint's; must equal it when both are given)"),
    ("--checkpoint", "checkpoint", str, "checkpoint directory of the torch tower "
     "(config.json + *.safetensors, original layout)"),
    ("--tensorrt-engine", "tensorrt_engine", str, "serialized TensorRT vision engine (tower "
     "tensorrt; build it with deploy/trtllm/build_vision.sh); --checkpoint still gives the "
     "preprocessing and hidden size"),
    ("--device", "device", str, "torch device of the torch tower: cpu, cuda, cuda:N"),
    ("--video-frames", "video_frames", int, "frames sampled from a video by default"),
    ("--max-video-scanned-frames", "max_video_scanned_frames", int, "longest video in "
     "frames (counted from packets before any frame is decoded)"),
    ("--dtype", "dtype", str, f"embedding dtype on the wire: {', '.join(DTYPES)}"),
    ("--seed", "seed", int, "seed of the demo tower's random weights"),
    ("--max-batch-tiles", "max_batch_tiles", int, "tiles per tower call across requests"),
    ("--max-media-bytes", "max_media_bytes", int, "largest encoded media item"),
    ("--max-image-pixels", "max_image_pixels", int, "largest image (width x height)"),
    ("--max-items-per-request", "max_items_per_request", int, "media items per Encode call"),
    ("--max-request-pixels", "max_request_pixels", int, "pixels of all images in one "
     "request, checked from headers before decoding (0: off)"),
    ("--max-request-rows", "max_request_rows", int, "embedding rows of all media in one "
     "request, planned before decoding (0: off; the LLM checks its context anyway)"),
    ("--max-decoded-bytes", "max_decoded_bytes", int, "memory for decoded images in flight "
     "across requests; past it, requests get RESOURCE_EXHAUSTED (429) (0: off)"),
    ("--max-audio-seconds", "max_audio_seconds", float, "longest audio item accepted "
     "(Megrez encodes the first 30 s)"),
    ("--allow-http", "allow_http", _bool, "fetch http(s) URLs at all"),
    ("--allow-private-networks", "allow_private_networks", _bool,
     "let URLs reach private, loopback and link-local addresses"),
    ("--allowed-domain", "allowed_domains", str,
     "only fetch from this domain and its subdomains (repeatable; env: comma-separated)"),
    ("--allowed-local-media-path", "allowed_local_media_path", str,
     "directory that file:// URLs may read from (default: file:// refused)"),
    ("--http-connect-timeout-s", "http_connect_timeout_s", float, "seconds"),
    ("--http-read-timeout-s", "http_read_timeout_s", float, "seconds between received bytes"),
    ("--http-total-timeout-s", "http_total_timeout_s", float, "seconds for a whole download"),
    ("--max-redirects", "max_redirects", int, "redirects followed, each re-checked"),
    ("--chunk-bytes", "chunk_bytes", int, "embedding bytes per response message (< 4 MiB)"),
    ("--shm-dir", "shm_dir", str, "tmpfs directory for same-host embedding transfer to "
     "callers that prove they share it (default: /dev/shm when it exists; empty: off)"),
    ("--shm-quota-bytes", "shm_quota_bytes", int, "region bytes written and not yet read "
     "by callers; over it, rows go in-band"),
    ("--shm-stale-s", "shm_stale_s", float, "seconds after which an unread region is removed"),
    ("--cache-capacity-bytes", "cache_capacity_bytes", int, "this replica's LRU of embeddings "
     "and decoded media"),
    ("--media-store", "media_store", str, "where mm:// handles' media lives: memory (this "
     "process), directory (a shared volume) or redis"),
    ("--media-store-path", "media_store_path", str, "directory of --media-store directory"),
    ("--media-store-url", "media_store_url", str, "redis://host:port/db of --media-store redis"),
    ("--media-store-capacity-bytes", "media_store_capacity_bytes", int,
     "bytes the memory or directory store keeps (Redis: set its maxmemory)"),
    ("--media-store-ttl-s", "media_store_ttl_s", float, "seconds a handle stays valid"),
    ("--media-store-timeout-s", "media_store_timeout_s", float,
     "seconds a store call may take before the handle fails with 503"),
    ("--metrics-port", "metrics_port", int, "serve Prometheus /metrics over HTTP on this port "
     "(queue depth, requests, tower calls; default: off)"),
    ("--shutdown-grace-s", "shutdown_grace_s", float, "seconds in-flight calls get to finish "
     "after SIGTERM (default 30; keep below the pod's terminationGracePeriodSeconds)"),
    ("--internal-token-file", "internal_token_file", str, "file with the shared token callers "
     "must send (deployments without mTLS; see deploy/README.md)"),
    ("--otlp-endpoint", "otlp_endpoint", str, "host:port of an OTLP/gRPC collector: export "
     "traces (needs the tracing extra; default: off)"),
    ("--tls-cert", "tls_cert", str, "PEM server certificate (serves TLS; with --tls-key)"),
    ("--tls-key", "tls_key", str, "PEM private key of --tls-cert"),
    ("--tls-ca", "tls_ca", str, "PEM CA bundle: clients must present a certificate it signed"),
    ("--log-level", "log_level", str, "DEBUG, INFO, WARNING or ERROR (not a config field)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m encoder_service",
                                     description="mmserve encoder service (media -> embeddings)")
    for flag, dest, parse, help_text in _FLAGS:
        if parse is _bool:
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif flag == "--allowed-domain":
            parser.add_argument(flag, dest=dest, action="append", default=None,
                                metavar="DOMAIN", help=help_text)
        else:
            parser.add_argument(flag, dest=dest, type=parse, default=None, help=help_text)
    parser.add_argument("--print-config", action="store_true",
                        help="print the effective encoder: section as YAML and exit")
    return parser


def parse_args(argv: list[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """Flags, with environment values filling whatever the command line left unset."""
    return parse_with_env(build_parser(), argv, ENV_PREFIX, environ)


def build_config(args: argparse.Namespace) -> EncoderConfig:
    return EncoderConfig.from_sources(load_model_config(args.config)["encoder"], args)


async def serve(config: EncoderConfig) -> None:
    from encoder_service.server import EncoderServer  # keeps --print-config free of torch

    server = EncoderServer(config)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down, in-flight calls get %.1fs", config.shutdown_grace_s)
    await server.stop()


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = parse_args(argv, os.environ if environ is None else environ)
    logging.basicConfig(level=(args.log_level or "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        config = build_config(args)
    except ValueError as exc:
        print(f"encoder_service: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump({"encoder": config.to_dict_redacted()}, sort_keys=False), end="")
        return 0
    try:
        run(serve(config))
    except OSError as exc:
        print(f"encoder_service: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
