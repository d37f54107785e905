"""What `twinrt eval` prints and writes: the A/B table as a rich table, `eval.json`, `eval.md` and `eval.png`.

Every number is derived from `EvalResult.scores` (raw task scores) with `twinrt.eval.metrics.normalized_scores`:

    normalized[arm][task] = score[arm][task] / score[expert_of_task[task]][task]     (NaN if that is 0)
    mean_normalized[arm]  = mean over the defined tasks;   mean_score[arm] = mean raw score over all tasks

NaN is written as null in JSON and n/a in tables.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from twinrt.errors import TwinError
from twinrt.eval.journal import options_json
from twinrt.eval.metrics import NormalizedTable, normalized_scores
from twinrt.eval.run import EvalResult

EVAL_FORMAT = "twinrt-eval/1"
MiB = 2**20


def table_of(result: EvalResult) -> NormalizedTable:
    """The normalized table of a result (per task, per arm means, undefined tasks)."""
    return normalized_scores(result.scores, result.own_arm)


def mean_score(scores: dict[str, float]) -> float:
    """Mean raw score over the tasks of a row."""
    return sum(scores.values()) / len(scores)


def _num(v: float) -> float | None:
    return None if math.isnan(v) else v


def to_json(result: EvalResult) -> dict[str, Any]:
    """The JSON document of `eval.json` (see the module docstring for the arithmetic)."""
    table = table_of(result)
    opts = options_json(result.options)
    return {
        "format": EVAL_FORMAT,
        "artifact": result.artifact,
        "tasks_dir": result.tasks_dir,
        "split": result.options.split,
        "options": opts,
        "tasks": [{"name": t.name, "metric": t.metric, "examples": result.examples[t.name],
                   "expert": result.expert_of_task[t.name]} for t in result.tasks],
        "undefined_tasks": list(table.undefined_tasks),
        "arms": {
            a.name: {
                "kind": a.kind,
                "params": a.params,
                "scores": a.scores,
                "mean_score": mean_score(a.scores),
                "normalized": {t: _num(v) for t, v in table.per_task[a.name].items()},
                "mean_normalized": _num(table.mean[a.name]),
                "stored_bytes": a.stored_bytes,
                "tokens": a.tokens,
                "seconds": a.seconds,
                "tokens_per_s": a.tokens_per_s,
                "predictions": a.predictions,
            }
            for a in result.arms
        },
        "router": None if result.router is None else asdict(result.router),
        "selection": {
            s.method: {"chosen": s.points[s.chosen],
                       "grid": [{"params": p, "val_scores": v, "val_mean": m}
                                for p, v, m in zip(s.points, s.val_scores, s.val_means)]}
            for s in result.selections
        },
        "statistics": [asdict(c) for c in result.statistics],
        "twin_ranks": [{"core": r.core, "target": r.target, "rank": r.rank,
                        "mean_normalized": {str(k): _num(v) for k, v in r.means.items()}} for r in result.twin_ranks],
    }


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def rows(result: EvalResult) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the A/B table: per task `raw (normalized)`, means, MiB stored, tokens/s."""
    table = table_of(result)
    tasks = [t.name for t in result.tasks]
    head = ["arm", *tasks, "mean score", "mean normalized", "stored MiB", "tokens/s"]
    body = []
    for a in result.arms:
        cells = [f"{a.scores[t]:.3f} ({_fmt(table.per_task[a.name][t], 2)})" for t in tasks]
        body.append([a.name, *cells, f"{mean_score(a.scores):.3f}", _fmt(table.mean[a.name]),
                     f"{a.stored_bytes / MiB:.1f}", f"{a.tokens_per_s:.1f}"])
    return head, body


