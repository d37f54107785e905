"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client.

One server for the module: the tiny artifact with a prototype MiniLM router, an API key and an A/B alias
`ab` = twin 50 / core 50. Greedy outputs are compared across endpoints, streaming, arms, overrides and
concurrency; the routing extension is checked against the router itself.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from openai import AsyncOpenAI, NotFoundError, OpenAI

from helpers import KEY, chat, start
from serving.routelog import read_log
from serving.server import ServeOptions

EXPERTS = ["math", "code", "chat"]
PROMPTS = ["what is two plus three", "hello world", "def add(a, b):", "the capital of france is",
           "5 + 7 =", "translate cat to french", "write a python function", "sum the numbers 1 2 3"]


@pytest.fixture(scope="module")
def live(routed_artifact, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "routing.jsonl"
    srv = start(ServeOptions(artifact=routed_artifact, api_key=KEY, ab="twin=50,core=50", log=log, max_batch=32))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live) -> OpenAI:
    return OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def greedy_chat(client: OpenAI, model: str, text: str, max_tokens: int = 8, **kw):
    return client.chat.completions.create(model=model, messages=chat(text), max_tokens=max_tokens, temperature=0,
                                          **kw)


def routing_of(obj) -> dict:
    return obj.model_extra["routing"]


# ---- endpoints, the routing extension, overrides ------------------------------------------------------------


@pytest.mark.parametrize("model", ["twin", "core", "expert:code"])
def test_chat_carries_routing_consistent_with_the_model(client, live, model):
    res = greedy_chat(client, model, PROMPTS[0])
    r = routing_of(res)
    assert res.object == "chat.completion" and res.model == model and len(res.choices) == 1
    assert r["arm"] == model and r["overridden"] is False and list(r["weights"]) == EXPERTS
    if model == "core":
        assert r["router"] == "none" and set(r["weights"].values()) == {0.0}
    elif model == "expert:code":
        assert r["router"] == "none" and r["weights"] == {"math": 0.0, "code": 1.0, "chat": 0.0}
    else:
        assert r["router"] == "prototype" and r["rule"] == "router" and 0 < r["confidence"] <= 1
        assert r["confidence"] == pytest.approx(max(r["weights"].values()), abs=1e-5)  # no top-k: weights = probs
        expect = live.server.routing.router.route([chat(PROMPTS[0])]).weights[0]
        torch.testing.assert_close(torch.tensor(list(r["weights"].values())), expect, atol=1e-5, rtol=0)
    tok = live.server.backend.tm.tokenizer
    ids = tok(tok.apply_chat_template(chat(PROMPTS[0]), tokenize=False, add_generation_prompt=True),
              add_special_tokens=False)["input_ids"]
    c = res.choices[0]
    assert res.usage.prompt_tokens == len(ids) and 1 <= res.usage.completion_tokens <= 8
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens
    assert c.finish_reason == ("length" if res.usage.completion_tokens == 8 else "stop")
    assert c.message.role == "assistant" and isinstance(c.message.content, str)


def test_arms_differ_and_overrides_are_honoured(client):
    text = {m: greedy_chat(client, m, PROMPTS[2], 10).choices[0].message.content
            for m in ["core", "expert:math", "expert:code", "expert:chat"]}
    assert len(set(text.values())) > 1          # the arms really run different mixes
    over = greedy_chat(client, "twin", PROMPTS[2], 10, extra_body={"routing": {"expert": "math"}})
    assert over.choices[0].message.content == text["expert:math"]
    assert routing_of(over) == {"arm": "twin", "weights": {"math": 1.0, "code": 0.0, "chat": 0.0},
                                "router": "override", "overridden": True}
    zero = greedy_chat(client, "expert:chat", PROMPTS[2], 10, extra_body={"routing": {"weights": {}}})
    assert zero.choices[0].message.content == text["core"]      # an all-zero mix is the core
    mixed = greedy_chat(client, "twin", PROMPTS[2], 10, extra_body={"routing": {"weights": {"math": 0.7, "code": 0.3}}})
    assert routing_of(mixed)["weights"] == {"math": 0.7, "code": 0.3, "chat": 0.0}
    again = client.completions.create(model="core", prompt="x", max_tokens=2, temperature=0,
                                      extra_body={"routing": {"weights": {"math": 0.7, "code": 0.3}}})
    assert routing_of(again)["overridden"] is True and routing_of(again)["arm"] == "core"


