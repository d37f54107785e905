"""Static merges served beside the twin (`twinrt static add`, `statics:` in the split config): the arm
static:<label> equals the same merge built with twinrt.merge and run as a plain transformers model; LoRA
experts over a linear core store it as exact factors; in one mixed batch with the twin, experts and the core
each row equals itself alone; bad input is one line and exit 2 with the artifact untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import write_config
from tiny import make_full_expert
from twinrt import TwinModel
from twinrt.artifact import Artifact
from twinrt.artifact.manifest import DenseInfo, FactorInfo
from twinrt.cli import main
from twinrt.config import load_config
from twinrt.errors import TwinError
from twinrt.merge import get_method, merge_tensor
from twinrt.split.run import split
from twinrt.split.static import add_static, remove_static

IDS = torch.tensor([[5, 9, 33, 7, 101, 64], [12, 3, 3, 250, 17, 8]])


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "model.safetensors")


def reference_merge(base: Path, experts: list[Path], method: str, params: dict) -> torch.nn.Module:
    """θ_base + merge(τ) of every float tensor, with twinrt.merge, in a plain transformers model of the base."""
    m = get_method(method)
    resolved = m.resolve(params)
    theta_base = weights(base)
    per_expert = [weights(e) for e in experts]
    merged = {}
    for name, b in theta_base.items():
        tau = torch.stack([w[name].float() - b.float() for w in per_expert])
        merged[name] = (b.float() + merge_tensor(m, resolved, name, tau).tau).to(b.dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(merged, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # the tied head follows the embeddings
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def make(tiny_models, root: Path, experts: dict[str, str], shared: dict, statics=()) -> Path:
    cfg = write_config(root / "s.yaml", tiny_models["base"], {n: tiny_models[k] for n, k in experts.items()},
                       shared, {"rank": 4})
    if statics:
        import yaml

        data = yaml.safe_load(cfg.read_text())
        data["statics"] = list(statics)
        cfg.write_text(yaml.safe_dump(data))
    split(load_config(cfg), root / "art")
    return root / "art"


FULL = ("math", "code", "chat")


@pytest.fixture(scope="module")
def far(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """Full experts far enough apart that the arms decode different tokens (the session's are 5% apart)."""
    root = tmp_path_factory.mktemp("far")
    for i, name in enumerate(FULL):
        make_full_expert(tiny_models["base"], root / name, seed=100 + i, scale=0.5)
    return {**tiny_models, **{n: root / n for n in FULL}}


@pytest.fixture(scope="module")
def full(far, tmp_path_factory) -> Path:
    """Three full experts, a task-arithmetic core, and static merges declared in the split config."""
    return make(far, tmp_path_factory.mktemp("static-full"), {n: n for n in FULL},
                {"method": "task_arithmetic", "scaling": 0.3},
                statics=[{"label": "ties", "method": "ties", "density": 0.2},
                         {"label": "dare", "method": "dare_ties", "density": 0.5, "seed": 3}])


@pytest.mark.parametrize("label,method,params", [("ties", "ties", {"density": 0.2}),
                                                 ("dare", "dare_ties", {"density": 0.5, "seed": 3})])
def test_a_static_arm_equals_the_merge_as_a_plain_model(full, far, label, method, params):
    want = logits(reference_merge(far["base"], [far[n] for n in FULL], method, params))
    tm = TwinModel.from_artifact(full)
    assert tm.statics == ["static:ties", "static:dare"] and tm.experts == ["math", "code", "chat"]
    got = tm.forward(IDS, mix=[{f"static:{label}": 1.0}] * 2)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    core = tm.forward(IDS)
    assert (core - want).abs().max() > 1e-3  # the arm is not the core
    st = Artifact.open(full).manifest.static(label)
    assert (st.method, st.params["density"]) == (method, params["density"])
    assert st.size.dense > 0 and all(isinstance(i, DenseInfo) for i in st.tensors.values())  # full experts: dense


def test_lora_experts_over_a_linear_core_store_exact_factors(tiny_models, tmp_path):
    art = make(tiny_models, tmp_path, {"a": "lora_a", "b": "lora_b"}, {"method": "task_arithmetic", "scaling": 0.3})
    m = add_static(art, "avg", "average", {})
    st = m.static("avg")
    factored = [i for i in st.tensors.values() if isinstance(i, FactorInfo)]
    assert factored and all(i.path == "exact" and 0 < i.rank <= 4 + 6 for i in factored)  # ≤ Σ of the LoRA ranks
    assert st.size.dense == 0  # LoRA leaves everything else as the base: Δ is zero there
    want = logits(reference_merge(tiny_models["base"], [tiny_models["lora_a_merged"], tiny_models["lora_b_merged"]],
                                  "average", {}))
    got = TwinModel.from_artifact(art).forward(IDS, mix=[{"static:avg": 1.0}] * 2)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    m = add_static(art, "ties", "ties", {"density": 0.5})  # a non-linear merge of LoRA experts is full rank
    assert m.static("ties").size.dense > 0


def test_static_arms_twin_experts_and_core_in_one_batch_equal_each_row_alone(full):
    tm = TwinModel.from_artifact(full)
    rows = [{"static:ties": 1.0}, {"math": 0.5, "chat": 0.5}, {"code": 1.0}, {}, {"static:dare": 1.0}]
    ids = IDS[[0, 1, 0, 1, 1]]
    together = tm.forward(ids, mix=rows)
    for b, row in enumerate(rows):
        alone = tm.forward(ids[b:b + 1], mix=[row] if row else None)
        assert torch.allclose(together[b:b + 1], alone, atol=1e-5, rtol=0), (b, row)
    with pytest.raises(ValueError, match="served alone at weight 1"):
        tm.forward(IDS, mix=[{"static:ties": 1.0, "math": 0.5}, {}])
    with pytest.raises(ValueError, match="served alone at weight 1"):
        tm.forward(IDS, mix=[{"static:ties": 0.5}, {}])
    out = tm.generate(["the capital of france is"] * 3, mix=[{"static:ties": 1.0}, {"code": 1.0}, {}],
                      max_new_tokens=5)
    assert out[0] == tm.generate(["the capital of france is"], mix=[{"static:ties": 1.0}], max_new_tokens=5)[0]


def test_inspect_shows_each_static_arm_and_its_bytes(full, capsys):
    assert main(["inspect", str(full)]) == 0
    out = capsys.readouterr().out
    assert "static:ties" in out and "static:dare" in out and "ties" in out


def test_remove_and_bad_input(full, far, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(full, art)
    before = sorted((p.relative_to(art), p.read_bytes()) for p in art.rglob("*") if p.is_file())
    cases = [(["static", "add", art, "ties", "--method", "ties"], "already in"),
             (["static", "add", art, "x", "--method", "nope"], "nope"),
             (["static", "add", art, "x", "--method", "ties", "--set", "density=2"], "density"),
             (["static", "add", art, "x", "--method", "ties", "--set", "densty=0.2"], "densty"),
             (["static", "add", art, "x", "--method", "fisher"], "calibration statistics"),
             (["static", "add", art, "../x", "--method", "ties"], "static label"),
             (["static", "add", art, "x", "--method", "ties", "--set", "density"], "KEY=VALUE"),
             (["static", "remove", art, "nope"], "unknown static merge")]
    for args, message in cases:
        code = main([str(a) for a in args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and message in err, (args, err)
    assert sorted((p.relative_to(art), p.read_bytes()) for p in art.rglob("*") if p.is_file()) == before
    m = remove_static(art, "dare")
    assert m.static_labels == ["ties"] and not (art / "static" / "dare").exists()
    Artifact.open(art)  # verifies
    assert main(["static", "add", str(art), "ta", "--method", "task_arithmetic", "--set", "scaling=0.5"]) == 0
    assert "added static:ta" in capsys.readouterr().out
    assert Artifact.open(art).manifest.static("ta").params == {"scaling": 0.5}  # --set values are numbers
    with pytest.raises(TwinError, match="source .* does not exist"):
        moved = tmp_path / "moved"
        shutil.copytree(art, moved)
        shutil.move(far["chat"], tmp_path / "chat-away")
        try:
            add_static(moved, "y", "ties", {})
        finally:
            shutil.move(tmp_path / "chat-away", far["chat"])


# ---- served ----------------------------------------------------------------------------------------------------

def test_static_arms_are_served_listed_and_ab_tested(full, tmp_path):
    import httpx
    from openai import OpenAI

    from helpers import start
    from serving.server import ServeOptions

    tm = TwinModel.from_artifact(full)
    want = {arm: tm.generate(["what is two plus three"], mix=mix, max_new_tokens=6)[0]
            for arm, mix in (("static:ties", [{"static:ties": 1.0}]), ("static:dare", [{"static:dare": 1.0}]),
                             ("core", None))}
    assert len(set(want.values())) == 3  # the arms decode differently, so a mix-up shows
    live = start(ServeOptions(artifact=full, ab="twin=1,static:ties=1", log=tmp_path / "routing.jsonl",
                              max_batch=8))
    try:
        client = OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        models = {m.id: m for m in client.models.list().data}
        assert {"static:ties", "static:dare"} <= set(models)
        assert models["static:ties"].model_extra["twinrt"] == {"kind": "static", "method": "ties",
                                                                "params": Artifact.open(full).manifest
                                                                .static("ties").params}
        for arm in want:
            res = client.completions.create(model=arm, prompt="what is two plus three", max_tokens=6, temperature=0)
            assert res.choices[0].text == want[arm], arm
            assert res.model_extra["routing"]["arm"] == arm
        arms = {client.completions.create(model="ab", prompt="hi", max_tokens=1, temperature=0, user=f"u{i}")
                .model_extra["routing"]["arm"] for i in range(16)}
        assert arms == {"twin", "static:ties"}
        bad = httpx.post(live.url + "/v1/completions", json={"model": "static:ties", "prompt": "hi", "max_tokens": 1,
                                                              "routing": {"expert": "math"}})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "routing"
        missing = httpx.post(live.url + "/v1/completions", json={"model": "static:nope", "prompt": "hi"})
        assert missing.status_code == 404 and "static:ties" in missing.json()["error"]["message"]
    finally:
        live.stop()
    records = [json.loads(line) for line in (tmp_path / "routing.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in records} >= {"static:ties", "static:dare", "twin"}


@pytest.mark.parametrize("statics,message", [
    ([{"label": "x", "method": "fisher"}], "statics['x']: method 'fisher' needs calibration statistics"),
    ([{"label": "x", "method": "ties", "densty": 0.2}], "densty"),
    ([{"label": "x", "method": "ties"}, {"label": "x", "method": "average"}], "duplicate static labels: x"),
    ([{"label": "../x", "method": "ties"}], "must be 1-64 letters"),
])
def test_bad_statics_in_the_split_config_are_refused_by_name(tiny_models, statics, message):
    from twinrt.config import parse_config

    data = {"base": str(tiny_models["base"]), "experts": [{"name": "math", "path": str(tiny_models["math"])}],
            "shared": {"method": "average"}, "exclusive": {"rank": 4}, "statics": statics}
    with pytest.raises(TwinError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_config(data)
