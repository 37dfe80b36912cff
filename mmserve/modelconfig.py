"""The model YAML both services read: which model, which family, which limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "smollm2-demo.yaml"
SECTIONS = ("model", "llm", "engine", "encoder")


def load_model_config(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Parses the YAML file (the embedded default when path is None) into its sections."""
    path = Path(path) if path else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ValueError(f"model config {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"model config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path} must be a mapping of sections {SECTIONS}")
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ValueError(f"model config {path} has unknown sections {unknown}; known: {SECTIONS}")
    sections = {}
    for name in SECTIONS:
        section = data.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"model config {path}: section {name!r} must be a mapping")
        sections[name] = section
    return sections
