"""`twinrt ab report LOG`: per-arm statistics of a routing log joined with the requests' outcomes, each arm
compared to a control arm, and a chart.

    twinrt ab report LOG [--outcomes FILE.jsonl ...] [--feedback STORE] [--control core] [--mde 0.05]
                         [--alpha 0.05] [--power 0.8] [--seed 0] [--resamples 2000] [--png PATH] [--json PATH]

Per arm (over the log's "ok" requests; cancelled and failed ones are counted apart):

    requests, cancelled, errors
    latency p50 [95% CI] / p90 / p99    (arrival to last token, seconds; linear-interpolated percentiles)
    ttft p50                            (arrival to first token)
    tok/s [95% CI]                      Σ completion tokens / Σ latency: the decode rate one request sees
    mean weight per expert              the average mix (core requests count as all zeros)
    outcomes, mean [95% CI]             outcomes joined by response id (any status)

Outcomes come from the server's feedback store (default: feedback.sqlite beside LOG, when it exists) and from
`--outcomes` files; an id's first outcome counts (store first, then the files in order). Each arm other than
the control is compared to it: difference, interval, p, the outcomes per arm needed for `--mde`, a verdict.
The methods are serving.abstats'; any arm name works (twin, core, expert:<name>, static:<label>, ...).

The PNG: on the left the outcome means, latency p50 and tokens/s per arm with their intervals (the control's
mean a dashed line) and the verdicts; on the right one panel per arm with a box plot of each expert's weight.
It defaults to LOG with the suffix .png.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serving import abstats
from serving.abstats import Comparison, Interval, percentile
from twinrt.errors import TwinError

__all__ = ["ArmSummary", "Joined", "Report", "compare_arms", "join_outcomes", "percentile", "report", "summarize"]
DEFAULTS = {"control": "core", "mde": 0.05, "alpha": 0.05, "power": 0.8, "seed": 0, "resamples": 2000,
            "unsure": 0.7}


@dataclass(frozen=True)
class ArmSummary:
    arm: str
    requests: int
    cancelled: int
    errors: int
    latency_p50: float | None
    latency_p90: float | None
    latency_p99: float | None
    ttft_p50: float | None
    tokens_per_s: float | None
    completion_tokens: int
    mean_weights: dict[str, float]
    latency_p50_ci: Interval | None = None
    tokens_per_s_ci: Interval | None = None
    outcomes: int = 0
    outcome_mean: float | None = None
    outcome_ci: Interval | None = None
    routed: int = 0  # completed requests the router decided
    unsure: int = 0  # of those: its top expert's probability below the report's threshold, or its fallback rule


@dataclass(frozen=True)
class Joined:
    """Outcomes joined to the log by id: per arm the values in log order, and what did not join."""

    values: dict[str, list[float]]
    binary: bool       # every value is 0 or 1: Wilson / Newcombe / z-test; else bootstrap / Welch
    matched: int
    unmatched: int     # ids the log does not hold
    duplicates: int    # further outcomes of an id (the first counts)
    ambiguous: int     # ids the log holds more than once (a client's repeated request_id): not counted


def expert_order(records: Sequence[dict[str, Any]]) -> list[str]:
    """Experts in the order the log's weights list them (first appearance)."""
    out: list[str] = []
    for r in records:
        for e in r.get("weights") or {}:
            if e not in out:
                out.append(e)
    return out


def join_outcomes(records: Sequence[dict[str, Any]], outcomes: Sequence[Any]) -> Joined:
    """Join outcomes (anything with `id` and `value`) to the log's records by id."""
    first: dict[str, float] = {}
    duplicates = 0
    for o in outcomes:
        if o.id in first:
            duplicates += 1
        else:
            first[o.id] = o.value
    seen: dict[str, int] = {}
    for r in records:
        if r.get("id") in first:
            seen[r["id"]] = seen.get(r["id"], 0) + 1
    values: dict[str, list[float]] = {}
    for r in records:
        rid = r.get("id")
        if seen.get(rid) == 1:
            values.setdefault(r["arm"], []).append(first[rid])
    matched = sum(len(v) for v in values.values())
    every = [v for vs in values.values() for v in vs]
    return Joined(values, abstats.is_binary(every), matched, len(first) - len(seen), duplicates,
                  sum(1 for c in seen.values() if c > 1))


