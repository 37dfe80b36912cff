"""Iteration stats -> EngineStats across binding versions; the executor's buffer drains."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

from llm_service.engine.protocol import EngineStats
from llm_service.engine.trtllm.stats import to_engine_stats


def iteration(kv=None, active=2, queued=1):
    return SimpleNamespace(num_active_requests=active, num_queued_requests=queued,
                           iter_latency_ms=12.5, kv_cache_stats=kv)


def test_newest_iteration_wins_and_nothing_new_keeps_the_last_view():
    kv = SimpleNamespace(max_num_blocks=100, used_num_blocks=30, tokens_per_block=64,
                         reused_blocks=3, missed_blocks=9, alloc_new_blocks=9, cache_hit_rate=0.25)
    stats = to_engine_stats([iteration(active=5), iteration(kv)], 32, EngineStats())
    assert (stats.running, stats.waiting, stats.step_time_ms) == (2, 1, 12.5)
    assert (stats.kv_blocks_total, stats.kv_blocks_used, stats.block_size) == (100, 30, 64)
    assert stats.prefix_hit_rate == 0.25
    assert to_engine_stats([], 32, stats) is stats
    without_kv = to_engine_stats([iteration(None, active=0)], 32, stats)
    assert (without_kv.running, without_kv.kv_blocks_total, without_kv.prefix_hit_rate) == (
        0, 100, 0.25)


def test_older_bindings_without_hit_rate_or_missed_blocks():
    kv = SimpleNamespace(max_num_blocks=10, used_num_blocks=1, tokens_per_block=0,
                         reused_blocks=1, alloc_new_blocks=3)
    assert to_engine_stats([iteration(kv)], 16, EngineStats()).prefix_hit_rate == 0.25


def test_fake_executor_stats_drain(tle, engine_dir):
    executor = tle.Executor(model_path=engine_dir, model_type=tle.ModelType.DECODER_ONLY,
                            executor_config=tle.ExecutorConfig(iter_stats_max_iterations=2))
    executor.enqueue_request(request=tle.Request(input_token_ids=[1, 2, 3], max_tokens=3))
    for _ in range(3):
        executor.await_responses(timeout=timedelta(milliseconds=1))
    drained = executor.get_latest_iteration_stats()
    assert [s.iter for s in drained] == [2, 3]  # a ring buffer of the newest iterations
    assert executor.get_latest_iteration_stats() == []
