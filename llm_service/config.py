"""LLM service configuration: one frozen object built once in __main__."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from mmserve.rpc.tls import TlsFiles

ENGINE_KINDS = ("torch", "trtllm")
# auto: offer the encoder same-host transfer through shm_dir when it is a writable directory.
EMBEDDING_TRANSPORTS = ("auto", "inband")
# Flags named as their fields; None (not given) keeps the default.
ENCODER_POOL_FLAGS = ("encoder_budget_s", "encoder_affinity", "encoder_health_interval_s",
                      "encoder_health_timeout_s")


@dataclass(frozen=True, slots=True)
class LLMConfig:
    host: str = "127.0.0.1"
    port: int = 50051
    model_name: str = "smollm2-135m-instruct"
    family: str = "smollm2"
    checkpoint: str = "embedded:smollm2"
    cache_dir: Path | None = None
    encoder_address: str = ""  # empty: text only
    encoder_wait_s: float = 60.0  # how long start-up waits for the encoder's info call
    encoder_budget_s: float = 20.0  # the most one media item's Encode call may take
    encoder_affinity: bool = True  # known content to the replica holding its embeddings
    encoder_health_interval_s: float = 2.0  # health checks of every encoder replica
    encoder_health_timeout_s: float = 1.0  # slower: the replica is ejected as hung
    max_media_items: int = 16
    embedding_transport: str = "auto"
    shm_dir: str = "/dev/shm"  # must be the encoder's --shm-dir for same-host transfer
    engine_kind: str = "torch"
    engine_options: dict[str, Any] = field(default_factory=dict)  # engine: section of the YAML
    # Seconds in-flight streams get after SIGTERM; keep it below the pod's
    # terminationGracePeriodSeconds (Kubernetes' default 30 s, ours 45 s).
    shutdown_grace_s: float = 30.0
    internal_token_file: Path | None = None  # shared token required on, and sent over, gRPC
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None: off, 0: any port
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for traces; None: tracing off
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None  # with it, gRPC clients must present a certificate it signed
    # The encoder channel: TLS when a CA is given, plus a client certificate for mTLS.
    encoder_tls_cert: Path | None = None
    encoder_tls_key: Path | None = None
    encoder_tls_ca: Path | None = None

    @property
    def encoder_shm_dir(self) -> str | None:
        """The directory the encoder client offers, or None: rows always come in-band."""
        return self.shm_dir if self.embedding_transport == "auto" and self.shm_dir else None

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.embedding_transport not in EMBEDDING_TRANSPORTS:
            raise ValueError(f"embedding_transport must be one of {EMBEDDING_TRANSPORTS}, "
                             f"got {self.embedding_transport!r}")
        if self.engine_kind not in ENGINE_KINDS:
            raise ValueError(f"engine kind must be one of {ENGINE_KINDS}, got {self.engine_kind!r}")
        if self.max_media_items < 0:
            raise ValueError(f"max_media_items must be >= 0, got {self.max_media_items}")
        if self.shutdown_grace_s < 0:
            raise ValueError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if not 0 < self.encoder_budget_s <= 600:
            raise ValueError(f"encoder_budget_s must be in (0, 600], got {self.encoder_budget_s}")
        if self.encoder_health_interval_s <= 0 or self.encoder_health_timeout_s <= 0:
            raise ValueError(f"encoder_health_interval_s and encoder_health_timeout_s must be "
                             f"> 0, got {self.encoder_health_interval_s} and "
                             f"{self.encoder_health_timeout_s}")
        if self.encoder_wait_s < 0:
            raise ValueError(f"encoder_wait_s must be >= 0, got {self.encoder_wait_s}")
        problems = (self.server_tls.problems("tls_", server=True)
                    + self.encoder_tls.problems("encoder_tls_", server=False))
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def server_tls(self) -> TlsFiles:
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)

    @property
    def encoder_tls(self) -> TlsFiles:
        """The encoder channel: TLS when a CA is given, plus a client certificate for mTLS."""
        return TlsFiles(self.encoder_tls_cert, self.encoder_tls_key, self.encoder_tls_ca)

    @classmethod
    def from_sources(cls, sections: dict[str, dict[str, Any]],
                     args: argparse.Namespace) -> LLMConfig:
        """YAML sections first, then flags that were given explicitly."""
        model, llm = sections["model"], sections["llm"]
        default = {f.name: f.default for f in fields(cls)}  # slots: no class attributes
        engine = dict(sections["engine"])
        kind = engine.pop("kind", "torch")
        for key, flag in (("kv_cache_bytes", "kv_cache_bytes"), ("max_num_seqs", "max_num_seqs"),
                          ("block_size", "block_size"), ("device", "device"), ("dtype", "dtype"),
                          ("max_num_batched_tokens", "max_num_batched_tokens"),
                          ("max_model_len", "max_model_len")):
            if getattr(args, flag, None) is not None:
                engine[key] = getattr(args, flag)
        if getattr(args, "no_prefix_caching", False):
            engine["enable_prefix_caching"] = False
        return cls(
            host=args.host,
            port=args.port,
            model_name=args.model_name or model.get("name", default["model_name"]),
            family=args.family or model.get("family", default["family"]),
            checkpoint=args.checkpoint or llm.get("checkpoint", default["checkpoint"]),
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
            encoder_address=args.encoder_address,
            encoder_wait_s=args.encoder_wait,
            **{name: getattr(args, name) for name in ENCODER_POOL_FLAGS
               if getattr(args, name, None) is not None},
            max_media_items=llm.get("max_media_items", default["max_media_items"]),
            embedding_transport=getattr(args, "embedding_transport", None)
            or llm.get("embedding_transport", default["embedding_transport"]),
            shm_dir=_first(getattr(args, "shm_dir", None), llm.get("shm_dir"),
                           default["shm_dir"]),
            engine_kind=args.engine or kind,
            engine_options=engine,
            tls_cert=Path(args.tls_cert) if args.tls_cert else None,
            tls_key=Path(args.tls_key) if args.tls_key else None,
            tls_ca=Path(args.tls_ca) if args.tls_ca else None,
            encoder_tls_cert=_path(getattr(args, "encoder_tls_cert", None)),
            encoder_tls_key=_path(getattr(args, "encoder_tls_key", None)),
            encoder_tls_ca=_path(getattr(args, "encoder_tls_ca", None)),
            shutdown_grace_s=_first(getattr(args, "shutdown_grace_s", None),
                                    default["shutdown_grace_s"]),
            internal_token_file=_path(getattr(args, "internal_token_file", None)),
            metrics_port=getattr(args, "metrics_port", None),
            otlp_endpoint=getattr(args, "otlp_endpoint", None) or None,
        )


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _first(*values: Any) -> Any:
    """The first value that is not None (an empty string counts: it turns a path off)."""
    return next(value for value in values if value is not None)
