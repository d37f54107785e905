"""`router train|eval` through argparse, as twinrt's CLI wires them: output, installed files, user errors."""

from __future__ import annotations

import argparse
import json

import pytest

from helpers import copy_artifact, prompts_jsonl, write_jsonl
from router.cli import register
from router.synthetic import make_prompts
from twinrt.artifact import Artifact
from twinrt.errors import TwinError


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="twinrt")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.fn(args)


@pytest.fixture
def art(tiny_artifact, tmp_path):
    return copy_artifact(tiny_artifact, tmp_path / "artifact")


def test_train_installs_a_router_and_prints_accuracy_confusion_and_ece(art, tmp_path, capsys) -> None:
    data = prompts_jsonl(tmp_path / "train.jsonl", 20)
    assert run(["router", "train", str(art), "--data", str(data), "--kind", "prototype", "--top-k", "2",
                "--fallback-threshold", "0.4", "--fallback", "core"]) == 0
    out = capsys.readouterr().out
    assert "prototype router: fitted on 48 examples (12 held out)" in out
    assert "held out: top-1 accuracy" in out and "ECE" in out
    assert "true \\ predicted" in out and "recall" in out
    cfg = json.loads((art / "router" / "router.json").read_text())
    assert cfg["options"] == {"temperature": 1.0, "top_k": 2, "min_weight": 0.0, "fallback_threshold": 0.4,
                              "fallback": "core"}
    assert cfg["training"]["data"] == "train.jsonl" and cfg["training"]["heldout"]["examples"] == 12
    Artifact.open(art)                              # the manifest's checksums cover the new router

    test = prompts_jsonl(tmp_path / "test.jsonl", 5, seed=7)
    assert run(["router", "eval", str(art), "--data", str(test)]) == 0
    out = capsys.readouterr().out
    assert "prototype router" in out and "test.jsonl: top-1 accuracy" in out and "on 15 examples" in out


def test_train_hidden_kind_from_a_task_suite(art, tmp_path, capsys) -> None:
    suite = write_jsonl(tmp_path / "suite.jsonl", [
        {"task": e, "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": t}],
         "answer": "x"} for t, e in make_prompts(10)])
    assert run(["router", "train", str(art), "--data", str(suite), "--label-key", "task", "--kind", "hidden",
                "--holdout", "0.3", "--epochs", "50"]) == 0
    assert "hidden router: fitted on 21 examples (9 held out)" in capsys.readouterr().out
    assert json.loads((art / "router" / "router.json").read_text())["training"]["label_key"] == "task"


def _expect(argv: list[str], match: str) -> None:
    with pytest.raises(TwinError, match=match):
        run(argv)


def test_user_errors_are_twin_errors(art, tmp_path) -> None:
    train = ["router", "train", str(art), "--kind", "prototype", "--data"]
    bad_expert = write_jsonl(tmp_path / "x.jsonl", [{"text": "hi", "expert": "math"},
                                                    {"text": "a poem", "expert": "poetry"}])
    _expect(train + [str(bad_expert)], r"line 2: expert 'poetry' is not in the artifact; known experts: "
                                       r"math, code, chat")
    (tmp_path / "empty.jsonl").write_text("")
    _expect(train + [str(tmp_path / "empty.jsonl")], "has no examples")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "expert": "math"}\n{oops}\n')
    _expect(train + [str(tmp_path / "broken.jsonl")], r"broken\.jsonl:2: not valid JSON")
    few = prompts_jsonl(tmp_path / "few.jsonl", 3)
    _expect(train + [str(few)], r"'math' has 3, 'code' has 3, 'chat' has 3; a hold-out split of 0.2 needs "
                                r"at least 5 per expert")
    ok = prompts_jsonl(tmp_path / "ok.jsonl", 6)
    _expect(train + [str(ok), "--temperature", "0"], "--temperature: Input should be greater than 0")
    _expect(train + [str(ok), "--holdout", "0.9"], "--holdout")
    _expect(["router", "eval", str(art), "--data", str(ok)], "no router")
    assert not (art / "router").exists()            # nothing was installed by a failed train


def test_holdout_zero_trains_on_everything(art, tmp_path, capsys) -> None:
    data = prompts_jsonl(tmp_path / "d.jsonl", 2)
    assert run(["router", "train", str(art), "--data", str(data), "--kind", "prototype", "--holdout", "0"]) == 0
    out = capsys.readouterr().out
    assert "on 6 examples (0 held out)" in out and "not measured" in out
    cfg = json.loads((art / "router" / "router.json").read_text())
    assert cfg["temperature"] == 1.0 and "heldout" not in cfg["training"]
