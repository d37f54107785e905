"""Augmenting routing data by template recombination: new prompts of an expert from pieces of its own prompts.

    augment(texts, labels, copies=2, seed=0) -> [(text, label), ...]      # copies new texts per example

A new text of expert n joins the start of one of n's prompts, cut after a random word, to the end of another
of n's prompts, cut before a random word, then drops each word with probability `DROP` (never all of them):

    "Write 5 March 2021 as the date on a US form."  +  "How is 7 May 1999 written on an American check?"
        -> "Write 5 March 2021 as written on an American check?"

So wording cues of different templates co-occur and no single template's phrasing carries a label alone; a
head fitted on them leans on every cue its expert's prompts share, not on the one that tells its templates
apart from the others'. Pure Python, deterministic in `seed`; originals are not repeated.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

DROP = 0.1


def recombine(a: list[str], b: list[str], rng: random.Random, drop: float = DROP) -> list[str]:
    """a's first words + b's last words (each cut at a random word boundary), then word dropout."""
    i = rng.randint(1, max(1, len(a) - 1))
    j = rng.randint(min(1, len(b) - 1), max(0, len(b) - 1))
    words = a[:i] + b[j:]
    kept = [w for w in words if rng.random() >= drop]
    return kept or words


def augment(texts: Sequence[str], labels: Sequence[str], copies: int = 2, seed: int = 0,
            drop: float = DROP) -> list[tuple[str, str]]:
    """`copies` recombined texts per example, labelled as the examples they were built from (see above)."""
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
    rng = random.Random(seed)
    by_label: dict[str, list[list[str]]] = {}
    for t, y in zip(texts, labels):
        by_label.setdefault(y, []).append(t.split())
    seen = set(texts)
    out = []
    for t, y in zip(texts, labels):
        pool = by_label[y]
        for _ in range(copies):
            new = " ".join(recombine(t.split(), rng.choice(pool), rng, drop))
            if new and new not in seen:
                seen.add(new)
                out.append((new, y))
    return out
