"""Chunked prefill under a per-step token budget: a prompt prefilled in chunks gives the tokens it gives whole,
short requests are admitted before a long prompt's next chunk, every step keeps to its budget, a cancel frees
a prompt mid-prefill, and a chunk that fails takes only its own request down."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import EXTREME, FLOAT32_CASES, Poison
from twinrt.runtime import Engine, SamplingParams, TwinModel
from twinrt.runtime.token_cost import chunk_tokens, prefill_cost

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
MIX = torch.tensor([0.5, 0.25, 0.25])
SHORT = ["what is two plus three", "hello world", "def add(a, b):", "5 + 7 ="]
TEXT = " ".join(["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b", "5 + 7 = 12",
                 "bonjour le monde", "translate cat to french"] * 6)


@pytest.fixture(scope="module")
def tm(tiny_artifact) -> TwinModel:
    return TwinModel.from_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def long_ids(tm) -> list[int]:
    ids = tm.tokenizer(TEXT)["input_ids"][:100]  # the tiny model's context is 128
    assert len(ids) == 100
    return ids


class Forwards:
    """Records every forward the engine runs in each step: (rows, new tokens, cached columns before)."""

    def __init__(self, engine: Engine) -> None:
        self.steps: list[list[tuple[int, int, int]]] = []
        inner = engine._forward

        def forward(ids, mask, cache, reqs, tokens, **kw):
            self.steps[-1].append((ids.shape[0], ids.shape[1], mask.shape[1] - ids.shape[1]))
            return inner(ids, mask, cache, reqs, tokens, **kw)

        engine._forward = forward
        self.engine = engine

    def step(self) -> list:
        self.steps.append([])
        return self.engine.step()

    def run(self) -> None:
        while self.engine.busy:
            self.step()


def whole(tm: TwinModel, prompt, mix, params: SamplingParams = GREEDY) -> list[int]:
    engine = Engine(tm, materialize=False, max_step_tokens=10_000)
    req = engine.add(prompt, mix, params)
    engine.step()
    assert engine.prefilling is None and req in engine.running  # prefilled whole in one step
    engine.run_until_done()
    return req.output_ids


@pytest.mark.parametrize("case", FLOAT32_CASES)
def test_chunked_packed_and_sampled_rows_equal_their_solo_runs_on_each_device(tiny_artifact, long_ids, case):
    # the engine's whole step on the device: chunks of a long prompt packed into the rows' decode passes, rows
    # joining and leaving, a seeded sampled row and one with logprobs (the logits the host reads back)
    dtm = TwinModel.from_artifact(tiny_artifact, device=case.device)
    sampled = SamplingParams(max_new_tokens=8, ignore_eos=True, temperature=0.1, seed=3)  # its logits decide
    scored = SamplingParams(max_new_tokens=8, ignore_eos=True, logprobs=2)
    work = [(SHORT[0], None, GREEDY), (long_ids, MIX, GREEDY), (SHORT[1], torch.tensor([1.0, 0.0, 0.0]), sampled),
            (SHORT[2], torch.tensor([0.0, 0.7, 0.3]), scored), (SHORT[3], MIX, GREEDY)]
    engine = Engine(dtm, materialize=False, max_step_tokens=16, idle_growth=1, packed=True)
    packs = []
    inner = engine._packed_decode

    def spy(*a, **kw):
        packs.append(1)
        return inner(*a, **kw)

    engine._packed_decode = spy
    reqs = [engine.add(*work[0])]
    engine.step()
    reqs += [engine.add(*w) for w in work[1:]]
    engine.run_until_done()
    assert packs  # the long prompt's chunks rode in decode passes
    assert [r.output_ids for r in reqs] == [whole(dtm, *w) for w in work]
    assert [e.token for e in reqs[3].logprobs] == reqs[3].output_ids and len(reqs[3].logprobs[0].top) == 2


def test_cost_rule_and_chunk_size(tm):
    assert prefill_cost(0, 1, 0.0) == 1 and prefill_cost(10, 4, 0.5) == 4 + 0.5 * (40 + 10)
    for start, budget, attn in [(0, 64, 0.0), (7000, 64, 3e-4), (100, 10, 0.007), (0, 1, 0.01), (50, 0.5, 0.1)]:
        n = chunk_tokens(start, 10_000, budget, attn)
        assert n >= 1
        assert n == 1 or prefill_cost(start, n, attn) <= budget < prefill_cost(start, n + 1, attn)
    assert chunk_tokens(0, 5, 64, 0.0) == 5  # never more than what is left
    assert chunk_tokens(7000, 10_000, 64, 3e-4) < chunk_tokens(0, 10_000, 64, 3e-4)  # attention costs more later
    with pytest.raises(ValueError, match="max_step_tokens"):
        Engine(tm, max_step_tokens=0)


@pytest.mark.parametrize("chunk", [1, 2, 7, 33, 99])
@pytest.mark.parametrize("mixed", [False, True])
def test_chunked_prefill_gives_the_tokens_of_a_whole_prefill(tm, long_ids, chunk, mixed):
    mix = MIX if mixed else None
    engine = Engine(tm, materialize=False, max_step_tokens=chunk, idle_growth=1)
    engine.attn = 0.0  # every token costs 1: chunks of exactly `chunk` tokens
    rec = Forwards(engine)
    req = engine.add(long_ids, mix, GREEDY)
    rec.run()
    chunks = [(t, start) for step in rec.steps for (_, t, start) in step if start < len(long_ids)]  # not decode
    expected = [chunk] * (len(long_ids) // chunk) + ([len(long_ids) % chunk] if len(long_ids) % chunk else [])
    assert [t for t, _ in chunks] == expected
    assert [start for _, start in chunks] == [chunk * i for i in range(len(expected))]  # one chunk per step, in order
    assert req.output_ids == whole(tm, long_ids, mix)


def test_a_long_prompt_beside_short_requests_keeps_every_row_exact(tm, long_ids):
    engine = Engine(tm, materialize=False, max_step_tokens=16, idle_growth=1, chunk_share=None, packed=False)
    rec = Forwards(engine)
    mixes = [None, torch.tensor([1.0, 0.0, 0.0]), MIX, torch.tensor([0.0, 0.7, 0.3])]
    first = engine.add(SHORT[0], mixes[0], GREEDY)
    rec.step()
    long = engine.add(long_ids, MIX, GREEDY)
    second = engine.add(SHORT[1], mixes[1], GREEDY)
    rec.step()
    assert engine.prefilling is long and second in engine.running  # the short one went whole, the long one chunks
    later = []
    for p, m in zip(SHORT[2:], mixes[2:]):
        later.append(engine.add(p, m, GREEDY))
        rec.step()
        assert later[-1] in engine.running and engine.prefilling is long  # admitted ahead of the long prompt's rest
    finished_before_long = []
    while engine.prefilling is not None:
        finished_before_long += rec.step()
    assert first in finished_before_long  # short requests finish while the long prompt is still prefilling
    rec.run()
    shorts = [first, second] + later
    assert [r.output_ids for r in shorts] == [whole(tm, p, m) for p, m in zip(SHORT, mixes)]
    assert long.output_ids == whole(tm, long_ids, MIX)
    # every step kept to its budget: decode tokens, whole prompts, then a chunk of at least the floor
    for step in rec.steps:
        cost = sum(b * prefill_cost(start, t, engine.attn) for b, t, start in step)
        assert cost <= engine.max_step_tokens + engine.min_chunk_cost + 1e-9, step


def test_a_long_prompt_alone_grows_its_chunks_and_shrinks_them_when_work_arrives(tm, long_ids):
    engine = Engine(tm, materialize=False, max_step_tokens=8, idle_growth=4, chunk_share=None, packed=False)
    engine.attn = 0.0  # every token costs 1
    rec = Forwards(engine)
    long = engine.add(long_ids, None, GREEDY)
    for _ in range(4):
        rec.step()
    assert [t for step in rec.steps for (_, t, _) in step] == [8, 16, 32, 32]  # doubling, up to 4 x 8
    short = engine.add(SHORT[1], None, GREEDY)
    rec.step()   # the short prompt goes whole, and the chunk is back to the budget left (at least the floor)
    last = rec.steps[-1]
    assert any(t == len(short.prompt_ids) for _, t, _ in last)
    assert max(t for _, t, start in last if start > 0) <= engine.max_step_tokens
    rec.run()
    assert long.output_ids == whole(tm, long_ids, None) and short.output_ids == whole(tm, SHORT[1], None)


def test_chunks_take_at_most_their_share_of_the_time_while_rows_decode(tm, long_ids, monkeypatch):
    import twinrt.runtime.engine as engine_module

    clock = [0.0]  # a decode step takes 1 s, a chunk 3 s whatever its size
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: clock[0])
    engine = Engine(tm, materialize=False, max_step_tokens=64, chunk_share=1.0, chunk_span=2.0, packed=False)
    for p in SHORT:
        engine.add(p, None, SamplingParams(max_new_tokens=40, ignore_eos=True))
    engine.step()
    engine.max_step_tokens = 8  # small chunks: the long prompt is still prefilling after 12 steps
    engine.min_chunk_cost = 1.0
    decode, chunk = engine._decode, engine._continue_prefill

    def slow_decode(*a):
        clock[0] += 1.0
        return decode(*a)

    def slow_chunk(*a):
        clock[0] += 3.0
        return chunk(*a)

    monkeypatch.setattr(engine, "_decode", slow_decode)
    monkeypatch.setattr(engine, "_continue_prefill", slow_chunk)
    long = engine.add(long_ids, None, GREEDY)
    ran, sizes = [], []
    for i in range(1, 13):
        before = engine._partial.done if engine._partial else 0
        engine.step()
        if engine._partial.done > before:
            ran.append(i)
            sizes.append(engine._partial.done - before)
    # a chunk runs once the credit (1.0 x the decode time) covers chunk_span (2) decode steps, and credit left
    # after a chunk is not kept: 3 s of chunk per 3 s of decode, the share at most
    assert ran == [2, 5, 8, 11] and engine.prefilling is long
    # the first chunk gets the step budget; then each is sized to the 2 s of credit at the measured 3 s a chunk
    assert sizes[0] == chunk_tokens(0, 10_000, 8, engine.attn)
    assert sizes[1] == chunk_tokens(sizes[0], 10_000, 2 / (3 / prefill_cost(0, sizes[0], engine.attn)), engine.attn)
    assert sizes[1] < sizes[0] and sizes == sorted(sizes, reverse=True)
    monkeypatch.undo()
    engine.run_until_done()
    assert long.output_ids == whole(tm, long_ids, None)


def test_a_long_prompt_is_not_held_back_by_requests_that_cannot_run_beside_it(tm, long_ids):
    engine = Engine(tm, materialize=False, max_batch=1, max_step_tokens=8, idle_growth=1)
    engine.attn = 0.0
    long = engine.add(long_ids, None, GREEDY)
    engine.step()
    short = engine.add(SHORT[0], None, GREEDY)  # no room until the long one is done
    steps = 1
    while engine.prefilling is not None:
        engine.step()
        steps += 1
        assert steps < 1000
    assert steps == -(-len(long_ids) // 8)  # a chunk every step: the waiting request is not work beside it
    engine.run_until_done()
    assert long.output_ids == whole(tm, long_ids, None) and short.output_ids == whole(tm, SHORT[0], None)


def test_a_long_prompt_is_never_starved(tm, long_ids):
    engine = Engine(tm, materialize=False, max_step_tokens=64, chunk_share=None, packed=False)
    for p in SHORT:
        engine.add(p, None, SamplingParams(max_new_tokens=60, ignore_eos=True))
    engine.step()
    engine.max_step_tokens = 4  # from now on four decoding rows use more than the whole budget
    long = engine.add(long_ids, None, GREEDY)
    rec = Forwards(engine)
    for _ in range(5):
        rec.step()
    assert len(engine.running) == 4 and engine.prefilling is long
    starts = [[start for b, _, start in step if b == 1] for step in rec.steps]  # the chunk of each step
    assert all(len(s) == 1 for s in starts)
    moved = [b[0] - a[0] for a, b in itertools.pairwise(starts)]
    assert min(moved) > 1  # each step's chunk gets the floor (several tokens), not a token at a time
    rec.run()
    assert long.output_ids == whole(tm, long_ids, None)


def test_cancel_mid_prefill_frees_the_request(tm, long_ids):
    engine = Engine(tm, materialize=False, max_step_tokens=8)
    finals = []
    req = engine.add(long_ids, None, GREEDY, on_token=lambda r, d: finals.append((r.done, d)))
    engine.step()
    assert engine.prefilling is req and req not in engine.running and req not in engine.waiting and engine.busy
    engine.cancel(req)
    assert engine.step() == [req]
    assert req.finish_reason == "cancelled" and engine.prefilling is None and not engine.busy
    assert finals == [(True, "")]


@pytest.mark.parametrize("packed", [False, True])
def test_a_failing_chunk_fails_only_its_request(tm, long_ids, packed):
    short_ids = [tm.tokenizer(p)["input_ids"] for p in SHORT[:2]]
    token = next(t for t in long_ids if all(t not in s for s in short_ids))
    alone = [whole(tm, p, None) for p in SHORT[:2]]
    assert all(token not in out for out in alone)
    # any pass that carries the token raises: only the long prompt's chunk does (a packed pass, then the chunk
    # on its own when the engine runs the pass's parts separately)
    poison = Poison(tm, lambda ids: bool((ids == token).any()))
    try:
        engine = Engine(tm, materialize=False, max_step_tokens=16, packed=packed)
        shorts = [engine.add(p, None, GREEDY) for p in SHORT[:2]]
        engine.step()
        bad = engine.add(long_ids, None, GREEDY)
        nan = engine.add([t for t in long_ids if t != token][:60], EXTREME, GREEDY)
        engine.run_until_done()
    finally:
        poison.remove()
    assert bad.finish_reason == "error" and not bad.error.client and bad.output_ids == []
    assert nan.finish_reason == "error" and nan.error.client
    assert [r.output_ids for r in shorts] == alone


# ---- the chunk in the rows' decode pass ----------------------------------------------------------------------

def _count_passes(engine, monkeypatch):
    """Per step: how many packed passes, and the (rows, tokens) of every other forward."""
    import twinrt.runtime.engine as engine_module

    steps: list[list] = []
    inner_packed, inner_forward = engine_module.packing.packed_forward, engine._forward

    def packed_forward(*a):
        steps[-1].append("packed")
        return inner_packed(*a)

    def forward(ids, mask, cache, reqs, tokens, **kw):
        steps[-1].append((ids.shape[0], ids.shape[1]))
        return inner_forward(ids, mask, cache, reqs, tokens, **kw)

    monkeypatch.setattr(engine_module.packing, "packed_forward", packed_forward)
    monkeypatch.setattr(engine, "_forward", forward)
    return steps


def test_a_long_prompts_chunks_ride_in_the_rows_decode_pass(tm, long_ids, monkeypatch):
    engine = Engine(tm, materialize=False, max_step_tokens=64, idle_growth=1, chunk_share=None)
    assert engine.packed
    steps = _count_passes(engine, monkeypatch)
    mixes = [None, torch.tensor([1.0, 0.0, 0.0]), MIX, torch.tensor([0.0, 0.7, 0.3])]
    shorts = []
    for p, m in zip(SHORT, mixes):
        shorts.append(engine.add(p, m, SamplingParams(max_new_tokens=30, ignore_eos=True)))
    steps.append([])
    engine.step()
    assert len(engine.running) == 4
    engine.max_step_tokens, engine.min_chunk_cost = 16, 2.0  # from now on the long prompt goes in chunks
    long = engine.add(long_ids, MIX, GREEDY)
    while engine.busy:
        steps.append([])
        engine.step()
    packed = [i for i, s in enumerate(steps) if "packed" in s]
    assert len(packed) >= 4  # the long prompt is in over several steps, each one pass with the rows' decode
    for i in packed:
        assert steps[i] == ["packed"], steps[i]  # no decode pass and no chunk pass of their own
    assert [r.output_ids for r in shorts] == [whole(tm, p, m, SamplingParams(max_new_tokens=30, ignore_eos=True))
                                              for p, m in zip(SHORT, mixes)]
    assert long.output_ids == whole(tm, long_ids, MIX)


def test_a_packed_chunk_takes_its_share_of_the_others_time(tm, long_ids, monkeypatch):
    import twinrt.runtime.engine as engine_module

    clock = [0.0]  # the rows' decode pass alone takes 1 s; a packed pass 1 s + 1/8 s per chunk token
    monkeypatch.setattr(engine_module.time, "perf_counter", lambda: clock[0])
    engine = Engine(tm, materialize=False, max_step_tokens=64, chunk_share=0.5, chunk_span=2.0)
    engine.attn = 0.0  # a token costs 1
    for p in SHORT:
        engine.add(p, None, SamplingParams(max_new_tokens=60, ignore_eos=True))
    engine.step()
    assert len(engine.running) == 4
    engine.max_step_tokens, engine.min_chunk_cost = 8, 1.0
    decode, packed_forward = engine._decode, engine_module.packing.packed_forward
    kinds = []

    def slow_decode(*a):
        clock[0] += 1.0
        kinds[-1] = "decode"
        return decode(*a)

    def slow_packed(*a):
        n = int(a[4].shape[0])
        clock[0] += 1.0 + n / 8
        kinds[-1] = n
        return packed_forward(*a)

    monkeypatch.setattr(engine, "_decode", slow_decode)
    monkeypatch.setattr(engine_module.packing, "packed_forward", slow_packed)
    long = engine.add(long_ids, None, GREEDY)
    kinds.append(None)
    engine.step()  # the long prompt is scheduled after this step's decode pass
    kinds.clear()
    for _ in range(13):
        kinds.append(None)
        engine.step()
    # the decode pass is timed alone first; a chunk rides in it once the credit (0.5 x the others' 1 s a step)
    # covers chunk_span (2) steps: the first gets the step budget (8 tokens, 1 s more, so 1 s of credit is
    # left and the next comes after one step), the next ones the 2 s due at the 1/8 s a token they were
    # measured to add
    assert kinds == ["decode"] * 4 + [8, "decode", 16] + ["decode"] * 3 + [16, "decode", "decode"]
    monkeypatch.undo()
    engine.run_until_done()
    assert long.output_ids == whole(tm, long_ids, None)


def test_a_long_prompt_that_would_miss_its_deadline_takes_what_it_needs(tm, long_ids, monkeypatch):
    import twinrt.runtime.engine as engine_module

    def prefilled_by(deadline_in):
        """Fake clock (decode pass 1 s, a packed pass 1 s + 1/8 s per chunk token): when the prompt is in."""
        clock = [0.0]
        monkeypatch.setattr(engine_module.time, "perf_counter", lambda: clock[0])
        engine = Engine(tm, materialize=False, max_step_tokens=64, chunk_share=0.5)
        engine.attn = 0.0
        for p in SHORT:
            engine.add(p, None, SamplingParams(max_new_tokens=200, ignore_eos=True))
        engine.step()
        engine.max_step_tokens, engine.min_chunk_cost = 8, 1.0
        decode, packed_forward = engine._decode, engine_module.packing.packed_forward

        def slow_decode(*a):
            clock[0] += 1.0
            return decode(*a)

        def slow_packed(*a):
            clock[0] += 1.0 + a[4].shape[0] / 8
            return packed_forward(*a)

        monkeypatch.setattr(engine, "_decode", slow_decode)
        monkeypatch.setattr(engine_module.packing, "packed_forward", slow_packed)
        long = engine.add(long_ids, None, GREEDY, deadline=None if deadline_in is None else clock[0] + deadline_in)
        while long not in engine.running and not long.done:
            engine.step()
        monkeypatch.undo()
        return clock[0], long

    fair, _ = prefilled_by(None)
    assert fair > 40  # at its share: about 13 s of chunks beside 27 s of the others' decode
    for deadline in (35.0, 30.0):
        t, long = prefilled_by(deadline)
        assert t <= deadline and not long.done  # in before its deadline: it took more than its share


@pytest.mark.parametrize("error", [RuntimeError("packed pass failed"), NotImplementedError(
    "packed passes do not do attention softcapping, sliding windows or sinks")])
def test_a_packed_pass_that_fails_runs_its_parts_separately(tm, long_ids, monkeypatch, error):
    """Any failure: this step's rows and chunk run separately, exactly. A model whose attention packed passes
    do not do (NotImplementedError): packing is off from then on."""
    import twinrt.runtime.engine as engine_module

    engine = Engine(tm, materialize=False, max_step_tokens=16, idle_growth=1, chunk_share=None)
    calls = []

    def failing(*a):
        calls.append(1)
        raise error

    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    shorts = [engine.add(p, None, params) for p in SHORT[:2]]
    engine.step()
    long = engine.add(long_ids, MIX, GREEDY)
    monkeypatch.setattr(engine_module.packing, "packed_forward", failing)
    engine.run_until_done()
    if isinstance(error, NotImplementedError):
        assert calls == [1] and not engine.packed  # tried once, then separate passes
    else:
        assert len(calls) >= 4 and engine.packed  # every packed pass failed and ran separately
    assert [r.output_ids for r in shorts] == [whole(tm, p, None, params) for p in SHORT[:2]]
    assert long.output_ids == whole(tm, long_ids, MIX) and long.finish_reason == "length"
