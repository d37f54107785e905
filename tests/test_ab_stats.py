"""`twinrt ab report`'s statistics against hand-computed references on fixed data: Wilson and Newcombe intervals
(published values and the closed forms), the pooled z-test and Welch's t against scipy (or closed forms without
it), the seeded bootstrap against a loop of its own, the sample sizes, the verdict (which flips when the data
do), the join of outcomes to the log, and the report's JSON and chart for any arm name."""

from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from helpers import write_jsonl
from serving import abstats
from serving.abreport import join_outcomes, report
from serving.cli import main as serving_main
from serving.feedback import Outcome
from serving.routelog import RouteLog

Z = NormalDist().inv_cdf(0.975)


def scipy_stats():
    return pytest.importorskip("scipy.stats", reason="scipy is not installed: the closed-form tests still run")


# ---- proportions ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k, n", [(81, 263), (3, 10), (0, 10), (10, 10), (1, 1), (500, 1000)])
def test_wilson_is_the_score_interval(k, n) -> None:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    lo, hi = abstats.wilson(k, n)
    assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12) and hi == pytest.approx(min(1.0, centre + half))
    assert 0 <= lo <= p <= hi <= 1


def test_wilson_and_newcombe_match_the_published_examples() -> None:
    # Newcombe (1998), Statistics in Medicine 17: 81/263 -> 0.2553 to 0.3662; 56/70 - 48/80 (method 10) ->
    # 0.0524 to 0.3339; 0/10 -> 0 to 0.2775
    assert abstats.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert abstats.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=5e-5)
    assert abstats.newcombe(48, 80, 56, 70) == pytest.approx((0.0524, 0.3339), abs=5e-5)
    assert abstats.wilson(0, 0) is None and abstats.newcombe(1, 0, 1, 2) is None


def test_two_proportion_p_is_the_pooled_z_test() -> None:
    k1, n1, k2, n2 = 48, 80, 56, 70
    pooled = (k1 + k2) / (n1 + n2)
    z = (k2 / n2 - k1 / n1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    assert abstats.two_proportion_p(k1, n1, k2, n2) == pytest.approx(2 * (1 - NormalDist().cdf(abs(z))), rel=1e-9)
    assert abstats.two_proportion_p(5, 5, 7, 7) == 1.0  # all good in both arms: no evidence of a difference


def test_two_proportion_p_equals_scipy_chi_square() -> None:
    st = scipy_stats()
    for k1, n1, k2, n2 in [(48, 80, 56, 70), (3, 40, 9, 41), (120, 200, 121, 200)]:
        table = [[k1, n1 - k1], [k2, n2 - k2]]
        assert abstats.two_proportion_p(k1, n1, k2, n2) == pytest.approx(
            st.chi2_contingency(table, correction=False).pvalue, rel=1e-9)


# ---- Student's t ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 12.0])
def test_t_p_value_equals_the_closed_forms(t) -> None:
    # df = 1 (Cauchy): P(|T| >= t) = 1 - 2/pi atan(t); df = 2: 1 - t / sqrt(2 + t^2)
    assert abstats.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10, abs=1e-14)
    assert abstats.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-10, abs=1e-14)
    assert abstats.t_two_sided_p(t, 1e7) == pytest.approx(math.erfc(t / math.sqrt(2)), rel=1e-5, abs=1e-14)


def test_t_quantile_inverts_the_p_value() -> None:
    assert abstats.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert abstats.t_quantile(0.975, 1e7) == pytest.approx(Z, rel=1e-5)


