"""Structured output (twinrt/runtime/structured.py): a spec's constraint, driving a tiny random Llama step by step
(logits, mask, pick, advance), yields text of the spec's language, greedy and sampled, where the unconstrained
model writes garbage; the mask's semantics (padded vocabularies, end ids, special tokens) against a reference."""

from __future__ import annotations

import json

import jsonschema
import pytest
import regex
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tiny import make_base, make_tokenizer
from twinrt.runtime.structured import StructuredCompiler, StructuredSpec

PAD = 32  # the model's vocabulary is the tokenizer's plus this many padding ids, as real checkpoints pad theirs
SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "kind": {"enum": ["cat", "dog"]},
                         "home": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
                         "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
          "required": ["name", "age", "kind", "home"]}
EMAIL = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"
COLOURS = ["red", "green", "blue", "dark \"grey\""]
SEEDS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(model, tokenizer, compiler): a tiny random Llama whose vocabulary is PAD ids wider than its tokenizer's."""
    root = tmp_path_factory.mktemp("structured")
    vocab = len(make_tokenizer(root / "tokenizer"))
    model = make_base(root / "base", vocab_size=vocab + PAD, max_position_embeddings=512)
    tok = AutoTokenizer.from_pretrained(root / "base")
    assert model.config.vocab_size == len(tok) + PAD
    return model, tok, StructuredCompiler(tok, model.config.vocab_size)


@torch.no_grad()
def decode(model: LlamaForCausalLM, tok, constraint=None, seed: int | None = None, steps: int = 200,
           boost_pad: bool = False) -> tuple[str, bool]:
    """Decode greedily (seed None) or by sampling at temperature 1 under the constraint; the end token and a
    finished constraint end the text. `boost_pad` raises the padding ids' logits far above the rest. Returns
    (text, ended) where ended is False when `steps` ran out first."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    ids, past, out = torch.tensor([tok.encode("hello world")]), None, []
    for _ in range(steps):
        if constraint is not None and constraint.finished():
            return tok.decode(out), True
        res = model(input_ids=ids, past_key_values=past, use_cache=True)
        past, logits = res.past_key_values, res.logits[0, -1]  # logits: [V]
        if boost_pad:
            logits[len(tok):] += 100.0
        if constraint is not None:
            allowed = constraint.allowed()  # [V] bool
            assert allowed.shape == logits.shape and not allowed[len(tok):].any()
            logits = logits.masked_fill(~allowed, float("-inf"))
        t = int(logits.argmax()) if gen is None else int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
        if t == tok.eos_token_id:
            return tok.decode(out), True
        if constraint is not None:
            constraint.advance(t)
        out.append(t)
        ids = torch.tensor([[t]])
    return tok.decode(out), False


def ids_of(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ---- decoding on the model -------------------------------------------------------------------------------------


def valid_json(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


@pytest.mark.parametrize("seed", [None, *SEEDS])
def test_json_schema_decoding_validates(lm, seed):
    model, tok, compiler = lm
    text, ended = decode(model, tok, compiler.constraint(StructuredSpec("json", SCHEMA)), seed, boost_pad=True)
    assert ended and valid_json(text), text
    free, _ = decode(model, tok, None, seed, steps=60)
    assert not valid_json(free)


@pytest.mark.parametrize("seed", [None, *SEEDS])
def test_regex_and_choice_decoding(lm, seed):
    model, tok, compiler = lm
    text, ended = decode(model, tok, compiler.constraint(StructuredSpec("regex", EMAIL)), seed)
    assert ended and regex.fullmatch(EMAIL, text), text
    text, ended = decode(model, tok, compiler.constraint(StructuredSpec("choice", COLOURS)), seed)
    assert ended and text in COLOURS, text
    free, _ = decode(model, tok, None, seed, steps=20)
    assert not regex.fullmatch(EMAIL, free) and free not in COLOURS


@pytest.mark.parametrize("grammar", [
    'start: item (", " item)*\nitem: "a" | "bb" | NUM\nNUM: /[0-9]{1,2}/',
    'root ::= item (", " item)*\nitem ::= "a" | "bb" | [0-9] [0-9]?',
])
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_grammar_decoding(lm, grammar, seed):
    """A Lark grammar and the same in GBNF: the text is in the language (here also a regular one)."""
    model, tok, compiler = lm
    text, ended = decode(model, tok, compiler.constraint(StructuredSpec("grammar", grammar)), seed)
    assert ended and regex.fullmatch(r"(a|bb|[0-9]{1,2})(, (a|bb|[0-9]{1,2}))*", text), text


# ---- mask semantics --------------------------------------------------------------------------------------------


def test_mask_is_the_set_of_tokens_that_keep_a_match_possible(lm):
    """allowed()[t] == "prefix + text(t) can still become a full match", checked for every token against the
    `regex` module's partial matching, along a path; special tokens and padding ids never."""
    _, tok, compiler = lm
    pattern = r"(ab|c)+[0-9]{2}"
    c = compiler.constraint(StructuredSpec("regex", pattern))
    specials = set(tok.all_special_ids)
    prefix = ""
    for step in "abcab12":
        allowed = c.allowed()
        for t in range(len(tok)):
            if t == tok.eos_token_id:
                continue
            text = prefix + tok.decode([t])
            want = t not in specials and regex.fullmatch(pattern, text, partial=True) is not None
            assert bool(allowed[t]) == want, (prefix, tok.decode([t]))
        assert not allowed[len(tok):].any()
        c.advance(ids_of(tok, step)[0])
        prefix += step


