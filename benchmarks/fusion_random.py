"""The fused runtime on a randomly initialised Llama of a named shape, built directly on the device: no model
files, no network (what `benchmarks/gpu/run.sh` runs on a bare GPU machine; `bench_fusion.py --random-weights`).

Shapes: smollm2-135m (SmolLM2-135M: hidden 576, 30 layers), llama-1b (Llama-3.2-1B: hidden 2048, 16 layers),
llama-8b (Llama-3.1-8B: hidden 4096, 32 layers, GQA 32/8). N random experts of rank r on every decoder linear
(q, k, v, o, gate, up, down), as LoRA experts are, attached with `TwinModel(...)` as an artifact's are.

Kernels (one row per shape, N, rank, batch, routing, phase): the static model (a plain transformers model
sharing the core's weights) against the twin's kernels on the same inputs, round-robin: `factored` (every row
runs every active expert), `rowwise` and `gathered` (each row its own experts; rowwise is left out where it
would launch more than --max-launches GEMMs per forward; on CUDA gathered is the Triton kernel and
`gathered_bags` the embedding-bag one), `materialized` (one W' for a mix all rows share), and
the reference way (rebuild dense weights per sample, run it at batch 1; timed on 2 samples, scaled to the batch).
Routings: dense (Dirichlet(1) over all N, per row), top1 (row b to expert b mod N), top2 (b mod N and b + 1 mod
N at 0.7 / 0.3). Prefill: 64 prompt tokens per row; decode: 16 steps on a 64-token cache. Each ratio to the
static model stands next to the routing's FLOP limit 1 / (1 + own experts' FLOPs / base FLOPs) and byte limit
base bytes / (base bytes + the active experts' factor bytes). Device time is measured with CUDA events on CUDA
(perf_counter elsewhere).

End to end (`--e2e`): the engine (continuous batching) on `--e2e-requests` requests of random token prompts (32
to 256 tokens) with `--e2e-tokens` new tokens each (ignore_eos), all submitted at once: the static model (the
engine over a plain model), the twin with no mix, with top-1 mixes over N, and with dense mixes.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import torch

from bench_experts import limits, routing_mix
from common import machine, write_json
from twinrt.runtime import Engine, SamplingParams, TwinModel, triton_lora

PROMPT_LEN, DECODE_STEPS = 64, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
ROUTINGS = {"dense": "dirichlet", "top1": "top1", "top2": "top2"}  # this benchmark's names -> routing_mix's


# ---- timing ----------------------------------------------------------------------------------------------------

class Clock:
    """Seconds of `fn()` on a device: CUDA events around it on CUDA (the device's own time, launch gaps
    included), perf_counter elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3


# ---- the model, its experts, a tokenizer -----------------------------------------------------------------------

def tokenizer(vocab: int):
    """A word-level tokenizer over `vocab` ids ("t0" ... ), built in memory: what the engine detokenizes with."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                                   eos_token="t2")
    fast.padding_side = "left"
    return fast


def random_llama(shape: str, device: torch.device, dtype: torch.dtype, layers: int | None = None, seed: int = 0):
    """A randomly initialised Llama of a named shape (`layers`: fewer decoder layers), on the device."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    kw = dict(SHAPES[shape])
    if layers:
        kw["num_hidden_layers"] = layers
    cfg = LlamaConfig(**kw, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def decoder_linears(model) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}


def sharing(model, keep_own: set[str] = frozenset()):
    """A copy of `model` whose tensors are `model`'s own (no copy), except the weights named in `keep_own`."""
    memo = {id(t): t for name, t in [*model.named_parameters(), *model.named_buffers()] if name not in keep_own}
    return copy.deepcopy(model, memo)


def random_twin(static, tok, n: int, rank: int, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> TwinModel:
    """The twin: a copy of `static` sharing its weights, with n random rank-`rank` experts on every decoder
    linear, scaled so that ‖B A x‖ is a few percent of ‖W x‖."""
    model = sharing(static)
    gen = torch.Generator(device=device).manual_seed(seed)
    factors = {}
    for e in range(n):
        per = {}
        for name, lin in decoder_linears(model).items():
            i, o = lin.in_features, lin.out_features
            a = torch.randn(rank, i, device=device, dtype=dtype, generator=gen) / i ** 0.5
            b = torch.randn(o, rank, device=device, dtype=dtype, generator=gen) * (0.02 * 0.05 * i ** 0.5 / rank ** 0.5)
            per[f"{name}.weight"] = (a, b)
        factors[f"e{e}"] = per
    return TwinModel(model, tok, device, dtype, experts=list(factors), factors=factors,
                     materialize_budget_bytes=1 << 62)


# ---- one cell --------------------------------------------------------------------------------------------------

def _forward(model, ids, mask, cache):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                 logits_to_keep=1)


