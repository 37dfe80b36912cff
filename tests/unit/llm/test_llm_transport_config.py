"""The LLM service's embedding transport settings: YAML `llm:` keys, flags, environment."""

from __future__ import annotations

import pytest

from llm_service.__main__ import parse_args
from llm_service.config import LLMConfig
from mmserve.modelconfig import load_model_config


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in ("MMSERVE_LLM_EMBEDDING_TRANSPORT", "MMSERVE_LLM_SHM_DIR", "MMSERVE_LLM_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def llm_config(argv: list[str], yaml_text: str | None = None, tmp_path=None) -> LLMConfig:
    if yaml_text is not None:
        path = tmp_path / "model.yaml"
        path.write_text(yaml_text)
        argv = ["--config", str(path), *argv]
    args = parse_args(argv)
    return LLMConfig.from_sources(load_model_config(args.config), args)


def test_embedding_transport_from_flags_and_yaml(tmp_path):
    default = llm_config([])
    assert (default.embedding_transport, default.shm_dir) == ("auto", "/dev/shm")
    assert default.encoder_shm_dir == "/dev/shm"
    inband = llm_config(["--embedding-transport", "inband"])
    assert inband.encoder_shm_dir is None
    from_yaml = llm_config([], "llm:\n  embedding_transport: inband\n  shm_dir: /x\n", tmp_path)
    assert (from_yaml.embedding_transport, from_yaml.shm_dir) == ("inband", "/x")
    flags_win = llm_config(["--embedding-transport", "auto", "--shm-dir", str(tmp_path)],
                           "llm:\n  embedding_transport: inband\n", tmp_path)
    assert flags_win.encoder_shm_dir == str(tmp_path)
    assert llm_config(["--shm-dir", ""]).encoder_shm_dir is None
    with pytest.raises(ValueError, match="embedding_transport must be one of"):
        LLMConfig(embedding_transport="shm")


def test_environment_values_are_the_flag_defaults(monkeypatch):
    monkeypatch.setenv("MMSERVE_LLM_EMBEDDING_TRANSPORT", "inband")
    monkeypatch.setenv("MMSERVE_LLM_SHM_DIR", "/run/shared")
    config = llm_config([])
    assert (config.embedding_transport, config.shm_dir) == ("inband", "/run/shared")
    assert llm_config(["--embedding-transport", "auto"]).encoder_shm_dir == "/run/shared"


def test_keys_the_yaml_leaves_out_take_the_defaults(tmp_path):
    config = llm_config([], "model:\n  family: smollm2\nllm: {}\n", tmp_path)
    assert (config.max_media_items, config.model_name, config.shm_dir) == \
        (16, "smollm2-135m-instruct", "/dev/shm")
