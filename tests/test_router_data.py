"""Routing inputs (user turns), JSONL data, the stratified split, and the bad-data errors."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from helpers import EXPERTS, prompts_jsonl, write_jsonl
from router.data import label_indices, min_per_expert, read_examples, stratified_split
from router.inputs import routing_text, routing_texts
from twinrt.errors import TwinError


def test_chat_routes_on_user_turns_only() -> None:
    chat = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "arr"}, {"role": "user", "content": "add 2 and 2"}]
    assert routing_text(chat) == "hi\nadd 2 and 2"
    assert routing_text("plain") == "plain"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}},
                                          {"type": "text", "text": "b"}]}]
    assert routing_text(parts) == "a\nb"
    assert routing_text([{"role": "system", "content": "only system"}]) == ""


@pytest.mark.parametrize("bad", [42, [{"content": "no role"}], ["not a message"],
                                 [{"role": "user", "content": 3}]])
def test_bad_inputs_are_clear_errors(bad) -> None:
    with pytest.raises(TwinError, match="input 0"):
        routing_texts([bad])


def test_a_bare_string_is_not_a_batch() -> None:
    with pytest.raises(TwinError, match="batch"):
        routing_texts("hello")


def test_read_examples_accepts_text_messages_and_task_suite_lines(tmp_path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "what is 2+2", "expert": "math"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "write code"}],
         "expert": "code"},
    ])
    ex = read_examples(f)
    assert [(e.label, e.line) for e in ex] == [("math", 1), ("code", 2)]
    assert routing_text(ex[1].input) == "write code"
    suite = tmp_path / "suite.jsonl"
    suite.write_text(json.dumps({"task": "math", "messages": [{"role": "user", "content": "1+1?"}],
                                 "answer": "2"}) + "\n\n")
    ex = read_examples(suite, label_key="task")
    assert len(ex) == 1 and ex[0].label == "math"
    with pytest.raises(TwinError, match="'expert' is missing"):
        read_examples(suite)


def test_malformed_line_names_its_line_number(tmp_path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok", "expert": "math"}\n\n{"text": "broken", "expert": \n')
    with pytest.raises(TwinError, match=r"bad\.jsonl:3: not valid JSON"):
        read_examples(f)


@pytest.mark.parametrize("line, msg", [
    ('["a list"]', "expected a JSON object"),
    ('{"expert": "math"}', "needs a 'text' or a 'messages'"),
    ('{"text": 5, "expert": "math"}', "'text' must be a string"),
    ('{"text": "   ", "expert": "math"}', "no text to route on"),
    ('{"messages": [{"role": "assistant", "content": "x"}], "expert": "math"}', "no text to route on"),
    ('{"text": "hi", "expert": ""}', "label field"),
])
def test_bad_lines(tmp_path, line, msg) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "fine", "expert": "math"}\n' + line + "\n")
    with pytest.raises(TwinError, match=r"d\.jsonl:2: .*" + msg):
        read_examples(f)


def test_empty_and_missing_data_files(tmp_path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(TwinError, match="has no examples"):
        read_examples(tmp_path / "empty.jsonl")
    with pytest.raises(TwinError, match="does not exist"):
        read_examples(tmp_path / "nope.jsonl")


def test_unknown_expert_names_it_and_the_known_ones(tmp_path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "expert": "math"}, {"text": "b", "expert": "poetry"}])
    with pytest.raises(TwinError, match=r"line 2: expert 'poetry' is not in the artifact; "
                                        r"known experts: math, code, chat"):
        label_indices(read_examples(f), EXPERTS)


def test_stratified_split_is_deterministic_disjoint_and_per_expert(tmp_path) -> None:
    ex = read_examples(prompts_jsonl(tmp_path / "d.jsonl", 20))
    y = label_indices(ex, EXPERTS)
    train, held = stratified_split(y, EXPERTS, 0.2, seed=3)
    assert (train, held) == stratified_split(y, EXPERTS, 0.2, seed=3)
    assert held != stratified_split(y, EXPERTS, 0.2, seed=4)[1]
    assert sorted(train + held) == list(range(len(y)))
    assert Counter(y[i] for i in held) == {0: 4, 1: 4, 2: 4}
    assert stratified_split(y, EXPERTS, 0.0, seed=0) == (list(range(len(y))), [])


def test_too_few_examples_per_expert_says_how_many_are_needed() -> None:
    y = [0] * 10 + [1] * 10 + [2] * 3
    assert min_per_expert(0.2) == 5 and min_per_expert(0.5) == 2 and min_per_expert(0.0) == 1
    with pytest.raises(TwinError, match=r"'chat' has 3; a hold-out split of 0.2 needs at least 5 per expert"):
        stratified_split(y, EXPERTS, 0.2, seed=0)
    stratified_split(y, EXPERTS, 0.34, seed=0)          # 3 per expert suffice for a third held out
    with pytest.raises(TwinError, match=r"'code' has 0; training needs at least 1"):
        stratified_split([0, 2], EXPERTS, 0.0, seed=0)
    with pytest.raises(TwinError, match="holdout must be in"):
        stratified_split(y, EXPERTS, 0.7, seed=0)