def prefill(model, ids):
    from transformers.cache_utils import DynamicCache

    with torch.no_grad():
        return _forward(model, ids, torch.ones_like(ids), DynamicCache(config=model.config))


def decode(model, prefilled):
    """DECODE_STEPS greedy steps on `prefilled` (cache, mask, next ids), which it extends: pass a copy."""
    cache, mask, nxt = prefilled
    with torch.no_grad():
        for _ in range(DECODE_STEPS):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = _forward(model, nxt, mask, cache)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)


def reference_sample_s(tm: TwinModel, ref, mix: torch.Tensor, phase: str, ids, clock: Clock, samples: int = 2
                       ) -> float:
    """Seconds per sample of the reference way: W = W_core + Σ w_n B_n A_n written into `ref` (a plain copy of
    the core with its own linear weights), then the sample alone: its prefill, or (decode) its DECODE_STEPS
    steps, the prefill between the two left off the clock as it is for the other arms."""
    names = {id(m): name for name, m in tm.model.named_modules()}
    targets = [ref.get_submodule(names[id(layer)]) for layer in tm.mix_linears]
    total = 0.0
    for s in range(samples):
        row, one = mix[s % len(mix)], ids[s % len(ids)][None]

        def rebuild(row=row):
            with torch.no_grad():
                for layer, target in zip(tm.mix_linears, targets):
                    target.weight.copy_(layer.base.weight + layer.delta_weight(row).to(target.weight))

        if phase == "prefill":
            total += clock(lambda one=one: (rebuild(), prefill(ref, one)))
        else:
            total += clock(rebuild)
            out = prefill(ref, one)
            state = (out.past_key_values, torch.ones_like(one), out.logits[:, -1].argmax(-1, keepdim=True))
            total += clock(lambda state=state: decode(ref, state))
    return total / samples


def bench_cell(tm: TwinModel, static, mix: torch.Tensor, phase: str, ids, prefilled, clock: Clock, repeats: int,
               max_launches: int, materialize: bool, max_bag_elements: int = 1 << 27) -> dict:
    """One cell: every arm round-robin. An arm that raises (out of memory, a kernel that does not build) is left
    out of the cell with its error recorded; the others still run."""
    b = ids.shape[0]
    nz = mix != 0
    pairs = int(nz.sum())
    arms = {"static": lambda: None, "factored": lambda: tm.state.set(mix, kernel="factored")}
    skipped = {}
    triton = ids.is_cuda and triton_lora.available(ids)
    # the embedding-bag kernel indexes every (pair, token, input) element: past a size its index alone is GBs
    bag_elements = pairs * (PROMPT_LEN if phase == "prefill" else 1) * max(m.in_features for m in tm.mix_linears)
    bags_fit = bag_elements <= max_bag_elements
    if not bool(nz.all()) or len(tm.experts) <= 8:
        if triton or bags_fit:
            arms["gathered"] = lambda: tm.state.set(mix, kernel="gathered")
        if triton and bags_fit:  # on CUDA gathered is Triton's; the embedding bags beside it
            arms["gathered_bags"] = lambda: tm.state.set(mix, kernel="gathered")
        if not bags_fit:
            skipped["gathered_bags" if triton else "gathered"] = (f"{bag_elements} bag index elements > "
                                                                  f"{max_bag_elements}")
        launches = 2 * pairs * len(tm.mix_linears)
        if launches <= max_launches:
            arms["rowwise"] = lambda: tm.state.set(mix, kernel="rowwise")
        else:
            skipped["rowwise"] = f"{launches} GEMM launches per forward > --max-launches {max_launches}"
    if materialize:
        shared = mix[:1].repeat(b, 1)
        key = tm.materialize(shared[0])
        arms["materialized"] = lambda: tm.state.set(shared, key)
    def timed(name: str) -> float:
        triton_lora.ENABLED = name != "gathered_bags"
        arms[name]()
        model = static if name == "static" else tm.model
        if phase == "prefill":
            return clock(lambda: prefill(model, ids))
        state = copy.deepcopy(prefilled)  # every arm decodes from the same cache, copied outside the clock
        return clock(lambda: decode(model, state))

    errors: dict[str, str] = {}

    def attempt(name: str) -> float | None:
        try:
            return timed(name)
        except Exception as e:  # noqa: BLE001 - recorded in the row; the cell goes on without this arm
            if name == "static":
                raise
            errors[name] = f"{type(e).__name__}: {e}"[:300]
            if ids.is_cuda:
                torch.cuda.empty_cache()
            return None

    for name in list(arms):  # warm-up: first-call allocations, kernel compilation and selection
        if attempt(name) is None and name in errors:
            del arms[name]
    times: dict[str, list[float]] = {k: [] for k in arms}
    for _ in range(repeats):  # round-robin: every arm sees the same device state
        for name in list(arms):
            t = attempt(name)
            if t is None:
                del arms[name]
                times.pop(name)
            else:
                times[name].append(t)
    tm.clear_mix()
    tm.materialized.clear()
    triton_lora.ENABLED = True
    tokens = b * (PROMPT_LEN if phase == "prefill" else DECODE_STEPS)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    lim = limits(tm, mix)
    plan = tm.plan(mix, tokens=b * (PROMPT_LEN + DECODE_STEPS), step_tokens=b * PROMPT_LEN if phase == "prefill"
                   else b)
    return {"phase": phase, "tok_s": {k: round(v, 1) for k, v in tps.items()},
            "ratio_to_static": {k: round(v / tps["static"], 3) for k, v in tps.items()}, **lim,
            "pairs": pairs, "skipped": skipped, "errors": errors, "cpu_cost_model_plan": plan.path}


