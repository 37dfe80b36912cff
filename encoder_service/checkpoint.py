"""Reading Hugging Face checkpoint directories: config.json and safetensors shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


def read_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {checkpoint_dir}")
    return json.loads(path.read_text())


def load_state_dict(checkpoint_dir: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor whose key starts with `prefix`, from all *.safetensors shards, prefix stripped.

    Only matching tensors are read, so loading the vision tower of a large
    checkpoint does not touch the LLM weights.
    """
    shards = sorted(Path(checkpoint_dir).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors files in checkpoint directory {checkpoint_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    tensors[key[len(prefix):]] = f.get_tensor(key)
    if not tensors:
        raise ValueError(f"no tensors with prefix {prefix!r} in {checkpoint_dir}")
    return tensors


def take(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """state[key], with an error naming the missing key instead of a bare KeyError."""
    if key not in state:
        raise KeyError(f"checkpoint is missing tensor {key!r}")
    return state[key]
