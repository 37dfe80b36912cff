"""Installs mmserve around NVIDIA's TensorRT-LLM container, never over it, and proves the result.

The container's torch, transformers and tensorrt_llm belong together (TensorRT-LLM 1.2 pins
transformers 4.57); replacing any of them breaks `import tensorrt_llm`. So (deploy/docker/
Dockerfile.gpu):

    python gpu_env.py snapshot /tmp/container.txt        # the base image's packages + pip check
    python gpu_env.py requirements pyproject.toml gpu    # mmserve's requirements, one a line
    pip install -c /tmp/container.txt -r requirements.txt   # adds, or fails on a conflict
    python gpu_env.py check-deps /tmp/container.txt      # nothing replaced, no new pip check issue
    python gpu_env.py check-imports                      # the executor binding and our modules

Each step exits 1 with the reason on a broken environment, so the image build stops there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

PIP_CHECK_SUFFIX = ".pip-check"
# Imports that must work together in the serving image, with what each proves.
IMPORTS = (
    ("llm_service.engine.trtllm.engine", "mmserve's TensorRT-LLM engine module"),
    ("encoder_service.towers.tensorrt", "mmserve's TensorRT vision tower module"),
    ("tensorrt", "TensorRT's Python API"),
)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """Every installed distribution: normalized name -> version."""
    found = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def constraints(packages: dict[str, str]) -> str:
    """A pip constraints file that pins every package to the version it has."""
    return "".join(f"{name}=={version}\n" for name, version in sorted(packages.items()))


def parse_constraints(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        name, sep, version = line.strip().partition("==")
        if sep:
            pins[normalize(name)] = version
    return pins


def replaced(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Packages of `before` whose version changed or that are gone, as readable lines."""
    return [f"{name} {version} -> {after.get(name, 'removed')}"
            for name, version in sorted(before.items()) if after.get(name) != version]


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """mmserve's dependencies plus the named extras' (torch included: the constraints keep
    the container's)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    unknown = sorted(set(extras) - set(optional))
    if unknown:
        raise SystemExit(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    return [*project["dependencies"], *(d for extra in extras for d in optional[extra])]


def pip_check() -> list[str]:
    """`pip check` complaints, one a line (empty when the environment is consistent)."""
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                            text=True, check=False)
    if result.returncode == 0:
        return []
    return [line for line in result.stdout.splitlines() if line.strip()]


def new_problems(base: list[str], now: list[str]) -> list[str]:
    """pip check lines that the base image did not already have."""
    return [line for line in now if line not in set(base)]


def check_deps(snapshot: Path) -> list[str]:
    errors = [f"replaced a package of the base image: {line}"
              for line in replaced(parse_constraints(snapshot.read_text()), installed())]
    base_path = snapshot.with_name(snapshot.name + PIP_CHECK_SUFFIX)
    base = base_path.read_text().splitlines() if base_path.is_file() else []
    errors += [f"pip check: {line}" for line in new_problems(base, pip_check())]
    return errors


def check_imports() -> list[str]:
    """Loads the executor binding as the LLM service does, then the modules beside it."""
    from llm_service.engine.trtllm.bindings import binding_version, load_bindings

    errors = []
    try:
        print(f"TensorRT-LLM {binding_version(load_bindings())}: C++ executor binding loads")
    except ValueError as exc:
        errors.append(str(exc))
    for module, what in IMPORTS:
        try:
            importlib.import_module(module)
            print(f"{module}: imports ({what})")
        except Exception as exc:  # any failure here is a broken image
            errors.append(f"{module} ({what}) does not import: {type(exc).__name__}: {exc}")
    for name in ("torch", "transformers", "tensorrt"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            print(f"{name} {metadata.version(name)}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    snap = commands.add_parser("snapshot", help="write the installed packages as constraints")
    snap.add_argument("out", type=Path)
    req = commands.add_parser("requirements", help="print mmserve's requirements")
    req.add_argument("pyproject", type=Path)
    req.add_argument("extras", nargs="*")
    deps = commands.add_parser("check-deps", help="compare with a snapshot; pip check")
    deps.add_argument("snapshot", type=Path)
    commands.add_parser("check-imports", help="import the executor binding and our modules")
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        args.out.write_text(constraints(installed()))
        args.out.with_name(args.out.name + PIP_CHECK_SUFFIX).write_text(
            "".join(f"{line}\n" for line in pip_check()))
        return 0
    if args.command == "requirements":
        print("\n".join(requirements(args.pyproject, args.extras)))
        return 0
    errors = check_deps(args.snapshot) if args.command == "check-deps" else check_imports()
    for error in errors:
        print(f"gpu_env: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