def bench_kernels(args, device: torch.device, dtype: torch.dtype, out: dict, save) -> None:
    clock = Clock(device)
    static = random_llama(args.shape, device, dtype, args.layers)
    tok = tokenizer(static.config.vocab_size)
    ref = sharing(static, keep_own={f"{n}.weight" for n in decoder_linears(static)})
    vocab = static.config.vocab_size
    for n in args.ns:
        for rank in args.ranks:
            t0 = time.perf_counter()
            tm = random_twin(static, tok, n, rank, device, dtype, seed=n * 1000 + rank)
            built = round(time.perf_counter() - t0, 1)
            for b in args.batches:
                ids = torch.randint(3, vocab, (b, PROMPT_LEN), device=device,
                                    generator=torch.Generator(device=device).manual_seed(b))
                pre = prefill(static, ids)
                prefilled = (pre.past_key_values, torch.ones_like(ids), pre.logits[:, -1].argmax(-1, keepdim=True))
                for routing in args.routings:
                    mix = routing_mix(ROUTINGS[routing], b, n, seed=b)
                    for phase in args.phases:
                        row = {"shape": args.shape, "layers": static.config.num_hidden_layers,
                               "dtype": str(dtype)[6:], "n": n, "rank": rank, "batch": b, "routing": routing,
                               "build_s": built,
                               **bench_cell(tm, static, mix, phase, ids, prefilled, clock, args.repeats,
                                            args.max_launches, materialize=routing == args.routings[0],
                                            max_bag_elements=args.max_bag_elements)}
                        if b in args.reference_batches and routing == "dense":
                            sample_s = reference_sample_s(tm, ref, mix, phase, ids, clock)
                            per_sample = PROMPT_LEN if phase == "prefill" else DECODE_STEPS
                            ref_tps = per_sample / sample_s  # the reference runs one sample after another
                            row["tok_s"]["reference"] = round(ref_tps, 1)
                            row["twin_over_reference"] = round(row["tok_s"]["factored"] / ref_tps, 1)
                        out["kernels"].append(row)
                        print(json.dumps(row), flush=True)
                        save()
            del tm
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ---- end to end ------------------------------------------------------------------------------------------------

