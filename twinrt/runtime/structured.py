"""Structured output at decode time: a spec (JSON schema, regex, choice, grammar) becomes a per-row token mask.

    spec = StructuredSpec("json", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    compiler = StructuredCompiler(tokenizer, vocab_size=V, eos_ids={2})     # once per model
    c = compiler.constraint(spec)              # per row: a fresh matcher state (the compiled grammar is cached)
    while not c.finished():
        logits[~c.allowed()] = -inf            # allowed(): [V] bool
        t = pick(logits); c.advance(t)         # raises ValueError for a token the grammar does not allow

Semantics of a constraint (the engine's `TokenConstraint` protocol):
- `allowed()[t]` is True iff appending token t keeps the output a prefix of some string of the language. Ids of the
  model's vocabulary beyond the tokenizer's (padding rows of the embedding) and the tokenizer's special tokens are
  never allowed as text; an end id (`eos_ids`) is allowed exactly when the output so far is a complete string.
- `advance(t)` takes the row's token; an end id ends the row.
- `finished()` is True once an end id was taken or when no token but an end id may follow (`"yes"` of a choice,
  the closing brace of a JSON object): the row ends there with finish reason "stop", without an end token.

Kinds (`StructuredSpec.kind`), with the semantics of the value:
- `json`: a JSON schema (a dict, or its JSON text), the output is one JSON document valid against it. `{}` and
  `{"type": "object"}` both mean "any JSON object" (OpenAI's `json_object`). Objects with `properties` and no
  `additionalProperties` get `additionalProperties: false` (strict, as vLLM's default backend does it).
  Whitespace is fixed: separators `", "` and `": "`, as `json.dumps` writes them (a model cannot fill its budget
  with spaces). Schema keywords the library does not implement are refused (ValueError), never ignored.
- `regex`: the whole output matches the regex (Rust `regex` syntax: no look-around, no back-references).
- `choice`: the output is exactly one of the given strings.
- `grammar`: a context-free grammar, in Lark syntax (llguidance's dialect: `start: ...`) or GBNF/EBNF
  (`root ::= ...`, llama.cpp's, converted to Lark).

The library is llguidance (guidance-ai), vLLM's `guidance` backend. Its alternative here was xgrammar, vLLM's default
backend (outlines_core covers regex and JSON schema only, not grammars). Both build a correct mask for a Hugging
Face fast tokenizer with a larger model vocabulary and cost about the same per step; llguidance was chosen because
(1) it never lets a special token stand for its literal text: xgrammar allows `<|im_start|>` and `<|endoftext|>`
inside a JSON string, which then vanish or break the chat format when the output is decoded; (2) it takes Lark
grammars as they are (xgrammar takes only its EBNF dialect) and GBNF through its converter; (3) it validates a grammar
without a tokenizer, so a bad spec is a ValueError (the server's 400) when the request is parsed, not in the engine;
(4) it refuses unimplemented schema keywords instead of silently dropping them. llguidance compiles lazily inside
its matcher, so the compiled form cached here is a fresh matcher, and each row gets a deep copy of it.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance.gbnf_to_lark import any_to_lark

if TYPE_CHECKING:
    from twinrt.runtime.constraint import TokenConstraint

Kind = Literal["json", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json", "regex", "choice", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredSpec:
    """What a row's output must be: `kind` names the language, `value` defines it (see the module docstring).

    Construction validates: an unknown kind, a value of the wrong type, or a schema/regex/grammar the library
    cannot compile raises ValueError with the library's message (the server answers 400 with it)."""

    kind: Kind
    value: Any

    def __post_init__(self) -> None:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(to_grammar(self))
        if is_error:
            raise ValueError(f"invalid {self.kind} for structured output: {messages[0].strip()}")

    @classmethod
    def json_object(cls) -> StructuredSpec:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls("json", {"type": "object"})

    @property
    def key(self) -> str:
        """A canonical string of the spec: equal specs have equal keys (the compiler's cache key)."""
        return json.dumps([self.kind, self.value], sort_keys=True, ensure_ascii=False)


# ---- spec -> llguidance grammar text ---------------------------------------------------------------------------


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties", "additionalItems", "contains", "propertyNames", "not", "if", "then",
            "else", "unevaluatedItems", "unevaluatedProperties")