def is_unsure(record: dict[str, Any], below: float) -> bool:
    """Whether the router was unsure of a logged request: it fell back, or its top expert's probability (the
    log's `confidence`) is below `below`."""
    conf = record.get("confidence")
    return record.get("rule") == "fallback" or (conf is not None and float(conf) < below)


def summarize(records: Sequence[dict[str, Any]], joined: Joined | None = None, *, seed: int = 0,
              resamples: int = 2000, alpha: float = 0.05, unsure_below: float = 0.7) -> list[ArmSummary]:
    """One summary per arm, arms in order of first appearance."""
    experts = expert_order(records)
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        arms.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs in arms.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        timed = [r for r in ok if r.get("latency_s") is not None]
        lat = [float(r["latency_s"]) for r in timed]
        ttft = [float(r["ttft_s"]) for r in ok if r.get("ttft_s") is not None]
        tokens = sum(int(r.get("completion_tokens") or 0) for r in ok)
        weights = {e: sum(float((r.get("weights") or {}).get(e, 0.0)) for r in ok) / len(ok) if ok else 0.0
                   for e in experts}
        values = joined.values.get(arm, []) if joined is not None else []
        if not values:
            mean, ci = None, None
        elif joined is not None and joined.binary:
            mean, ci = sum(values) / len(values), abstats.wilson(int(sum(values)), len(values), alpha)
        else:
            mean, ci = sum(values) / len(values), abstats.mean_ci(values, resamples, seed, alpha)
        out.append(ArmSummary(
            arm, len(ok), sum(r.get("status") == "cancelled" for r in rs), sum(r.get("status") == "error" for r in rs),
            percentile(lat, 50), percentile(lat, 90), percentile(lat, 99), percentile(ttft, 50),
            tokens / sum(lat) if lat and sum(lat) > 0 else None, tokens, weights,
            latency_p50_ci=abstats.median_ci(lat, resamples, seed, alpha),
            tokens_per_s_ci=abstats.rate_ci([int(r.get("completion_tokens") or 0) for r in timed], lat, resamples,
                                            seed, alpha),
            outcomes=len(values), outcome_mean=mean, outcome_ci=ci,
            routed=sum(r.get("rule") is not None for r in ok), unsure=sum(is_unsure(r, unsure_below) for r in ok)))
    return out


def compare_arms(joined: Joined, arms: Sequence[str], control: str, mde: float, alpha: float = 0.05,
                 power: float = 0.8) -> list[Comparison]:
    """Every arm but the control against the control, in `arms` order."""
    base = joined.values.get(control, [])
    return [abstats.compare(a, control, joined.values.get(a, []), base, joined.binary, mde, alpha, power)
            for a in arms if a != control]


# ---- the printed report ------------------------------------------------------------------------------------------


