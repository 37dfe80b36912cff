"""Every OpenAI (and vLLM extra) parameter through the official client against the real stack."""

from __future__ import annotations

import math

import pytest
from e2e_stack import MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Write one short sentence about the sea."}]


def chat(client, **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=QUESTION, **kw)


def test_same_seed_same_sampled_text(openai_client):
    first = chat(openai_client, temperature=1.0, seed=1234)
    second = chat(openai_client, temperature=1.0, seed=1234)
    other = [chat(openai_client, temperature=1.0, seed=seed).choices[0].message.content
             for seed in (1, 2)]
    assert first.choices[0].message.content == second.choices[0].message.content
    # Sampling does happen: not every seed gives the same text.
    assert len({first.choices[0].message.content, *other}) > 1


def test_n_gives_distinct_choices(openai_client):
    reply = chat(openai_client, n=2, temperature=1.0, seed=7, max_tokens=16)
    assert [choice.index for choice in reply.choices] == [0, 1]
    texts = [choice.message.content for choice in reply.choices]
    assert all(texts) and texts[0] != texts[1]
    assert reply.usage.completion_tokens > 16  # both choices count


def test_stop_string_trims_the_text(openai_client):
    full = chat(openai_client, temperature=0, max_tokens=20).choices[0].message.content
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    reply = chat(openai_client, temperature=0, max_tokens=20, stop=[stop])
    text = reply.choices[0].message.content
    assert stop not in text and full.startswith(text)
    assert reply.choices[0].finish_reason == "stop"


def test_max_tokens_one_finishes_with_length(openai_client):
    reply = chat(openai_client, max_tokens=1)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 1


def test_max_completion_tokens_limits_like_max_tokens(openai_client):
    reply = openai_client.chat.completions.create(model=MODEL, messages=QUESTION,
                                                  max_completion_tokens=3, temperature=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_stream_include_usage_ends_with_a_usage_chunk(openai_client):
    chunks = list(chat(openai_client, stream=True, stream_options={"include_usage": True},
                       max_tokens=5))
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_logprobs_are_sane(openai_client):
    reply = chat(openai_client, logprobs=True, top_logprobs=3, max_tokens=4, temperature=0)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 4
    assert "".join(entry.token for entry in entries) == reply.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        tops = [top.logprob for top in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(lp <= 0 for lp in tops)
        # Greedy: the chosen token is the most likely one.
        assert math.isclose(entry.logprob, tops[0], abs_tol=1e-3)


def test_penalties_and_vllm_extras_are_accepted(openai_client):
    reply = chat(openai_client, presence_penalty=0.5, frequency_penalty=0.5, temperature=0.8,
                 seed=3, max_tokens=8,
                 extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2,
                             "min_tokens": 8, "ignore_eos": True})
    assert reply.usage.completion_tokens == 8
    assert reply.choices[0].finish_reason == "length"


def test_completions_with_a_prompt_string(openai_client):
    reply = openai_client.completions.create(model=MODEL, prompt="The capital of France is",
                                             max_tokens=4, temperature=0, logprobs=2)
    choice = reply.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens
    assert all(len(top) <= 2 for top in choice.logprobs.top_logprobs)
    assert reply.usage.prompt_tokens == 5


def test_completions_with_token_ids_match_the_string(openai_client):
    from transformers import AutoTokenizer

    from llm_service.weights import ensure_embedded_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_checkpoint())
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    by_text = openai_client.completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                               temperature=0)
    by_ids = openai_client.completions.create(model=MODEL, prompt=ids, max_tokens=4,
                                              temperature=0)
    assert by_ids.usage.prompt_tokens == len(ids)
    assert by_ids.choices[0].text == by_text.choices[0].text
