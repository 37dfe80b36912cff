from __future__ import annotations

import math

import pytest
import torch

from llm_service.engine import cpu_kernels
from llm_service.engine.protocol import EngineRequest, SamplingParams
from llm_service.engine.sampler import TOP_P_CANDIDATES, Sampler
from llm_service.engine.sequence import Sequence

EOS = 0
# Greedy rows: torch's argmax, and mmserve::argmax_rows where the CPU kernels build.
ARGMAX = pytest.mark.parametrize("kernel", [False, pytest.param(True, marks=pytest.mark.skipif(
    not cpu_kernels.load(), reason="CPU kernels cannot be built here"))])


def make_seq(seq_id: int = 0, outputs: tuple[int, ...] = (), prompt: tuple[int, ...] = (9, 9),
             **sampling) -> Sequence:
    request = EngineRequest(f"r{seq_id}", list(prompt), SamplingParams(**sampling),
                            eos_token_ids=(EOS,))
    seq = Sequence(seq_id, request, seq_id, max_model_len=1000)
    seq.token_ids.extend(outputs)
    return seq


def from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([math.log(p) if p > 0 else -math.inf for p in probs])


def draws(logits: torch.Tensor, num: int, **sampling) -> list[int]:
    """One token from each of `num` sequences with seeds 0..num-1 (one batch)."""
    seqs = [make_seq(i, seed=i, **sampling) for i in range(num)]
    tokens, _ = Sampler()(logits.expand(num, -1).clone(), seqs)
    return tokens


@ARGMAX
def test_greedy_is_argmax(kernel):
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0], [5.0, 1.0, 3.0, 2.0], [1.0, 4.0, 4.0, 0.0]])
    seqs = [make_seq(i, temperature=0.0) for i in range(3)]
    tokens, logprobs = Sampler(cpu_kernel=kernel)(logits, seqs)
    assert tokens == [2, 0, 1] and logprobs is None


@pytest.mark.parametrize(("penalty", "expected"), [
    ({"frequency_penalty": 0.1}, 1),  # 1.0 - 2 * 0.1 = 0.8 > 0.75
    ({"frequency_penalty": 0.15}, 2),  # 0.7 < 0.75
    ({"presence_penalty": 0.2}, 1),  # 0.8
    ({"presence_penalty": 0.3}, 2),  # 0.7
    ({"repetition_penalty": 1.2}, 1),  # 1.0 / 1.2 = 0.83
    ({"repetition_penalty": 1.5}, 2),  # 0.67
])
def test_penalties_shift_exactly_as_specified(penalty, expected):
    logits = torch.tensor([[-1.0, 1.0, 0.75, 0.5]])
    seq = make_seq(outputs=(1, 1), temperature=0.0, **penalty)
    assert Sampler()(logits, [seq])[0] == [expected]


def test_repetition_penalty_covers_the_prompt_and_pushes_negatives_down():
    logits = torch.tensor([[-1.0, -0.5, -0.6, -3.0]])
    seq = make_seq(prompt=(1,), temperature=0.0, repetition_penalty=1.5)  # -0.5 -> -0.75
    assert Sampler()(logits, [seq])[0] == [2]


@ARGMAX
def test_penalties_apply_per_row(kernel):
    logits = torch.tensor([[-1.0, 1.0, 0.75, 0.5]] * 2)
    plain = make_seq(0, outputs=(1, 1), temperature=0.0)
    penalized = make_seq(1, outputs=(1, 1), temperature=0.0, presence_penalty=0.3)
    assert Sampler(cpu_kernel=kernel)(logits, [plain, penalized])[0] == [1, 2]


@ARGMAX
def test_min_tokens_holds_back_stop_tokens(kernel):
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0]])
    early = make_seq(outputs=(3,), temperature=0.0, min_tokens=2, stop_token_ids=(2,))
    sampler = Sampler(cpu_kernel=kernel)
    assert sampler(logits, [early])[0] == [1]  # neither EOS (0) nor the stop id 2
    done = make_seq(outputs=(3, 3), temperature=0.0, min_tokens=2)
    assert sampler(logits, [done])[0] == [EOS]


