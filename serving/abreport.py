"""`twinrt ab report LOG`: per-arm statistics of a routing log, and a chart of the weight distributions.

    twinrt ab report LOG [--png PATH] [--json PATH]

Per arm (over the log's "ok" requests; cancelled and failed ones are counted apart):

    requests, cancelled, errors
    latency p50 / p90 / p99      (arrival to last token, seconds; linear-interpolated percentiles)
    ttft p50                     (arrival to first token)
    tok/s                        Σ completion tokens / Σ latency: the decode rate one request sees
    mean weight per expert       the average mix (core requests count as all zeros)

The PNG has one panel per arm: a box plot of each expert's weight over that arm's requests. It defaults to
the log's path with the suffix .png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from twinrt.errors import TwinError


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


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 ≤ q ≤ 100) with linear interpolation between order statistics; None if empty."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def expert_order(records: Sequence[dict[str, Any]]) -> list[str]:
    """Experts in the order the log's weights list them (first appearance)."""
    out: list[str] = []
    for r in records:
        for e in r.get("weights") or {}:
            if e not in out:
                out.append(e)
    return out


def summarize(records: Sequence[dict[str, Any]]) -> list[ArmSummary]:
    """One summary per arm, arms in order of first appearance."""
    experts = expert_order(records)
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        arms.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs in arms.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        lat = [float(r["latency_s"]) for r in ok if r.get("latency_s") is not None]
        ttft = [float(r["ttft_s"]) for r in ok if r.get("ttft_s") is not None]
        tokens = sum(int(r.get("completion_tokens") or 0) for r in ok)
        weights = {e: sum(float((r.get("weights") or {}).get(e, 0.0)) for r in ok) / len(ok) if ok else 0.0
                   for e in experts}
        out.append(ArmSummary(arm, len(ok), sum(r.get("status") == "cancelled" for r in rs),
                              sum(r.get("status") == "error" for r in rs), percentile(lat, 50), percentile(lat, 90),
                              percentile(lat, 99), percentile(ttft, 50),
                              tokens / sum(lat) if lat and sum(lat) > 0 else None, tokens, weights))
    return out


def summary_table(summaries: Sequence[ArmSummary], experts: Sequence[str]):
    from rich.markup import escape
    from rich.table import Table

    def s(x: float | None, fmt: str = ".3f") -> str:
        return "-" if x is None else format(x, fmt)

    t = Table(title="A/B report: per arm (latency and ttft in seconds)")
    for col in ("arm", "requests", "cancelled", "errors", "p50", "p90", "p99", "ttft p50", "tok/s",
                *(escape(f"w[{e}]") for e in experts)):
        t.add_column(col, justify="left" if col == "arm" else "right")
    for a in summaries:
        t.add_row(a.arm, str(a.requests), str(a.cancelled), str(a.errors), s(a.latency_p50), s(a.latency_p90),
                  s(a.latency_p99), s(a.ttft_p50), s(a.tokens_per_s, ".1f"),
                  *(f"{a.mean_weights.get(e, 0.0):.3f}" for e in experts))
    return t


def plot_weights(records: Sequence[dict[str, Any]], experts: Sequence[str], path: Path) -> Path | None:
    """One panel per arm: box plots of each expert's weight over the arm's ok requests. Writes a PNG (None when
    no request completed: nothing to chart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("status") == "ok":
            arms.setdefault(r["arm"], []).append(r)
    if not arms:
        return None
    fig, axes = plt.subplots(len(arms), 1, figsize=(max(6, 1.1 * len(experts) + 2), 2.6 * len(arms)), squeeze=False,
                             sharex=True)
    for ax, (arm, rs) in zip(axes[:, 0], arms.items()):
        data = [[float((r.get("weights") or {}).get(e, 0.0)) for r in rs] for e in experts]   # [E][requests]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(experts) + 1), list(experts))
        ax.set_ylim(-0.05, max(1.05, max((max(d) for d in data if d), default=1) + 0.05))
        ax.set_ylabel("weight")
        ax.set_title(f"{arm} ({len(rs)} requests)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("mix weight per expert, by arm")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from serving.routelog import read_log

    console = Console(width=None if sys.stdout.isatty() else 300)
    records, bad = read_log(args.log)
    if not records:
        raise TwinError(f"routing log {args.log} has no requests")
    experts = expert_order(records)
    summaries = summarize(records)
    console.print(summary_table(summaries, experts))
    if bad:
        console.print(f"skipped {bad} unreadable line(s)")
    png = plot_weights(records, experts, Path(args.png) if args.png else Path(args.log).with_suffix(".png"))
    console.print(f"wrote {png}" if png else "no completed requests: no chart")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(s) for s in summaries], indent=1))
        console.print(f"wrote {args.json}")
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add `ab report` to twinrt's subparsers; it sets `fn(args) -> exit code`."""
    ab = subparsers.add_parser("ab", help="A/B analysis of a server's routing log")
    sub = ab.add_subparsers(dest="ab_command", required=True)
    r = sub.add_parser("report", help="per-arm counts, latency percentiles, tokens/s, mean weights; PNG chart")
    r.add_argument("log", help="routing log (JSONL) written by `twinrt serve`")
    r.add_argument("--png", default=None, help="chart path (default: LOG with suffix .png)")
    r.add_argument("--json", default=None, help="also write the per-arm summary as JSON here")
    r.set_defaults(fn=cmd_report)
    return ab
