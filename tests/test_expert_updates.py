"""Expert updates on a running server (`--allow-expert-updates`): an expert added and another removed while
16 clients keep asking every arm. Every request succeeds or gets the documented 404; the untouched arms answer
token for token as before; a request running on the removed expert finishes on it; the new expert answers as
it does in a freshly started server; bad updates are refused with the artifact and the served set unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from helpers import KEY, chat, examples, start, write_jsonl
from serving.server import ServeOptions
from tiny import make_full_expert

PROMPTS = ["what is two plus three", "hello world", "def add(a, b):", "the capital of france is"]
ARMS = ["core", "expert:math", "expert:code", "twin"]
TOKENS = 10
LONG = 70  # the tiny model's context is 128 tokens


@pytest.fixture(scope="module")
def source(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A math + code artifact (experts far apart, a prototype router) and a third expert, chat, to add."""
    from router import TrainConfig, save_router, train_router
    from twinrt.artifact import Artifact
    from twinrt.config import parse_config
    from twinrt.split.run import split

    root = tmp_path_factory.mktemp("updates")
    for i, name in enumerate(("math", "code", "chat")):
        make_full_expert(tiny_models["base"], root / name, seed=100 + i, scale=0.5)
    cfg = parse_config({"base": str(tiny_models["base"]),
                        "experts": [{"name": n, "path": str(root / n)} for n in ("math", "code")],
                        "shared": {"method": "ties", "density": 0.5}, "exclusive": {"rank": 4}})
    split(cfg, root / "artifact")
    art = Artifact.open(root / "artifact")
    out = train_router(art, [ex for ex in examples(8, seed=0) if ex.label in art.experts],
                       TrainConfig(kind="prototype", holdout=0.0))
    save_router(out.router, art)
    data = write_jsonl(root / "chat.jsonl", [{"text": ex.input, "expert": ex.label}
                                             for ex in examples(8, seed=1) if ex.label == "chat"])
    return {"artifact": root / "artifact", "chat": root / "chat", "chat_data": data}


@pytest.fixture
def artifact(source, tmp_path) -> Path:
    return Path(shutil.copytree(source["artifact"], tmp_path / "artifact"))


def _client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def _ask(c: httpx.Client, model: str, prompt: str, max_tokens: int = TOKENS) -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": model, "messages": chat(prompt), "max_tokens": max_tokens,
                                                "temperature": 0, "ignore_eos": True})


def _text(r: httpx.Response) -> str:
    return r.json()["choices"][0]["message"]["content"]


def _answers(url: str, models: list[str]) -> dict[tuple[str, str], str]:
    with _client(url) as c:
        return {(m, p): _text(_ask(c, m, p)) for m in models for p in PROMPTS}


