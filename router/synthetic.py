"""Synthetic routing data: clearly different templated prompts per expert, for tests, benchmarks and smoke runs.

    make_prompts(n, seed)   # n (prompt, expert) pairs per expert in EXPERTS, interleaved, deterministic in seed

"math": arithmetic and algebra questions, "code": Python programming requests, "chat": small talk, each with
random fillers.
"""

from __future__ import annotations

import random

EXPERTS = ("math", "code", "chat")

_OPS = ["+", "-", "*", "/"]
_CODE_TASKS = ["reverses a string", "sorts a list of dictionaries by key", "reads a CSV file",
               "removes duplicates from a list", "parses JSON from a file", "counts words in a text file",
               "checks whether a number is prime", "merges two sorted lists", "flattens a nested list",
               "computes a SHA-256 hash of a file", "sends an HTTP GET request", "memoizes a recursive function"]
_DS = ["linked list", "stack", "queue", "binary tree", "hash map", "priority queue", "LRU cache", "trie"]
_NAMES = ["parse_args", "load_data", "get_user", "fetch_rows", "compute_total", "build_index", "run_job"]
_THINGS = ["movie", "book", "song", "holiday destination", "board game", "podcast", "restaurant", "hobby"]
_TOPICS = ["penguins", "the ocean", "your weekend", "autumn", "coffee", "space travel", "dogs", "music"]
_MOODS = ["tired", "happy", "a bit bored", "excited", "stressed", "lonely", "great"]
_TIMES = ["today", "this morning", "tonight", "this weekend", "lately", "this evening"]

_MATH = [
    lambda r: f"What is {r.randint(2, 999)} {r.choice(_OPS)} {r.randint(2, 999)}?",
    lambda r: f"Compute {r.randint(2, 99)} * {r.randint(2, 99)} + {r.randint(1, 50)}.",
    lambda r: f"Solve for x: {r.randint(2, 9)}x + {r.randint(1, 30)} = {r.randint(31, 99)}",
    lambda r: f"A train travels {r.randint(50, 500)} km in {r.randint(2, 9)} hours. What is its average speed?",
    lambda r: f"Calculate the sum of {r.randint(1, 99)}, {r.randint(1, 99)} and {r.randint(1, 99)}.",
    lambda r: f"What is {r.randint(5, 95)}% of {r.randint(20, 900)}?",
    lambda r: f"Find the derivative of {r.randint(2, 9)}x^{r.randint(2, 6)} + {r.randint(1, 9)}x.",
    lambda r: f"Simplify the fraction {r.randint(2, 60)}/{r.randint(61, 120)}.",
    lambda r: f"If I have {r.randint(3, 40)} apples and give away {r.randint(1, 3)}, how many are left?",
]
_CODE = [
    lambda r: f"Write a Python function that {r.choice(_CODE_TASKS)}.",
    lambda r: f"How do I write code in Python that {r.choice(_CODE_TASKS)}?",
    lambda r: f"Fix this Python code: def {r.choice(_NAMES)}(x): return x {r.choice(_OPS)}",
    lambda r: f"Implement a {r.choice(_DS)} class in Python with push and pop methods.",
    lambda r: f"Write a pytest unit test for the function {r.choice(_NAMES)}().",
    lambda r: f"Explain this code: for i in range({r.randint(2, 99)}): print(i)",
    lambda r: "Refactor this loop into a list comprehension: result = []; for x in items: result.append(x)",
    lambda r: f"Why does my Python script raise KeyError in {r.choice(_NAMES)}()?",
]
_CHAT = [
    lambda r: f"Hi! How are you doing {r.choice(_TIMES)}?",
    lambda r: f"What's your favourite {r.choice(_THINGS)}?",
    lambda r: f"Tell me something fun about {r.choice(_TOPICS)}.",
    lambda r: f"I'm feeling {r.choice(_MOODS)} {r.choice(_TIMES)}, any advice?",
    lambda r: f"Good morning! Do you like {r.choice(_TOPICS)}?",
    lambda r: f"Can you recommend a good {r.choice(_THINGS)} for {r.choice(_TIMES)}?",
    lambda r: f"Thanks for the nice chat about {r.choice(_TOPICS)}, have a lovely day!",
]
TEMPLATES = {"math": _MATH, "code": _CODE, "chat": _CHAT}


def make_prompts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (prompt, expert) pairs per expert, interleaved, deterministic in `seed`."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        for name in EXPERTS:
            out.append((r.choice(TEMPLATES[name])(r), name))
    return out
