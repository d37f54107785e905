"""Labelled routing data: JSONL reading, label checking, and the stratified hold-out split.

One example per line, any of:

    {"text": "what is 17 * 3?", "expert": "math"}
    {"messages": [{"role": "user", "content": "..."}], "expert": "code"}
    {"task": "math", "messages": [...], "answer": "51"}          # an eval task suite, with label_key="task"

Blank lines are skipped. Every error names the file and line number.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from router.inputs import RouterInput, routing_text
from twinrt.errors import TwinError

MAX_HOLDOUT = 0.5


@dataclass(frozen=True)
class Example:
    input: RouterInput   # a string or a list of chat messages
    label: str
    line: int            # 1-based line number in its file


def _parse_line(raw: str, where: str, label_key: str) -> tuple[RouterInput, str]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise TwinError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise TwinError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        x = obj["text"]
        if not isinstance(x, str):
            raise TwinError(f"{where}: 'text' must be a string")
    elif "messages" in obj:
        x = obj["messages"]
        if not isinstance(x, list):
            raise TwinError(f"{where}: 'messages' must be a list of chat messages")
    else:
        raise TwinError(f"{where}: an example needs a 'text' or a 'messages' field")
    label = obj.get(label_key)
    if not isinstance(label, str) or not label:
        raise TwinError(f"{where}: the label field {label_key!r} is missing or not a non-empty string")
    if not routing_text(x, where).strip():
        raise TwinError(f"{where}: the example has no text to route on (empty text or no user turn)")
    return x, label


def read_examples(path: str | Path, label_key: str = "expert") -> list[Example]:
    """All examples of a JSONL file; raises TwinError on a missing or empty file or a bad line."""
    path = Path(path)
    if not path.is_file():
        raise TwinError(f"data file {path} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, raw in enumerate(f, start=1):
            if raw.strip():
                x, label = _parse_line(raw, f"{path}:{i}", label_key)
                out.append(Example(x, label, i))
    if not out:
        raise TwinError(f"data file {path} has no examples")
    return out


def label_indices(examples: Sequence[Example], experts: Sequence[str], source: str = "the data") -> list[int]:
    """Each example's label as an index into `experts`; an unknown label is an error naming it."""
    index = {e: i for i, e in enumerate(experts)}
    for ex in examples:
        if ex.label not in index:
            raise TwinError(f"{source}, line {ex.line}: expert {ex.label!r} is not in the artifact; "
                            f"known experts: {', '.join(experts)}")
    return [index[ex.label] for ex in examples]


def min_per_expert(holdout: float) -> int:
    """Examples each expert needs: 1 without a hold-out, else enough that ≥ 1 is held out and ≥ 1 trains."""
    return 1 if holdout == 0 else max(2, math.ceil(1 / holdout - 1e-9))


def stratified_split(labels: Sequence[int], experts: Sequence[str], holdout: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) example indices; each expert keeps round(count * holdout) (≥ 1) held out.

    Every expert of `experts` must have at least `min_per_expert(holdout)` examples.
    """
    if not 0 <= holdout <= MAX_HOLDOUT:
        raise TwinError(f"holdout must be in [0, {MAX_HOLDOUT}], got {holdout}")
    need = min_per_expert(holdout)
    by_class: list[list[int]] = [[] for _ in experts]
    for i, y in enumerate(labels):
        by_class[y].append(i)
    short = [f"{experts[c]!r} has {len(ix)}" for c, ix in enumerate(by_class) if len(ix) < need]
    if short:
        split = f"a hold-out split of {holdout}" if holdout else "training"
        raise TwinError(f"too few examples: {', '.join(short)}; {split} needs at least {need} per expert "
                        f"(every expert of the artifact: {', '.join(experts)})")
    rng = random.Random(seed)
    train, held = [], []
    for ix in by_class:
        ix = ix[:]
        rng.shuffle(ix)
        k = max(1, round(len(ix) * holdout)) if holdout else 0
        held += ix[:k]
        train += ix[k:]
    return sorted(train), sorted(held)
