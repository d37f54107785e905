"""`twinrt eval` end to end on the tiny 3-expert artifact with a tiny math/code/chat suite.

The suite's answers are replies of the models themselves: on task t the first OWN_RIGHT[t] test answers are
the original expert t's greedy replies and the others the core's. So `expert:<t>` must score exactly
OWN_RIGHT[t] / N_TEST on t (it fails if the eval ran anything but the original expert, e.g. the rank-r twin),
the core exactly the rest, and normalized scores (here also above 1) and means are recomputed from raw scores.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import examples, write_config
from router.synthetic import make_prompts
from twinrt.artifact import Artifact
from twinrt.cli import main as twinrt_main
from twinrt.errors import TwinError
from twinrt.eval.generation import PlainModel, generate
from twinrt.eval.metrics import task_score
from twinrt.eval.report import to_json
from twinrt.eval.run import EvalOptions, Routing, run_eval
from twinrt.eval.tasks import open_suite
from twinrt.runtime.model import TwinModel

TASKS = ("math", "code", "chat")
N_TEST, N_VAL = 4, 2
MAX_NEW, BATCH = 5, 8
NEVER = "\u2603 never produced \u2603"
OWN_RIGHT = {"math": 3, "code": 2, "chat": 1}  # of N_TEST


def _rows(task: str, prompts: list[str], answers: list[str]) -> str:
    return "".join(json.dumps({"task": task, "messages": [{"role": "user", "content": p}], "answer": a}) + "\n"
                   for p, a in zip(prompts, answers))


def _greedy(core_dir, weights_file, prompts: list[str]) -> list[str]:
    """Greedy replies of a checkpoint, batched exactly as the eval batches the whole split."""
    plain = PlainModel.load(core_dir)
    plain.assign(load_file(str(weights_file)).items())
    msgs = [({"role": "user", "content": p},) for p in prompts]
    return generate(plain, msgs, max_new_tokens=MAX_NEW, batch_size=BATCH).texts


@pytest.fixture(scope="module")
def sharp(tmp_path_factory) -> dict:
    """Tiny models whose greedy replies differ by prompt and by expert (the session's tiny models all reply
    with newlines): a base with large random weights, full experts math/code and a LoRA expert chat, split
    into an artifact with a trained hidden-state router."""
    from router import TrainConfig, save_router, train_router
    from tiny import make_base, make_full_expert, make_lora_expert
    from twinrt.config import load_config
    from twinrt.split.run import split

    root = tmp_path_factory.mktemp("sharp")
    make_base(root / "base", initializer_range=0.3)
    paths = {"root": root, "base": root / "base"}
    for i, t in enumerate(TASKS[:2]):
        make_full_expert(root / "base", root / t, seed=100 + i, scale=0.3)
        paths[t] = root / t
    make_lora_expert(root / "base", root / "chat_lora", root / "chat", seed=9)
    paths["chat"], paths["chat_lora"] = root / "chat", root / "chat_lora"
    experts = {"math": paths["math"], "code": paths["code"], "chat": paths["chat_lora"]}
    cfg = write_config(root / "split.yaml", paths["base"], experts, {"method": "ties", "density": 0.5},
                       {"rank": 4})
    split(load_config(cfg), root / "artifact")
    art = Artifact.open(root / "artifact")
    out = train_router(art, examples(12, seed=0), TrainConfig(kind="hidden", seed=0, epochs=60))
    save_router(out.router, art)
    paths["artifact"] = root / "artifact"
    return paths


@pytest.fixture(scope="module")
def suite_dir(sharp, tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    pool = make_prompts(N_TEST + N_VAL + 4, seed=3)
    prompts = {t: [p for p, e in pool if e == t] for t in TASKS}
    test = {t: prompts[t][:N_TEST] for t in TASKS}
    val = {t: prompts[t][N_TEST:N_TEST + N_VAL] for t in TASKS}
    core = Artifact.open(sharp["artifact"]).core_dir
    flat = [p for t in TASKS for p in test[t]]
    core_replies = _greedy(core, core / "model.safetensors", flat)
    answers = {}
    for k, t in enumerate(TASKS):  # own expert right on the first OWN_RIGHT[t] examples, the core on the rest
        own = _greedy(core, sharp[t] / "model.safetensors", flat)
        at = k * N_TEST
        answers[t] = [own[at + i] if i < OWN_RIGHT[t] else core_replies[at + i] for i in range(N_TEST)]
    (root / "suite.json").write_text(json.dumps(
        {"format": "twinrt-tasks/1", "tasks": [{"name": t, "metric": "exact"} for t in TASKS]}))
    for t in TASKS:
        (root / t).mkdir()
        (root / t / "test.jsonl").write_text(_rows(t, test[t], answers[t]))
        (root / t / "validation.jsonl").write_text(_rows(t, val[t], [NEVER] * N_VAL))
    return root


@pytest.fixture(scope="module")
def cli_run(sharp, suite_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    rc = twinrt_main(["eval", str(sharp["artifact"]), "--tasks", str(suite_dir), "--out", str(out), "--limit",
                      str(N_TEST), "--max-new-tokens", str(MAX_NEW), "--batch-size", str(BATCH),
                      "--methods", "task_arithmetic,dare_ties,average", "-q"])
    assert rc == 0
    return out, json.loads((out / "eval.json").read_text())


def test_json_structure_and_arms(cli_run, suite_dir) -> None:
    out, doc = cli_run
    assert (out / "eval.md").is_file()
    assert doc["format"] == "twinrt-eval/1" and doc["split"] == "test"
    assert [t["name"] for t in doc["tasks"]] == list(TASKS)
    assert all(t["examples"] == N_TEST and t["expert"] == t["name"] and t["metric"] == "exact" for t in doc["tasks"])
    assert list(doc["arms"]) == ["expert:math", "expert:code", "expert:chat", "merge:task_arithmetic",
                                 "merge:dare_ties", "merge:average", "core", "twin:oracle", "twin:router"]
    for arm in doc["arms"].values():
        assert set(arm["scores"]) == set(TASKS) and all(len(arm["predictions"][t]) == N_TEST for t in TASKS)
        assert arm["tokens"] > 0 and arm["seconds"] > 0
        assert arm["tokens_per_s"] == pytest.approx(arm["tokens"] / arm["seconds"])
    sel = doc["selection"]
    assert len(sel["task_arithmetic"]["grid"]) == 3 and sel["average"]["grid"] == []
    assert doc["arms"]["merge:task_arithmetic"]["params"] == sel["task_arithmetic"]["chosen"]
    assert sel["dare_ties"]["chosen"]["seed"] == 0
    assert set(doc["router"]["per_task"]) == set(TASKS) and 0.0 <= doc["router"]["accuracy"] <= 1.0


def test_raw_scores_are_the_metric_over_the_predictions(cli_run, suite_dir) -> None:
    _, doc = cli_run
    suite = open_suite(suite_dir)
    test = suite.load("test", N_TEST)
    for name, arm in doc["arms"].items():
        for t in TASKS:
            expected = task_score("exact", arm["predictions"][t], [e.answer for e in test[t]])
            assert arm["scores"][t] == expected, (name, t)
    for t in TASKS:  # the original expert, exactly: it gets its own replies right and nothing else
        assert doc["arms"][f"expert:{t}"]["scores"][t] == OWN_RIGHT[t] / N_TEST
        assert doc["arms"]["core"]["scores"][t] == 1 - OWN_RIGHT[t] / N_TEST


def test_normalized_scores_and_means_recomputed(cli_run) -> None:
    _, doc = cli_run
    own = {t: doc["arms"][f"expert:{t}"]["scores"][t] for t in TASKS}
    for name, arm in doc["arms"].items():
        norm = {t: arm["scores"][t] / own[t] for t in TASKS}
        assert arm["normalized"] == pytest.approx(norm, abs=1e-12), name
        assert arm["mean_normalized"] == pytest.approx(sum(norm.values()) / 3, abs=1e-12), name
        assert arm["mean_score"] == pytest.approx(sum(arm["scores"].values()) / 3, abs=1e-12), name
    for t in TASKS:
        assert doc["arms"][f"expert:{t}"]["normalized"][t] == 1.0
    assert doc["arms"]["core"]["mean_normalized"] == pytest.approx((1 / 3 + 1 + 3) / 3)
    assert doc["undefined_tasks"] == []


def test_stored_bytes_per_arm(cli_run, sharp) -> None:
    _, doc = cli_run
    sizes = Artifact.open(sharp["artifact"]).manifest.sizes
    twin = sizes.core + sum(s.factors + s.dense for s in sizes.experts.values())
    arms = doc["arms"]
    assert arms["expert:math"]["stored_bytes"] == (sharp["math"] / "model.safetensors").stat().st_size
    assert arms["expert:chat"]["stored_bytes"] == (sharp["chat_lora"] / "adapter_model.safetensors").stat().st_size
    assert arms["merge:average"]["stored_bytes"] == sizes.core
    assert arms["core"]["stored_bytes"] == sizes.core
    assert arms["twin:oracle"]["stored_bytes"] == twin
    assert sizes.router > 0 and arms["twin:router"]["stored_bytes"] == twin + sizes.router


def test_oracle_twin_equals_the_artifacts_one_hot_mixes(cli_run, sharp, suite_dir) -> None:
    _, doc = cli_run
    test = open_suite(suite_dir).load("test", N_TEST)
    tm = TwinModel.from_artifact(sharp["artifact"])
    prompts = [list(e.messages) for t in TASKS for e in test[t]]
    mix = [{t: 1.0} for t in TASKS for _ in range(N_TEST)]
    texts = tm.generate(prompts, mix=mix, max_new_tokens=MAX_NEW, max_batch=BATCH)
    assert [p for t in TASKS for p in doc["arms"]["twin:oracle"]["predictions"][t]] == texts
    core = tm.generate(prompts, mix=None, max_new_tokens=MAX_NEW, max_batch=BATCH)
    assert [p for t in TASKS for p in doc["arms"]["core"]["predictions"][t]] == core


def test_router_accuracy_is_the_share_of_examples_routed_to_their_own_expert(cli_run, sharp, suite_dir) -> None:
    from router import load_router

    _, doc = cli_run
    test = open_suite(suite_dir).load("test", N_TEST)
    router = load_router(sharp["artifact"])
    w = router.route([list(e.messages) for t in TASKS for e in test[t]]).weights
    labels = torch.tensor([TASKS.index(t) for t in TASKS for _ in range(N_TEST)])  # artifact order = TASKS
    hits = (w.argmax(-1) == labels).float()
    assert doc["router"]["accuracy"] == pytest.approx(hits.mean().item())
    for i, t in enumerate(TASKS):
        assert doc["router"]["per_task"][t] == pytest.approx(hits[i * N_TEST:(i + 1) * N_TEST].mean().item())


def test_markdown_has_one_row_per_arm_with_the_mean(cli_run) -> None:
    out, doc = cli_run
    md = (out / "eval.md").read_text()
    for name, arm in doc["arms"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert f"| {arm['mean_normalized']:.3f} |" in row
    assert "router (hidden): accuracy" in md and "merge:task_arithmetic: scaling=" in md


def test_png_chart_is_written(cli_run) -> None:
    pytest.importorskip("matplotlib")
    out, _ = cli_run
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_eval_api_with_routing_callable_and_no_merges(sharp, suite_dir) -> None:
    tm = TwinModel.from_artifact(sharp["artifact"])
    seen = []

    def route(prompts):
        seen.extend(prompts)
        return torch.tensor([[0.0, 0.0, 1.0]] * len(prompts))  # always "chat"

    res = run_eval(tm, open_suite(suite_dir), EvalOptions(limit=2, max_new_tokens=2, methods=()),
                   routing=Routing("fixed", route))
    assert [a.name for a in res.arms] == ["expert:math", "expert:code", "expert:chat", "core", "twin:oracle",
                                          "twin:router"]
    assert len(seen) == 6 and res.router.accuracy == pytest.approx(1 / 3)
    assert res.router.per_task == {"math": 0.0, "code": 0.0, "chat": 1.0}


def test_another_held_out_split_is_scored_when_asked(sharp, suite_dir, tmp_path) -> None:
    suite = tmp_path / "suite"
    shutil.copytree(suite_dir, suite)
    for t in TASKS:  # the same prompts, every answer wrong: a score of 0 shows this split was read
        rows = [json.loads(line) for line in (suite / t / "test.jsonl").read_text().splitlines()]
        (suite / t / "test_ood.jsonl").write_text("".join(json.dumps({**r, "answer": NEVER}) + "\n" for r in rows))
    tm = TwinModel.from_artifact(sharp["artifact"])
    opts = dict(limit=N_TEST, max_new_tokens=MAX_NEW, batch_size=BATCH, methods=())
    ood = run_eval(tm, open_suite(suite), EvalOptions(split="test_ood", **opts))
    assert all(v == 0.0 for a in ood.arms for v in a.scores.values())
    assert any(v > 0 for a in run_eval(tm, open_suite(suite), EvalOptions(**opts)).arms for v in a.scores.values())
    assert to_json(ood)["split"] == "test_ood"
    with pytest.raises(TwinError, match="nope.jsonl is missing"):
        run_eval(tm, open_suite(suite), EvalOptions(split="nope", **opts))
    with pytest.raises(TwinError, match="--split validation"):
        EvalOptions(split="validation")
    with pytest.raises(TwinError, match="must name a split file"):
        EvalOptions(split="../test")


# ---- bad input: one clear line, exit code 2 ---------------------------------------------------------------

def _eval_error(capsys, *argv: str) -> str:
    assert twinrt_main(["eval", *argv]) == 2
    return capsys.readouterr().err.strip()


def test_missing_tasks_dir(capsys, tiny_artifact, tmp_path) -> None:
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(tmp_path / "nope"))
    assert err == f"twinrt: error: tasks directory {tmp_path / 'nope'} does not exist or is not a directory"


def test_task_without_expert(capsys, tiny_artifact, suite_dir, tmp_path) -> None:
    import shutil

    d = shutil.copytree(suite_dir, tmp_path / "suite")
    suite = json.loads((d / "suite.json").read_text())
    suite["tasks"].append({"name": "poetry", "metric": "exact"})
    (d / "suite.json").write_text(json.dumps(suite))
    (d / "poetry").mkdir()
    (d / "poetry" / "test.jsonl").write_text(_rows("poetry", ["a poem"], ["roses"]))
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(d), "--no-router")
    assert "task(s) poetry have no expert of the same name" in err and "--task-expert" in err
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(d), "--no-router", "--task-expert", "poetry=art")
    assert "expert(s) the artifact does not have: poetry=art" in err


def test_unknown_method(capsys, tiny_artifact, suite_dir) -> None:
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(suite_dir), "--methods", "ties,slerp")
    assert err.startswith("twinrt: error: --methods: unknown merge method(s) slerp; known: average,")


def test_no_router_in_artifact(capsys, tiny_artifact, suite_dir) -> None:
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(suite_dir))
    assert "has no trained router" in err and "--no-router" in err


@pytest.mark.parametrize("flag,value,message", [
    ("--limit", "0", "--limit must be an integer >= 1, got 0"),
    ("--task-expert", "math", "--task-expert expects KEY=VALUE, got 'math'"),
    ("--expert-path", "poetry=/x", "--expert-path names expert(s) the artifact does not have: poetry"),
])
def test_bad_options(capsys, tiny_artifact, suite_dir, flag, value, message) -> None:
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(suite_dir), "--no-router", flag, value)
    assert message in err


def test_moved_expert_is_named(capsys, tiny_artifact, suite_dir, tmp_path) -> None:
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(suite_dir), "--no-router",
                      "--expert-path", f"code={tmp_path / 'gone'}")
    assert f"the original expert 'code' ({tmp_path / 'gone'}) does not exist here" in err


def test_bad_suite_line_names_file_and_line(capsys, tiny_artifact, suite_dir, tmp_path) -> None:
    import shutil

    d = shutil.copytree(suite_dir, tmp_path / "suite")
    with open(d / "code" / "test.jsonl", "a") as f:
        f.write('{"task": "code", "messages": [], "answer": "x"}\n')
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(d), "--no-router", "--methods", "none")
    assert f"{d / 'code' / 'test.jsonl'}:{N_TEST + 1}: 'messages' must be a non-empty list" in err


def test_nan_free_json(cli_run) -> None:
    out, _ = cli_run
    text = (out / "eval.json").read_text()
    assert "NaN" not in text and math.isfinite(json.loads(text)["arms"]["core"]["mean_score"])


def test_missing_validation_split_is_found_before_any_arm_runs(capsys, tiny_artifact, suite_dir, tmp_path) -> None:
    import shutil

    d = shutil.copytree(suite_dir, tmp_path / "suite")
    (d / "code" / "validation.jsonl").unlink()
    err = _eval_error(capsys, str(tiny_artifact), "--tasks", str(d), "--no-router", "--methods", "average,ties")
    assert err == f"twinrt: error: task 'code': {d / 'code' / 'validation.jsonl'} is missing"
    assert "examples in" not in capsys.readouterr().out
