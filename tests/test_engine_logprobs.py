"""Logprobs of generated tokens and of prompt tokens equal log_softmax of TwinModel.forward's logits for the
row's own mix: in a mixed batch (each row as alone), in a whole-prompt group (one prefill, or blocks of
columns when the logits would be large), in a long prompt's chunks (separate passes, or packed in the rows'
decode pass). max_new_tokens=0 scores without generating, and a stream takes each entry exactly once."""

from __future__ import annotations

import pytest
import torch

import twinrt.runtime.engine as engine_module
from twinrt.runtime import Engine, SamplingParams, TwinModel
from twinrt.runtime.request import TokenLogprob

PROMPTS = ["what is two plus three", "hello world", "def add(a, b):", "the capital of france is", "5 + 7 ="]
TWIN, CORE, EXPERT = torch.tensor([0.5, 0.25, 0.25]), None, torch.tensor([0.0, 1.0, 0.0])
TEXT = " ".join(["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b", "5 + 7 = 12",
                 "bonjour le monde", "translate cat to french"] * 6)
ATOL = 1e-4


@pytest.fixture(scope="module")
def tm(tiny_artifact) -> TwinModel:
    return TwinModel.from_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def long_ids(tm) -> list[int]:
    return tm.tokenizer(TEXT)["input_ids"][:100]  # the tiny model's context is 128


def reference(tm: TwinModel, ids: list[int], mix) -> torch.Tensor:
    """log_softmax of one full forward over ids: [T, V] float32 (row i: the distribution after ids[:i + 1])."""
    logits = tm.forward(torch.tensor([ids]), mix=None if mix is None else mix[None])[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_entry(entry: TokenLogprob, lp: torch.Tensor, token: int, k: int) -> None:
    """entry against the distribution lp: [V]: its token, logprob, rank and top k."""
    assert entry.token == token
    assert abs(entry.logprob - float(lp[token])) <= ATOL
    assert entry.rank == int((lp >= lp[token]).sum())  # 1-based, ties ranked above
    want_lp, want_id = lp.topk(k)
    assert [i for i, _ in entry.top] == want_id.tolist()
    torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), want_lp, rtol=0, atol=ATOL)


def assert_prompt_logprobs(tm: TwinModel, r, mix) -> None:
    k = r.params.prompt_logprobs
    lp = reference(tm, r.prompt_ids, mix)
    assert len(r.prompt_logprobs) == r.prompt_tokens and r.prompt_logprobs[0] is None
    for i in range(1, r.prompt_tokens):
        assert_entry(r.prompt_logprobs[i], lp[i - 1], r.prompt_ids[i], k)


def produced(r) -> list[int]:
    """Every token the row took: its output, and the EOS or stop token that ended it (which has an entry too)."""
    ended = len(r.logprobs) == len(r.output_ids) + 1 and r.finish_reason == "stop"
    return r.output_ids + ([r.logprobs[-1].token] if ended else [])


def assert_output_logprobs(tm: TwinModel, r, mix) -> None:
    tokens = produced(r)
    assert len(r.logprobs) == len(tokens) > 0
    lp = reference(tm, r.prompt_ids + tokens, mix)
    for j, (entry, t) in enumerate(zip(r.logprobs, tokens)):
        assert_entry(entry, lp[r.prompt_tokens - 1 + j], t, r.params.logprobs)


class Forwards:
    """Records (rows, tokens) of every forward the engine runs outside packed passes, and the packed passes."""

    def __init__(self, engine: Engine, monkeypatch) -> None:
        self.calls: list = []
        inner, packed = engine._forward, engine_module.packing.packed_forward

        def forward(ids, mask, cache, reqs, tokens, **kw):
            self.calls.append((ids.shape[0], ids.shape[1]))
            return inner(ids, mask, cache, reqs, tokens, **kw)

        def packed_forward(*a):
            self.calls.append(("packed", int(a[4].shape[0])))
            return packed(*a)

        monkeypatch.setattr(engine, "_forward", forward)
        monkeypatch.setattr(engine_module.packing, "packed_forward", packed_forward)


# ---- generated tokens ------------------------------------------------------------------------------------------

