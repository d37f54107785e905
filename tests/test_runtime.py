"""The runtime's contract: exact per-row mixing, PEFT equivalence, materialized == factored, the layer against its
plain-torch reference, the planner's choice of path, greedy batched generation == per-row generation, the
engine's own queue (cancel, abort, counts), and bad-input errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from helpers import DEVICE_CASES, EXPERTS, FLOAT32_CASES, DeviceCase, core_plus_expert
from twinrt.artifact import Artifact
from twinrt.runtime import Engine, MixPolicy, SamplingParams, TwinModel
from twinrt.runtime.engine import Counts
from twinrt.runtime.materialized import MaterializedWeights, mix_key
from twinrt.runtime.mixing import MixLinear, MixState, reference_forward_linear
from twinrt.runtime.planning import KernelCosts
from twinrt.runtime.request import RowFailure


@pytest.fixture(scope="module")
def tm(tiny_artifact) -> TwinModel:
    return TwinModel.from_artifact(tiny_artifact)


@pytest.fixture(scope="module", params=DEVICE_CASES)
def on_device(request, tiny_artifact) -> tuple[DeviceCase, TwinModel]:
    """The tiny artifact's twin on each device and dtype of DEVICE_CASES."""
    case = request.param
    return case, TwinModel.from_artifact(tiny_artifact, device=case.device, dtype=case.dtype)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 300, (6, 10), generator=torch.Generator().manual_seed(1))


# kernel costs under which one kernel is free and the others are not: the planner must pick it
_DEAR = dict(launch=1.0, f_expert=1.0, f_token=1.0, r_expert=1.0, r_pair=1.0, r_token=1.0, g_expert=1.0,
             g_pair=1.0, g_token=1.0)
FREE = {"rowwise": KernelCosts(**{**_DEAR, "r_pair": 0.0, "r_token": 0.0, "r_expert": 0.0, "launch": 0.0}),
        "gathered": KernelCosts(**{**_DEAR, "g_pair": 0.0, "g_token": 0.0, "g_expert": 0.0, "launch": 0.0})}

MIXES = torch.tensor([
    [0.0, 0.0, 0.0],  # core only
    [1.0, 0.0, 0.0],  # one-hot experts
    [0.0, 1.0, 0.0],
    [0.0, 0.0, 1.0],
    [0.5, 0.25, 0.25],  # blends
    [0.0, 0.7, 0.3],
])


def test_mixed_batch_rows_equal_rows_alone(on_device, ids):
    case, tm = on_device
    together = tm.forward(ids, mix=MIXES)
    for b in range(len(MIXES)):
        alone = tm.forward(ids[b : b + 1], mix=MIXES[b : b + 1])
        case.assert_close(together[b], alone[0])
    # and the mixes really differ (the check has teeth)
    assert case.differs(together[1], together[0]) and case.differs(together[4], together[1])


