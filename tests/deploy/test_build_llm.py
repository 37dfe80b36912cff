"""deploy/trtllm/build_llm.sh sizing and options, run as a dry run (DRY_RUN=1) against a HF
config.json and stand-in converters that answer --help like the real ones."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "trtllm" / "build_llm.sh"
# The 1.2 converters' quantization options (examples/models/core/*/convert_checkpoint.py).
CONVERTER_OPTIONS = {
    "llama": "--use_weight_only --weight_only_precision --int8_kv_cache --calib_dataset",
    "qwen": "--use_weight_only --weight_only_precision --int8_kv_cache --calib_dataset",
    "internlm2": "--use_weight_only --weight_only_precision",
    "phi": "--use_weight_only --weight_only_precision",
}


@pytest.fixture
def examples(tmp_path) -> Path:
    root = tmp_path / "examples"
    for name, options in CONVERTER_OPTIONS.items():
        directory = root / "models" / "core" / name
        directory.mkdir(parents=True)
        (directory / "convert_checkpoint.py").write_text(f"print('usage: {options}')\n")
    return root


def checkpoint(tmp_path: Path, config: dict) -> Path:
    directory = tmp_path / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def dry_run(family, hf_dir, examples, tmp_path, **env):
    result = subprocess.run(
        ["bash", str(SCRIPT), family, str(hf_dir), str(tmp_path / "out")],
        env={**os.environ, "DRY_RUN": "1", "TRTLLM_EXAMPLES": str(examples), **env},
        capture_output=True, text=True, timeout=60)
    commands = {line.split()[2].rsplit("/", 1)[-1] if line.startswith("+ python3") else
                line.split()[1]: line[2:].split() for line in result.stdout.splitlines()
                if line.startswith("+ ")}
    return result, commands


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


VICUNA = {"architectures": ["LlavaNextForConditionalGeneration"],
          "text_config": {"max_position_embeddings": 4096}}
MISTRAL = {"architectures": ["LlavaNextForConditionalGeneration"],
           "text_config": {"max_position_embeddings": 32768}}


def test_llava_defaults_fit_one_image_per_request_in_a_4k_context(tmp_path, examples):
    result, commands = dry_run("llava-1.6", checkpoint(tmp_path, VICUNA), examples, tmp_path)
    assert result.returncode == 0, result.stderr
    build = commands["trtllm-build"]
    assert (flag(build, "--max_input_len"), flag(build, "--max_seq_len")) == ("3072", "4096")
    assert flag(build, "--max_multimodal_len") == str(2 * 2928)
    assert flag(build, "--kv_cache_type") == "paged" and "--paged_kv_cache" not in build
    assert flag(build, "--use_paged_context_fmha") == "enable"


def test_llava_with_a_long_context_keeps_the_default_lengths(tmp_path, examples):
    result, commands = dry_run("llava-1.6", checkpoint(tmp_path, MISTRAL), examples, tmp_path,
                               MAX_IMAGES="2")
    assert result.returncode == 0, result.stderr
    build = commands["trtllm-build"]
    assert (flag(build, "--max_input_len"), flag(build, "--max_seq_len")) == ("8192", "10240")
    assert flag(build, "--max_multimodal_len") == str(2 * 2 * 2928)


def test_rows_that_cannot_fit_stop_with_what_to_change(tmp_path, examples):
    result, commands = dry_run("llava-1.6", checkpoint(tmp_path, MISTRAL), examples, tmp_path,
                               MAX_IMAGES="4")
    assert result.returncode == 2 and not commands
    assert "MM_ROWS=11712" in result.stderr and "MAX_INPUT_LEN=8192" in result.stderr
    assert "lower MAX_IMAGES" in result.stderr


def test_internvl2_is_converted_from_its_own_layout(tmp_path, examples):
    hf = checkpoint(tmp_path, {"architectures": ["InternVLChatModel"],
                               "llm_config": {"max_position_embeddings": 32768}})
    result, commands = dry_run("internvl2-8b", hf, examples, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "extract_llm.py" not in commands
    assert flag(commands["convert_checkpoint.py"], "--model_dir") == str(hf)
    assert "/internlm2/" in " ".join(commands["convert_checkpoint.py"])
    assert flag(commands["trtllm-build"], "--max_multimodal_len") == str(2 * 26 * 256)
    _, extracted = dry_run("internvl2-8b", hf, examples, tmp_path, EXTRACT_LLM="1")
    assert "extract_llm.py" in extracted
    assert flag(extracted["convert_checkpoint.py"], "--model_dir") == str(tmp_path / "out/hf_llm")


def test_weight_only_and_int8_kv_cache_reach_the_converter(tmp_path, examples):
    hf = checkpoint(tmp_path, MISTRAL)
    result, commands = dry_run("llava-1.6", hf, examples, tmp_path, WEIGHT_ONLY="int8",
                               INT8_KV_CACHE="1", CALIB_DATASET="/data/calib")
    assert result.returncode == 0, result.stderr
    convert = commands["convert_checkpoint.py"]
    assert flag(convert, "--weight_only_precision") == "int8" and "--use_weight_only" in convert
    assert "--int8_kv_cache" in convert and flag(convert, "--calib_dataset") == "/data/calib"
    bad, _ = dry_run("llava-1.6", hf, examples, tmp_path, WEIGHT_ONLY="int3")
    assert bad.returncode == 2 and "WEIGHT_ONLY must be int8 or int4" in bad.stderr


def test_int8_kv_cache_is_refused_where_the_converter_lacks_it(tmp_path, examples):
    hf = checkpoint(tmp_path, {"max_position_embeddings": 32768})
    result, _ = dry_run("internlm2-chat", hf, examples, tmp_path, INT8_KV_CACHE="1")
    assert result.returncode == 2
    assert "the internlm2 converter has no --int8_kv_cache" in result.stderr
