"""The serving package's pure parts: arms and A/B splits, request schemas, the routing log and `ab report`,
the local backend's cancel path, and the serve/ab command lines."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
from pydantic import ValidationError

from serving.abreport import percentile, summarize
from serving.arms import ArmTable, UnknownModel, parse_ab, parse_arm, pick_by_point, sticky_point
from serving.cli import main as serving_main
from serving.routelog import LOG_FIELDS, RouteLog, read_log, user_hash
from serving.routing import OverrideError, override_mix
from serving.schemas import ChatCompletionRequest, CompletionRequest, RoutingOverride
from twinrt.artifact import Artifact
from twinrt.errors import TwinError

EXPERTS = ["math", "code", "chat"]


# ---- arms and A/B ---------------------------------------------------------------------------------------------


def test_parse_arm() -> None:
    assert parse_arm("twin", EXPERTS).kind == "twin"
    assert parse_arm("core", EXPERTS).kind == "core"
    arm = parse_arm("expert:code", EXPERTS)
    assert (arm.kind, arm.expert, arm.name) == ("expert", "code", "expert:code")
    for bad in ["expert:", "expert:poetry", "math", "Twin", ""]:
        with pytest.raises(UnknownModel, match="Available: twin, core, expert:math"):
            parse_arm(bad, EXPERTS)


@pytest.mark.parametrize("spec,message", [
    ("twin=50", "at least two arms"),
    ("twin=50,core", "ARM=WEIGHT"),
    ("twin=50,gpt=50", "unknown arm 'gpt'"),
    ("twin=50,core=-1", "positive number"),
    ("twin=50,core=nan", "positive number"),
    ("twin=50,core=inf", "positive number"),
    ("twin=50,twin=20", "listed twice"),
    ("=1,core=1", "ARM=WEIGHT"),
])
def test_parse_ab_refuses_bad_specs(spec, message) -> None:
    with pytest.raises(TwinError, match=message):
        parse_ab(spec, EXPERTS)


def test_parse_ab_refuses_arm_names_as_alias() -> None:
    for name in ["twin", "core", "expert:math", "expert:x", "bad name"]:
        with pytest.raises(TwinError, match="--ab-name"):
            parse_ab("twin=1,core=1", EXPERTS, name)


def test_ab_split_is_sticky_and_follows_the_weights() -> None:
    split = parse_ab("twin=30, expert:math=70", EXPERTS, "exp1")
    assert [a.name for a in split.arms] == ["twin", "expert:math"] and split.weights == (30.0, 70.0)
    rng = random.Random(0)
    picks = [split.pick(f"user{i}", rng).name for i in range(4000)]
    assert picks == [split.pick(f"user{i}", random.Random(i)).name for i in range(4000)]   # no rng involved
    assert 0.27 < picks.count("twin") / 4000 < 0.33
    anonymous = [split.pick(None, rng).name for _ in range(4000)]
    assert 0.27 < anonymous.count("twin") / 4000 < 0.33
    assert sticky_point("a", "u") != sticky_point("b", "u")     # each alias splits users independently


def test_pick_by_point_slices_in_order() -> None:
    arms = [parse_arm(n, EXPERTS) for n in ("twin", "core", "expert:chat")]
    assert [pick_by_point(arms, [1, 2, 1], p).name for p in (0.0, 0.249, 0.25, 0.74, 0.75, 0.9999)] == \
        ["twin", "twin", "core", "core", "expert:chat", "expert:chat"]


def test_arm_table_lists_and_resolves() -> None:
    table = ArmTable(EXPERTS, [parse_ab("twin=1,core=1", EXPERTS, "ab")], seed=0)
    assert table.model_ids() == ["twin", "core", "expert:math", "expert:code", "expert:chat", "ab"]
    arm, split = table.resolve("ab", "someone")
    assert split is not None and split.name == "ab" and arm.name in ("twin", "core")
    assert table.resolve("expert:chat") == (parse_arm("expert:chat", EXPERTS), None)
    with pytest.raises(UnknownModel, match="expert:chat, ab"):
        table.resolve("gpt-4")


# ---- schemas and overrides ------------------------------------------------------------------------------------


def test_chat_request_normalises_messages_and_budget() -> None:
    req = ChatCompletionRequest.model_validate({
        "model": "twin", "max_tokens": 9, "max_completion_tokens": 5, "stop": "##",
        "messages": [{"role": "developer", "content": "terse"},
                     {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": None, "tool_calls": []}]})
    assert req.chat() == ({"role": "system", "content": "terse"}, {"role": "user", "content": "a\nb"},
                          {"role": "assistant", "content": ""})
    assert req.max_completion() == 5 and req.stops() == ("##",) and req.n == 1 and not req.include_usage()
    assert ChatCompletionRequest(model="t", messages=[{"role": "user", "content": "x"}]).max_completion() is None
    assert CompletionRequest(model="t", prompt=["only one"]).prompt == ("only one",)
    assert CompletionRequest(model="t", prompt=[[1, 2], [3]]).prompt == ((1, 2), (3,))
    assert CompletionRequest(model="t", prompt="x").max_completion() == 16          # the OpenAI default
    assert CompletionRequest(model="t", prompt="x", stop=["", "a"]).stops() == ("a",)


@pytest.mark.parametrize("field,value", [("best_of", 3), ("use_beam_search", True), ("reasoning_effort", "low"),
                                         ("chat_template", "{{ x }}"), ("echo", True), ("length_penalty", True),
                                         ("skip_special_tokens", False), ("add_special_tokens", True)])
def test_unsupported_fields_are_refused_unless_neutral(field, value) -> None:
    base = {"model": "t", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(ValidationError, match=f"'{field}' is not supported"):
        ChatCompletionRequest.model_validate({**base, field: value})


def test_routing_override() -> None:
    assert override_mix(RoutingOverride(expert="code"), EXPERTS) == (0.0, 1.0, 0.0)
    assert override_mix(RoutingOverride(weights={"chat": 0.25, "math": 2.0}), EXPERTS) == (2.0, 0.0, 0.25)
    assert override_mix(RoutingOverride(weights={}), EXPERTS) == (0.0, 0.0, 0.0)
    with pytest.raises(OverrideError, match="unknown expert 'poetry'") as e:
        override_mix(RoutingOverride(weights={"poetry": 1.0}), EXPERTS)
    assert e.value.param == "routing.weights"
    for bad in [{}, {"expert": "math", "weights": {}}, {"weights": {"math": -1}}, {"weights": {"math": float("inf")}},
                {"weights": {"math": True}}, {"expert": "math", "top_k": 1}]:
        with pytest.raises(ValidationError):
            RoutingOverride.model_validate(bad)


# ---- the routing log and `ab report` --------------------------------------------------------------------------


def record(arm: str, latency: float, tokens: int, weights: dict[str, float], status: str = "ok") -> dict:
    return {"ts": 1.0, "id": "x", "endpoint": "completions", "model": arm, "arm": arm, "ab": None, "user": None,
            "router": "none", "rule": None, "overridden": False, "weights": weights, "n": 1, "stream": False,
            "status": status, "finish_reasons": ["stop"], "prompt_tokens": 3, "completion_tokens": tokens,
            "latency_s": latency, "ttft_s": latency / 4}


def test_percentile_interpolates() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 90) == 90
    assert percentile([10, 0], 0) == 0 and percentile([10, 0], 100) == 10


def test_summarize_per_arm() -> None:
    rs = [record("twin", 1.0, 10, {"math": 0.8, "code": 0.2}), record("twin", 3.0, 30, {"math": 0.4, "code": 0.6}),
          record("core", 2.0, 10, {"math": 0.0, "code": 0.0}), record("twin", 9.0, 1, {"math": 1}, "cancelled"),
          record("core", 9.0, 1, {"math": 0}, "error")]
    twin, core = summarize(rs)
    assert (twin.arm, twin.requests, twin.cancelled, twin.errors) == ("twin", 2, 1, 0)
    assert twin.latency_p50 == 2.0 and twin.tokens_per_s == pytest.approx(40 / 4.0)
    assert twin.mean_weights == pytest.approx({"math": 0.6, "code": 0.4}) and twin.ttft_p50 == 0.5
    assert (core.requests, core.errors, core.latency_p99, core.mean_weights) == (1, 1, 2.0, {"math": 0.0, "code": 0.0})


def test_the_report_counts_unsure_routing_per_arm(tmp_path, capsys) -> None:
    def routed(arm: str, confidence: float | None, rule: str | None = "router") -> dict:
        return {**record(arm, 1.0, 4, {"math": 1.0}), "rule": rule, "confidence": confidence}

    rs = [routed("twin", 0.99), routed("twin", 0.6), routed("twin", 0.95, "fallback"), routed("twin", 0.89),
          routed("core", None, None), routed("ab-twin", 0.91)]
    twin, core, other = summarize(rs)  # below 0.7, or fell back
    assert (twin.routed, twin.unsure) == (4, 2) and (core.routed, core.unsure) == (0, 0)
    assert (other.routed, other.unsure) == (1, 0)
    twin, _, other = summarize(rs, unsure_below=0.95)
    assert (twin.unsure, other.unsure) == (3, 1)  # 0.95 itself is sure; the fallback row is unsure whatever it says
    log = RouteLog(tmp_path / "r.jsonl")
    for r in rs:
        log.write(r)
    log.close()
    assert serving_main(["ab", "report", str(tmp_path / "r.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "router unsure" in out and "2/4 (50.0%)" in out
    assert serving_main(["ab", "report", str(tmp_path / "r.jsonl"), "--unsure", "0"]) == 2


def test_route_log_round_trip_and_ab_report_cli(tmp_path, capsys) -> None:
    log = RouteLog(tmp_path / "logs" / "r.jsonl")
    for i in range(12):
        log.write(record(["twin", "core", "expert:math"][i % 3], 0.1 * (i + 1), 5 + i,
                         {"math": i / 12, "code": 1 - i / 12, "chat": 0.0}))
    log.close()
    with (tmp_path / "logs" / "r.jsonl").open("a") as f:
        f.write('{"cut short by a cra')
    records, bad = read_log(tmp_path / "logs" / "r.jsonl")
    assert len(records) == 12 and bad == 1 and list(records[0]) == list(LOG_FIELDS)
    assert serving_main(["ab", "report", str(tmp_path / "logs" / "r.jsonl"), "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "twin" in out and "expert:math" in out and "w[code]" in out and "skipped 1" in out
    png = (tmp_path / "logs" / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    summary = json.loads((tmp_path / "s.json").read_text())["arms"]
    assert [s["arm"] for s in summary] == ["twin", "core", "expert:math"] and summary[0]["requests"] == 4
    assert serving_main(["ab", "report", str(tmp_path / "missing.jsonl")]) == 2
    assert user_hash("alice") == user_hash("alice") != user_hash("bob") and user_hash(None) is None


# ---- the local backend and the command line -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tm(tiny_artifact):
    from twinrt.runtime import TwinModel

    return TwinModel.from_artifact(tiny_artifact)


def test_local_backend_cancel_frees_the_row_and_checks_the_context(tm) -> None:
    from serving.backends.base import GenerationRequest, PromptError, QueueFull
    from serving.backends.local import LocalBackend

    async def main():
        backend = LocalBackend(tm, max_batch=1, max_queue=1, materialize=False)
        await backend.start()
        try:
            long = backend.submit(GenerationRequest("hello world", None, max_tokens=100))
            waiting = backend.submit(GenerationRequest("hello", (1.0, 0.0, 0.0), max_tokens=100))
            with pytest.raises(QueueFull):
                backend.submit(GenerationRequest("x", None, max_tokens=1))
            assert (await long.admitted()).prompt_tokens == len(tm.tokenizer("hello world")["input_ids"])
            await waiting.admitted()
            async for _ in long:
                break
            long.cancel()
            waiting.cancel()                      # still queued behind `long`: leaves without a prefill
            await long.closed()
            await waiting.closed()
            assert long.result.finish_reason == "cancelled" and long.result.completion_tokens < 100
            assert waiting.result.finish_reason == "cancelled" and waiting.result.completion_tokens == 0
            assert backend.stats().inflight == 0
            over = backend.submit(GenerationRequest("hello", None, max_tokens=backend.context))
            with pytest.raises(PromptError, match="maximum context length is 128") as e:
                await over.admitted()
            assert e.value.param == "max_tokens" and e.value.code == "context_length_exceeded"
            fits = backend.submit(GenerationRequest("hello", None, max_tokens=None))   # None: up to the context
            admitted = await fits.admitted()
            assert admitted.max_tokens == backend.context - admitted.prompt_tokens
            fits.cancel()
            await fits.closed()
        finally:
            await backend.stop()

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_backend_recovers(tm) -> None:
    from serving.backends.base import BackendFailure, GenerationRequest
    from serving.backends.local import LocalBackend

    async def main():
        backend = LocalBackend(tm, max_batch=4, max_queue=4, materialize=False)
        real_step = backend.engine.step

        def broken_step():          # the real engine, whose step raises once (a device error, say)
            real_step()
            raise RuntimeError("device lost")

        backend.engine.step = broken_step
        await backend.start()
        try:
            doomed = backend.submit(GenerationRequest("hello", None, max_tokens=20))
            with pytest.raises(BackendFailure, match=r"step failed \(RuntimeError\)"):
                await doomed.wait()
            ok = backend.submit(GenerationRequest("hello", (0.0, 1.0, 0.0), max_tokens=5))   # a fresh engine
            assert (await ok.wait()).completion_tokens == 5
            assert backend.stats().inflight == 0
        finally:
            await backend.stop()

    asyncio.run(main())


def test_serve_cli_reports_bad_options_as_one_line(tiny_artifact, tmp_path, capsys) -> None:
    assert serving_main(["serve", str(tiny_artifact), "--ab", "twin=1,gpt=1", "--no-log"]) == 2
    assert "unknown arm 'gpt'" in capsys.readouterr().err
    assert serving_main(["serve", str(tiny_artifact), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    assert serving_main(["serve", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert serving_main(["serve", str(tiny_artifact), "--backend", "vllm", "--no-log"]) == 2
    # full fine-tuned experts carry dense deltas (norms, embeddings) that vLLM LoRA adapters cannot apply
    assert "dense deltas" in capsys.readouterr().err


def test_serve_flags_are_derived_from_serve_options() -> None:
    import argparse

    from serving.options import ServeOptions, add_arguments, from_args

    p = argparse.ArgumentParser(prog="serve")
    add_arguments(p)
    flags = {f for a in p._actions for f in a.option_strings}
    assert flags >= {"--host", "--port", "--backend", "--api-key", "--api-key-file", "--ab", "--ab-name",
                     "--ab-seed", "--max-batch", "--max-queue", "--dtype", "--device", "--log", "--no-log",
                     "--no-router", "--no-materialize", "--max-body-bytes", "--request-timeout", "--drain-timeout",
                     "--max-step-tokens", "--long-prefill-share", "--tensor-parallel-size",
                     "--gpu-memory-utilization", "--max-loras", "--max-cpu-loras", "--max-lora-rank",
                     "--max-model-len", "--kv-cache-gib", "--mix-top-k", "--mix-step", "--adapter-cache",
                     "--vllm-arg"}
    assert "vllm backend" in p.format_help()
    assert all(a.help for a in p._actions)  # every option has help text
    assert from_args(p.parse_args(["art"])) == ServeOptions(artifact="art")  # the flags' defaults are the fields'
    opts = from_args(p.parse_args(["art", "--request-timeout", "0", "--vllm-arg", "a=1", "--vllm-arg", "b=2",
                                   "--no-router", "--no-log", "--dtype", "bfloat16", "--mix-step", "0.1"]))
    assert (opts.request_timeout, opts.vllm_args, opts.router, opts.no_log, opts.dtype, opts.mix_step) == \
        (None, ("a=1", "b=2"), False, True, "bfloat16", 0.1)
    for bad in (["--dtype", "float64"], ["--backend", "tpu"], ["--port", "x"]):
        with pytest.raises(SystemExit):
            p.parse_args(["art", *bad])
    with pytest.raises(TwinError, match="^--max-batch: Input should be greater than or equal to 1$"):
        from_args(p.parse_args(["art", "--max-batch", "0"]))
    with pytest.raises(TwinError, match="^--api-key: an empty API key would serve without authentication"):
        from_args(p.parse_args(["art", "--api-key", " "]))


# ---- the demo's build steps -----------------------------------------------------------------------------------


def test_demo_finds_adapters_and_notices_when_they_change(tiny_models, tmp_path) -> None:
    import shutil

    from serving.demo import demo_experts, router_examples, stale_reason
    from twinrt.config import parse_config
    from twinrt.split.run import split

    lora = tmp_path / "lora"
    with pytest.raises(TwinError, match="no demo experts yet"):
        demo_experts(lora)
    for name, src in (("alpha", "lora_a"), ("beta", "lora_b")):
        shutil.copytree(tiny_models[src], lora / name)
    (lora / "not_an_adapter").mkdir()
    assert demo_experts(lora) == ["alpha", "beta"]
    cfg = parse_config({"base": str(tiny_models["base"]), "shared": {"method": "task_arithmetic"},
                        "experts": [{"name": n, "path": str(lora / n)} for n in ("alpha", "beta")],
                        "exclusive": {"rank": 4}})
    split(cfg, tmp_path / "art")
    assert stale_reason(tmp_path / "art", lora) is None
    shutil.copytree(tiny_models["lora_a"], lora / "gamma")
    assert "differ from the experts now present" in stale_reason(tmp_path / "art", lora)
    shutil.rmtree(lora / "gamma")
    with (lora / "beta" / "adapter_config.json").open("a") as f:    # retrained: any byte differs
        f.write("\n")
    assert stale_reason(tmp_path / "art", lora) == "the expert 'beta' changed since it was built"

    full = tmp_path / "full"   # full fine-tuned checkpoints are experts too; their fingerprint is the split's
    for name in EXPERTS[:2]:
        shutil.copytree(tiny_models[name], full / name)
    (full / "empty").mkdir()
    assert demo_experts(full) == sorted(EXPERTS[:2])
    cfg = parse_config({"base": str(tiny_models["base"]), "shared": {"method": "task_arithmetic"},
                        "experts": [{"name": n, "path": str(full / n)} for n in EXPERTS[:2]],
                        "exclusive": {"rank": 4}})
    split(cfg, tmp_path / "art_full")
    assert stale_reason(tmp_path / "art_full", full) is None
    with (full / EXPERTS[0] / "config.json").open("a") as f:
        f.write("\n")
    assert stale_reason(tmp_path / "art_full", full) == f"the expert {EXPERTS[0]!r} changed since it was built"

    tasks = tmp_path / "tasks"
    for name in ("alpha", "beta"):
        (tasks / name).mkdir(parents=True)
        (tasks / name / "train.jsonl").write_text("".join(
            json.dumps({"task": name, "messages": [{"role": "user", "content": f"{name} question {i}"}],
                        "answer": "x"}) + "\n" for i in range(5)))
    got = router_examples(["alpha", "beta"], per_task=3, tasks_dir=tasks)
    assert [e.label for e in got] == ["alpha"] * 3 + ["beta"] * 3
    with pytest.raises(TwinError, match="no router training data for expert 'gamma'"):
        router_examples(["gamma"], per_task=3, tasks_dir=tasks)


# ---- vLLM backend pieces that need no engine ------------------------------------------------------------------


def test_mix_quantizer_keys_weights_and_errors() -> None:
    from serving.backends.mixadapter import MixQuantizer

    q = MixQuantizer(top_k=2, step=0.05)
    assert q.key((0.0, 0.0, 0.0)) == () and q.key((0.0, 0.0)) == ()
    assert q.key((0.0, 1.0, 0.0)) == ((1, 20),) == q.one(1)  # one expert at weight 1: its own adapter's key
    assert q.key((0.5, 0.3, 0.2)) == ((0, 12), (1, 8))  # top-2, rescaled to 0.625 / 0.375, rounded
    assert q.weights(((0, 12), (1, 8)), 3) == pytest.approx((0.6, 0.4, 0.0))
    assert q.key((0.97, 0.02, 0.01)) == ((0, 20),)  # code's 0.02 rescaled is 0.0206: rounds to zero, dropped
    assert q.key((0.3, 0.3, 0.3)) == ((0, 9), (1, 9))  # ties go to the lower index; the total 0.9 is kept: 0.45 each
    assert q.error((0.6, 0.4, 0.0)) == pytest.approx(0.0) and q.error((0.5, 0.3, 0.2)) == pytest.approx(0.4)
    assert MixQuantizer(top_k=3, step=0.01).key((0.5, 0.3, 0.2)) == ((0, 50), (1, 30), (2, 20))
    assert q.key((0.5, 0.0, 0.0)) == ((0, 10),) != q.one(0)  # one expert at weight 0.5 is a mix adapter
    assert MixQuantizer(top_k=1, step=0.1).key((0.2, 0.7, 0.1)) == MixQuantizer(step=0.1).one(1)  # top-1 -> expert
    with pytest.raises(TwinError, match="top-k"):
        MixQuantizer(top_k=0)
    with pytest.raises(TwinError, match="step"):
        MixQuantizer(step=0.0)
    with pytest.raises(TwinError, match="must divide 1"):
        MixQuantizer(step=0.03)  # 33 steps = 0.99: an expert alone could not get weight 1


def test_vllm_backend_refuses_what_lora_cannot_serve(tiny_artifact) -> None:
    from serving.backends.vllm_backend import check_servable, parse_vllm_args, pick_lora_rank

    with pytest.raises(TwinError, match="dense deltas in .* tensors .*--backend local"):
        check_servable(Artifact.open(tiny_artifact))
    assert pick_lora_rank(12, None) == 16 and pick_lora_rank(16, None) == 16 and pick_lora_rank(1, None) == 1
    assert pick_lora_rank(12, 64) == 64
    with pytest.raises(TwinError, match="below the rank a served mix needs"):
        pick_lora_rank(40, 32)
    with pytest.raises(TwinError, match="must be one of"):
        pick_lora_rank(4, 12)
    with pytest.raises(TwinError, match="above vLLM's largest"):
        pick_lora_rank(600, None)
    assert parse_vllm_args(("enforce_eager=true", "--block-size=32", "quantization=fp8")) == {
        "enforce_eager": True, "block_size": 32, "quantization": "fp8"}
    with pytest.raises(TwinError, match="KEY=VALUE"):
        parse_vllm_args(("enforce_eager",))


def test_a_prompt_too_long_by_its_bytes_is_refused_without_tokenizing(tm) -> None:
    from serving.backends.base import PromptEncoder, PromptError

    enc = PromptEncoder(tm.tokenizer, context=128)
    limit = enc.max_prompt_bytes()
    longest = max(len(tm.tokenizer.convert_tokens_to_string([t]).encode()) for t in tm.tokenizer.get_vocab())
    assert limit == 128 * longest                   # a byte-level BPE tokenizer does not normalize
    assert len(enc.encode("hello world", 4)) > 0

    class Refuses:                                  # proves the refusal never reaches the tokenizer
        def __getattr__(self, name):
            raise AssertionError(f"the tokenizer was used ({name})")

    enc.tokenizer = Refuses()
    with pytest.raises(PromptError, match="more tokens than that") as e:
        enc.encode("x" * (limit + 1), None)
    assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
    with pytest.raises(PromptError, match="more tokens"):
        enc.encode(({"role": "user", "content": "é" * (limit // 2 + 1)},), None)
