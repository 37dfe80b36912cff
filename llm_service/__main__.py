"""`python -m llm_service`: the LLM gRPC service."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import asdict

from llm_service.config import LLMConfig
from mmserve.modelconfig import load_model_config
from mmserve.rpc.flags import parse_with_env
from mmserve.rpc.server import run

log = logging.getLogger("llm_service")
ENV = "MMSERVE_LLM_"


def parse_args(argv: list[str] | None = None,
               environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """Flags; each defaults to MMSERVE_LLM_<FLAG> (mmserve.rpc.flags)."""
    p = argparse.ArgumentParser(prog="python -m llm_service", description=__doc__)
    p.add_argument("--config", default=None, help="model YAML (default: embedded)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--encoder-address", default="",
                   help="host:port, a comma-separated list; a dns:///name:port entry "
                        "stands for every address the name resolves to")
    p.add_argument("--encoder-wait", type=float, default=60,
                   help="seconds to wait for the encoder at start-up")
    p.add_argument("--encoder-budget-s", type=float, default=None,
                   help="seconds one media item's encoding may take (default 20); the "
                        "request's own remaining time caps it too")
    p.add_argument("--encoder-affinity", action=argparse.BooleanOptionalAction, default=None,
                   help="send known content to the encoder replica that holds its embeddings "
                        "(consistent hashing; default on)")
    p.add_argument("--encoder-health-interval-s", type=float, default=None,
                   help="seconds between health checks of each encoder replica (default 2)")
    p.add_argument("--encoder-health-timeout-s", type=float, default=None,
                   help="a replica slower than this to answer its health check is ejected "
                        "(default 1)")
    p.add_argument("--embedding-transport", choices=("auto", "inband"),
                   default=None,
                   help="auto: take the encoder's rows through --shm-dir when it is on the same "
                        "host (falls back to in-band); inband: always over gRPC")
    p.add_argument("--shm-dir", default=None,
                   help="tmpfs directory shared with the encoder (default /dev/shm; the "
                        "encoder's --shm-dir must be the same path)")
    p.add_argument("--model-name", default=None)
    p.add_argument("--family", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--engine", choices=("torch", "trtllm"), default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--tls-cert", default=None, help="PEM server certificate")
    p.add_argument("--tls-key", default=None, help="PEM key of --tls-cert")
    p.add_argument("--tls-ca", default=None,
                   help="PEM CA bundle: clients must present a certificate it signed")
    p.add_argument("--encoder-tls-ca", default=None,
                   help="PEM CA of the encoder's certificate: the encoder channel uses TLS")
    p.add_argument("--encoder-tls-cert", default=None,
                   help="PEM client certificate for the encoder (mTLS)")
    p.add_argument("--encoder-tls-key", default=None,
                   help="PEM key of --encoder-tls-cert")
    p.add_argument("--shutdown-grace-s", type=float, default=None,
                   help="seconds in-flight streams get to finish after SIGTERM (default 30; "
                        "keep below the pod's terminationGracePeriodSeconds)")
    p.add_argument("--internal-token-file", default=None,
                   help="file with a shared token: gRPC callers must send it, and it is sent "
                        "to the encoder (for deployments without mTLS; see deploy/README.md)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics (vLLM names) over HTTP on this port")
    p.add_argument("--otlp-endpoint", default=None,
                   help="host:port of an OTLP/gRPC collector: export traces (needs the "
                        "tracing extra; default: tracing off)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    return parse_with_env(p, argv, ENV, os.environ if environ is None else environ)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = LLMConfig.from_sources(load_model_config(args.config), args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(asdict(config), default=str, indent=2))
        return 0
    from llm_service.app import serve

    try:
        run(serve(config))
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
