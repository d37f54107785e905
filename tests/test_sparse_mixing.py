"""Sparse per-row mixing: the rowwise and gathered kernels against their plain-torch references (fp32 and bf16,
top-1 / top-2 / dense mixes, [B, T, in] and [B, in], rows with no expert, ranks that differ per expert, experts
without factors in a layer), rows that pay only for their own experts, the planner's choice of kernel and its
cost staying flat in N, and a mixed batch through `generate` equal to each row alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers import DEVICE_CASES, FLOAT32_CASES
from twinrt.runtime import SamplingParams, TwinModel
from twinrt.runtime.mixing import MixLinear, MixState, reference_forward_linear
from twinrt.runtime.planning import ExpertCosts, KernelCosts, MixPolicy, plan_batch
from twinrt.runtime.sparse import LayerRoutes, Pairs, gathered_delta, reference_sparse_delta, rowwise_delta_

SPARSE = ("rowwise", "gathered")

# 5 rows over 4 experts; expert 1 has no factors in the layer below, so row 3 mixes it with an expert that has
MIXES = {
    "top1": torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 1.0]]),
    "top2": torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.7, 0.0, 0.3, 0.0], [0.0, 0.0, 0.4, 0.6], [0.0, 0.5, 0.0, 0.5],
                          [0.9, 0.0, 0.0, 0.1]]),
    "dense": torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25],
                           [0.4, 0.1, 0.2, 0.3], [0.7, 0.1, 0.1, 0.1]]),
}


def _factors(dtype=torch.float32, in_f: int = 24, out_f: int = 40) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Factors of experts 0, 2 and 3 at ranks 3, 5 and 2 (expert 1 has none)."""
    g = torch.Generator().manual_seed(0)
    return {e: ((torch.randn(r, in_f, generator=g) * 0.3).to(dtype), (torch.randn(out_f, r, generator=g) * 0.3)
                .to(dtype)) for e, r in ((0, 3), (2, 5), (3, 2))}


def _layer(dtype, device: str = "cpu") -> tuple[MixLinear, MixState, dict]:
    base = torch.nn.Linear(24, 40, bias=True)
    with torch.no_grad():
        base.weight.mul_(0.3)
    factors = _factors()
    state = MixState(4, device=torch.device(device))
    layer = MixLinear(base.to(device, dtype), state,
                      {e: (a.to(device, dtype), b.to(device, dtype)) for e, (a, b) in factors.items()})
    return layer, state, factors


@pytest.mark.parametrize("case", DEVICE_CASES)
@pytest.mark.parametrize("kernel", SPARSE)
@pytest.mark.parametrize("kind", sorted(MIXES))
@pytest.mark.parametrize("shape", [(5, 7, 24), (5, 24), (5, 1, 24)])
def test_mix_linear_kernels_equal_the_reference(case, kernel, kind, shape):
    dtype = case.dtype
    layer, state, factors = _layer(dtype, case.device)
    mix = MIXES[kind]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    w, bias = layer.base.weight.detach().float().cpu(), layer.base.bias.detach().float().cpu()
    ref = reference_forward_linear(x, w, bias, {e: (a.to(dtype).float(), b.to(dtype).float())
                                                for e, (a, b) in factors.items()}, mix)
    state.set(mix, kernel=kernel)
    with torch.no_grad():
        got = layer(x.to(case.device, dtype)).float().cpu()
    assert got.shape == ref.shape
    case.assert_close(got, ref)
    core = torch.nn.functional.linear(x, w, bias)
    case.assert_close(got[0], core[0])  # the row with no expert is the core
    assert (got[1:] - core[1:]).abs().amax() > 0.3  # and the experts move the others (5× the bf16 tolerance)


