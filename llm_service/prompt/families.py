"""Per-family prompt settings: template, how media appears, stop tokens.

Strings follow each family's reference code (see the README's model table);
special-token ids are always resolved from the checkpoint's tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llm_service.prompt.builder import MediaFormat, PromptBuilder
from llm_service.prompt.messages import Message, Modality
from llm_service.prompt.template import (
    MARKER,
    ChatTemplate,
    HFChatTemplate,
    Media,
    MediaSlot,
    RoleTemplate,
    bare,
)
from llm_service.prompt.tools import HermesFormat, InternLM2Format, Tool, ToolFormat, uses_tools

INTERNVL_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                   "是一个有用无害的人工智能助手。")
INTERNLM2_SYSTEM = (
    "You are an AI assistant whose name is InternLM (书生·浦语).\n"
    "- InternLM (书生·浦语) is a conversational language model that is developed by Shanghai AI "
    "Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.\n"
    "- InternLM (书生·浦语) can understand and communicate fluently in the language chosen by the "
    "user such as English and 中文.")
VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The "
                 "assistant gives helpful, detailed, and polite answers to the human's questions.")
MEGREZ_SYSTEM = "你是Megrez-3B-Instruct，将针对用户的问题给出详细的、积极的回答。"


SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@dataclass(frozen=True, slots=True)
class PromptFamily:
    template: ChatTemplate
    builder: PromptBuilder
    stop_token_ids: tuple[int, ...]
    # How tools, calls and results appear; None: the generic format (Hermes-style tags in the
    # family's own turns, under its default system prompt).
    tool_format: ToolFormat | None = None

    @property
    def modalities(self) -> frozenset[Modality]:
        return self.builder.modalities

    @property
    def tools(self) -> ToolFormat:
        if self.tool_format is not None:
            return self.tool_format
        return HermesFormat(getattr(self.template, "default_system", ""))

    def render(self, messages: list[Message], media: Media = None,
               tools: Sequence[Tool] = ()) -> str:
        """The prompt text; a conversation without tools renders as the plain template does."""
        if uses_tools(messages, tools):
            return self.tools.render(self.template, messages, media, tools)
        return self.template.render(messages, media)


def token_id(tokenizer, token: str) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    unknown = ids and ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token
    if not ids or ids[0] is None or unknown:
        raise ValueError(f"the tokenizer has no {token!r} token; is this the right family?")
    return int(ids[0])


def _stops(tokenizer, *tokens: str, eos: bool = True) -> tuple[int, ...]:
    ids = {token_id(tokenizer, t) for t in tokens}
    if eos and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def chatml(system_default: str, end_sep: str, media_text=bare) -> RoleTemplate:
    """ChatML; end_sep is "" for InternVL2's MPT style and "\\n" for InternLM2 / Qwen."""
    return RoleTemplate(
        system="<|im_start|>system\n{system}", system_end="<|im_end|>" + end_sep,
        user="<|im_start|>user\n", user_end="<|im_end|>" + end_sep,
        assistant="<|im_start|>assistant\n", assistant_end="<|im_end|>" + end_sep,
        generation="<|im_start|>assistant\n", default_system=system_default, media_text=media_text)


def internvl_media(slot: MediaSlot) -> str:
    # model.chat(): "<image>\n" for one image, "Image-k: <image>\n" for several,
    # "Frame{k}: <image>\n" for video frames (no hyphen in InternVL2).
    marker = MARKER.format(slot.index)
    if slot.frame:
        return f"Frame{slot.frame}: {marker}\n"
    if slot.total > 1:
        return f"Image-{slot.of_modality + 1}: {marker}\n"
    return marker + "\n"


def qwenvl_media(slot: MediaSlot) -> str:
    # from_list_format numbers pictures within each query.
    return f"Picture {slot.in_message + 1}: {MARKER.format(slot.index)}\n"


def newline_media(slot: MediaSlot) -> str:
    return MARKER.format(slot.index) + "\n"


def megrez_media(slot: MediaSlot) -> str:
    if slot.modality == Modality.AUDIO:
        return f"Audio {slot.of_modality + 1}: {MARKER.format(slot.index)}\n"
    return MARKER.format(slot.index) + "\n"


def _internvl_image(tok) -> dict[Modality, MediaFormat]:
    return {Modality.IMAGE: MediaFormat(token_id(tok, "<IMG_CONTEXT>"), "<img>", "</img>")}


def _internvl2_chatml(tok) -> PromptFamily:  # 1B (Hermes-2) and 2B/8B/26B (internlm2-chat)
    # Tools in InternLM2's agent format: the LLM of the 2B/8B/26B checkpoints.
    return PromptFamily(chatml(INTERNVL_SYSTEM, "", internvl_media),
                        PromptBuilder(tok, _internvl_image(tok)), _stops(tok, "<|im_end|>"),
                        InternLM2Format(INTERNVL_SYSTEM, "", internvl_media))