def test_sampling_follows_the_distribution():
    tokens = draws(from_probs([0.5, 0.3, 0.2]).unsqueeze(0), 4000)
    freq = [tokens.count(t) / len(tokens) for t in range(3)]
    assert freq == pytest.approx([0.5, 0.3, 0.2], abs=0.03)


def test_temperature_sharpens():
    tokens = draws(from_probs([0.5, 0.3, 0.2]).unsqueeze(0), 1000, temperature=0.2)
    assert tokens.count(0) / 1000 > 0.9


@pytest.mark.parametrize(("sampling", "support"), [
    ({"top_k": 2}, {0, 1}),
    ({"top_p": 0.7}, {0, 1}),
    ({"top_p": 0.85}, {0, 1, 2}),
    ({"min_p": 0.5}, {0, 1}),  # keeps p >= 0.5 * 0.5
    ({"min_p": 0.35}, {0, 1}),
    ({"min_p": 0.25}, {0, 1, 2}),
    ({"top_k": 3, "top_p": 0.7}, {0, 1}),
])
def test_filters_limit_the_support(sampling, support):
    logits = from_probs([0.5, 0.3, 0.15, 0.05]).unsqueeze(0)
    assert set(draws(logits, 1500, **sampling)) == support


def test_top_p_beyond_the_sorted_candidates_is_still_exact():
    vocab = 4 * TOP_P_CANDIDATES
    logits = -torch.arange(vocab, dtype=torch.float32) * 1e-3
    probs = torch.softmax(logits, dim=0)
    kept = int((probs.cumsum(0) - probs < 0.6).sum())
    assert kept > TOP_P_CANDIDATES
    tokens = draws(logits.unsqueeze(0), 3000, top_p=0.6)
    assert max(tokens) < kept and max(tokens) > kept - 50


def test_a_seeded_sequence_draws_the_same_tokens_in_any_batch():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    alone, crowd = Sampler(), Sampler(seed=7)
    target = make_seq(0, seed=42)
    twin = make_seq(0, seed=42)
    mates = [make_seq(i, seed=None, temperature=0.5 + i / 10) for i in range(1, 6)]
    for _ in range(5):
        a = alone(logits[:1].clone(), [target])[0]
        batch = torch.cat([logits[1:4], logits[:1], logits[4:]])
        c = crowd(batch, mates[:3] + [twin] + mates[3:])[0]
        assert a[0] == c[3]


def test_unseeded_sequences_differ_and_forgetting_resets_a_generator():
    logits = torch.zeros(1, 1000)
    sampler = Sampler(seed=3)
    a = [sampler(logits, [make_seq(0)])[0][0] for _ in range(5)]
    b = [sampler(logits, [make_seq(1)])[0][0] for _ in range(5)]
    assert a != b
    seeded = make_seq(2, seed=11)
    first = [sampler(logits, [seeded])[0][0] for _ in range(3)]
    sampler.forget(2)
    assert [sampler(logits, [seeded])[0][0] for _ in range(3)] == first


def test_logprobs_are_raw_with_top_alternatives():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    seq = make_seq(temperature=0.7, top_k=1, logprobs=2, seed=0, presence_penalty=1.0,
                   outputs=(0,))
    tokens, [lp] = Sampler()(logits, [seq])
    raw = torch.log_softmax(logits[0], dim=0)
    assert tokens == [1]  # presence penalty makes token 1 the only top-1 candidate
    assert lp.token_id == 1 and lp.logprob == pytest.approx(raw[1].item())
    assert [t for t, _ in lp.top] == [0, 1]
    assert [v for _, v in lp.top] == pytest.approx(raw[:2].tolist())


def test_logprobs_only_for_rows_that_ask():
    logits = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    _, logprobs = Sampler()(logits, [make_seq(0, temperature=0.0, logprobs=0),
                                     make_seq(1, temperature=0.0)])
    assert logprobs[1] is None and logprobs[0].top == () and logprobs[0].token_id == 0