def test_welch_by_hand() -> None:
    a, b = [1.0, 2.0, 3.0, 4.5], [2.0, 5.0, 6.0, 7.0, 9.1]
    ma, mb = sum(a) / 4, sum(b) / 5
    va, vb = sum((x - ma) ** 2 for x in a) / 3, sum((x - mb) ** 2 for x in b) / 4
    se = math.sqrt(va / 4 + vb / 5)
    df = (va / 4 + vb / 5) ** 2 / ((va / 4) ** 2 / 3 + (vb / 5) ** 2 / 4)
    w = abstats.welch(a, b)
    assert w.diff == pytest.approx(mb - ma) and w.df == pytest.approx(df)
    assert w.p == pytest.approx(abstats.t_two_sided_p((mb - ma) / se, df))
    half = abstats.t_quantile(0.975, df) * se
    assert w.ci == pytest.approx((mb - ma - half, mb - ma + half))
    assert abstats.welch([1.0], b) is None
    assert abstats.welch([1.0, 1.0], [2.0, 2.0]).p == 0.0 and abstats.welch([1.0, 1.0], [1.0, 1.0]).p == 1.0


def test_welch_and_betainc_equal_scipy() -> None:
    st = scipy_stats()
    from scipy.special import betainc

    rng = np.random.default_rng(3)
    for n1, n2, shift in [(4, 5, 1.0), (30, 12, 0.2), (200, 180, -0.05)]:
        a, b = rng.normal(0, 1, n1), rng.normal(shift, 2, n2)
        ref = st.ttest_ind(b, a, equal_var=False)
        w = abstats.welch(list(a), list(b))
        assert w.p == pytest.approx(ref.pvalue, rel=1e-8) and w.df == pytest.approx(ref.df)
        assert w.ci == pytest.approx(tuple(ref.confidence_interval()), rel=1e-8)
    for a_, b_, x in [(0.5, 0.5, 0.3), (3.0, 0.5, 0.99), (200.0, 0.5, 0.999), (2.0, 7.0, 0.01)]:
        assert abstats.betainc(a_, b_, x) == pytest.approx(betainc(a_, b_, x), rel=1e-10)


# ---- the bootstrap -------------------------------------------------------------------------------------------------


def loop_percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def loop_bootstrap(columns: list[list[float]], stat, resamples: int, seed: int) -> tuple[float, float]:
    """The documented procedure, one resample at a time in plain Python."""
    rng = np.random.default_rng(seed)
    n = len(columns[0])
    values = []
    for _ in range(resamples):
        idx = [int(i) for i in rng.integers(0, n, size=n)]
        values.append(stat([[col[i] for i in idx] for col in columns]))
    return loop_percentile(values, 0.025), loop_percentile(values, 0.975)


DATA = [0.2, 0.9, 0.4, 0.4, 1.0, 0.05, 0.7, 0.65, 0.3, 0.8, 0.55]


def test_bootstrap_mean_and_median_equal_a_loop() -> None:
    got = abstats.mean_ci(DATA, resamples=500, seed=7)
    assert got == pytest.approx(loop_bootstrap([DATA], lambda c: sum(c[0]) / len(c[0]), 500, 7), rel=1e-12)
    got = abstats.median_ci(DATA, resamples=500, seed=7)
    assert got == pytest.approx(loop_bootstrap([DATA], lambda c: loop_percentile(c[0], 0.5), 500, 7), rel=1e-12)
    assert abstats.mean_ci(DATA, 500, 7) == abstats.mean_ci(DATA, 500, 7) != abstats.mean_ci(DATA, 500, 8)
    assert abstats.mean_ci([], 500, 7) is None


def test_bootstrap_rate_resamples_requests_whole_and_in_bounded_blocks(monkeypatch) -> None:
    tokens = [10, 30, 5, 12, 40, 8, 22]
    secs = [0.5, 1.1, 0.2, 0.6, 2.0, 0.3, 1.0]
    ref = loop_bootstrap([tokens, secs], lambda c: sum(c[0]) / sum(c[1]), 300, 1)
    assert abstats.rate_ci(tokens, secs, 300, 1) == pytest.approx(ref, rel=1e-12)
    monkeypatch.setattr(abstats, "BOOTSTRAP_CELLS", 20)  # blocks of 2 rows: the same draws
    assert abstats.rate_ci(tokens, secs, 300, 1) == pytest.approx(ref, rel=1e-12)