ROWS = [(PROMPTS[0], TWIN, SamplingParams(max_new_tokens=6, logprobs=5, ignore_eos=True)),
        (PROMPTS[1], CORE, SamplingParams(max_new_tokens=6, logprobs=0, ignore_eos=True)),
        (PROMPTS[2], EXPERT, SamplingParams(max_new_tokens=6, logprobs=3, temperature=1.0, seed=7, ignore_eos=True)),
        (PROMPTS[3], TWIN, SamplingParams(max_new_tokens=6, logprobs=2, repetition_penalty=2.0,
                                          logit_bias=((42, 3.0),), ignore_eos=True)),
        (PROMPTS[4], EXPERT, SamplingParams(max_new_tokens=6, ignore_eos=True))]


def test_logprobs_of_a_mixed_batch_are_each_rows_own_raw_distribution(tm):
    engine = Engine(tm, materialize=False)
    together = [engine.add(p, m, params) for p, m, params in ROWS]
    engine.run_until_done()
    for (p, m, params), r in zip(ROWS, together):
        solo = Engine(tm, materialize=False)
        alone = solo.add(p, m, params)
        solo.run_until_done()
        assert r.output_ids == alone.output_ids
        if params.logprobs is None:
            assert r.logprobs == [] and alone.logprobs == []
            continue
        assert_output_logprobs(tm, r, m)  # raw logits, before the penalties and the bias of the fourth row
        torch.testing.assert_close(torch.tensor([e.logprob for e in r.logprobs]),
                                   torch.tensor([e.logprob for e in alone.logprobs]), rtol=0, atol=1e-5)
    assert together[1].logprobs[0].top == ()  # logprobs=0: the token's own only
    lps = [[e.logprob for e in r.logprobs] for r in together[:2]]
    assert lps[0] != lps[1]  # not vacuous: the mixes differ


# ---- prompt tokens ---------------------------------------------------------------------------------------------

def test_prompt_logprobs_of_a_prefill_group_in_one_pass(tm, monkeypatch):
    engine = Engine(tm, materialize=False)
    rec = Forwards(engine, monkeypatch)
    mixes = [TWIN, CORE, EXPERT, TWIN]
    params = [SamplingParams(max_new_tokens=0, prompt_logprobs=3), SamplingParams(max_new_tokens=3,
              prompt_logprobs=0), SamplingParams(max_new_tokens=3), SamplingParams(max_new_tokens=2, prompt_logprobs=5,
                                                                                   logprobs=1)]
    reqs = [engine.add(PROMPTS[i], mixes[i], params[i]) for i in range(4)]
    engine.step()
    assert rec.calls[0] == (4, max(r.prompt_tokens for r in reqs))  # one left-padded prefill of all four
    engine.run_until_done()
    for r, m in zip(reqs, mixes):
        if r.params.prompt_logprobs is None:
            assert r.prompt_logprobs == []
        else:
            assert_prompt_logprobs(tm, r, m)
    assert_output_logprobs(tm, reqs[3], mixes[3])


def test_prompt_logprobs_in_blocks_of_columns_when_the_logits_would_be_large(tm, monkeypatch):
    v = tm.config.vocab_size
    monkeypatch.setattr(engine_module, "SCORE_BLOCK", 2 * v)  # at most two rows' logits at a time
    engine = Engine(tm, materialize=False)
    assert engine._score_rows == 2
    rec = Forwards(engine, monkeypatch)
    mixes = [TWIN, CORE, EXPERT]
    reqs = [engine.add(PROMPTS[i], mixes[i], SamplingParams(max_new_tokens=2, prompt_logprobs=2)) for i in range(3)]
    engine.step()
    widths = [max(reqs[0].prompt_tokens, reqs[1].prompt_tokens), reqs[2].prompt_tokens]
    # groups of at most 2 rows; a block holds 2 rows' logits: 1 column of the first group, 2 of the second
    assert rec.calls == [(2, 1)] * widths[0] + [(1, min(2, widths[1] - c)) for c in range(0, widths[1], 2)]
    engine.run_until_done()
    for r, m in zip(reqs, mixes):
        assert_prompt_logprobs(tm, r, m)


