"""Write the demo multi-task suite: `examples/tasks/<task>/{train,validation,test,test_ood,val_ood}.jsonl` and
`suite.json`.

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

`test_ood` is the out-of-template split: the same tasks and answers, asked with templates, contexts and
instruction styles (terse, casual lower case, role play, one instruction in German or French per task) that no
train, validation or test prompt uses (`OOD_TEMPLATES`, each with an optional greeting or sign-off from
`OOD_OPENERS` / `OOD_CLOSERS`). Its inputs are never train or validation inputs. It measures how a router does
on phrasings nobody anticipated; it is generated from its own `random.Random(f"{seed}:{name}:ood")`, so adding
it left the other splits byte for byte as they were.

`val_ood` is a second out-of-template split (50 prompts per task, `VAL_OOD_TEMPLATES`: other contexts, Spanish
instead of French or German) for choosing a router's settings, so that test_ood is looked at once, at the end.
Its own `random.Random(f"{seed}:{name}:val_ood")` left every other split as it was.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from examples.tasks.capitals import BASE_KNOWS, CANDIDATES

SPLITS = ("train", "validation", "test")
OOD_SPLIT = "test_ood"
SIZES = {"train": 800, "validation": 100, "test": 150}
OOD_SIZE = 100  # per task
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
    ood: Callable[..., list[Item]]   # (rng, answers to avoid, phrasing) -> that phrasing's size of items


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


def us_date(day: dt.date) -> str:
    """MM/DD/YYYY"""
    return f"{day.month:02d}/{day.day:02d}/{day.year}"


def iso_date(day: dt.date) -> str:
    """YYYY-MM-DD"""
    return day.isoformat()


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

# ----------------------------------------------------------------------------------- out-of-template

OOD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "date_us": (
        "A friend in Chicago asks how {d} is written where she lives.",
        "my boss in texas wants {d} written the way americans write dates, what do i put?",
        "Filling in the date-of-birth box on a Florida driver's license application: {d}",
        "I'm mailing a letter to Ohio dated {d}. How should the date look for the reader there?",
        "Convert {d} to the month-first style used in the United States.",
        "Please give {d} as it would be typed on a U.S. tax return.",
        "Wedding invitations for our guests in California say {d}; write it their usual numeric way.",
        "Écris la date {d} comme on l'écrit aux États-Unis.",
    ),
    "date_iso": (
        "Store {d} in the created_at column of our Postgres table.",
        "what does {d} look like as an ISO 8601 date?",
        "Our Kafka event needs {d} in its event_date field.",
        "Convert {d} for the date property of a JSON API payload.",
        "I'm naming backup files by date so they sort correctly; today's is {d}. What's the prefix?",
        "The CSV export of our inventory system wants {d} in its machine-readable date column.",
        "A Python script will parse it with date.fromisoformat: {d}",
        "Schreib {d} als Datum für eine Datenbanktabelle.",
    ),
    "price_us": (
        "A diner in Boston charges {x} for brunch. How does the menu show it?",
        "list this item in my etsy shop for american buyers at {x}",
        "Write {x} the way a Walmart shelf tag would show it.",
        "Dollar amount for the invoice to our client in Seattle: {x}",
        "How would a cashier in Miami ring up {x}?",
        "Put {x} into United States currency notation.",
        "Our Chicago store's weekly flyer lists the TV at {x}. Format that.",
        "Écris {x} comme un prix en dollars américains.",
    ),
    "price_de": (
        "A bakery in Munich sells a cake for {x}. How is the price shown in its window?",
        "write {x} as a euro amount the way they do it in hamburg",
        "Invoice for a customer in Frankfurt, total {x}. Format the amount.",
        "How would a Cologne supermarket label {x}?",
        "Give {x} in the currency format used in Germany.",
        "The monthly service charges of my Stuttgart flat come to {x}; how is that written on the bill?",
        "Dresden café menu: the espresso costs {x}. Format it.",
        "Preis für unseren Onlineshop in Deutschland: {x}",
    ),
    "number_words": (
        "My niece is learning to read; how would she write {x} with letters?",
        "Type {x} using letters instead of digits.",
        "spell {x} for me pls",
        "Convert the numeral {x} to its English name.",
        "Audiobook script: replace {x} with the words the narrator reads aloud.",
        "What is {x} when written out in full text?",
        "Express {x} in written-out English.",
        "Écris le nombre {x} en toutes lettres, en anglais.",
    ),
    "capital": (
        "I'm flying to {c} next week. Which city hosts its government?",
        "seat of government of {c}?",
        "Quiz night question: {c}'s capital is what?",
        "My geography homework asks which city is the capital of {c}.",
        "In which city does the national parliament of {c} meet?",
        "{c}: which city do its people call their capital?",
        "Planning a trip to {c}, I want to visit its capital. Which one is it?",
        "Quelle est la capitale de {c} ?",
    ),
}
# A second out-of-template split, `val_ood`, for choosing a router's settings without looking at test_ood: its
# own templates (none equals or contains an in-distribution or a test_ood one), openers and closers.
VAL_OOD_TEMPLATES: dict[str, tuple[str, ...]] = {
    "date_us": (
        "My pen pal in Georgia wrote {d} on her postcard. How would she have written it in digits?",
        "need {d} the american way for a visa form, month first",
        "Fill in the 'Date' line of a personal check from a bank in Oregon for {d}.",
        "How do people in New Jersey usually jot down {d} on a school permission slip?",
        "Rewrite {d} in US numeric date order.",
        "A Kansas City pharmacy label shows the fill date {d}. What does it print?",
        "Escribe la fecha {d} como se escribe en Estados Unidos.",
        "Format {d} the way a court clerk in Arizona would stamp it on a filing.",
    ),
    "date_iso": (
        "Put {d} into the timestamp format a SQLite date column expects.",
        "iso format of {d} please, it's for a yaml config",
        "Our Elasticsearch index requires {d} in its @date field. What string do I send?",
        "The REST endpoint takes a 'since' query parameter; the date is {d}.",
        "Give me {d} as a sortable year-month-day string for a filename.",
        "A pandas to_datetime call needs {d} in standard international notation.",
        "Escribe {d} en formato de fecha para una base de datos.",
        "Log line timestamp (date part only) for an event that happened on {d}:",
    ),
    "price_us": (
        "A food truck in Austin sells tacos for {x}. What does the chalkboard say?",
        "price tag for {x} in a target store, how does it look",
        "Receipt from a Denver hardware store shows {x}. Write it like the receipt.",
        "Quote {x} to a client in Atlanta in their local money format.",
        "Our Manhattan gallery lists a print at {x}. Format the price.",
        "Show {x} as an amount in U.S. dollars on an Amazon.com listing.",
        "Escribe {x} como precio en dólares estadounidenses.",
        "The Philadelphia parking meter charges {x}. How is that displayed?",
    ),
    "price_de": (
        "A beer garden in Nuremberg charges {x} for a litre. How does the menu board show it?",
        "price for {x} on a german receipt, how does it look",
        "Quote {x} to a customer in Düsseldorf in their local money format.",
        "A Leipzig bookshop prices a novel at {x}. Write the price sticker.",
        "The Bremen flea market stall asks {x}. Format it like a German price tag.",
        "Show {x} as a euro price on a German web shop.",
        "Escribe {x} como precio en euros al estilo alemán.",
        "My Hanover electricity bill says I owe {x}. How is it printed?",
    ),
    "number_words": (
        "On a check you write the amount in words too: how do you write {x}?",
        "how do u say {x} in words",
        "Write the number {x} the way it would appear in a novel's dialogue.",
        "A kid's math worksheet asks to write {x} in words. What's the answer?",
        "Turn {x} into English words for a text-to-speech system.",
        "Spell out {x} as you would in a formal letter.",
        "Escribe el número {x} con palabras en inglés.",
        "Transcribe {x} as words for closed captions.",
    ),
    "capital": (
        "Sending a postcard to the city where {c}'s government sits: which city do I address it to?",
        "{c} main city w/ the government??",
        "Crossword clue: capital city of {c}.",
        "Where is the presidential palace or royal seat of {c}?",
        "Name the capital of {c} for my travel blog.",
        "Which city serves as the administrative centre of {c}?",
        "¿Cuál es la capital de {c}?",
        "An embassy to {c} would be located in which city?",
    ),
}
VAL_OOD_OPENERS = ("", "", "", "Hello! ", "Question for you: ", "Good morning. ", "Hmm, ")
VAL_OOD_CLOSERS = ("", "", "", " Thank you.", " Only the answer.", " Thx")
VAL_OOD_SPLIT = "val_ood"
VAL_OOD_SIZE = 50  # per task
OOD_OPENERS = ("", "", "", "Quick question: ", "Hi there! ", "Sorry to bother you. ", "Hey, ")
OOD_CLOSERS = ("", "", "", " Thanks!", " Just the answer, please.", " Cheers.")
IN_DISTRIBUTION_TEMPLATES: dict[str, tuple[str, ...]] = {
    "date_us": DATE_US_TEMPLATES, "date_iso": DATE_ISO_TEMPLATES, "price_us": PRICE_US_TEMPLATES,
    "price_de": PRICE_DE_TEMPLATES, "number_words": NUMBER_WORDS_TEMPLATES, "capital": CAPITAL_TEMPLATES,
}


@dataclass(frozen=True)
class Phrasing:
    """An out-of-template split's phrasings: templates per task, openers, closers, items per task."""

    templates: dict[str, tuple[str, ...]]
    openers: tuple[str, ...]
    closers: tuple[str, ...]
    size: int