@pytest.mark.parametrize("case", DEVICE_CASES)
@pytest.mark.parametrize("shape", [(5, 6, 24), (5, 24)])
def test_sparse_deltas_equal_the_per_pair_loop(case, shape):
    # the kernels alone, on a layer's stacks (ranks 3, 5, 2 zero-padded to 5), against sparse.py's reference
    dtype, dev = case.dtype, torch.device(case.device)
    layer, _, factors = _layer(dtype, case.device)
    slot_of = torch.tensor([0, -1, 1, 2])
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    for mix in MIXES.values():
        routes = LayerRoutes.of(Pairs.of(mix), slot_of, dev)
        ref = reference_sparse_delta(x, {e: (a.to(dtype), b.to(dtype)) for e, (a, b) in factors.items()}, mix)
        got = gathered_delta(x.to(dev), layer.a_s, layer.b_s, routes)
        case.assert_close(got, ref)
        y = torch.zeros(*shape[:-1], 40, dtype=dtype, device=dev)
        rowwise_delta_(y, x.to(dev), layer.a_s, layer.b_s, layer.ranks, routes)
        case.assert_close(y, ref)
        assert case.differs(ref, torch.zeros_like(ref))
    assert layer.a_s.shape == (3, 24, 5) and layer.b_s.shape == (3, 5, 40)
    assert layer.a_s[2, :, 2:].abs().sum() == 0 and layer.b_s[0, 3:].abs().sum() == 0  # padding is zeros


@pytest.mark.parametrize("kernel", SPARSE)
def test_rows_pay_only_for_their_own_experts(kernel):
    # expert 2's factors are NaN: every row that does not use it must stay finite, which the factored kernel
    # (every row runs every active expert, times its weight, 0 × NaN = NaN) cannot do
    layer, state, _ = _layer(torch.float32)
    with torch.no_grad():
        layer.a_s[1] = float("nan")
    mix, x = MIXES["top1"], torch.randn(5, 3, 24)
    state.set(mix, kernel="factored")
    with torch.no_grad():
        assert layer(x).isnan().all()
    state.set(mix, kernel=kernel)
    with torch.no_grad():
        y = layer(x)
    assert y[2].isnan().all() and not y[[0, 1, 3, 4]].isnan().any()


def smollm2_costs(n: int, dtype: str = "float32") -> ExpertCosts:
    """ExpertCosts of SmolLM2-135M (30 decoder layers of 7 linears, tied 49152-token head) with n rank-16
    experts on every decoder linear, as ExpertCosts.of would count them."""
    shapes = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)] * 30
    size = 2 if dtype == "bfloat16" else 4
    elements = sum(16 * (i + o) for i, o in shapes)
    base = sum(2 * i * o for i, o in shapes) + 2 * 576 * 49152
    return ExpertCosts(base, (2 * elements,) * n, (0,) * n, (sum(2 * 16 * i * o for i, o in shapes),) * n,
                       (16 * len(shapes),) * n, len(shapes), sum(i * o for i, o in shapes) * size,
                       (len(shapes),) * n, base // 2 * size, (elements * size,) * n, dtype)


def _plan(mix: torch.Tensor, step_tokens: int, costs: ExpertCosts, policy: MixPolicy | None = None):
    names = [f"e{i}" for i in range(mix.shape[1])]
    return plan_batch(mix, mix.shape[0] * 80, step_tokens, experts=names, costs=costs, policy=policy or MixPolicy(),
                      is_cached=lambda row: False, budget_bytes=0)


def _routing(kind: str, batch: int, n: int) -> torch.Tensor:
    rows, mix = torch.arange(batch), torch.zeros(batch, n)
    if kind == "top1":
        mix[rows, rows % n] = 1.0
    elif kind == "top2":
        mix[rows, rows % n], mix[rows, (rows + 1) % n] = 0.7, 0.3
    else:
        mix = torch.rand(batch, n, generator=torch.Generator().manual_seed(0)) + 0.05
        mix /= mix.sum(1, keepdim=True)
    return mix


def test_the_plan_picks_a_sparse_kernel_for_sparse_mixes_and_not_for_dense_ones():
    costs = smollm2_costs(64)
    for kind in ("top1", "top2"):
        decode, prefill = _plan(_routing(kind, 32, 64), 32, costs), _plan(_routing(kind, 32, 64), 32 * 64, costs)
        assert decode.path == "gathered" and prefill.path == "rowwise", (str(decode), str(prefill))
        assert decode.extra_flops_per_token == prefill.extra_flops_per_token < costs.flops(tuple(range(32)))[1] / 8
    for step in (32, 32 * 64):
        dense = _plan(_routing("dense", 32, 16), step, smollm2_costs(16))
        assert dense.path == "factored", str(dense)
    plan = _plan(_routing("top1", 32, 64), 32, costs)
    text = str(plan)  # the plan says why: the shape of the mix, and every kernel's estimate
    assert "a row uses 1.0 of 32 active experts" in text and "est. factored" in text and "gathered" in text
    assert dict(plan.estimates)["gathered"] < dict(plan.estimates)["factored"] / 2
    assert plan.byte_limit_ratio == pytest.approx(costs.base_bytes / (costs.base_bytes + 32 * costs.factor_bytes[0]))
    assert plan.limit_ratio == min(plan.flop_limit_ratio, plan.byte_limit_ratio) < 0.6
    only = _plan(_routing("top1", 32, 64), 32, costs, MixPolicy(kernels=("factored",)))
    assert only.path == "factored" and [k for k, _ in only.estimates] == ["factored"]


def test_sparse_kernels_cost_is_flat_in_the_number_of_experts():
    # 32 rows on 32 distinct experts of 64 or of 1024: the same estimate (and the same FLOPs) per kernel
    small, large = (_plan(_routing("top1", 32, n), 32, smollm2_costs(n)) for n in (64, 1024))
    assert small.path == large.path == "gathered"
    assert dict(small.estimates)["gathered"] == pytest.approx(dict(large.estimates)["gathered"])
    assert small.extra_flops_per_token == large.extra_flops_per_token


# ---- end to end ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=FLOAT32_CASES)
def strong(request, tiny_artifact) -> TwinModel:
    """The session's tiny artifact (in float32 on each device) with every expert's factors scaled up 30×, so
    that each expert decodes its own tokens (at 5% perturbations all arms decode alike and a mix test would pass
    vacuously)."""
    tm = TwinModel.from_artifact(tiny_artifact, device=request.param.device)
    with torch.no_grad():
        for layer in tm.mix_linears:
            layer.b_s.mul_(30.0)
    return tm


PROMPTS = ["what is two plus three", "hello world", "def add(a, b):", "the capital of france is",
           "5 + 7 =", "translate cat to french"]
GEN_MIXES = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.7, 0.3, 0.0],
                          [0.0, 0.4, 0.6]])
