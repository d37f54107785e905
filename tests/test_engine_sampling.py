"""Sampling parameters with vLLM's semantics, each against a plain-torch reference of vLLM's rule: validation,
logit_bias, min_tokens, repetition / presence / frequency penalties, top_k, min_p, stop_token_ids,
include_stop_str_in_output, and decode-time constraints (a constrained row is forced, greedy or sampled, and a
constraint that raises or allows nothing fails its row alone)."""

from __future__ import annotations

import pytest
import torch

from twinrt.runtime import Engine, SamplingParams, TwinModel
from twinrt.runtime import logits as processing
from twinrt.runtime.sampling import min_p_filter, sample_row, top_k_filter

PROMPTS = ["what is two plus three", "hello world", "def add(a, b):", "the capital of france is"]
MIXES = [None, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.0, 0.7, 0.3])]
NEG = float("-inf")


@pytest.fixture(scope="module")
def tm(tiny_artifact) -> TwinModel:
    return TwinModel.from_artifact(tiny_artifact)


def step_logits(tm: TwinModel, ids: list[int], mix) -> torch.Tensor:
    """[V] float32: the logits after `ids` from one full forward (no cache), the reference for every step."""
    return tm.forward(torch.tensor([ids]), mix=None if mix is None else mix[None])[0, -1].float()


def reference_process(x: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], ends: set[int]
                      ) -> torch.Tensor:
    """vLLM's rules, token by token: logit_bias, the min_tokens mask, then the penalties."""
    x = x.clone()
    for t, bias in p.logit_bias:
        x[t] += bias
    if len(output) < p.min_tokens:
        for t in ends | set(p.stop_token_ids):
            x[t] = NEG
    for t in range(x.shape[0]):
        if t in prompt or t in output:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        n = output.count(t)
        x[t] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
    return x


def reference_greedy(tm: TwinModel, prompt: str, mix, p: SamplingParams, ends: set[int]) -> list[int]:
    ids = tm.tokenizer(prompt)["input_ids"]
    out: list[int] = []
    while len(out) < p.max_new_tokens:
        t = int(reference_process(step_logits(tm, ids + out, mix), p, ids, out, ends).argmax())
        if (t in ends and not p.ignore_eos) or t in p.stop_token_ids:
            break
        out.append(t)
    return out


def run(tm: TwinModel, rows, **kw) -> list:
    """Each (prompt, mix, params[, constraint]) row in one engine, to the end."""
    engine = Engine(tm, materialize=False, **kw)
    reqs = [engine.add(row[0], row[1], row[2], constraint=row[3] if len(row) > 3 else None) for row in rows]
    engine.run_until_done()
    return reqs


def alone(tm: TwinModel, prompt, mix, params: SamplingParams) -> list[int]:
    return run(tm, [(prompt, mix, params)])[0].output_ids