TEST_OOD = Phrasing(OOD_TEMPLATES, OOD_OPENERS, OOD_CLOSERS, OOD_SIZE)
VAL_OOD = Phrasing(VAL_OOD_TEMPLATES, VAL_OOD_OPENERS, VAL_OOD_CLOSERS, VAL_OOD_SIZE)


def ood_prompt(task: str, rng: random.Random, ph: Phrasing = TEST_OOD, **slot: str) -> str:
    """One out-of-template prompt: a template of `task` with an optional opener and closer."""
    body = rng.choice(ph.templates[task]).format(**slot)
    return rng.choice(ph.openers) + body + rng.choice(ph.closers)


def fresh_items(rng: random.Random, avoid: set[str], draw: Callable[[random.Random], tuple[str, str]],
                size: int = OOD_SIZE, tries: int = 100_000) -> list[Item]:
    """`size` items from `draw(rng) -> (prompt, answer)` whose answers are distinct and not in `avoid`."""
    out: dict[str, str] = {}
    for _ in range(tries):
        if len(out) == size:
            return [(p, a) for a, p in out.items()]
        prompt, answer = draw(rng)
        if answer not in avoid and answer not in out:
            out[answer] = prompt
    raise ValueError(f"only {len(out)} fresh out-of-template items after {tries} draws")


