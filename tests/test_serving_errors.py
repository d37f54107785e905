"""Bad input against a live server: every case gets the right status and an OpenAI-style error body, and the
server stays healthy. Also: a full queue answers 429, `twin` without a router, the API key from the env."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest
from openai import AuthenticationError, OpenAI

from helpers import KEY, chat, start
from serving.server import ServeOptions, build_server

AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
OK_CHAT = {"model": "twin", "messages": chat("hello world"), "max_tokens": 2}
LONG = "the quick brown fox jumps over the lazy dog " * 20   # far more than the 128-token context


@pytest.fixture(scope="module")
def live(tiny_artifact, tmp_path_factory):
    """No router; room for 2 running + 2 queued requests."""
    log = tmp_path_factory.mktemp("serve_err") / "routing.jsonl"
    srv = start(ServeOptions(artifact=tiny_artifact, api_key=KEY, log=log, max_batch=2, max_queue=2))
    yield srv
    srv.stop()


def with_(**kw) -> bytes:
    return json.dumps({**OK_CHAT, **kw}).encode()


# (name, path, raw body, headers, status, error code, error param)
CASES = [
    ("malformed JSON", CHAT, b'{"model": "twin", "messages": [', AUTH, 400, "invalid_json", None),
    ("body is a list", CHAT, b"[1, 2]", AUTH, 400, None, None),
    ("missing messages", CHAT, b'{"model": "twin"}', AUTH, 400, None, "messages"),
    ("empty messages", CHAT, with_(messages=[]), AUTH, 400, None, "messages"),
    ("bad role", CHAT, with_(messages=[{"role": "wizard", "content": "hi"}]), AUTH, 400, None, "messages.0.role"),
    ("image part", CHAT, with_(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     AUTH, 400, None, "messages.0.content"),
    ("unknown model", CHAT, with_(model="gpt-4o"), AUTH, 404, "model_not_found", "model"),
    ("unknown expert arm", CHAT, with_(model="expert:poetry"), AUTH, 404, "model_not_found", "model"),
    ("override: unknown expert", CHAT, with_(routing={"weights": {"math": 0.5, "poetry": 0.5}}), AUTH, 400,
     "unknown_expert", "routing.weights"),
    ("override: unknown one-hot", CHAT, with_(routing={"expert": "poetry"}), AUTH, 400, "unknown_expert",
     "routing.expert"),
    ("override: both forms", CHAT, with_(routing={"expert": "math", "weights": {"math": 1}}), AUTH, 400, None,
     "routing"),
    ("override: typo key", CHAT, with_(routing={"weight": {"math": 1}}), AUTH, 400, None, "routing.weight"),
    ("override: negative", CHAT, with_(routing={"weights": {"math": -0.5}}), AUTH, 400, None, "routing.weights.math"),
    ("override: NaN", CHAT, with_(routing={"weights": {"math": math.nan}}), AUTH, 400, None, "routing.weights.math"),
    ("override: string", CHAT, with_(routing={"weights": {"math": "0.5"}}), AUTH, 400, None, "routing.weights.math"),
    ("max_tokens 0", CHAT, with_(max_tokens=0), AUTH, 400, None, "max_tokens"),
    ("max_tokens -3", COMPL, json.dumps({"model": "core", "prompt": "x", "max_tokens": -3}).encode(), AUTH, 400,
     None, "max_tokens"),
    ("max_completion_tokens 0", CHAT, with_(max_completion_tokens=0), AUTH, 400, None, "max_completion_tokens"),
    ("max_tokens beyond the context", CHAT, with_(max_tokens=500), AUTH, 400, "context_length_exceeded",
     "max_tokens"),
    ("max_tokens a float", CHAT, with_(max_tokens=2.5), AUTH, 400, None, "max_tokens"),
    ("temperature < 0", CHAT, with_(temperature=-0.1), AUTH, 400, None, "temperature"),
    ("temperature > 2", CHAT, with_(temperature=2.5), AUTH, 400, None, "temperature"),
    ("temperature NaN", CHAT, with_(temperature=math.nan), AUTH, 400, None, "temperature"),
    ("temperature a string", CHAT, with_(temperature="hot"), AUTH, 400, None, "temperature"),
    ("top_p 0", CHAT, with_(top_p=0), AUTH, 400, None, "top_p"),
    ("n 0", CHAT, with_(n=0), AUTH, 400, None, "n"),
    ("ignore_eos string", CHAT, with_(ignore_eos="yes"), AUTH, 400, None, "ignore_eos"),
    ("stop not strings", CHAT, with_(stop=[1, 2]), AUTH, 400, None, "stop"),
    ("stream_options without stream", CHAT, with_(stream_options={"include_usage": True}), AUTH, 400, None, None),
    ("beam search asked for", CHAT, with_(use_beam_search=True), AUTH, 400, None, None),
    ("top_logprobs without logprobs", CHAT, with_(top_logprobs=2), AUTH, 400, None, None),
    ("chat prompt over the context", CHAT, with_(messages=chat(LONG)), AUTH, 400, "context_length_exceeded",
     "messages"),
    ("completion prompt over the context", COMPL, json.dumps({"model": "core", "prompt": LONG}).encode(), AUTH, 400,
     "context_length_exceeded", "prompt"),
    ("streamed prompt over the context", COMPL, json.dumps({"model": "core", "prompt": LONG, "stream": True}).encode(),
     AUTH, 400, "context_length_exceeded", "prompt"),
    ("missing prompt", COMPL, b'{"model": "core"}', AUTH, 400, None, "prompt"),
    ("token id out of the vocabulary", COMPL, b'{"model": "core", "prompt": [1, 2, 99999]}', AUTH, 400, None,
     "prompt"),
    ("token-id prompt with a negative id", COMPL, b'{"model": "core", "prompt": [1, -2]}', AUTH, 400, None, "prompt"),
    ("a list of prompts of mixed kinds", COMPL, b'{"model": "core", "prompt": ["a", [1]]}', AUTH, 400, None,
     "prompt"),
    ("logit_bias beyond the vocabulary", COMPL, b'{"model": "core", "prompt": "a", "logit_bias": {"99999": 1}}', AUTH,
     400, None, None),
    ("logprobs over 20", COMPL, b'{"model": "core", "prompt": "a", "logprobs": 21}', AUTH, 400, None, "logprobs"),
    ("no API key", CHAT, with_(), {}, 401, "invalid_api_key", None),
    ("wrong API key", CHAT, with_(), {"Authorization": "Bearer nope"}, 401, "invalid_api_key", None),
    ("wrong key on /v1/models", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, "invalid_api_key", None),
    ("oversized body", CHAT, with_(messages=chat("x" * (1 << 20))), AUTH, 413, "request_too_large", None),
    ("unknown route", "/v1/embeddings", with_(), AUTH, 404, "not_found", None),
    ("wrong method", "/v1/chat/completions", None, AUTH, 405, "method_not_allowed", None),
]


@pytest.mark.parametrize("name,path,body,headers,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_an_openai_error(live, name, path, body, headers, status, code, param):
    if body is None:
        r = httpx.get(live.url + path, headers=headers)
    else:
        r = httpx.post(live.url + path, content=body, headers={"Content-Type": "application/json", **headers},
                       timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) > 10
    assert err["type"] == "invalid_request_error" and err["code"] == code and err["param"] == param


def test_an_oversized_chunked_body_is_cut_off_with_413(live):
    def body():      # no Content-Length: the limit is enforced while reading
        yield b'{"model": "twin", "messages": [{"role": "user", "content": "'
        for _ in range(20):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(live.url + CHAT, content=body(), headers={"Content-Type": "application/json", **AUTH})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_the_server_is_healthy_after_bad_input(live):
    for _, path, body, headers, *_ in CASES:       # all of them again, then normal work
        if body is not None:
            httpx.post(live.url + path, content=body, headers={"Content-Type": "application/json", **headers})
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    res = OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0).chat.completions.create(**OK_CHAT)
    assert res.choices[0].finish_reason in ("stop", "length")
    assert live.server.backend.stats().inflight == 0
    metrics = httpx.get(live.url + "/metrics").text
    assert 'twinrt_errors_total{status="400"}' in metrics and 'twinrt_errors_total{status="401"}' in metrics
    assert "status=\"500\"" not in metrics


def test_unknown_valid_openai_fields_are_accepted(live):
    res = httpx.post(live.url + CHAT, headers=AUTH, json={
        **OK_CHAT, "metadata": {"k": "v"}, "store": False, "presence_penalty": 0, "frequency_penalty": 0.0,
        "logprobs": False, "parallel_tool_calls": True, "service_tier": "auto",
        "tool_choice": "none", "response_format": {"type": "text"}, "some_future_field": [1, 2]})
    assert res.status_code == 200, res.text
    assert res.json()["routing"]["router"] == "none"


def test_twin_without_a_router_uses_the_uniform_mix(live):
    res = OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0).completions.create(
        model="twin", prompt="5 + 7 =", max_tokens=2, temperature=0)
    r = res.model_extra["routing"]
    assert r["router"] == "none" and r["overridden"] is False and "rule" not in r
    assert r["weights"] == {"math": pytest.approx(1 / 3, abs=1e-6), "code": pytest.approx(1 / 3, abs=1e-6),
                            "chat": pytest.approx(1 / 3, abs=1e-6)}


def test_a_full_queue_answers_429(live):
    async def main():
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=60) as h:
            body = {"model": "core", "prompt": "hello", "max_tokens": 100, "temperature": 0}
            return await asyncio.gather(*(h.post(COMPL, json=body) for _ in range(10)))

    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 4 and codes.count(429) >= 1 and set(codes) == {200, 429}
    err = next(r for r in rs if r.status_code == 429)
    assert err.json()["error"]["type"] == "rate_limit_error" and err.json()["error"]["code"] == "queue_full"
    assert err.headers["retry-after"] == "1"
    assert live.server.backend.stats().inflight == 0


def test_the_openai_client_sees_a_401_as_authentication_error(live):
    with pytest.raises(AuthenticationError) as e:
        OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


def test_api_key_from_the_environment(tiny_artifact, monkeypatch):
    monkeypatch.setenv("TWINRT_API_KEY", "from-env")
    srv = build_server(ServeOptions(artifact=tiny_artifact, no_log=True))
    assert srv.api_key == "from-env"