def test_one_hot_equals_peft_expert_and_zero_row_equals_core(on_device, tiny_artifact, ids):
    case, tm = on_device
    art = Artifact.open(tiny_artifact)
    for n, name in enumerate(EXPERTS):
        mix = torch.zeros(len(ids), 3)
        mix[:, n] = 1.0
        want = core_plus_expert(art, name)(input_ids=ids).logits  # the float32 reference, on the host
        case.assert_close(tm.forward(ids, mix=mix), want)
    from transformers import AutoModelForCausalLM

    core = AutoModelForCausalLM.from_pretrained(art.core_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = core(input_ids=ids).logits
    case.assert_close(tm.forward(ids, mix=torch.zeros(len(ids), 3)), want)
    case.assert_close(tm.forward(ids, mix=None), want)


def test_dict_mix_equals_tensor_mix(tm, ids):
    rows = [{"math": 0.5, "code": 0.25, "chat": 0.25}, {"code": 1.0}]
    torch.testing.assert_close(tm.forward(ids[:2], mix=rows), tm.forward(ids[:2], mix=MIXES[[4, 2]]), rtol=0, atol=0)


def test_materialized_equals_factored(on_device, ids):
    case, tm = on_device
    mix = MIXES[4:5].repeat(len(ids), 1)
    plan = tm.plan(mix, tokens=10**6)
    assert plan.path == "materialized", str(plan)
    factored = tm.forward(ids, mix=mix, materialize=False)
    materialized = tm.forward(ids, mix=mix, materialize=True)
    assert tm.materialized.cached(mix[0]) and tm.plan(mix, tokens=1).path == "materialized"  # W' is cached
    case.assert_close(materialized, factored)
    assert case.differs(materialized, tm.forward(ids, mix=None))
    assert tm.plan(MIXES, tokens=10**6).path == "factored"  # different rows never materialize
    assert tm.plan(torch.zeros(2, 3), tokens=10).path == "core"
    assert tm.plan(MIXES[1:2], tokens=1).path in ("factored", "materialized")


def test_sparse_kernels_equal_the_factored_kernel(on_device, ids):
    # top-1 / top-2 style mixes: each row's own experts only (rowwise, gathered) must give the factored kernel's
    # logits, and must really be the kernel run
    case, tm = on_device
    factored = tm.forward(ids, mix=MIXES)
    policy = tm.policy
    try:
        for kernel in ("rowwise", "gathered"):
            tm.policy = dataclasses.replace(policy, kernels=("factored", kernel),
                                            costs={"float32": FREE[kernel], case.dtype_name: FREE[kernel]})
            assert tm.plan(MIXES, tokens=10, step_tokens=ids.numel()).path == kernel
            case.assert_close(tm.forward(ids, mix=MIXES), factored)
    finally:
        tm.policy = policy


def test_mix_policy_is_frozen_and_validated(tm):
    assert tm.policy == MixPolicy(kernels=("factored", "rowwise", "gathered"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        tm.policy.kernels = ("factored",)
    for bad in ({"kernels": ("rowwise",)}, {"kernels": ("factored", "grouped")}, {"costs": {}}):
        with pytest.raises(ValueError, match="must"):
            MixPolicy(**bad)
    with pytest.raises(ValueError, match=">= 0"):
        KernelCosts(*[1.0] * 8, -1.0)


def test_materialized_weights_are_the_mixed_weight_and_evicted_least_recently_used():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = MixLinear(base, MixState(2), {0: (torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g))})
    one = 6 * 8 * 4  # the bytes of one float32 W'
    cache = MaterializedWeights([layer], torch.float32, torch.device("cpu"), budget_bytes=one)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.0])
    key = cache.build(a)
    assert key == mix_key(a) == (1.0, 0.0) and cache.cached(a) and not cache.cached(b)
    with torch.no_grad():
        torch.testing.assert_close(layer.materialized[key], base.weight + layer.b_t.T @ layer.a_cat, rtol=0, atol=1e-6)
    assert cache.build(a) == key and list(layer.materialized) == [key]  # a hit builds nothing
    cache.build(b)  # over the budget: the least recently used W' goes, from the layer too
    assert cache.cached(b) and not cache.cached(a) and list(layer.materialized) == [mix_key(b)]


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_mix_linear_matches_reference(case):
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=True)
    factors = {0: (torch.randn(3, 24, generator=g), torch.randn(40, 3, generator=g) * 0.1),
               2: (torch.randn(5, 24, generator=g), torch.randn(40, 5, generator=g) * 0.1)}
    mix = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.2, 0.5, 0.8], [0.0, 1.0, 0.3]])
    x = torch.randn(4, 7, 24, generator=g)
    ref = reference_forward_linear(x, base.weight.detach(), base.bias.detach(), factors, mix)
    dev, dtype = case.device, case.dtype
    state = MixState(3, device=torch.device(dev))
    layer = MixLinear(base.to(dev, dtype), state,
                      {k: (a.to(dev, dtype), b.to(dev, dtype)) for k, (a, b) in factors.items()})
    xd = x.to(dev, dtype)
    with torch.no_grad():
        state.set(mix)
        case.assert_close(layer(xd), ref)
        assert case.differs(ref[2], torch.nn.functional.linear(x[2], base.weight.cpu().float(),
                                                               base.bias.cpu().float()))
        state.set(mix[2:3])  # expert 1 has no factors here; experts 0 and 2 active
        case.assert_close(layer(xd[2:3]), ref[2:3])
        state.set(torch.tensor([[0.0, 0.0, 0.4]]))  # a subset of the factors: only expert 2's slots
        sub = reference_forward_linear(x[:1], base.weight.detach().cpu().float(), base.bias.detach().cpu().float(),
                                       factors, torch.tensor([[0.0, 0.0, 0.4]]))
        case.assert_close(layer(xd[:1]), sub)
        for kernel in ("rowwise", "gathered"):  # each row's own experts only
            state.set(mix, kernel=kernel)
            case.assert_close(layer(xd), ref)
            case.assert_close(layer(xd[:, -1]), ref[:, -1])  # [B, in]