def test_end_token_allowed_exactly_when_complete(lm):
    _, tok, _ = lm
    V = len(tok) + PAD
    compiler = StructuredCompiler(tok, V, eos_ids={tok.eos_token_id, tok.pad_token_id})
    c = compiler.constraint(StructuredSpec("regex", r"(ab)+c?"))
    ends = [tok.eos_token_id, tok.pad_token_id]
    assert not c.allowed()[ends].any()
    for ch, complete, finished in [("a", False, False), ("b", True, False), ("a", False, False), ("b", True, False),
                                   ("c", True, True)]:  # after "a", "ab", "aba", "abab", "ababc"
        c.advance(ids_of(tok, ch)[0])
        assert c.allowed()[ends].tolist() == [complete, complete] and c.finished() == finished, ch
    assert c.allowed().sum() == 2  # nothing but the end ids after "ababc"


def test_choice_finishes_when_nothing_may_follow(lm):
    _, tok, compiler = lm
    c = compiler.constraint(StructuredSpec("choice", ["yes", "yesno"]))
    for ch in "yes":
        assert not c.finished()
        c.advance(ids_of(tok, ch)[0])
    assert not c.finished() and c.allowed()[tok.eos_token_id]  # "yes" is complete, "yesno" may still follow
    for ch in "no":
        c.advance(ids_of(tok, ch)[0])
    assert c.finished()
    c.advance(tok.eos_token_id)
    with pytest.raises(ValueError, match="after the end"):
        c.advance(ids_of(tok, "a")[0])


def test_advance_refuses_what_the_mask_refuses_and_keeps_its_state(lm):
    _, tok, compiler = lm
    c = compiler.constraint(StructuredSpec("json", SCHEMA))
    before = c.allowed().clone()
    for bad in (ids_of(tok, "x")[0], tok.eos_token_id, len(tok) + 3, tok.convert_tokens_to_ids("<|im_start|>")):
        assert not before[bad]
        with pytest.raises(ValueError, match="not allowed|before the structured output is complete"):
            c.advance(bad)
    assert torch.equal(c.allowed(), before)
    fresh = compiler.constraint(StructuredSpec("json", SCHEMA))  # no mask asked for yet
    with pytest.raises(ValueError, match="not allowed"):
        fresh.advance(ids_of(tok, "x")[0])
    fresh.advance(ids_of(tok, "{")[0])
    for t in ids_of(tok, '{"name": "'):
        c.advance(t)
    assert not c.allowed()[list(tok.all_special_ids)].any()  # special tokens are not text, even in a string


def test_objects_with_properties_are_closed(lm):
    """Strict schemas: an object that lists its properties takes no others unless additionalProperties says so."""
    _, tok, compiler = lm
    props = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for schema, more in ((props, False), ({**props, "additionalProperties": True}, True)):
        c = compiler.constraint(StructuredSpec("json", schema))
        for t in ids_of(tok, '{"a": 1'):
            c.advance(t)
        assert bool(c.allowed()[ids_of(tok, ",")[0]]) == more


def test_json_object_accepts_any_object_only(lm):
    _, tok, compiler = lm
    for spec in (StructuredSpec.json_object(), StructuredSpec("json", {})):
        c = compiler.constraint(spec)
        assert not c.allowed()[ids_of(tok, "[")[0]] and c.allowed()[ids_of(tok, "{")[0]]
        for t in ids_of(tok, '{"a": [1, {"b": null}], "c": "d"}'):
            c.advance(t)
        assert c.finished()


def test_rows_are_independent_and_compiled_once(lm):
    _, tok, compiler = lm
    spec = StructuredSpec("json", {"required": ["a"], "properties": {"a": {"type": "integer"}}, "type": "object"})
    same = StructuredSpec("json", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    assert compiler.compile(spec) is compiler.compile(same)
    first, second = compiler.constraint(spec), compiler.constraint(same)
    for t in ids_of(tok, '{"a": 1'):
        first.advance(t)
    assert torch.equal(second.allowed(), compiler.constraint(spec).allowed())
    assert not torch.equal(first.allowed(), second.allowed())
    small = StructuredCompiler(tok, len(tok), cache_size=1)
    kept = small.compile(spec)
    small.compile(StructuredSpec("regex", "a+"))
    assert small.compile(spec) is not kept  # evicted by the newer one


@pytest.mark.parametrize("kind, value, message", [
    ("json", {"type": "foo"}, "Invalid type"),
    ("json", {"type": "array", "uniqueItems": True}, "uniqueItems"),
    ("json", 3, "JSON schema object"),
    ("json", "{not json", "not valid JSON"),
    ("regex", "a(b", "unclosed group"),
    ("regex", "(?=a)a", "look-around"),
    ("regex", "", "non-empty"),
    ("choice", [], "non-empty list"),
    ("choice", "red", "list of strings"),
    ("choice", ["a", 1], "non-empty list of strings"),
    ("grammar", "start: foo", "unknown name"),
    ("grammar", "  ", "non-empty"),
    ("xml", "<a/>", "unknown structured output kind"),
])
def test_bad_specs_raise_value_error(kind, value, message):
    with pytest.raises(ValueError, match=message):
        StructuredSpec(kind, value)


def test_compiler_needs_end_ids_in_the_vocabulary(lm):
    _, tok, _ = lm
    with pytest.raises(ValueError, match="end ids"):
        StructuredCompiler(tok, len(tok), eos_ids={len(tok) + 5})