# ---- sample sizes and verdicts -------------------------------------------------------------------------------------


def test_sample_sizes_are_the_standard_formulas() -> None:
    za, zb = Z, NormalDist().inv_cdf(0.8)
    assert abstats.n_two_means(1.0, 0.5) == math.ceil(2 * (za + zb) ** 2 / 0.25) == 63
    p1, p2 = 0.5, 0.55
    pbar = (p1 + p2) / 2
    n = (za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))) ** 2 / 0.05 ** 2
    assert abstats.n_two_proportions(0.5, 0.05) == math.ceil(n) == 1565
    assert abstats.n_two_proportions(0.98, 0.05) == abstats.n_two_proportions(0.93, 0.05)  # toward the middle


def labels(good: int, n: int) -> list[float]:
    return [1.0] * good + [0.0] * (n - good)


def test_binary_verdict_flips_with_the_data() -> None:
    win = abstats.compare("twin", "core", labels(80, 100), labels(50, 100), True, mde=0.05)
    assert win.decided and win.verdict.startswith("twin beats core by +0.30 [") and "p < 0.001" in win.verdict
    lose = abstats.compare("twin", "core", labels(50, 100), labels(80, 100), True, mde=0.05)
    assert lose.decided and lose.verdict.startswith("core beats twin by +0.30 [")
    assert lose.diff == pytest.approx(-0.3) and lose.ci == pytest.approx(abstats.newcombe(80, 100, 50, 100))
    few = abstats.compare("twin", "core", labels(3, 5), labels(2, 5), True, mde=0.05)
    assert not few.decided and few.verdict.startswith(
        f"not enough data yet: twin vs core needs ~{abstats.n_two_proportions(0.4, 0.05)} per arm, has 5")
    same = abstats.compare("twin", "core", labels(1000, 2000), labels(1000, 2000), True, mde=0.05)
    assert not same.decided and same.verdict.startswith("no difference of 0.05 or more: twin vs core +0.00")


def test_score_verdict_flips_with_the_data() -> None:
    rng = np.random.default_rng(0)
    hi, lo = list(rng.normal(0.7, 0.1, 60)), list(rng.normal(0.5, 0.1, 60))
    win = abstats.compare("static:ties", "twin", hi, lo, False, mde=0.05)
    assert win.decided and win.verdict.startswith("static:ties beats twin by +0.")
    assert win.p == abstats.welch(lo, hi).p and win.needed_per_arm == abstats.n_two_means(
        abstats.pooled_sd(lo, hi), 0.05)
    lose = abstats.compare("static:ties", "twin", lo, hi, False, mde=0.05)
    assert lose.decided and lose.verdict.startswith("twin beats static:ties by +0.")
    few = abstats.compare("static:ties", "twin", hi[:1], lo[:1], False, mde=0.05)
    assert not few.decided and few.verdict.startswith("not enough data yet: static:ties vs twin has 1 and 1")


# ---- the join and the report ---------------------------------------------------------------------------------------


def rec(i: int, arm: str, latency: float = 0.5, tokens: int = 10, rid: str | None = None) -> dict:
    return {"ts": 1.0, "id": rid or f"cmpl-{i}", "endpoint": "completions", "model": "ab", "arm": arm, "ab": "ab",
            "user": None, "router": "none", "rule": None, "overridden": False, "weights": {"math": 0.0, "code": 1.0},
            "n": 1, "stream": False, "status": "ok", "finish_reasons": ["stop"], "prompt_tokens": 3,
            "completion_tokens": tokens, "latency_s": latency, "ttft_s": latency / 4}


