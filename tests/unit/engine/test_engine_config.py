from __future__ import annotations

from pathlib import Path

import pytest

from llm_service.engine.config import EngineConfig


def test_defaults_and_path_coercion():
    config = EngineConfig(model_dir="/models/x")
    assert config.model_dir == Path("/models/x")
    assert (config.block_size, config.max_num_seqs, config.max_num_batched_tokens) == (128, 64, 512)
    assert config.enable_prefix_caching and config.scheduling == "fcfs"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("dtype", "float64", "dtype must be one of .* got 'float64'"),
    ("device", "tpu", "device must be one of .* got 'tpu'"),
    ("block_size", 0, "block_size must be in .* got 0"),
    ("kv_cache_bytes", 0, "kv_cache_bytes must be > 0 or None, got 0"),
    ("kv_cache_fraction", 1.5, r"kv_cache_fraction must be in \(0, 1\], got 1.5"),
    ("max_num_seqs", 0, "max_num_seqs must be >= 1, got 0"),
    ("max_num_batched_tokens", 8, r"max_num_batched_tokens \(8\) must be >= max_num_seqs \(64\)"),
    ("max_model_len", 1, "max_model_len must be >= 2 or None, got 1"),
    ("max_waiting", 0, "max_waiting must be >= 1, got 0"),
    ("scheduling", "lifo", "scheduling must be one of .* got 'lifo'"),
])
def test_invalid_values_are_refused_with_the_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(model_dir=Path("m"), **{field: value})


def test_the_config_is_frozen():
    config = EngineConfig(model_dir=Path("m"))
    with pytest.raises(AttributeError):
        config.block_size = 32


def test_panels_asked_for_where_they_cannot_run_is_refused_with_the_way_out(tmp_path):
    from llm_service.engine.model_runner import ModelRunner
    from tiny_checkpoints import save_checkpoint

    save_checkpoint(tmp_path, "llama")
    with pytest.raises(ValueError, match="cpu_linear is 'panels'.*use 'auto' or 'onednn'"):
        ModelRunner(EngineConfig(model_dir=tmp_path, device="cpu", cpu_kernels="off",
                                 cpu_linear="panels", kv_cache_bytes=1 << 20))
    with pytest.raises(ValueError, match="cpu_linear must be one of"):
        EngineConfig(model_dir=tmp_path, cpu_linear="mkl")
