"""Runs the TensorRT-LLM engine against the fake bindings in tests/fakes."""

from __future__ import annotations

import asyncio
import importlib
import json
import sys
from pathlib import Path

import pytest

FAKES = Path(__file__).resolve().parents[2] / "fakes"


def _trtllm_modules() -> list[str]:
    return [name for name in sys.modules
            if name == "tensorrt_llm" or name.startswith("tensorrt_llm.")]


VERSION_VARIABLE = "MMSERVE_FAKE_TRTLLM_VERSION"


@pytest.fixture(autouse=True)
def tle(monkeypatch):
    """The fake `tensorrt_llm.bindings.executor` (1.2 flavour), importable for one test.

    Any real tensorrt_llm already imported is set aside and restored afterwards, so the
    gpu tests in the same session still see the real package.
    """
    for name in _trtllm_modules():
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.delenv(VERSION_VARIABLE, raising=False)
    monkeypatch.syspath_prepend(str(FAKES))
    module = importlib.import_module("tensorrt_llm.bindings.executor")
    yield module
    for name in _trtllm_modules():
        sys.modules.pop(name, None)


@pytest.fixture
async def start(tle, engine_dir):
    """start(**options) -> (a started TrtllmEngine on the fake, the fake executor it made),
    for whichever flavour is imported when it is called; all shut down after the test."""
    from llm_service.engine.trtllm import TrtllmEngine

    engines = []

    async def make(**options):
        engine = TrtllmEngine.from_options(engine_dir, {"stats_interval_s": 0.01,
                                                        "await_timeout_ms": 5, **options})
        await engine.start()
        engines.append(engine)
        from tensorrt_llm.bindings import executor

        return engine, executor.instances[-1]

    yield make
    for engine in engines:
        await asyncio.wait_for(engine.shutdown(), 5)


@pytest.fixture
def fake_flavour(tle, monkeypatch):
    """fake_flavour("0.13.0") re-imports the fake as that TensorRT-LLM version; returns the
    executor module, or None where that version has no `tensorrt_llm.bindings.executor`."""

    def load(version: str):
        for name in _trtllm_modules():
            sys.modules.pop(name, None)
        monkeypatch.setenv(VERSION_VARIABLE, version)
        return importlib.import_module("tensorrt_llm.bindings.executor")

    return load


def write_engine_dir(path: Path, *, vocab_size=1000, hidden_size=16, dtype="float16",
                     max_batch_size=4, max_input_len=256, max_seq_len=320,
                     max_prompt_embedding_table_size=256, tokens_per_block=4,
                     paged_kv_cache=True) -> Path:
    """A directory shaped like trtllm-build output (config.json only; the fake needs no weights)."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "version": "0.16.0",
        "pretrained_config": {
            "architecture": "LlamaForCausalLM", "dtype": dtype, "vocab_size": vocab_size,
            "hidden_size": hidden_size, "num_hidden_layers": 2, "num_attention_heads": 2,
            "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
            "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        },
        "build_config": {
            "max_batch_size": max_batch_size, "max_input_len": max_input_len,
            "max_seq_len": max_seq_len, "max_num_tokens": max_seq_len * max_batch_size,
            "max_prompt_embedding_table_size": max_prompt_embedding_table_size,
            "kv_cache_type": "PAGED" if paged_kv_cache else "CONTINUOUS",
            "plugin_config": {"paged_kv_cache": paged_kv_cache,
                              "tokens_per_block": tokens_per_block,
                              "use_paged_context_fmha": True, "remove_input_padding": True,
                              "context_fmha": True, "gpt_attention_plugin": dtype},
        },
    }
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture
def make_engine_dir(tmp_path):
    """write_engine_dir under this test's tmp_path: make_engine_dir(name, **build_values)."""
    return lambda name="engine", **values: write_engine_dir(tmp_path / name, **values)


@pytest.fixture
def engine_dir(make_engine_dir) -> Path:
    return make_engine_dir()
