"""Router methods meant to hold on unseen phrasings: template recombination of the routing data and the
training-free Arrow router from the experts' factors."""

from __future__ import annotations

import torch

from router.arrow import ArrowEncoder, arrow_scores, prototypes, read_factors, top_right_singular
from router.augment import augment
from router.synthetic import make_prompts


def test_augment_is_deterministic_in_its_seed_and_keeps_labels() -> None:
    pairs = make_prompts(20, seed=1)
    texts, labels = [t for t, _ in pairs], [e for _, e in pairs]
    a = augment(texts, labels, copies=3, seed=5)
    assert a == augment(texts, labels, copies=3, seed=5)
    assert a != augment(texts, labels, copies=3, seed=6)
    assert 0 < len(a) <= 3 * len(texts) and not {t for t, _ in a} & set(texts)
    vocab = {e: {w for t, y in pairs if y == e for w in t.split()} for e in set(labels)}
    for text, label in a:                           # built from its own expert's prompts only
        assert set(text.split()) <= vocab[label], (text, label)
    assert augment(texts, labels, copies=0) == []


def _planted_expert(u: dict[str, torch.Tensor], gen: torch.Generator, d_out: int = 24, r: int = 4):
    """Per layer (B, A) whose ΔW = B A responds most to the input direction u[layer] (a strong planted
    component plus small noise of full rank r)."""
    out = {}
    for lay, direction in u.items():
        b = torch.randn(d_out, r, generator=gen)
        a = 0.05 * torch.randn(r, direction.numel(), generator=gen)
        a[0] += 3.0 * direction
        out[lay] = (b, a)
    return out


def test_top_right_singular_vector_matches_a_dense_svd() -> None:
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(20, 3, generator=gen), torch.randn(3, 16, generator=gen)
    v = torch.linalg.svd(b @ a).Vh[0]
    got = top_right_singular(b, a)
    assert torch.allclose(got.abs(), v.abs(), atol=1e-5) and abs(float(got @ v)) > 0.9999


def test_arrow_ranks_each_tiny_expert_first_on_inputs_built_to_activate_its_factors() -> None:
    gen = torch.Generator().manual_seed(1)
    layers, d_in, n = ["l0.q", "l0.v", "l1.q"], 32, 3
    dirs = [{lay: torch.nn.functional.normalize(torch.randn(d_in, generator=gen), dim=0) for lay in layers}
            for _ in range(n)]
    protos = prototypes([_planted_expert(d, gen) for d in dirs])
    assert set(protos) == set(layers) and protos["l0.q"].shape == (n, d_in)
    # each input row b: tokens along expert b's direction at every layer, plus noise; a padded tail of junk
    t = 5
    inputs = {lay: torch.stack([dirs[e][lay] + 0.3 * torch.randn(t, d_in, generator=gen) for e in range(n)])
              for lay in layers}                                      # [N, T, d_in]
    mask = torch.ones(n, t)
    mask[:, -1] = 0
    for lay in layers:
        inputs[lay][:, -1] = 50 * dirs[1][lay]                     # padding along expert 1: must not count
    logits = arrow_scores(protos, inputs, mask)
    assert logits.shape == (n, n)
    assert logits.argmax(dim=-1).tolist() == list(range(n))
    assert torch.allclose(logits.exp().sum(-1), torch.ones(n), atol=1e-5)   # log of averaged probabilities


def test_arrow_encoder_reads_a_tiny_lora_artifact(tmp_path) -> None:
    from tiny import make_lora_artifact
    from twinrt.artifact import Artifact
    from twinrt.runtime.model import TwinModel

    art = Artifact.open(make_lora_artifact(tmp_path, hidden_size=64, intermediate_size=128, rank=4))
    factors = [read_factors(str(art.path / "experts" / e / "adapter_model.safetensors")) for e in art.experts]
    protos = prototypes(factors)
    tm = TwinModel.from_artifact(art.path)
    enc = ArrowEncoder(tm.model, tm.tokenizer, protos)
    assert enc.dim == len(art.experts)
    z = enc.encode(["what is two plus three", "write a python function", "hello"])
    assert z.shape == (3, len(art.experts)) and torch.isfinite(z).all()
    assert torch.allclose(z, enc.encode(["what is two plus three", "write a python function", "hello"]))