def _internvl2_phi3(tok) -> PromptFamily:  # 4B
    template = RoleTemplate(
        system="<|system|>\n{system}", system_end="<|end|>", user="<|user|>\n", user_end="<|end|>",
        assistant="<|assistant|>\n", assistant_end="<|end|>", generation="<|assistant|>\n",
        default_system=INTERNVL_SYSTEM, media_text=internvl_media)
    return PromptFamily(template, PromptBuilder(tok, _internvl_image(tok)), _stops(tok, "<|end|>"))


def _internlm2(tok) -> PromptFamily:
    return PromptFamily(chatml(INTERNLM2_SYSTEM, "\n"), PromptBuilder(tok, {}),
                        _stops(tok, "<|im_end|>"), InternLM2Format(INTERNLM2_SYSTEM, "\n", bare))


def _qwen_vl(tok) -> PromptFamily:
    image = MediaFormat(token_id(tok, "<imgpad>"), "<img>", "</img>")
    return PromptFamily(chatml("You are a helpful assistant.", "\n", qwenvl_media),
                        PromptBuilder(tok, {Modality.IMAGE: image}),
                        _stops(tok, "<|im_end|>", "<|im_start|>", "<|endoftext|>", eos=False))


def _llava_image(tok) -> dict[Modality, MediaFormat]:
    # llava-hf checkpoints carry an "<image>" token; original ones splice at a virtual id,
    # for which any id works here since embeddings replace the slots.
    try:
        slot = token_id(tok, "<image>")
    except ValueError:
        slot = int(tok.unk_token_id or 0)
    return {Modality.IMAGE: MediaFormat(slot)}


def _llava_vicuna(tok) -> PromptFamily:
    template = RoleTemplate(system="{system}", system_end=" ", user="USER: ", user_end=" ",
                            assistant="ASSISTANT: ", assistant_end="</s>", generation="ASSISTANT:",
                            default_system=VICUNA_SYSTEM, media_text=newline_media)
    return PromptFamily(template, PromptBuilder(tok, _llava_image(tok)), _stops(tok))


def _llava_mistral(tok) -> PromptFamily:
    template = RoleTemplate(system="", system_end="", user="[INST] ", user_end=" [/INST]",
                            assistant=" ", assistant_end=" </s>", generation="",
                            media_text=newline_media,
                            system_in_first_user="<<SYS>>\n{system}\n<</SYS>>\n\n")
    return PromptFamily(template, PromptBuilder(tok, _llava_image(tok)), _stops(tok))


def _llava_chatml(tok) -> PromptFamily:  # v1.6-34b, chatml_direct
    return PromptFamily(chatml("Answer the questions.", "", newline_media),
                        PromptBuilder(tok, _llava_image(tok)), _stops(tok, "<|im_end|>"))


def _megrez(tok) -> PromptFamily:
    unk = token_id(tok, "<|unk|>")
    template = RoleTemplate(
        system="<|role_start|>system<|role_end|>{system}", system_end="<|turn_end|>",
        user="<|role_start|>user<|role_end|>", user_end="<|turn_end|>",
        assistant="<|role_start|>assistant<|role_end|>", assistant_end="<|turn_end|>",
        generation="<|role_start|>assistant<|role_end|>", default_system=MEGREZ_SYSTEM,
        media_text=megrez_media)
    formats = {Modality.IMAGE: MediaFormat(unk, "<image>", "</image>"),
               Modality.AUDIO: MediaFormat(unk, "<audio>", "</audio>")}
    return PromptFamily(template, PromptBuilder(tok, formats),
                        _stops(tok, "<|turn_end|>", "<|eos|>"))


def _smollm2(tok) -> PromptFamily:
    # The checkpoint's own template. Media rows use <|endoftext|> as the slot id: the ids
    # never reach the model (embeddings replace them) and the prefix cache hashes slots by
    # content hash, not by id.
    image = MediaFormat(token_id(tok, "<|endoftext|>"))
    # Its template has no tools; they follow Qwen2.5's (Hermes) format under its own default
    # system prompt.
    return PromptFamily(HFChatTemplate(tok), PromptBuilder(tok, {Modality.IMAGE: image}),
                        _stops(tok, "<|im_end|>"), HermesFormat(SMOLLM2_SYSTEM))


FAMILIES: dict[str, Callable[[object], PromptFamily]] = {
    "smollm2": _smollm2,
    "internvl2": _internvl2_chatml,
    "internvl2-phi3": _internvl2_phi3,
    "internlm2-chat": _internlm2,
    "qwen-vl-chat": _qwen_vl,
    "llava-vicuna": _llava_vicuna,
    "llava-mistral": _llava_mistral,
    "llava-chatml": _llava_chatml,
    "megrez-omni": _megrez,
}


def load_family(name: str, tokenizer) -> PromptFamily:
    try:
        factory = FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown prompt family {name!r}; known: {sorted(FAMILIES)}") from None
    return factory(tokenizer)