_DEAR = dict(launch=1.0, f_expert=1.0, f_token=1.0, r_expert=1.0, r_pair=1.0, r_token=1.0, g_expert=1.0,
             g_pair=1.0, g_token=1.0)
FREE = {"rowwise": KernelCosts(**{**_DEAR, "launch": 0.0, "r_expert": 0.0, "r_pair": 0.0, "r_token": 0.0}),
        "gathered": KernelCosts(**{**_DEAR, "launch": 0.0, "g_expert": 0.0, "g_pair": 0.0, "g_token": 0.0})}


@pytest.mark.parametrize("kernel", SPARSE)
def test_generate_mixed_batch_equals_each_row_alone(strong, kernel, monkeypatch):
    tm = strong
    alone = [tm.generate([p], mix=GEN_MIXES[i : i + 1], max_new_tokens=8, materialize=False)[0]
             for i, p in enumerate(PROMPTS)]
    assert len(set(alone)) >= 4  # the experts really decode differently
    kernels = []
    set_mix = tm.set_mix

    def spy(*args, **kwargs):
        plan = set_mix(*args, **kwargs)
        kernels.append(plan.path)
        return plan

    monkeypatch.setattr(tm, "set_mix", spy)
    monkeypatch.setattr(tm, "policy", dataclasses.replace(tm.policy, costs={"float32": FREE[kernel]}))
    together = tm.generate(PROMPTS, mix=GEN_MIXES, max_new_tokens=8, materialize=False)
    assert together == alone
    assert kernel in kernels  # the batch (prefill and decode steps with different mixes) ran the sparse kernel


