"""Selecting and configuring the TensorRT-LLM engine; start-up failures are one clear line."""

from __future__ import annotations

import sys
import threading
from datetime import timedelta

import pytest

from llm_service.engine.trtllm import TrtllmEngine
from llm_service.engine.trtllm.options import EngineLayout, TrtllmOptions


def test_missing_tensorrt_llm_is_one_line_naming_the_package(engine_dir, monkeypatch):
    for name in [m for m in sys.modules if m.startswith("tensorrt_llm")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes any import of it fail
    with pytest.raises(ValueError) as excinfo:
        TrtllmEngine.from_options(engine_dir, {})
    message = str(excinfo.value)
    assert "\n" not in message
    assert "tensorrt_llm" in message and "nvcr.io/nvidia/tensorrt-llm/release" in message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__


def test_defaults_and_engine_dir(tmp_path):
    options = TrtllmOptions.from_dict(tmp_path, {})
    assert options.engine_dir == tmp_path
    assert (options.free_gpu_memory_fraction, options.enable_block_reuse, options.host_cache_size,
            options.scheduler_policy, options.enable_chunked_context, options.max_queue_size) == (
        0.9, True, 0, "guaranteed_no_evict", True, 256)
    other = TrtllmOptions.from_dict(tmp_path, {"engine_dir": "/engines/x", "max_num_seqs": 8,
                                               "enable_prefix_caching": False, "max_waiting": 9})
    assert (str(other.engine_dir), other.max_batch_size, other.enable_block_reuse,
            other.max_queue_size) == ("/engines/x", 8, False, 9)


def test_torch_engine_keys_fixed_at_build_time_are_ignored(tmp_path, caplog):
    # `--engine trtllm` with a YAML written for the torch engine still starts
    options = TrtllmOptions.from_dict(tmp_path, {"block_size": 16, "dtype": "auto",
                                                 "max_num_seqs": 4})
    assert options.max_batch_size == 4
    assert "['block_size', 'dtype'] do not apply" in caplog.text


@pytest.mark.parametrize("options, message", [
    ({"blocksize": 16}, r"unknown engine options \['blocksize'\]"),
    ({"free_gpu_memory_fraction": 1.5}, "free_gpu_memory_fraction must be in"),
    ({"scheduler_policy": "fifo"}, "scheduler_policy must be one of"),
    ({"max_queue_size": 0}, "max_queue_size must be > 0"),
])
def test_bad_options_are_rejected(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        TrtllmOptions.from_dict(tmp_path, options)


def test_engine_dir_must_be_a_paged_trtllm_build(tmp_path, make_engine_dir):
    with pytest.raises(ValueError, match="config.json not found"):
        TrtllmEngine.from_options(tmp_path, {})
    with pytest.raises(ValueError, match="--kv_cache_type paged"):
        EngineLayout.read(make_engine_dir("contiguous", paged_kv_cache=False))
    layout = EngineLayout.read(make_engine_dir("ok", max_batch_size=2,
                                               max_prompt_embedding_table_size=13312))
    assert layout.max_prompt_rows == 6656


async def test_start_failure_is_a_value_error(tle, engine_dir):
    engine = TrtllmEngine.from_options(engine_dir, {})
    (engine_dir / "config.json").unlink()  # the executor cannot load the engine any more
    with pytest.raises(ValueError, match=r"could not load the engine in .*Failed to open"):
        await engine.start()


def test_fake_await_responses_blocks_without_a_timeout(tle, engine_dir):
    """Why the response pump always passes a timeout: idle, the call never returns."""
    executor = tle.Executor(model_path=engine_dir, model_type=tle.ModelType.DECODER_ONLY,
                            executor_config=tle.ExecutorConfig())
    assert executor.await_responses(timeout=timedelta(milliseconds=1)) == []
    got = []
    waiter = threading.Thread(target=lambda: got.append(executor.await_responses()), daemon=True)
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()
    executor.enqueue_request(request=tle.Request(input_token_ids=[1, 2], max_tokens=1))
    waiter.join(5)
    assert not waiter.is_alive() and got[0][0].result.is_final
    with pytest.raises(TypeError):
        tle.Request([1], 1, True)  # keyword-only after max_tokens, as in the real binding


def test_engine_kind_trtllm_builds_this_engine(engine_dir):
    from llm_service.app import build_engine
    from llm_service.config import LLMConfig

    config = LLMConfig(engine_kind="trtllm", engine_options={"max_queue_size": 4})
    engine = build_engine(config, engine_dir)
    assert isinstance(engine, TrtllmEngine) and engine.vocab_size == 1000
