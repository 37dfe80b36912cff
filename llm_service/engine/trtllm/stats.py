"""Executor iteration stats -> EngineStats.

`get_latest_iteration_stats()` returns the iterations since the previous call and empties
the executor's buffer, so one reader drains it periodically and keeps the newest snapshot.
"""

from __future__ import annotations

from llm_service.engine.protocol import EngineStats


def to_engine_stats(iterations: list, tokens_per_block: int, previous: EngineStats) -> EngineStats:
    """The newest iteration's view; `previous` when nothing ran since the last drain.

    kv_blocks_cached stays 0: the executor reports no count of idle blocks that still hold
    reusable prefixes; reuse shows in prefix_hit_rate.
    """
    if not iterations:
        return previous
    latest = iterations[-1]
    stats = EngineStats(
        block_size=tokens_per_block,
        running=int(latest.num_active_requests),
        waiting=int(getattr(latest, "num_queued_requests", 0)),
        step_time_ms=float(getattr(latest, "iter_latency_ms", 0.0)),
        kv_blocks_total=previous.kv_blocks_total,
        kv_blocks_used=previous.kv_blocks_used,
        prefix_hit_rate=previous.prefix_hit_rate,
    )
    kv = latest.kv_cache_stats  # None for engines without a KV cache manager
    if kv is not None:
        stats.kv_blocks_total = int(kv.max_num_blocks)
        stats.kv_blocks_used = int(kv.used_num_blocks)
        stats.prefix_hit_rate = _hit_rate(kv)
        if kv.tokens_per_block:
            stats.block_size = int(kv.tokens_per_block)
    return stats


def _hit_rate(kv) -> float:
    # The block counters are running totals; newer bindings also report the rate itself.
    rate = getattr(kv, "cache_hit_rate", None)
    if rate is not None:
        return float(rate)
    missed = getattr(kv, "missed_blocks", None)
    if missed is None:
        missed = kv.alloc_new_blocks
    total = kv.reused_blocks + missed
    return kv.reused_blocks / total if total else 0.0
