"""HiddenStateRouter over the tiny artifact's core: the paper's feature, accuracy, reuse of a loaded model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import copy_artifact, examples
from router import CoreEncoder, HiddenStateRouter, TrainConfig, evaluate_router, load_router, save_router, train_router
from router.encoders import mean_pool, pad_right
from twinrt.artifact import Artifact

FRESH = examples(15, seed=1)


@pytest.fixture(scope="module")
def core(tiny_artifact) -> CoreEncoder:
    return CoreEncoder.from_dir(Artifact.open(tiny_artifact).core_dir)


@pytest.fixture(scope="module")
def outcome(tiny_artifact, core):
    return train_router(Artifact.open(tiny_artifact), examples(45, seed=0), TrainConfig(kind="hidden", seed=0),
                        encoder=core)


def test_mean_pool_and_pad_right_on_hand_values() -> None:
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    h = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)          # [B=2, T=3, D=2]
    torch.testing.assert_close(mean_pool(h, mask), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))


def test_feature_is_the_masked_mean_of_the_causal_lms_last_hidden_state(tiny_artifact, core) -> None:
    art = Artifact.open(tiny_artifact)
    model = AutoModelForCausalLM.from_pretrained(art.core_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(art.core_dir)
    texts = ["what is two plus three", "def add(a, b): return a + b  # a longer input than the first"]
    expected = []
    for t in texts:                                                       # one at a time: no padding at all
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states[-1]   # [1, T, D]
        expected.append(hs[0].mean(0))
    torch.testing.assert_close(core.encode(texts), torch.stack(expected), atol=1e-5, rtol=1e-5)
    # padding invariance: a short text batched with a long one gets the same feature as alone
    torch.testing.assert_close(core.encode(texts)[0], core.encode(texts[:1])[0], atol=1e-5, rtol=1e-5)


def test_hidden_router_reaches_95_percent(outcome) -> None:
    assert isinstance(outcome.router, HiddenStateRouter) and outcome.router.kind == "hidden"
    assert outcome.router.head.spec() == {"type": "mlp", "dim": 32, "n": 3, "hidden": 64}
    assert outcome.evaluation.accuracy >= 0.95, outcome.evaluation
    assert evaluate_router(outcome.router, FRESH).accuracy >= 0.95
    res = outcome.router.route([ex.input for ex in FRESH] + ["", [{"role": "user", "content": "What is 2 + 9?"}]])
    assert (res.weights >= 0).all() and res.rules[-2] == "fallback"
    torch.testing.assert_close(res.weights.sum(-1), torch.ones(len(FRESH) + 2))


def test_long_input_is_truncated_to_the_cores_positions(core) -> None:
    assert core.max_length == 128                                         # the tiny Llama's max positions
    long = "sum the numbers 1 2 3 " * 400
    first = core.tokenizer.decode(core.tokenizer(long)["input_ids"][:128])
    torch.testing.assert_close(core.encode([long]), core.encode([first]), atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_and_loaded_model_reuse(outcome, tiny_artifact, tmp_path) -> None:
    art = Artifact.open(copy_artifact(tiny_artifact, tmp_path / "artifact"))
    save_router(outcome.router, art, {"k": 1})
    cfg = json.loads((art.router_dir / "router.json").read_text())
    assert cfg["encoder"] == {"type": "core", "ref": "core", "dim": 32, "max_length": 128}
    inputs = [ex.input for ex in FRESH]
    before = outcome.router.route(inputs)
    from_dir = load_router(art)
    assert isinstance(from_dir, HiddenStateRouter)
    after = from_dir.route(inputs)
    assert torch.equal(before.weights, after.weights) and torch.equal(before.logits, after.logits)
    reused = load_router(art, model=outcome.router.encoder.model, tokenizer=outcome.router.encoder.tokenizer)
    assert reused.encoder.model is outcome.router.encoder.model
    assert torch.equal(reused.route(inputs).weights, before.weights)
