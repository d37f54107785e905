"""EmbeddingRouter (real all-MiniLM-L6-v2): accuracy of both heads, save/load, bad inputs, offline loading."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from helpers import copy_artifact, examples
from router import (
    EmbeddingRouter,
    RoutingOptions,
    SentenceEncoder,
    TrainConfig,
    evaluate_router,
    load_router,
    save_router,
    train_router,
)
from router.store import CONFIG_FILE, WEIGHTS_FILE
from twinrt.artifact import Artifact
from twinrt.errors import TwinError
from twinrt.models import minilm_dir

FRESH = examples(12, seed=1)          # 36 prompts from another seed: never seen in training


class CachedMiniLM(SentenceEncoder):
    """MiniLM that remembers embeddings, so the tests encode each distinct text once (CPU time is shared)."""

    def __init__(self) -> None:
        super().__init__(minilm_dir())
        self.cache: dict[str, torch.Tensor] = {}

    def encode(self, texts):
        new = [t for t in texts if t not in self.cache]     # an empty cache encodes exactly `texts`
        if new:
            self.cache.update(zip(new, super().encode(new)))
        return torch.stack([self.cache[t] for t in texts]) if texts else super().encode(texts)


@pytest.fixture(scope="module")
def minilm() -> SentenceEncoder:
    return CachedMiniLM()


@pytest.fixture(scope="module")
def outcomes(tiny_artifact, minilm):
    art = Artifact.open(tiny_artifact)
    data = examples(45, seed=0)
    return {kind: train_router(art, data, TrainConfig(kind=kind, seed=0), encoder=minilm)
            for kind in ("prototype", "trained")}


@pytest.fixture(scope="module")
def saved(outcomes, tiny_artifact, tmp_path_factory):
    """A private artifact copy with the trained (linear-head) router installed."""
    art = Artifact.open(copy_artifact(tiny_artifact, tmp_path_factory.mktemp("emb") / "artifact"))
    save_router(outcomes["trained"].router, art, {"note": "test"})
    return art.path


@pytest.mark.parametrize("kind", ["prototype", "trained"])
def test_each_head_reaches_95_percent(outcomes, kind) -> None:
    out = outcomes[kind]
    assert isinstance(out.router, EmbeddingRouter) and out.router.kind == kind
    assert out.train_size == 108 and out.holdout_size == 27
    assert out.evaluation.accuracy >= 0.95, out.evaluation
    assert evaluate_router(out.router, FRESH).accuracy >= 0.95
    res = out.router.route([ex.input for ex in FRESH])
    assert res.weights.shape == (36, 3) and (res.weights >= 0).all()
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(36))
    assert 0.05 < out.router.temperature < 20


def test_options_apply_through_route(outcomes) -> None:
    r = outcomes["prototype"].router
    batch = ["What is 12 * 7?", "Write a Python function that parses JSON.", "Hi! How was your weekend?"]
    top1 = r.route(batch, RoutingOptions(top_k=1))
    assert top1.weights.tolist() == torch.eye(3).tolist()          # math, code, chat
    flat = r.route(batch, RoutingOptions(temperature=100.0, fallback_threshold=0.5, fallback="core"))
    assert flat.rules == ["fallback"] * 3 and flat.weights.abs().sum() == 0


def test_chat_is_routed_on_its_user_turns(outcomes) -> None:
    r = outcomes["trained"].router
    chat = [{"role": "system", "content": "You are a friendly assistant who loves small talk."},
            {"role": "user", "content": "Compute 17 * 23 + 4."},
            {"role": "assistant", "content": "Hello! Lovely weather today."}]
    res = r.route([chat, "Compute 17 * 23 + 4."])
    torch.testing.assert_close(res.weights[0], res.weights[1])
    assert r.experts[int(res.weights[0].argmax())] == "math"


def test_empty_inputs_take_the_fallback_row(outcomes) -> None:
    r = outcomes["trained"].router
    batch = ["", "   \n", [{"role": "system", "content": "no user turn"}], "What is 3 + 4?"]
    res = r.route(batch)
    assert res.rules[:3] == ["fallback"] * 3 and res.rules[3] == "router"
    third = torch.full((3, 3), 1 / 3)
    assert torch.equal(res.weights[:3], third) and torch.equal(res.probs[:3], third)
    assert res.logits[:3].abs().sum() == 0
    core = r.route(batch, RoutingOptions(fallback="core"))
    assert core.weights[:3].abs().sum() == 0
    assert r.route([]).weights.shape == (0, 3)


def test_very_long_input_is_truncated_not_crashed(outcomes, minilm) -> None:
    r = outcomes["trained"].router
    long = "What is 345 + 678? " + "Please also show every step of the addition. " * 2000
    res = r.route([long])
    assert res.rules == ["router"] and r.experts[int(res.weights.argmax())] == "math"
    head = minilm.model.tokenizer.decode(minilm.model.tokenizer(long)["input_ids"][1:minilm.max_length - 1])
    plain = SentenceEncoder.encode                  # uncached
    torch.testing.assert_close(plain(minilm, [long]), plain(minilm, [head]), atol=1e-4, rtol=0)


def test_save_load_round_trip_is_exact_and_portable(outcomes, saved, minilm) -> None:
    cfg = json.loads((saved / "router" / CONFIG_FILE).read_text())
    assert cfg["kind"] == "trained" and cfg["experts"] == ["math", "code", "chat"]
    assert cfg["encoder"] == {"type": "sentence-transformers", "ref": "minilm", "dim": 384, "max_length": 256}
    assert cfg["head"] == {"type": "mlp", "dim": 384, "n": 3, "hidden": 0, "scale": None}
    assert cfg["training"] == {"note": "test"} and cfg["temperature"] == outcomes["trained"].router.temperature
    assert str(minilm_dir()) not in (saved / "router" / CONFIG_FILE).read_text()
    art = Artifact.open(saved)                      # checksums include the router now
    assert "router/weights.safetensors" in art.manifest.files and art.manifest.sizes.router > 0
    loaded = load_router(art)
    assert isinstance(loaded, EmbeddingRouter) and loaded.kind == "trained"
    original = outcomes["trained"].router
    for k, v in original.head.state_dict().items():
        assert torch.equal(v, loaded.head.state_dict()[k]), k
    assert loaded.temperature == original.temperature and loaded.options == original.options
    inputs = [ex.input for ex in FRESH]
    minilm.cache.clear()                            # both encode this exact batch (padding changes last bits)
    before, after = original.route(inputs), loaded.route(inputs)
    assert torch.equal(before.weights, after.weights) and torch.equal(before.logits, after.logits)


def test_loading_never_touches_the_network(saved, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading a router")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert load_router(saved).route(["What is 2 + 2?"]).weights.shape == (1, 3)


def test_prototype_router_round_trips_too(outcomes, tiny_artifact, tmp_path) -> None:
    art = Artifact.open(copy_artifact(tiny_artifact, tmp_path / "artifact"))
    save_router(outcomes["prototype"].router, art)
    loaded = load_router(art)
    assert loaded.kind == "prototype"
    torch.testing.assert_close(loaded.head.centroids, outcomes["prototype"].router.head.centroids, atol=0, rtol=0)


def test_load_refuses_another_expert_order_and_broken_weights(saved, tmp_path) -> None:
    path = copy_artifact(saved, tmp_path / "artifact")
    cfg_file = path / "router" / CONFIG_FILE
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps(cfg | {"experts": ["code", "math", "chat"]}))
    with pytest.raises(TwinError, match="does not match its sha256"):
        load_router(path)                           # an edited router is caught by the manifest first
    with pytest.raises(TwinError, match=r"trained for experts \['code', 'math', 'chat'\]"):
        load_router(Artifact.open(path, verify=False))
    cfg_file.write_text(json.dumps(cfg | {"kind": "hidden"}))
    with pytest.raises(TwinError, match="malformed.*kind 'hidden' needs encoder 'core'"):
        load_router(Artifact.open(path, verify=False))
    cfg_file.write_text(json.dumps(cfg | {"format": "twinrt-router/9"}))
    with pytest.raises(TwinError, match="not supported"):
        load_router(Artifact.open(path, verify=False))
    cfg_file.write_text(json.dumps(cfg | {"head": cfg["head"] | {"dim": 100}}))
    with pytest.raises(TwinError, match="does not match the head"):
        load_router(Artifact.open(path, verify=False))
    (path / "router" / WEIGHTS_FILE).unlink()
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(TwinError, match="missing"):
        load_router(Artifact.open(path, verify=False))


def test_no_router_is_a_clear_error(tiny_artifact) -> None:
    with pytest.raises(TwinError, match="no router"):
        load_router(tiny_artifact)


def test_custom_encoder_is_copied_into_the_artifact(outcomes, tiny_artifact, tmp_path) -> None:
    custom = tmp_path / "my-encoder"
    custom.mkdir()
    for f in minilm_dir().iterdir():                # a "different" encoder dir: links to MiniLM's files
        (custom / f.name).symlink_to(f)
    enc = SentenceEncoder(custom)
    r = EmbeddingRouter(["math", "code", "chat"], enc, outcomes["prototype"].router.head)
    art = Artifact.open(copy_artifact(tiny_artifact, tmp_path / "artifact"))
    cfg = save_router(r, art)
    assert cfg.encoder.ref == "encoder" and (art.router_dir / "encoder" / "model.safetensors").is_file()
    assert not (art.router_dir / "encoder" / "model.safetensors").is_symlink()
    assert load_router(art).route(["What is 2 + 2?"]).weights.argmax() == 0
