"""Calibration statistics for the eval's data-based static merges (fisher, regmean, mats), from the suite itself.

Each expert's calibration examples are the first `samples` examples of its own task's train split (the tasks
`expert_of_task` maps to it, in suite order), encoded as the split encodes a chat example (twinrt.split.
calibration). The statistics are computed once per run, for the union of what every selected method's grid
points need, with the eval's one plain model holding each original expert's weights in turn (in the eval's
dtype), and read back one tensor at a time by every merge that needs them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from twinrt.errors import TwinError
from twinrt.eval.generation import PlainModel
from twinrt.eval.tasks import TaskSuite
from twinrt.eval.weights import Sources, expert_weights
from twinrt.split.calibration import Calibration, check_sample, encode_example
from twinrt.split.run import decoder_linear_weights
from twinrt.split.statistics import ExpertCost, StatisticsFiles, StatisticsPlan, collect_statistics

Progress = Callable[[str, int], Callable[[int], None]]  # (label, total) -> advance(k), as the eval's


def suite_calibration(suite: TaskSuite, expert_of_task: Mapping[str, str], experts: Sequence[str], tokenizer: Any,
                      samples: int, batch_size: int, context: int | None) -> dict[str, Calibration]:
    """{expert: its first `samples` train examples, over its tasks in suite order}, in `experts` order;
    `context`: the model's longest sequence (a longer example is a TwinError naming it)."""
    train = suite.load("train")
    out = {}
    for e in experts:
        tasks = [t for t in suite.names if expert_of_task.get(t) == e]
        if not tasks:
            raise TwinError(f"expert {e!r} has no task in the suite to draw calibration examples from (map one with "
                            "--task-expert TASK=EXPERT, or leave the data-based methods out of --methods)")
        rows = [(f"{suite.root / t / 'train.jsonl'} example {i + 1}", ex) for t in tasks
                for i, ex in enumerate(train[t])][:samples]
        encoded = tuple(check_sample(encode_example(tokenizer, {"messages": [dict(m) for m in ex.messages],
                                                                "answer": ex.answer}, where), context, where)
                        for where, ex in rows)
        out[e] = Calibration(suite.root / tasks[0] / "train.jsonl", encoded, batch_size)
    return out


def needed_statistics(methods: Sequence[str], grids: Mapping[str, list[dict[str, Any]]]) -> frozenset[str]:
    """The union of the statistics every grid point of every method needs."""
    from twinrt.merge import get_method

    return frozenset().union(*(get_method(m).statistics(p) for m in methods for p in grids[m]))


def eval_statistics(plain: PlainModel, src: Sources, calibrations: Mapping[str, Calibration], kinds: frozenset[str],
                    workdir: Path, progress: Progress | None = None) -> tuple[StatisticsFiles, list[ExpertCost]]:
    """Every expert's statistics in `workdir` (their weights assigned to `plain` in turn) and their reader."""
    plan = StatisticsPlan(kinds, tuple(sorted(decoder_linear_weights(plain.config))))

    def bar(total: int) -> Callable[[str], None]:
        advance = progress(f"statistics ({', '.join(sorted(kinds))})", total) if progress else None
        return lambda _desc: advance(1) if advance else None

    costs = collect_statistics(plain.model, calibrations, plan, workdir, lambda e: expert_weights(src, e),
                               bar if progress else None)
    return StatisticsFiles([workdir / f"{e}.safetensors" for e in calibrations]), costs