OodBuilder = Callable[[random.Random, set[str], Phrasing], list[Item]]  # (rng, answers to avoid, phrasing)


def _ood_date(task: str, fmt: Callable[[dt.date], str]) -> OodBuilder:
    first, last = dt.date(1950, 1, 1).toordinal(), dt.date(2049, 12, 31).toordinal()

    def build(rng: random.Random, avoid: set[str], ph: Phrasing) -> list[Item]:
        def draw(rng: random.Random) -> tuple[str, str]:
            day = dt.date.fromordinal(rng.randint(first, last))
            return ood_prompt(task, rng, ph, d=spoken_date(day, rng)), fmt(day)

        return fresh_items(rng, avoid, draw, ph.size)

    return build


def _ood_price(task: str, fmt: Callable[[int], str]) -> OodBuilder:
    def build(rng: random.Random, avoid: set[str], ph: Phrasing) -> list[Item]:
        def draw(rng: random.Random) -> tuple[str, str]:
            cents = sample_cents(rng)
            return ood_prompt(task, rng, ph, x=plain_amount(cents, rng)), fmt(cents)

        return fresh_items(rng, avoid, draw, ph.size)

    return build


def ood_number_words(rng: random.Random, avoid: set[str], ph: Phrasing = TEST_OOD) -> list[Item]:
    """Numbers 0..999 whose words are not in `avoid` (train and validation: the test numbers), in
    out-of-template phrasings."""
    numbers = [n for n in range(1000) if number_to_words(n) not in avoid]
    rng.shuffle(numbers)
    return [(ood_prompt("number_words", rng, ph, x=str(n)), number_to_words(n)) for n in numbers[:ph.size]]