def notes(result: EvalResult) -> list[str]:
    """The lines under the table: examples, router accuracy, chosen merge parameters, undefined tasks."""
    o = result.options
    n = sum(result.examples.values())
    out = [f"{o.split} split: {n} examples over {len(result.tasks)} tasks; greedy, max {o.max_new_tokens} new tokens, "
           f"batch {o.batch_size}; cells are raw score (normalized by the task's own expert)"]
    if result.router is not None:
        r = result.router
        per = ", ".join(f"{t} {v:.0%}" for t, v in r.per_task.items())
        out.append(f"router ({r.label}): accuracy {r.accuracy:.1%} ({per}); routing took {r.seconds:.2f} s")
    if result.statistics:
        c = result.statistics
        out.append(f"statistics of the data-based merges: {sum(x.examples for x in c)} train examples over "
                   f"{len(c)} experts, {sum(x.seconds for x in c):.1f} s, {sum(x.bytes for x in c) / MiB:.1f} MiB")
    for s in result.selections:
        chosen = ", ".join(f"{k}={v}" for k, v in s.points[s.chosen].items()) or "no parameters"
        how = (f"best of {len(s.points)} on validation (mean score {s.val_means[s.chosen]:.3f})" if s.val_scores
               else "its only grid point")
        out.append(f"merge:{s.method}: {chosen} ({how}, grid {o.grid})")
    for r in result.twin_ranks:
        # four digits: at three, a score just under the target (0.9898) would print as the target itself
        tried = ", ".join(f"rank {k}: {_fmt(v, 4)}" for k, v in r.means.items())
        need = f"rank {r.rank} reaches {r.target}" if r.rank is not None else f"no rank tried reaches {r.target}"
        core = "the artifact's core" if r.core == "core" else f"the {r.core} core"
        out.append(f"twin on {core}: {need} of the experts' score ({tried})")
    undefined = table_of(result).undefined_tasks
    if undefined:
        out.append(f"own expert scored 0 on {', '.join(undefined)}: normalized n/a there, left out of the means")
    return out


def markdown(result: EvalResult) -> str:
    """`eval.md`: the A/B table and its notes."""
    head, body = rows(result)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(["# twinrt eval", "", f"artifact `{result.artifact}`, tasks `{result.tasks_dir}`", "",
                      *lines, "", *(f"- {n}" for n in notes(result)), ""])


def rich_table(result: EvalResult) -> Any:
    from rich.table import Table

    head, body = rows(result)
    t = Table(title=f"twinrt eval ({result.options.split} split)")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for r in body:
        t.add_row(*r)
    return t


def write_chart(result: EvalResult, path: Path) -> None:
    """`eval.png`: mean normalized score per arm (top), and per task for every arm but the experts (bottom:
    an expert is 1.0 on its own task by definition, and its other tasks are in the table)."""
    try:
        import matplotlib
    except ImportError:
        raise TwinError(f"writing {path} needs matplotlib (pip install matplotlib); eval.json and eval.md "
                        "are written") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = table_of(result)
    arms = [a.name for a in result.arms]
    tasks = [t.name for t in result.tasks]
    zero_nan = lambda v: 0.0 if math.isnan(v) else v  # noqa: E731
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(arms) + 2), 9))
    means = [zero_nan(table.mean[a]) for a in arms]
    bars = top.bar(range(len(arms)), means, color=[_colour(a.kind) for a in result.arms])
    top.bar_label(bars, labels=[_fmt(table.mean[a], 2) for a in arms], fontsize="small")
    top.set_xticks(range(len(arms)), arms, rotation=30, ha="right")
    top.axhline(1.0, color="grey", lw=0.8, ls="--")
    top.set_ylabel("mean normalized score")
    top.set_title("mean normalized score per arm (1.0 = each task's own expert)")
    shown = [a for a in result.arms if a.kind != "expert"]
    width = 0.8 / max(len(shown), 1)
    colours = plt.get_cmap("tab20").colors
    for i, a in enumerate(shown):
        vals = [zero_nan(table.per_task[a.name][t]) for t in tasks]
        bottom.bar([j + (i - (len(shown) - 1) / 2) * width for j in range(len(tasks))], vals, width,
                   label=a.name, color=colours[i % len(colours)])
    bottom.set_xticks(range(len(tasks)), tasks)
    bottom.axhline(1.0, color="grey", lw=0.8, ls="--")
    bottom.set_ylabel("normalized score")
    bottom.set_title("normalized score per task (n/a drawn as 0)")
    if shown:
        bottom.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _colour(kind: str) -> str:
    return {"expert": "tab:grey", "merge": "tab:orange", "core": "tab:brown", "twin": "tab:blue"}[kind]


def write_outputs(result: EvalResult, out: Path) -> list[Path]:
    """Write eval.json, eval.md and eval.png into `out` (created if needed); returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json", out / "eval.md", out / "eval.png"]
    paths[0].write_text(json.dumps(to_json(result), indent=1, allow_nan=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result), encoding="utf-8")
    write_chart(result, paths[2])
    return paths
