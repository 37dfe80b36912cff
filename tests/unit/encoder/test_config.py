"""EncoderConfig validation and the YAML / flag / environment precedence."""

from __future__ import annotations

import argparse
import io
from contextlib import redirect_stdout

import pytest
import yaml

from encoder_service.__main__ import main, parse_args
from encoder_service.config import EncoderConfig


def test_defaults_are_the_embedded_model():
    config = EncoderConfig()
    assert (config.family, config.tower, config.max_tiles, config.hidden_size) == \
        ("internvl2", "demo", 12, 576)
    assert config.max_media_bytes == 20 * 1024 * 1024 and config.chunk_bytes == 3 * 1024 * 1024
    assert config.allow_http and not config.allow_private_networks
    assert config.allowed_local_media_path is None


@pytest.mark.parametrize("field,value,message", [
    ("port", 70000, "port must be in [0, 65535], got 70000"),
    ("dtype", "fp8", "dtype must be one of ('float32', 'float16', 'bfloat16'), got 'fp8'"),
    ("chunk_bytes", 4 * 1024 * 1024, "got 4194304"),
    ("max_tiles", 0, "max_tiles must be in [1, 64], got 0"),
    ("image_size", 450, "positive multiple of 28"),
    ("family", "llava", "got 'llava'"),
    ("allowed_local_media_path", "/no/such/dir", "got '/no/such/dir'"),
])
def test_invalid_values_are_named_in_the_error(field, value, message):
    with pytest.raises(ValueError) as info:
        EncoderConfig(**{field: value})
    assert message in str(info.value)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as info:
        EncoderConfig(port=-1, hidden_size=0)
    assert "port" in str(info.value) and "hidden_size" in str(info.value)


def test_domains_are_normalised():
    assert EncoderConfig(allowed_domains=["Example.COM.", " cdn.org"]).allowed_domains == \
        ("example.com", "cdn.org")


def test_flags_override_yaml_and_unset_flags_do_not():
    args = argparse.Namespace(max_tiles=4, dtype=None, config="x.yaml", print_config=False)
    config = EncoderConfig.from_sources({"max_tiles": 6, "dtype": "bfloat16"}, args)
    assert config.max_tiles == 4 and config.dtype == "bfloat16"


def test_unknown_yaml_keys_are_refused():
    with pytest.raises(ValueError, match=r"unknown keys .*\['max_tile'\]"):
        EncoderConfig.from_sources({"max_tile": 6})


def run_main(argv, environ) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(argv, environ)
    return code, out.getvalue()


def test_print_config_merges_yaml_env_and_flags(tmp_path):
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text("encoder:\n  max_tiles: 6\n  hidden_size: 896\n  port: 1111\n")
    environ = {"MMSERVE_ENCODER_PORT": "6000", "MMSERVE_ENCODER_HIDDEN_SIZE": "1024",
               "MMSERVE_ENCODER_ALLOWED_DOMAINS": "a.com, b.org",
               "MMSERVE_ENCODER_ALLOW_PRIVATE_NETWORKS": "true"}
    code, out = run_main(["--config", str(model_yaml), "--print-config", "--hidden-size", "2048",
                          "--dtype", "bfloat16", "--allowed-domain", "c.net"], environ)
    assert code == 0
    encoder = yaml.safe_load(out)["encoder"]
    assert encoder["max_tiles"] == 6  # YAML
    assert encoder["port"] == 6000  # environment over YAML
    assert encoder["hidden_size"] == 2048  # flag over environment
    assert encoder["dtype"] == "bfloat16"
    assert encoder["allowed_domains"] == ["c.net"]  # repeated flags replace the environment list
    assert encoder["allow_private_networks"] is True


def test_environment_lists_and_booleans():
    args = parse_args([], {"MMSERVE_ENCODER_ALLOWED_DOMAINS": "a.com, b.org",
                           "MMSERVE_ENCODER_USE_THUMBNAIL": "no"})
    assert args.allowed_domains == ["a.com", "b.org"] and args.use_thumbnail is False
    assert parse_args(["--no-use-thumbnail"], {}).use_thumbnail is False


def test_bad_environment_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([], {"MMSERVE_ENCODER_PORT": "eighty"})
    assert info.value.code == 2
    assert "MMSERVE_ENCODER_PORT" in capsys.readouterr().err


def test_invalid_config_exits_2_with_the_reason(capsys):
    assert main(["--print-config", "--max-tiles", "0"], {}) == 2
    assert "max_tiles must be in [1, 64], got 0" in capsys.readouterr().err
