"""The split reproduces the experts (exactly at full rank, at the Eckart–Young optimum at rank r), and LoRA
experts give the same artifact as their merged checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import EXPERTS, core_plus_expert, write_config
from twinrt.artifact import Artifact
from twinrt.config import load_config
from twinrt.split.run import split


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_rank_reproduces_each_expert_through_peft(tiny_artifact_full_rank, tiny_models):
    art = Artifact.open(tiny_artifact_full_rank)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    for name in EXPERTS:
        expert = AutoModelForCausalLM.from_pretrained(tiny_models[name], dtype=torch.float32).eval()
        want = _logits(expert, ids)
        got = _logits(core_plus_expert(art, name), ids)
        rel = (got - want).abs().max() / want.abs().max()
        assert rel < 1e-4, (name, float(rel))
        # and the core alone is clearly not the expert, so the check above has teeth
        core = AutoModelForCausalLM.from_pretrained(art.core_dir, dtype=torch.float32).eval()
        assert (_logits(core, ids) - want).abs().max() / want.abs().max() > 1e-2


def test_rank_r_error_is_the_svd_tail(tiny_artifact, tiny_models):
    art = Artifact.open(tiny_artifact)
    core = load_file(art.core_dir / "model.safetensors")
    checked = 0
    for name in EXPERTS:
        expert = load_file(tiny_models[name] / "model.safetensors")
        factors = art.load_factors(name)
        for weight, info in art.manifest.factored(name).items():
            d = expert[weight].double() - core[weight].double()  # expert − core
            a, b = factors[weight]
            assert a.shape == (info.rank, d.shape[1]) and b.shape == (d.shape[0], info.rank)
            s = torch.linalg.svdvals(d)
            tail = s[info.rank:].pow(2).sum().sqrt()
            err = (d - b.double() @ a.double()).norm()
            assert abs(err - tail) <= 1e-4 * tail, (weight, float(err), float(tail))
            kept = float(s[: info.rank].pow(2).sum() / s.pow(2).sum())
            assert abs(kept - info.energy) < 1e-5
            checked += 1
    assert checked == 3 * 14
    ranks = {w: i.rank for w, i in art.manifest.factored("math").items()}
    assert ranks["model.layers.0.self_attn.q_proj.weight"] == 4  # GQA k/v are [16, 32]: rank 4 fits


def test_dense_deltas_are_exact(tiny_artifact, tiny_models):
    art = Artifact.open(tiny_artifact)
    core = load_file(art.core_dir / "model.safetensors")
    expert = load_file(tiny_models["code"] / "model.safetensors")
    dense = art.load_dense("code")
    assert set(dense) == {n for n, t in art.manifest.tensors.items() if t.role == "dense"}
    for k, d in dense.items():
        torch.testing.assert_close(core[k] + d, expert[k], rtol=0, atol=1e-6)


def test_energy_mode_picks_the_smallest_rank(tiny_models, tmp_path):
    cfg = write_config(tmp_path / "s.yaml", tiny_models["base"], {"math": tiny_models["math"]},
                       {"method": "average"}, {"energy": 0.9})
    m = split(load_config(cfg), tmp_path / "art")
    core = load_file(tmp_path / "art" / "core" / "model.safetensors")
    expert = load_file(tiny_models["math"] / "model.safetensors")
    for weight, info in m.factored("math").items():
        s2 = torch.linalg.svdvals((expert[weight] - core[weight]).double()).pow(2)
        share = torch.cumsum(s2, 0) / s2.sum()
        assert share[info.rank - 1] >= 0.9 - 1e-9
        assert info.rank == 1 or share[info.rank - 2] < 0.9


def _tensors(art_dir: Path, name: str) -> dict[str, torch.Tensor]:
    art = Artifact.open(art_dir)
    out = {f"dense:{k}": v for k, v in art.load_dense(name).items()}
    out.update({f"ba:{k}": b @ a for k, (a, b) in art.load_factors(name).items()})
    return out


@pytest.mark.parametrize("method", [{"method": "ties", "density": 0.5}, {"method": "dare_ties", "seed": 3}])
def test_lora_experts_equal_their_merged_checkpoints(tiny_models, tmp_path, method):
    arts = {}
    for kind, suffix in (("adapters", ""), ("merged", "_merged")):
        experts = {"a": tiny_models["lora_a" + suffix], "b": tiny_models["lora_b" + suffix]}
        cfg = write_config(tmp_path / f"{kind}.yaml", tiny_models["base"], experts, method, {"rank": 6})
        split(load_config(cfg), tmp_path / kind)
        arts[kind] = tmp_path / kind
    core_a = load_file(arts["adapters"] / "core" / "model.safetensors")
    core_m = load_file(arts["merged"] / "core" / "model.safetensors")
    assert core_a.keys() == core_m.keys()
    for k in core_a:
        torch.testing.assert_close(core_a[k], core_m[k], rtol=0, atol=1e-6)
    for name in ("a", "b"):
        ta, tm = _tensors(arts["adapters"], name), _tensors(arts["merged"], name)
        assert ta.keys() == tm.keys() and ta
        for k in ta:
            torch.testing.assert_close(ta[k], tm[k], rtol=0, atol=1e-5)
    kinds = [e.kind for e in Artifact.open(arts["adapters"]).manifest.experts]
    assert kinds == ["lora", "lora"]


def test_lora_experts_build_no_stack_for_the_tensors_they_leave_alone(tiny_models, tmp_path, monkeypatch):
    """Embeddings and norms of LoRA experts are the base's: the split copies them without an [N, ...] stack of
    zero task vectors (what made its peak memory grow with N), and records that no expert changes them."""
    import twinrt.split.run as run

    stacked = []
    real = run.task_vectors
    monkeypatch.setattr(run, "task_vectors", lambda experts, name, *a: stacked.append(name) or real(experts, name, *a))
    experts = {"a": tiny_models["lora_a"], "b": tiny_models["lora_b"]}
    cfg = write_config(tmp_path / "s.yaml", tiny_models["base"], experts, {"method": "ties", "density": 0.5},
                       {"rank": 4})
    m = split(load_config(cfg), tmp_path / "art")
    untouched = [n for n, t in m.tensors.items() if t.role == "dense"]
    assert "model.embed_tokens.weight" in untouched and not set(untouched) & set(stacked)
    assert stacked and all(".mlp." in n or ".self_attn." in n for n in stacked)
    base = load_file(tiny_models["base"] / "model.safetensors")
    core = load_file(tmp_path / "art" / "core" / "model.safetensors")
    for n in untouched:
        assert torch.equal(core[n], base[n]) and all(not i.stored for i in m.tensors[n].experts.values())
