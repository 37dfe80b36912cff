"""Real SmolLM2 weights and transformers references for the engine's slow tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

MAX_NEW_TOKENS = 16
EOS = 2
QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a hash table is to a child, briefly.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Give me a name for a grey cat.",
    "What is 12 times 12?",
]


@dataclass(frozen=True)
class Case:
    ids: list[int]
    span: tuple[int, torch.Tensor] | None  # (start, rows) replacing the input embeddings there
    expected: list[int]  # transformers greedy tokens, generated alone


@dataclass(frozen=True)
class SmolLM2:
    path: Path
    model: LlamaForCausalLM
    tokenizer: object

    def chat(self, question: str) -> list[int]:
        messages = [{"role": "user", "content": question}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    @torch.no_grad()
    def greedy(self, ids: list[int], span: tuple[int, torch.Tensor] | None = None,
               max_new_tokens: int = MAX_NEW_TOKENS) -> list[int]:
        x = torch.tensor([ids])
        kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=EOS, pad_token_id=EOS)
        if span is None:
            return self.model.generate(x, **kwargs)[0, len(ids):].tolist()
        embeds = self.model.get_input_embeddings()(x).clone()
        start, rows = span
        embeds[0, start:start + rows.shape[0]] = rows
        return self.model.generate(inputs_embeds=embeds, **kwargs)[0].tolist()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir) -> SmolLM2:
    model = LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return SmolLM2(Path(smollm2_dir), model, AutoTokenizer.from_pretrained(smollm2_dir))


@pytest.fixture(scope="session")
def cases(smollm2) -> list[Case]:
    """Eight chat prompts, plus two whose middle is replaced by embedding rows (the rows of
    another text, so the model has something to read there)."""
    result = [Case(ids, None, smollm2.greedy(ids)) for ids in map(smollm2.chat, QUESTIONS)]
    embed = smollm2.model.get_input_embeddings()
    for question, hidden in (("Describe this: <x>", "A red bicycle leans against a wall "
                              "of old bricks in the afternoon sun."),
                             ("What does this say? <x>", "Meeting moved to Thursday at noon.")):
        head = smollm2.chat(question)
        rows = embed(torch.tensor(smollm2.tokenizer.encode(hidden))).detach()
        start = len(head) - 8  # inside the user turn
        ids = head[:start] + [0] * rows.shape[0] + head[start:]
        span = (start, rows)
        result.append(Case(ids, span, smollm2.greedy(ids, span)))
    return result
