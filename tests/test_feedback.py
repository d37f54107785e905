"""POST /v1/feedback and its store: a round trip with the ids of the official `openai` client's responses into
`ab report`, bad bodies answered 4xx with the store untouched, the routing log's id index across a restart,
and a server killed with SIGKILL while feedback is posted, which loses no acknowledged record."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from openai import AuthenticationError, BadRequestError, ConflictError, NotFoundError, OpenAI

from helpers import KEY, chat, start
from serving.abreport import join_outcomes, report
from serving.errors import APIError
from serving.feedback import FeedbackBody, FeedbackStore, post_feedback, read_outcomes, read_store
from serving.routelog import RouteLog, read_log
from serving.server import ServeOptions
from twinrt.errors import TwinError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def live(tiny_artifact, tmp_path_factory):
    log = tmp_path_factory.mktemp("feedback") / "logs" / "routing.jsonl"
    srv = start(ServeOptions(artifact=tiny_artifact, api_key=KEY, ab="twin=50,core=50", log=log, max_batch=8))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live) -> OpenAI:
    return OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def send(client: OpenAI, **body) -> dict:
    return client.post("/feedback", body=body, cast_to=object)


def store_rows(path: Path) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return db.execute("SELECT id, arm, score, label, metadata FROM feedback ORDER BY rowid").fetchall()
    finally:
        db.close()


def test_feedback_round_trip_with_openai_ids(client, live) -> None:
    chats = [client.chat.completions.create(model="ab", messages=chat(f"hi {i}"), max_tokens=2, temperature=0,
                                            user=f"user-{i}") for i in range(6)]
    text = client.completions.create(model="expert:math", prompt="one two", max_tokens=2, temperature=0)
    stream = list(client.chat.completions.create(model="core", messages=chat("yo"), max_tokens=2, stream=True))
    ids = [r.id for r in chats] + [text.id, stream[0].id]
    arms = [r.model_extra["routing"]["arm"] for r in chats] + ["expert:math", "core"]
    scores = [0.0, 0.25, 0.5, 0.75, 1.0, 0.125]
    for rid, arm, score in zip(ids, arms, scores):
        assert send(client, id=rid, score=score) == {"id": rid, "object": "feedback", "status": "recorded", "arm": arm}
    # the stream's id, the moment its [DONE] was read (its record is written just after)
    assert send(client, id=ids[-1], label="good", metadata={"why": ["short", 1]})["arm"] == "core"
    assert send(client, id=ids[-2], label="bad")["status"] == "recorded"
    store = live.server.feedback.path
    assert store == live.server.log.path.parent / "feedback.sqlite"
    rows = store_rows(store)[-8:]
    order = [0, 1, 2, 3, 4, 5, 7, 6]  # as posted
    assert [r[0] for r in rows] == [ids[i] for i in order] and [r[1] for r in rows] == [arms[i] for i in order]
    assert rows[6][2:] == (None, "good", '{"why":["short",1]}') and rows[0][2:4] == (0.0, None)
    records, _ = read_log(live.server.log.path)
    joined = join_outcomes(records, read_store(store))
    by_arm: dict[str, list[float]] = {}
    for arm, value in zip(arms, scores[:6] + [0.0, 1.0]):
        by_arm.setdefault(arm, []).append(value)
    assert {a: sorted(v) for a, v in joined.values.items()} == {a: sorted(v) for a, v in by_arm.items()}
    assert report(records, read_store(store)).kind == "score"


@pytest.mark.parametrize("body, status, code, param", [
    ({"id": "chatcmpl-never", "score": 1.0}, 404, "unknown_id", "id"),
    ({"id": "IDX", "score": 0.5, "label": "good"}, 400, None, None),
    ({"id": "IDX"}, 400, None, None),
    ({"id": "IDX", "score": "0.5"}, 400, None, "score"),
    ({"id": "IDX", "score": True}, 400, None, "score"),
    ({"id": "IDX", "score": 1e400}, 400, None, "score"),  # json: inf
    ({"id": "IDX", "label": "meh"}, 400, None, "label"),
    ({"id": "IDX", "label": "good", "metadata": [1]}, 400, None, "metadata"),
    ({"id": "IDX", "label": "good", "scroe": 1}, 400, None, "scroe"),
    ({"id": "", "label": "good"}, 400, None, "id"),
    ({"id": 7, "label": "good"}, 400, None, "id"),
    ({"id": "IDX", "label": "good", "metadata": {"k": "\ud800"}}, 400, None, None),  # a lone surrogate
])
def test_bad_feedback_is_4xx_and_the_store_intact(client, live, body, status, code, param) -> None:
    rid = client.completions.create(model="core", prompt="a b", max_tokens=1).id
    before = store_rows(live.server.feedback.path)
    raw = json.dumps({k: rid if v == "IDX" else v for k, v in body.items()}).replace("Infinity", "1e400")
    res = httpx.post(live.url + "/v1/feedback", content=raw, headers={"Authorization": f"Bearer {KEY}",
                                                                      "Content-Type": "application/json"})
    err = res.json()["error"]
    assert res.status_code == status and err["code"] == code and err["param"] == param and err["message"]
    assert store_rows(live.server.feedback.path) == before
    assert send(client, id=rid, label="good")["status"] == "recorded"  # the id itself is still open


def test_nan_score_duplicate_and_missing_key_are_refused(client, live) -> None:
    rid = client.completions.create(model="core", prompt="a b", max_tokens=1).id
    res = httpx.post(live.url + "/v1/feedback", content=f'{{"id": "{rid}", "score": NaN}}'.encode(),
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert res.status_code == 400 and res.json()["error"]["param"] == "score"
    assert "finite" in res.json()["error"]["message"]
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=live.url + "/v1", api_key="wrong-key", max_retries=0).post(
            "/feedback", body={"id": rid, "score": 0.5}, cast_to=object)
    res = httpx.post(live.url + "/v1/feedback", json={"id": rid, "score": 0.5})  # no key at all
    assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
    before = store_rows(live.server.feedback.path)
    assert rid not in [r[0] for r in before]
    assert send(client, id=rid, score=0.5)["status"] == "recorded"
    with pytest.raises(ConflictError) as e:
        send(client, id=rid, label="good")
    assert e.value.status_code == 409 and e.value.body["code"] == "duplicate_feedback"
    with pytest.raises(NotFoundError):
        send(client, id=rid + "x", score=0.5)
    with pytest.raises(BadRequestError):
        send(client, id=rid, score=0.5, label="bad")
    after = store_rows(live.server.feedback.path)
    assert after[:-1] == before and after[-1][:4] == (rid, "core", 0.5, None)


def test_feedback_is_off_without_a_routing_log(tiny_artifact, tmp_path) -> None:
    server = SimpleNamespace(feedback=None, log=None, active=1)
    with pytest.raises(APIError) as e:
        asyncio.run(post_feedback(server, FeedbackBody(id="x", score=1.0)))
    assert (e.value.status, e.value.code) == (404, "feedback_disabled")
    from serving.server import build_server

    with pytest.raises(TwinError, match="--feedback needs the routing log"):
        build_server(ServeOptions(artifact=tiny_artifact, no_log=True, feedback=tmp_path / "f.sqlite"))


def test_an_id_whose_request_is_still_finishing_is_waited_for(tmp_path) -> None:
    """A stream's record is written just after its [DONE]: feedback arriving in between waits for it."""
    log, store = RouteLog(tmp_path / "r.jsonl"), FeedbackStore(tmp_path / "f.sqlite")
    server = SimpleNamespace(feedback=store, log=log, active=2)  # this request and the stream

    async def race() -> dict:
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, log.write, {"id": "chatcmpl-s", "arm": "twin", "status": "ok"})
        return await post_feedback(server, FeedbackBody(id="chatcmpl-s", label="good"))

    try:
        assert asyncio.run(race())["arm"] == "twin"
        server.active = 1  # nothing else is being answered: an unknown id is refused at once
        t0 = time.monotonic()
        with pytest.raises(APIError) as e:
            asyncio.run(post_feedback(server, FeedbackBody(id="chatcmpl-t", label="good")))
        assert e.value.code == "unknown_id" and time.monotonic() - t0 < 0.05
    finally:
        log.close()
        store.close()


