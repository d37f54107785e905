"""Recompute `capitals.BASE_KNOWS`: the countries whose capital the base model already names.

    python -m examples.tasks.probe_capitals [--threads 1]

A country counts as known if the greedy reply to either probe contains the capital (case-insensitive):
the chat question "What is the capital of X?" (16 new tokens) or the plain completion of
"The capital of X is the city of" (8 new tokens). Prints the set as a Python literal and exits 1 if it
differs from the one in `capitals.py`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from examples.experts.smollm import chat_prompt, generate_greedy, load_base
from examples.tasks.capitals import BASE_KNOWS, CANDIDATES


def probe() -> frozenset[str]:
    """The candidate countries the base model knows the capital of, per the rule in the module docstring."""
    model, tokenizer = load_base()
    questions = [[{"role": "user", "content": f"What is the capital of {c}?"}] for c, _ in CANDIDATES]
    chat = [chat_prompt(tokenizer, messages) for messages in questions]
    plain = [f"The capital of {c} is the city of" for c, _ in CANDIDATES]
    chat_replies = generate_greedy(model, tokenizer, chat, max_new_tokens=16)
    plain_replies = generate_greedy(model, tokenizer, plain, max_new_tokens=8)
    return frozenset(
        country
        for (country, capital), a, b in zip(CANDIDATES, chat_replies, plain_replies, strict=True)
        if capital.lower() in a.lower() or capital.lower() in b.lower()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    known = probe()
    print(f"{len(known)} of {len(CANDIDATES)} capitals known")
    print("BASE_KNOWS: frozenset[str] = frozenset({")
    for country, _ in CANDIDATES:
        if country in known:
            print(f"    {country!r},")
    print("})")
    if known != BASE_KNOWS:
        print(f"differs from capitals.BASE_KNOWS: added {sorted(known - BASE_KNOWS)}, "
              f"removed {sorted(BASE_KNOWS - known)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
