"""Logprobs, scoring and token-level fields of the HTTP API, live on the local backend, checked against the
runtime's own logits: chat logprobs, completions logprobs with echo, max_tokens 0, token-id prompts and lists
of prompts, streams whose first chunk carries text, /tokenize and /detokenize, and vLLM's request fields
(each one honoured or refused)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from openai import OpenAI

from helpers import KEY, chat, start
from serving.server import ServeOptions
from twinrt import TwinModel

EXPERTS = ["math", "code", "chat"]
AUTH = {"Authorization": f"Bearer {KEY}"}
ARMS = {"core": None, "expert:code": [0.0, 1.0, 0.0], "twin": [1 / 3, 1 / 3, 1 / 3]}  # no router: uniform


@pytest.fixture(scope="module")
def live(tiny_artifact):
    srv = start(ServeOptions(artifact=tiny_artifact, api_key=KEY, max_batch=16))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(live) -> OpenAI:
    return OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tm(tiny_artifact) -> TwinModel:
    return TwinModel.from_artifact(tiny_artifact)


def log_softmax(tm: TwinModel, ids: list[int], mix) -> torch.Tensor:
    """[T, V] log-probabilities of the next token at every position of `ids` under `mix`."""
    w = None if mix is None else torch.tensor([mix])
    with torch.no_grad():
        logits = tm.forward(torch.tensor([ids]), mix=w)[0].float()
    return torch.log_softmax(logits, dim=-1)


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + path, json=body, headers=AUTH, timeout=60)


def prompt_ids(live, text: str) -> list[int]:
    return post(live, "/tokenize", {"prompt": text}).json()["tokens"]


@pytest.mark.parametrize("arm", list(ARMS))
def test_completion_logprobs_with_echo_equal_the_runtimes(live, tm, arm):
    ids = prompt_ids(live, "the capital of france is")
    res = post(live, "/v1/completions", {"model": arm, "prompt": ids, "max_tokens": 4, "temperature": 0,
                                         "logprobs": 3, "echo": True, "ignore_eos": True, "return_token_ids": True})
    assert res.status_code == 200, res.text
    choice = res.json()["choices"][0]
    gen = choice["token_ids"]
    lp = log_softmax(tm, ids + gen, ARMS[arm])  # [T, V]
    got = choice["logprobs"]
    assert len(got["tokens"]) == len(ids) + len(gen) and got["token_logprobs"][0] is None
    for pos in range(1, len(ids) + len(gen)):
        token = (ids + gen)[pos]
        assert got["token_logprobs"][pos] == pytest.approx(float(lp[pos - 1, token]), abs=1e-4)
        top = torch.topk(lp[pos - 1], 3)
        assert max(got["top_logprobs"][pos].values()) == pytest.approx(float(top.values[0]), abs=1e-4)
    for pos, token in enumerate(gen):  # greedy: each generated token is the argmax after its prefix
        assert token == int(lp[len(ids) + pos - 1].argmax())
    assert choice["text"].startswith(tm.tokenizer.decode(ids))
    assert got["text_offset"] == sorted(got["text_offset"])


def test_chat_logprobs_equal_the_runtimes(live, tm, client):
    res = client.chat.completions.create(model="expert:math", messages=chat("hello world"), max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    ids = post(live, "/tokenize", {"messages": chat("hello world")}).json()["tokens"]
    gen = res.choices[0].model_extra["token_ids"]
    lp = log_softmax(tm, ids + gen, [1.0, 0.0, 0.0])  # expert:math
    content = res.choices[0].logprobs.content
    assert len(content) == len(gen) == 5
    for k, entry in enumerate(content):
        row = lp[len(ids) + k - 1]
        assert entry.logprob == pytest.approx(float(row[gen[k]]), abs=1e-4)
        assert entry.token == tm.tokenizer.decode([gen[k]])
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(float(row.max()), abs=1e-4)
        assert bytes(entry.bytes).decode("utf-8", "replace") or entry.token == ""


def test_scoring_many_prompts_with_max_tokens_zero(live, tm):
    texts = ["hello world", "5 + 7 = 12", "bonjour le monde"]
    ids = [prompt_ids(live, t) for t in texts]
    res = post(live, "/v1/completions", {"model": "core", "prompt": ids, "max_tokens": 0, "echo": True,
                                         "logprobs": 0, "n": 2, "temperature": 0})
    assert res.status_code == 200, res.text
    body = res.json()
    assert [c["index"] for c in body["choices"]] == list(range(6))
    assert body["usage"]["prompt_tokens"] == sum(map(len, ids)) and body["usage"]["completion_tokens"] == 0
    for c in body["choices"]:
        p = c["index"] // 2
        lp = log_softmax(tm, ids[p], None)
        assert c["text"] == tm.tokenizer.decode(ids[p]) and c["finish_reason"] == "length"
        want = [None] + [float(lp[i - 1, ids[p][i]]) for i in range(1, len(ids[p]))]
        assert c["logprobs"]["token_logprobs"] == pytest.approx(want, abs=1e-4)
        assert c["logprobs"]["top_logprobs"][1] == {c["logprobs"]["tokens"][1]: pytest.approx(want[1], abs=1e-4)}


def test_a_list_of_text_prompts_is_one_request_with_each_routed(live, client):
    res = client.completions.create(model="core", prompt=["hello world", "5 + 7 ="], max_tokens=3, temperature=0)
    alone = [client.completions.create(model="core", prompt=p, max_tokens=3, temperature=0).choices[0].text
             for p in ["hello world", "5 + 7 ="]]
    assert [c.text for c in res.choices] == alone
    assert res.choices[1].model_extra["routing"]["arm"] == "core"


def test_vllm_prompt_logprobs_field(live, tm):
    ids = prompt_ids(live, "hello world")
    res = post(live, "/v1/completions", {"model": "core", "prompt": ids, "max_tokens": 1, "temperature": 0,
                                         "prompt_logprobs": 2})
    entries = res.json()["choices"][0]["prompt_logprobs"]
    lp = log_softmax(tm, ids, None)
    assert entries[0] is None and len(entries) == len(ids)
    for i in range(1, len(ids)):
        assert entries[i][str(ids[i])]["logprob"] == pytest.approx(float(lp[i - 1, ids[i]]), abs=1e-4)
        assert entries[i][str(ids[i])]["rank"] == int((lp[i - 1] >= lp[i - 1, ids[i]]).sum())


def events(live, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", live.url + path, json={**body, "stream": True}, headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_the_first_chunk_carries_the_first_token(live):
    chunks = events(live, "/v1/chat/completions", {"model": "core", "messages": chat("hello world"),
                                                   "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    first = chunks[0]
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert first["choices"][0]["delta"]["content"] != ""
    assert "routing" in first
    chunks = events(live, "/v1/completions", {"model": "core", "prompt": "hello", "max_tokens": 4,
                                              "temperature": 0, "ignore_eos": True})
    assert chunks[0]["choices"][0]["text"] != ""


def test_continuous_usage_stats(live):
    """vLLM's stream_options.continuous_usage_stats (guidellm always sends it): every chunk's usage so far."""
    chunks = events(live, "/v1/chat/completions", {
        "model": "core", "messages": chat("hello world"), "max_tokens": 5, "temperature": 0, "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert all(c["usage"] is not None for c in chunks) and counts == sorted(counts)
    assert 0 < counts[0] and counts[-1] == 5 and chunks[-1]["choices"] == []


def test_streamed_logprobs_equal_the_whole_ones(live):
    body = {"model": "twin", "prompt": "5 + 7 =", "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 2, "echo": True}
    whole = post(live, "/v1/completions", body).json()["choices"][0]
    chunks = events(live, "/v1/completions", body)
    tokens, lps = [], []
    for c in chunks:
        for ch in c["choices"]:
            if ch.get("logprobs"):
                tokens += ch["logprobs"]["tokens"]
                lps += ch["logprobs"]["token_logprobs"]
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == whole["text"]
    assert tokens == whole["logprobs"]["tokens"]
    assert lps == pytest.approx(whole["logprobs"]["token_logprobs"], abs=1e-6)


def test_tokenize_and_detokenize(live, tm):
    res = post(live, "/tokenize", {"prompt": "hello world", "return_token_strs": True}).json()
    assert res["tokens"] == tm.tokenizer("hello world")["input_ids"] and res["count"] == len(res["tokens"])
    assert res["max_model_len"] == 128 and len(res["token_strs"]) == res["count"]
    chat_ids = post(live, "/tokenize", {"messages": chat("hi")}).json()
    usage = post(live, "/v1/chat/completions", {"model": "core", "messages": chat("hi"), "max_tokens": 1}).json()
    assert chat_ids["count"] == usage["usage"]["prompt_tokens"]
    assert post(live, "/detokenize", {"tokens": res["tokens"]}).json() == {"prompt": "hello world"}
    assert post(live, "/detokenize", {"tokens": [10**6]}).status_code == 400
    assert post(live, "/tokenize", {"prompt": "x", "model": "gpt-4"}).status_code == 404
    assert httpx.post(live.url + "/tokenize", json={"prompt": "x"}).status_code == 401


def test_token_id_prompts_out_of_the_vocabulary_are_refused(live):
    res = post(live, "/v1/completions", {"model": "core", "prompt": [1, 2, 10**6], "max_tokens": 1})
    assert res.status_code == 400 and res.json()["error"]["param"] == "prompt"


def vllm_fields(kind: str) -> dict:
    pytest.importorskip("vllm")
    if kind == "chat":
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as M
    else:
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest as M
    return dict(M.model_fields)


# a value unlike the field's default, for each field of vLLM's request models (the test fails on a new field)
NON_DEFAULT = {
    "frequency_penalty": 0.5, "presence_penalty": 0.5, "logit_bias": {"5": 1.0}, "logprobs": True, "top_logprobs": 2,
    "max_tokens": 3, "max_completion_tokens": 3, "n": 2, "response_format": {"type": "json_object"}, "seed": 3,
    "stop": ["zz"], "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5, "top_p": 0.9,
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "reasoning_effort": "low", "thinking_token_budget": 10, "include_reasoning": False,
    "parallel_tool_calls": False, "user": "u", "use_beam_search": True, "top_k": 5, "min_p": 0.1,
    "repetition_penalty": 1.2, "watermarking": {"x": 1}, "length_penalty": 2.0, "stop_token_ids": [5],
    "include_stop_str_in_output": True, "ignore_eos": True, "min_tokens": 1, "skip_special_tokens": False,
    "spaces_between_special_tokens": False, "truncate_prompt_tokens": 4, "truncation_side": "left",
    "prompt_logprobs": 1, "logprob_token_ids": [1], "allowed_token_ids": [1, 2], "bad_words": ["x"], "echo": True,
    "add_generation_prompt": False, "continue_final_message": True, "add_special_tokens": "flip",
    "documents": [{"a": "b"}], "chat_template": "{{ x }}", "chat_template_kwargs": {"a": 1},
    "media_io_kwargs": {"a": 1}, "mm_processor_kwargs": {"a": 1}, "structured_outputs": {"regex": "a+"},
    "priority": 1, "request_id": "abc", "session_id": "s", "return_tokens_as_token_ids": True,
    "return_token_ids": True, "routed_experts_prompt_start": 1, "return_token_offsets": True,
    "return_prompt_text": True, "mm_payload": "other", "return_mm_kwargs": True, "cache_salt": "s",
    "kv_transfer_params": {"a": 1}, "ec_transfer_params": {"a": 1}, "vllm_xargs": {"a": 1},
    "repetition_detection": {"a": 1}, "stream_interval": 2, "suffix": "x", "prompt_embeds": "AAAA",
}
HONOURED = {"frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs", "max_tokens",
            "max_completion_tokens", "n", "response_format", "seed", "stop", "stream", "stream_options",
            "temperature", "top_p", "tools", "tool_choice", "parallel_tool_calls", "user", "top_k", "min_p",
            "repetition_penalty", "stop_token_ids", "include_stop_str_in_output", "ignore_eos", "min_tokens",
            "prompt_logprobs", "structured_outputs", "request_id", "return_tokens_as_token_ids", "return_token_ids"}


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_every_vllm_field_is_honoured_or_refused(live, kind):
    base = ({"model": "core", "messages": chat("hi"), "max_tokens": 2} if kind == "chat"
            else {"model": "core", "prompt": "hi", "max_tokens": 2})
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    fields = vllm_fields(kind)
    for name in sorted(set(fields) - {"messages", "model", "prompt"}):
        assert name in NON_DEFAULT, f"vLLM has a request field {name!r} this test does not know"
        value = NON_DEFAULT[name]
        if name == "add_special_tokens":
            value = kind == "chat"  # the non-default value of each endpoint
        if name in ("echo", "logprobs") and kind == "completions":
            value = {"echo": True, "logprobs": 1}[name]
        if name == "tool_choice":
            body = {**base, "tools": NON_DEFAULT["tools"], name: value}
        elif name == "top_logprobs":
            body = {**base, "logprobs": True, name: value}
        elif name == "stream_options":
            body = {**base, "stream": True, name: value}
        else:
            body = {**base, name: value}
        res = post(live, path, body)
        honoured = name in HONOURED or (name == "echo" and kind == "completions")
        if kind == "completions" and name in ("tools", "tool_choice", "parallel_tool_calls"):
            honoured = False
        if honoured and name in ("tools", "tool_choice"):  # the tools prompt outgrows the tiny model's context
            assert res.status_code == 200 or res.json()["error"]["code"] == "context_length_exceeded", res.text
        elif honoured:
            assert res.status_code == 200, (name, res.text)
        else:
            assert res.status_code == 400, (name, res.status_code, res.text)
            assert name in res.json()["error"]["message"], (name, res.text)