# ---- the log's id index and the store, without a server ------------------------------------------------------------


def test_route_log_knows_its_ids_after_reopening_and_ends_a_torn_line(tmp_path) -> None:
    path = tmp_path / "routing.jsonl"
    log = RouteLog(path, index_size=3)
    for i, arm in enumerate(["twin", "core", "static:ties", "twin"]):
        log.write({"id": f"cmpl-{i}", "arm": arm, "status": "ok"})
    assert log.arm_of("cmpl-2") == "static:ties" and log.arm_of("cmpl-0") is None and log.ids.forgotten == 1
    log.close()
    with path.open("a") as f:
        f.write('{"id": "cmpl-9", "arm": "tw')  # a crash in the middle of a line
    log = RouteLog(path)
    assert [log.arm_of(f"cmpl-{i}") for i in range(5)] == ["twin", "core", "static:ties", "twin", None]
    log.write({"id": "cmpl-5", "arm": "core", "status": "ok"})
    log.close()
    records, bad = read_log(path)
    assert [r["id"] for r in records] == ["cmpl-0", "cmpl-1", "cmpl-2", "cmpl-3", "cmpl-5"] and bad == 1


def test_store_keeps_one_feedback_per_id_across_reopening(tmp_path) -> None:
    async def add(store, **body):
        return await store.add(FeedbackBody(**body), "twin")

    store = FeedbackStore(tmp_path / "f.sqlite")
    assert asyncio.run(add(store, id="a", score=0.5)) and not asyncio.run(add(store, id="a", label="good"))
    store.close()
    store = FeedbackStore(tmp_path / "f.sqlite")
    assert not asyncio.run(add(store, id="a", score=1.0)) and asyncio.run(add(store, id="b", label="bad"))
    store.close()
    assert [(o.id, o.value, o.label) for o in read_store(tmp_path / "f.sqlite")] == [("a", 0.5, None),
                                                                                     ("b", 0.0, "bad")]
    (tmp_path / "junk.sqlite").write_text("not a database, but long enough to have a header " * 4)
    with pytest.raises(TwinError, match="cannot"):
        read_store(tmp_path / "junk.sqlite")
    with pytest.raises(TwinError, match="does not exist"):
        read_store(tmp_path / "none.sqlite")