def _hammer(url: str, arms: list[str], results: list, stop: threading.Event, k: int) -> None:
    with _client(url) as c:
        i = k
        while not stop.is_set():
            model, prompt = arms[i % len(arms)], PROMPTS[(i // len(arms)) % len(PROMPTS)]
            r = _ask(c, model, prompt)
            results.append((model, prompt, r.status_code, r.json()))
            i += 1


def test_a_running_server_takes_an_added_and_a_removed_expert_under_16_clients(artifact, source):
    live = start(ServeOptions(artifact=artifact, api_key=KEY, allow_expert_updates=True, max_batch=8, no_log=True))
    try:
        url = live.url
        before = _answers(url, ["core", "expert:math", "expert:code"])
        assert any(before[("expert:math", p)] != before[("expert:code", p)] for p in PROMPTS)  # the arms differ
        assert any(before[("expert:math", p)] != before[("core", p)] for p in PROMPTS)

        results: list[tuple[str, str, int, dict]] = []
        stop = threading.Event()

        # a long request on the expert about to go: it must finish on that expert, token for token
        with _client(url) as admin:
            long_body = {"model": "expert:code", "messages": chat(PROMPTS[0]), "max_tokens": LONG, "temperature": 0,
                         "ignore_eos": True, "stream": True}
            want_long = _text(admin.post("/v1/chat/completions", json={**long_body, "stream": False}))
            threads = [threading.Thread(target=_hammer, args=(url, ARMS, results, stop, k)) for k in range(16)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            with admin.stream("POST", "/v1/chat/completions", json=long_body) as stream:
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))  # it runs now
                # hold the engine it runs in (and the clients' requests there) until the removal is done, so the
                # removal lands while it runs, however slow this machine is; the new sets run meanwhile
                old = live.server.backend._current
                real_step, gate = old.engine.step, threading.Event()

                def held_step():
                    if gate.is_set():
                        return real_step()
                    time.sleep(0.01)
                    return []

                old.engine.step = held_step
                try:
                    added = admin.post("/v1/experts", json={"name": "chat", "path": str(source["chat"]),
                                                            "router_data": str(source["chat_data"])})
                    assert added.status_code == 200, added.text
                    assert added.json()["experts"] == ["math", "code", "chat"]
                    removed = admin.delete("/v1/experts/code")
                    assert removed.status_code == 200, removed.text
                    assert removed.json()["experts"] == ["math", "chat"]
                    assert any(r.params.max_new_tokens == LONG and not r.done for r in old.engine.running)
                    gone = _ask(admin, "expert:code", PROMPTS[0])
                    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
                finally:
                    gate.set()
                rest = [first, *lines]
            got_long = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                               for line in rest if line.startswith("data: ") and line != "data: [DONE]"
                               and json.loads(line[6:]).get("choices"))
            assert got_long == want_long  # finished on the expert it started with
            done_at = len(results)
            deadline = time.monotonic() + 120
            while len(results) < done_at + 48 and time.monotonic() < deadline:  # the new set under load
                time.sleep(0.1)
            stop.set()
            for t in threads:
                t.join(60)

            models = {m["id"] for m in admin.get("/v1/models").json()["data"]}
            assert "expert:chat" in models and "expert:code" not in models
            listing = admin.get("/v1/experts").json()
            assert listing["experts"] == ["math", "chat"] and listing["updates"] == 2
            twin = _ask(admin, "twin", PROMPTS[0]).json()
            assert list(twin["routing"]["weights"]) == ["math", "chat"]
            after = {(m, p): _text(_ask(admin, m, p)) for m in ("core", "expert:math", "expert:chat") for p in PROMPTS}

        assert len(results) > 50
        for model, prompt, status, body in results:
            assert status in (200, 404), (model, status, body)
            if status == 404:  # only the removed expert, asked for once it was gone
                assert model == "expert:code" and body["error"]["code"] == "model_not_found", body
            elif model in ("core", "expert:math", "expert:code"):
                assert body["choices"][0]["message"]["content"] == before[(model, prompt)], (model, prompt)
        asked = {m for m, _, s, _ in results if s == 200}
        assert {"core", "expert:math", "expert:code", "twin"} <= asked
        assert any(s == 404 for *_, s, _ in results)  # clients did ask for it after it was removed
        for m in ("core", "expert:math"):
            assert all(after[(m, p)] == before[(m, p)] for p in PROMPTS)
    finally:
        live.stop()

    fresh = start(ServeOptions(artifact=artifact, api_key=KEY, max_batch=8, no_log=True))
    try:
        again = _answers(fresh.url, ["expert:chat", "core", "expert:math"])
    finally:
        fresh.stop()
    assert all(after[(m, p)] == again[(m, p)] for m in ("expert:chat", "core", "expert:math") for p in PROMPTS)
    assert any(again[("expert:chat", p)] != again[("expert:math", p)] for p in PROMPTS)