def _s(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _ci(x: float | None, ci: Interval | None, fmt: str = ".3f") -> str:
    if x is None:
        return "-"
    return format(x, fmt) + ("" if ci is None else f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]")


def summary_table(summaries: Sequence[ArmSummary], experts: Sequence[str]):
    from rich.markup import escape
    from rich.table import Table

    routed = any(a.routed for a in summaries)
    t = Table(title="A/B report: per arm (latency and ttft in seconds; [95% CI])")
    for col in ("arm", "requests", "cancelled", "errors", "p50", "p90", "p99", "ttft p50", "tok/s",
                *(("router unsure",) if routed else ()), *(escape(f"w[{e}]") for e in experts)):
        t.add_column(col, justify="left" if col == "arm" else "right")
    for a in summaries:
        unsure = (f"{a.unsure}/{a.routed} ({a.unsure / a.routed:.1%})" if a.routed else "-",) if routed else ()
        t.add_row(escape(a.arm), str(a.requests), str(a.cancelled), str(a.errors), _ci(a.latency_p50, a.latency_p50_ci),
                  _s(a.latency_p90), _s(a.latency_p99), _s(a.ttft_p50), _ci(a.tokens_per_s, a.tokens_per_s_ci, ".1f"),
                  *unsure, *(f"{a.mean_weights.get(e, 0.0):.3f}" for e in experts))
    return t


def outcome_table(summaries: Sequence[ArmSummary], comparisons: Sequence[Comparison], control: str, binary: bool,
                  mde: float):
    from rich.markup import escape
    from rich.table import Table

    kind = "binary (good = 1): Wilson; vs control: Newcombe, z-test" if binary else \
        "scores: bootstrap percentile; vs control: Welch's t"
    t = Table(title=f"outcomes, {kind}")
    for col in ("arm", "outcomes", "mean [95% CI]", escape(f"Δ vs {control} [95% CI]"), "p",
                f"n/arm for ±{mde:g}"):
        t.add_column(col, justify="left" if col == "arm" else "right")
    by_arm = {c.arm: c for c in comparisons}
    for a in summaries:
        c = by_arm.get(a.arm)
        t.add_row(escape(a.arm), str(a.outcomes), _ci(a.outcome_mean, a.outcome_ci),
                  "control" if a.arm == control else "-" if c is None else _ci(c.diff, c.ci, "+.3f"),
                  "" if c is None or c.p is None else abstats.format_p(c.p).removeprefix("p = "),
                  "" if c is None or c.needed_per_arm is None else str(c.needed_per_arm))
    return t


# ---- the chart ---------------------------------------------------------------------------------------------------


def _interval_panel(ax, summaries: Sequence[ArmSummary], value: str, interval: str, title: str, fmt: str,
                    line: float | None = None, counts: bool = False) -> None:
    """A forest plot: one point per arm with its interval (the first arm on top), its numbers in a column on
    the right."""
    from matplotlib.transforms import blended_transform_factory

    arms = list(summaries)
    ys = list(range(len(arms)))[::-1]
    xs = [getattr(a, value) for a in arms]
    cis = [getattr(a, interval) for a in arms]
    known = [x for x in xs if x is not None] + [v for ci in cis if ci for v in ci]
    lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
    pad = (hi - lo) * 0.08 or max(abs(hi), 1.0) * 0.1
    beside = blended_transform_factory(ax.transAxes, ax.transData)
    for y, a, x, ci in zip(ys, arms, xs, cis):
        n = f"  n={a.outcomes}" if counts else ""
        if x is None:
            ax.text(1.03, y, "no data" + n, transform=beside, va="center", fontsize=9, color="0.4")
            continue
        err = [[x - ci[0]], [ci[1] - x]] if ci else None
        ax.errorbar([x], [y], xerr=err, fmt="o", color="C0", ecolor="C0", elinewidth=2, capsize=5)
        text = format(x, fmt) + (f"  [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")
        ax.text(1.03, y, text + n, transform=beside, va="center", fontsize=9, family="monospace")
    if line is not None:
        ax.axvline(line, color="0.5", linestyle="--", linewidth=1)
    ax.set_yticks(ys, [a.arm for a in arms])
    ax.set_ylim(-0.6, len(arms) - 0.4)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="x", alpha=0.3)


