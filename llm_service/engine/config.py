"""The torch engine's configuration: one frozen object, built once by the service."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULING = ("fcfs", "priority")
CPU_KERNELS = ("auto", "on", "off")
CPU_LINEARS = ("auto", "onednn", "panels")
PLACEMENTS = ("process", "thread")
CPU_KV_CACHE_BYTES = 512 * 1024**2  # KV budget on CPU when kv_cache_bytes is not given


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_dir: Path  # HF safetensors checkpoint (config.json + *.safetensors)
    dtype: str = "auto"  # "auto": float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # "auto": CUDA when available
    # Tokens per KV block. 128 as in vLLM's CPU backend: decode attention reads each KV head's
    # keys of a block as one run (see KVCache), and longer runs stream faster (SmolLM2, 64
    # sequences, per layer: 1.13 ms at 16, 0.93 at 64, 0.80 at 128 in fp32; 0.94, 0.73, 0.60
    # in bf16). The price: prefixes are cached in whole blocks of 128 tokens.
    block_size: int = 128
    kv_cache_bytes: int | None = None  # KV pool; None: kv_cache_fraction (CUDA), 512 MiB (CPU)
    kv_cache_fraction: float = 0.9  # of free GPU memory after loading the weights
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 512  # token budget of one step (prefill chunks + decodes)
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    enable_prefix_caching: bool = True
    max_waiting: int = 256  # sequences queued before new requests get Overloaded
    scheduling: str = "fcfs"  # "fcfs" or "priority" (EngineRequest.priority, higher first)
    seed: int = 0  # seeds requests that bring no seed of their own
    # Where the step loop runs: its own process (no GIL shared with the service's event loop)
    # or a thread of the service (no process start-up; tests).
    placement: str = "process"
    warm_up: bool = True  # two short requests at start, so the first real one pays no set-up
    # CPU only. cpu_kernels: the C++ kernels (paged decode attention, fused norms, rope and
    # silu), built once and cached; "auto" falls back to plain torch ops when they cannot be
    # built here, "on" refuses to start without them, "off" never builds them.
    cpu_kernels: str = "auto"
    prepack_weights: bool = True  # projections on packed weights (fp32, bf16; see cpu_linear)
    # fp32 on oneDNN's packed weights (cpu_linear resolved to "onednn") with the kernels:
    # steps of up to 4 rows (decodes of a few sequences) read a dense copy of each weight at
    # the memory's speed (mmserve::skinny_linear, 15-30% faster than oneDNN there); the cost
    # is the weights held twice. panel_linear is faster still there and keeps no copy; bf16's
    # packed path is already bandwidth-bound and never keeps one either.
    small_batch_linear: bool = True
    # With the kernels: which packed matmul the projections run. "panels": mmserve::panel_linear
    # (register blocks over k-major panels, handed out to threads dynamically; measured at
    # 1-64 rows against oneDNN's packed linear: fp32 0.94-2.2x on AVX-512, 1.1-1.9x on AVX2,
    # bf16 1.04-2.1x on AVX-512 BF16); "onednn": oneDNN's; "auto": panels for fp32 on x86 with
    # AVX2 + FMA and for bf16 with AVX-512 BF16, oneDNN otherwise.
    cpu_linear: str = "auto"
    keep_freed_memory: bool = True  # glibc keeps freed memory for the next step's temporaries
    cpu_threads: int | None = None  # the engine's torch threads on CPU; None: one per core

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        checks = [
            (self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}"),
            (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
            (1 <= self.block_size <= 1024,
             f"block_size must be in [1, 1024], got {self.block_size}"),
            (self.kv_cache_bytes is None or self.kv_cache_bytes > 0,
             f"kv_cache_bytes must be > 0 or None, got {self.kv_cache_bytes}"),
            (0.0 < self.kv_cache_fraction <= 1.0,
             f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= self.max_num_seqs,
             f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
             f"({self.max_num_seqs}) so every running sequence can decode in one step"),
            (self.max_model_len is None or self.max_model_len >= 2,
             f"max_model_len must be >= 2 or None, got {self.max_model_len}"),
            (self.max_waiting >= 1, f"max_waiting must be >= 1, got {self.max_waiting}"),
            (self.placement in PLACEMENTS,
             f"placement must be one of {PLACEMENTS}, got {self.placement!r}"),
            (self.cpu_threads is None or self.cpu_threads >= 1,
             f"cpu_threads must be >= 1 or None, got {self.cpu_threads}"),
            (self.cpu_kernels in CPU_KERNELS,
             f"cpu_kernels must be one of {CPU_KERNELS}, got {self.cpu_kernels!r}"),
            (self.cpu_linear in CPU_LINEARS,
             f"cpu_linear must be one of {CPU_LINEARS}, got {self.cpu_linear!r}"),
            (self.scheduling in SCHEDULING,
             f"scheduling must be one of {SCHEDULING}, got {self.scheduling!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
