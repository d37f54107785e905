"""Score the base and every demo expert on every task: the expert x task cross-table.

    python -m examples.experts.eval_cross [--experts-dir examples/experts/lora] [--split validation] \
        [--out examples/experts/lora/cross_eval.json] [--limit N] [--samples N]

Arms: `base` (the dequantized GGUF) and `expert:<name>` for every PEFT adapter dir under --experts-dir,
merged into a copy of the base (`merge_and_unload`, float32) for speed. Each cell is the task's metric
over the split, with the same greedy decoding as `train_expert`. Writes the raw table, the table
normalized by each task's own expert (`twinrt.eval.metrics.normalized_scores`), timings and, with
--samples N, the first N (prompt, answer, prediction) of every cell as JSON, and prints the tables as Markdown.
--limit N scores only the first N examples of each split.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel

from examples.experts.smollm import load_base
from examples.experts.taskdata import evaluate, load_split, load_suite
from twinrt.eval.metrics import normalized_scores


def adapter_dirs(experts_dir: Path) -> dict[str, Path]:
    """{name: dir} of the PEFT adapters directly under `experts_dir`, sorted by name."""
    if not experts_dir.is_dir():
        raise SystemExit(f"error: {experts_dir} is not a directory")
    found = {d.name: d for d in sorted(experts_dir.iterdir()) if (d / "adapter_config.json").is_file()}
    if not found:
        raise SystemExit(f"error: no PEFT adapter (adapter_config.json) under {experts_dir}")
    return found


def with_adapter(base: PreTrainedModel, adapter: Path) -> PreTrainedModel:
    """A copy of `base` with the adapter merged in; `base` is left untouched."""
    merged = PeftModel.from_pretrained(copy.deepcopy(base), adapter).merge_and_unload()
    merged.train(False)
    return merged


def markdown(table: dict[str, dict[str, float]], tasks: list[str], digits: int = 2,
             mean: dict[str, float] | None = None) -> str:
    """Rows = arms, columns = tasks (+ a mean column if given); NaN prints as n/a."""
    fmt = lambda v: "n/a" if math.isnan(v) else f"{v:.{digits}f}"  # noqa: E731
    head = ["arm", *tasks] + (["mean"] if mean is not None else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, row in table.items():
        cells = [arm, *(fmt(row[t]) for t in tasks)] + ([fmt(mean[arm])] if mean is not None else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts-dir", type=Path, default=Path("examples/experts/lora"))
    parser.add_argument("--tasks-dir", type=Path, default=Path("examples/tasks"))
    parser.add_argument("--split", choices=("validation", "test"), default="validation")
    parser.add_argument("--out", type=Path, default=None, help="default: <experts-dir>/cross_eval.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="score the first N examples of each task")
    parser.add_argument("--samples", type=int, default=0, help="keep the first N predictions of every cell")
    args = parser.parse_args()
    if (args.limit is not None and args.limit < 1) or args.samples < 0:
        parser.error("--limit must be >= 1 and --samples >= 0")
    torch.set_num_threads(args.threads)
    specs = load_suite(args.tasks_dir)
    tasks = list(specs)
    data = {t: load_split(args.tasks_dir, t, args.split)[: args.limit] for t in tasks}
    adapters = adapter_dirs(args.experts_dir)
    base, tokenizer = load_base()

    scores: dict[str, dict[str, float]] = {}
    samples: dict[str, dict[str, list[dict[str, str]]]] = {}
    seconds: dict[str, float] = {}
    for arm in ["base", *(f"expert:{name}" for name in adapters)]:
        start = time.perf_counter()
        model = base if arm == "base" else with_adapter(base, adapters[arm.removeprefix("expert:")])
        scores[arm], samples[arm] = {}, {}
        for task in tasks:
            scores[arm][task], predictions = evaluate(model, tokenizer, data[task], specs[task].metric)
            samples[arm][task] = [
                {"prompt": e.messages[-1]["content"], "answer": e.answer, "prediction": p}
                for e, p in zip(data[task][: args.samples], predictions, strict=False)
            ]
            print(f"{arm:<22} {task:<14} {scores[arm][task]:.3f}", flush=True)
        seconds[arm] = round(time.perf_counter() - start, 1)
        del model

    expert_of_task = {t: f"expert:{t}" for t in tasks if t in adapters}
    normalized = normalized_scores(scores, expert_of_task) if expert_of_task else None
    out = args.out or args.experts_dir / "cross_eval.json"
    result = {
        "split": args.split,
        "n_examples": {t: len(data[t]) for t in tasks},
        "scores": scores,
        "normalized": None if normalized is None else {
            "per_task": normalized.per_task, "mean": normalized.mean,
            "undefined_tasks": list(normalized.undefined_tasks),
        },
        "seconds_per_arm": seconds,
    }
    if args.samples:
        result["samples"] = samples
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n{args.split} accuracy (rows: arms, columns: tasks)\n")
    print(markdown(scores, tasks))
    if normalized is not None:
        print("\nnormalized by each task's own expert\n")
        print(markdown(normalized.per_task, list(expert_of_task), mean=normalized.mean))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
