"""Task metrics and the table arithmetic of an A/B evaluation.

A metric is a pure function `(prediction, answer) -> float` in [0, 1], registered by name in `METRICS`;
`get_metric` raises on an unknown name. A task's score is the mean over its examples (`task_score`).

An A/B table is `scores[arm][task]` (raw task scores). Normalizing divides every arm's score on a task by
the score of that task's own expert (the Twin-Merging paper's "normalized score"):

    normalized[arm][task] = scores[arm][task] / scores[expert_of_task[task]][task]
    mean[arm]             = mean of normalized[arm][task] over the tasks where it is defined

Rule for an own-expert score of 0: the ratio is undefined, so that cell is NaN for every arm, the task is
listed in `NormalizedTable.undefined_tasks`, and it is left out of every arm's mean (a mean over no task is NaN).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from twinrt.errors import TwinError

Metric = Callable[[str, str], float]

NUMERIC_REL_TOL = 1e-6


def exact_match(prediction: str, answer: str) -> float:
    """1.0 if `prediction.strip() == answer.strip()`, else 0.0 (case and inner whitespace count)."""
    return float(prediction.strip() == answer.strip())


def _parse_number(text: str) -> float | None:
    # "1,234.5" and "1_234.5" read as 1234.5; a trailing "." (end of sentence) is dropped.
    cleaned = text.strip().replace(",", "").replace("_", "").removesuffix(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def numeric_match(prediction: str, answer: str) -> float:
    """1.0 if both read as the same number (relative tolerance 1e-6, thousands separators ignored).

    An unparsable prediction scores 0.0; an unparsable answer is an error in the task data and raises.
    """
    expected = _parse_number(answer)
    if expected is None:
        raise TwinError(f"numeric metric: the answer {answer!r} is not a number")
    got = _parse_number(prediction)
    if got is None:
        return 0.0
    return float(math.isclose(got, expected, rel_tol=NUMERIC_REL_TOL, abs_tol=NUMERIC_REL_TOL))


def json_match(prediction: str, answer: str) -> float:
    """1.0 if both parse as JSON and the values are equal (key order and whitespace ignored, 1 == 1.0).

    An unparsable prediction scores 0.0; an unparsable answer is an error in the task data and raises.
    """
    try:
        expected = json.loads(answer)
    except json.JSONDecodeError as err:
        raise TwinError(f"json metric: the answer {answer!r} is not JSON ({err})") from None
    try:
        got = json.loads(prediction)
    except json.JSONDecodeError:
        return 0.0
    return float(got == expected)


METRICS: dict[str, Metric] = {
    "exact": exact_match,
    "numeric": numeric_match,
    "json": json_match,
}


def get_metric(name: str) -> Metric:
    """The metric registered as `name`; raises TwinError naming the known metrics otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise TwinError(f"unknown metric {name!r}; known: {', '.join(sorted(METRICS))}") from None


def task_score(metric: str, predictions: Sequence[str], answers: Sequence[str]) -> float:
    """mean(metric(p, a) for p, a in zip(predictions, answers)); lengths must match and be non-zero."""
    fn = get_metric(metric)
    if len(predictions) != len(answers):
        raise TwinError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise TwinError("cannot score an empty task")
    return sum(fn(p, a) for p, a in zip(predictions, answers, strict=True)) / len(answers)


@dataclass(frozen=True)
class NormalizedTable:
    """Scores divided by each task's own-expert score. See the module docstring for the exact rule."""

    per_task: dict[str, dict[str, float]]  # arm -> task -> normalized score (NaN where undefined)
    mean: dict[str, float]  # arm -> mean normalized score over the defined tasks
    undefined_tasks: tuple[str, ...]  # tasks whose own expert scored 0, in `expert_of_task` order


def _check_table(scores: Mapping[str, Mapping[str, float]], expert_of_task: Mapping[str, str]) -> None:
    if not expert_of_task:
        raise TwinError("expert_of_task is empty: there is no task to normalize")
    for task, expert in expert_of_task.items():
        if expert not in scores:
            raise TwinError(f"the expert {expert!r} of task {task!r} has no row in the score table")
    for arm, row in scores.items():
        missing = [task for task in expert_of_task if task not in row]
        if missing:
            raise TwinError(f"arm {arm!r} has no score for task(s) {', '.join(missing)}")
        for task in expert_of_task:
            value = row[task]
            if not (math.isfinite(value) and value >= 0.0):
                raise TwinError(f"score of arm {arm!r} on task {task!r} is {value}; scores must be finite and >= 0")


def normalized_scores(
    scores: Mapping[str, Mapping[str, float]], expert_of_task: Mapping[str, str]
) -> NormalizedTable:
    """Normalize `scores[arm][task]` by each task's own expert, over the tasks of `expert_of_task`.

    normalized[arm][task] = scores[arm][task] / scores[expert_of_task[task]][task]; tasks whose own expert
    scored 0 are NaN and excluded from the means. Extra tasks in `scores` rows are ignored.
    """
    _check_table(scores, expert_of_task)
    own = {task: scores[expert][task] for task, expert in expert_of_task.items()}
    undefined = tuple(task for task, value in own.items() if value == 0.0)
    per_task: dict[str, dict[str, float]] = {}
    mean: dict[str, float] = {}
    for arm, row in scores.items():
        per_task[arm] = {
            task: math.nan if task in undefined else row[task] / own[task] for task in expert_of_task
        }
        defined = [value for task, value in per_task[arm].items() if task not in undefined]
        mean[arm] = sum(defined) / len(defined) if defined else math.nan
    return NormalizedTable(per_task=per_task, mean=mean, undefined_tasks=undefined)
