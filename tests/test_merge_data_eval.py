"""`twinrt eval` with the data-based merges as static arms: their statistics come from each expert's own task's train
split, computed once, and a static merge with the split's method, parameters and data reproduces the artifact's
core tensor for tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import EXPERTS, write_word_suite
from twinrt.artifact import Artifact
from twinrt.config import parse_config
from twinrt.eval.generation import PlainModel
from twinrt.eval.report import notes, to_json
from twinrt.eval.run import EvalOptions, run_eval
from twinrt.eval.statistics import eval_statistics, suite_calibration
from twinrt.eval.tasks import open_suite
from twinrt.eval.twin_rank import search_rank, twin_weights
from twinrt.eval.weights import expert_weights, merge_weights, sources_of
from twinrt.merge import get_method
from twinrt.runtime import TwinModel
from twinrt.split.run import decoder_linear_weights, split


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    return write_word_suite(tmp_path_factory.mktemp("suite"))


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
                                                          methods=("pcb", "fisher", "regmean", "mats"),
                                                          twin_ranks=(2, 64)),
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
    # the twin on every core at each rank: the tiny experts score 0 on this suite, so no normalized score is
    # defined and no rank reaches the target (the search itself: test_rank_search_stops_at_the_first_rank...)
    assert [r.core for r in res.twin_ranks] == ["core", "merge:pcb", "merge:fisher", "merge:regmean", "merge:mats"]
    assert all(list(r.means) == [2, 64] and r.rank is None for r in res.twin_ranks), res.twin_ranks
    assert doc["twin_ranks"][0]["rank"] is None and doc["twin_ranks"][0]["mean_normalized"] == {"2": None, "64": None}
    assert [r["core"] for r in doc["twin_ranks"]] == [r.core for r in res.twin_ranks]


def test_twin_weights_are_the_core_plus_the_truncated_delta(tiny_artifact):
    art = Artifact.open(tiny_artifact)
    src = sources_of(art.manifest)
    core = load_file(art.core_dir / "model.safetensors")
    factored = decoder_linear_weights(PlainModel.load(art.core_dir).config)
    expert = dict(expert_weights(src, "code"))
    exact = dict(twin_weights(core, src, "code", 64, factored))  # >= every matrix's full rank
    low = dict(twin_weights(core, src, "code", 2, factored))
    for name, theta in expert.items():
        assert torch.allclose(exact[name], theta.float(), atol=1e-5), name
        if name in factored:
            assert torch.linalg.matrix_rank(low[name] - core[name], atol=1e-6) == 2, name
        else:
            assert torch.equal(low[name], theta), name  # dense deltas are exact at any rank


def test_rank_search_stops_at_the_first_rank_that_reaches_the_target(tiny_artifact):
    art = Artifact.open(tiny_artifact)
    src = sources_of(art.manifest)
    core = load_file(art.core_dir / "model.safetensors")
    tried, loaded = [], []

    def score(tasks, label):  # the twin of each task's expert scores 0.5 below rank 4, its expert's score from 4
        rank = int(label.split("rank ")[1].split(":")[0])
        tried.append(rank)
        return {t: 0.8 if rank >= 4 else 0.4 for t in tasks}

    experts = {f"expert:{e}": {t: 0.8 for t in EXPERTS} for e in EXPERTS}
    res = search_rank("merge:x", core, src, lambda w: loaded.append(len(dict(w))), score, [16, 1, 4], experts,
                      {t: t for t in EXPERTS}, set())
    assert res.means == {1: 0.5, 4: 1.0} and res.rank == 4 and sorted(set(tried)) == [1, 4]
    assert len(loaded) == 6 and all(n == len(core) for n in loaded)  # each expert's twin, whole, at each rank
    assert search_rank("core", core, src, lambda w: None, lambda tasks, label: {t: 0.1 for t in tasks}, [1, 2],
                       experts, {t: t for t in EXPERTS}, set()).rank is None


def test_each_grid_point_is_merged_once_and_the_rank_search_reuses_the_chosen_merge(tiny_artifact, suite_dir,
                                                                                     monkeypatch):
    import twinrt.eval.run as run_mod

    calls: list[tuple[str, dict]] = []
    cores: dict[str, dict[str, torch.Tensor]] = {}
    real_merge, real_search = run_mod.merge_weights, run_mod.search_rank

    def counting_merge(src, method, params, stats=None):
        calls.append((method.name, dict(params)))
        return real_merge(src, method, params, stats)

    def capturing_search(label, core, *args, **kw):
        cores[label] = {n: t.clone() for n, t in core.items()}
        return real_search(label, core, *args, **kw)

    monkeypatch.setattr(run_mod, "merge_weights", counting_merge)
    monkeypatch.setattr(run_mod, "search_rank", capturing_search)
    tm = TwinModel.from_artifact(tiny_artifact)
    res = run_eval(tm, open_suite(suite_dir), EvalOptions(limit=2, val_limit=2, max_new_tokens=2,
                                                          methods=("ties", "pcb"), twin_ranks=(2,)))
    for sel in res.selections:
        # every point merged once for its validation run; the chosen one (here the first: the tiny experts
        # score 0 everywhere, a tie) is loaded back, not merged again, for its test run and its rank search
        assert [p for m, p in calls if m == sel.method] == sel.points and sel.chosen == 0 < len(sel.points) - 1
        fresh = dict(real_merge(sources_of(Artifact.open(tiny_artifact).manifest), get_method(sel.method),
                                sel.points[sel.chosen]))
        got = cores[f"merge:{sel.method}"]
        assert set(got) <= set(fresh) and len(got) >= len(fresh) - 1  # a tied weight once
        for name, t in got.items():
            assert torch.allclose(t.float(), fresh[name].float(), atol=1e-6), (sel.method, name)
    last = dict(real_merge(sources_of(Artifact.open(tiny_artifact).manifest), get_method("ties"),
                           res.selections[0].points[-1]))
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(cores["merge:ties"][q], last[q], atol=1e-4)  # the comparison can fail
    assert [r.core for r in res.twin_ranks] == ["core", "merge:ties", "merge:pcb"]
