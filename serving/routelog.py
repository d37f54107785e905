"""The routing log: one JSON object per completion request, appended to a JSONL file.

    {"ts": 1732400000.123,            # unix time the request arrived
     "id": "chatcmpl-3f2a...",        # the response id
     "endpoint": "chat.completions",  # or "completions"
     "model": "ab",                   # the `model` the client sent
     "arm": "core",                   # the arm that served it (twin | core | expert:<name>)
     "ab": "ab",                      # the A/B alias that picked the arm, or null
     "user": "9f86d081884c7d65",      # sha256(user)[:16] of the request's `user`, or null (never the raw id)
     "router": "trained",             # router kind, "none" or "override"
     "rule": "router",                # the router's rule (router | top_k | min_weight | fallback), or null
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
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import IO, Any

from twinrt.errors import TwinError

LOG_FIELDS = ("ts", "id", "endpoint", "model", "arm", "ab", "user", "router", "rule", "overridden", "weights", "n",
              "stream", "status", "finish_reasons", "prompt_tokens", "completion_tokens", "latency_s", "ttft_s")


def user_hash(user: str | None) -> str | None:
    return None if user is None else hashlib.sha256(user.encode()).hexdigest()[:16]


class RouteLog:
    """Appends records to a JSONL file (one line each, flushed at once). Used from the event loop thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f: IO[str] | None = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise TwinError(f"cannot open the routing log {self.path}: {e.strerror} (choose another with --log)") \
                from None

    def write(self, record: dict[str, Any]) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: record.get(k) for k in LOG_FIELDS}, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_log(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(records, number of unreadable lines skipped); raises TwinError if the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise TwinError(f"routing log {path} does not exist")
    records, bad = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1  # e.g. a line cut short by a crash
                continue
            if isinstance(rec, dict) and isinstance(rec.get("arm"), str):
                records.append(rec)
            else:
                bad += 1
    return records, bad