def test_offline_outcomes_follow_the_endpoint_rules(tmp_path) -> None:
    path = tmp_path / "o.jsonl"
    path.write_text('{"id": "a", "score": 0.5}\n{"id": "b", "label": "good"}\n{"id": "c", "score": NaN}\n'
                    '{"id": "d"}\n\n{"id": "e", "label": "bad"}\n{"id": "f", "lab')
    outs, bad = read_outcomes(path)
    assert [(o.id, o.value) for o in outs] == [("a", 0.5), ("b", 1.0), ("e", 0.0)]
    assert len(bad) == 3 and bad[0].startswith(f"{path}:3: score")


# ---- SIGKILL while feedback is being posted ------------------------------------------------------------------------


def serve(artifact: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m serving.cli serve` in a child process on a free port; (process, base URL) once it listens."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", str(artifact), "--port", "0", "--log",
                             str(log), "--api-key-file", str(log.parent / "key")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if " on http://" in line:
            return proc, line.split(" on ")[1].split()[0]
    raise AssertionError(f"the server did not start (exit {proc.wait()})")


def test_sigkill_while_posting_loses_no_acknowledged_feedback(tiny_artifact, tmp_path) -> None:
    log = tmp_path / "logs" / "routing.jsonl"
    log.parent.mkdir()
    (log.parent / "key").write_text(KEY)
    proc, url = serve(tiny_artifact, log)
    try:
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        ids = [client.completions.create(model="core", prompt=f"w{i}", max_tokens=1).id for i in range(120)]
        posted = ids[:100]  # the last 20 get no feedback before the kill
        acked: dict[str, float] = {}
        lock = threading.Lock()

        def post(share: list[str]) -> None:
            with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as http:
                for rid in share:
                    try:
                        res = http.post("/v1/feedback", json={"id": rid, "score": len(rid) / 100})
                    except httpx.HTTPError:
                        return  # the server is gone
                    if res.status_code == 200:
                        with lock:
                            acked[rid] = len(rid) / 100

        threads = [threading.Thread(target=post, args=(posted[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 30 and proc.poll() is None:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for t in threads:
            t.join()
    finally:
        proc.kill()
        proc.wait()
    print(f"acknowledged {len(acked)} of {len(posted)} before the kill")
    assert 30 <= len(acked) < len(posted), "the kill should land while feedback is being posted"
    store = log.parent / "feedback.sqlite"
    rows = {r[0]: r for r in store_rows(store)}  # integrity_check passes
    assert set(acked) <= set(rows) <= set(posted)
    assert all(rows[rid][1:4] == ("core", acked[rid], None) for rid in acked)
    assert {o.id for o in read_store(store)} == set(rows)
    # a new server on the same log and store: the ids are still known, an acknowledged one still taken
    srv = start(ServeOptions(artifact=tiny_artifact, api_key=KEY, log=log))
    try:
        http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"})
        first = next(iter(acked))
        assert http.post("/v1/feedback", json={"id": first, "label": "good"}).status_code == 409
        assert http.post("/v1/feedback", json={"id": ids[-1], "label": "good"}).json()["arm"] == "core"
        assert http.post("/v1/feedback", json={"id": "cmpl-nope", "label": "good"}).status_code == 404
    finally:
        srv.stop()
