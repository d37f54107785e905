"""The out-of-template split of the demo suite, `router eval` on two splits side by side, and the metrics
it reports (ECE against a hand-computed reference, per-expert accuracy)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch

from examples.tasks import make_tasks
from helpers import copy_artifact, prompts_jsonl, write_jsonl
from router.cli import register
from router.metrics import evaluate, expected_calibration_error
from router.synthetic import make_prompts

SUITE = Path(make_tasks.__file__).parent


def test_ece_matches_a_hand_computed_reference_with_confidences_on_bin_edges() -> None:
    # confidences 0.3 (an edge: belongs in (0.2, 0.3]) and 0.25 share a bin; 0.7 and 0.65 share (0.6, 0.7];
    # 1.0 is in (0.9, 1.0]
    probs = torch.tensor([[0.3, 0.2, 0.25, 0.25], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1],
                          [0.05, 0.65, 0.15, 0.15], [1.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1, 2])
    # correct: yes (0.3), no (0.25: argmax is the first max, 0), no (0.7), yes (0.65), no (1.0)
    expected = (2 / 5) * abs(0.5 - 0.275) + (2 / 5) * abs(0.5 - 0.675) + (1 / 5) * abs(0.0 - 1.0)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-6)
    assert expected_calibration_error(probs.double(), labels) == pytest.approx(expected, abs=1e-6)
    ev = evaluate(torch.log(probs.clamp(min=1e-12)), labels)
    assert ev.ece == pytest.approx(expected, abs=1e-5)
    assert ev.per_expert[0] == 1.0 and ev.per_expert[1] == pytest.approx(1 / 3) and ev.per_expert[2] == 0.0


def test_per_expert_accuracy_is_nan_for_an_expert_without_examples() -> None:
    ev = evaluate(torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 0]))
    assert ev.per_expert[0] == 0.5 and all(v != v for v in ev.per_expert[1:])


def test_ood_split_is_what_the_committed_generator_writes(tmp_path) -> None:
    make_tasks.write_suite(tmp_path, make_tasks.DEFAULT_SEED)
    for task in make_tasks.TASKS:
        for split in (*make_tasks.SPLITS, make_tasks.OOD_SPLIT, make_tasks.VAL_OOD_SPLIT):
            want = (SUITE / task.name / f"{split}.jsonl").read_text(encoding="utf-8")
            assert (tmp_path / task.name / f"{split}.jsonl").read_text(encoding="utf-8") == want, (task, split)


def _rows(task: str, split: str) -> list[dict]:
    return [json.loads(line) for line in (SUITE / task / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("split, other", [("test_ood", "val_ood"), ("val_ood", "test_ood")])
def test_ood_prompts_use_no_other_splits_template_and_no_train_input(split, other) -> None:
    phrasing = {"test_ood": make_tasks.TEST_OOD, "val_ood": make_tasks.VAL_OOD}
    patterns = [make_tasks.template_pattern(t) for ts in make_tasks.IN_DISTRIBUTION_TEMPLATES.values() for t in ts]
    patterns += [make_tasks.template_pattern(t) for ts in phrasing[other].templates.values() for t in ts]
    for task in make_tasks.TASKS:
        ood = _rows(task.name, split)
        assert len(ood) == phrasing[split].size and {r["task"] for r in ood} == {task.name}
        seen = {r["answer"] for s in ("train", "validation") for r in _rows(task.name, s)}
        assert not seen & {r["answer"] for r in ood}
        if split == "val_ood" and task.name != "capital":  # its inputs are not test_ood's either
            assert not {r["answer"] for r in _rows(task.name, "test_ood")} & {r["answer"] for r in ood}
        for r in ood:
            text = r["messages"][0]["content"]
            assert not any(p.search(text) for p in patterns), text
        used = {t for t in phrasing[split].templates[task.name] for r in ood
                if make_tasks.template_pattern(t).search(r["messages"][0]["content"])}
        assert len(used) == len(phrasing[split].templates[task.name])   # every template occurs


@pytest.mark.parametrize("phrasing, template", [
    ("TEST_OOD", "Sorry, how is {d} written on an American check?"),   # an in-distribution template inside
    ("VAL_OOD", "A friend in Chicago asks how {d} is written where she lives."),  # one of test_ood's
])
def test_the_template_check_catches_a_reused_template(monkeypatch, phrasing, template) -> None:
    ph = getattr(make_tasks, phrasing)
    reused = dataclasses.replace(ph, templates={**ph.templates, "date_us": (template,)})
    monkeypatch.setattr(make_tasks, phrasing, reused)
    with pytest.raises(AssertionError, match="reuse"):
        make_tasks.check_ood_templates()


def test_fresh_items_avoid_answers_and_are_deterministic() -> None:
    def draw(rng: random.Random) -> tuple[str, str]:
        n = rng.randint(0, 30)
        return f"q{n}", str(n)

    a = make_tasks.fresh_items(random.Random(1), {"3", "4"}, draw, size=20)
    assert a == make_tasks.fresh_items(random.Random(1), {"3", "4"}, draw, size=20)
    assert len({x for _, x in a}) == 20 and not {"3", "4"} & {x for _, x in a}
    with pytest.raises(ValueError, match="fresh"):
        make_tasks.fresh_items(random.Random(1), set(), draw, size=40, tries=500)


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="twinrt")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


def test_router_eval_reports_two_suite_splits_side_by_side(tiny_artifact, tmp_path, capsys) -> None:
    art = copy_artifact(tiny_artifact, tmp_path / "artifact")
    assert run(["router", "train", str(art), "--data", str(prompts_jsonl(tmp_path / "t.jsonl", 20)),
                "--kind", "prototype"]) == 0
    tasks = tmp_path / "tasks"
    for split, seed in (("test", 3), ("test_ood", 4)):
        for text, expert in make_prompts(4, seed):
            (tasks / expert).mkdir(parents=True, exist_ok=True)
            with (tasks / expert / f"{split}.jsonl").open("a") as f:
                f.write(json.dumps({"task": expert, "messages": [{"role": "user", "content": text}],
                                    "answer": "x"}) + "\n")
    capsys.readouterr()
    out_json = tmp_path / "eval.json"
    assert run(["router", "eval", str(art), "--tasks", str(tasks), "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "test: top-1 accuracy" in out and "test_ood: top-1 accuracy" in out
    assert "router quality by data set" in out and "ECE" in out
    report = json.loads(out_json.read_text())
    assert list(report["sets"]) == ["test", "test_ood"]
    assert report["sets"]["test_ood"]["examples"] == 12
    assert set(report["sets"]["test"]["per_expert"]) == set(report["experts"])

    extra = write_jsonl(tmp_path / "more.jsonl", [{"text": t, "expert": e} for t, e in make_prompts(2, 9)])
    assert run(["router", "eval", str(art), "--data", str(extra), "--tasks", str(tasks), "--splits", "test"]) == 0
    assert "more.jsonl: top-1" in capsys.readouterr().out


def test_router_eval_names_a_missing_split_file(tiny_artifact, tmp_path) -> None:
    from twinrt.errors import TwinError

    art = copy_artifact(tiny_artifact, tmp_path / "artifact")
    assert run(["router", "train", str(art), "--data", str(prompts_jsonl(tmp_path / "t.jsonl", 10)),
                "--kind", "prototype"]) == 0
    with pytest.raises(TwinError, match=r"test.jsonl is missing \(split .test. of expert"):
        run(["router", "eval", str(art), "--tasks", str(tmp_path / "nowhere")])
    with pytest.raises(TwinError, match="needs --data FILE or --tasks DIR"):
        run(["router", "eval", str(art)])
