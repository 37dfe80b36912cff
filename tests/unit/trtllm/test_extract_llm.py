"""deploy/trtllm/extract_llm.py: the LLM half of a composite checkpoint, ready for a converter."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SCRIPT = Path(__file__).resolve().parents[3] / "deploy" / "trtllm" / "extract_llm.py"


@pytest.fixture(scope="module")
def extract_llm():
    spec = importlib.util.spec_from_file_location("extract_llm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_copies_prefixed_tensors_config_and_tokenizer(tmp_path, extract_llm, monkeypatch):
    src, dst = tmp_path / "internvl", tmp_path / "llm"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({
        "torch_dtype": "bfloat16", "llm_config": {"architectures": ["InternLM2ForCausalLM"]}}))
    (src / "tokenizer_config.json").write_text("{}")
    (src / "modeling_internlm2.py").write_text("# remote code\n")
    weight = torch.arange(6.0).reshape(2, 3)
    save_file({"language_model.model.tok_embeddings.weight": weight,
               "vision_model.embeddings.weight": torch.zeros(2)}, str(src / "model-1.safetensors"))
    save_file({"language_model.output.weight": weight * 2, "mlp1.0.weight": torch.ones(1)},
              str(src / "model-2.safetensors"))
    monkeypatch.setattr(sys, "argv", ["extract_llm.py", str(src), str(dst)])
    extract_llm.main()
    config = json.loads((dst / "config.json").read_text())
    assert config == {"architectures": ["InternLM2ForCausalLM"], "torch_dtype": "bfloat16"}
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert sorted(index) == ["model.tok_embeddings.weight", "output.weight"]
    tensors = {}
    for name in set(index.values()):
        tensors.update(load_file(str(dst / name)))
    torch.testing.assert_close(tensors["output.weight"], weight * 2)
    assert (dst / "tokenizer_config.json").exists() and (dst / "modeling_internlm2.py").exists()


def test_wrong_prefix_says_how_to_find_the_right_one(tmp_path, extract_llm):
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"llm_config": {}}))
    save_file({"llm.layers.0.weight": torch.ones(1)}, str(src / "model.safetensors"))
    with pytest.raises(SystemExit, match="--list-prefixes"):
        extract_llm.extract(src, tmp_path / "out", "language_model.", "llm_config")
