from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.errors import Overloaded
from llm_service.engine.outputs import RunnerOutput, SchedulerOutput
from llm_service.engine.protocol import EngineOutput, EngineRequest, FinishReason, SamplingParams
from llm_service.engine.scheduler import Scheduler
from llm_service.engine.sequence import Sequence, SequenceStatus

BS = 4
EOS = 0


def make_scheduler(num_blocks: int = 16, budget: int = 16, max_num_seqs: int = 8,
                   max_model_len: int = 64, max_waiting: int = 8, scheduling: str = "fcfs",
                   caching: bool = True) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BS, caching), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=budget, max_model_len=max_model_len,
                     max_waiting=max_waiting, scheduling=scheduling)


def request(rid: str, prompt: list[int] | int, priority: int = 0, **sampling) -> EngineRequest:
    tokens = list(range(100, 100 + prompt)) if isinstance(prompt, int) else prompt
    sampling.setdefault("max_tokens", 16)
    return EngineRequest(rid, tokens, SamplingParams(**sampling), eos_token_ids=(EOS,),
                         priority=priority)


def step(sched: Scheduler, token: Callable[[Sequence], int] = lambda seq: 7,
         ) -> tuple[SchedulerOutput, list[EngineOutput]]:
    out = sched.schedule()
    tokens = [token(s.seq) if s.sample else None for s in out.scheduled]
    return out, sched.update(out, RunnerOutput(tokens))


def plan(out: SchedulerOutput) -> list[tuple[str, int, int, int]]:
    return [(s.seq.request_id, s.seq.index, s.start, s.num_tokens) for s in out.scheduled]


def seqs(sched: Scheduler, rid: str) -> list[Sequence]:
    return sched.requests[rid]


def test_decodes_go_first_and_prompts_share_the_rest_of_the_budget():
    sched = make_scheduler(budget=8)
    for rid, n in (("a", 6), ("b", 6), ("c", 3)):
        sched.add(request(rid, n))
    out, outputs = step(sched)
    assert plan(out) == [("a", 0, 0, 6), ("b", 0, 0, 2)]
    assert [s.sample for s in out.scheduled] == [True, False]
    assert [(o.request_id, o.new_token_ids) for o in outputs] == [("a", [7])]
    out, outputs = step(sched)
    assert plan(out) == [("a", 0, 6, 1), ("b", 0, 2, 4), ("c", 0, 0, 3)]
    assert [o.request_id for o in outputs] == ["a", "b", "c"]
    assert [seqs(sched, r)[0].block_table for r in "abc"] == [[0, 1], [2, 3], [4]]


def test_long_prompt_is_chunked_and_samples_only_at_its_end():
    sched = make_scheduler(budget=8)
    sched.add(request("a", 20))
    chunks = []
    for _ in range(3):
        out, outputs = step(sched)
        chunks.append((plan(out), [s.sample for s in out.scheduled], len(outputs)))
    assert chunks == [
        ([("a", 0, 0, 8)], [False], 0),
        ([("a", 0, 8, 8)], [False], 0),
        ([("a", 0, 16, 4)], [True], 1),
    ]
    assert seqs(sched, "a")[0].block_table == [0, 1, 2, 3, 4]


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    for rid in "abc":
        sched.add(request(rid, 3, max_tokens=2))
    out, _ = step(sched)
    assert [p[0] for p in plan(out)] == ["a", "b"]
    out, _ = step(sched)  # a and b finish here
    assert [p[0] for p in plan(out)] == ["a", "b"]
    out, _ = step(sched)
    assert plan(out) == [("c", 0, 0, 3)]


def test_preemption_frees_the_most_recent_and_recomputes_it_from_the_prefix_cache():
    sched = make_scheduler(num_blocks=4)
    sched.add(request("a", 7, max_tokens=4))
    sched.add(request("b", list(range(200, 207))))
    a, b = seqs(sched, "a")[0], seqs(sched, "b")[0]
    step(sched)
    step(sched)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    out, _ = step(sched)  # a needs a block for position 8: b is preempted
    assert out.num_preempted == 1
    assert plan(out) == [("a", 0, 8, 1)]
    assert b.status == SequenceStatus.WAITING and b.block_table == []
    assert a.block_table == [0, 1, 3]  # b's last block; b's first one stays cached
    out, outputs = step(sched)
    assert plan(out) == [("a", 0, 9, 1)]  # b does not fit yet
    assert outputs[0].finish_reason == FinishReason.LENGTH
    assert sched.block_manager.num_free_blocks == 4
    out, outputs = step(sched)
    assert plan(out) == [("b", 0, 4, 5)]  # positions 0..3 come from the cache
    assert b.block_table[0] == 2
    assert outputs[0].num_output_tokens == 3
    assert outputs[0].num_cached_tokens == 0  # counted at first admission only


