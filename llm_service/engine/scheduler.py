"""Continuous batching: which sequences compute how many tokens in the next step. No torch here.

There is no prefill or decode phase: every sequence has `num_computed_tokens` catching up with
its length under a per-step token budget. Running sequences go first (a decode is one token, a
long prompt is cut into chunks), then waiting ones are admitted while blocks, budget and
`max_num_seqs` allow. When blocks run out, the most recent running sequence is preempted: its
blocks are freed and it is recomputed later (its prefix usually comes back from the cache).
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from llm_service.engine.block_manager import BlockManager
from llm_service.engine.errors import Overloaded
from llm_service.engine.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from llm_service.engine.protocol import EngineOutput, EngineRequest, TokenLogprob
from llm_service.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from llm_service.engine.grammar import CompiledGrammar


class Scheduler:
    def __init__(self, block_manager: BlockManager, *, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, max_waiting: int,
                 scheduling: str = "fcfs") -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self._key: Callable[[Sequence], tuple[int, ...]] = (
            (lambda s: s.priority_key) if scheduling == "priority"
            else (lambda s: (s.arrival, s.index)))
        self.waiting: list[tuple[tuple[int, ...], Sequence]] = []  # heap, best first
        self.running: list[Sequence] = []  # sorted by key: the tail is preempted first
        self.requests: dict[str, list[Sequence]] = {}  # unfinished requests -> their choices
        self._released: list[int] = []
        self._next_seq_id = 0
        self._next_arrival = 0
        self.num_queried_tokens = 0  # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0  # of which were found
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0

    def add(self, request: EngineRequest, grammar: CompiledGrammar | None = None) -> None:
        """Queues a validated request (with its compiled grammar when it asks for structured
        output); raises Overloaded when the waiting queue is full."""
        assert request.request_id not in self.requests, request.request_id
        if len(self.waiting) >= self.max_waiting:
            raise Overloaded(f"{len(self.waiting)} sequences are waiting (max_waiting="
                             f"{self.max_waiting}); retry later")
        seq = Sequence(self._new_seq_id(), request, self._next_arrival, self.max_model_len,
                       grammar=grammar.new_state() if grammar is not None else None)
        self._next_arrival += 1
        self.requests[request.request_id] = [seq]
        heapq.heappush(self.waiting, (self._key(seq), seq))

    def abort(self, request_id: str, error: str | None = None) -> list[EngineOutput]:
        """Finishes every choice of a request with ABORT and frees its blocks."""
        outputs = []
        for seq in self.requests.pop(request_id, ()):
            if not self._release(seq, SequenceStatus.FINISHED_ABORTED):
                continue
            seq.error = error
            outputs.append(self._output(seq, []))
            # Choices not forked yet end too, so the caller sees every index finish.
            outputs += [replace(outputs[-1], index=seq.index + k, num_output_tokens=0)
                        for k in range(1, seq.num_pending_forks + 1)]
        return outputs

    def finish(self, request_id: str, index: int) -> list[EngineOutput]:
        """Finishes one choice with STOP now and frees its blocks; its siblings go on.

        Its caller matched a stop string in the choice's text. A choice that has produced
        text exists and has forked its siblings (at its first sampled token), so anything
        else (an unknown index, pending forks, a finished choice) is a no-op.
        """
        choices = self.requests.get(request_id, [])
        seq = next((s for s in choices if s.index == index), None)
        if seq is None or seq.num_pending_forks or \
                not self._release(seq, SequenceStatus.FINISHED_STOPPED):
            return []
        if all(s.status.is_finished for s in choices):
            del self.requests[request_id]
        return [self._output(seq, [])]

    def _release(self, seq: Sequence, status: SequenceStatus) -> bool:
        """Takes an unfinished sequence out of its queue and frees its blocks; False when it
        had already finished."""
        if seq.status == SequenceStatus.WAITING:
            self.waiting = [item for item in self.waiting if item[1] is not seq]
            heapq.heapify(self.waiting)
        elif seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        else:
            return False
        seq.status = status
        self._released.append(seq.seq_id)
        return True

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self._released)
        self._released = []
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve(seq, n, out):
                break  # seq was the last running one and got preempted itself
            out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, n,
                                                   n == seq.num_uncomputed_tokens))
            budget -= n
            i += 1
        if not out.num_preempted:  # admitting now would only preempt again
            self._admit(out, budget)
        return out

    def update(self, out: SchedulerOutput, result: RunnerOutput) -> list[EngineOutput]:
        """Applies a finished step: advances caches, appends sampled tokens, finishes sequences."""
        outputs = []
        logprobs = result.logprobs or [None] * len(out.scheduled)
        for item, token, logprob in zip(out.scheduled, result.token_ids, logprobs):
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            self.block_manager.cache_full_blocks(seq)
            if not item.sample:
                continue
            if seq.num_pending_forks:
                self._fork(seq)
            assert token is not None, item  # a sampling step yields a token
            seq.token_ids.append(token)
            status = self._stop_status(seq, token)
            if status is not None:
                self._finish(seq, status)
            outputs.append(self._output(seq, [token], logprob))
        return outputs

    def _reserve(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        while not self.block_manager.can_append(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            out.num_preempted += 1
            if victim is seq:
                return False
        self.block_manager.append(seq, num_tokens)
        return True

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        # Choices not forked yet already own their slots.
        num_slots = len(self.running) + sum(s.num_pending_forks for s in self.running)
        while self.waiting and budget > 0:
            seq = self.waiting[0][1]
            if num_slots + 1 + seq.num_pending_forks > self.max_num_seqs:
                break
            hits = bm.match_prefix(seq)
            n = min(len(seq) - len(hits) * bm.block_size, budget)
            if not bm.can_allocate(seq, hits, n):
                break  # strict order: nobody overtakes the head of the queue
            heapq.heappop(self.waiting)
            bm.allocate(seq, hits, n)
            self.num_queried_tokens += len(seq)
            self.num_hit_tokens += seq.num_computed_tokens
            if not seq.num_output_tokens:
                seq.num_cached_tokens = seq.num_computed_tokens
            if seq.queue_time_s is None:
                seq.queue_time_s = time.monotonic() - seq.queued_at
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=self._key)
            out.scheduled.append(ScheduledSequence(seq, seq.num_computed_tokens, n,
                                                   n == seq.num_uncomputed_tokens))
            num_slots += 1 + seq.num_pending_forks
            budget -= n

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        heapq.heappush(self.waiting, (self._key(seq), seq))

    def _fork(self, parent: Sequence) -> None:
        # Children share the parent's full prompt blocks and compute the rest themselves,
        # so each samples its own first token from its own logits.
        num_shared = (parent.num_prompt_tokens - 1) // self.block_manager.block_size
        for index in range(1, parent.num_pending_forks + 1):
            child = parent.fork(self._new_seq_id(), index)
            self.block_manager.fork(parent, child, num_shared)
            self.requests[parent.request_id].append(child)
            bisect.insort(self.running, child, key=self._key)
        parent.num_pending_forks = 0

    def _stop_status(self, seq: Sequence, token: int) -> SequenceStatus | None:
        if token in seq.stop_token_ids and seq.num_output_tokens > seq.sampling.min_tokens:
            return SequenceStatus.FINISHED_STOPPED
        if seq.grammar is not None:
            if not seq.grammar.accept(token):  # the mask allowed it: a bug, not the caller's
                seq.error = f"token {token} broke the output's grammar: {seq.grammar.error}"
                return SequenceStatus.FINISHED_ABORTED
            if seq.grammar.stopped:  # the output is complete; nothing may follow
                return SequenceStatus.FINISHED_STOPPED
        if len(seq) >= seq.max_total_tokens:
            return SequenceStatus.FINISHED_LENGTH
        return None

    def _finish(self, seq: Sequence, status: SequenceStatus) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = status
        self._released.append(seq.seq_id)
        if all(s.status.is_finished for s in self.requests[seq.request_id]):
            del self.requests[seq.request_id]

    def _output(self, seq: Sequence, new_token_ids: list[int],
                logprob: TokenLogprob | None = None) -> EngineOutput:
        return EngineOutput(
            request_id=seq.request_id,
            index=seq.index,
            new_token_ids=new_token_ids,
            finish_reason=seq.status.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            logprobs=(logprob,) if logprob is not None else (),
            error=seq.error,
            queue_time_s=seq.queue_time_s or 0.0,
        )

    def _new_seq_id(self) -> int:
        self._next_seq_id += 1
        return self._next_seq_id - 1
