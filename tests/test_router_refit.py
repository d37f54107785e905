"""The router follows the artifact's expert set: `twinrt add --router-data` refits it with the new expert's
examples on top of the stored training features, `twinrt remove` refits it from them alone; a prototype
router without stored features refits its centroids; one that cannot be refitted is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import examples, write_config
from router import TrainConfig, evaluate_router, load_router, save_router, train_router
from twinrt.artifact import Artifact
from twinrt.cli import main
from twinrt.config import load_config
from twinrt.split.run import split


@pytest.fixture(scope="module")
def two(tiny_models, tmp_path_factory) -> Path:
    """A math + code artifact (no router)."""
    root = tmp_path_factory.mktemp("refit")
    cfg = write_config(root / "s.yaml", tiny_models["base"], {n: tiny_models[n] for n in ("math", "code")},
                       {"method": "ties", "density": 0.5}, {"rank": 4})
    split(load_config(cfg), root / "art")
    return root / "art"


def with_router(src: Path, dst: Path, kind: str, *, features: bool = True) -> Path:
    shutil.copytree(src, dst)
    art = Artifact.open(dst)
    data = [ex for ex in examples(12, seed=0) if ex.label in art.experts]
    cfg = TrainConfig(kind=kind, epochs=100)
    out = train_router(art, data, cfg)
    save_router(out.router, art, out.training_record(cfg, "train.jsonl", "expert"),
                features=(out.features, out.labels) if features else None)
    return dst


def write_examples(path: Path, label: str, n: int, seed: int) -> Path:
    rows = [{"text": ex.input, "expert": ex.label} for ex in examples(n, seed=seed) if ex.label == label]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stored(art: Path) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(art / "router" / "features.safetensors")
    return t["features"], t["labels"]


def run(args: list, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_add_with_router_data_refits_the_trained_router(two, tiny_models, tmp_path, capsys):
    art = with_router(two, tmp_path / "art", "trained")
    old_feats, old_labels = stored(art)
    data = write_examples(tmp_path / "chat.jsonl", "chat", 10, seed=5)
    code, err = run(["add", art, f"chat={tiny_models['chat']}", "--router-data", data, "-q"], capsys)
    assert code == 0, err
    a = Artifact.open(art)  # verifies every checksum, the router's files included
    assert a.experts == ["math", "code", "chat"]
    feats, labels = stored(art)
    n_old = len(old_labels)
    assert torch.equal(feats[:n_old], old_feats) and torch.equal(labels[:n_old], old_labels)
    assert (labels[n_old:] == 2).all() and len(labels) == n_old + 10
    router = load_router(a)
    assert router.experts == a.experts and router.head.spec()["n"] == 3
    fresh = examples(8, seed=9)  # all three experts, unseen texts
    assert evaluate_router(router, fresh).accuracy >= 0.9
    assert "router refitted" in a.manifest.history[-1].note

    code, err = run(["remove", art, "code", "-q"], capsys)  # no data needed: the stored features suffice
    assert code == 0, err
    a = Artifact.open(art)
    feats, labels = stored(art)
    assert a.experts == ["math", "chat"] and load_router(a).experts == ["math", "chat"]
    assert sorted(set(labels.tolist())) == [0, 1] and len(labels) == n_old + 10 - int((old_labels == 1).sum())


def test_a_prototype_router_without_features_refits_its_centroids(two, tiny_models, tmp_path, capsys):
    art = with_router(two, tmp_path / "art", "prototype", features=False)
    before = load_router(Artifact.open(art)).head.centroids.clone()
    data = write_examples(tmp_path / "chat.jsonl", "chat", 6, seed=5)
    code, err = run(["add", art, f"chat={tiny_models['chat']}", "--router-data", data, "-q"], capsys)
    assert code == 0, err
    router = load_router(Artifact.open(art))
    assert torch.equal(router.head.centroids[:2], before)  # the kept experts' centroids as they were
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    want = torch.nn.functional.normalize(torch.nn.functional.normalize(router.encoder.encode(texts), dim=-1)
                                         .mean(0), dim=-1)
    assert torch.allclose(router.head.centroids[2], want, atol=1e-5)
    assert router.route(["hi there, how was your weekend?"]).weights.argmax().item() == 2


def test_a_router_that_cannot_be_refitted_is_refused_by_name(two, tiny_models, tmp_path, capsys):
    art = with_router(two, tmp_path / "art", "trained", features=False)
    before = sorted(p.read_bytes() for p in art.rglob("*") if p.is_file())
    data = write_examples(tmp_path / "chat.jsonl", "chat", 4, seed=5)
    wrong = write_examples(tmp_path / "math.jsonl", "math", 4, seed=5)
    cases = [(["add", art, f"chat={tiny_models['chat']}", "--router-data", data], "keeps no training features"),
             (["add", art, f"chat={tiny_models['chat']}"], "--router-data FILE"),
             (["remove", art, "code"], "pass --drop-router"),
             (["add", art, f"chat={tiny_models['chat']}", "--router-data", data, "--drop-router"],
              "exclude each other")]
    for args, message in cases:
        code, err = run(args, capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(p.read_bytes() for p in art.rglob("*") if p.is_file()) == before
    assert not list(tmp_path.glob(".art.router-refit-*"))

    art2 = with_router(two, tmp_path / "art2", "trained")  # features kept, but no examples of the new expert
    code, err = run(["add", art2, f"chat={tiny_models['chat']}", "--router-data", wrong], capsys)
    assert code == 2 and "no examples of 'chat'" in err, err
    assert Artifact.open(art2).experts == ["math", "code"] and not list(tmp_path.glob(".art2.router-refit-*"))
    code, err = run(["add", two, f"chat={tiny_models['chat']}", "--router-data", data], capsys)
    assert code == 2 and "has no router to refit" in err, err