def test_bad_updates_are_refused_and_change_nothing(artifact, source, tmp_path):
    off = start(ServeOptions(artifact=artifact, api_key=KEY, no_log=True))
    try:
        with _client(off.url) as c:
            r = c.post("/v1/experts", json={"name": "chat", "path": str(source["chat"])})
            assert r.status_code == 403 and r.json()["error"]["code"] == "expert_updates_off"
            assert c.delete("/v1/experts/code").status_code == 403
            assert c.get("/v1/experts").json()["allowed"] is False
    finally:
        off.stop()

    live = start(ServeOptions(artifact=artifact, api_key=KEY, allow_expert_updates=True, no_log=True,
                              ab="expert:math=50,core=50"))
    state = (artifact / "twin.json").read_bytes()
    try:
        with _client(live.url) as c:
            assert httpx.post(live.url + "/v1/experts", json={"name": "x", "path": "y"}).status_code == 401
            cases = [
                (c.post("/v1/experts", json={"name": "math", "path": str(source["chat"]), "router_data":
                                             str(source["chat_data"])}), 400, "already in"),
                (c.post("/v1/experts", json={"name": "chat", "path": str(tmp_path / "nowhere"), "router_data":
                                             str(source["chat_data"])}), 400, "nowhere"),
                (c.post("/v1/experts", json={"name": "chat", "path": str(source["chat"])}), 400, "router_data"),
                (c.post("/v1/experts", json={"name": "chat", "path": str(source["chat"]), "color": 1}), 400, "color"),
                (c.post("/v1/experts", json={"name": "chat", "path": str(source["chat"]),
                                             "router_data": str(tmp_path / "none.jsonl")}), 400, "none.jsonl"),
                (c.delete("/v1/experts/legal"), 404, "legal"),
                (c.delete("/v1/experts/code?force=1"), 400, "force"),
                (c.delete("/v1/experts/math"), 409, "A/B alias"),
            ]
            for r, status, text in cases:
                assert r.status_code == status, (status, r.text)
                err = r.json()["error"]
                assert text in err["message"] and err["type"], r.text
            assert (artifact / "twin.json").read_bytes() == state  # nothing reached the artifact
            assert c.get("/v1/experts").json()["experts"] == ["math", "code"]
            assert _ask(c, "expert:code", PROMPTS[0]).status_code == 200

            # one update at a time: a second one while the first runs is a 409
            import twinrt.split.add as add_module

            gate, entered = threading.Event(), threading.Event()
            real = add_module.add_expert

            def slow_add(*a, **kw):
                entered.set()
                gate.wait(30)
                return real(*a, **kw)

            add_module.add_expert = slow_add
            try:
                first: list[httpx.Response] = []
                t = threading.Thread(target=lambda: first.append(c.post("/v1/experts", json={
                    "name": "chat", "path": str(source["chat"]), "router_data": str(source["chat_data"])})))
                t.start()
                assert entered.wait(30)
                with _client(live.url) as c2:
                    busy = c2.delete("/v1/experts/code")
                assert busy.status_code == 409 and busy.json()["error"]["code"] == "update_in_progress"
                gate.set()
                t.join(60)
            finally:
                add_module.add_expert = real
            assert first[0].status_code == 200 and first[0].json()["experts"] == ["math", "code", "chat"]
    finally:
        live.stop()


# ---- the vLLM backend ------------------------------------------------------------------------------------------