def test_a_sequence_alone_without_blocks_preempts_itself():
    sched = make_scheduler(num_blocks=2, max_model_len=64)
    sched.add(request("a", 8, max_tokens=4))
    step(sched)
    out, _ = step(sched)
    assert out.num_preempted == 1 and out.scheduled == []
    assert seqs(sched, "a")[0].status == SequenceStatus.WAITING


def test_priority_mode_admits_and_keeps_the_highest_priority():
    sched = make_scheduler(num_blocks=4, max_num_seqs=2, scheduling="priority")
    sched.add(request("low", 7, priority=0))
    sched.add(request("high", list(range(200, 207)), priority=5))
    out, _ = step(sched)
    assert [p[0] for p in plan(out)] == ["high", "low"]
    step(sched)
    out, _ = step(sched)
    assert out.num_preempted == 1
    assert plan(out) == [("high", 0, 8, 1)]
    assert seqs(sched, "low")[0].status == SequenceStatus.WAITING


def test_fcfs_ignores_priority():
    sched = make_scheduler(max_num_seqs=1)
    sched.add(request("low", 3, priority=0))
    sched.add(request("high", 3, priority=5))
    out, _ = step(sched)
    assert plan(out) == [("low", 0, 0, 3)]


def test_full_waiting_queue_refuses_with_overloaded_and_changes_nothing():
    sched = make_scheduler(max_waiting=2, max_num_seqs=1)
    sched.add(request("a", 3))
    sched.add(request("b", 3))
    with pytest.raises(Overloaded, match="max_waiting=2"):
        sched.add(request("c", 3))
    assert list(sched.requests) == ["a", "b"]
    step(sched)  # a leaves the queue
    sched.add(request("c", 3))
    assert len(sched.waiting) == 2


@pytest.mark.parametrize(("sampling", "tokens", "reason", "num_out"), [
    ({}, [5, EOS, 5], FinishReason.STOP, 2),
    ({"ignore_eos": True, "max_tokens": 3}, [EOS, EOS, EOS], FinishReason.LENGTH, 3),
    ({"min_tokens": 2}, [EOS, EOS, EOS, 5], FinishReason.STOP, 3),
    ({"stop_token_ids": (9,)}, [5, 9], FinishReason.STOP, 2),
    ({"max_tokens": 2}, [5, 5, 5], FinishReason.LENGTH, 2),
    ({"max_tokens": 100}, [5] * 100, FinishReason.LENGTH, 12),  # clamped: 20 + 12 = max_model_len
])
def test_stop_conditions(sampling, tokens, reason, num_out):
    sched = make_scheduler(max_model_len=32)
    sched.add(request("a", 20, **sampling))
    stream = iter(tokens)
    outputs = []
    while sched.has_work:
        outputs += step(sched, lambda seq: next(stream))[1]
    assert [o.finish_reason for o in outputs[:-1]] == [None] * (num_out - 1)
    assert outputs[-1].finish_reason == reason
    assert outputs[-1].num_output_tokens == num_out
    assert [t for o in outputs for t in o.new_token_ids] == tokens[:num_out]
    assert sched.block_manager.num_free_blocks == 16


def test_n_choices_share_the_prompt_blocks():
    sched = make_scheduler()
    sched.add(request("a", 9, n=3, max_tokens=2))
    out, outputs = step(sched)
    assert plan(out) == [("a", 0, 0, 9)]
    assert [o.index for o in outputs] == [0]
    _parent, c1, c2 = seqs(sched, "a")
    assert (c1.block_table, c2.block_table) == ([0, 1], [0, 1])
    assert [b.ref_count for b in sched.block_manager.blocks[:3]] == [3, 3, 1]
    out, outputs = step(sched)
    assert plan(out) == [("a", 0, 9, 1), ("a", 1, 8, 1), ("a", 2, 8, 1)]
    assert [o.index for o in outputs] == [0, 1, 2]
    assert outputs[0].finish_reason == FinishReason.LENGTH
    assert (c1.block_table, c2.block_table) == ([0, 1, 3], [0, 1, 4])
    step(sched)
    assert not sched.has_work and not sched.requests
    assert sched.block_manager.num_free_blocks == 16


def test_a_choice_that_matched_a_stop_string_frees_its_blocks_at_once():
    sched = make_scheduler()
    sched.add(request("a", 9, n=2, max_tokens=10))
    step(sched)
    step(sched)
    parent, child = seqs(sched, "a")
    assert (parent.block_table, child.block_table) == ([0, 1, 2], [0, 1, 3])
    assert sched.block_manager.num_free_blocks == 12
    (out,) = sched.finish("a", 1)  # the caller saw a stop string in choice 1's text
    assert (out.index, out.finish_reason, out.new_token_ids) == (1, FinishReason.STOP, [])
    assert child.block_table == [] and child.status == SequenceStatus.FINISHED_STOPPED
    # Its own block is free now; the prompt blocks stay, held by choice 0 alone.
    assert sched.block_manager.num_free_blocks == 13
    assert [b.ref_count for b in sched.block_manager.blocks[:4]] == [1, 1, 1, 0]
    assert sched.finish("a", 1) == [] and sched.finish("a", 7) == []
    out, _ = step(sched)
    assert plan(out) == [("a", 0, 10, 1)]  # only choice 0 keeps decoding
    sched.finish("a", 0)
    assert not sched.requests and not sched.has_work
    assert sched.block_manager.num_free_blocks == 16