# ---- validation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0"),
    ({"top_k": -2}, "top_k must be 0 or -1"),
    ({"top_k": 1.5}, "top_k must be"),
    ({"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
    ({"min_tokens": -1}, "min_tokens must be an integer >= 0"),
    ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens must be <= max_new_tokens=8"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be a finite number > 0"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
    ({"frequency_penalty": -2.1}, r"frequency_penalty must be in \[-2, 2\]"),
    ({"logprobs": 21}, r"logprobs must be an integer in \[0, 20\]"),
    ({"prompt_logprobs": -1}, r"prompt_logprobs must be an integer in \[0, 20\]"),
    ({"logit_bias": ((5, float("nan")),)}, "logit_bias must map token ids"),
    ({"logit_bias": ((-1, 1.0),)}, "logit_bias must map token ids"),
    ({"logit_bias": ((5, 1.0), (5, 2.0))}, "more than once"),
    ({"stop_token_ids": (3, -1)}, "stop_token_ids must be integers >= 0"),
])
def test_bad_sampling_parameters_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_parameters_are_normalised_and_checked_against_the_model(tm):
    p = SamplingParams(logit_bias={7: 500.0, 9: -3.0}, stop_token_ids=[4, 5], top_k=-1, max_new_tokens=0)
    assert p.logit_bias == ((7, 100.0), (9, -3.0)) and p.stop_token_ids == (4, 5)  # clamped to ±100, tuples
    engine = Engine(tm, materialize=False)
    v = engine.vocab
    with pytest.raises(ValueError, match="logit_bias token ids must be <"):
        engine.add("hi", None, SamplingParams(logit_bias=((v, 1.0),)))
    with pytest.raises(ValueError, match="prompt token ids must be in"):
        engine.add([1, v], None, SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add((), None, SamplingParams())
    ids = tm.tokenizer(PROMPTS[0])["input_ids"]
    assert engine.add(tuple(ids), None, SamplingParams()).prompt_ids == ids  # token ids as a tuple


# ---- the rules, on known logits --------------------------------------------------------------------------------

def test_penalties_and_processing_equal_the_token_by_token_rule():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, generator=gen) * 3  # both signs
    prompts, outputs = [[1, 2, 3, 3], [5]], [[3, 7, 7, 7, 9], []]
    params = [SamplingParams(repetition_penalty=1.7, presence_penalty=0.6, frequency_penalty=-0.4,
                             logit_bias=((2, 5.0), (11, -7.5)), min_tokens=8, stop_token_ids=(13,)),
              SamplingParams(repetition_penalty=0.5, frequency_penalty=1.5, logit_bias=((5, 1.0),))]

    class Row:  # what `process` reads of a request
        def __init__(self, p, prompt, output):
            self.params, self.prompt_ids, self.output_ids, self.constraint = p, prompt, output, None
            self.completion_tokens = len(output)

    rows = [Row(*a) for a in zip(params, prompts, outputs)]
    got = processing.process(x, rows, [None, torch.arange(40) % 2 == 0], ends={0})
    want = torch.stack([reference_process(x[i], params[i], prompts[i], outputs[i], {0}) for i in range(2)])
    want[1, 1::2] = NEG  # the second row's allowed mask: even tokens only
    assert got[0, 0] == NEG and got[0, 13] == NEG  # min_tokens: EOS and the stop token masked
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_top_k_and_min_p_masks_equal_vllms_rule():
    x = torch.tensor([1.0, 3.0, 2.0, 3.0, -1.0, 0.5, 2.0])
    assert top_k_filter(x, 2).tolist() == [NEG, 3.0, NEG, 3.0, NEG, NEG, NEG]
    assert top_k_filter(x, 3).tolist() == [NEG, 3.0, 2.0, 3.0, NEG, NEG, 2.0]  # ties with the k-th are kept
    assert torch.equal(top_k_filter(x, 0), x) and torch.equal(top_k_filter(x, 7), x)
    probs = torch.softmax(x, -1)
    want = torch.where(probs >= 0.3 * probs.max(), x, torch.tensor(NEG))
    assert torch.equal(min_p_filter(x, 0.3), want) and int((want > NEG).sum()) == 4
    assert torch.equal(min_p_filter(x, 0.0), x)
    # draws only from what is kept, and (over enough draws) from all of it
    for kw, kept in [({"top_k": 3}, {1, 2, 3, 6}), ({"min_p": 0.3}, {1, 2, 3, 6}), ({"top_k": 1}, {1, 3})]:
        seen = {sample_row(x, 1.0, 1.0, torch.Generator().manual_seed(s), **kw) for s in range(200)}
        assert seen == kept, kw


# ---- through the engine, against full forwards -----------------------------------------------------------------

def test_penalties_and_bias_in_a_mixed_batch_equal_the_reference(tm):
    engine = Engine(tm, materialize=False)
    ends = engine.eos
    special = [SamplingParams(max_new_tokens=10, frequency_penalty=2.0, presence_penalty=1.0, ignore_eos=True),
               SamplingParams(max_new_tokens=10, repetition_penalty=3.0, ignore_eos=True),
               SamplingParams(max_new_tokens=10, logit_bias=((40, 6.0), (41, 6.0)), presence_penalty=2.0,
                              ignore_eos=True)]
    plain = SamplingParams(max_new_tokens=10, ignore_eos=True)
    rows = [(PROMPTS[i], MIXES[i], p) for i, p in enumerate(special)] + [(PROMPTS[3], MIXES[3], plain)]
    got = run(tm, rows)
    for (prompt, mix, p), r in zip(rows, got):
        assert r.output_ids == reference_greedy(tm, prompt, mix, p, ends)
    for (prompt, mix, _), r in zip(rows[:3], got):  # not vacuous: every parameter changed the tokens
        assert r.output_ids != alone(tm, prompt, mix, plain)


def test_logit_bias_forces_or_bans_a_token(tm):
    plain = alone(tm, PROMPTS[1], None, SamplingParams(max_new_tokens=6, ignore_eos=True))
    forced = alone(tm, PROMPTS[1], None, SamplingParams(max_new_tokens=6, logit_bias=((42, 100.0),)))
    assert forced == [42] * 6
    banned = alone(tm, PROMPTS[1], None, SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                        logit_bias=((plain[0], -100.0),)))
    assert plain[0] not in banned and banned
    sampled = alone(tm, PROMPTS[1], None, SamplingParams(max_new_tokens=6, temperature=1.0, seed=3,
                                                         logit_bias=((42, 100.0),)))
    assert sampled == [42] * 6


