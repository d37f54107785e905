"""A row that fails takes only itself down: non-finite logits (an extreme mix weight), extreme sampling
parameters, a batched forward that raises because of one row (found by bisection, decode and prefill), and a
callback that raises. The other rows of the batch produce exactly their solo tokens."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import EXTREME, Poison, carries
from twinrt.runtime import Engine, SamplingParams, TwinModel
from twinrt.runtime.engine import culprits
from twinrt.runtime.request import RowFailure
from twinrt.runtime.sampling import SAMPLING_EPS, sample_row, top_p_filter

PROMPTS = ["what is two plus three", "hello world", "def add(a, b):", "the capital of france is"]
MIXES = [torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, 0.25, 0.25]),
         torch.tensor([0.0, 0.7, 0.3])]
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def tm(tiny_artifact) -> TwinModel:
    return TwinModel.from_artifact(tiny_artifact)


def solo(tm: TwinModel, prompt, mix, params: SamplingParams = GREEDY) -> list[int]:
    engine = Engine(tm, materialize=False)
    req = engine.add(prompt, mix, params)
    engine.run_until_done()
    assert req.finish_reason != "error", req.error
    return req.output_ids


def run_together(tm: TwinModel, rows, params: SamplingParams = GREEDY, **kw):
    """Run every (prompt, mix) row in one engine; -> (requests, {request id: final callbacks seen})."""
    engine = Engine(tm, materialize=False, **kw)
    finals: dict[int, int] = {}

    def on_token(r, delta):
        if r.done and delta == "":
            finals[r.id] = finals.get(r.id, 0) + 1

    reqs = [engine.add(p, m, params, on_token=on_token) for p, m in rows]
    returned = []
    while engine.busy:
        returned += engine.step()
    assert sorted(r.id for r in returned) == sorted(r.id for r in reqs)  # every row comes back exactly once
    return reqs, finals


# ---- sampling --------------------------------------------------------------------------------------------------

def test_tiny_temperature_is_greedy_and_tiny_top_p_keeps_the_top_token(tm):
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 5
    top = int(logits.argmax())
    assert sample_row(logits, 1e-300, 1.0, None) == top
    assert sample_row(logits, SAMPLING_EPS / 2, 0.9, torch.Generator().manual_seed(1)) == top
    for seed in range(5):
        assert sample_row(logits, 1.0, 1e-46, torch.Generator().manual_seed(seed)) == top
    kept = top_p_filter(torch.softmax(logits, -1), 1e-46)
    assert int(kept.nonzero().numel()) == 1 and int(kept.argmax()) == top
    # through the engine: both behave as greedy, whatever the seed
    greedy = solo(tm, PROMPTS[0], MIXES[2])
    assert solo(tm, PROMPTS[0], MIXES[2], SamplingParams(max_new_tokens=8, temperature=1e-300, ignore_eos=True)) \
        == greedy
    assert solo(tm, PROMPTS[0], MIXES[2], SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-46, seed=3,
                                                         ignore_eos=True)) == greedy


def test_culprits_bisects_to_the_rows_that_raise_alone():
    def probe(rows):
        if {2, 5} & set(rows):
            raise ValueError("bad")

    assert [i for i, _ in culprits(7, probe)] == [2, 5]
    assert culprits(4, lambda rows: None) == []


# ---- non-finite logits ------------------------------------------------------------------------------------------

def test_non_finite_row_fails_alone_and_the_others_equal_their_solo_runs(tm):
    ids = torch.tensor([tm.tokenizer(PROMPTS[1])["input_ids"]])
    assert not torch.isfinite(tm.forward(ids, mix=EXTREME[None])).all()  # the premise
    rows = [(PROMPTS[0], MIXES[0]), (PROMPTS[1], EXTREME), (PROMPTS[2], MIXES[2]), (PROMPTS[3], MIXES[3])]
    reqs, finals = run_together(tm, rows)
    bad = reqs[1]
    assert bad.finish_reason == "error" and bad.error == RowFailure(bad.error.message, client=True)
    assert "not finite" in bad.error.message and bad.output_ids == []
    assert finals.get(bad.id) == 1  # its final callback came
    for r, (p, m) in zip(reqs, rows):
        if r is not bad:
            assert r.finish_reason == "length" and r.output_ids == solo(tm, p, m)


def test_non_finite_row_joining_a_running_batch_leaves_it_alone(tm):
    engine = Engine(tm, materialize=False)
    first = [engine.add(p, m, GREEDY) for p, m in zip(PROMPTS[:2], MIXES[:2])]
    engine.step()
    bad = engine.add(PROMPTS[2], EXTREME, GREEDY)
    later = engine.add(PROMPTS[3], MIXES[3], GREEDY)
    engine.run_until_done()
    assert bad.finish_reason == "error" and bad.error.client
    assert [r.output_ids for r in first + [later]] == [solo(tm, p, m) for p, m in
                                                       zip(PROMPTS[:2] + PROMPTS[3:], MIXES[:2] + MIXES[3:])]


# ---- a forward that raises because of one row ---------------------------------------------------------------------

def test_decode_forward_failure_fails_only_the_row_that_feeds_the_token(tm, caplog):
    rows = list(zip(PROMPTS, MIXES))
    alone = [solo(tm, p, m) for p, m in rows]
    victim = 2
    token = alone[victim][0]  # the token the victim feeds at its first decode step
    assert all(token not in out for i, out in enumerate(alone) if i != victim)
    poison = Poison(tm, carries(token, "decode"))
    try:
        with caplog.at_level(logging.ERROR, logger="twinrt.runtime.engine"):
            reqs, finals = run_together(tm, rows)
    finally:
        poison.remove()
    assert poison.raised >= 2  # the batch, then the victim's half (and the victim alone)
    r = reqs[victim]
    assert r.finish_reason == "error" and r.error == RowFailure("generation failed: RuntimeError", client=False)
    assert r.output_ids == [token] and finals.get(r.id) == 1
    assert [q.output_ids for i, q in enumerate(reqs) if i != victim] == [a for i, a in enumerate(alone) if i != victim]
    assert any("decode forward" in rec.getMessage() for rec in caplog.records)


def test_prefill_forward_failure_fails_only_the_row_whose_prompt_carries_the_token(tm):
    rows = list(zip(PROMPTS, MIXES))
    ids = [tm.tokenizer(p)["input_ids"] for p in PROMPTS]
    victim = 3
    token = next(t for t in ids[victim] if all(t not in other for i, other in enumerate(ids) if i != victim))
    alone = [solo(tm, p, m) for p, m in rows]
    assert all(token not in out for out in alone)
    poison = Poison(tm, carries(token, "prefill"))
    try:
        engine = Engine(tm, materialize=False)
        running = engine.add(*rows[0], GREEDY)
        engine.step()  # one row running, then three admitted together, the victim among them
        reqs = [running] + [engine.add(p, m, GREEDY) for p, m in rows[1:]]
        engine.run_until_done()
    finally:
        poison.remove()
    assert reqs[victim].finish_reason == "error" and not reqs[victim].error.client
    assert reqs[victim].output_ids == []
    assert [q.output_ids for i, q in enumerate(reqs) if i != victim] == [a for i, a in enumerate(alone) if i != victim]


def test_a_failure_no_row_explains_raises_from_step(tm):
    for condition, error in [(lambda ids: True, RuntimeError("broken")),  # every row fails alone: not theirs
                             (lambda ids: ids.shape[0] >= 3, MemoryError("too big"))]:  # only the whole batch
        poison = Poison(tm, condition, error)
        try:
            engine = Engine(tm, materialize=False)
            for p, m in zip(PROMPTS[:3], MIXES[:3]):
                engine.add(p, m, GREEDY)
            with pytest.raises(type(error)):
                engine.step()
        finally:
            poison.remove()


# ---- a callback that raises ---------------------------------------------------------------------------------------

def test_a_raising_callback_fails_only_its_row(tm):
    rows = list(zip(PROMPTS, MIXES))
    alone = [solo(tm, p, m) for p, m in rows]
    engine = Engine(tm, materialize=False)
    calls = []

    def flaky(r, delta):
        calls.append(delta)
        if len(calls) == 3:
            raise ConnectionError("client went away badly")

    reqs = [engine.add(p, m, GREEDY, on_token=flaky if i == 1 else None) for i, (p, m) in enumerate(rows)]
    engine.run_until_done()
    assert reqs[1].finish_reason == "error" and not reqs[1].error.client
    assert "ConnectionError" in reqs[1].error.message and len(reqs[1].output_ids) < GREEDY.max_new_tokens
    assert [q.output_ids for i, q in enumerate(reqs) if i != 1] == [a for i, a in enumerate(alone) if i != 1]
