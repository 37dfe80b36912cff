"""The gateway's one configuration object, built once in `__main__` and passed down."""

from __future__ import annotations

import re
from dataclasses import dataclass

from mmserve.rpc.tls import TlsFiles

# host:port, [v6]:port, or a gRPC name-resolver target such as dns:///llm.svc:50051.
_HOST_PORT = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")
_DNS_TARGET = re.compile(r"^dns:(//[^/]*)?/(?P<name>.+)$")


def _valid_llm_address(address: str) -> bool:
    if address.startswith("unix:"):
        return len(address) > len("unix:")
    dns = _DNS_TARGET.match(address)
    host_port = _HOST_PORT.match(dns.group("name") if dns else address)
    return host_port is not None and 0 < int(host_port.group(2)) < 65536


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """Everything the gateway needs; validated on construction."""

    host: str = "0.0.0.0"
    port: int = 8000
    # host:port of one LLM service, or dns:///name:port to spread requests
    # round-robin over every address the name resolves to (a headless Service).
    llm_address: str = "127.0.0.1:50051"
    # Name advertised in /v1/models and accepted in requests; None means the
    # model id the LLM service reports.
    model_name: str | None = None
    # Accepted bearer tokens; empty leaves the API open.
    api_keys: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    # gRPC deadline of one generation, from the first byte sent to the last received.
    request_timeout_s: float = 600.0
    # Connections: seconds to send a request's headers, then its body; most open at once
    # (past it, requests get 503). Neither timeout limits how long a response streams.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    max_connections: int = 1024
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # TLS to the LLM service: its server CA, plus a client certificate when it requires mTLS.
    llm_tls_ca: str | None = None
    llm_tls_cert: str | None = None
    llm_tls_key: str | None = None
    # Seconds in-flight requests get after SIGTERM; below the pod's terminationGracePeriodSeconds.
    shutdown_grace_s: float = 30.0
    # API requests in flight per API key; None: no per-key limit.
    max_concurrent_per_key: int | None = None
    # File with the shared token sent to the LLM service (deployments without mTLS).
    internal_token_file: str | None = None
    # OTLP/gRPC collector (host:port) for traces; None: tracing off.
    otlp_endpoint: str | None = None
    # Generations go over this many long-lived GenerateMany calls (one gRPC message per
    # batch of tokens, not per token); 0: one Generate call each. None: 1 for one address,
    # 0 for a dns:/// pool, where each call is balanced on its own (set it to a multiple of
    # the pool's size to multiplex there too).
    llm_streams: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (bool(self.host), "host must not be empty"),
            (0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}"),
            (_valid_llm_address(self.llm_address),
             f"llm_address must be host:port, dns:///name:port or unix:path, "
             f"got {self.llm_address!r}"),
            (self.model_name is None or bool(self.model_name.strip()),
             f"model_name must not be blank, got {self.model_name!r}"),
            (isinstance(self.api_keys, tuple),
             f"api_keys must be a tuple, got {type(self.api_keys).__name__}"),
            (all(key and key == key.strip() for key in self.api_keys),
             "api_keys must be non-empty and have no surrounding whitespace"),
            (self.max_body_bytes >= 1024,
             f"max_body_bytes must be >= 1024, got {self.max_body_bytes}"),
            (self.request_timeout_s > 0,
             f"request_timeout_s must be > 0, got {self.request_timeout_s}"),
            (self.header_timeout_s > 0,
             f"header_timeout_s must be > 0, got {self.header_timeout_s}"),
            (self.body_timeout_s > 0, f"body_timeout_s must be > 0, got {self.body_timeout_s}"),
            (self.max_connections >= 1,
             f"max_connections must be >= 1, got {self.max_connections}"),
            ((self.ssl_certfile is None) == (self.ssl_keyfile is None),
             f"ssl_certfile and ssl_keyfile go together, got certfile={self.ssl_certfile!r} "
             f"keyfile={self.ssl_keyfile!r}"),
            (self.shutdown_grace_s >= 0,
             f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}"),
            (self.llm_streams is None or self.llm_streams >= 0,
             f"llm_streams must be >= 0, got {self.llm_streams}"),
            (self.max_concurrent_per_key is None or self.max_concurrent_per_key >= 1,
             f"max_concurrent_per_key must be >= 1, got {self.max_concurrent_per_key}"),
        ]
        problems = [message for ok, message in checks if not ok]
        problems += self.llm_tls.problems("llm_tls_", server=False)
        if problems:
            raise ValueError(problems[0])

    @property
    def generate_streams(self) -> int:
        """GenerateMany calls to multiplex generations over (llm_streams resolved)."""
        if self.llm_streams is not None:
            return self.llm_streams
        return 0 if _DNS_TARGET.match(self.llm_address) else 1

    @property
    def llm_tls(self) -> TlsFiles:
        """The channel to the LLM service: TLS when a CA is given, mTLS with a certificate."""
        return TlsFiles(self.llm_tls_cert, self.llm_tls_key, self.llm_tls_ca)

