"""`python -m mmserve.run --tls-*` hands each service the flags that give mutual TLS on both
gRPC links: checked by parsing each command with that service's own parser and config."""

from __future__ import annotations

from pathlib import Path

import pytest

from encoder_service.__main__ import build_config as encoder_config
from encoder_service.__main__ import parse_args as encoder_args
from gateway.__main__ import build_config as gateway_config
from gateway.__main__ import parse_args as gateway_args
from llm_service.__main__ import parse_args as llm_args
from llm_service.config import LLMConfig
from mmserve.modelconfig import load_model_config
from mmserve.run import commands, parse_args


def flags(command: list[str]) -> list[str]:
    return command[3:]  # after `python -m <service>`


def test_tls_flags_reach_every_service(tmp_path: Path) -> None:
    ca, cert, key = (str(tmp_path / name) for name in ("ca.pem", "cert.pem", "key.pem"))
    cmds = commands(parse_args(["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key]))

    encoder = encoder_config(encoder_args(flags(cmds["encoder"]), {}))
    assert (encoder.tls_cert, encoder.tls_key, encoder.tls_ca) == (cert, key, ca)

    args = llm_args(flags(cmds["llm"]), {})
    llm = LLMConfig.from_sources(load_model_config(args.config), args)
    assert (llm.tls_cert, llm.tls_key, llm.tls_ca) == (Path(cert), Path(key), Path(ca))
    assert (llm.encoder_tls_cert, llm.encoder_tls_key, llm.encoder_tls_ca) == (
        Path(cert), Path(key), Path(ca))

    gateway = gateway_config(gateway_args(flags(cmds["gateway"]), {}))
    assert (gateway.llm_tls_cert, gateway.llm_tls_key, gateway.llm_tls_ca) == (cert, key, ca)


def test_without_tls_flags_every_link_is_plaintext() -> None:
    cmds = commands(parse_args([]))
    assert not any("tls" in arg for command in cmds.values() for arg in command)


def test_tls_flags_go_together(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--tls-cert", "cert.pem"])
    assert "go together" in capsys.readouterr().err