@pytest.mark.vllm
def test_the_vllm_backend_takes_an_added_and_a_removed_expert_under_16_clients(tmp_path):
    if os.environ.get("TWINRT_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    from serving.backends.base import GenerationRequest
    from serving.server import ThreadedServer, build_server
    from tiny import make_lora_artifact, make_lora_expert

    artifact = make_lora_artifact(tmp_path, ("math", "code"))
    make_lora_expert(tmp_path / "base", tmp_path / "chat-lora", tmp_path / "chat-merged", seed=42)
    live = ThreadedServer(build_server(ServeOptions(artifact=artifact, api_key=KEY, backend="vllm", no_log=True,
                                                    max_batch=8, allow_expert_updates=True)))
    live.start(timeout=600)
    try:
        url = live.url
        before = _answers(url, ["core", "expert:math", "expert:code"])
        assert any(before[("expert:math", p)] != before[("expert:code", p)] for p in PROMPTS)
        results: list = []
        stop = threading.Event()
        threads = [threading.Thread(target=_hammer, args=(url, ["core", "expert:math", "expert:code"], results,
                                                          stop, k)) for k in range(16)]
        for t in threads:
            t.start()
        with _client(url) as admin:
            time.sleep(1.0)
            added = admin.post("/v1/experts", json={"name": "chat", "path": str(tmp_path / "chat-lora")})
            assert added.status_code == 200, added.text
            removed = admin.delete("/v1/experts/code")
            assert removed.status_code == 200, removed.text
            done_at, deadline = len(results), time.monotonic() + 120
            while len(results) < done_at + 24 and time.monotonic() < deadline:  # the new set under load
                time.sleep(0.1)
            stop.set()
            for t in threads:
                t.join(120)
            assert {m["id"] for m in admin.get("/v1/models").json()["data"]} >= {"expert:chat"}
            assert "expert:code" not in {m["id"] for m in admin.get("/v1/models").json()["data"]}
            after = {(m, p): _text(_ask(admin, m, p)) for m in ("core", "expert:math") for p in PROMPTS}
        assert len(results) > 30
        for model, prompt, status, body in results:
            assert status in (200, 404), (model, status, body)
            if status == 404:
                assert model == "expert:code" and body["error"]["code"] == "model_not_found", body
            else:
                assert body["choices"][0]["message"]["content"] == before[(model, prompt)], (model, prompt)
        assert any(s == 404 for *_, s, _ in results) and all(after[k] == before[k] for k in after)
        # the new expert as vLLM serves it now equals it in a fresh server (twinrt's engine: the backends agree)
        reqs = [GenerationRequest(p, (0.0, 1.0), 12, temperature=0.0) for p in PROMPTS]
        backend = live.server.backend
        got = asyncio.run_coroutine_threadsafe(_generate(backend, reqs), backend.loop).result(300)
    finally:
        live.stop(timeout=60)
    fresh = ThreadedServer(build_server(ServeOptions(artifact=artifact, no_log=True, max_batch=8)))
    fresh.start(timeout=120)
    try:
        want = asyncio.run_coroutine_threadsafe(_generate(fresh.server.backend, reqs),
                                                fresh.server.backend._loop).result(300)
    finally:
        fresh.stop()
    assert fresh.server.experts == ["math", "chat"]
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


async def _generate(backend, requests):
    gens = [backend.submit(r) for r in requests]
    return [await g.wait() for g in gens]


def test_a_request_routed_just_before_a_removal(artifact):
    # both requests are routed over {math, code}, then held until `code` is removed: the twin is routed again
    # over the new set and answers; the request pinned to expert:code gets the documented 404
    live = start(ServeOptions(artifact=artifact, api_key=KEY, allow_expert_updates=True, no_log=True))
    try:
        routing = live.server.routing
        real, gate, routed = routing.decide, threading.Event(), []

        async def held(*a, **kw):
            decision = await real(*a, **kw)
            routed.append(decision)
            while not gate.is_set():
                await asyncio.sleep(0.01)
            return decision

        routing.decide = held
        answers: dict[str, httpx.Response] = {}
        prompt = "def add(a, b): return a + b"

        def ask(model: str) -> None:
            with _client(live.url) as c:
                answers[model] = _ask(c, model, prompt)

        threads = [threading.Thread(target=ask, args=(m,)) for m in ("twin", "expert:code")]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(routed) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(routed) == 2 and all(d.mix[1] > 0 for d in routed)  # both give `code` weight
        with _client(live.url) as c:
            assert c.delete("/v1/experts/code").status_code == 200
        gate.set()
        for t in threads:
            t.join(60)
        twin, pinned = answers["twin"], answers["expert:code"]
        assert twin.status_code == 200, twin.text
        assert list(twin.json()["routing"]["weights"]) == ["math"]
        assert pinned.status_code == 404 and pinned.json()["error"]["code"] == "model_not_found", pinned.text
    finally:
        live.stop()


def test_an_update_written_but_not_served_says_so_and_a_reload_serves_it(artifact, source):
    live = start(ServeOptions(artifact=artifact, api_key=KEY, allow_expert_updates=True, no_log=True))
    try:
        backend = live.server.backend
        real = backend.reload

        async def broken(path=None):
            raise RuntimeError("out of memory")

        backend.reload = broken
        with _client(live.url) as c:
            r = c.post("/v1/experts", json={"name": "chat", "path": str(source["chat"]),
                                            "router_data": str(source["chat_data"])})
            assert r.status_code == 500 and r.json()["error"]["code"] == "update_not_served", r.text
            assert "still serves math, code" in r.json()["error"]["message"]
            listing = c.get("/v1/experts").json()
            assert listing["experts"] == ["math", "code"] and listing["artifact_experts"] == ["math", "code", "chat"]
            assert _ask(c, "expert:code", PROMPTS[0]).status_code == 200  # the old set still serves
            backend.reload = real
            assert c.post("/v1/experts/reload", content=b'{"x": 1}').status_code == 400  # no body taken
            assert c.post("/v1/experts", json={"name": "x", "path": "y", "router_label_key": "task"}).status_code == 400
            r = c.post("/v1/experts/reload")
            assert r.status_code == 200 and r.json()["experts"] == ["math", "code", "chat"], r.text
            assert _ask(c, "expert:chat", PROMPTS[0]).status_code == 200
    finally:
        live.stop()


def test_an_update_waits_for_no_dead_engine(artifact):
    from serving.backends.base import EngineUnavailable
    from serving.backends.local import LocalBackend

    backend = LocalBackend.from_artifact(artifact)

    async def main() -> None:
        await backend.start()
        backend._dead = True  # what the worker's death sets
        with pytest.raises(EngineUnavailable):
            await asyncio.wait_for(backend.reload(), 30)
        backend._dead = False
        await backend.stop()

    asyncio.run(main())
