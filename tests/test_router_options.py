"""The pure option rule: temperature, top_k, min_weight, fallback; rows ≥ 0 summing to 1."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from router.options import RoutingOptions, apply_options, drop_below, keep_top_k

EXPERTS = ["math", "code", "chat", "law"]


def _route(logits, no_evidence=None, **kw):
    return apply_options(torch.tensor(logits, dtype=torch.float32), RoutingOptions(**kw), EXPERTS, no_evidence)


def test_default_is_softmax_and_rule_router() -> None:
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    res = apply_options(z, RoutingOptions(), EXPERTS)
    torch.testing.assert_close(res.weights, torch.softmax(z, dim=-1))
    torch.testing.assert_close(res.probs, res.weights)
    assert res.rules == ["router"] * 5


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.3}, {"temperature": 7.0}, {"top_k": 1}, {"top_k": 2},
                                {"top_k": 9}, {"min_weight": 0.2}, {"min_weight": 0.99},
                                {"top_k": 3, "min_weight": 0.1}, {"fallback_threshold": 0.6},
                                {"fallback_threshold": 0.6, "fallback": "core", "top_k": 2}])
def test_rows_nonnegative_and_sum_to_one(kw) -> None:
    z = 3 * torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    res = apply_options(z, RoutingOptions(**kw), EXPERTS)
    assert res.weights.shape == (64, 4)
    assert (res.weights >= 0).all()
    sums = res.weights.sum(dim=-1)
    core_rows = torch.tensor([r == "fallback" and kw.get("fallback") == "core" for r in res.rules])
    torch.testing.assert_close(sums[~core_rows], torch.ones(int((~core_rows).sum())))
    assert (sums[core_rows] == 0).all()


def test_temperature_divides_logits_before_softmax() -> None:
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    hot = _route(z.tolist(), temperature=4.0)
    cold = _route(z.tolist(), temperature=0.25)
    torch.testing.assert_close(hot.weights, torch.softmax(z / 4.0, dim=-1))
    torch.testing.assert_close(cold.weights, torch.softmax(z * 4.0, dim=-1))
    assert hot.weights.max() < torch.softmax(z, -1).max() < cold.weights.max()
    assert hot.weights.argmax() == cold.weights.argmax() == 0


def test_top_k_keeps_the_k_largest_and_renormalises() -> None:
    res = _route([[0.0, 3.0, 1.0, 2.0]], top_k=2)
    p = torch.softmax(torch.tensor([0.0, 3.0, 1.0, 2.0]), -1)
    expected = torch.tensor([0.0, p[1], 0.0, p[3]]) / (p[1] + p[3])
    torch.testing.assert_close(res.weights[0], expected)
    assert res.rules == ["top_k"]
    one = _route([[0.0, 3.0, 1.0, 2.0]], top_k=1)
    assert one.weights[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    all_kept = _route([[0.0, 3.0, 1.0, 2.0]], top_k=4)
    assert all_kept.rules == ["router"]
    torch.testing.assert_close(all_kept.weights[0], p)


def test_min_weight_drops_small_weights_but_never_the_largest() -> None:
    z = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    res = _route(z.tolist(), min_weight=0.1)
    torch.testing.assert_close(res.weights[0], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert res.rules == ["min_weight"]
    all_small = _route([[0.0, 0.0, 0.0, 0.1]], min_weight=0.9)
    assert all_small.weights[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    nothing_dropped = _route(z.tolist(), min_weight=0.01)
    assert nothing_dropped.rules == ["router"]


def test_top_k_then_min_weight_rule_is_the_last_that_changed_the_row() -> None:
    z = torch.log(torch.tensor([[0.4, 0.35, 0.2, 0.05]]))
    assert _route(z.tolist(), top_k=3).rules == ["top_k"]
    res = _route(z.tolist(), top_k=3, min_weight=0.25)
    assert res.rules == ["min_weight"]
    torch.testing.assert_close(res.weights[0], torch.tensor([0.4, 0.35, 0.0, 0.0]) / 0.75)


def test_fallback_uniform_and_core_when_unsure() -> None:
    z = [[5.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0]]   # confident, unsure
    uni = _route(z, fallback_threshold=0.5)
    assert uni.rules == ["router", "fallback"]
    assert uni.weights[1].tolist() == [0.25] * 4
    torch.testing.assert_close(uni.weights[0], torch.softmax(torch.tensor(z[0]), -1))
    core = _route(z, fallback_threshold=0.5, fallback="core", top_k=1)
    assert core.rules == ["top_k", "fallback"]
    assert core.weights[1].tolist() == [0.0] * 4
    assert core.weights[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    # probs always report what the router believed, fallback or not
    torch.testing.assert_close(core.probs[1], torch.softmax(torch.tensor(z[1]), -1))


def test_fallback_threshold_sees_tempered_probabilities() -> None:
    z = [[2.0, 0.0, 0.0, 0.0]]                          # max prob 0.71 at T = 1
    assert _route(z, fallback_threshold=0.6).rules == ["router"]
    assert _route(z, fallback_threshold=0.6, temperature=3.0).rules == ["fallback"]


def test_no_evidence_rows_always_fall_back() -> None:
    res = _route([[9.0, 0.0, 0.0, 0.0]] * 2, no_evidence=torch.tensor([False, True]))
    assert res.rules == ["router", "fallback"]
    assert res.weights[1].tolist() == [0.25] * 4


def test_helpers_on_hand_values() -> None:
    w = torch.tensor([[0.1, 0.6, 0.3]])
    torch.testing.assert_close(keep_top_k(w, 2), torch.tensor([[0.0, 0.6, 0.3]]) / 0.9)
    torch.testing.assert_close(drop_below(w, 0.2), torch.tensor([[0.0, 0.6, 0.3]]) / 0.9)
    assert drop_below(w, 0.0) is w


def test_result_helpers() -> None:
    res = _route([[0.0, 0.0, 0.0, 0.0]])
    assert res.mixes() == [{"math": 0.25, "code": 0.25, "chat": 0.25, "law": 0.25}]
    row = res.row(0)
    assert row["rule"] == "router" and row["weights"]["law"] == 0.25 and set(row) == {"weights", "probs",
                                                                                       "logits", "rule"}


@pytest.mark.parametrize("kw", [{"temperature": 0}, {"temperature": -1}, {"temperature": float("inf")},
                                {"top_k": 0}, {"min_weight": 1.0}, {"min_weight": -0.1},
                                {"fallback_threshold": 1.5}, {"fallback": "expert"}, {"unknown": 1}])
def test_options_are_validated(kw) -> None:
    with pytest.raises(ValidationError):
        RoutingOptions(**kw)


def test_options_are_frozen() -> None:
    opts = RoutingOptions()
    with pytest.raises(ValidationError):
        opts.top_k = 2


def test_column_count_must_match_experts() -> None:
    with pytest.raises(ValueError, match="4 experts"):
        apply_options(torch.zeros(2, 3), RoutingOptions(), EXPERTS)