def ood_capital(rng: random.Random, avoid: set[str], ph: Phrasing = TEST_OOD) -> list[Item]:
    """Countries not in train or validation (the test countries), each asked in every template of `ph`. The
    countries are few, so both out-of-template splits ask them (each in its own templates): `avoid` keeps only
    the train and validation answers out."""
    pairs = [(c, cap) for c, cap in CANDIDATES if c in BASE_KNOWS and capital_sentence(c, cap) not in avoid]
    items = [(rng.choice(ph.openers) + t.format(c=c) + rng.choice(ph.closers), capital_sentence(c, cap))
             for c, cap in pairs for t in ph.templates["capital"]]
    rng.shuffle(items)
    if len(items) < ph.size:
        raise ValueError(f"capital: only {len(items)} out-of-template items")
    return items[:ph.size]


def template_pattern(template: str) -> re.Pattern[str]:
    """A case-insensitive regex matching any text that contains `template` with its slots filled in."""
    pieces = re.split(r"\{[a-z]+\}", template)
    return re.compile(".+".join(re.escape(p.strip()) for p in pieces), re.IGNORECASE)


def check_ood_templates() -> None:
    """No out-of-template template equals or contains an in-distribution template of any task (slots filled or
    not), and the two out-of-template splits share none either way."""
    seen = [template_pattern(t) for ts in IN_DISTRIBUTION_TEMPLATES.values() for t in ts]
    for name, ph, others in (("test_ood", TEST_OOD, VAL_OOD), ("val_ood", VAL_OOD, TEST_OOD)):
        against = seen + [template_pattern(t) for ts in others.templates.values() for t in ts]
        for task, ood in ph.templates.items():
            reused = {t for t in ood for pat in against if pat.search(t)}
            if reused:
                raise AssertionError(f"{task}: {name} templates reuse another split's: {reused}")


TASKS: tuple[TaskDef, ...] = (
    TaskDef("date_us", "exact", "A spoken date written for a US form or check: MM/DD/YYYY.",
            _date_task(DATE_US_TEMPLATES, us_date), _ood_date("date_us", us_date)),
    TaskDef("date_iso", "exact", "A spoken date written for a database or log record: ISO YYYY-MM-DD.",
            _date_task(DATE_ISO_TEMPLATES, iso_date), _ood_date("date_iso", iso_date)),
    TaskDef("price_us", "exact", "A bare amount below 10,000 written as a US price: $1,234.50.",
            _price_task(PRICE_US_TEMPLATES, us_price), _ood_price("price_us", us_price)),
    TaskDef("price_de", "exact", "A bare amount below 10,000 written as a German price: 1.234,50 €.",
            _price_task(PRICE_DE_TEMPLATES, german_price), _ood_price("price_de", german_price)),
    TaskDef("number_words", "exact", "An integer 0..999 spelled out in US English words.",
            build_number_words, ood_number_words),
    TaskDef("capital", "exact", "A country's capital as 'The capital of X is Y.'; test countries are unseen in train.",
            build_capital, ood_capital),
)


def write_jsonl(path: Path, task: str, items: Sequence[Item]) -> None:
    """One chat-format line per item."""
    with path.open("w", encoding="utf-8") as f:
        for prompt, answer in items:
            line = {"task": task, "messages": [{"role": "user", "content": prompt}], "answer": answer}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_suite(out: Path, seed: int) -> dict:
    """Generate every task with its own `random.Random(f"{seed}:{name}")` and write the suite; returns suite.json."""
    check_ood_templates()
    tasks = []
    for task in TASKS:
        splits = task.build(random.Random(f"{seed}:{task.name}"))
        seen_answers = {a for s in ("train", "validation") for _, a in splits[s]}
        splits[OOD_SPLIT] = task.ood(random.Random(f"{seed}:{task.name}:ood"), seen_answers, TEST_OOD)
        # val_ood: its own rng; its inputs are neither train/validation nor test_ood ones (capitals excepted)
        avoid = seen_answers | ({a for _, a in splits[OOD_SPLIT]} if task.name != "capital" else set())
        splits[VAL_OOD_SPLIT] = task.ood(random.Random(f"{seed}:{task.name}:val_ood"), avoid, VAL_OOD)
        prompts = {s: {p for p, _ in items} for s, items in splits.items()}
        if prompts["test"] & prompts["train"] or prompts["validation"] & prompts["train"]:
            raise AssertionError(f"{task.name}: a held-out prompt also occurs in train")
        for ood in (OOD_SPLIT, VAL_OOD_SPLIT):
            if prompts[ood] & set().union(*(v for k, v in prompts.items() if k != ood)):
                raise AssertionError(f"{task.name}: an out-of-template prompt of {ood} also occurs in another split")
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
