"""`python -m llm_service`: the LLM gRPC service."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from dataclasses import asdict

from llm_service.config import LLMConfig
from mmserve.modelconfig import load_model_config

log = logging.getLogger("llm_service")
ENV = "MMSERVE_LLM_"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m llm_service", description=__doc__)
    p.add_argument("--config", default=env(ENV + "CONFIG"), help="model YAML (default: embedded)")
    p.add_argument("--host", default=env(ENV + "HOST", "127.0.0.1"))
    p.add_argument("--port", type=int, default=int(env(ENV + "PORT", "50051")))
    p.add_argument("--encoder-address", default=env(ENV + "ENCODER_ADDRESS", ""),
                   help="host:port, a comma-separated list, or dns:///name:port (round-robin)")
    p.add_argument("--encoder-wait", type=float, default=float(env(ENV + "ENCODER_WAIT", "60")),
                   help="seconds to wait for the encoder at start-up")
    p.add_argument("--embedding-transport", choices=("auto", "inband"),
                   default=env(ENV + "EMBEDDING_TRANSPORT"),
                   help="auto: take the encoder's rows through --shm-dir when it is on the same "
                        "host (falls back to in-band); inband: always over gRPC")
    p.add_argument("--shm-dir", default=env(ENV + "SHM_DIR"),
                   help="tmpfs directory shared with the encoder (default /dev/shm; the "
                        "encoder's --shm-dir must be the same path)")
    p.add_argument("--model-name", default=env(ENV + "MODEL_NAME"))
    p.add_argument("--family", default=env(ENV + "FAMILY"))
    p.add_argument("--checkpoint", default=env(ENV + "CHECKPOINT"))
    p.add_argument("--cache-dir", default=env("MMSERVE_CACHE_DIR"))
    p.add_argument("--engine", choices=("torch", "trtllm"), default=env(ENV + "ENGINE"))
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--kv-cache-bytes", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--tls-cert", default=env(ENV + "TLS_CERT"), help="PEM server certificate")
    p.add_argument("--tls-key", default=env(ENV + "TLS_KEY"), help="PEM key of --tls-cert")
    p.add_argument("--tls-ca", default=env(ENV + "TLS_CA"),
                   help="PEM CA bundle: clients must present a certificate it signed")
    p.add_argument("--encoder-tls-ca", default=env(ENV + "ENCODER_TLS_CA"),
                   help="PEM CA of the encoder's certificate: the encoder channel uses TLS")
    p.add_argument("--encoder-tls-cert", default=env(ENV + "ENCODER_TLS_CERT"),
                   help="PEM client certificate for the encoder (mTLS)")
    p.add_argument("--encoder-tls-key", default=env(ENV + "ENCODER_TLS_KEY"),
                   help="PEM key of --encoder-tls-cert")
    p.add_argument("--log-level", default=env(ENV + "LOG_LEVEL", "INFO"))
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    return p.parse_args(argv)


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
        asyncio.run(serve(config))
    except (ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
