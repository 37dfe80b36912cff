"""Structured outputs: a StructuredOutput compiled to a grammar, one matcher per sequence.

llguidance does the work (chosen over xgrammar by measurement, docs/structured-outputs.md):
it names the JSON Schema keywords it cannot enforce instead of dropping them, and building
a matcher costs about a millisecond, so nothing needs precompiling. A `GrammarCompiler`
caches compiled grammars by spec (one compiler per tokenizer) and is called off the step
loop; each sequence gets its own `GrammarState`, a copy of the compiled template, advanced
one token at a time as the scheduler appends tokens. Preemption recomputes KV but keeps the
sequence's tokens, so its state stays valid as it is; a forked choice starts from a fresh copy.

No torch here: the sampler fills the bitmask through `GrammarState.fill` (a raw pointer).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llguidance

from llm_service.engine.errors import InvalidRequest
from llm_service.engine.protocol import StructuredOutput

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

# Compact JSON (", " and ": " separators, no free whitespace): a small model offered free
# whitespace can fill its whole budget with newlines.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
CACHE_SIZE = 256  # compiled grammars kept per compiler


def grammar_text(spec: StructuredOutput) -> str:
    """The llguidance grammar for a spec; InvalidRequest naming what is wrong."""
    kind = spec.kind
    try:
        if kind == "json_schema":
            try:
                schema = json.loads(spec.spec)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"structured output json_schema: not valid JSON ({exc})"
                                     ) from None
            if not isinstance(schema, (dict, bool)):
                raise InvalidRequest("structured output json_schema: a schema is a JSON "
                                     f"object, got {type(schema).__name__}")
            return llguidance.LLMatcher.grammar_from_json_schema(spec.spec, defaults=JSON_OPTIONS)
        if kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                                 defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.spec)
        if kind == "choice":
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in spec.choices))
        if "::=" in spec.spec:  # GBNF / EBNF (llama.cpp, xgrammar style)
            return llguidance.grammar_from("gbnf", spec.spec)
        return llguidance.LLMatcher.grammar_from_lark(spec.spec)
    except InvalidRequest:
        raise
    except (ValueError, RuntimeError, TypeError) as exc:
        raise InvalidRequest(_message(kind, str(exc))) from None


def validate(spec: StructuredOutput, tokenizer: Any = None) -> str:
    """The grammar of a spec after llguidance has checked it (with the tokenizer when given);
    InvalidRequest naming the unsupported construct or the syntax error."""
    grammar = grammar_text(spec)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error:
        raise InvalidRequest(_message(spec.kind, messages[0] if messages else "invalid"))
    return grammar


def _message(kind: str, detail: str) -> str:
    detail = " ".join(detail.split())  # regex errors come as ascii art over several lines
    if len(detail) > 400:
        detail = detail[:400] + "..."
    what = {"json_schema": "the schema", "json_object": "json_object", "regex": "the regex",
            "choice": "the choices", "grammar": "the grammar"}[kind]
    return (f"structured output {kind}: {what} cannot be enforced: {detail}; change or remove "
            f"that construct")


class GrammarState:
    """One sequence's position in its grammar."""

    __slots__ = ("_compiled", "_matcher")

    def __init__(self, compiled: CompiledGrammar, matcher: Any) -> None:
        self._compiled = compiled
        self._matcher = matcher

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ids the grammar itself treats as the end (the sampler swaps them for the
        sequence's own stop tokens)."""
        return self._compiled.eos_token_ids

    def fill(self, pointer: int, num_bytes: int) -> None:
        """Writes the allowed-token bitmask (bit i of word i // 32 for token i) at `pointer`."""
        self._matcher.unsafe_compute_mask_ptr(pointer, num_bytes)

    def accept(self, token: int) -> bool:
        return bool(self._matcher.consume_token(token))

    def rollback(self, num_tokens: int) -> bool:
        return bool(self._matcher.rollback(num_tokens))

    @property
    def accepting(self) -> bool:
        """The output so far is complete (a stop token may end it)."""
        return bool(self._matcher.is_accepting())

    @property
    def stopped(self) -> bool:
        """Nothing can follow: the output is complete."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str:
        return str(self._matcher.get_error() or "")

    def fresh(self) -> GrammarState:
        """A state at the start of the same grammar (a sibling choice)."""
        return self._compiled.new_state()


class CompiledGrammar:
    """A grammar checked against the tokenizer, with a template matcher whose lexer has
    already been built (the first mask); states are copies of it."""

    __slots__ = ("_template", "eos_token_ids")

    def __init__(self, template: Any, eos_token_ids: tuple[int, ...]) -> None:
        self._template = template
        self.eos_token_ids = eos_token_ids

    def new_state(self) -> GrammarState:
        return GrammarState(self, self._template.deep_copy())


class GrammarCompiler:
    """Compiles StructuredOutputs for one tokenizer, with an LRU cache; thread-safe.

    `tokenizer_factory` builds the llguidance tokenizer (about 0.3 s for a 49k vocabulary) on
    the first compile, so engines that never see a structured request never pay it.
    """

    def __init__(self, tokenizer_factory: Callable[[], tuple[Any, tuple[int, ...]]],
                 cache_size: int = CACHE_SIZE) -> None:
        self._factory = tokenizer_factory
        self._tokenizer: Any = None
        self._eos: tuple[int, ...] = ()
        self._cache: OrderedDict[StructuredOutput, CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.last_compile_ms = 0.0

    def compile(self, spec: StructuredOutput) -> CompiledGrammar:
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return compiled
            self._load_tokenizer()
            started = time.perf_counter()
            compiled = self._compile(spec)
            self.last_compile_ms = (time.perf_counter() - started) * 1e3
            self.misses += 1
            self._cache[spec] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return compiled

    def prepare(self) -> None:
        """Builds the tokenizer now (at engine start, on the compile thread); a tokenizer that
        cannot be built is reported to the first structured request instead."""
        with self._lock:
            with contextlib.suppress(InvalidRequest):
                self._load_tokenizer()

    def _load_tokenizer(self) -> None:
        if self._tokenizer is None:
            self._tokenizer, self._eos = self._factory()

    def _compile(self, spec: StructuredOutput) -> CompiledGrammar:
        grammar = validate(spec, self._tokenizer)
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if template.is_error():
            raise InvalidRequest(_message(spec.kind, template.get_error()))
        template.compute_bitmask()  # builds the lexer once, for every copy
        return CompiledGrammar(template, self._eos)


def checkpoint_tokenizer(model_dir: Path, vocab_size: int) -> tuple[Any, tuple[int, ...]]:
    """The llguidance tokenizer of a checkpoint's fast (tokenizer.json) tokenizer, padded to
    the model's vocabulary, and its EOS ids; InvalidRequest when there is none."""
    import llguidance.hf

    from mmserve.transformers_compat import load_fast_tokenizer

    try:
        hf = load_fast_tokenizer(model_dir)
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"structured outputs need the checkpoint's tokenizer, which did not "
                             f"load: {exc}") from None
    if not getattr(hf, "is_fast", False):
        raise InvalidRequest("structured outputs need a fast tokenizer (tokenizer.json); this "
                             "checkpoint has none: send the request without structured output")
    eos = hf.eos_token_id
    eos_ids = (eos,) if isinstance(eos, int) else ()
    return llguidance.hf.from_tokenizer(hf, vocab_size), eos_ids
