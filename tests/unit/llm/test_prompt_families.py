"""Each family renders its reference prompt string (model-formats reference, per family).

The tokenizers here are tiny stand-ins that only carry each family's special
tokens: rendering is string work, and ids are resolved from whatever tokenizer
the checkpoint ships.
"""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llm_service.prompt.families import (
    INTERNLM2_SYSTEM,
    INTERNVL_SYSTEM,
    MEGREZ_SYSTEM,
    VICUNA_SYSTEM,
    load_family,
)
from llm_service.prompt.messages import MediaItem, MediaRef, Message, Modality, TextPart
from llm_service.prompt.template import MARKER_RE

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<img>", "</img>",
            "<IMG_CONTEXT>", "<imgpad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
            "<image>", "</image>", "<audio>", "</audio>", "<|unk|>", "<|role_start|>",
            "<|role_end|>", "<|turn_end|>", "<|eos|>"]


@pytest.fixture(scope="module")
def tok():
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for word in ["What", "is", "in", "the", "first", "image", "?", "A", "cat", ".", "And", "second"]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                eos_token="</s>")
    t.add_special_tokens({"additional_special_tokens": SPECIALS[3:]})
    return t


IMG = MediaItem(MediaRef(url="data:image/png;base64,AA"), Modality.IMAGE)
AUDIO = MediaItem(MediaRef(data=b"RIFF"), Modality.AUDIO)
TWO_TURNS = [
    Message("user", (IMG, TextPart("What is in the first image?"))),
    Message("assistant", (TextPart("A cat."),)),
    Message("user", (IMG, TextPart("And the second?"))),
]


def render(tok, family, messages=TWO_TURNS):
    text = load_family(family, tok).template.render(messages)
    return MARKER_RE.sub("<image>", text)


def test_internvl2_internlm2_chat(tok):
    # conversation.py MPT style: no newline after <|im_end|>; Image-N: when several images.
    assert render(tok, "internvl2") == (
        f"<|im_start|>system\n{INTERNVL_SYSTEM}<|im_end|>"
        "<|im_start|>user\nImage-1: <image>\nWhat is in the first image?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\nImage-2: <image>\nAnd the second?<|im_end|>"
        "<|im_start|>assistant\n")


def test_internvl2_single_image_has_no_number(tok):
    text = render(tok, "internvl2", [Message("user", (IMG, TextPart("Describe.")))])
    assert text.endswith("<|im_start|>user\n<image>\nDescribe.<|im_end|><|im_start|>assistant\n")


def test_internvl2_phi3(tok):
    assert render(tok, "internvl2-phi3") == (
        f"<|system|>\n{INTERNVL_SYSTEM}<|end|>"
        "<|user|>\nImage-1: <image>\nWhat is in the first image?<|end|>"
        "<|assistant|>\nA cat.<|end|>"
        "<|user|>\nImage-2: <image>\nAnd the second?<|end|><|assistant|>\n")


def test_internlm2_chat_text(tok):
    messages = [Message("user", (TextPart("Hi"),)), Message("assistant", (TextPart("Hello"),)),
                Message("user", (TextPart("Bye"),))]
    assert render(tok, "internlm2-chat", messages) == (
        f"<|im_start|>system\n{INTERNLM2_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")


def test_qwen_vl_chat(tok):
    # make_context(chatml) + from_list_format (pictures numbered within each query).
    assert render(tok, "qwen-vl-chat") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <image>\nWhat is in the first image?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <image>\nAnd the second?<|im_end|>\n"
        "<|im_start|>assistant\n")


def test_llava_vicuna(tok):
    assert render(tok, "llava-vicuna") == (
        f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the first image? ASSISTANT: A cat.</s>"
        "USER: <image>\nAnd the second? ASSISTANT:")


def test_llava_mistral(tok):
    assert render(tok, "llava-mistral") == (
        "[INST] <image>\nWhat is in the first image? [/INST] A cat. </s>"
        "[INST] <image>\nAnd the second? [/INST]")


def test_llava_mistral_system_goes_inside_the_first_turn(tok):
    messages = [Message("system", (TextPart("Be short."),)), Message("user", (TextPart("Hi"),))]
    assert render(tok, "llava-mistral", messages) == (
        "[INST] <<SYS>>\nBe short.\n<</SYS>>\n\nHi [/INST]")


def test_llava_chatml_direct(tok):
    assert render(tok, "llava-chatml") == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat is in the first image?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\n<image>\nAnd the second?<|im_end|><|im_start|>assistant\n")


def test_megrez_image_and_audio(tok):
    messages = [Message("user", (IMG, AUDIO, TextPart("What is in the first image?")))]
    assert render(tok, "megrez-omni", messages) == (
        f"<|role_start|>system<|role_end|>{MEGREZ_SYSTEM}<|turn_end|>"
        "<|role_start|>user<|role_end|><image>\nAudio 1: <image>\nWhat is in the first image?"
        "<|turn_end|><|role_start|>assistant<|role_end|>")


@pytest.mark.parametrize("family, prefix, slot, suffix", [
    ("internvl2", "<img>", "<IMG_CONTEXT>", "</img>"),
    ("qwen-vl-chat", "<img>", "<imgpad>", "</img>"),
    ("llava-vicuna", None, "<image>", None),
    ("megrez-omni", "<image>", "<|unk|>", "</image>"),
])
def test_media_expansion_tokens(tok, family, prefix, slot, suffix):
    fam = load_family(family, tok)
    text = fam.template.render([Message("user", (IMG, TextPart("What")))])
    prompt = fam.builder.build(text, [(Modality.IMAGE, 5)])
    (span,) = prompt.slots
    ids = prompt.token_ids
    assert ids[span.start:span.start + 5] == [tok.convert_tokens_to_ids(slot)] * 5
    if prefix:
        assert ids[span.start - 1] == tok.convert_tokens_to_ids(prefix)
        assert ids[span.start + 5] == tok.convert_tokens_to_ids(suffix)


@pytest.mark.parametrize("family, stops", [
    ("internvl2", {"<|im_end|>", "</s>"}),
    ("internvl2-phi3", {"<|end|>", "</s>"}),
    ("internlm2-chat", {"<|im_end|>", "</s>"}),
    ("qwen-vl-chat", {"<|im_end|>", "<|im_start|>", "<|endoftext|>"}),
    ("llava-vicuna", {"</s>"}),
    ("megrez-omni", {"<|turn_end|>", "<|eos|>", "</s>"}),
])
def test_stop_tokens(tok, family, stops):
    fam = load_family(family, tok)
    assert set(fam.stop_token_ids) == {tok.convert_tokens_to_ids(s) for s in stops}


def test_missing_special_token_names_it(smollm2_tokenizer):
    with pytest.raises(ValueError, match="IMG_CONTEXT"):
        load_family("internvl2", smollm2_tokenizer)


def test_internvl2_video_frames_prompt(tok):
    video = MediaItem(modality=Modality.VIDEO, frames=(MediaRef(url="f"),) * 3)
    messages = [Message("user", (video, IMG, TextPart("What happens?")))]
    text = render(tok, "internvl2", messages)
    # Frames are numbered on their own; the one real image is the only image.
    assert text.endswith("<|im_start|>user\nFrame1: <image>\nFrame2: <image>\nFrame3: <image>\n"
                         "<image>\nWhat happens?<|im_end|><|im_start|>assistant\n")
