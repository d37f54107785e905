"""One bad request never takes the server down.

A table of hostile inputs against a live tiny-model server: each gets its documented 4xx while innocent
requests sent at the same moment complete exactly as they do alone. Faults injected into the router and into
the model's forward pass fail only the request that carries them. A dead engine turns /health 503 and answers
waiting requests with a clean error; the server-side deadline ends a request that runs too long.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from helpers import KEY, chat, start
from serving.server import ServeOptions

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
BAD = "hi \ud800 there"  # a lone UTF-16 surrogate: valid JSON, not valid Unicode
MAX_BATCH, MAX_QUEUE = 8, 8

# requests that must come out the same whatever else the server is doing
INNOCENT = [
    (CHAT, {"model": "twin", "messages": chat("what is two plus three"), "max_tokens": 6, "temperature": 0}),
    (COMPL, {"model": "core", "prompt": "hello world", "max_tokens": 6, "temperature": 0}),
    (CHAT, {"model": "expert:code", "messages": chat("def add(a, b):"), "max_tokens": 6, "temperature": 0}),
    (CHAT, {"model": "twin", "messages": chat("5 + 7 ="), "max_tokens": 6, "temperature": 0,
            "routing": {"weights": {"math": 0.6, "chat": 0.4}}}),
]


def body(**kw) -> dict:
    return {"model": "twin", "messages": chat("hello world"), "max_tokens": 4, **kw}


# (name, path, body, status, error code, error param)
CASES = [
    ("surrogate in a message", CHAT, body(messages=chat(BAD)), 400, None, "messages.0.content"),
    ("surrogate in a system message", CHAT, body(messages=[{"role": "system", "content": BAD}, *chat("x")]), 400,
     None, "messages.0.content"),
    ("surrogate in a text part", CHAT, body(messages=[{"role": "user", "content": [{"type": "text", "text": BAD}]}]),
     400, None, "messages.0.content.0.text"),
    ("surrogate in the prompt", COMPL, {"model": "core", "prompt": BAD, "max_tokens": 2}, 400, None, "prompt"),
    ("surrogate in a prompt list", COMPL, {"model": "twin", "prompt": [BAD], "max_tokens": 2}, 400, None,
     "prompt.0"),
    ("surrogate in stop", CHAT, body(stop=BAD), 400, None, "stop"),
    ("surrogate in a stop list", COMPL, {"model": "core", "prompt": "x", "stop": ["a", BAD]}, 400, None, "stop.1"),
    ("surrogate in user", CHAT, body(user=BAD), 400, None, "user"),
    ("surrogate in user, completions", COMPL, {"model": "twin", "prompt": "x", "user": BAD}, 400, None, "user"),
    ("surrogate in routing.expert", CHAT, body(routing={"expert": BAD}), 400, None, "routing.expert"),
    ("surrogate in a routing weight's name", CHAT, body(routing={"weights": {BAD: 1.0}}), 400, None,
     "routing.weights.hi \\ud800 there"),
    ("surrogate in model", CHAT, body(model=BAD), 400, None, "model"),
    ("surrogate in an ignored field", CHAT, body(metadata={"k": BAD}), 400, None, "metadata.k"),
    ("surrogate on the core arm", CHAT, body(model="core", messages=chat(BAD)), 400, None, "messages.0.content"),
    ("surrogate on an expert arm", CHAT, body(model="expert:math", messages=chat(BAD)), 400, None,
     "messages.0.content"),
    ("surrogate on the A/B alias", COMPL, {"model": "ab", "prompt": BAD}, 400, None, "prompt"),
    ("surrogate, streamed", CHAT, body(messages=chat(BAD), stream=True), 400, None, "messages.0.content"),
    ("routing weight 1e30, sampled", CHAT, body(routing={"weights": {"math": 1e30}}, temperature=1), 400, None,
     "routing.weights.math"),
    ("routing weight 1e39 (inf in float32)", CHAT, body(routing={"weights": {"chat": 1e39}}), 400, None,
     "routing.weights.chat"),
    ("n that can never fit", CHAT, body(n=MAX_BATCH + MAX_QUEUE + 1, temperature=1), 400, None, "n"),
]


@pytest.fixture(scope="module")
def live(routed_artifact, tmp_path_factory):
    log = tmp_path_factory.mktemp("faults") / "routing.jsonl"
    srv = start(ServeOptions(artifact=routed_artifact, api_key=KEY, ab="twin=50,core=50", log=log,
                             max_batch=MAX_BATCH, max_queue=MAX_QUEUE))
    yield srv
    srv.stop()


def post(url: str, path: str, payload: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(url + path, content=json.dumps(payload).encode(), timeout=timeout,
                      headers={"Content-Type": "application/json", **AUTH})


def answer(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["message"]["content"] if "message" in c else c["text"]


@pytest.fixture(scope="module")
def alone(live) -> list[str]:
    """Each innocent request's answer when it runs by itself."""
    return [answer(post(live.url, p, b)) for p, b in INNOCENT]