def test_min_tokens_masks_eos_and_stop_tokens_until_enough(tm):
    plain = alone(tm, PROMPTS[1], None, SamplingParams(max_new_tokens=8, ignore_eos=True))
    eos = plain[0]  # pretend the token the model takes first is the end of sequence
    for min_tokens in (0, 3):
        engine = Engine(tm, materialize=False)
        engine.eos = {eos}
        p = SamplingParams(max_new_tokens=8, min_tokens=min_tokens)
        r = engine.add(PROMPTS[1], None, p)
        engine.run_until_done()
        assert r.output_ids == reference_greedy(tm, PROMPTS[1], None, p, {eos})
        assert eos not in r.output_ids[:min_tokens] and len(r.output_ids) >= min_tokens
        assert (r.output_ids, r.finish_reason) == ([], "stop") or min_tokens  # without it: EOS at once
    p = SamplingParams(max_new_tokens=8, min_tokens=5, stop_token_ids=(eos,), ignore_eos=True)
    r = run(tm, [(PROMPTS[1], None, p)])[0]
    assert r.output_ids == reference_greedy(tm, PROMPTS[1], None, p, Engine(tm).eos)
    assert eos not in r.output_ids[:5] and len(r.output_ids) >= 5  # a stop token is masked as EOS is


def test_stop_token_ids_end_the_row_and_stay_out_of_the_output(tm):
    p = SamplingParams(max_new_tokens=8, ignore_eos=True, repetition_penalty=3.0)
    ref = run(tm, [(PROMPTS[1], None, p)])[0]
    stop = ref.output_ids[3]
    assert stop not in ref.output_ids[:3]
    for ignore in (False, True):  # ignore_eos does not ignore stop_token_ids
        q = SamplingParams(max_new_tokens=8, repetition_penalty=3.0, stop_token_ids=(stop,), ignore_eos=ignore)
        r = run(tm, [(PROMPTS[1], None, q)])[0]
        assert r.output_ids == ref.output_ids[:3] and r.finish_reason == "stop"
        assert r.text == tm.tokenizer.decode(ref.output_ids[:3], skip_special_tokens=True)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_string_is_cut_or_kept_and_streamed_as_the_text(tm, include):
    p = SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=3.0)
    full = run(tm, [(PROMPTS[1], None, p)])[0].text
    stop = full[5:8]
    at = full.find(stop)
    engine = Engine(tm, materialize=False)
    chunks: list[str] = []
    q = SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=3.0, stop=(stop,),
                       include_stop_str_in_output=include)
    r = engine.add(PROMPTS[1], None, q, on_token=lambda _, d: chunks.append(d))
    engine.run_until_done()
    assert r.finish_reason == "stop" and r.text == (full[:at + len(stop)] if include else full[:at])
    assert "".join(chunks) == r.text


def test_stop_strings_are_not_checked_within_min_tokens(tm):
    p = SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=3.0)
    ref = run(tm, [(PROMPTS[1], None, p)])[0]
    first = tm.tokenizer.decode(ref.output_ids[:1], skip_special_tokens=True)
    stop = first[-1]  # ends within the first token's text
    q = SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=3.0, stop=(stop,), min_tokens=1)
    r = run(tm, [(PROMPTS[1], None, q)])[0]
    later = ref.text.find(stop, len(first))
    assert r.text == (ref.text if later < 0 else ref.text[:later])
    assert len(r.text) >= len(first)
    early = run(tm, [(PROMPTS[1], None, SamplingParams(max_new_tokens=10, ignore_eos=True, repetition_penalty=3.0,
                                                      stop=(stop,)))])[0]
    assert len(early.text) < len(first)  # without min_tokens it stops within the first token


def test_top_k_and_min_p_draw_only_what_they_keep(tm):
    ids = tm.tokenizer(PROMPTS[0])["input_ids"]
    outside = 0
    for seed in range(4):
        for kw, rule in [({"top_k": 3}, lambda x, t: t in x.topk(3).indices.tolist()),
                         ({"min_p": 0.5}, lambda x, t: x.softmax(-1)[t] >= 0.5 * x.softmax(-1).max())]:
            p = SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed, ignore_eos=True, **kw)
            tokens = alone(tm, PROMPTS[0], MIXES[2], p)
            for k, t in enumerate(tokens):
                assert rule(step_logits(tm, ids + tokens[:k], MIXES[2]), t), (kw, seed, k)
        free = alone(tm, PROMPTS[0], MIXES[2], SamplingParams(max_new_tokens=6, temperature=1.0, seed=seed,
                                                              ignore_eos=True))
        outside += sum(t not in step_logits(tm, ids + free[:k], MIXES[2]).topk(3).indices.tolist()
                       for k, t in enumerate(free))
    assert outside > 0  # not vacuous: without top_k the draws leave the top 3


