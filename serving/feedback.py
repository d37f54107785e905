"""Outcomes of answered requests: `POST /v1/feedback`, its durable store, and offline outcome files.

    POST /v1/feedback  {"id": "chatcmpl-...", "score": 0.8}               # or "label": "good" | "bad"
                       {"id": "cmpl-...", "label": "bad", "metadata": {"reason": "wrong date"}}
    200 {"id": ..., "object": "feedback", "status": "recorded", "arm": "twin"}

Exactly one of `score` (a finite number) and `label`; `metadata` is any JSON object, stored as given. The id
must be one this server answered (its routing log has or will have the record: a request still being
answered is waited for briefly), else 404 `unknown_id`; a second feedback for an id is 409
`duplicate_feedback`; a bad body is 400 naming the field. Feedback is off (404 `feedback_disabled`) when the
server runs without a routing log.

The store is SQLite (`ARTIFACT/logs/feedback.sqlite` by default, next to the routing log), one table

    feedback(id TEXT PRIMARY KEY, ts REAL, arm TEXT, score REAL, label TEXT, metadata TEXT)   -- score or label

in WAL mode with synchronous=FULL: each feedback is one transaction whose commit is on disk (fsync of the
WAL) before the 200 is sent, so an acknowledged record survives a kill or a power cut, and a crash in the
middle of a write leaves the earlier ones untouched (SQLite rolls the torn transaction back on the next open).
The primary key makes "one feedback per id" hold across restarts and concurrent writers. Writes run on one
thread of their own, off the event loop.

Offline outcomes (`twinrt ab report LOG --outcomes FILE.jsonl`): one JSON object a line, `{"id", "score"}` or
`{"id", "label"}` (the same rules as the endpoint). Either way an outcome's value is the score, or 1 for good
and 0 for bad.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.errors import APIError
from serving.schemas import invalid_text
from twinrt.errors import TwinError
from twinrt.validation import describe

DEFAULT_STORE = "feedback.sqlite"  # beside the routing log
LABELS = {"good": 1.0, "bad": 0.0}
PENDING_WAIT_S = 2.0  # how long an unknown id waits for the record of a request still being answered
PENDING_POLL_S = 0.01
SCHEMA = ("CREATE TABLE IF NOT EXISTS feedback (id TEXT PRIMARY KEY, ts REAL NOT NULL, arm TEXT, score REAL, "
          "label TEXT, metadata TEXT, CHECK ((score IS NULL) != (label IS NULL)))")

Score = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class FeedbackBody(BaseModel):
    """A feedback (or an offline outcome line): the response id and exactly one of score and label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, Field(strict=True, min_length=1, max_length=256)]
    score: Score | None = None
    label: Literal["good", "bad"] | None = None
    metadata: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        found = invalid_text(data)
        if found is not None:
            raise ValueError(f"the text is not valid Unicode (at {found[0] or 'the body'}); send UTF-8 text")
        return data

    @model_validator(mode="after")
    def _one_outcome(self) -> FeedbackBody:
        if (self.score is None) == (self.label is None):
            raise ValueError("give exactly one of 'score' (a number) and 'label' ('good' or 'bad')")
        if self.metadata is not None:
            try:
                json.dumps(self.metadata, allow_nan=False)
            except ValueError:
                raise ValueError("'metadata' must be plain JSON (no NaN or Infinity)") from None
        return self

    @property
    def value(self) -> float:
        return self.score if self.score is not None else LABELS[self.label]  # type: ignore[index]


@dataclass(frozen=True)
class Outcome:
    id: str
    value: float       # the score, or 1.0 / 0.0 for good / bad
    label: str | None  # "good" | "bad" when it was a label


class FeedbackStore:
    """The SQLite store (see the module docstring). `add` from the event loop; reads from anywhere."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twinrt-feedback")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise TwinError(f"cannot open the feedback store {self.path}: {e} (choose another with --feedback)") \
                from None

    def _insert(self, body: FeedbackBody, arm: str) -> bool:
        meta = None if body.metadata is None else json.dumps(body.metadata, separators=(",", ":"))
        try:  # autocommit: the statement is its own transaction, committed (WAL fsynced) when it returns
            self._db.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?)",
                             (body.id, time.time(), arm, body.score, body.label, meta))
        except sqlite3.IntegrityError:
            return False
        return True

    async def add(self, body: FeedbackBody, arm: str) -> bool:
        """Store one feedback durably; False if the id already has one."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._insert, body, arm)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._db.close()


def read_store(path: str | Path) -> list[Outcome]:
    """Every outcome in a feedback store, in the order they were recorded (read-only; raises TwinError)."""
    path = Path(path)
    if not path.is_file():
        raise TwinError(f"feedback store {path} does not exist")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT id, score, label FROM feedback ORDER BY rowid").fetchall()
        finally:
            db.close()
    except sqlite3.Error as e:
        raise TwinError(f"cannot read the feedback store {path}: {e}") from None
    return [Outcome(rid, LABELS[label] if label is not None else float(score), label) for rid, score, label in rows]


def read_outcomes(path: str | Path) -> tuple[list[Outcome], list[str]]:
    """(outcomes, a description of each line skipped) of an offline outcomes file (JSONL)."""
    path = Path(path)
    if not path.is_file():
        raise TwinError(f"outcomes file {path} does not exist")
    out, bad = [], []
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                body = FeedbackBody.model_validate_json(line)
            except ValidationError as e:
                bad.append(f"{path}:{number}: {describe(e, first=True)}")
                continue
            out.append(Outcome(body.id, body.value, body.label))
    return out, bad


async def post_feedback(server: Any, body: FeedbackBody) -> dict[str, Any]:
    """The handler of POST /v1/feedback over a Server with `log` (its RouteLog) and `feedback` (its store)."""
    store: FeedbackStore | None = server.feedback
    if store is None or server.log is None:
        raise APIError(404, "Feedback is off: this server runs without a routing log (--no-log).",
                       code="feedback_disabled")
    arm = server.log.arm_of(body.id)
    deadline = time.monotonic() + PENDING_WAIT_S
    while arm is None and server.active > 1 and time.monotonic() < deadline:
        # another request may still be finishing: a stream's record is written after its [DONE]
        await asyncio.sleep(PENDING_POLL_S)
        arm = server.log.arm_of(body.id)
    if arm is None:
        forgot = server.log.ids.forgotten
        older = f" (or older than the last {server.log.ids.size} it remembers)" if forgot else ""
        raise APIError(404, f"No response with id {body.id!r}: this server never answered it{older}.", param="id",
                       code="unknown_id")
    if not await store.add(body, arm):
        raise APIError(409, f"The response {body.id!r} already has feedback; each response takes one.", param="id",
                       code="duplicate_feedback")
    return {"id": body.id, "object": "feedback", "status": "recorded", "arm": arm}