def test_router_default_keeps_a_few_experts_per_row_when_there_are_many():
    from router.options import AUTO_DENSE_MAX, RoutingOptions, apply_options

    z = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)) * 3
    z[:, 5] += 6.0  # one clear favourite, a tail of small weights
    names = [f"e{i}" for i in range(64)]
    res = apply_options(z, RoutingOptions(), names)
    nz = (res.weights != 0).sum(1)
    assert (nz >= 1).all() and (nz <= 2).all() and set(res.rules) <= {"top_k", "min_weight"}
    torch.testing.assert_close(res.weights.sum(1), torch.ones(6))
    assert (res.weights[res.weights != 0] >= 0.05).all()  # what is applied, and reported, is the sparse mix
    kept = apply_options(z, RoutingOptions(top_k=64), names)  # an explicit top_k turns the default off
    torch.testing.assert_close(kept.weights, torch.softmax(z, -1))
    few = torch.randn(6, AUTO_DENSE_MAX, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(apply_options(few, RoutingOptions(), names[:AUTO_DENSE_MAX]).weights,
                               torch.softmax(few, -1))  # a handful of experts: the full softmax, as before


# ---- what a device waits for -----------------------------------------------------------------------------------

CUDA_CASES = [p for p in DEVICE_CASES if p.values[0].device == "cuda"]


@pytest.mark.parametrize("case", CUDA_CASES)
@pytest.mark.parametrize("kernel", ("factored", *SPARSE))
def test_a_mixing_layer_never_waits_for_the_device(case, kernel):
    # what a layer indexes with is found on the host when the mix is set; the forward itself launches kernels
    # and nothing else (CUDA's sync debug mode raises on any synchronisation)
    layer, state, _ = _layer(case.dtype, case.device)
    x = torch.randn(5, 3, 24, device=case.device, dtype=case.dtype)
    state.set(MIXES["top2"], kernel=kernel)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            layer(x)
            layer(x[:, -1])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("case", DEVICE_CASES)
def test_a_step_reads_back_each_rows_token_and_only_the_logits_it_samples_from(case):
    from twinrt.runtime.request import Request
    from twinrt.runtime.tokens import _HostLogits

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    logits[2, 7] = float("nan")
    greedy, sampled = SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=4, temperature=0.7)
    reqs = [Request(i, [1, 2], None, p) for i, p in enumerate([greedy, sampled, greedy, sampled])]
    got = _HostLogits(reqs, logits.to(case.device, case.dtype))
    want = logits.to(case.dtype).float()
    assert got.finite == [True, True, False, True]
    assert [g for i, g in enumerate(got.greedy) if i != 2] == [int(want[i].argmax()) for i in (0, 1, 3)]
    case.assert_close(got[1], want[1])
    case.assert_close(got[[3, 1]], want[[3, 1]])
    assert got[3].device.type == "cpu"


_TRITON_CHECK = """
import json, sys, torch
from twinrt.runtime import triton_lora
from twinrt.runtime.mixing import MixLinear, MixState
from twinrt.runtime.sparse import LayerRoutes, Pairs, reference_sparse_delta
assert triton_lora.available(torch.zeros(1))
mixes = json.loads(sys.argv[1])
g = torch.Generator().manual_seed(0)
out = []
for dt in (torch.float32, torch.float16):
    factors = {e: ((torch.randn(r, 24, generator=g) * 0.3).to(dt), (torch.randn(40, r, generator=g) * 0.3).to(dt))
               for e, r in ((0, 3), (2, 5), (3, 2))}
    layer = MixLinear(torch.nn.Linear(24, 40).to(dt), MixState(4), factors)
    for kind, rows in mixes.items():
        mix = torch.tensor(rows)
        routes = LayerRoutes.of(Pairs.of(mix), layer.slot_of)
        for shape in ((5, 24), (5, 1, 24), (5, 19, 24)):
            x = torch.randn(*shape, generator=g).to(dt)
            y = torch.randn(*shape[:-1], 40, generator=g).to(dt)
            want = y.float() + reference_sparse_delta(x, factors, mix)
            triton_lora.gathered_add_(y, x, layer.a_s, layer.b_s, routes)
            out.append([str(dt), kind, list(shape), float((y.float() - want).abs().max()), float(want.abs().max())])
print(json.dumps(out))
"""


def test_the_triton_gathered_kernel_equals_the_reference_under_the_interpreter():
    # the CUDA gathered kernel (two Triton launches) run by Triton's interpreter on the CPU: every mix kind, a token
    # per row and several (more than one tile of rows), ranks 3/5/2 padded to 16, float32 and float16
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    mixes = {k: v.tolist() for k, v in MIXES.items()}
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK, json.dumps(mixes)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * len(MIXES) * 3
    for dt, kind, shape, err, scale in rows:
        assert err <= (1e-5 if dt == "torch.float32" else 5e-3) * max(1.0, scale), (dt, kind, shape, err)
