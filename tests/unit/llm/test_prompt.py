from __future__ import annotations

import pytest

from llm_service.errors import InvalidRequest
from llm_service.prompt.builder import MediaFormat, PromptBuilder
from llm_service.prompt.families import load_family
from llm_service.prompt.messages import MediaItem, MediaRef, Message, Modality, TextPart
from llm_service.prompt.template import MARKER, check_messages

IMG = MediaItem(MediaRef(url="data:image/png;base64,AAAA"), Modality.IMAGE)


def user(*parts):
    return Message("user", tuple(TextPart(p) if isinstance(p, str) else p for p in parts))


def test_smollm2_template_matches_the_checkpoint(smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    text = family.template.render([user("What is the capital of France?")])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    expected = smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True)
    assert text == expected


def test_system_message_replaces_the_default(smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    text = family.template.render([Message("system", (TextPart("Be brief."),)), user("Hi")])
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    assert "SmolLM" not in text


def test_media_markers_are_numbered_in_message_order(smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    msgs = [user(IMG, "first"), Message("assistant", (TextPart("ok"),)), user("and", IMG, IMG)]
    text = family.template.render(msgs)
    positions = [text.index(MARKER.format(i)) for i in range(3)]
    assert positions == sorted(positions)
    assert family.builder.count_media(text) == 3


def test_placeholder_expansion_inserts_exact_slot_counts(smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    text_only = family.template.render([user("Describe it.")])
    with_img = family.template.render([user(IMG, "Describe it.")])
    base = family.builder.build(text_only, [])
    prompt = family.builder.build(with_img, [(Modality.IMAGE, 1792)])
    assert len(prompt.token_ids) - len(base.token_ids) == 1792
    (slot,) = prompt.slots
    assert slot.length == 1792
    slot_id = smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert prompt.token_ids[slot.start:slot.start + 1792] == [slot_id] * 1792
    # Text around the image tokenizes exactly as without it.
    assert prompt.token_ids[:slot.start] + prompt.token_ids[slot.start + 1792:] == base.token_ids


def test_prefix_and_suffix_wrap_each_item(smollm2_tokenizer):
    builder = PromptBuilder(smollm2_tokenizer, {Modality.IMAGE: MediaFormat(
        slot_token_id=0, prefix="<img>", suffix="</img>")})
    prompt = builder.build(f"a{MARKER.format(0)}b{MARKER.format(1)}c",
                           [(Modality.IMAGE, 3), (Modality.IMAGE, 2)])
    s0, s1 = prompt.slots
    pre = smollm2_tokenizer.encode("<img>", add_special_tokens=False)
    assert prompt.token_ids[s0.start - len(pre):s0.start] == pre
    assert prompt.token_ids[s0.start:s0.start + 3] == [0, 0, 0]
    assert (s0.length, s1.length) == (3, 2)
    assert s1.start > s0.start + 3


def test_marker_count_must_match_encoded_items(smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    text = family.template.render([user(IMG, "x")])
    with pytest.raises(InvalidRequest, match="markers"):
        family.builder.build(text, [])


def test_bad_role_and_reserved_marker_are_rejected():
    # Checked once per request, before the encoder runs (the generator calls it).
    with pytest.raises(InvalidRequest, match="role"):
        check_messages([Message("function", (TextPart("x"),))])
    with pytest.raises(InvalidRequest, match="reserved"):
        check_messages([user(MARKER.format(0))])
    with pytest.raises(InvalidRequest, match="empty"):
        check_messages([])
    assert Message("developer", ()).role == "system"  # OpenAI's alias, mapped once


def test_unsupported_modality_is_rejected(smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    assert family.modalities == {Modality.IMAGE}
    with pytest.raises(InvalidRequest, match="does not accept audio"):
        family.builder.build(MARKER.format(0), [(Modality.AUDIO, 4)])


def test_stop_ids_include_im_end(smollm2_tokenizer):
    family = load_family("smollm2", smollm2_tokenizer)
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in family.stop_token_ids


def test_unknown_family_is_a_clear_error(smollm2_tokenizer):
    with pytest.raises(ValueError, match="unknown prompt family 'nope'"):
        load_family("nope", smollm2_tokenizer)
