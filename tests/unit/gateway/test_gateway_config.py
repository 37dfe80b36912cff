from __future__ import annotations

import json

import pytest

from gateway.__main__ import build_config, main, parse_args
from gateway.config import GatewayConfig


def config_from(argv: list[str], env: dict[str, str] | None = None) -> GatewayConfig:
    env = env or {}
    return build_config(parse_args(argv, env))


def test_defaults_are_valid() -> None:
    config = GatewayConfig()
    assert config.llm_address == "127.0.0.1:50051"
    assert config.api_keys == ()
    assert config.max_body_bytes == 32 * 1024 * 1024
    assert config.model_name is None


@pytest.mark.parametrize("address", [
    "127.0.0.1:50051", "llm:50051", "[::1]:50051", "dns:///llm.default.svc.cluster.local:50051",
    "dns://8.8.8.8/llm.example.com:443", "unix:/run/mmserve/llm.sock",
])
def test_accepts_grpc_targets(address: str) -> None:
    assert GatewayConfig(llm_address=address).llm_address == address


@pytest.mark.parametrize(("changes", "message"), [
    ({"port": 70000}, "port must be in [0, 65535], got 70000"),
    ({"llm_address": "llm"}, "got 'llm'"),
    ({"llm_address": "llm:0"}, "got 'llm:0'"),
    ({"llm_address": "dns:///llm"}, "got 'dns:///llm'"),
    ({"model_name": "  "}, "model_name must not be blank"),
    ({"api_keys": ["k"]}, "api_keys must be a tuple, got list"),
    ({"api_keys": ("ok", "")}, "api_keys must be non-empty"),
    ({"api_keys": (" padded",)}, "no surrounding whitespace"),
    ({"max_body_bytes": 10}, "max_body_bytes must be >= 1024, got 10"),
    ({"request_timeout_s": 0}, "request_timeout_s must be > 0, got 0"),
    ({"ssl_certfile": "cert.pem"}, "ssl_certfile and ssl_keyfile go together"),
    ({"llm_tls_ca": "ca.pem", "llm_tls_cert": "c.pem"}, "llm_tls_cert and llm_tls_key go together"),
    ({"llm_tls_cert": "c.pem", "llm_tls_key": "k.pem"}, "llm_tls_cert needs llm_tls_ca"),
])
def test_rejects_bad_values_naming_them(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        GatewayConfig(**changes)


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        GatewayConfig().port = 1  # type: ignore[misc]


def test_flags_default_from_env_and_override_it() -> None:
    env = {"MMSERVE_GATEWAY_PORT": "9000", "MMSERVE_GATEWAY_LLM_ADDRESS": "dns:///llm:50051",
           "MMSERVE_GATEWAY_API_KEY": "a, b", "MMSERVE_GATEWAY_MAX_BODY_BYTES": "4096"}
    from_env = config_from([], env)
    assert (from_env.port, from_env.llm_address, from_env.api_keys, from_env.max_body_bytes) == (
        9000, "dns:///llm:50051", ("a", "b"), 4096)
    flags = config_from(["--port", "9100", "--api-key", "c", "--api-key", "d",
                         "--model-name", "internvl2-1b", "--request-timeout", "30"], env)
    assert (flags.port, flags.api_keys, flags.model_name, flags.request_timeout_s) == (
        9100, ("c", "d"), "internvl2-1b", 30.0)


def test_api_key_file_adds_keys(tmp_path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# team keys\nsk-one\n\n  sk-two  \n")
    config = config_from(["--api-key", "sk-flag", "--api-key-file", str(key_file)])
    assert config.api_keys == ("sk-flag", "sk-one", "sk-two")


def test_tls_flags_reach_the_config() -> None:
    config = config_from(["--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem"])
    assert (config.ssl_certfile, config.ssl_keyfile) == ("c.pem", "k.pem")
    config = config_from(["--llm-tls-ca", "ca.pem", "--llm-tls-cert", "c.pem",
                          "--llm-tls-key", "k.pem"])
    assert (config.llm_tls_ca, config.llm_tls_cert, config.llm_tls_key) == (
        "ca.pem", "c.pem", "k.pem")


def test_print_config_redacts_keys(capsys) -> None:
    assert main(["--print-config", "--api-key", "sk-secret", "--port", "8123"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["port"] == 8123
    assert shown["api_keys"] == ["<redacted>"]
    assert "sk-secret" not in json.dumps(shown)


def test_invalid_flags_exit_with_the_reason(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--print-config", "--llm-address", "nowhere"])
    assert exit_info.value.code == 2
    assert "llm_address must be host:port" in capsys.readouterr().err
