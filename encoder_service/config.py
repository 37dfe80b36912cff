"""The encoder service's one configuration object, built once at start-up.

Precedence, lowest to highest: the defaults below, the `encoder:` section of the
model YAML (read with mmserve.modelconfig, shared with the LLM service), then
command-line flags (whose defaults come from `MMSERVE_ENCODER_*` environment
variables, read only in `__main__`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from encoder_service.families import FAMILIES as _FAMILY_MODULES
from mmserve.rpc.tls import TlsFiles
from mmserve.wire.dtypes import DTYPE_NAMES

MIB = 1024 * 1024
# gRPC's default maximum message size; every embedding chunk must stay below it.
GRPC_MESSAGE_LIMIT = 4 * MIB

FAMILIES = tuple(_FAMILY_MODULES)
# torch: the real tower of `family`, loaded from `checkpoint`; tensorrt: the same tower as a
# TensorRT engine (`tensorrt_engine`), with `checkpoint` for its configuration.
TOWERS = ("demo", "torch", "tensorrt")
DEMO_HIDDEN_SIZE = 576  # the embedded SmolLM2-135M
MAX_VIDEO_FRAMES = 64
DTYPES = DTYPE_NAMES
DEFAULT_SHM_DIR = "/dev/shm"
STORE_KINDS = ("memory", "directory", "redis")  # media_store.py builds each


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """Everything the encoder service needs; immutable once built."""

    host: str = "127.0.0.1"
    port: int = 50052  # 0 picks a free port (tests)
    family: str = "internvl2"
    tower: str = "demo"
    image_size: int = 448
    max_tiles: int = 12  # InternVL2 max_num: tiles of the grid, the thumbnail comes on top
    use_thumbnail: bool = True
    # The LLM's hidden size. None: the tower's own (the checkpoint's or the engine's;
    # DEMO_HIDDEN_SIZE for the demo tower); when given, the loaded tower must match it.
    hidden_size: int | None = None
    checkpoint: str | None = None  # torch tower's checkpoint dir (config.json + *.safetensors)
    tensorrt_engine: str | None = None  # tower tensorrt: the serialized vision engine
    device: str = "cpu"  # torch device of the torch tower: cpu, cuda, cuda:N
    video_frames: int = 8  # frames sampled from a video when the request says 0
    # Frames counted (from packets, not decoded) before a video is refused: 1 h at 30 fps.
    max_video_scanned_frames: int = 108_000
    dtype: str = "float32"  # dtype of the embedding rows sent to the LLM
    seed: int = 0  # seeds the demo tower's random weights
    max_batch_tiles: int = 32  # tiles per tower call, across concurrent requests
    max_media_bytes: int = 20 * MIB
    max_image_pixels: int = 40_000_000  # checked from the header, before decoding
    max_items_per_request: int = 16
    # Budgets a request's media are planned against (from headers, before decoding); 0: off.
    max_request_pixels: int = 160_000_000
    max_request_rows: int = 0
    # Decoded pixels (and tower input) in flight across requests; past it, 429. 0: off.
    max_decoded_bytes: int = 2048 * MIB
    # Longer audio items are refused; Megrez encodes the first 30 s of what it accepts.
    max_audio_seconds: float = 30.0
    allow_http: bool = True  # fetch http:// and https:// URLs at all
    allow_private_networks: bool = False  # let URLs reach loopback/private/link-local hosts
    allowed_domains: tuple[str, ...] = ()  # empty: any domain; else the host or its subdomains
    allowed_local_media_path: str | None = None  # None: file:// URLs are refused
    http_connect_timeout_s: float = 5.0
    http_read_timeout_s: float = 10.0
    http_total_timeout_s: float = 30.0  # caps slow-drip responses as a whole
    max_redirects: int = 3
    chunk_bytes: int = 3 * MIB
    # Directory for same-host embedding files offered by callers that can prove they see it.
    # None: DEFAULT_SHM_DIR when it exists; empty: rows always go in-band.
    shm_dir: str | None = None
    # Region bytes written and not yet taken by the caller; over it, rows go in-band.
    shm_quota_bytes: int = 256 * MIB
    shm_stale_s: float = 10.0  # unread regions older than this are removed
    cache_capacity_bytes: int = 512 * MIB  # this replica's LRU: embeddings + decoded sources
    # Where the media behind `mm://` handles lives (media_store.py): memory (this process
    # only), directory (a volume all replicas mount: media_store_path) or redis
    # (media_store_url, e.g. redis://redis:6379/0).
    media_store: str = "memory"
    media_store_path: str = ""
    media_store_url: str = ""
    media_store_capacity_bytes: int = 1024 * MIB  # memory and directory; Redis: its maxmemory
    media_store_ttl_s: float = 24 * 3600.0  # a handle unused for this long is forgotten
    media_store_timeout_s: float = 1.0  # slower than this: the handle fails with a 503
    metrics_port: int | None = None  # Prometheus /metrics over HTTP; None: off, 0: any free port
    # Seconds in-flight calls get after SIGTERM; below the pod's terminationGracePeriodSeconds.
    shutdown_grace_s: float = 30.0
    internal_token_file: str | None = None  # callers must send the shared token in it
    otlp_endpoint: str | None = None  # OTLP/gRPC collector for traces; None: tracing off
    # TLS: server certificate and key; with a CA, clients must present a certificate it signed.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        # Normalise list-like input (YAML lists, repeated flags) so the object stays hashable.
        object.__setattr__(self, "allowed_domains",
                           tuple(d.strip().lower().rstrip(".") for d in self.allowed_domains))
        if self.shm_dir is None:
            object.__setattr__(self, "shm_dir",
                               DEFAULT_SHM_DIR if os.path.isdir(DEFAULT_SHM_DIR) else "")
        elif self.shm_dir:
            object.__setattr__(self, "shm_dir", os.path.normpath(self.shm_dir))
        if self.tower == "demo" and self.hidden_size is None:
            object.__setattr__(self, "hidden_size", DEMO_HIDDEN_SIZE)
        checks = [
            (self.tower not in ("torch", "tensorrt") or bool(self.checkpoint),
             f"tower {self.tower} needs checkpoint (a checkpoint directory)"),
            (self.tower != "tensorrt" or bool(self.tensorrt_engine),
             "tower tensorrt needs tensorrt_engine (a serialized engine file)"),
            (bool(self.host), f"host must not be empty, got {self.host!r}"),
            (0 <= self.port <= 65535, f"port must be in [0, 65535], got {self.port}"),
            (self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}"),
            (self.tower in TOWERS, f"tower must be one of {TOWERS}, got {self.tower!r}"),
            (self.image_size > 0 and self.image_size % 28 == 0,
             f"image_size must be a positive multiple of 28 (patch 14, pixel shuffle 0.5), "
             f"got {self.image_size}"),
            (1 <= self.max_tiles <= 64, f"max_tiles must be in [1, 64], got {self.max_tiles}"),
            (self.hidden_size is None or self.hidden_size > 0,
             f"hidden_size must be > 0, got {self.hidden_size}"),
            (self.device == "cpu" or self.device.split(":")[0] == "cuda",
             f"device must be cpu, cuda or cuda:N, got {self.device!r}"),
            (1 <= self.video_frames <= MAX_VIDEO_FRAMES,
             f"video_frames must be in [1, {MAX_VIDEO_FRAMES}], got {self.video_frames}"),
            (self.max_video_scanned_frames >= 1,
             f"max_video_scanned_frames must be >= 1, got {self.max_video_scanned_frames}"),
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.max_batch_tiles >= 1,
             f"max_batch_tiles must be >= 1, got {self.max_batch_tiles}"),
            (self.max_media_bytes > 0,
             f"max_media_bytes must be > 0, got {self.max_media_bytes}"),
            (self.max_image_pixels > 0,
             f"max_image_pixels must be > 0, got {self.max_image_pixels}"),
            (self.max_items_per_request >= 1,
             f"max_items_per_request must be >= 1, got {self.max_items_per_request}"),
            (self.max_request_pixels >= 0,
             f"max_request_pixels must be >= 0, got {self.max_request_pixels}"),
            (self.max_request_rows >= 0,
             f"max_request_rows must be >= 0, got {self.max_request_rows}"),
            (self.max_decoded_bytes >= 0,
             f"max_decoded_bytes must be >= 0, got {self.max_decoded_bytes}"),
            (0 < self.max_audio_seconds <= 3600,
             f"max_audio_seconds must be in (0, 3600], got {self.max_audio_seconds}"),
            (all(self.allowed_domains),
             f"allowed_domains must not contain empty names, got {self.allowed_domains}"),
            (self.allowed_local_media_path is None or Path(self.allowed_local_media_path).is_dir(),
             f"allowed_local_media_path must be an existing directory, "
             f"got {self.allowed_local_media_path!r}"),
            (self.http_connect_timeout_s > 0,
             f"http_connect_timeout_s must be > 0, got {self.http_connect_timeout_s}"),
            (self.http_read_timeout_s > 0,
             f"http_read_timeout_s must be > 0, got {self.http_read_timeout_s}"),
            (self.http_total_timeout_s > 0,
             f"http_total_timeout_s must be > 0, got {self.http_total_timeout_s}"),
            (0 <= self.max_redirects <= 10,
             f"max_redirects must be in [0, 10], got {self.max_redirects}"),
            # Headroom below the gRPC limit for the chunk's own protobuf fields.
            (1024 <= self.chunk_bytes <= GRPC_MESSAGE_LIMIT - 64 * 1024,
             f"chunk_bytes must be in [1024, {GRPC_MESSAGE_LIMIT - 64 * 1024}] "
             f"(below the 4 MiB gRPC message limit), got {self.chunk_bytes}"),
            (not self.shm_dir or Path(self.shm_dir).is_dir(),
             f"shm_dir must be an existing directory or empty, got {self.shm_dir!r}"),
            (self.shm_quota_bytes >= 0,
             f"shm_quota_bytes must be >= 0, got {self.shm_quota_bytes}"),
            (self.shm_stale_s > 0, f"shm_stale_s must be > 0, got {self.shm_stale_s}"),
            (self.metrics_port is None or 0 <= self.metrics_port <= 65535,
             f"metrics_port must be in [0, 65535], got {self.metrics_port}"),
            (self.cache_capacity_bytes >= 0,
             f"cache_capacity_bytes must be >= 0, got {self.cache_capacity_bytes}"),
            (self.media_store in STORE_KINDS,
             f"media_store must be one of {STORE_KINDS}, got {self.media_store!r}"),
            (self.media_store != "directory" or Path(self.media_store_path).is_dir(),
             f"media_store directory needs media_store_path, an existing directory, "
             f"got {self.media_store_path!r}"),
            (self.media_store != "redis"
             or self.media_store_url.startswith(("redis://", "rediss://", "unix://")),
             f"media_store redis needs media_store_url redis://host:port/db (or rediss://), "
             f"got {_redacted(self.media_store_url)!r}"),
            (self.media_store_capacity_bytes > 0,
             f"media_store_capacity_bytes must be > 0, got {self.media_store_capacity_bytes}"),
            (self.media_store_ttl_s > 0,
             f"media_store_ttl_s must be > 0, got {self.media_store_ttl_s}"),
            (0 < self.media_store_timeout_s <= 60,
             f"media_store_timeout_s must be in (0, 60], got {self.media_store_timeout_s}"),
            (self.shutdown_grace_s >= 0,
             f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}"),
        ]
        errors = [message for ok, message in checks if not ok]
        errors += self.server_tls.problems("tls_", server=True)
        if errors:
            raise ValueError("invalid encoder config: " + "; ".join(errors))

    def to_dict_redacted(self) -> dict[str, Any]:
        """to_dict() without the media store's password, to print or log."""
        values = self.to_dict()
        values["media_store_url"] = _redacted(self.media_store_url)
        return values

    @property
    def checkpoint_dir(self) -> str:
        """The checkpoint of a torch or TensorRT tower (validation made sure there is one)."""
        if not self.checkpoint:
            raise ValueError(f"tower {self.tower} needs checkpoint (a checkpoint directory)")
        return self.checkpoint

    @property
    def server_tls(self) -> TlsFiles:
        return TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)

    @classmethod
    def from_sources(cls, yaml_section: dict[str, Any] | None,
                     args: argparse.Namespace | None = None) -> EncoderConfig:
        """Merges the YAML `encoder:` section and parsed flags (flags win; None = not given)."""
        names = {f.name for f in dataclasses.fields(cls)}
        section = dict(yaml_section or {})
        unknown = sorted(set(section) - names)
        if unknown:
            raise ValueError(f"unknown keys in the encoder: section of the model YAML: {unknown}; "
                             f"valid keys are {sorted(names)}")
        values = section
        for name, value in vars(args or argparse.Namespace()).items():
            if name in names and value is not None:
                values[name] = value
        if isinstance(values.get("allowed_domains"), str):
            values["allowed_domains"] = (values["allowed_domains"],)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain values in field order, e.g. to print the effective config as YAML."""
        values = dataclasses.asdict(self)
        values["allowed_domains"] = list(self.allowed_domains)
        return values



def _redacted(url: str) -> str:
    """`url` with any password replaced, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
