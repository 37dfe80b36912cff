"""`python -m gateway` (or `mmserve-gateway`): flags with MMSERVE_GATEWAY_* defaults → uvicorn."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from gateway.app import create_app
from gateway.connections import header_timeout_protocol
from gateway.config import GatewayConfig
from gateway.drain import DrainingServer
from mmserve.rpc.flags import parse_with_env

ENV_PREFIX = "MMSERVE_GATEWAY_"
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def build_parser() -> argparse.ArgumentParser:
    defaults = GatewayConfig()

    parser = argparse.ArgumentParser(
        prog="mmserve-gateway",
        description="OpenAI-compatible REST gateway in front of the mmserve LLM service. "
                    f"Every flag defaults to the env variable {ENV_PREFIX}<FLAG>, "
                    f"e.g. {ENV_PREFIX}LLM_ADDRESS.")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=defaults.port)
    parser.add_argument("--llm-address", default=defaults.llm_address,
                        help="host:port of the LLM service, or dns:///name:port to balance "
                             "round-robin over every address of a name")
    parser.add_argument("--model-name", default=defaults.model_name,
                        help="model name to advertise (default: the LLM service's model id)")
    parser.add_argument("--api-key", action="append", dest="api_key",
                        help="accepted bearer token; repeatable (env: comma-separated list). "
                             "Without any key the API is open")
    parser.add_argument("--api-key-file", default=None,
                        help="file with one key per line; blank lines and # comments skipped")
    parser.add_argument("--max-body-bytes", type=int,
                        default=defaults.max_body_bytes)
    parser.add_argument("--request-timeout", type=float,
                        default=defaults.request_timeout_s,
                        help="seconds one generation may take")
    parser.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                        help="seconds a client has to send a request's headers (also "
                             "closes connections that send nothing)")
    parser.add_argument("--body-timeout", type=float, default=defaults.body_timeout_s,
                        help="seconds a client has to send a request body once its headers "
                             "are in (then 408)")
    parser.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections at most; requests beyond it get 503")
    parser.add_argument("--ssl-certfile", default=None)
    parser.add_argument("--ssl-keyfile", default=None)
    parser.add_argument("--llm-tls-ca", default=None,
                        help="PEM CA of the LLM service's certificate: the channel uses TLS")
    parser.add_argument("--llm-tls-cert", default=None,
                        help="PEM client certificate for the LLM service (mTLS)")
    parser.add_argument("--llm-tls-key", default=None,
                        help="PEM key of --llm-tls-cert")
    parser.add_argument("--shutdown-grace-s", type=float, default=defaults.shutdown_grace_s,
                        help="seconds in-flight requests get to finish after SIGTERM while "
                             "/ready answers 503 and new requests get 503 (keep below the "
                             "pod's terminationGracePeriodSeconds)")
    parser.add_argument("--max-concurrent-per-key", type=int, default=None,
                        help="API requests in flight per API key; more get 429 (default: "
                             "no per-key limit)")
    parser.add_argument("--internal-token-file", default=None,
                        help="file with the shared token the LLM service requires "
                             "(deployments without mTLS; see deploy/README.md)")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="host:port of an OTLP/gRPC collector: export traces (needs the "
                             "tracing extra; default: off)")
    parser.add_argument("--llm-streams", type=int, default=None,
                        help="long-lived GenerateMany calls that carry the generations, one "
                             "gRPC message per batch of tokens; 0: one Generate call per "
                             "request (default: 1 for one address, 0 for a dns:/// pool)")
    parser.add_argument("--log-level", choices=_LOG_LEVELS,
                        default="info")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration (keys redacted) and exit")
    return parser


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    """Flags, with environment values filling whatever the command line left unset."""
    return parse_with_env(build_parser(), argv, ENV_PREFIX, environ)


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    # Keys given as flags replace the env list; a key file adds to either.
    keys = list(args.api_key or ())
    if args.api_key_file:
        lines = Path(args.api_key_file).read_text().splitlines()
        keys = [*keys, *(line for line in lines if not line.lstrip().startswith("#"))]
    return tuple(key.strip() for key in keys if key.strip())


def build_config(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        host=args.host, port=args.port, llm_address=args.llm_address,
        model_name=args.model_name or None, api_keys=_api_keys(args),
        max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
        ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
        llm_tls_ca=args.llm_tls_ca, llm_tls_cert=args.llm_tls_cert,
        llm_tls_key=args.llm_tls_key, shutdown_grace_s=args.shutdown_grace_s,
        max_concurrent_per_key=args.max_concurrent_per_key,
        internal_token_file=args.internal_token_file, otlp_endpoint=args.otlp_endpoint or None,
        llm_streams=args.llm_streams)


def server_options(config: GatewayConfig) -> dict[str, Any]:
    """uvicorn settings for the connection limits (see gateway/connections.py)."""
    return {"http": header_timeout_protocol(config.header_timeout_s),
            "limit_concurrency": config.max_connections}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(argv, os.environ)
    try:
        config = build_config(args)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    if args.print_config:
        shown = dataclasses.asdict(config) | {"api_keys": ["<redacted>"] * len(config.api_keys)}
        print(json.dumps(shown, indent=2))
        return 0

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # access_log off: the gateway writes its own line per request, with tokens and timings.
    app = create_app(config)
    # uvicorn's own shutdown runs after the drain: by then only stragglers are left.
    server = DrainingServer(uvicorn.Config(
        app, host=config.host, port=config.port, ssl_certfile=config.ssl_certfile,
        ssl_keyfile=config.ssl_keyfile, log_level=args.log_level, access_log=False,
        timeout_graceful_shutdown=1, **server_options(config)), app.state.drain,
        config.shutdown_grace_s)
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