async def together(url: str, reqs: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as h:
        return await asyncio.gather(*(h.post(p, content=json.dumps(b).encode(),
                                             headers={"Content-Type": "application/json"}) for p, b in reqs))


def assert_error(r: httpx.Response, status: int, code: str | None, param: str | None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["param"] == param
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    return err


@pytest.mark.parametrize("name,path,payload,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_a_bad_request_fails_alone(live, alone, name, path, payload, status, code, param):
    bad, *rest = asyncio.run(together(live.url, [(path, payload), *INNOCENT]))
    assert_error(bad, status, code, param)
    assert [answer(r) for r in rest] == alone


def test_extreme_sampling_values_are_served_as_vllm_serves_them(live):
    greedy = answer(post(live.url, CHAT, body(temperature=0, max_tokens=8)))
    assert answer(post(live.url, CHAT, body(temperature=1e-300, max_tokens=8))) == greedy   # < 1e-5: greedy
    # top_p 1e-46 is 0.0 in float32; the most likely token is always kept, so this samples greedily
    assert answer(post(live.url, CHAT, body(temperature=1.0, top_p=1e-46, max_tokens=8, seed=3))) == greedy


def test_a_router_failure_fails_only_its_own_request(live, alone, monkeypatch):
    router = live.server.routing.router
    real = router.route

    def route(inputs):  # a router that cannot take one particular input
        if any("poison" in json.dumps(x) for x in inputs):
            raise RuntimeError("secret internal detail")
        return real(inputs)

    monkeypatch.setattr(router, "route", route)
    twins = [INNOCENT[0]] * 12
    rs = asyncio.run(together(live.url, [*twins, (CHAT, body(messages=chat("poison")))]))
    assert [answer(r) for r in rs[:-1]] == [alone[0]] * 12
    err = assert_error(rs[-1], 500, "internal_error", None)
    assert err["type"] == "server_error" and "secret" not in err["message"] and "error id" in err["message"]


def test_a_forward_pass_that_fails_on_one_prompt_fails_only_that_request(live, alone, monkeypatch):
    tm = live.server.backend.tm
    tok = tm.tokenizer
    innocent_ids = set()
    for _, b in INNOCENT:
        innocent_ids |= set(tok(json.dumps(b))["input_ids"])
    poison = next(t for t in tok("ZYXWVUTSRQ")["input_ids"] if t not in innocent_ids)
    real = tm.model.forward

    def forward(*args, **kw):  # a fault that follows one token, as a kernel bug on some input would
        if bool((kw["input_ids"] == poison).any()):
            raise RuntimeError("kernel fault")
        return real(*args, **kw)

    monkeypatch.setattr(tm.model, "forward", forward)
    doomed = (COMPL, {"model": "core", "prompt": tok.decode([poison]) * 3, "max_tokens": 4})
    rs = asyncio.run(together(live.url, [doomed, *INNOCENT]))
    assert_error(rs[0], 500, "internal_error", None)
    assert [answer(r) for r in rs[1:]] == alone
    monkeypatch.undo()
    assert [answer(post(live.url, p, b)) for p, b in INNOCENT] == alone


def test_the_server_is_healthy_and_counts_its_errors_after_the_table(live, alone):
    for _, path, payload, *_ in CASES:
        post(live.url, path, payload)
    health = httpx.get(live.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [answer(post(live.url, p, b)) for p, b in INNOCENT] == alone
    assert live.server.backend.stats().inflight == 0 and live.server.backend.healthy()
    metrics = httpx.get(live.url + "/metrics").text
    assert 'twinrt_errors_total{status="400"}' in metrics


# ---- a dead engine, the deadline ----------------------------------------------------------------------------


@pytest.fixture()
def fresh(tiny_artifact, tmp_path):
    srv = start(ServeOptions(artifact=tiny_artifact, api_key=KEY, log=tmp_path / "log.jsonl", max_batch=2,
                             max_queue=4, request_timeout=0.5))
    yield srv
    srv.stop()


def slow_steps(backend, monkeypatch, pause: float = 0.05) -> None:
    real = backend.engine.step

    def step():
        time.sleep(pause)
        return real()

    monkeypatch.setattr(backend.engine, "step", step)


def test_a_dead_engine_turns_health_503_and_answers_waiting_requests(fresh, monkeypatch):
    fatal = []
    fresh.server.on_fatal = lambda: fatal.append(True)
    backend = fresh.server.backend

    def die():  # not an Exception: nothing in the loop may swallow it
        raise KeyboardInterrupt

    monkeypatch.setattr(backend.engine, "step", die)
    waiting = post(fresh.url, COMPL, {"model": "core", "prompt": "hello", "max_tokens": 4})
    assert_error(waiting, 503, "engine_unavailable", None)
    health = httpx.get(fresh.url + "/health")
    assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    assert_error(post(fresh.url, COMPL, {"model": "core", "prompt": "hello"}), 503, "engine_unavailable", None)
    for _ in range(50):
        if fatal:
            break
        time.sleep(0.1)
    assert fatal == [True]


def test_the_deadline_ends_a_request_that_runs_too_long(fresh, monkeypatch):
    slow_steps(fresh.server.backend, monkeypatch)
    r = post(fresh.url, COMPL, {"model": "core", "prompt": "hello", "max_tokens": 60, "ignore_eos": True})
    assert_error(r, 504, "request_timeout", None)
    assert r.headers["x-request-id"].startswith("cmpl-")
    with httpx.stream("POST", fresh.url + CHAT, headers=AUTH, timeout=30,
                      json={"model": "core", "messages": chat("hello"), "max_tokens": 60, "ignore_eos": True,
                            "stream": True}) as s:
        events = [line.removeprefix("data: ") for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
    for _ in range(50):
        if fresh.server.backend.stats().inflight == 0:
            break
        time.sleep(0.1)
    assert fresh.server.backend.stats().inflight == 0       # the rows were freed
    monkeypatch.undo()
    ok = post(fresh.url, COMPL, {"model": "core", "prompt": "hello", "max_tokens": 3})
    assert ok.status_code == 200


def test_an_unhandled_bug_is_an_openai_500_that_keeps_the_connection_and_is_counted(live, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(live.server.arms, "resolve", broken)
    with httpx.Client(base_url=live.url, headers=AUTH, timeout=30) as h:
        r = h.post(CHAT, json=body())
        err = assert_error(r, 500, "internal_error", None)
        assert "secret" not in err["message"] and r.headers.get("connection") != "close"
        monkeypatch.undo()
        assert h.post(CHAT, json=body()).status_code == 200   # the same client, the next request
    assert 'twinrt_errors_total{status="500"}' in httpx.get(live.url + "/metrics").text