def plot_report(records: Sequence[dict[str, Any]], summaries: Sequence[ArmSummary], experts: Sequence[str],
                comparisons: Sequence[Comparison], control: str, binary: bool | None, path: Path) -> Path | None:
    """Writes the PNG (None when no request completed: nothing to chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok":
            arms.setdefault(r["arm"], []).append(r)
    if not arms:
        return None
    shown = [s for s in summaries if s.arm in arms or s.outcomes]
    rows = max(3, len(arms))
    left_h = 0.9 + 0.45 * len(shown)
    height = max(3 * left_h, 2.4 * rows) + 0.35 * len(comparisons) + 0.9
    right_w = max(6, 1.0 * len(experts) + 2)
    fig = plt.figure(figsize=(10 + right_w, height))
    outer = fig.add_gridspec(1, 2, width_ratios=[10, right_w], wspace=0.12, left=0.09, right=0.98,
                             bottom=(0.35 * len(comparisons) + 0.5) / height, top=1 - 0.75 / height)
    left = outer[0].subgridspec(3, 2, width_ratios=[5, 3], hspace=0.5, wspace=0)
    control_mean = next((s.outcome_mean for s in summaries if s.arm == control), None)
    what = "share good" if binary else "mean score"
    title = "outcomes: none joined yet (POST /v1/feedback, or --outcomes FILE)" if binary is None else \
        f"outcome ({what}), 95% CI" + (f"; dashed: {control}" if control_mean is not None else "")
    _interval_panel(fig.add_subplot(left[0, 0]), shown, "outcome_mean", "outcome_ci", title, ".3f", control_mean,
                    counts=True)
    _interval_panel(fig.add_subplot(left[1, 0]), shown, "latency_p50", "latency_p50_ci", "latency p50 (s), 95% CI",
                    ".3f")
    _interval_panel(fig.add_subplot(left[2, 0]), shown, "tokens_per_s", "tokens_per_s_ci", "tokens/s, 95% CI", ".1f")
    right = outer[1].subgridspec(len(arms), 1, hspace=0.55)
    first = None
    for i, (arm, rs) in enumerate(arms.items()):
        ax = fig.add_subplot(right[i], sharex=first)
        first = first or ax
        data = [[float((r.get("weights") or {}).get(e, 0.0)) for r in rs] for e in experts]   # [E][requests]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(experts) + 1), list(experts), fontsize=8.5)
        ax.tick_params(axis="x", labelbottom=i == len(arms) - 1, rotation=20)
        ax.set_ylim(-0.05, max(1.05, max((max(d) for d in data if d), default=1) + 0.05))
        ax.set_ylabel("weight")
        ax.set_title(f"{arm}: mix weight per expert ({len(rs)} requests)", fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
    for i, c in enumerate(comparisons):
        fig.text(0.02, (0.35 * (len(comparisons) - i) - 0.05) / height, c.verdict, fontsize=9.5,
                 weight="bold" if c.decided else "normal")
    fig.suptitle(f"A/B report: {sum(len(v) for v in arms.values())} completed requests", fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# ---- the command -------------------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> None:
    if not args.mde > 0:
        raise TwinError(f"--mde {args.mde}: the minimum detectable effect must be > 0 (in outcome units)")
    for name in ("alpha", "power"):
        if not 0 < getattr(args, name) < 1:
            raise TwinError(f"--{name} {getattr(args, name)}: it must be within (0, 1)")
    if args.resamples < 100:
        raise TwinError(f"--resamples {args.resamples}: use at least 100 bootstrap resamples")
    if not 0 < args.unsure <= 1:
        raise TwinError(f"--unsure {args.unsure}: it is a probability threshold within (0, 1]")


def load_outcomes(args: argparse.Namespace, console) -> list[Any]:
    """The feedback store's outcomes (given, or the default one if it exists), then each --outcomes file's."""
    from serving.feedback import DEFAULT_STORE, read_outcomes, read_store

    outcomes: list[Any] = []
    store = Path(args.feedback) if args.feedback else Path(args.log).parent / DEFAULT_STORE
    if args.feedback or store.is_file():
        outcomes += read_store(store)
        console.print(f"read {len(outcomes)} feedback record(s) from {store}")
    for path in args.outcomes:
        got, bad = read_outcomes(path)
        outcomes += got
        console.print(f"read {len(got)} outcome(s) from {path}" + (f"; skipped {len(bad)}: {bad[0]}" if bad else ""))
    return outcomes


@dataclass(frozen=True)
class Report:
    arms: list[ArmSummary]
    joined: Joined
    control: str
    comparisons: list[Comparison]
    settings: dict[str, Any]

    @property
    def kind(self) -> str | None:
        return None if not self.joined.matched else "binary" if self.joined.binary else "score"

    def to_json(self) -> dict[str, Any]:
        j = self.joined
        methods = {"binary": {"mean": "Wilson score interval", "difference": "Newcombe hybrid score interval",
                              "p": "pooled two-proportion z-test", "n": "Fleiss, no continuity correction"},
                   "score": {"mean": "bootstrap percentile", "difference": "Welch's t interval",
                             "p": "Welch's t-test (two-sided)", "n": "2 (z_a + z_b)^2 sd^2 / mde^2, pooled sd"}}
        return {"arms": [asdict(a) for a in self.arms], "control": self.control,
                "comparisons": [asdict(c) for c in self.comparisons],
                "outcomes": {"kind": self.kind, "methods": methods.get(self.kind or "", {}), "matched": j.matched,
                             "unmatched": j.unmatched, "duplicates": j.duplicates, "ambiguous": j.ambiguous},
                "settings": self.settings | {"latency_and_tokens_per_s": "bootstrap percentile"}}


def report(records: Sequence[dict[str, Any]], outcomes: Sequence[Any], control: str = "core", mde: float = 0.05,
           alpha: float = 0.05, power: float = 0.8, seed: int = 0, resamples: int = 2000,
           unsure: float = 0.7) -> Report:
    """The whole report: per-arm summaries, the joined outcomes, each arm against `control`."""
    joined = join_outcomes(records, outcomes)
    summaries = summarize(records, joined, seed=seed, resamples=resamples, alpha=alpha, unsure_below=unsure)
    names = [s.arm for s in summaries]
    comparisons = compare_arms(joined, names, control, mde, alpha, power) if joined.matched and control in names \
        else []
    return Report(summaries, joined, control, comparisons,
                  {"mde": mde, "alpha": alpha, "power": power, "seed": seed, "resamples": resamples,
                   "unsure_below": unsure})


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from serving.routelog import read_log

    _check(args)
    console = Console(width=None if sys.stdout.isatty() else 300)
    records, bad = read_log(args.log)
    if not records:
        raise TwinError(f"routing log {args.log} has no requests")
    outcomes = load_outcomes(args, console)
    rep = report(records, outcomes, args.control, args.mde, args.alpha, args.power, args.seed, args.resamples,
                 args.unsure)
    experts = expert_order(records)
    console.print(summary_table(rep.arms, experts))
    if bad:
        console.print(f"skipped {bad} unreadable line(s)")
    j = rep.joined
    if not j.matched:
        console.print("no outcomes joined: post feedback to /v1/feedback, or give --outcomes FILE.jsonl"
                      + (f" ({j.unmatched} outcome id(s) are not in the log)" if j.unmatched else ""))
    else:
        console.print(outcome_table(rep.arms, rep.comparisons, rep.control, j.binary, args.mde))
        skipped = [f"{n} {k}" for k, n in (("not in the log", j.unmatched), ("duplicate", j.duplicates),
                                           ("on an id the log repeats", j.ambiguous)) if n]
        if skipped:
            console.print("outcomes not counted: " + ", ".join(skipped))
        if rep.control not in [s.arm for s in rep.arms]:
            console.print(f"control arm {escape(rep.control)!r} is not in the log "
                          f"(arms: {escape(', '.join(s.arm for s in rep.arms))}): no comparisons; pick one with "
                          "--control")
        for c in rep.comparisons:
            console.print(escape(c.verdict), style="bold" if c.decided else None)
    png = plot_report(records, rep.arms, experts, rep.comparisons, rep.control, j.binary if j.matched else None,
                      Path(args.png) if args.png else Path(args.log).with_suffix(".png"))
    console.print(f"wrote {png}" if png else "no completed requests: no chart")
    if args.json:
        Path(args.json).write_text(json.dumps(rep.to_json(), indent=1))
        console.print(f"wrote {args.json}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `ab report` to twinrt's subparsers; it sets `fn(args) -> exit code`."""
    ab = subparsers.add_parser("ab", help="A/B analysis of a server's routing log")
    sub = ab.add_subparsers(dest="ab_command", required=True)
    r = sub.add_parser("report", help="per-arm counts, latency, tokens/s, mean weights, outcomes with intervals, "
                       "each arm against a control with a verdict; PNG chart")
    r.add_argument("log", help="routing log (JSONL) written by `twinrt serve`")
    r.add_argument("--outcomes", action="append", default=[], metavar="FILE.jsonl",
                   help='offline outcomes, lines {"id", "score"} or {"id", "label": "good"|"bad"} (repeatable)')
    r.add_argument("--feedback", default=None, metavar="STORE",
                   help="the server's feedback store (default: feedback.sqlite beside LOG, if it exists)")
    r.add_argument("--control", default=DEFAULTS["control"], help="the arm the others are compared to "
                   "(default %(default)s)")
    r.add_argument("--mde", type=float, default=DEFAULTS["mde"], help="minimum detectable effect, in outcome units "
                   "(a share for labels), for the sample sizes (default %(default)s)")
    r.add_argument("--alpha", type=float, default=DEFAULTS["alpha"], help="significance level (default %(default)s)")
    r.add_argument("--power", type=float, default=DEFAULTS["power"], help="power of the sample sizes (default "
                   "%(default)s)")
    r.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="seed of the bootstrap (default %(default)s)")
    r.add_argument("--resamples", type=int, default=DEFAULTS["resamples"], help="bootstrap resamples (default "
                   "%(default)s)")
    r.add_argument("--unsure", type=float, default=DEFAULTS["unsure"], help="a routed request counts as unsure "
                   "when the router's top expert has less probability than this, or it fell back (default "
                   "%(default)s)")
    r.add_argument("--png", default=None, help="chart path (default: LOG with suffix .png)")
    r.add_argument("--json", default=None, help="also write the report as JSON here")
    r.set_defaults(fn=cmd_report)
    return ab
