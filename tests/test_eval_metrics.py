"""Task metrics and normalized-score arithmetic, on hand-made values with known results."""

from __future__ import annotations

import math

import pytest

from twinrt.errors import TwinError
from twinrt.eval.metrics import (
    METRICS,
    exact_match,
    get_metric,
    json_match,
    normalized_scores,
    numeric_match,
    task_score,
)


def test_exact_match_strips_outer_whitespace_only() -> None:
    assert exact_match("  03/05/2021\n", "03/05/2021") == 1.0
    assert exact_match("2021-03-05", "03/05/2021") == 0.0
    assert exact_match("paris", "Paris") == 0.0
    assert exact_match("$1,234.50", "$1,234.5") == 0.0
    assert exact_match("forty  two", "forty two") == 0.0


def test_numeric_match_reads_numbers_not_strings() -> None:
    assert numeric_match("1,234.50", "1234.5") == 1.0
    assert numeric_match("42.", "42") == 1.0
    assert numeric_match("42.0000000001", "42") == 1.0
    assert numeric_match("43", "42") == 0.0
    assert numeric_match("forty-two", "42") == 0.0
    assert numeric_match("nan", "42") == 0.0
    assert numeric_match("0", "0") == 1.0
    with pytest.raises(TwinError, match="not a number"):
        numeric_match("42", "about 42")


def test_json_match_ignores_key_order_and_spacing() -> None:
    answer = '{"name": "Anna", "age": 34}'
    assert json_match('{"age":34,"name":"Anna"}', answer) == 1.0
    assert json_match('{"age": 34.0, "name": "Anna"}', answer) == 1.0
    assert json_match('{"age": "34", "name": "Anna"}', answer) == 0.0
    assert json_match('{"name": "Anna"}', answer) == 0.0
    assert json_match("name: Anna, age: 34", answer) == 0.0
    with pytest.raises(TwinError, match="not JSON"):
        json_match("{}", "{name: Anna}")


def test_registry_lookup() -> None:
    assert get_metric("exact") is exact_match
    assert set(METRICS) == {"exact", "numeric", "json"}
    with pytest.raises(TwinError, match="unknown metric 'bleu'; known: exact, json, numeric"):
        get_metric("bleu")


def test_task_score_is_the_mean_over_examples() -> None:
    predictions = ["Paris", "Lima ", "Rome", "berlin"]
    answers = ["Paris", "Lima", "Madrid", "Berlin"]
    assert task_score("exact", predictions, answers) == 0.5
    assert task_score("exact", ["x"], ["y"]) == 0.0
    with pytest.raises(TwinError, match="3 predictions for 2 answers"):
        task_score("exact", ["a", "b", "c"], ["a", "b"])
    with pytest.raises(TwinError, match="empty"):
        task_score("exact", [], [])


def test_normalized_scores_divide_by_the_own_expert() -> None:
    scores = {
        "expert:dates": {"dates": 0.8, "prices": 0.1},
        "expert:prices": {"dates": 0.2, "prices": 0.5},
        "merge": {"dates": 0.4, "prices": 0.5},
        "twin": {"dates": 0.8, "prices": 0.6},
    }
    table = normalized_scores(scores, {"dates": "expert:dates", "prices": "expert:prices"})
    assert table.undefined_tasks == ()
    assert table.per_task["merge"] == pytest.approx({"dates": 0.5, "prices": 1.0})
    assert table.per_task["expert:dates"] == pytest.approx({"dates": 1.0, "prices": 0.2})
    assert table.per_task["twin"]["prices"] == pytest.approx(1.2)  # better than its own expert: > 1
    assert table.mean["merge"] == pytest.approx(0.75)
    assert table.mean["expert:prices"] == pytest.approx((0.25 + 1.0) / 2)
    assert table.mean["twin"] == pytest.approx((1.0 + 1.2) / 2)


def test_zero_own_expert_score_is_nan_and_left_out_of_the_mean() -> None:
    scores = {
        "a": {"t1": 0.5, "t2": 0.0},
        "b": {"t1": 0.25, "t2": 0.3},
    }
    table = normalized_scores(scores, {"t1": "a", "t2": "a"})
    assert table.undefined_tasks == ("t2",)
    assert math.isnan(table.per_task["b"]["t2"])
    assert table.per_task["b"]["t1"] == pytest.approx(0.5)
    assert table.mean["b"] == pytest.approx(0.5)
    assert table.mean["a"] == pytest.approx(1.0)

    all_zero = normalized_scores({"a": {"t": 0.0}}, {"t": "a"})
    assert all_zero.undefined_tasks == ("t",)
    assert math.isnan(all_zero.mean["a"])


def test_normalized_scores_reject_incomplete_tables() -> None:
    with pytest.raises(TwinError, match="expert 'c' of task 't1' has no row"):
        normalized_scores({"a": {"t1": 1.0}}, {"t1": "c"})
    with pytest.raises(TwinError, match="arm 'b' has no score for task"):
        normalized_scores({"a": {"t1": 1.0}, "b": {}}, {"t1": "a"})
    with pytest.raises(TwinError, match="must be finite"):
        normalized_scores({"a": {"t1": math.nan}}, {"t1": "a"})
    with pytest.raises(TwinError, match="empty"):
        normalized_scores({"a": {"t1": 1.0}}, {})
