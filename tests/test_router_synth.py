"""The synthetic routing data (router.synthetic) that the router tests and benchmarks train on."""

from __future__ import annotations

from router.synthetic import EXPERTS, make_prompts


def test_make_prompts_is_deterministic_balanced_and_varied() -> None:
    a, b = make_prompts(40, seed=1), make_prompts(40, seed=1)
    assert a == b and a != make_prompts(40, seed=2)
    for name in EXPERTS:
        texts = [t for t, e in a if e == name]
        assert len(texts) == 40
        assert len(set(texts)) >= 20   # random fillers, not 40 copies of one template
