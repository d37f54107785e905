"""Can the twin's own core write paraphrases of routing prompts? A probe before building augmentation on it.

    python -m examples.tasks.paraphrase_probe [--artifact artifacts/demo] [--per-task 10] [--seed 0]
        [--out benchmarks/results/router_paraphrase_probe.json]

For the first `--per-task` train prompts of each task, the artifact's core (a plain HF checkpoint, loaded
offline) is asked to reword each prompt in two styles: a chat instruction through its chat template, and a
few-shot completion ("Sentence: ... / Reworded: ..."), sampled at temperature 0.7, top-p 0.95, seeded. A reply
counts as a paraphrase when it has at least four words, keeps every number of the prompt, and is not the
prompt itself; the JSON keeps every prompt and reply so the count can be checked by reading them.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from router.data import read_examples
from router.inputs import routing_text

SUITE = Path(__file__).parent
INSTRUCTION = "Paraphrase this request. Keep every number, date and name. Write only the new request.\n\n{text}"
FEW_SHOT = ("Each sentence is reworded with the same meaning and the same numbers.\n\n"
            "Sentence: Book a table for two at 7 pm tonight.\n"
            "Reworded: Could you reserve a table for 2 people this evening at 7?\n\n"
            "Sentence: Translate 'good morning' into Italian.\nReworded: How do Italians say 'good morning'?\n\n"
            "Sentence: {text}\nReworded:")


def numbers(text: str) -> list[str]:
    return re.findall(r"\d+", text)


def is_paraphrase(reply: str, source: str) -> bool:
    """At least four words, every digit group of `source` kept, and not `source` itself."""
    reply = reply.strip()
    have = numbers(reply)
    return (len(reply.split()) >= 4 and all(n in have for n in numbers(source))
            and reply.strip(" .?!").lower() != source.strip(" .?!").lower())


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, default=Path("artifacts/demo"))
    p.add_argument("--per-task", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    experts = [e["name"] for e in json.loads((args.artifact / "twin.json").read_text())["experts"]]
    core = args.artifact / "core"
    tok = AutoTokenizer.from_pretrained(core, local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(core, dtype=torch.float32, local_files_only=True).eval()
    texts = [routing_text(x.input) for e in experts
             for x in read_examples(SUITE / e / "train.jsonl", "task")[: args.per_task]]
    styles = {
        "chat instruction": [tok.apply_chat_template([{"role": "user", "content": INSTRUCTION.format(text=t)}],
                                                     tokenize=False, add_generation_prompt=True) for t in texts],
        "few-shot completion": [FEW_SHOT.format(text=t) for t in texts],
    }
    result = {"artifact": str(args.artifact), "seed": args.seed, "styles": {}}
    for style, prompts in styles.items():
        torch.manual_seed(args.seed)
        replies = []
        for s in range(0, len(prompts), 16):
            enc = tok(prompts[s : s + 16], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7,
                                     top_p=0.95, pad_token_id=tok.pad_token_id)
            n = enc["input_ids"].shape[1]
            replies += [tok.decode(o[n:], skip_special_tokens=True).strip().split("\n")[0] for o in out]
        ok = [is_paraphrase(r, t) for r, t in zip(replies, texts)]
        result["styles"][style] = {"paraphrases": sum(ok), "of": len(ok),
                                   "replies": [{"prompt": t, "reply": r, "paraphrase": k}
                                               for t, r, k in zip(texts, replies, ok)]}
        print(f"{style}: {sum(ok)} of {len(ok)} replies are paraphrases", flush=True)
        for t, r in list(zip(texts, replies))[:: max(1, args.per_task)]:
            print(f"   {t!r} -> {r!r}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