def test_join_counts_what_does_not_join() -> None:
    records = [rec(0, "twin"), rec(1, "core"), rec(2, "twin"), rec(3, "core", rid="dup"), rec(4, "twin", rid="dup")]
    outs = [Outcome("cmpl-0", 1.0, "good"), Outcome("cmpl-1", 0.0, "bad"), Outcome("cmpl-0", 0.0, "bad"),
            Outcome("nowhere", 1.0, "good"), Outcome("dup", 1.0, "good"), Outcome("cmpl-2", 0.0, None)]
    j = join_outcomes(records, outs)
    assert j.values == {"twin": [1.0, 0.0], "core": [0.0]} and j.binary
    assert (j.matched, j.unmatched, j.duplicates, j.ambiguous) == (3, 1, 1, 1)
    assert not join_outcomes(records, [Outcome("cmpl-0", 0.5, None)]).binary


def test_report_cli_with_outcomes_and_any_arm_name(tmp_path, capsys) -> None:
    log = RouteLog(tmp_path / "logs" / "routing.jsonl")
    arms = ["twin", "core", "static:ties"]
    good = {"twin": 45, "core": 25, "static:ties": 26}  # of 60 each
    outcomes = []
    for i in range(180):
        arm = arms[i % 3]
        log.write(rec(i, arm, latency=0.2 + 0.01 * (i % 7), tokens=8 + i % 5))
        outcomes.append({"id": f"cmpl-{i}", "label": "good" if (i // 3) < good[arm] else "bad"})
    log.close()
    write_jsonl(tmp_path / "outcomes.jsonl", outcomes + [{"id": "cmpl-0", "score": float("nan")}])
    argv = ["ab", "report", str(tmp_path / "logs" / "routing.jsonl"), "--outcomes", str(tmp_path / "outcomes.jsonl"),
            "--json", str(tmp_path / "r.json"), "--seed", "3", "--resamples", "400"]
    assert serving_main(argv) == 0
    out = capsys.readouterr().out
    assert "read 180 outcome(s)" in out and "skipped 1" in out  # the NaN line
    assert "twin beats core by +0.33 [" in out and "not enough data yet: static:ties vs core needs ~" in out
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [a["arm"] for a in rep["arms"]] == arms and rep["outcomes"]["kind"] == "binary"
    twin = rep["arms"][0]
    assert twin["outcomes"] == 60 and twin["outcome_mean"] == pytest.approx(0.75)
    assert twin["outcome_ci"] == pytest.approx(abstats.wilson(45, 60))
    lat = [0.2 + 0.01 * (i % 7) for i in range(0, 180, 3)]
    assert twin["latency_p50_ci"] == pytest.approx(abstats.median_ci(lat, 400, 3))
    assert [c["arm"] for c in rep["comparisons"]] == ["twin", "static:ties"] and rep["comparisons"][0]["decided"]
    png = (tmp_path / "logs" / "routing.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # another control: the verdicts are against it
    assert serving_main(argv[:3] + ["--outcomes", str(tmp_path / "outcomes.jsonl"), "--control", "static:ties"]) == 0
    assert "twin beats static:ties by +0.32 [" in capsys.readouterr().out
    assert serving_main(argv[:3] + ["--mde", "0"]) == 2


def test_report_without_outcomes_or_control_says_so(tmp_path, capsys) -> None:
    records = [rec(i, ["twin", "static:dare"][i % 2]) for i in range(8)]
    rep = report(records, [])
    assert rep.comparisons == [] and rep.kind is None and rep.arms[0].outcomes == 0
    log = write_jsonl(tmp_path / "r.jsonl", records)
    write_jsonl(tmp_path / "o.jsonl", [{"id": "cmpl-0", "score": 0.5}, {"id": "cmpl-1", "score": 0.25}])
    assert serving_main(["ab", "report", str(log)]) == 0
    assert "no outcomes joined" in capsys.readouterr().out
    assert serving_main(["ab", "report", str(log), "--outcomes", str(tmp_path / "o.jsonl")]) == 0
    assert "control arm 'core' is not in the log" in capsys.readouterr().out