@pytest.mark.parametrize("packed", [False, True])
def test_prompt_logprobs_of_a_long_prompt_in_chunks(tm, long_ids, monkeypatch, packed):
    v = tm.config.vocab_size
    monkeypatch.setattr(engine_module, "SCORE_BLOCK", 7 * v)  # a scored chunk has at most 7 tokens
    engine = Engine(tm, materialize=False, max_step_tokens=64, idle_growth=1, chunk_share=None, packed=packed)
    shorts = [engine.add(p, None, SamplingParams(max_new_tokens=40, ignore_eos=True)) for p in PROMPTS[:2]]
    engine.step()
    engine.max_step_tokens, engine.min_chunk_cost = 16, 2.0  # from now on the long prompt goes in chunks
    rec = Forwards(engine, monkeypatch)
    long = engine.add(long_ids, TWIN, SamplingParams(max_new_tokens=3, prompt_logprobs=4, logprobs=2))
    engine.run_until_done()
    chunks = [n for kind, n in rec.calls if kind == "packed"] if packed else [t for b, t in rec.calls if t > 1]
    assert len(chunks) >= 100 // 7 and max(chunks) <= 7 and sum(chunks) >= 100 - 7
    assert_prompt_logprobs(tm, long, TWIN)
    assert_output_logprobs(tm, long, TWIN)
    assert all(r.finish_reason == "length" for r in shorts)


# ---- scoring only ----------------------------------------------------------------------------------------------

def test_max_new_tokens_0_scores_many_prompts_in_one_prefill_without_generating(tm, monkeypatch):
    engine = Engine(tm, materialize=False, max_step_tokens=512)
    rec = Forwards(engine, monkeypatch)
    finals: list[int] = []
    reqs = [engine.add(PROMPTS[i % 5] + " " + str(i), TWIN if i % 2 else CORE,
                       SamplingParams(max_new_tokens=0, prompt_logprobs=1),
                       on_token=lambda r, d: finals.append(r.id) if r.done and d == "" else None) for i in range(12)]
    done = engine.step()
    assert sorted(r.id for r in done) == sorted(r.id for r in reqs) and not engine.busy  # all in one step
    assert len(rec.calls) == 1 and rec.calls[0][0] == 12  # one prefill of all twelve, no decode
    assert sorted(finals) == sorted(r.id for r in reqs)  # each told once that it is done
    for i, r in enumerate(reqs):
        assert r.finish_reason == "length" and r.output_ids == [] and r.text == "" and r.logprobs == []
        assert_prompt_logprobs(tm, r, TWIN if i % 2 else CORE)


def test_max_new_tokens_0_scores_a_long_prompt(tm, long_ids):
    engine = Engine(tm, materialize=False, max_step_tokens=16, packed=False)
    r = engine.add(long_ids, EXPERT, SamplingParams(max_new_tokens=0, prompt_logprobs=0))
    engine.run_until_done()
    assert r.finish_reason == "length" and r.output_ids == [] and not engine.running
    assert_prompt_logprobs(tm, r, EXPERT)


# ---- streaming -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("end", ["length", "eos", "stop string", "cancel"])
def test_a_stream_takes_each_logprob_entry_once(tm, end):
    base = SamplingParams(max_new_tokens=10, logprobs=1, ignore_eos=True, repetition_penalty=3.0)
    engine = Engine(tm, materialize=False)
    ref = engine.add(PROMPTS[1], None, base)
    engine.run_until_done()
    engine = Engine(tm, materialize=False)
    params = base
    if end == "eos":
        engine.eos = {ref.output_ids[6]}
        params = SamplingParams(max_new_tokens=10, logprobs=1, repetition_penalty=3.0)
    elif end == "stop string":
        params = SamplingParams(max_new_tokens=10, logprobs=1, ignore_eos=True, repetition_penalty=3.0,
                                stop=(ref.text[-4:-1] + "#", ref.text[5:8]))  # the first one holds text back
    taken: list[TokenLogprob] = []
    deltas: list[tuple[str, int]] = []

    def on_token(r, delta):
        got = r.take_logprobs()
        taken.extend(got)
        deltas.append((delta, len(got)))

    r = engine.add(PROMPTS[1], None, params, on_token=on_token)
    if end == "cancel":
        for _ in range(4):
            engine.step()
        engine.cancel(r)
    engine.run_until_done()
    ends_on_token = end == "eos"  # the token that ended the row has the last entry
    assert len(taken) == len(r.logprobs) == len(r.output_ids) + ends_on_token
    assert all(a is b for a, b in zip(taken, r.logprobs))
    assert r.take_logprobs() == []  # nothing left
    assert deltas[-1][0] == "" or r.done  # the final callback comes last
    assert [e.token for e in r.logprobs] == r.output_ids + ([min(engine.eos)] if ends_on_token else [])
    if end == "stop string":
        assert r.finish_reason == "stop" and any(n > 1 for _, n in deltas)  # a held-back delta carried two