def bench_engine(args, device: torch.device, dtype: torch.dtype) -> dict:
    from twinrt.eval.generation import PlainModel

    static = random_llama(args.shape, device, dtype, args.layers)
    tok = tokenizer(static.config.vocab_size)
    n = max(args.ns)
    tm = random_twin(static, tok, n, min(args.ranks), device, dtype, seed=7)
    plain = PlainModel(static, tok, device, dtype)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, 257, (args.e2e_requests,), generator=g).tolist()
    prompts = [torch.randint(3, static.config.vocab_size, (k,), generator=g).tolist() for k in lengths]
    params = SamplingParams(max_new_tokens=args.e2e_tokens, ignore_eos=True)
    mixes = {"twin_no_mix": None, "twin_top1": routing_mix("top1", len(prompts), n),
             "twin_dense": routing_mix("dirichlet", len(prompts), n, seed=1)}

    paths: dict[str, int] = {}
    set_mix = tm.set_mix

    def counting(*a, **kw):  # which path each of the twin's forwards took
        plan = set_mix(*a, **kw)
        paths[plan.path] = paths.get(plan.path, 0) + 1
        return plan

    tm.set_mix = counting

    def run(runner, mix) -> tuple[float, int]:
        eng = Engine(runner, max_batch=args.e2e_requests, materialize=False)
        reqs = [eng.add(p, None if mix is None else mix[i], params) for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        eng.run_until_done()
        return time.perf_counter() - t0, sum(r.completion_tokens for r in reqs)

    arms = {"static": (plain, None), **{k: (tm, m) for k, m in mixes.items()}}
    run(plain, None)  # warm-up
    results: dict[str, list[float]] = {k: [] for k in arms}
    tokens, plans = {}, {}
    for _ in range(args.e2e_repeats):
        for name, (runner, mix) in arms.items():
            paths.clear()
            s, ntok = run(runner, mix)
            results[name].append(ntok / s)
            tokens[name], plans[name] = ntok, dict(paths)
    tps = {k: round(statistics.median(v), 1) for k, v in results.items()}
    lim = {k: limits(tm, m) for k, m in mixes.items() if m is not None}
    return {"shape": args.shape, "dtype": str(dtype)[6:], "n": n, "rank": min(args.ranks),
            "requests": len(prompts), "new_tokens": args.e2e_tokens, "prompt_tokens": sum(lengths),
            "tok_s": tps, "tokens_per_run": tokens, "forwards_by_path": plans,
            "ratio_to_static": {k: round(v / tps["static"], 3) for k, v in tps.items()},
            "limits": {k: {"flop_limit": v["flop_limit"], "byte_limit": v["byte_limit"]} for k, v in lim.items()}}


def main(args) -> None:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    dtype = getattr(torch, args.dtype)
    out_path: Path = args.out
    out = {"benchmark": "fusion-random-weights", "shape": args.shape, "dtype": args.dtype, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "prompt_len": PROMPT_LEN, "decode_steps": DECODE_STEPS, "machine": machine(), "kernels": [],
           "end_to_end": None}

    def save() -> None:
        write_json(out_path, out)

    if not args.skip_kernels:
        bench_kernels(args, device, dtype, out, save)
    if args.e2e:
        out["end_to_end"] = bench_engine(args, device, dtype)
        print(json.dumps(out["end_to_end"]), flush=True)
        save()
    save()
    print_table(out)
    print(f"\nwrote {out_path}")


def print_table(out: dict) -> None:
    rows = out["kernels"]
    if rows:
        print(f"\n{out['shape']} {out['dtype']} on {out['device_name']}: ratio to static (FLOP limit, byte limit)")
        print("| N | rank | batch | routing | phase | static tok/s | factored | gathered | gathered (bags) | rowwise "
              "| materialized | FLOP limit | byte limit | twin / reference |")
        print("|" + "---|" * 14)
        for r in rows:
            q = r["ratio_to_static"]
            cell = [f"{q[k]:.2f}x" if k in q else "–"
                    for k in ("factored", "gathered", "gathered_bags", "rowwise", "materialized")]
            print(f"| {r['n']} | {r['rank']} | {r['batch']} | {r['routing']} | {r['phase']} | {r['tok_s']['static']} "
                  f"| {' | '.join(cell)} | {r['flop_limit']:.2f}x | {r['byte_limit']:.2f}x "
                  f"| {r.get('twin_over_reference', '–')} |")
    e = out.get("end_to_end")
    if e:
        print(f"\nengine, {e['requests']} requests x {e['new_tokens']} new tokens, N={e['n']}:")
        for k, v in e["tok_s"].items():
            print(f"  {k}: {v} tok/s ({e['ratio_to_static'][k]:.2f}x static)")
