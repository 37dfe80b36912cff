"""Imports the generated stubs with a helpful error when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

_HINT = "gRPC stubs are not generated: run `python protos/generate.py` (make does this for you)"


def load(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"protos.{name}")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("protos."):
            raise ModuleNotFoundError(f"{_HINT}; missing {exc.name}") from exc
        raise
