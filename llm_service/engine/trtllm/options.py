"""TensorRT-LLM engine settings: the YAML `engine:` section and the built engine's config.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SCHEDULER_POLICIES = ("guaranteed_no_evict", "max_utilization")
ENGINE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Keys shared with the torch engine (and its command-line flags), renamed to ours.
ALIASES = {
    "max_num_seqs": "max_batch_size",
    "max_num_batched_tokens": "max_num_tokens",
    "enable_prefix_caching": "enable_block_reuse",
    "max_waiting": "max_queue_size",
}
# Torch-engine keys that a built TensorRT engine fixes (block size, dtype) or has no use for.
IGNORED = ("block_size", "device", "dtype", "kv_cache_bytes")


@dataclass(frozen=True, slots=True)
class TrtllmOptions:
    """What the model YAML may set under `engine:` (with `kind: trtllm`).

    None for a size means "the value the engine was built with".
    """

    engine_dir: Path | None = None  # the trtllm-build output; default: the model directory
    # The HF tokenizer (tokenizer.json) guided decoding compiles grammars against; default:
    # the model directory.
    tokenizer_dir: Path | None = None
    guided_decoding: bool = True  # structured outputs through the executor's XGrammar backend
    free_gpu_memory_fraction: float = 0.9  # of the GPU memory free after loading, for KV blocks
    kv_cache_max_tokens: int | None = None  # cap on KV tokens; the smaller of the two caps wins
    enable_block_reuse: bool = True  # KV prefix reuse (engine built with paged context FMHA)
    host_cache_size: int = 0  # bytes of pinned host memory for offloaded KV blocks
    scheduler_policy: str = "guaranteed_no_evict"  # or "max_utilization" (may pause requests)
    enable_chunked_context: bool = True  # prefill long prompts in chunks
    max_queue_size: int | None = 256  # queued requests before RESOURCE_EXHAUSTED; None: unbounded
    max_batch_size: int | None = None  # runtime cap, <= the engine's
    max_num_tokens: int | None = None  # runtime cap, <= the engine's
    max_model_len: int | None = None  # cap on prompt + output tokens, <= the engine's max_seq_len
    streaming: bool = True  # False: one response per request (fewer round trips, no deltas)
    pad_id: int | None = None  # default: the request's first EOS id
    iter_stats_max_iterations: int = 1000  # executor-side ring buffer of iteration stats
    stats_interval_s: float = 1.0  # how often the stats buffer is drained
    await_timeout_ms: int = 50  # response pump wake-up period (bounds shutdown latency)
    shutdown_timeout_s: float = 30.0  # how long shutdown waits for the executor

    def __post_init__(self) -> None:
        checks = [
            (0.0 < self.free_gpu_memory_fraction <= 1.0,
             f"free_gpu_memory_fraction must be in (0, 1], got {self.free_gpu_memory_fraction}"),
            (self.kv_cache_max_tokens is None or self.kv_cache_max_tokens > 0,
             f"kv_cache_max_tokens must be > 0, got {self.kv_cache_max_tokens}"),
            (self.host_cache_size >= 0,
             f"host_cache_size must be >= 0, got {self.host_cache_size}"),
            (self.scheduler_policy in SCHEDULER_POLICIES,
             f"scheduler_policy must be one of {SCHEDULER_POLICIES}, "
             f"got {self.scheduler_policy!r}"),
            (self.max_queue_size is None or self.max_queue_size > 0,
             f"max_queue_size must be > 0 or null, got {self.max_queue_size}"),
            (self.max_batch_size is None or self.max_batch_size > 0,
             f"max_batch_size must be > 0, got {self.max_batch_size}"),
            (self.max_num_tokens is None or self.max_num_tokens > 0,
             f"max_num_tokens must be > 0, got {self.max_num_tokens}"),
            (self.max_model_len is None or self.max_model_len > 1,
             f"max_model_len must be > 1, got {self.max_model_len}"),
            (self.iter_stats_max_iterations > 0,
             f"iter_stats_max_iterations must be > 0, got {self.iter_stats_max_iterations}"),
            (self.stats_interval_s > 0,
             f"stats_interval_s must be > 0, got {self.stats_interval_s}"),
            (self.await_timeout_ms > 0,
             f"await_timeout_ms must be > 0, got {self.await_timeout_ms}"),
            (self.shutdown_timeout_s > 0,
             f"shutdown_timeout_s must be > 0, got {self.shutdown_timeout_s}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"engine (trtllm): {message}")

    @classmethod
    def from_dict(cls, model_dir: Path, options: dict[str, Any]) -> TrtllmOptions:
        ignored = sorted(set(options) & set(IGNORED))
        if ignored:
            log.warning("engine options %s do not apply to kind trtllm (fixed when the engine "
                        "was built); ignoring them", ignored)
        values = {ALIASES.get(key, key): value for key, value in options.items()
                  if key not in IGNORED}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown engine options {unknown} for kind trtllm; "
                             f"known: {sorted(known | set(ALIASES))}")
        engine_dir = values.pop("engine_dir", None)
        tokenizer_dir = values.pop("tokenizer_dir", None)
        return cls(engine_dir=Path(engine_dir or model_dir),
                   tokenizer_dir=Path(tokenizer_dir or model_dir), **values)


@dataclass(frozen=True, slots=True)
class EngineLayout:
    """What the engine was built with: `<engine_dir>/config.json` of a trtllm-build output."""

    architecture: str
    vocab_size: int
    hidden_size: int
    dtype: torch.dtype
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_prompt_embedding_table_size: int
    tokens_per_block: int

    @property
    def max_prompt_rows(self) -> int:
        """Prompt-table rows one request may use (the executor's per-slot capacity)."""
        return self.max_prompt_embedding_table_size // self.max_batch_size

    @classmethod
    def read(cls, engine_dir: Path) -> EngineLayout:
        path = engine_dir / "config.json"
        if not path.is_file():
            raise ValueError(f"{path} not found: engine_dir must be a trtllm-build output "
                             "directory (see deploy/trtllm/README.md)")
        config = json.loads(path.read_text())
        if "pretrained_config" not in config or "build_config" not in config:
            raise ValueError(f"{path} has no pretrained_config/build_config: an engine built by a "
                             "TensorRT-LLM older than 0.9 or not an engine directory; rebuild it")
        pretrained, build = config["pretrained_config"], config["build_config"]
        plugins = build.get("plugin_config", {})
        mapping = pretrained.get("mapping", {})
        world = mapping.get("tp_size", 1) * mapping.get("pp_size", 1)
        if world != 1:
            raise ValueError(f"{path}: engines split over {world} GPUs are not supported; "
                             "build with tp_size = pp_size = 1")
        kv_cache_type = str(build.get("kv_cache_type", "")).lower()
        paged = plugins.get("paged_kv_cache") or kv_cache_type == "paged"
        if not paged:
            raise ValueError(f"{path}: the engine was built without a paged KV cache; "
                             "rebuild with trtllm-build --kv_cache_type paged")
        dtype = pretrained.get("dtype")
        if dtype not in ENGINE_DTYPES:
            raise ValueError(f"{path}: unsupported engine dtype {dtype!r}; "
                             f"expected one of {sorted(ENGINE_DTYPES)}")
        return cls(
            architecture=pretrained.get("architecture", "unknown"),
            vocab_size=int(pretrained["vocab_size"]),
            hidden_size=int(pretrained["hidden_size"]),
            dtype=ENGINE_DTYPES[dtype],
            max_batch_size=int(build["max_batch_size"]),
            max_input_len=int(build["max_input_len"]),
            max_seq_len=int(build["max_seq_len"]),
            max_prompt_embedding_table_size=int(build.get("max_prompt_embedding_table_size", 0)),
            tokens_per_block=int(plugins.get("tokens_per_block", 0)),
        )
