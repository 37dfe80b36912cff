"""Reading deploy/: compose files as Compose merges them, rendered overlays, the real CLI flags.

All offline: no Docker engine, no cluster. Rendering needs `kubectl` (or `kustomize`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu")
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))


def overlay_id(overlay: str) -> str:
    return f"overlays/{overlay}"


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that understands Compose's `!reset` merge tag."""


class Reset:
    def __init__(self, value: object) -> None:
        self.value = value


def _reset(loader: ComposeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node, deep=True))
    return Reset(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", _reset)


def load_compose(name: str) -> dict:
    with open(COMPOSE_DIR / name) as fh:
        return yaml.load(fh, Loader=ComposeLoader)


def merge_compose(base: object, override: object) -> object:
    """Compose's override semantics for what our files use: mappings merge, `!reset` replaces."""
    if isinstance(override, Reset):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge_compose(base.get(key), value) if key in base else _plain(value)
        return merged
    return _plain(override)


def _plain(value: object) -> object:
    if isinstance(value, Reset):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """`${VAR:-default}` as Compose resolves it, with `env` standing in for the shell."""
    env = env or {}
    return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)


@cache
def render_overlay(overlay: str) -> tuple[dict, ...]:
    path = K8S / "overlays" / overlay
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed: cannot render deploy/k8s overlays")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(out.stdout) if doc)


def objects(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@cache
def console_scripts() -> dict[str, str]:
    """Console script name -> module that `python -m` runs (from pyproject's [project.scripts])."""
    with open(ROOT / "pyproject.toml", "rb") as fh:
        scripts = tomllib.load(fh)["project"]["scripts"]
    return {name: target.split(":")[0].removesuffix(".__main__")
            for name, target in scripts.items()}


def module_of(command: list[str]) -> tuple[str, list[str]]:
    """(module, its arguments) for `mmserve-x ...` or `python -m module ...`."""
    head = Path(command[0]).name
    if head in console_scripts():
        return console_scripts()[head], list(command[1:])
    if re.fullmatch(r"python3?(\.\d+)?", head) and len(command) > 2 and command[1] == "-m":
        return command[2], list(command[3:])
    raise AssertionError(f"not an mmserve entry point: {command}")


_OPTION_LINE = re.compile(r"^ {2}(-\S.*?)(?: {2,}|$)")


@cache
def cli_options(module: str) -> dict[str, frozenset[str] | None]:
    """Every option the real CLI accepts (from `python -m module --help`), with any choices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMSERVE_")}
    out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, f"`python -m {module} --help` failed:\n{out.stderr[-2000:]}"
    options: dict[str, frozenset[str] | None] = {}
    for line in out.stdout.splitlines():
        match = _OPTION_LINE.match(line)
        if not match:
            continue
        for spec in match.group(1).split(", "):
            name, _, metavar = spec.partition(" ")
            choices = re.fullmatch(r"\{(.+)\}", metavar)
            options[name] = frozenset(choices.group(1).split(",")) if choices else None
    assert "--help" in options, f"could not read the options of `python -m {module} --help`"
    return options


def flag_value(args: list[str], flag: str) -> str | None:
    """The value given to `flag` (`--flag value` or `--flag=value`), or None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = (line.strip() for line in text.splitlines())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in lines if line and not line.startswith("#")]


def dockerfile_cmd(path: Path) -> list[str]:
    (cmd,) = [rest for op, rest in dockerfile_instructions(path) if op == "CMD"]
    return json.loads(cmd)
