"""The demo task suite on disk: loading splits, encoding chat examples for training, scoring a model.

A suite dir holds `suite.json` (task names, metrics) and `<task>/{train,validation,test}.jsonl`
(see `examples/tasks/make_tasks.py`). Training examples put the loss on the assistant reply only:
`ids = template(messages) + tokens(answer + eos)`, `labels = [-100] * len(prompt) + tokens(answer + eos)`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from examples.experts.smollm import chat_prompt, generate_greedy
from twinrt.eval.metrics import get_metric, task_score

IGNORE = -100
SPLITS = ("train", "validation", "test")
EVAL_SLACK_TOKENS = 4  # decode this many tokens past the longest answer of a split


@dataclass(frozen=True)
class TaskSpec:
    """One task of `suite.json`."""

    name: str
    metric: str
    description: str


@dataclass(frozen=True)
class Example:
    """One JSONL line: the chat messages and the exact expected assistant reply."""

    task: str
    messages: list[dict[str, str]]
    answer: str


def load_suite(tasks_dir: Path) -> dict[str, TaskSpec]:
    """{name: TaskSpec} from `tasks_dir/suite.json`; every metric must be a registered one."""
    path = tasks_dir / "suite.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run `python -m examples.tasks.make_tasks --out {tasks_dir}`")
    suite = json.loads(path.read_text(encoding="utf-8"))
    specs = {t["name"]: TaskSpec(t["name"], t["metric"], t["description"]) for t in suite["tasks"]}
    for spec in specs.values():
        get_metric(spec.metric)
    return specs


def load_split(tasks_dir: Path, task: str, split: str) -> list[Example]:
    """The examples of `tasks_dir/<task>/<split>.jsonl`; unknown task or split, or a missing file, exits."""
    specs = load_suite(tasks_dir)
    if task not in specs:
        raise SystemExit(f"error: unknown task {task!r}; {tasks_dir}/suite.json has {', '.join(specs)}")
    if split not in SPLITS:
        raise SystemExit(f"error: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    path = tasks_dir / task / f"{split}.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found")
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        row = json.loads(line)
        if row.get("task") != task or not row.get("messages") or not isinstance(row.get("answer"), str):
            raise SystemExit(f"error: {path}:{n} is not a {task!r} line with messages and an answer")
        examples.append(Example(row["task"], row["messages"], row["answer"]))
    if not examples:
        raise SystemExit(f"error: {path} is empty")
    return examples


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one training example; labels are IGNORE on the prompt."""
    prompt = tokenizer(chat_prompt(tokenizer, example.messages), add_special_tokens=False)["input_ids"]
    reply = tokenizer(example.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + reply, [IGNORE] * len(prompt) + reply


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels, each [B, T_max]."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, : len(lab)] = torch.tensor(lab)
        attention_mask[r, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    metric: str,
    batch_size: int = 50,
) -> tuple[float, list[str]]:
    """(score, predictions): greedy replies to every example scored with the task's metric."""
    longest = max(len(tokenizer(e.answer, add_special_tokens=False)["input_ids"]) for e in examples)
    prompts = [chat_prompt(tokenizer, e.messages) for e in examples]
    predictions = generate_greedy(model, tokenizer, prompts, longest + EVAL_SLACK_TOKENS, batch_size)
    return task_score(metric, predictions, [e.answer for e in examples]), predictions
