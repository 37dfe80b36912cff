"""Structured outputs and logit_bias in the sampler and the scheduler (SmolLM2's tokenizer,
random logits; no model)."""

from __future__ import annotations

import json

import pytest
import torch

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.errors import InvalidRequest
from llm_service.engine.grammar import GrammarCompiler, checkpoint_tokenizer
from llm_service.engine.outputs import RunnerOutput
from llm_service.engine.protocol import (
    EngineRequest,
    FinishReason,
    SamplingParams,
    StructuredOutput,
)
from llm_service.engine.sampler import Sampler
from llm_service.engine.scheduler import Scheduler
from llm_service.engine.sequence import Sequence

VOCAB = 49152
EOS = 2  # SmolLM2's <|im_end|>
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["id", "tags"],
          "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "minItems": 1, "maxItems": 2}}}
JSON_SPEC = StructuredOutput("json_schema", json.dumps(SCHEMA))


@pytest.fixture(scope="module")
def compiler(smollm2_dir) -> GrammarCompiler:
    return GrammarCompiler(lambda: checkpoint_tokenizer(smollm2_dir, VOCAB))


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


def make_seq(seq_id: int, compiler: GrammarCompiler | None = None,
             spec: StructuredOutput | None = None, **sampling) -> Sequence:
    params = SamplingParams(structured=spec, **sampling)
    request = EngineRequest(f"r{seq_id}", [5, 6, 7], params, eos_token_ids=(EOS,))
    grammar = compiler.compile(spec).new_state() if compiler and spec else None
    return Sequence(seq_id, request, seq_id, max_model_len=1000, grammar=grammar)


def test_unconstrained_rows_of_a_mixed_batch_sample_as_alone(compiler, tok):
    torch.manual_seed(0)
    logits = torch.randn(4, VOCAB)
    alone = [make_seq(0, temperature=0.0), make_seq(1, temperature=1.0, seed=3)]
    expected, _ = Sampler()(logits[[0, 2]].clone(), alone)
    mixed = [make_seq(0, temperature=0.0), make_seq(9, compiler, JSON_SPEC, temperature=1.0),
             make_seq(1, temperature=1.0, seed=3),
             make_seq(8, compiler, StructuredOutput("regex", "[0-9]{3}"), temperature=0.0)]
    tokens, _ = Sampler()(logits.clone(), mixed)
    assert [tokens[0], tokens[2]] == expected
    greedy_alone, _ = Sampler()(logits[[0]].clone(), [make_seq(0, temperature=0.0)])
    assert [tokens[0]] == greedy_alone  # the plain argmax path, as a batch of greedy rows takes
    assert tok.decode([tokens[1]]).startswith("{")  # the only way a JSON object starts
    assert tok.decode([tokens[3]]).isdigit()


def test_json_object_starts_an_object_and_may_not_stop_inside_it(compiler, tok):
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 50.0
    seq = make_seq(0, compiler, StructuredOutput("json_object"), temperature=0.0)
    tokens, _ = Sampler()(logits.clone(), [seq])
    assert tok.decode(tokens).startswith("{")


def test_a_constrained_greedy_row_takes_the_best_allowed_token(compiler, tok):
    logits = torch.full((1, VOCAB), -5.0)
    allowed = [t for t in range(VOCAB) if tok.decode([t]) in ("yes", "no")]
    logits[0, allowed[-1]] = 1.0
    logits[0, 100] = 10.0  # far better, but not a choice
    seq = make_seq(0, compiler, StructuredOutput("choice", choices=("yes", "no")),
                   temperature=0.0)
    tokens, _ = Sampler()(logits, [seq])
    assert tokens == [allowed[-1]]


def test_stop_tokens_only_where_the_output_is_complete(compiler):
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS] = 50.0
    seq = make_seq(0, compiler, StructuredOutput("regex", "[0-9]+"), temperature=0.0)
    first, _ = Sampler()(logits.clone(), [seq])
    assert first != [EOS]  # nothing yet: a digit must come first
    assert seq.grammar is not None and seq.grammar.accept(first[0])
    seq.token_ids.append(first[0])
    second, _ = Sampler()(logits.clone(), [seq])
    assert second == [EOS]  # a number so far: the stop token may end it


