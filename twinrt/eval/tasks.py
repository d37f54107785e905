"""A task suite on disk: `DIR/suite.json` plus `DIR/<task>/{train,validation,test}.jsonl`.

    suite.json   {"format": "twinrt-tasks/1", "tasks": [{"name": ..., "metric": "exact"|"numeric"|"json", ...}]}
    <task>/<split>.jsonl   one example a line: {"task": NAME, "messages": [{"role", "content"}, ...], "answer": str}

The metric of a task is named in suite.json (see `twinrt.eval.metrics`); other keys there (description,
sizes, seed) are ignored. Every file is validated when read and an error names the file and line.
`--limit N` keeps the first N lines of a split, so a limited run is a prefix of the full one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinrt.errors import TwinError
from twinrt.eval.metrics import get_metric

SUITE_FILE = "suite.json"
SUITE_FORMAT = "twinrt-tasks/1"
SPLITS = ("train", "validation", "test")

Messages = tuple[Mapping[str, str], ...]


@dataclass(frozen=True)
class Example:
    task: str
    messages: Messages  # the chat the model answers (rendered with the chat template)
    answer: str  # the exact reply the task's metric compares against


@dataclass(frozen=True)
class Task:
    name: str
    metric: str


@dataclass(frozen=True)
class TaskSuite:
    root: Path
    tasks: tuple[Task, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def metric(self, task: str) -> str:
        return next(t.metric for t in self.tasks if t.name == task)

    def load(self, split: str, limit: int | None = None) -> dict[str, list[Example]]:
        """{task: the first `limit` examples of its split (all when None)}, in suite order; TwinError naming the
        file when a task lacks the split."""
        return {t.name: read_split(self.root / t.name / f"{split}.jsonl", t.name, limit) for t in self.tasks}


def _task_entry(raw: Any, i: int, where: Path) -> Task:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"]:
        raise TwinError(f"{where}: tasks[{i}] must be an object with a non-empty string 'name'")
    metric = raw.get("metric", None)
    if not isinstance(metric, str):
        raise TwinError(f"{where}: task {raw['name']!r} has no 'metric' (one of exact, numeric, json)")
    try:
        get_metric(metric)
    except TwinError as e:
        raise TwinError(f"{where}: task {raw['name']!r}: {e}") from None
    return Task(raw["name"], metric)


def open_suite(path: str | Path) -> TaskSuite:
    """Read and check `DIR/suite.json` and that every task has a directory with a test split."""
    root = Path(path)
    if not root.is_dir():
        raise TwinError(f"tasks directory {root} does not exist or is not a directory")
    suite = root / SUITE_FILE
    if not suite.is_file():
        raise TwinError(f"tasks directory {root} has no {SUITE_FILE} (it names the tasks and their metrics)")
    try:
        raw = json.loads(suite.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TwinError(f"{suite} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != SUITE_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else None
        raise TwinError(f"{suite}: format {got!r} is not supported (expected {SUITE_FORMAT!r})")
    entries = raw.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise TwinError(f"{suite}: 'tasks' must be a non-empty list")
    tasks = tuple(_task_entry(t, i, suite) for i, t in enumerate(entries))
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TwinError(f"{suite}: duplicate task names: {', '.join(dup)}")
    for t in tasks:
        if not (root / t.name / "test.jsonl").is_file():
            raise TwinError(f"task {t.name!r}: {root / t.name / 'test.jsonl'} is missing")
    return TaskSuite(root, tasks)


def parse_messages(raw: Any, where: str) -> Messages:
    """A chat as the suite writes it: a non-empty list of {role, content} strings; errors name `where`."""
    if not isinstance(raw, list) or not raw:
        raise TwinError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(raw):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TwinError(f"{where}: message {j} must have a string 'role' and a string 'content'")
    return tuple({"role": m["role"], "content": m["content"]} for m in raw)


def jsonl_objects(path: Path, expected: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(`path:line`, object) for every non-blank line of a JSONL file, read lazily; a line that is not valid
    JSON, or not an object, is a TwinError naming file and line (`expected` says what an object should be)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TwinError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise TwinError(f"{where}: expected {expected}")
            yield where, row


def read_split(path: Path, task: str, limit: int | None = None) -> list[Example]:
    """The examples of one split file (its first `limit` lines when given); errors name file and line."""
    if limit is not None and limit < 1:
        raise TwinError(f"limit must be >= 1, got {limit}")
    if not path.is_file():
        raise TwinError(f"task {task!r}: {path} is missing")
    out: list[Example] = []
    for where, row in jsonl_objects(path, "an object with task, messages and answer"):
        if limit is not None and len(out) >= limit:
            break
        if row.get("task") != task:
            raise TwinError(f"{where}: 'task' is {row.get('task')!r}, expected {task!r}")
        if not isinstance(row.get("answer"), str):
            raise TwinError(f"{where}: 'answer' must be a string")
        out.append(Example(task, parse_messages(row.get("messages"), where), row["answer"]))
    if not out:
        raise TwinError(f"task {task!r}: {path} has no examples")
    return out


def task_experts(tasks: Sequence[str], experts: Sequence[str], overrides: Mapping[str, str]) -> dict[str, str]:
    """{task: its own expert}: `overrides[task]` where given, else the expert of the same name.

    Raises naming every task without an expert, and overrides that name an unknown task or expert.
    """
    unknown_tasks = sorted(set(overrides) - set(tasks))
    if unknown_tasks:
        raise TwinError(f"--task-expert names task(s) not in the suite: {', '.join(unknown_tasks)} "
                        f"(tasks: {', '.join(tasks)})")
    bad = sorted(f"{t}={e}" for t, e in overrides.items() if e not in experts)
    if bad:
        raise TwinError(f"--task-expert names expert(s) the artifact does not have: {', '.join(bad)} "
                        f"(experts: {', '.join(experts)})")
    mapping = {t: overrides.get(t, t) for t in tasks}
    unmatched = [t for t, e in mapping.items() if e not in experts]
    if unmatched:
        raise TwinError(f"task(s) {', '.join(unmatched)} have no expert of the same name in the artifact "
                        f"(experts: {', '.join(experts)}); map them with --task-expert TASK=EXPERT")
    return mapping