def _strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object schema in it that lists `properties` and
    leaves `additionalProperties` unset (subschemas are found by keyword; values such as `enum` are untouched)."""
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for k in _SCHEMA_MAPS:
        if isinstance(out.get(k), Mapping):
            out[k] = {name: _strict(sub) for name, sub in out[k].items()}
    for k in _SCHEMA_LISTS:
        if isinstance(out.get(k), list):
            out[k] = [_strict(sub) for sub in out[k]]
    for k in _SCHEMAS:
        if k in out:
            out[k] = _strict(out[k])
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _json_grammar(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValueError(f"the json spec is not valid JSON: {e}") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"a json spec takes a JSON schema object, got {type(value).__name__}")
    schema = dict(value) or {"type": "object"}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(_strict(schema), defaults=JSON_OPTIONS)
    except (TypeError, ValueError) as e:  # not serialisable to JSON
        raise ValueError(f"invalid json for structured output: {e}") from e


def _regex_grammar(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("a regex spec takes a non-empty string")
    return llguidance.LLMatcher.grammar_from_regex(value)


def _choice_grammar(value: Any) -> str:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValueError("a choice spec takes a list of strings")
    choices = list(value)
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("a choice spec takes a non-empty list of strings")
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def _lark_grammar(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a grammar spec takes a non-empty Lark or GBNF string")
    try:
        lark = any_to_lark(value)
    except Exception as e:  # the converter raises plain Exceptions for malformed GBNF
        raise ValueError(f"invalid grammar for structured output: {e}") from e
    return llguidance.LLMatcher.grammar_from_lark(lark)


_GRAMMARS = {"json": _json_grammar, "regex": _regex_grammar, "choice": _choice_grammar, "grammar": _lark_grammar}


def to_grammar(spec: StructuredSpec) -> str:
    """The llguidance grammar text of a spec (not yet checked: `LLMatcher.validate_grammar` does that)."""
    if spec.kind not in _GRAMMARS:
        raise ValueError(f"unknown structured output kind {spec.kind!r}; one of {', '.join(KINDS)}")
    return _GRAMMARS[spec.kind](spec.value)


# ---- the per-row constraint -------------------------------------------------------------------------------------


class GrammarConstraint:
    """One row's matcher state: a `TokenConstraint` (allowed / advance / finished) over a model vocabulary of size
    `vocab_size`. The mask of a state is computed once, on the first `allowed()` after an `advance()`."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: tuple[int, ...],
                 matcher_vocab: int) -> None:
        self._matcher, self._vocab, self._eos = matcher, vocab_size, eos_ids
        self._words = np.zeros((max(vocab_size, matcher_vocab) + 31) // 32, dtype=np.int32)  # the matcher's bitmask
        self._mask: torch.Tensor | None = None
        self._ended = False

    def allowed(self) -> torch.Tensor:
        """[V] bool: the tokens that may come next (after the end: none)."""
        if self._mask is None:
            self._mask = self._compute()
        return self._mask

    def _compute(self) -> torch.Tensor:
        if self._ended:
            return torch.zeros(self._vocab, dtype=torch.bool)
        self._raise_on_error()
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self._raise_on_error()
        bits = np.unpackbits(self._words.view(np.uint8), count=self._vocab, bitorder="little")  # [V] uint8
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token: int) -> None:
        """Take the row's next token; ValueError (state unchanged) if the grammar does not allow it."""
        if self._ended:
            raise ValueError(f"token {token} after the end of the structured output")
        if token in self._eos:
            if not self._matcher.is_accepting():
                raise ValueError(f"end token {token} before the structured output is complete")
            self._ended = True
        elif not self._may_take(token):
            raise ValueError(f"token {token} is not allowed by the structured output here")
        elif not self._matcher.consume_token(token):
            self._raise_on_error()
        self._mask = None

    def _may_take(self, token: int) -> bool:
        if not 0 <= token < self._vocab:
            return False
        if self._mask is not None:  # the engine asks allowed() before every advance()
            return bool(self._mask[token])
        return self._matcher.validate_tokens([token]) == 1

    def finished(self) -> bool:
        """True when nothing more may follow: an end id was taken, or only an end id could come next."""
        return self._ended or (self._matcher.is_stopped() and not self._matcher.is_error())

    def _raise_on_error(self) -> None:
        if self._matcher.is_error():  # a resource limit of the parser, not a disallowed token (advance checks those)
            raise RuntimeError(f"structured output failed: {self._matcher.get_error()}")


# ---- the compiler -----------------------------------------------------------------------------------------------


class StructuredCompiler:
    """Compiles specs for one tokenizer and model vocabulary, caching the `cache_size` most recently used.

    `vocab_size` is the model's logits width V (may exceed the tokenizer's length: the extra ids are never
    allowed). `eos_ids` are the ids that end a row (the engine's end ids; default the tokenizer's eos). The
    tokenizer must be a Hugging Face fast tokenizer; it is wrapped for the library on the first compile."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int] | None = None,
                 cache_size: int = 64) -> None:
        ids = tuple(sorted(set(eos_ids))) if eos_ids is not None else (tokenizer.eos_token_id,)
        if not ids or any(i is None or not 0 <= i < vocab_size for i in ids):
            raise ValueError(f"structured output needs end ids inside the vocabulary of {vocab_size}, got {ids}")
        self.tokenizer, self.vocab_size, self.eos_ids, self.cache_size = tokenizer, vocab_size, ids, cache_size
        self._lltok: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def _tokenizer(self) -> llguidance.LLTokenizer:
        if self._lltok is None:
            n = max(self.vocab_size, len(self.tokenizer))
            self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n, eos_token=list(self.eos_ids))
        return self._lltok

    def compile(self, spec: StructuredSpec) -> llguidance.LLMatcher:
        """The spec's fresh matcher (cached; callers deep-copy it). ValueError if the grammar does not compile."""
        with self._lock:
            if spec.key in self._cache:
                self._cache.move_to_end(spec.key)
                return self._cache[spec.key]
            lltok = self._tokenizer()
            matcher = llguidance.LLMatcher(lltok, to_grammar(spec), log_level=0)
            if matcher.is_error():
                raise ValueError(f"invalid {spec.kind} for structured output: {matcher.get_error().strip()}")
            self._cache[spec.key] = matcher
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return matcher

    def constraint(self, spec: StructuredSpec) -> TokenConstraint:
        """A fresh per-row constraint for the spec (a GrammarConstraint)."""
        matcher = self.compile(spec).deep_copy()
        return GrammarConstraint(matcher, self.vocab_size, self.eos_ids, self._tokenizer().vocab_size)
