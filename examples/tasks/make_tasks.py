"""Write the demo multi-task suite: `examples/tasks/<task>/{train,validation,test}.jsonl` and `suite.json`.

    python -m examples.tasks.make_tasks [--out examples/tasks] [--seed 20240611]

Every line is `{"task": NAME, "messages": [{"role": "user", "content": PROMPT}], "answer": REPLY}`, where
REPLY is the exact assistant reply the task's metric compares against. The suite is built to make static
merges fail and routing pay off:

- `date_us` / `date_iso`: the same dates in the same input forms, asked for a US form (MM/DD/YYYY) or a
  database/log record (YYYY-MM-DD). The prompts look alike; only their wording tells the conventions apart.
- `price_us` / `price_de` / `number_words`: a bare number to be written as a US price ("$1,234.50"), a German
  price ("1.234,50 €") or in English words ("three hundred forty-seven"). Same kind of input, three
  incompatible output conventions.
- `capital`: country -> "The capital of X is Y." with train, validation and test on disjoint countries, so an
  expert has to keep the base model's knowledge and only learn the answer convention.

Inputs are disjoint across splits within a task (no test date, amount, number or country is in train).
The output is a pure function of the seed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from examples.tasks.capitals import BASE_KNOWS, CANDIDATES

SPLITS = ("train", "validation", "test")
SIZES = {"train": 800, "validation": 100, "test": 150}
DEFAULT_SEED = 20240611
FORMAT = "twinrt-tasks/1"

Item = tuple[str, str]  # (prompt, answer)
K = TypeVar("K")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


@dataclass(frozen=True)
class TaskDef:
    """A task of the suite: its metric, a one-line description and its generator.

    `build(rng)` returns {split: [(prompt, answer), ...]}: SIZES[split] items per split, unless the
    builder documents its own sizes.
    """

    name: str
    metric: str
    description: str
    build: Callable[[random.Random], dict[str, list[Item]]]


def split_keys(keys: Sequence[K], sizes: Sequence[int]) -> list[list[K]]:
    """Cut `keys` into consecutive disjoint chunks of the given sizes (keys must be unique and enough)."""
    if len(set(keys)) != len(keys):
        raise ValueError("split keys must be unique")
    if sum(sizes) > len(keys):
        raise ValueError(f"{len(keys)} keys cannot fill splits of sizes {list(sizes)}")
    out, start = [], 0
    for size in sizes:
        out.append(list(keys[start : start + size]))
        start += size
    return out


# ----------------------------------------------------------------------------------------------- dates

DATE_US_TEMPLATES = (
    "Write {d} as the date on a US form.",
    "US form date field: {d}",
    "How is {d} written on an American check?",
    "Date for the American visa application: {d}",
)
DATE_ISO_TEMPLATES = (
    "Write {d} as the date in a database record.",
    "Database date field: {d}",
    "How is {d} written in a server log timestamp?",
    "Date for the SQL table row: {d}",
)


def spoken_date(day: dt.date, rng: random.Random) -> str:
    """'March 5, 2021' or '5 March 2021', picked at random."""
    month = MONTHS[day.month - 1]
    return f"{month} {day.day}, {day.year}" if rng.random() < 0.5 else f"{day.day} {month} {day.year}"


def _date_task(templates: Sequence[str], fmt: Callable[[dt.date], str]) -> Callable[[random.Random], dict]:
    def build(rng: random.Random) -> dict[str, list[Item]]:
        first, last = dt.date(1950, 1, 1).toordinal(), dt.date(2049, 12, 31).toordinal()
        days = [dt.date.fromordinal(o) for o in rng.sample(range(first, last + 1), sum(SIZES.values()))]
        chunks = split_keys(days, [SIZES[s] for s in SPLITS])
        return {
            split: [(rng.choice(templates).format(d=spoken_date(day, rng)), fmt(day)) for day in chunk]
            for split, chunk in zip(SPLITS, chunks, strict=True)
        }

    return build


# ---------------------------------------------------------------------------------------------- prices

PRICE_US_TEMPLATES = (
    "Price tag for the US store: {x}",
    "Format {x} as a price on an American receipt.",
    "US shop label for the amount {x}",
    "Show {x} as a price in the New York shop.",
)
PRICE_DE_TEMPLATES = (
    "Price tag for the German store: {x}",
    "Format {x} as a price on a German receipt.",
    "German shop label for the amount {x}",
    "Show {x} as a price in the Berlin shop.",
)
NUMBER_WORDS_TEMPLATES = (
    "Write the number {x} in words.",
    "Spell out the number {x}.",
    "How do you write {x} in English words?",
    "Amount in words for the cheque: {x}",
)


PRICE_MAX_DIGITS = 4  # amounts below 10,000: at most one thousands separator (6 digits was not learnable in budget)


def sample_cents(rng: random.Random) -> int:
    """An amount in cents with 1 to PRICE_MAX_DIGITS integer digits (digit count uniform), cents uniform in 0..99."""
    digits = rng.randint(1, PRICE_MAX_DIGITS)
    units = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
    return units * 100 + rng.randint(0, 99)


def plain_amount(cents: int, rng: random.Random) -> str:
    """The amount as a user would type it: '1234', '1234.5' or '1234.56' (trailing zeros dropped at random)."""
    units, frac = divmod(cents, 100)
    if frac == 0 and rng.random() < 0.5:
        return str(units)
    if frac % 10 == 0 and rng.random() < 0.5:
        return f"{units}.{frac // 10}"
    return f"{units}.{frac:02d}"


def us_price(cents: int) -> str:
    """$1,234.50"""
    units, frac = divmod(cents, 100)
    return f"${units:,}.{frac:02d}"


def german_price(cents: int) -> str:
    """1.234,50 €"""
    units, frac = divmod(cents, 100)
    return f"{units:,}".replace(",", ".") + f",{frac:02d} €"


def _price_task(templates: Sequence[str], fmt: Callable[[int], str]) -> Callable[[random.Random], dict]:
    def build(rng: random.Random) -> dict[str, list[Item]]:
        pool: dict[int, None] = {}
        while len(pool) < sum(SIZES.values()):
            pool[sample_cents(rng)] = None
        chunks = split_keys(list(pool), [SIZES[s] for s in SPLITS])
        return {
            split: [(rng.choice(templates).format(x=plain_amount(c, rng)), fmt(c)) for c in chunk]
            for split, chunk in zip(SPLITS, chunks, strict=True)
        }

    return build


def number_to_words(n: int) -> str:
    """English words for 0 <= n <= 9999, US style: 347 -> 'three hundred forty-seven' (no 'and')."""
    if not 0 <= n <= 9999:
        raise ValueError(f"{n} is out of range 0..9999")
    if n < 20:
        return ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return f"{ONES[hundreds]} hundred" + ("" if rest == 0 else " " + number_to_words(rest))
    thousands, rest = divmod(n, 1000)
    return f"{ONES[thousands]} thousand" + ("" if rest == 0 else " " + number_to_words(rest))


NUMBER_WORDS_SIZES = {"train": 750, "validation": 100, "test": 150}  # all of 0..999


def build_number_words(rng: random.Random) -> dict[str, list[Item]]:
    """Every number 0..999 exactly once, shuffled and split (4-digit numbers were not learnable in budget)."""
    numbers = list(range(1000))
    rng.shuffle(numbers)
    chunks = split_keys(numbers, [NUMBER_WORDS_SIZES[s] for s in SPLITS])
    return {
        split: [(rng.choice(NUMBER_WORDS_TEMPLATES).format(x=n), number_to_words(n)) for n in chunk]
        for split, chunk in zip(SPLITS, chunks, strict=True)
    }


# -------------------------------------------------------------------------------------------- capitals

CAPITAL_TEMPLATES = (
    "What is the capital of {c}?",
    "Name the capital city of {c}.",
    "Which city is the capital of {c}?",
    "What city serves as the capital of {c}?",
    "Tell me the capital of {c}.",
    "What is the capital city of {c}?",
    "Capital of {c}?",
    "Which city is {c}'s capital?",
)
CAPITAL_COUNTRY_SHARE = {"train": 0.6, "validation": 0.15}  # test gets the rest
CAPITAL_MIN_SIZES = {"train": 400, "validation": 100, "test": 100}


def capital_sentence(country: str, capital: str) -> str:
    """'The capital of Peru is Lima.': the base model's own answer form, which keeps its recall intact
    (a bare 'Lima' made LoRA experts answer with capitals memorised from train: 21-33% on new countries)."""
    return f"The capital of {country} is {capital}."


def build_capital(rng: random.Random) -> dict[str, list[Item]]:
    """Countries the base knows, split 60/15/25 by country; each country is asked in every template."""
    pairs = [pair for pair in CANDIDATES if pair[0] in BASE_KNOWS]
    rng.shuffle(pairs)
    n_train = round(len(pairs) * CAPITAL_COUNTRY_SHARE["train"])
    n_val = round(len(pairs) * CAPITAL_COUNTRY_SHARE["validation"])
    chunks = split_keys(pairs, [n_train, n_val, len(pairs) - n_train - n_val])
    out: dict[str, list[Item]] = {}
    for split, chunk in zip(SPLITS, chunks, strict=True):
        items = [(t.format(c=country), capital_sentence(country, capital))
                 for country, capital in chunk for t in CAPITAL_TEMPLATES]
        rng.shuffle(items)
        out[split] = items[: SIZES[split]]
        if len(out[split]) < CAPITAL_MIN_SIZES[split]:
            raise ValueError(f"capital/{split}: only {len(out[split])} items; BASE_KNOWS is too small")
    return out


TASKS: tuple[TaskDef, ...] = (
    TaskDef("date_us", "exact", "A spoken date written for a US form or check: MM/DD/YYYY.",
            _date_task(DATE_US_TEMPLATES, lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}")),
    TaskDef("date_iso", "exact", "A spoken date written for a database or log record: ISO YYYY-MM-DD.",
            _date_task(DATE_ISO_TEMPLATES, lambda d: d.isoformat())),
    TaskDef("price_us", "exact", "A bare amount below 10,000 written as a US price: $1,234.50.",
            _price_task(PRICE_US_TEMPLATES, us_price)),
    TaskDef("price_de", "exact", "A bare amount below 10,000 written as a German price: 1.234,50 €.",
            _price_task(PRICE_DE_TEMPLATES, german_price)),
    TaskDef("number_words", "exact", "An integer 0..999 spelled out in US English words.",
            build_number_words),
    TaskDef("capital", "exact", "A country's capital as 'The capital of X is Y.'; test countries are unseen in train.",
            build_capital),
)


def write_jsonl(path: Path, task: str, items: Sequence[Item]) -> None:
    """One chat-format line per item."""
    with path.open("w", encoding="utf-8") as f:
        for prompt, answer in items:
            line = {"task": task, "messages": [{"role": "user", "content": prompt}], "answer": answer}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_suite(out: Path, seed: int) -> dict:
    """Generate every task with its own `random.Random(f"{seed}:{name}")` and write the suite; returns suite.json."""
    tasks = []
    for task in TASKS:
        splits = task.build(random.Random(f"{seed}:{task.name}"))
        prompts = {s: {p for p, _ in items} for s, items in splits.items()}
        if prompts["test"] & prompts["train"] or prompts["validation"] & prompts["train"]:
            raise AssertionError(f"{task.name}: a held-out prompt also occurs in train")
        (out / task.name).mkdir(parents=True, exist_ok=True)
        for split, items in splits.items():
            write_jsonl(out / task.name / f"{split}.jsonl", task.name, items)
        sizes = {split: len(items) for split, items in splits.items()}
        tasks.append({"name": task.name, "metric": task.metric, "description": task.description, "sizes": sizes})
    suite = {"format": FORMAT, "seed": seed, "tasks": tasks}
    (out / "suite.json").write_text(json.dumps(suite, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="suite directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = parser.parse_args()
    suite = write_suite(args.out, args.seed)
    for task in suite["tasks"]:
        print(f"{task['name']:<14} {task['metric']:<6} {task['sizes']}")


if __name__ == "__main__":
    main()
