"""An expert's calibration data, read, checked and tokenized before any model runs.

One JSON object a line, either format (lines may mix them):

    {"messages": [{"role": "user", "content": ...}, ...], "answer": "..."}   the eval suite's chat format
                                                                            (its "task" key is ignored)
    {"text": "..."}                                                         plain text

A chat example is the chat template's prompt (with the generation prompt, as every backend encodes it) followed
by the answer and the tokenizer's eos token, which is how the experts were trained; the *reference tokens*,
whose log-likelihood the Fisher statistics differentiate, are the answer's (+ eos). A plain-text example is its
tokens, and every token after the first is a reference token. Every token of an example (prompt included) is
an input token for the Gram matrices.

The first `samples` examples are used, stopping before the one that would take the total past `max_tokens`.
Errors are TwinErrors naming the file and line: a missing or empty file, a line that is not one of the two
formats, an example longer than the model's context.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twinrt.errors import TwinError
from twinrt.eval.tasks import jsonl_objects, parse_messages
from twinrt.runtime.request import encode_prompt


@dataclass(frozen=True)
class Sample:
    """One tokenized example: `ids: [T]`, and `scored[t]`: token t is a reference token (never t = 0)."""

    ids: tuple[int, ...]
    scored: tuple[bool, ...]


@dataclass(frozen=True)
class Calibration:
    """The examples one expert's statistics are computed on."""

    source: Path
    samples: tuple[Sample, ...]
    batch_size: int = 8  # examples per forward pass where no per-example gradient is needed

    @property
    def tokens(self) -> int:
        return sum(len(s.ids) for s in self.samples)

    @property
    def scored(self) -> int:
        return sum(sum(s.scored) for s in self.samples)


def encode_example(tokenizer: Any, row: dict[str, Any], where: str) -> Sample:
    """The tokens of one example line (see the module docstring); TwinError naming `where` if it is malformed."""
    if "text" in row and "messages" not in row:
        if not isinstance(row["text"], str) or not row["text"]:
            raise TwinError(f"{where}: 'text' must be a non-empty string")
        ids = encode_prompt(tokenizer, row["text"])
        return Sample(tuple(ids), (False,) + (True,) * (len(ids) - 1))
    if "messages" in row and "text" not in row:
        messages = parse_messages(row["messages"], where)
        if not isinstance(row.get("answer"), str) or not row["answer"]:
            raise TwinError(f"{where}: a chat example needs a non-empty string 'answer' (its reference reply)")
        prompt = encode_prompt(tokenizer, [dict(m) for m in messages])
        answer = tokenizer(row["answer"] + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        return Sample(tuple(prompt + answer), (False,) * len(prompt) + (True,) * len(answer))
    raise TwinError(f"{where}: expected {{\"messages\": [...], \"answer\": ...}} (chat) or {{\"text\": ...}} "
                    "(plain text)")


def check_sample(sample: Sample, context: int | None, where: str) -> Sample:
    """`sample` if the model can score it: no longer than `context` (when known), with a reference token."""
    if context is not None and len(sample.ids) > context:
        raise TwinError(f"{where}: the example is {len(sample.ids)} tokens, longer than the model's context of "
                        f"{context}")
    if not any(sample.scored):
        raise TwinError(f"{where}: the example has no reference token to score")
    return sample


def load_calibration(path: Path, tokenizer: Any, *, samples: int, max_tokens: int | None,
                     context: int | None, expert: str, batch_size: int = 8) -> Calibration:
    """Read `path` (see the module docstring) for `expert`; `context`: the model's longest sequence, if known."""
    path = Path(path)
    what = f"expert {expert!r}: calibration data {path}"
    if not path.is_file():
        raise TwinError(f"{what} does not exist" if not path.exists() else f"{what} is not a file")
    out: list[Sample] = []
    total = 0
    for where, row in jsonl_objects(path, "a JSON object (chat or text example)"):
        if len(out) >= samples:
            break
        sample = check_sample(encode_example(tokenizer, row, where), context, where)
        if max_tokens is not None and total + len(sample.ids) > max_tokens:
            if not out:
                raise TwinError(f"{where}: the first example is {len(sample.ids)} tokens, more than "
                                f"max_tokens {max_tokens}")
            break
        out.append(sample)
        total += len(sample.ids)
    if not out:
        raise TwinError(f"{what} has no examples")
    return Calibration(path, tuple(out), batch_size)
