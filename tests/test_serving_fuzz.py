"""Property-based fuzzing of both completion endpoints (hypothesis): bodies built from the request models'
fields with valid, extreme and ill-typed values, lone surrogates and unknown keys. Whatever the body, the
server answers below 500 (an OpenAI-shaped error for 4xx, a stream that ends in `data: [DONE]`), no request
hangs, and the server is healthy and serving afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import KEY, start
from serving.server import ServeOptions

AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
EXAMPLES = 120  # per endpoint; bounded so the default test run stays short
REQUEST_TIMEOUT_S = 60

texts = st.one_of(st.text(max_size=24), st.sampled_from(["\ud800", "a\udfffb", "", " ", "<|im_end|>", "\x00"]))
numbers = st.one_of(st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 2, 1e-300, 1e-46, 1e-5, 1e30, 1e39, 2**63, 2**64, -0.0]))
junk = st.recursive(st.none() | st.booleans() | numbers | texts,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                    max_leaves=6)
experts = st.sampled_from(["math", "code", "chat", "poetry", "\ud800"])
routing = st.one_of(st.fixed_dictionaries({"weights": st.dictionaries(experts, numbers | junk, max_size=4)}),
                    st.fixed_dictionaries({"expert": experts | junk}), junk)
roles = st.sampled_from(["system", "developer", "user", "assistant", "tool", "wizard"])
message = st.one_of(st.fixed_dictionaries({"role": roles, "content": texts | st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=2) | junk}), junk)
models = st.sampled_from(["twin", "core", "expert:math", "expert:chat", "ab"])
valid_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                 "content": texts}), min_size=1, max_size=2)
common = {
    "max_tokens": st.integers(-2, 40) | junk,
    "temperature": numbers | junk,
    "top_p": numbers | junk,
    "n": st.integers(-1, 20) | junk,
    "stop": texts | st.lists(texts, max_size=3) | junk,
    "seed": numbers | junk,
    "user": texts | junk,
    "stream": st.booleans() | junk,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | junk,
    "ignore_eos": st.booleans() | junk,
    "routing": routing,
    "logprobs": st.booleans() | junk,
    "some_new_field": junk,
}


def bodies(required: dict, extra: dict) -> st.SearchStrategy[dict]:
    """Mostly well-formed bodies (so that fuzzing reaches routing and generation), with any field junk."""
    return st.fixed_dictionaries(required, optional={**common, **extra})


chat_bodies = bodies({"model": models | junk, "messages": valid_messages | st.lists(message, max_size=3) | junk},
                     {"max_completion_tokens": st.integers(-1, 40)})
completion_bodies = bodies({"model": models | junk,
                            "prompt": texts | st.lists(texts | st.integers(0, 400), max_size=3) | junk}, {})


@pytest.fixture(scope="module")
def live(routed_artifact):
    srv = start(ServeOptions(artifact=routed_artifact, api_key=KEY, ab="twin=50,core=50", no_log=True, max_batch=4,
                             max_queue=12))
    yield srv
    srv.stop()


def check(url: str, path: str, body: dict) -> None:
    raw = json.dumps(body, allow_nan=True).encode()
    with httpx.Client(base_url=url, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as h:
        with h.stream("POST", path, content=raw) as r:
            content = r.read()
    assert r.status_code < 500, content[:500]
    if r.status_code >= 400:
        err = json.loads(content)["error"]
        assert set(err) == {"message", "type", "param", "code"}
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert content.rstrip().endswith(b"data: [DONE]"), content[-300:]
    else:
        assert json.loads(content)["choices"]


SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@SETTINGS
@given(body=chat_bodies)
def test_chat_completions_never_answer_5xx(live, body):
    check(live.url, "/v1/chat/completions", body)


@SETTINGS
@given(body=completion_bodies)
def test_completions_never_answer_5xx(live, body):
    check(live.url, "/v1/completions", body)


def test_the_server_is_healthy_after_fuzzing(live):
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    r = httpx.post(live.url + "/v1/completions", headers=AUTH, timeout=30,
                   content=json.dumps({"model": "twin", "prompt": "hello", "max_tokens": 3}).encode())
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    assert live.server.backend.stats().inflight == 0
    assert 'status="500"' not in httpx.get(live.url + "/metrics").text
