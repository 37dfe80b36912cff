"""Writes the language-model half of a multimodal HF checkpoint as a plain HF LLM directory.

TensorRT-LLM's checkpoint converters (qwen, internlm2, phi, llama) expect a text-only
checkpoint. InternVL2 nests its LLM under `language_model.` with the config in
`llm_config`; Megrez-3B-Omni nests it under `llm.`. This copies those tensors (prefix
stripped), the sub-config, the tokenizer files and any remote-code modules.

    python deploy/trtllm/extract_llm.py /models/InternVL2-8B /models/InternVL2-8B-llm
    python deploy/trtllm/extract_llm.py SRC DST --prefix llm. --config-key llm_config
    python deploy/trtllm/extract_llm.py SRC --list-prefixes
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections import Counter
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

SHARD_BYTES = 4 * 2**30
SIDE_FILES = ("tokenizer*", "*.model", "vocab*", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "generation_config.json", "*.py", "*.tiktoken", "qwen.tiktoken")


def shards(src: Path) -> list[Path]:
    found = sorted(src.glob("*.safetensors"))
    if not found:
        raise SystemExit(f"{src} has no *.safetensors files (convert .bin checkpoints first)")
    return found


def list_prefixes(src: Path) -> None:
    counts = Counter()
    for shard in shards(src):
        with safe_open(shard, "pt") as f:
            counts.update(name.split(".")[0] + "." for name in f.keys())
    for prefix, count in counts.most_common():
        print(f"{prefix:30s} {count} tensors")


def extract(src: Path, dst: Path, prefix: str, config_key: str) -> None:
    config = json.loads((src / "config.json").read_text())
    if config_key not in config:
        raise SystemExit(f"{src}/config.json has no {config_key!r}; keys: {sorted(config)}")
    dst.mkdir(parents=True, exist_ok=True)
    llm_config = dict(config[config_key])
    llm_config.setdefault("torch_dtype", config.get("torch_dtype", "bfloat16"))
    (dst / "config.json").write_text(json.dumps(llm_config, indent=2))
    index, part, part_bytes, written = {}, {}, 0, 0

    def flush() -> None:
        nonlocal part, part_bytes, written
        if part:
            written += 1
            name = f"model-{written:05d}.safetensors"
            save_file(part, str(dst / name), metadata={"format": "pt"})
            index.update(dict.fromkeys(part, name))
            part, part_bytes = {}, 0

    for shard in shards(src):
        with safe_open(shard, "pt") as f:
            names = [n for n in f.keys() if n.startswith(prefix)]
            for name in tqdm(names, desc=shard.name, unit="tensor"):
                tensor = f.get_tensor(name)
                part[name[len(prefix):]] = tensor
                part_bytes += tensor.numel() * tensor.element_size()
                if part_bytes >= SHARD_BYTES:
                    flush()
    flush()
    if not index:
        raise SystemExit(f"no tensors start with {prefix!r}; run with --list-prefixes")
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index}, indent=2))
    for pattern in SIDE_FILES:
        for path in src.glob(pattern):
            shutil.copy2(path, dst / path.name)
    print(f"wrote {len(index)} tensors in {written} shard(s) to {dst}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path, nargs="?")
    parser.add_argument("--prefix", default="language_model.")
    parser.add_argument("--config-key", default="llm_config")
    parser.add_argument("--list-prefixes", action="store_true")
    args = parser.parse_args()
    if args.list_prefixes:
        list_prefixes(args.src)
    elif args.dst is None:
        parser.error("dst is required unless --list-prefixes")
    else:
        extract(args.src, args.dst, args.prefix, args.config_key)


if __name__ == "__main__":
    main()
