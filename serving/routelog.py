"""The routing log: one JSON object per completion request, appended to a JSONL file.

    {"ts": 1732400000.123,            # unix time the request arrived
     "id": "chatcmpl-3f2a...",        # the response id
     "endpoint": "chat.completions",  # or "completions"
     "model": "ab",                   # the `model` the client sent
     "arm": "core",                   # the arm that served it (twin | core | expert:<name> | static:<label>)
     "ab": "ab",                      # the A/B alias that picked the arm, or null
     "user": "9f86d081884c7d65",      # sha256(user)[:16] of the request's `user`, or null (never the raw id)
     "router": "trained",             # router kind, "none" or "override"
     "rule": "router",                # the router's rule (router | top_k | min_weight | fallback), or null
     "confidence": 0.97,              # the router's probability of its top expert, or null (it did not decide)
     "overridden": false,
     "weights": {"math": 0.91, "code": 0.06, "chat": 0.03},   # the mix, in expert order
     "n": 1, "stream": false,
     "status": "ok",                  # ok | cancelled (the client went away) | error (failed after routing)
     "finish_reasons": ["stop"],      # one per choice
     "prompt_tokens": 21, "completion_tokens": 30,
     "latency_s": 0.812,              # arrival to last token
     "ttft_s": 0.105}                 # arrival to first token (null if none came)

Requests refused before routing (bad input, unknown model, auth, a full queue) are not logged: they have no
arm. `twinrt ab report LOG` summarises a log per arm.

RouteLog also keeps the ids it has logged (the last ID_INDEX_SIZE of them, those already in the file when it
opens included), so that `POST /v1/feedback` can tell an id this server answered from one it never did. A line
cut short by a crash is ended with a newline when the log reopens, so the next record starts a line of its own.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

from twinrt.errors import TwinError

LOG_FIELDS = ("ts", "id", "endpoint", "model", "arm", "ab", "user", "router", "rule", "confidence", "overridden",
              "weights", "n", "stream", "status", "finish_reasons", "prompt_tokens", "completion_tokens", "latency_s",
              "ttft_s")
ID_INDEX_SIZE = 1 << 18  # ids (with their arm) a RouteLog remembers: ~40 MiB with chatcmpl-<32 hex> ids


def user_hash(user: str | None) -> str | None:
    return None if user is None else hashlib.sha256(user.encode()).hexdigest()[:16]


class IdIndex:
    """The last `size` ids seen, each with its arm (an id seen again takes its newest arm)."""

    def __init__(self, size: int = ID_INDEX_SIZE) -> None:
        self.size = size
        self.forgotten = 0  # ids pushed out by newer ones
        self._arms: OrderedDict[str, str] = OrderedDict()

    def add(self, rid: str, arm: str) -> None:
        self._arms[rid] = arm
        self._arms.move_to_end(rid)
        if len(self._arms) > self.size:
            self._arms.popitem(last=False)
            self.forgotten += 1

    def arm(self, rid: str) -> str | None:
        return self._arms.get(rid)

    def __len__(self) -> int:
        return len(self._arms)


class RouteLog:
    """Appends records to a JSONL file (one line each, flushed at once) and indexes their ids. Used from the event
    loop thread."""

    def __init__(self, path: str | Path, index_size: int = ID_INDEX_SIZE) -> None:
        self.path = Path(path)
        self.ids = IdIndex(index_size)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = self._index_existing()
            self._f: IO[str] | None = self.path.open("a", encoding="utf-8")
            if torn:
                self._f.write("\n")
                self._f.flush()
        except OSError as e:
            raise TwinError(f"cannot open the routing log {self.path}: {e.strerror} (choose another with --log)") \
                from None

    def _index_existing(self) -> bool:
        """Index the ids already in the file; True if its last line was cut short (no final newline)."""
        if not self.path.is_file():
            return False
        for rec in iter_records(self.path):
            if isinstance(rec.get("id"), str):
                self.ids.add(rec["id"], rec["arm"])
        with self.path.open("rb") as f:
            f.seek(0, 2)
            if f.tell() == 0:
                return False
            f.seek(-1, 2)
            return f.read(1) != b"\n"

    def arm_of(self, rid: str) -> str | None:
        """The arm that served the request with response id `rid`, if this log holds it (and still remembers)."""
        return self.ids.arm(rid)

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: record.get(k) for k in LOG_FIELDS}, separators=(",", ":")) + "\n")
        self._f.flush()
        if isinstance(record.get("id"), str) and isinstance(record.get("arm"), str):
            self.ids.add(record["id"], record["arm"])

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def iter_records(path: Path, bad: list[int] | None = None):
    """The log's records in order; a line that is not a record (e.g. cut short by a crash) is skipped, and its
    number appended to `bad` when given."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("arm"), str):
                yield rec
            elif bad is not None:
                bad.append(number)


def read_log(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(records, number of unreadable lines skipped); raises TwinError if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise TwinError(f"routing log {path} does not exist")
    bad: list[int] = []
    return list(iter_records(path, bad)), len(bad)
