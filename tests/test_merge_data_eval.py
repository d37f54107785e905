"""`twinrt eval` with the data-based merges as static arms: their statistics come from each expert's own task's train
split, computed once, and a static merge with the split's method, parameters and data reproduces the artifact's
core tensor for tensor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import EXPERTS
from twinrt.artifact import Artifact
from twinrt.config import parse_config
from twinrt.eval.generation import PlainModel
from twinrt.eval.report import notes, to_json
from twinrt.eval.run import EvalOptions, run_eval
from twinrt.eval.statistics import eval_statistics, suite_calibration
from twinrt.eval.tasks import open_suite
from twinrt.eval.weights import merge_weights, sources_of
from twinrt.merge import get_method
from twinrt.runtime import TwinModel
from twinrt.split.run import split

WORDS = ["cat", "dog", "paris", "hello", "world", "python", "sum", "fox", "lazy"]


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("suite")
    for t, task in enumerate(EXPERTS):
        (root / task).mkdir()
        for split_name in ("train", "validation", "test"):
            rows = [{"task": task, "messages": [{"role": "user", "content": f"{task} {WORDS[(i + t) % 9]} " * (1 + i)}],
                     "answer": WORDS[(2 * i + t) % 9]} for i in range(3)]
            (root / task / f"{split_name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "suite.json").write_text(json.dumps({"format": "twinrt-tasks/1", "tasks": [
        {"name": t, "metric": "exact"} for t in EXPERTS]}))
    return root


@pytest.fixture(scope="module")
def regmean_artifact(tiny_models, suite_dir, tmp_path_factory) -> Path:
    """The three full experts split with a RegMean core whose calibration data is each task's train split."""
    out = tmp_path_factory.mktemp("regmean") / "artifact"
    split(parse_config({"base": str(tiny_models["base"]), "shared": {"method": "regmean", "alpha": 0.9},
                        "exclusive": {"rank": 4},
                        "experts": [{"name": n, "path": str(tiny_models[n]),
                                     "calibration": {"data": str(suite_dir / n / "train.jsonl"), "samples": 3}}
                                    for n in EXPERTS]}), out)
    return out


def test_static_regmean_reproduces_the_split_core(regmean_artifact, suite_dir, tmp_path):
    art = Artifact.open(regmean_artifact)
    plain = PlainModel.load(art.core_dir)
    src = sources_of(art.manifest)
    calib = suite_calibration(open_suite(suite_dir), {t: t for t in EXPERTS}, list(EXPERTS), plain.tokenizer,
                              samples=3, batch_size=2, context=128)
    read, costs = eval_statistics(plain, src, calib, frozenset({"gram_in"}), tmp_path)
    assert [c.examples for c in costs] == [3, 3, 3]
    core = load_file(art.core_dir / "model.safetensors")
    merged = dict(merge_weights(src, get_method("regmean"), art.manifest.shared.params, read))
    assert set(merged) == set(core)
    for name, t in core.items():
        assert torch.allclose(merged[name], t, atol=1e-5), name
    ties = dict(merge_weights(src, get_method("ties"), get_method("ties").resolve({})))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(ties[q], core[q], atol=1e-4)  # the comparison can fail


def test_eval_runs_the_new_methods_as_static_arms(tiny_artifact, suite_dir):
    tm = TwinModel.from_artifact(tiny_artifact)
    labels = []
    res = run_eval(tm, open_suite(suite_dir), EvalOptions(limit=2, val_limit=2, max_new_tokens=2, calibration_samples=2,
                                                          methods=("pcb", "fisher", "regmean", "mats")),
                   progress=lambda label, total: (labels.append(label), lambda k: None)[1])
    arms = {a.name: a for a in res.arms}
    assert {"merge:pcb", "merge:fisher", "merge:regmean", "merge:mats"} <= set(arms)
    assert [s.method for s in res.selections] == ["pcb", "fisher", "regmean", "mats"]
    assert [len(s.points) for s in res.selections] == [2, 1, 2, 2]  # the quick grids, chosen on validation
    assert arms["merge:mats"].params["objective"] in ("kfac", "regmean")
    # one statistics pass per expert for everything the grids need (Fishers, input and output-gradient Grams)
    assert [c.expert for c in res.statistics] == list(EXPERTS) and all(c.examples == 2 for c in res.statistics)
    assert sum(label.startswith("statistics (fisher, gram_in, gram_out)") for label in labels) == 3
    doc = to_json(res)
    assert [s["expert"] for s in doc["statistics"]] == list(EXPERTS)
    assert any(line.startswith("statistics of the data-based merges: 6 train examples over 3 experts")
               for line in notes(res))
