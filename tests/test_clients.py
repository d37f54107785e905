"""lm-evaluation-harness (`lm_eval.simple_evaluate`) against a live server, checked against the model itself.

For the arms twin, core and expert:code of the routed tiny artifact:

    local-completions       on twinrt_mc (multiple choice): every choice's score is the sum of its continuation
                            tokens' logprobs (/v1/completions, token-id prompt, echo, logprobs 1, max_tokens 1),
                            so the per-choice scores and `acc` must equal what the arm's logits give directly
    local-chat-completions  on twinrt_gen (generate_until): each response, and so `exact_match`, must equal the
                            greedy generation of the same arm (TwinModel.generate, same stop string and length)

and lm-eval's own parser on its own payload, with a logit bias that makes the model end right after the prompt:
vLLM's echo counts that end-of-sequence token, and lm-eval's slice relies on it.

The twin's mix is the router's, per request: lm-eval cannot send the `routing` override, so the test records
every request lm-eval posts with the response's `routing` and computes the twin's reference with that mix
(the weights as the server reports them, to 6 decimals).

On a random model the generation task's answers are never produced, so the test rewrites the targets of its
first docs to the core's greedy answers: exact_match is then 1 for core on those docs and the arms differ.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
import yaml

from helpers import start
from serving.server import ServeOptions
from twinrt import TwinModel

ROOT = Path(__file__).resolve().parents[1]
TASKS = Path(__file__).parent / "data" / "lmeval"  # task YAMLs (data_files relative to ROOT) and their JSONL
ARMS = ["twin", "core", "expert:code"]
REWRITTEN = 3  # generation docs whose target becomes the core's greedy answer


@dataclass(frozen=True)
class Exchange:
    body: dict[str, Any]
    status: int
    reply: Any  # the JSON body when 2xx, else the text


class Recorder:
    """Wraps requests.post (what lm-eval's API models post with when num_concurrent is 1) and keeps every
    request body with its response."""

    def __init__(self, post) -> None:
        self.post, self.log = post, []

    def __call__(self, url, *args, json=None, **kw):
        res = self.post(url, *args, json=json, **kw)
        self.log.append(Exchange(json, res.status_code, res.json() if res.ok else res.text))
        return res

    def routed(self, key: str, value: Any) -> Exchange:
        """The exchange whose request body has `key` == value."""
        found = [x for x in self.log if x.body.get(key) == value]
        assert found, f"lm-eval sent no request with {key}={value!r}; it sent {[x.body.get(key) for x in self.log]}"
        return found[-1]


@pytest.fixture(scope="module")
def live(routed_artifact):
    srv = start(ServeOptions(artifact=routed_artifact, no_log=True))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def tm(routed_artifact) -> TwinModel:
    return TwinModel.from_artifact(routed_artifact)


@pytest.fixture
def recorder(monkeypatch) -> Recorder:
    monkeypatch.chdir(ROOT)  # the tasks' data_files are relative to the repository root, as for the CLI
    rec = Recorder(requests.post)
    monkeypatch.setattr(requests, "post", rec)
    return rec


def evaluate(lm: str, arm: str, task: str | dict, live, art: Path, rec: Recorder) -> dict:
    """simple_evaluate over the live server, with the model_args docs/CLIENTS.md gives; a refused request fails
    the test with the server's answer."""
    import lm_eval  # here, not at the top: importing it costs seconds, which collecting the suite need not pay
    from lm_eval.tasks import TaskManager

    if lm == "local-completions":
        args = {"base_url": f"{live.url}/v1/completions", "tokenizer": str(art / "core"),
                "tokenizer_backend": "huggingface", "tokenized_requests": True}
    else:
        args = {"base_url": f"{live.url}/v1/chat/completions"}
    args |= {"model": arm, "max_retries": 1, "timeout": 60}
    try:
        return lm_eval.simple_evaluate(
            model=lm, model_args=args, tasks=[task], apply_chat_template=lm == "local-chat-completions",
            task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), log_samples=True,
            bootstrap_iters=0)
    except requests.HTTPError as e:
        bad = next((x for x in reversed(rec.log) if x.status >= 400), None)
        sent = json.dumps(bad.body if bad else None)[:600]
        pytest.fail(f"{lm} ({arm}): the server refused lm-eval's request: {e}\nresponse: "
                    f"{bad.reply if bad else '?'}\nrequest: {sent}", pytrace=False)


def mix_of(arm: str, tm: TwinModel, ex: Exchange) -> torch.Tensor | None:
    """[1, N] mix of the arm for that exchange (None = core): the twin's from the response's routing."""
    if arm == "core":
        return None
    if arm.startswith("expert:"):
        return torch.tensor([[1.0 if e == arm.split(":", 1)[1] else 0.0 for e in tm.experts]])
    weights = ex.reply["routing"]["weights"]
    return torch.tensor([[float(weights[e]) for e in tm.experts]])


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for a causal model: trailing spaces move to the continuation, the whole
    text is encoded and split at the context's length (no special tokens: add_bos_token is off)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def continuation_logprob(tm: TwinModel, ids: list[int], ctxlen: int, mix: torch.Tensor | None) -> float:
    """Σ_{i ≥ ctxlen} log p(ids[i] | ids[:i]) under the mix: what lm-eval sums from echoed token_logprobs."""
    logits = tm.forward(torch.tensor([ids]), mix=mix)[0].float()  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[i - 1, ids[i]] for i in range(ctxlen, len(ids))))


def docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arm", ARMS)
def test_local_completions_scores_choices_as_the_models_logits(arm, live, tm, routed_artifact, recorder):
    out = evaluate("local-completions", arm, "twinrt_mc", live, routed_artifact, recorder)
    samples = {s["doc_id"]: s for s in out["samples"]["twinrt_mc"]}
    hits = []
    for i, doc in enumerate(docs("mc")):
        ref = []
        for choice in doc["choices"]:
            ctx, cont = encode_pair(tm.tokenizer, doc["question"], " " + choice)  # target_delimiter " "
            ex = recorder.routed("prompt", [ctx + cont])
            ref.append(continuation_logprob(tm, ctx + cont, len(ctx), mix_of(arm, tm, ex)))
            lp = ex.reply["choices"][0]["logprobs"]  # echo: the prompt's entries ([0] null), then the new token's
            assert [len(lp[k]) for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")] == \
                [len(ctx + cont) + 1] * 4 and lp["token_logprobs"][0] is None
        got = [r[0][0] for r in samples[i]["resps"]]  # per choice: [(logprob, is_greedy)]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), atol=1e-4, rtol=1e-4)
        hits.append(float(max(range(len(ref)), key=ref.__getitem__) == doc["answer"]))
    assert out["results"]["twinrt_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_local_completions_scores_a_continuation_the_model_would_end_after(live, tm):
    """lm-eval sums token_logprobs[ctxlen:-1], taking the last entry for the one generated token; vLLM counts that
    token even when it is end-of-sequence. lm-eval's own payload, with a logit bias that makes the model end
    there (logprobs are of the raw logits, so the bias changes no score), parsed by lm-eval's own parser."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    doc = docs("mc")[0]
    ctx, cont = encode_pair(tm.tokenizer, doc["question"], " " + doc["choices"][0])
    body = {"model": "core", "prompt": [ctx + cont], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True, "logit_bias": {str(tm.tokenizer.eos_token_id): 100}}
    res = requests.post(f"{live.url}/v1/completions", json=body, timeout=60)
    assert res.status_code == 200, res.text
    lp = res.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(ctx + cont) + 1, "the end-of-sequence token is missing from the logprobs"
    [(score, _)] = LocalCompletionsAPI.parse_logprobs(res.json(), tokens=[ctx + cont], ctxlens=[len(ctx)])
    assert score == pytest.approx(continuation_logprob(tm, ctx + cont, len(ctx), None), abs=1e-4)


@pytest.fixture(scope="module")
def gen_task(tm, tmp_path_factory) -> dict:
    """twinrt_gen as a config dict whose first REWRITTEN targets are the core's greedy answers."""
    cfg = yaml.safe_load((TASKS / "twinrt_gen.yaml").read_text())
    rows = docs("gen")
    for row in rows[:REWRITTEN]:
        row["answer"] = greedy(tm, row["question"], None, cfg["generation_kwargs"])
    path = tmp_path_factory.mktemp("lmeval") / "gen.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg["dataset_kwargs"]["data_files"] = {"test": str(path)}
    return cfg


def greedy(tm: TwinModel, question: str, mix: torch.Tensor | None, gen: dict) -> str:
    return tm.generate([[{"role": "user", "content": question}]], mix=mix, max_new_tokens=gen["max_gen_toks"],
                       stop=gen["until"])[0]


@pytest.mark.parametrize("arm", ARMS)
def test_local_chat_completions_generates_as_greedy_generation(arm, live, tm, routed_artifact, recorder, gen_task):
    out = evaluate("local-chat-completions", arm, gen_task, live, routed_artifact, recorder)
    samples = {s["doc_id"]: s for s in out["samples"]["twinrt_gen"]}
    rows = [json.loads(line) for line in Path(gen_task["dataset_kwargs"]["data_files"]["test"]).read_text()
            .splitlines()]
    hits = []
    for i, row in enumerate(rows):
        messages = [{"role": "user", "content": row["question"]}]
        ex = recorder.routed("messages", messages)
        ref = greedy(tm, row["question"], mix_of(arm, tm, ex), gen_task["generation_kwargs"])
        assert samples[i]["filtered_resps"][0] == ref, (i, row["question"])
        hits.append(float(ref.lower() == row["answer"].lower()))  # exact_match with ignore_case
    assert out["results"]["twinrt_gen"]["exact_match,none"] == pytest.approx(sum(hits) / len(hits))
    if arm == "core":
        assert sum(hits) >= REWRITTEN
