"""The finished steps of an eval run, kept on disk so that a stopped run picks up where it stopped.

An eval with every merge method and a twin-rank search takes hours on a CPU; a crash, a reboot or a Ctrl-C in
its last arm should not cost the arms already scored. `twinrt eval --out DIR` records every step as it
finishes (an expert's test run, a merge arm with its validation grid and its twin-rank search, the statistics
pass's cost, the core and twin arms) in `DIR/eval.partial.json`, rewritten whole by temp file and rename after
each step, so the file always holds every step finished so far and nothing half-written. `--resume` reads it
back and runs only the steps it lacks; the finished run writes eval.json, eval.md and eval.png as usual and
removes the journal.

The journal's `key` says which run it belongs to: the artifact (a digest of its manifest), the options that
change a score, the dtype and device, the tasks and their metrics, and the suite's examples (a digest of every
prompt and answer the run reads). A resume whose key differs is refused with the first field that differs,
never mixed into one table; where the base, the experts or the artifact now are does not count.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from twinrt.errors import TwinError

JOURNAL_FORMAT = "twinrt-eval-journal/1"
JOURNAL_NAME = "eval.partial.json"

T = TypeVar("T")

DIGESTS = {"manifest": "the artifact's manifest has changed since (a re-split, a new router, an expert added)",
           "examples": "the suite's prompts or answers (test, validation or the train examples of the "
                       "data-based merges) are not the same"}


def options_json(options: Any) -> dict[str, Any]:
    """EvalOptions as JSON values (paths as strings, tuples as lists), as eval.json's `options`."""
    opts = asdict(options)
    opts["base"] = None if opts["base"] is None else str(opts["base"])
    opts["expert_paths"] = {k: str(v) for k, v in opts["expert_paths"].items()}
    opts["methods"] = list(opts["methods"])
    opts["twin_ranks"] = list(opts["twin_ranks"])
    opts["task_expert"] = dict(opts["task_expert"])
    return opts


def examples_digest(splits: Mapping[str, Mapping[str, Iterable[Any]]]) -> str:
    """sha256 over every example (split, task, messages, answer) of the given splits, in order."""
    h = hashlib.sha256()
    for name, split in splits.items():
        h.update(json.dumps(["split", name]).encode() + b"\n")
        for task, examples in split.items():
            for e in examples:
                h.update(json.dumps([task, e.messages, e.answer], sort_keys=True, default=list).encode())
                h.update(b"\n")
    return h.hexdigest()


class Journal:
    """Steps by name -> their JSON value, for one run `key`. `path` None: kept in memory only (the API default)."""

    def __init__(self, path: Path | None = None, *, resume: bool = False) -> None:
        self.path = None if path is None else Path(path)
        self.resume = resume
        self.key: dict[str, Any] | None = None
        self.steps: dict[str, Any] = {}
        self.resumed: list[str] = []  # steps read back from disk, in the order they were first recorded

    def begin(self, key: dict[str, Any]) -> None:
        """Start the run `key`: with `resume`, read back the steps of an earlier run of the same key."""
        self.key = json.loads(json.dumps(key))  # the form it has when read back
        self.steps = {}
        if not (self.resume and self.path is not None and self.path.is_file()):
            return
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TwinError(f"cannot resume from {self.path}: {e}; remove it, or run without --resume to start "
                            "over") from None
        if not isinstance(doc, dict) or doc.get("format") != JOURNAL_FORMAT or not isinstance(doc.get("steps"), dict):
            raise TwinError(f"cannot resume from {self.path}: not a {JOURNAL_FORMAT} file; run without --resume to "
                            "start over")
        diff = _first_difference(doc.get("key"), self.key)
        if diff is not None:
            raise TwinError(f"cannot resume from {self.path}: it is a run with other settings ({diff}); run with the "
                            "same ones, or without --resume to start over")
        self.steps = doc["steps"]
        self.resumed = list(self.steps)

    def step(self, name: str, compute: Callable[[], T], encode: Callable[[T], Any],
             decode: Callable[[Any], T]) -> T:
        """The step `name`'s value: read back if it is recorded, else computed, recorded and written."""
        if name in self.steps:
            try:
                return decode(self.steps[name])
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                raise TwinError(f"cannot resume from {self.path}: its step {name!r} is not readable "
                                f"({type(e).__name__}: {e}); run without --resume to start over") from None
        value = compute()
        self.steps[name] = json.loads(json.dumps(encode(value)))
        self._write()
        return value

    def done(self, name: str) -> bool:
        return name in self.steps

    def forget(self, name: str) -> None:
        """Drop a recorded step, so that the next `step(name, ...)` computes and records it again."""
        self.steps.pop(name, None)
        if name in self.resumed:
            self.resumed.remove(name)

    def remove(self) -> None:
        """The run finished (its outputs are written): the journal has nothing left to give."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def _write(self) -> None:
        if self.path is None:
            return
        data = json.dumps({"format": JOURNAL_FORMAT, "key": self.key, "steps": self.steps}, allow_nan=False) + "\n"
        tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            raise TwinError(f"cannot write {self.path}: {e.strerror or e}") from None
        finally:  # also on Ctrl-C mid-write; after the rename there is nothing left to remove
            tmp.unlink(missing_ok=True)


def _first_difference(old: Any, new: Any, at: str = "") -> str | None:
    """'options.limit: 50 there, 30 here' for the first field where two keys differ; None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(new) + [k for k in old if k not in new]:
            diff = _first_difference(old.get(k), new.get(k), f"{at}.{k}" if at else k)
            if diff is not None:
                return diff
        return None
    if old != new:
        if at in DIGESTS:
            return f"{at}: {DIGESTS[at]}"
        return f"{at or 'key'}: {json.dumps(old)} there, {json.dumps(new)} here"
    return None