PROMPTS = ["what is two plus three", "hello world", "def add(a, b):", "the capital of france is",
           "5 + 7 =", "translate cat to french"]


@pytest.fixture(scope="module", params=FLOAT32_CASES)
def exact_on_device(request, tiny_artifact) -> TwinModel:
    """The tiny artifact's twin in float32 on each device: greedy decoding compared token for token."""
    return TwinModel.from_artifact(tiny_artifact, device=request.param.device)


def test_greedy_mixed_batch_equals_per_row_generation(exact_on_device):
    tm = exact_on_device
    together = tm.generate(PROMPTS, mix=MIXES, max_new_tokens=12, materialize=False)
    alone = [tm.generate([p], mix=MIXES[i : i + 1], max_new_tokens=12, materialize=False)[0]
             for i, p in enumerate(PROMPTS)]
    assert together == alone
    assert len(set(together)) > 1


def test_requests_joining_a_running_batch_match_solo_runs(exact_on_device):
    tm = exact_on_device
    params = SamplingParams(max_new_tokens=10)
    solo = [tm.generate([p], mix=MIXES[i : i + 1], max_new_tokens=10, materialize=False)[0]
            for i, p in enumerate(PROMPTS[:4])]
    engine = Engine(tm, max_batch=8, materialize=False)
    first = [engine.add(p, MIXES[i], params) for i, p in enumerate(PROMPTS[:2])]
    engine.step()
    engine.step()
    later = [engine.add(p, MIXES[i + 2], params) for i, p in enumerate(PROMPTS[2:4])]
    assert len(engine.running) == 2 and len(engine.waiting) == 2
    engine.run_until_done()
    assert [r.text for r in first + later] == solo


def test_stop_strings_streaming_and_finish_reasons(tm):
    engine = Engine(tm, materialize=False)
    full = tm.generate([PROMPTS[0]], max_new_tokens=12)[0]
    assert len(full) > 4
    stop = full[3:5]
    chunks: list[str] = []
    req = engine.add(PROMPTS[0], None, SamplingParams(max_new_tokens=12, stop=(stop,)),
                     on_token=lambda r, delta: chunks.append(delta))
    short = engine.add(PROMPTS[1], None, SamplingParams(max_new_tokens=2))
    engine.run_until_done()
    assert req.text == full[: full.find(stop)] and req.finish_reason == "stop"
    assert "".join(chunks) == req.text
    assert short.finish_reason == "length" and short.completion_tokens == 2


def test_ignore_eos_keeps_decoding_through_end_of_sequence(tm):
    plain = Engine(tm, materialize=False)
    ref = plain.add(PROMPTS[0], None, SamplingParams(max_new_tokens=6))
    plain.run_until_done()
    assert ref.completion_tokens == 6
    eos = ref.output_ids[2]      # pretend the third token is the end of sequence
    engine = Engine(tm, materialize=False)
    engine.eos = {eos}
    stopped = engine.add(PROMPTS[0], None, SamplingParams(max_new_tokens=6))
    kept = engine.add(PROMPTS[0], None, SamplingParams(max_new_tokens=6, ignore_eos=True))
    engine.run_until_done()
    assert stopped.finish_reason == "stop" and stopped.output_ids == ref.output_ids[: ref.output_ids.index(eos)]
    assert kept.finish_reason == "length" and kept.output_ids == ref.output_ids