def test_logit_bias_moves_greedy_choices_and_only_in_its_row():
    logits = torch.zeros(2, 10)
    logits[:, 4] = 3.0
    seqs = [make_seq(0, temperature=0.0, logit_bias=((7, 5.0), (4, -100.0))),
            make_seq(1, temperature=0.0)]
    tokens, _ = Sampler()(logits, seqs)
    assert tokens == [7, 4]


@pytest.mark.parametrize("sampling, words", [
    (dict(logit_bias=tuple((i, 1.0) for i in range(301))), "logit_bias has 301 entries"),
    (dict(logit_bias=((1, 100.5),)), "must be in \\[-100, 100\\]"),
    (dict(logit_bias=((1, float("nan")),)), "must be in \\[-100, 100\\]"),
    (dict(logit_bias=((-1, 1.0),)), "token id -1 is negative"),
])
def test_logit_bias_bounds(sampling, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**sampling)


@pytest.mark.parametrize("spec, words", [
    (StructuredOutput("json_schema", '{"type": "string", "not": {"const": "x"}}'),
     'Unimplemented keys: \\["not"\\]'),
    (StructuredOutput("json_schema", '{"type": "object", "if": {}, "then": {}}'),
     '"if", "then"'),
    (StructuredOutput("json_schema", "{not json"), "json_schema: not valid JSON"),
    (StructuredOutput("regex", "[a-z"), "unclosed character class"),
    (StructuredOutput("regex", "(?<=a)b"), "look-around"),
    (StructuredOutput("grammar", "start: missing_rule"), 'unknown name: "missing_rule"'),
    (StructuredOutput("grammar", 'root ::= "a" other'), "Rule 'other' not found"),
])
def test_unsupported_constructs_are_named(compiler, spec, words):
    with pytest.raises(InvalidRequest, match=words):
        compiler.compile(spec)


def test_compiled_grammars_are_cached_by_spec(compiler):
    spec = StructuredOutput("regex", "cached-[0-9]")
    first = compiler.compile(spec)
    hits = compiler.hits
    assert compiler.compile(StructuredOutput("regex", "cached-[0-9]")) is first
    assert compiler.hits == hits + 1


def test_grammar_state_survives_preemption_and_forks_start_fresh(compiler, tok):
    """Drives the scheduler with the tokens of a valid output; preempting the choice
    mid-way (its KV freed and recomputed) leaves its grammar where it was, the sibling's
    grammar starts at the beginning, and the choice ends by itself when the JSON closes."""
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=64,
                      max_model_len=64, max_waiting=4)
    text = '{"id":42,"tags":["a","b"]}'
    script = tok.encode(text, add_special_tokens=False)
    spec = JSON_SPEC
    params = SamplingParams(max_tokens=40, n=2, structured=spec, temperature=0.0)
    sched.add(EngineRequest("r", [5, 6, 7], params, eos_token_ids=(EOS,)), compiler.compile(spec))
    outputs: dict[int, list[int]] = {0: [], 1: []}
    reasons: dict[int, FinishReason] = {}
    preempted = False
    while sched.has_work:
        step = sched.schedule()
        tokens = []
        for item in step.scheduled:
            seq = item.seq
            tokens.append(script[seq.num_output_tokens] if item.sample else None)
        for out in sched.update(step, RunnerOutput(tokens)):
            outputs[out.index] += out.new_token_ids
            if out.finish_reason is not None:
                reasons[out.index] = out.finish_reason
        parent = sched.requests.get("r", [None])[0]
        if not preempted and parent is not None and parent.num_output_tokens == 4:
            sched.running.remove(parent)
            sched._preempt(parent)  # as when blocks run out
            preempted = True
            assert parent.grammar is not None and not parent.grammar.accepting
    assert preempted
    assert reasons == {0: FinishReason.STOP, 1: FinishReason.STOP}
    for index in (0, 1):
        assert tok.decode(outputs[index]) == text
    assert sched.block_manager.num_used_blocks == 0
