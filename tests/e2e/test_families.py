"""Each multimodal family end to end through the gateway, on tiny checkpoints in its own layout.

One stack per family, started from a model YAML that points both the LLM service and the
encoder service (tower: torch) at the same checkpoint directory. The expected prompt lengths
are counted here from the family's reference prompt format and documented row counts; the
tokenizers are byte-level (see family_checkpoints.py), so text is one token per UTF-8 byte
and each special token is one token.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import pytest
import yaml

from e2e_stack import data_url, png_bytes, start_stack, stop
from family_checkpoints import BUILDERS
from hf_layouts import wav_bytes

pytestmark = [pytest.mark.e2e]

QUESTION = "Describe the image."
INTERNVL_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                   "是一个有用无害的人工智能助手。")
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the human's questions.")
MEGREZ_SYSTEM = "你是Megrez-3B-Instruct，将针对用户的问题给出详细的、积极的回答。"


def llava_rows(width: int, height: int, canvas: tuple[int, int], side: int = 24) -> int:
    """LLaVA-1.6 anyres: 576 base rows + the unpadded grid (unpad_image in llava_arch.py)
    + one image_newline per grid row; `canvas` is the (width, height) pinpoint picked."""
    cur_h, cur_w = canvas[1] // 336 * side, canvas[0] // 336 * side
    if width / height > cur_w / cur_h:
        new_h = int(height * cur_w / width)
        h, w = cur_h - 2 * ((cur_h - new_h) // 2), cur_w
    else:
        new_w = int(width * cur_h / height)
        h, w = cur_h, cur_w - 2 * ((cur_w - new_w) // 2)
    return side * side + h * w + h


@dataclass(frozen=True)
class Family:
    encoder: str  # encoder family (and checkpoint builder)
    prompt: str  # prompt family of the LLM service
    text_prompt: str  # the whole rendered prompt of a text-only request for QUESTION
    image_size: tuple[int, int]
    image_rows: int  # embedding rows the image becomes
    # tokens the image adds besides its rows: wrappers and the family's own text around it
    image_extra: int
    audio: tuple[tuple[float, int], ...] = field(default=())  # (seconds, rows)
    audio_extra: int = 0


FAMILIES = {
    # InternVL2-1B (Hermes-2 template, Qwen2 LLM). 896x448 with max_num 2: the 2x1 grid plus
    # the thumbnail = 3 tiles of 256 rows; "<img>" rows "</img>" then "\n" before the question.
    "internvl2": Family(
        "internvl2", "internvl2",
        f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|><|im_start|>user\n{QUESTION}<|im_end|>"
        "<|im_start|>assistant\n",
        (896, 448), 3 * 256, 2 + 1),
    # Qwen-VL-Chat: always 256 rows; "Picture 1: <img>" rows "</img>\n".
    "qwen-vl-chat": Family(
        "qwen-vl-chat", "qwen-vl-chat",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
        (1000, 600), 256, len("Picture 1: ") + 2 + 1),
    # LLaVA-1.6 vicuna: 1000x600 picks the 672x672 canvas -> 576 + 28*48 + 28 = 1948 rows
    # (the worked example); "<image>\n" has no wrappers, only the "\n".
    "llava-1.6": Family(
        "llava-1.6", "llava-vicuna",
        f"<s>{VICUNA_SYSTEM} USER: {QUESTION} ASSISTANT:",
        (1000, 600), llava_rows(1000, 600, (672, 672)), 1),
    # Megrez-3B-Omni: 1000x600 -> source + 2x1 slices, 64 rows each; "<image>" rows
    # "</image>\n". Audio: "Audio 1: <audio>" bos + rows + eos "</audio>\n", where 1 s gives
    # 27 rows and 10 s 252 (100 mel frames a second, two stride-2 halvings, plus bos/eos).
    "megrez-omni": Family(
        "megrez-omni", "megrez-omni",
        f"<|role_start|>system<|role_end|>{MEGREZ_SYSTEM}<|turn_end|><|role_start|>user"
        f"<|role_end|>{QUESTION}<|turn_end|><|role_start|>assistant<|role_end|>",
        (1000, 600), 3 * 64, 2 + 1, audio=((1.0, 27), (10.0, 252)),
        audio_extra=len("Audio 1: ") + 2 + 1),
}


def test_worked_llava_example():
    assert llava_rows(1000, 600, (672, 672)) == 1948


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def family(request, tmp_path_factory):
    name = request.param
    spec = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    checkpoint = BUILDERS[spec.encoder](root / "checkpoint")
    config = {
        "model": {"name": f"tiny-{name}", "family": spec.prompt},
        "llm": {"checkpoint": str(checkpoint), "max_media_items": 4},
        "engine": {"kind": "torch", "dtype": "float32", "device": "cpu", "block_size": 16,
                   "kv_cache_bytes": 64 * 1024 * 1024, "max_num_seqs": 4,
                   "max_num_batched_tokens": 1024},
        "encoder": {"family": spec.encoder, "tower": "torch", "checkpoint": str(checkpoint),
                    "max_tiles": 2, "device": "cpu", "dtype": "float32"},
    }
    config_path = root / "model.yaml"
    config_path.write_text(yaml.safe_dump(config))
    stack = start_stack(root / "mmserve.log", "--config", str(config_path))
    from openai import OpenAI
    from transformers import AutoTokenizer

    client = OpenAI(base_url=stack.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    if (checkpoint / "qwen.tiktoken").is_file():
        tokenizer = None  # byte-level ranks; counted by hand below
    else:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    yield name, spec, stack, client, tokenizer
    stop(stack.proc)


def count_tokens(tokenizer, text: str) -> int:
    if tokenizer is not None:
        return len(tokenizer.encode(text, add_special_tokens=False))
    # qwen.tiktoken: one token per byte, each special token one token.
    specials = ("<|im_start|>", "<|im_end|>")
    count = 0
    for special in specials:
        count += text.count(special)
        text = text.replace(special, "")
    return count + len(text.encode())


def chat(family, content, max_tokens: int = 3):
    name, _, stack, client, _ = family
    try:
        reply = client.chat.completions.create(
            model=f"tiny-{name}", temperature=0, max_tokens=max_tokens,
            messages=[{"role": "user", "content": content}])
    except Exception as exc:
        raise AssertionError(f"{exc}\n--- stack log ---\n{stack.log_tail()}") from exc
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= max_tokens
    return reply


def test_text_request_counts_the_family_template(family):
    _, spec, _, _, tokenizer = family
    reply = chat(family, QUESTION)
    assert reply.usage.prompt_tokens == count_tokens(tokenizer, spec.text_prompt)


def inspected_rows(tmp_path, data: bytes, suffix: str, family: str) -> int:
    """Cross-check: the rows `python -m encoder_service.inspect` plans for the file."""
    from encoder_service.inspect import describe

    path = tmp_path / f"media{suffix}"
    path.write_bytes(data)
    return describe(str(path), family, max_tiles=2)["num_tokens"]


def test_image_request_counts_rows_and_wrappers(family, tmp_path):
    _, spec, _, _, _ = family
    png = png_bytes(*spec.image_size)
    assert inspected_rows(tmp_path, png, ".png", spec.encoder) == spec.image_rows
    text = chat(family, [{"type": "text", "text": QUESTION}])
    image = chat(family, [
        {"type": "image_url", "image_url": {"url": data_url(png)}},
        {"type": "text", "text": QUESTION}])
    assert image.usage.prompt_tokens - text.usage.prompt_tokens == (
        spec.image_rows + spec.image_extra)


@pytest.mark.parametrize("family", [name for name, spec in FAMILIES.items() if spec.audio],
                         indirect=True)
def test_audio_request_counts_rows_and_wrappers(family, tmp_path):
    _, spec, _, _, _ = family
    text = chat(family, [{"type": "text", "text": QUESTION}])
    for seconds, rows in spec.audio:
        wav = wav_bytes(seconds)
        assert inspected_rows(tmp_path, wav, ".wav", spec.encoder) == rows
        audio = base64.b64encode(wav).decode()
        reply = chat(family, [
            {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
            {"type": "text", "text": QUESTION}])
        assert reply.usage.prompt_tokens - text.usage.prompt_tokens == rows + spec.audio_extra, (
            f"{seconds} s of audio")
