"""The eval's parts on tiny models and hand-made values: merge and expert weights against the split and PEFT,
the plain-model decoding loop against transformers' greedy generate, grids, router accuracy, task files, and
the report's table arithmetic."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import EXPERTS, write_config
from twinrt.artifact import Artifact
from twinrt.errors import TwinError
from twinrt.eval.generation import PlainModel, generate
from twinrt.eval.grid import GRIDS, best_point, grid_points, parse_methods
from twinrt.eval.report import markdown, notes, to_json
from twinrt.eval.run import ArmResult, EvalOptions, EvalResult, one_hot_mixes, router_hits
from twinrt.eval.tasks import Task, read_split, task_experts
from twinrt.eval.twin_rank import RankSearch
from twinrt.eval.weights import expert_weights, merge_weights, open_sources, sources_of
from twinrt.merge import get_method


def _core(artifact) -> dict[str, torch.Tensor]:
    return load_file(str(Artifact.open(artifact).core_dir / "model.safetensors"))


def _assert_merge_is_core(artifact) -> None:
    art = Artifact.open(artifact)
    shared = art.manifest.shared
    built = dict(merge_weights(sources_of(art.manifest), get_method(shared.method), shared.params))
    core = _core(artifact)
    assert set(built) == set(core)
    for name, t in core.items():
        assert torch.equal(built[name], t), name


def test_static_merge_equals_the_core_split_with_the_same_method(tiny_artifact_full_rank, tiny_artifact) -> None:
    assert Artifact.open(tiny_artifact_full_rank).manifest.shared.method == "task_arithmetic"
    _assert_merge_is_core(tiny_artifact_full_rank)
    assert Artifact.open(tiny_artifact).manifest.shared.method == "ties"
    _assert_merge_is_core(tiny_artifact)


def test_dare_merge_draws_the_splits_masks_and_keeps_excluded_tensors(tiny_models, tmp_path) -> None:
    from twinrt.config import load_config
    from twinrt.split.run import split

    cfg = write_config(tmp_path / "split.yaml", tiny_models["base"], {n: tiny_models[n] for n in EXPERTS},
                       {"method": "dare_ties", "density": 0.4, "seed": 7, "exclude": ["norm"]}, {"rank": 2})
    split(load_config(cfg), tmp_path / "artifact")
    assert Artifact.open(tmp_path / "artifact").manifest.shared.excluded  # the norms were left out of the merge
    _assert_merge_is_core(tmp_path / "artifact")
    art = Artifact.open(tmp_path / "artifact")
    other = dict(merge_weights(sources_of(art.manifest), get_method("dare_ties"),
                               {"scaling": 1.0, "density": 0.4, "seed": 8}))
    assert not torch.equal(other["model.layers.0.mlp.up_proj.weight"],
                           _core(tmp_path / "artifact")["model.layers.0.mlp.up_proj.weight"])


def test_expert_weights_are_the_original_experts(tiny_models) -> None:
    src = open_sources(tiny_models["base"], {"full": tiny_models["math"], "lora": tiny_models["lora_b"]})
    full = load_file(str(tiny_models["math"] / "model.safetensors"))
    got = dict(expert_weights(src, "full"))
    assert set(got) == set(full) and all(torch.equal(got[n], full[n]) for n in full)
    merged = load_file(str(tiny_models["lora_b_merged"] / "model.safetensors"))  # PEFT's merge_and_unload
    got = dict(expert_weights(src, "lora"))
    base = load_file(str(tiny_models["base"] / "model.safetensors"))
    changed = [n for n in merged if not torch.equal(merged[n], base[n])]
    assert len(changed) == 14  # 7 projections x 2 layers
    for n in merged:
        torch.testing.assert_close(got[n], merged[n], atol=1e-6, rtol=1e-5)
    with pytest.raises(TwinError, match="unknown expert 'nope'"):
        next(expert_weights(src, "nope"))


def test_sources_refuse_a_changed_expert(tiny_artifact, tiny_models) -> None:
    manifest = Artifact.open(tiny_artifact).manifest
    with pytest.raises(TwinError, match="expert 'math' at .* is not the one the artifact was split from"):
        sources_of(manifest, experts={"math": tiny_models["code"]})
    sources_of(manifest, experts={"math": tiny_models["code"]}, check_fingerprints=False)
    with pytest.raises(TwinError, match="pass --base PATH"):
        sources_of(manifest, base=tiny_models["root"] / "moved")


def test_plain_model_assign_checks_names_shapes_and_coverage(tiny_artifact) -> None:
    plain = PlainModel.load(Artifact.open(tiny_artifact).core_dir)
    core = _core(tiny_artifact)
    with pytest.raises(TwinError, match="weight model.bogus is not a weight"):
        plain.assign([("model.bogus", torch.zeros(1))])
    with pytest.raises(TwinError, match="has shape \\[2\\], the model's is"):
        plain.assign([("model.norm.weight", torch.zeros(2))])
    with pytest.raises(TwinError, match="left 1 model tensor\\(s\\) unset, e.g. model.norm.weight"):
        plain.assign([(n, t) for n, t in core.items() if n != "model.norm.weight"])
    plain.assign(core.items())  # the tied lm_head is covered by the embedding
    assert torch.equal(plain.model.lm_head.weight, core["model.embed_tokens.weight"])


def test_plain_decoding_is_transformers_greedy(tmp_path) -> None:
    """Batched, left-padded, continuous batching through the Engine == generate() one prompt at a time."""
    from tiny import make_base

    make_base(tmp_path / "base", seed=1, initializer_range=0.3)  # sharp logits: replies differ by prompt
    plain = PlainModel.load(tmp_path / "base")
    prompts = [({"role": "user", "content": c},) for c in
               ("what is two plus three", "hello", "write a python function that adds", "bonjour le monde")]
    got = generate(plain, prompts, max_new_tokens=6, batch_size=3)
    tok = plain.tokenizer
    expected, tokens = [], 0
    for p in prompts:
        ids = tok(tok.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = plain.model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids.shape[1]:]
        tokens += len(new)
        expected.append(tok.decode(new, skip_special_tokens=True))
    assert got.texts == expected and len(set(expected)) > 1
    assert got.tokens == tokens and got.tokens_per_s > 0
    with pytest.raises(ValueError, match="mix has shape \\[4, 1\\], expected \\[4, 0\\]"):
        generate(plain, prompts, torch.ones(4, 1), max_new_tokens=2, batch_size=2)
    with pytest.raises(ValueError, match="no experts to mix"):
        plain.set_mix(torch.ones(4, 1))


# ---- grids, routing, mapping, task files ----------------------------------------------------------------

def test_grid_points_are_resolved_and_filtered() -> None:
    assert grid_points("average", "quick", 3) == [{}]
    assert grid_points("task_arithmetic", "quick", 3) == [{"scaling": 0.3}, {"scaling": 0.5}, {"scaling": 1.0}]
    assert grid_points("dare_ties", "quick", 3)[0] == {"scaling": 1.0, "density": 0.3, "seed": 0}
    full = grid_points("consensus", "full", 2)
    assert len(full) == 4 and all(p["k"] == 2 and p["tall_lambda"] == 0.4 for p in full)
    assert len(grid_points("consensus", "full", 3)) == 8 and len(grid_points("ties", "full", 3)) == 12
    with pytest.raises(TwinError, match="consensus needs at least 2 experts"):
        grid_points("consensus", "quick", 1)
    for grid in GRIDS.values():  # every grid value is one the registry accepts
        for method in grid:
            grid_points(method, "quick", 3)


def test_parse_methods_and_best_point() -> None:
    assert parse_methods("ties, dare_ties") == ("ties", "dare_ties") and parse_methods("none") == ()
    with pytest.raises(TwinError, match="unknown merge method\\(s\\) slerp"):
        parse_methods("ties,slerp")
    with pytest.raises(TwinError, match="names ties more than once"):
        parse_methods("ties,ties")
    assert best_point([0.2, 0.5, 0.5, 0.1]) == 1 and best_point([0.0]) == 0


def test_router_hits_need_the_strictly_largest_weight() -> None:
    experts = ["a", "b", "c"]
    w = torch.tensor([[0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [1 / 3] * 3, [0.0, 0.0, 0.0], [0.1, 0.1, 0.8]])
    assert router_hits(w, ["a", "a", "b", "c", "c"], experts) == [True, False, False, False, True]
    assert one_hot_mixes(["b", "a"], experts).tolist() == [[0, 1, 0], [1, 0, 0]]


def test_task_experts_mapping() -> None:
    assert task_experts(["math", "prose"], ["math", "chat"], {"prose": "chat"}) == {"math": "math", "prose": "chat"}
    with pytest.raises(TwinError, match="task\\(s\\) prose, poems have no expert of the same name"):
        task_experts(["math", "prose", "poems"], ["math", "chat"], {})
    with pytest.raises(TwinError, match="names task\\(s\\) not in the suite: code"):
        task_experts(["math"], ["math"], {"code": "math"})


def test_read_split_limit_is_a_prefix_and_errors_name_the_line(tmp_path) -> None:
    f = tmp_path / "test.jsonl"
    rows = [{"task": "t", "messages": [{"role": "user", "content": f"q{i}"}], "answer": f"a{i}"} for i in range(3)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"task": "u", "messages": [], "answer": "x"}\n')
    assert [e.answer for e in read_split(f, "t", limit=2)] == ["a0", "a1"]
    with pytest.raises(TwinError, match=f"{f}:4: 'task' is 'u', expected 't'"):
        read_split(f, "t")
    f.write_text('{"task": "t", "messages": [{"role": "user"}], "answer": "x"}\n')
    with pytest.raises(TwinError, match=":1: message 0 must have a string 'role' and a string 'content'"):
        read_split(f, "t")


# ---- the report's table arithmetic ----------------------------------------------------------------------

def _result(scores: dict[str, dict[str, float]]) -> EvalResult:
    arms = [ArmResult(name, name.split(":")[0], row, {t: [] for t in row}, tokens=10, seconds=2.0,
                      stored_bytes=2**20) for name, row in scores.items()]
    return EvalResult(artifact="A", tasks_dir="T", tasks=[Task("x", "exact"), Task("y", "exact"), Task("z", "exact")],
                      expert_of_task={"x": "x", "y": "y", "z": "z"}, examples={"x": 4, "y": 4, "z": 4}, arms=arms,
                      selections=[], router=None, options=EvalOptions(methods=()))


def test_report_normalizes_by_the_own_expert_and_leaves_out_undefined_tasks() -> None:
    res = _result({
        "expert:x": {"x": 0.8, "y": 0.1, "z": 0.0},
        "expert:y": {"x": 0.2, "y": 0.5, "z": 0.3},
        "expert:z": {"x": 0.0, "y": 0.0, "z": 0.0},   # own expert of z scores 0: z is undefined
        "twin:oracle": {"x": 0.6, "y": 0.75, "z": 0.5},
    })
    doc = to_json(res)
    assert doc["undefined_tasks"] == ["z"]
    tw = doc["arms"]["twin:oracle"]
    assert tw["normalized"] == {"x": pytest.approx(0.75), "y": pytest.approx(1.5), "z": None}
    assert tw["mean_normalized"] == pytest.approx((0.75 + 1.5) / 2)
    assert tw["mean_score"] == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    assert doc["arms"]["expert:y"]["normalized"]["x"] == pytest.approx(0.25)
    assert tw["tokens_per_s"] == 5.0 and tw["stored_bytes"] == 2**20
    text = json.dumps(doc, allow_nan=False)  # NaN never reaches the JSON
    assert "NaN" not in text
    md = markdown(res)
    row = next(line for line in md.splitlines() if line.startswith("| twin:oracle |"))
    assert row == "| twin:oracle | 0.600 (0.75) | 0.750 (1.50) | 0.500 (n/a) | 0.617 | 1.125 | 1.0 | 5.0 |"
    assert "own expert scored 0 on z" in md


def test_report_tells_a_rank_just_under_the_target_from_one_that_reaches_it() -> None:
    res = _result({"expert:x": {"x": 1, "y": 0, "z": 0}, "expert:y": {"x": 0, "y": 1, "z": 0},
                   "expert:z": {"x": 0, "y": 0, "z": 1}})
    res.twin_ranks = [RankSearch("core", {1: 0.99036}, 0.99), RankSearch("merge:mats", {1: 0.98979, 2: 1.0128}, 0.99)]
    lines = [n for n in notes(res) if n.startswith("twin on")]
    assert lines == ["twin on the artifact's core: rank 1 reaches 0.99 of the experts' score (rank 1: 0.9904)",
                     "twin on the merge:mats core: rank 2 reaches 0.99 of the experts' score "
                     "(rank 1: 0.9898, rank 2: 1.0128)"]


def test_report_refuses_a_table_without_the_own_expert() -> None:
    with pytest.raises(TwinError, match="the expert 'expert:z' of task 'z' has no row"):
        to_json(_result({"expert:x": {"x": 1, "y": 1, "z": 1}, "expert:y": {"x": 1, "y": 1, "z": 1}}))