def test_a_shared_three_block_prefix_is_not_computed_again():
    sched = make_scheduler()
    prefix = list(range(100, 112))
    sched.add(request("a", prefix + [1, 2], max_tokens=1))
    step(sched)
    sched.add(request("b", prefix + [3, 4, 5, 6, 7], max_tokens=1))
    out, outputs = step(sched)
    assert plan(out) == [("b", 0, 12, 5)]
    assert outputs[0].num_cached_tokens == 12
    assert sched.prefix_hit_rate == pytest.approx(12 / (14 + 17))


def test_prefix_caching_off_computes_everything():
    sched = make_scheduler(caching=False)
    prefix = list(range(100, 112))
    sched.add(request("a", prefix + [1, 2], max_tokens=1))
    step(sched)
    sched.add(request("b", prefix + [3], max_tokens=1))
    out, _ = step(sched)
    assert plan(out) == [("b", 0, 0, 13)]


@pytest.mark.parametrize("stage", ["waiting", "mid_prefill", "decoding", "forked"])
def test_abort_at_any_stage_frees_every_block(stage):
    sched = make_scheduler(budget=8)
    sched.add(request("other", 5))
    sched.add(request("a", 20, n=2))
    steps = {"waiting": 0, "mid_prefill": 1, "decoding": 4, "forked": 5}[stage]
    sched.add(request("late", 3)) if stage == "waiting" else None
    for _ in range(steps):
        step(sched)
    outputs = sched.abort("a")
    assert sorted(o.index for o in outputs) == [0, 1]  # unforked choices end too
    assert all(o.finish_reason == FinishReason.ABORT for o in outputs)
    assert sched.abort("a") == []
    sched.abort("other")
    sched.abort("late")
    assert sched.block_manager.num_free_blocks == 16
    assert not sched.has_work and not sched.requests
    out = sched.schedule()
    assert out.is_empty and len(out.finished_seq_ids) >= 2


def test_abort_with_an_error_reports_it():
    sched = make_scheduler()
    sched.add(request("a", 5))
    step(sched)
    [output] = sched.abort("a", error="boom")
    assert output.error == "boom" and output.finish_reason == FinishReason.ABORT


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    live = [s for group in sched.requests.values() for s in group if not s.status.is_finished]
    holders = Counter(b for s in live for b in s.block_table)
    assert [b.ref_count for b in bm.blocks] == [holders[b.block_id] for b in bm.blocks]
    assert set(bm.free_blocks) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    assert all(not s.block_table for _, s in sched.waiting)
    assert all(s.num_computed_tokens <= len(s.block_table) * BS for s in live)
    assert bm.num_cached_free == sum(1 for b in bm.free_blocks if bm.blocks[b].hash is not None)
    assert len(sched.running) <= sched.max_num_seqs


operation = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12), st.integers(1, 3),
              st.integers(0, 2)),
    st.tuples(st.just("step"), st.integers(0, 9)),
    st.tuples(st.just("abort"), st.integers(0, 20)),
    st.tuples(st.just("fail"), st.integers(0, 20)),
)


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(operation, max_size=60), caching=st.booleans())
def test_blocks_always_balance_and_all_come_back(ops, caching):
    sched = make_scheduler(num_blocks=12, budget=10, max_num_seqs=4, max_model_len=40,
                           max_waiting=6, caching=caching)
    ids = []
    for op in ops:
        if op[0] == "add":
            _, length, max_tokens, n, prefix = op
            rid = f"r{len(ids)}"
            tokens = [prefix] * min(length, 8) + list(range(10, 10 + length))[8:]
            try:
                sched.add(request(rid, tokens, max_tokens=max_tokens, n=n))
                ids.append(rid)
            except Overloaded:
                pass
        elif op[0] == "step":
            step(sched, lambda seq, r=op[1]: EOS if (len(seq) + r) % 7 == 0 else r + 1)
        elif ids:
            rid = ids[op[1] % len(ids)]
            sched.abort(rid, error="failed" if op[0] == "fail" else None)
        check_invariants(sched)
    for _ in range(500):
        if not sched.has_work:
            break
        step(sched)
        check_invariants(sched)
    assert not sched.has_work and not sched.requests
    assert sched.block_manager.num_free_blocks == 12
