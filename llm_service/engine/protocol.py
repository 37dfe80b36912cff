"""The engine contract every engine implements (torch paged engine, TensorRT-LLM).

Servicers depend on `EngineClient` only. Nothing here imports torch at runtime,
so the scheduler side and the tests can use these types freely.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_STRUCTURED_SPEC_CHARS = 256 * 1024  # a schema, regex or grammar, as text
STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


class FinishReason(enum.IntEnum):
    STOP = 1  # EOS, a stop token id, or a stop string (decided by the caller)
    LENGTH = 2  # max_tokens or the model's context length
    ABORT = 3  # cancelled by the caller or failed


@dataclass(frozen=True, slots=True)
class StructuredOutput:
    """What the output must match, enforced token by token.

    kind: "json_schema" (spec: a JSON Schema document as JSON text), "json_object" (any JSON
    object; no spec), "regex" (spec: a regular expression the whole output matches),
    "choice" (exactly one of `choices`), "grammar" (spec: a Lark grammar, or GBNF/EBNF when it
    uses `::=`). Frozen and hashable: it keys the compiled-grammar cache.
    """

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_KINDS}, "
                             f"got {self.kind!r}")
        if self.kind == "choice":
            if not self.choices:
                raise ValueError("structured output choice: the list of choices is empty")
            if any(not c for c in self.choices):
                raise ValueError("structured output choice: a choice is the empty string")
        elif self.kind != "json_object" and not self.spec.strip():
            raise ValueError(f"structured output {self.kind}: the {self.kind} is empty")
        size = len(self.spec) + sum(len(c) for c in self.choices)
        if size > MAX_STRUCTURED_SPEC_CHARS:
            raise ValueError(f"structured output {self.kind}: {size} characters; at most "
                             f"{MAX_STRUCTURED_SPEC_CHARS}")


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling. temperature == 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # number of top alternatives; None = no logprobs
    n: int = 1
    # (token id, bias) pairs added to the logits before sampling (OpenAI's logit_bias).
    logit_bias: tuple[tuple[int, float], ...] = ()
    structured: StructuredOutput | None = None  # None: free text

    def __post_init__(self) -> None:
        self._check_logit_bias()
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.repetition_penalty > 0.0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20,
             f"logprobs must be in [0, 20], got {self.logprobs}"),
            # The upper bound is the engine's (its max_num_seqs): validation.py checks it.
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(self.logit_bias)} entries; at most "
                             f"{MAX_LOGIT_BIAS} are allowed")
        seen = set()
        for token, bias in self.logit_bias:
            if token < 0:
                raise ValueError(f"logit_bias: token id {token} is negative")
            if token in seen:
                raise ValueError(f"logit_bias: token id {token} appears twice")
            seen.add(token)
            if not -100.0 <= bias <= 100.0:  # also refuses NaN
                raise ValueError(f"logit_bias: the bias of token {token} must be in "
                                 f"[-100, 100], got {bias}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True, slots=True)
class EmbeddingSpan:
    """Precomputed embedding rows that replace prompt positions [start, start + len)."""

    start: int
    embeddings: torch.Tensor  # [num_rows, hidden_size]
    content_hash: str  # identifies the media item; drives the prefix cache

    @property
    def length(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    spans: tuple[EmbeddingSpan, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0  # higher runs earlier when the scheduler uses priorities


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob), best first


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """One step's worth of new tokens for one choice of a request."""

    request_id: str
    index: int  # choice index, 0 .. n-1
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: tuple[TokenLogprob, ...] = ()
    error: str | None = None  # set when the engine failed this request
    queue_time_s: float = 0.0  # waited in the queue before first scheduled

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class EngineStats:
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    kv_blocks_cached: int = 0
    block_size: int = 0
    prefix_hit_rate: float = 0.0
    running: int = 0
    waiting: int = 0
    step_time_ms: float = 0.0
    num_preemptions: int = 0  # since start


class EngineClient(ABC):
    """What the LLM servicer needs from an engine."""

    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width of the model's embeddings (and of every EmbeddingSpan row); set by start()."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Token ids are in [0, vocab_size); set by start()."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Prompt plus output tokens one sequence may hold; set by start()."""

    @property
    def max_num_seqs(self) -> int:
        """Sequences running at once, so the most choices (n) one request may have; 0 when
        the engine does not say (nothing is checked ahead of it then)."""
        return 0

    @abstractmethod
    async def start(self) -> None:
        """Loads the model and starts the step loop."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stops the step loop; pending requests finish with ABORT."""

    @abstractmethod
    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        """Submits a request and yields its outputs. Closing the iterator early aborts it.

        Raises InvalidRequest (bad request) or Overloaded (queue full) on first iteration
        (engine/errors.py).
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Frees everything the request holds; a no-op for unknown ids."""

    @abstractmethod
    async def finish(self, request_id: str, index: int) -> None:
        """Ends choice `index` of a running request with STOP now (its caller matched a
        stop string) and frees what that choice holds; its siblings go on. A no-op when
        the choice or the request has already finished."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """False once a fatal engine error happened."""