def test_seeded_sampling_does_not_depend_on_the_batch(tm):
    a = tm.generate([PROMPTS[0]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    b = tm.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    assert a[0] == b[0]


def test_cancel_frees_the_row(tm):
    engine = Engine(tm, materialize=False)
    req = engine.add(PROMPTS[0], None, SamplingParams(max_new_tokens=50))
    engine.step()
    engine.cancel(req)
    engine.step()
    assert req.finish_reason == "cancelled" and not engine.busy


def test_the_engine_owns_its_queue_cancel_abort_and_counts(tm):
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    engine = Engine(tm, max_batch=1, materialize=False)
    finals = []
    first = engine.add(PROMPTS[0], None, params)
    queued = engine.add(PROMPTS[1], MIXES[1], params, on_token=lambda r, d: finals.append((r.done, d)))
    last = engine.add(PROMPTS[2], MIXES[4], params)
    assert engine.counts() == Counts(waiting=3, prefilling=0, running=0)
    engine.step()
    assert engine.running == (first,) and engine.waiting == (queued, last)
    assert engine.counts() == Counts(waiting=2, prefilling=0, running=1)
    assert tm.state.mix is None  # the engine cleared the mix after its forward
    assert engine.cancel(queued)  # still waiting: it leaves the queue now
    assert queued.finish_reason == "cancelled" and finals == [(True, "")] and engine.waiting == (last,)
    assert not engine.cancel(first)  # running: it leaves at the next step, which returns it
    assert engine.step() == [first] and first.finish_reason == "cancelled"
    engine.step()  # `last` joins the batch
    tail = engine.add(PROMPTS[3], None, params)
    assert engine.running == (last,) and engine.waiting == (tail,)
    dropped = engine.abort("the server is shutting down")
    assert dropped == [tail, last] and not engine.busy and engine.counts() == Counts(0, 0, 0)
    assert all(r.finish_reason == "error" and r.error == RowFailure("the server is shutting down", client=False)
               for r in dropped)
    assert queued.error is None and first.error is None  # requests already done are left as they were
    again = engine.add(PROMPTS[0], None, SamplingParams(max_new_tokens=3, ignore_eos=True))
    engine.run_until_done()  # an aborted engine serves again
    assert again.finish_reason == "length" and again.completion_tokens == 3


@pytest.mark.parametrize("mix,message", [
    (torch.ones(2, 4), r"mix must have shape \[2, 3\]"),
    (torch.tensor([[0.5, -0.1, 0.0], [1.0, 0.0, 0.0]]), "weight of 'code' is negative"),
    (torch.tensor([[float("nan"), 0.0, 0.0], [1.0, 0.0, 0.0]]), "NaN"),
    ([{"math": 1.0}, {"poetry": 1.0}], "unknown expert 'poetry'"),
    ([{"math": 1.0}], "mix has 1 rows for a batch of 2"),
    ([{"math": "lots"}, {}], "must be a number"),
])
def test_bad_mixes_raise_value_errors(tm, ids, mix, message):
    with pytest.raises(ValueError, match=message):
        tm.forward(ids[:2], mix=mix)
    with pytest.raises(ValueError, match=message):
        tm.generate(PROMPTS[:2], mix=mix, max_new_tokens=2)


def test_bad_generate_arguments(tm):
    with pytest.raises(ValueError, match="prompts is empty"):
        tm.generate([], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
        tm.generate(["x"], max_new_tokens=-1)
    assert tm.generate(["x"], max_new_tokens=0) == [""]  # 0: score only, no token
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        tm.generate(["x"], temperature=-1.0)
    with pytest.raises(ValueError, match="prompt is empty"):
        tm.generate([""], max_new_tokens=2)
    with pytest.raises(ValueError, match="context length is 128"):
        tm.generate(["hello " * 200], max_new_tokens=2)


class _ScaleByAnotherName(nn.Module):
    """An RMSNorm whose class name does not say so."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class _GatedNorm(_ScaleByAnotherName):
    """Named a norm, but its output is not affine in its weight: per-row mixing of its deltas would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.weight


def test_norms_are_recognised_by_what_they_compute_not_their_name():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from twinrt.runtime.mixing import scales_affinely

    assert scales_affinely(LlamaRMSNorm(8)) and scales_affinely(nn.LayerNorm(8)) and scales_affinely(
        _ScaleByAnotherName(8))
    assert not scales_affinely(_GatedNorm(8))
    assert not scales_affinely(nn.Linear(8, 8)) and not scales_affinely(nn.Embedding(4, 8))