def test_processed_sampled_rows_do_not_depend_on_the_batch(tm):
    p = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, min_p=0.01, seed=11, frequency_penalty=0.5,
                       logit_bias=((17, 2.0),))
    solo = alone(tm, PROMPTS[0], MIXES[2], p)
    rows = [(PROMPTS[1], MIXES[1], SamplingParams(max_new_tokens=8, temperature=1.0, seed=2)),
            (PROMPTS[0], MIXES[2], p), (PROMPTS[3], None, SamplingParams(max_new_tokens=8, repetition_penalty=2.0))]
    assert run(tm, rows)[1].output_ids == solo


# ---- constraints -----------------------------------------------------------------------------------------------

class Forced:
    """Allows exactly one token sequence; its masks are narrower than the model's logits (a tokenizer's vocabulary
    inside a padded head)."""

    def __init__(self, tokens: list[int], width: int) -> None:
        self.tokens, self.width, self.at, self.seen = tokens, width, 0, []

    def allowed(self) -> torch.Tensor:
        mask = torch.zeros(self.width, dtype=torch.bool)
        mask[self.tokens[self.at]] = True
        return mask

    def advance(self, token: int) -> None:
        if token != self.tokens[self.at]:
            raise ValueError(f"token {token} is not allowed")
        self.seen.append(token)
        self.at += 1

    def finished(self) -> bool:
        return self.at == len(self.tokens)


@pytest.mark.parametrize("params", [SamplingParams(max_new_tokens=5),  # complete at max_new_tokens: "stop"
                                    SamplingParams(max_new_tokens=20, temperature=1.5, seed=4, top_k=5),
                                    SamplingParams(max_new_tokens=20, repetition_penalty=2.0, min_tokens=3)])
def test_a_constraint_forces_its_sequence_and_ends_the_row(tm, params):
    width = tm.config.vocab_size - 5
    want = [50, 51, 50, 200, 7]
    c = Forced(want, width)
    plain = SamplingParams(max_new_tokens=6, ignore_eos=True)
    rows = [(PROMPTS[0], MIXES[2], params, c), (PROMPTS[1], MIXES[1], plain)]
    r, other = run(tm, rows)
    assert r.output_ids == want and c.seen == want and r.finish_reason == "stop"
    assert other.output_ids == alone(tm, PROMPTS[1], MIXES[1], plain)  # its batch-mate is as alone


def test_a_constraint_that_allows_only_eos_ends_the_row_by_eos(tm):
    engine = Engine(tm, materialize=False)
    eos = min(engine.eos)

    class OnlyEos(Forced):
        def finished(self) -> bool:
            return False

    r = run(tm, [(PROMPTS[0], None, SamplingParams(max_new_tokens=8), OnlyEos([30, eos], tm.config.vocab_size))])[0]
    assert r.output_ids == [30] and r.finish_reason == "stop"


def test_a_constraint_that_raises_or_allows_nothing_fails_its_row_alone(tm):
    class Raises(Forced):
        def allowed(self):
            if self.at == 2:
                raise RuntimeError("broken grammar")
            return super().allowed()

    class Nothing(Forced):
        def allowed(self):
            return torch.zeros(self.width, dtype=torch.bool)

    plain = SamplingParams(max_new_tokens=6, ignore_eos=True)
    v = tm.config.vocab_size
    rows = [(PROMPTS[0], MIXES[2], plain, Raises([5, 6, 7, 8], v)), (PROMPTS[1], MIXES[1], plain),
            (PROMPTS[2], None, plain, Nothing([5], v)),
            (PROMPTS[3], None, SamplingParams(max_new_tokens=6, min_tokens=3), Forced([5, min(Engine(tm).eos)], v))]
    raised, ok, nothing, conflict = run(tm, rows)
    assert raised.finish_reason == "error" and not raised.error.client and raised.output_ids == [5, 6]
    assert "constraint raised RuntimeError" in raised.error.message
    assert nothing.finish_reason == "error" and "no token may come next" in nothing.error.message
    assert conflict.finish_reason == "error" and conflict.output_ids == [5]  # only EOS allowed, min_tokens bans it
    assert ok.output_ids == alone(tm, PROMPTS[1], MIXES[1], plain) and ok.finish_reason == "length"