def test_completions_streaming_equals_whole(client):
    whole = client.completions.create(model="expert:math", prompt=PROMPTS[3], max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and routing_of(whole)["arm"] == "expert:math"
    chunks = list(client.completions.create(model="expert:math", prompt=PROMPTS[3], max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert routing_of(chunks[0]) == routing_of(whole)
    assert all("routing" not in (c.model_extra or {}) for c in chunks[1:])
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_chat_streaming_equals_whole_and_ends_with_done(client, live):
    whole = greedy_chat(client, "twin", PROMPTS[4], 12)
    chunks = list(client.chat.completions.create(model="twin", messages=chat(PROMPTS[4]), max_tokens=12,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and routing_of(chunks[0]) == routing_of(whole)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)
    raw = httpx.post(live.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "core", "messages": chat("hi"), "max_tokens": 3, "stream": True}).text
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_n_choices_seeds_and_stop(client):
    g = client.completions.create(model="core", prompt=PROMPTS[1], max_tokens=8, temperature=0, n=3)
    assert [c.index for c in g.choices] == [0, 1, 2] and len({c.text for c in g.choices}) == 1
    assert g.usage.completion_tokens == 3 * client.completions.create(
        model="core", prompt=PROMPTS[1], max_tokens=8, temperature=0).usage.completion_tokens
    s = client.completions.create(model="expert:chat", prompt=PROMPTS[1], max_tokens=8, temperature=1.0, n=3, seed=11)
    assert len({c.text for c in s.choices}) > 1
    for i in range(3):   # choice i samples with seed + i, whatever else shares the batch
        one = client.completions.create(model="expert:chat", prompt=PROMPTS[1], max_tokens=8, temperature=1.0,
                                        seed=11 + i)
        assert one.choices[0].text == s.choices[i].text
    full = g.choices[0].text
    assert len(full) > 3
    stopped = client.completions.create(model="core", prompt=PROMPTS[1], max_tokens=8, temperature=0,
                                        stop=[full[2:4], "zzzz"])
    assert stopped.choices[0].text == full[: full.find(full[2:4])] and stopped.choices[0].finish_reason == "stop"


def test_ignore_eos_decodes_past_the_end_of_sequence(client, live):
    ref = client.completions.create(model="core", prompt=PROMPTS[3], max_tokens=6, temperature=0)
    assert ref.usage.completion_tokens == 6 and ref.choices[0].finish_reason == "length"
    engine = live.server.backend.engine
    eos = engine.eos
    engine.eos = set(range(engine.tm.config.vocab_size))   # every token ends the sequence now
    try:
        stopped = client.completions.create(model="core", prompt=PROMPTS[3], max_tokens=6, temperature=0)
        kept = client.completions.create(model="core", prompt=PROMPTS[3], max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    finally:
        engine.eos = eos
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 0
    assert kept.choices[0].finish_reason == "length" and kept.choices[0].text == ref.choices[0].text


def test_models_lists_the_arms_and_the_ab_alias(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["twin", "core", "expert:math", "expert:code", "expert:chat", "ab"]
    ab = client.models.retrieve("ab")
    assert ab.model_extra["twinrt"] == {"kind": "ab", "arms": {"twin": 50.0, "core": 50.0}}
    with pytest.raises(NotFoundError) as e:
        client.models.retrieve("expert:poetry")
    assert e.value.body["code"] == "model_not_found"


def test_ab_alias_is_sticky_per_user_and_splits_traffic(client):
    arms = {}
    for u in range(24):
        seen = {routing_of(client.completions.create(model="ab", prompt="5 + 7 =", max_tokens=1, temperature=0,
                                                     user=f"user-{u}"))["arm"] for _ in range(2)}
        assert len(seen) == 1     # sticky
        arms[u] = seen.pop()
    assert set(arms.values()) == {"twin", "core"}
    res = client.completions.create(model="ab", prompt="5 + 7 =", max_tokens=1, temperature=0, user="user-3")
    assert res.model == "ab" and routing_of(res)["ab"] == "ab" and routing_of(res)["arm"] == arms[3]


# ---- concurrency, cancellation, log, metrics ----------------------------------------------------------------


def _mixed_requests() -> list[tuple[str, dict]]:
    """32 greedy requests over every arm, the A/B alias (sticky users), overrides, both endpoints."""
    models = ["twin", "core", "expert:math", "expert:code", "expert:chat", "ab", "twin", "core"]
    out = []
    for i in range(32):
        body = {"model": models[i % len(models)], "max_tokens": 4 + i % 9, "temperature": 0}
        if body["model"] == "ab":
            body["user"] = f"u{i}"
        if i % 7 == 3:
            body["extra_body"] = {"routing": {"weights": {"math": 0.5, "chat": 0.25}}}
        prompt = PROMPTS[i % len(PROMPTS)] + ("" if i < 16 else " please")
        out.append(("chat", {**body, "messages": chat(prompt)}) if i % 2
                   else ("completions", {**body, "prompt": prompt}))
    return out


async def _send(client: AsyncOpenAI, endpoint: str, body: dict) -> tuple[str, dict]:
    if endpoint == "chat":
        r = await client.chat.completions.create(**body)
        return r.choices[0].message.content, routing_of(r)
    r = await client.completions.create(**body)
    return r.choices[0].text, routing_of(r)


def test_32_concurrent_mixed_requests_equal_each_sent_alone(live):
    reqs = _mixed_requests()
    peak = 0

    async def main():
        client = AsyncOpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
        done = False

        async def watch():
            nonlocal peak
            while not done:
                peak = max(peak, live.server.backend.stats().running)
                await asyncio.sleep(0.002)

        w = asyncio.create_task(watch())
        together = await asyncio.gather(*(_send(client, e, b) for e, b in reqs))
        done = True
        await w
        alone = [await _send(client, e, b) for e, b in reqs]
        await client.close()
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone
    assert len({text for text, _ in together}) >= 24  # distinct outputs: a wrong mix or row would show
    assert peak >= 8                                  # they really shared batches
    assert {r["arm"] for _, r in together} == {"twin", "core", "expert:math", "expert:code", "expert:chat"}


def test_disconnected_stream_frees_its_row_and_is_logged(live):
    body = {"model": "core", "prompt": "hello", "max_tokens": 120, "temperature": 0, "stream": True,
            "user": "leaver"}
    with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}) as h:
        with h.stream("POST", live.url + "/v1/completions", json=body) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ") and "routing" in first
    deadline = time.time() + 10
    while live.server.backend.stats().inflight and time.time() < deadline:
        time.sleep(0.02)
    assert live.server.backend.stats().inflight == 0
    time.sleep(0.1)
    records, _ = read_log(live.server.log.path)
    rec = [r for r in records if r["user"] and r["stream"] and r["prompt_tokens"] and r["model"] == "core"
           and r["status"] == "cancelled"]
    assert rec and rec[-1]["completion_tokens"] < 120


def test_disconnected_whole_request_is_cancelled(live):
    body = {"model": "expert:math", "prompt": "hello", "max_tokens": 120, "temperature": 0, "user": "impatient"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.05)
    deadline = time.time() + 10
    while live.server.backend.stats().inflight and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    records, _ = read_log(live.server.log.path)
    rec = [r for r in records if r["model"] == "expert:math" and not r["stream"] and r["status"] == "cancelled"]
    assert rec and rec[-1]["completion_tokens"] < 120 and live.server.backend.stats().inflight == 0


def test_log_and_metrics_record_every_routed_request(client, live):
    before, _ = read_log(live.server.log.path)
    res = greedy_chat(client, "twin", PROMPTS[5], 5, user="alice")
    time.sleep(0.05)
    after, bad = read_log(live.server.log.path)
    assert bad == 0 and len(after) == len(before) + 1
    rec = after[-1]
    assert rec["id"] == res.id and rec["arm"] == "twin" and rec["router"] == "prototype" and rec["status"] == "ok"
    assert rec["weights"] == routing_of(res)["weights"] and rec["user"] != "alice" and len(rec["user"]) == 16
    assert rec["completion_tokens"] == res.usage.completion_tokens and rec["prompt_tokens"] == res.usage.prompt_tokens
    assert 0 < rec["ttft_s"] <= rec["latency_s"]
    text = httpx.get(live.url + "/metrics").text      # open without a key
    line = next(x for x in text.splitlines() if x.startswith('twinrt_requests_total{arm="twin",endpoint="chat'))
    assert float(line.split()[-1]) >= 1
    assert "twinrt_expert_weight_sum_total" in text and "twinrt_running" in text
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok" and health["router"] == "prototype" and health["experts"] == EXPERTS
    assert json.loads(json.dumps(health))  # plain JSON
