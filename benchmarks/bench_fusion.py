"""Fused-runtime benchmark on SmolLM2-135M-Instruct: static model vs twinrt (factored per-row mixes, and
materialized) vs the Twin-Merging reference way (rebuild dense weights per sample, run at batch size 1).

Part 1 (kernels): prefill (64 prompt tokens) and decode (16 steps on a 64-token cache) throughput for every
N, rank, batch size and dtype, each method timed round-robin in the same run, with the ratio to the static
model next to the FLOP-count limit 1 / (1 + extra_flops / base_flops).
Part 2 (end to end, the BENCHMARKS.md anchor setting): 32 chat requests, 16 greedy new tokens, fp32, N=4,
rank 16: HF `generate` on the static model at batch 32, twinrt `generate` with a different mix per row, and
the reference way. Every arm generates exactly 16 tokens per request (HF `min_new_tokens`, the engine's
`ignore_eos`), so tokens/s compare the same work; `tokens_per_run` in the JSON shows it.
Top-1 columns: every row routed to one expert (row b to expert b mod N), run with all active experts' factors
concatenated on every row (the factored kernel), and with the sparse kernels that run each row's own expert
only: rowwise (per-row GEMMs) and gathered (embedding bags); bench_experts.py has the many-experts grid.

Synthetic experts change only the decoder's linear weights (as LoRA experts do), so the twin's extra cost is
its factors alone; see bench_split.py for experts that also move embeddings and norms.

    python benchmarks/bench_fusion.py [--ns 2 4 8] [--ranks 16 64] [--batches 1 8 32] [--dtypes float32 bfloat16]
    python benchmarks/bench_fusion.py --random-weights --device cuda --shape llama-8b [--e2e]   # no model files
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

import fusion_random
from common import ROOT, machine, run_child, smollm2_base, synthetic_expert, write_json
from twinrt.runtime import TwinModel
from twinrt.split.run import decoder_linear_weights

PROMPT_LEN, DECODE_STEPS = 64, 16


def build_artifacts(workdir: Path, ns: list[int], ranks: list[int]) -> dict[tuple[int, int], Path]:
    from transformers import AutoConfig

    base = smollm2_base(workdir)
    linear = decoder_linear_weights(AutoConfig.from_pretrained(base))
    experts = [synthetic_expert(base, workdir / f"lin-expert{i}", seed=100 + i, only=linear) for i in range(max(ns))]
    arts = {}
    for n in ns:
        for r in ranks:
            out = workdir / f"fusion-n{n}-r{r}"
            if not (out / "twin.json").is_file():
                cfg = {"base": str(base),
                       "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts[:n])],
                       "shared": {"method": "task_arithmetic"}, "exclusive": {"rank": r}}
                (workdir / f"fusion-n{n}-r{r}.yaml").write_text(yaml.safe_dump(cfg))
                run = run_child([sys.executable, "-m", "twinrt.cli", "split", str(workdir / f"fusion-n{n}-r{r}.yaml"),
                                 "-o", str(out), "-q"], env={"PYTHONPATH": str(ROOT)})
                if run.returncode:
                    raise SystemExit(run.stderr)
            arts[(n, r)] = out
    return arts


def random_mix(batch: int, n: int, seed: int) -> torch.Tensor:
    """Per-row Dirichlet(1) mixes: every expert active in every row (the worst case for the factored path)."""
    g = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(batch, n, generator=g))  # Exp(1) draws, normalised: a Dirichlet(1) sample
    return e / e.sum(1, keepdim=True)


def top1_mix(batch: int, n: int) -> torch.Tensor:
    """Top-1 routing: row b uses expert b mod n alone (the case the sparse kernels are for)."""
    mix = torch.zeros(batch, n)
    mix[torch.arange(batch), torch.arange(batch) % n] = 1.0
    return mix


class Runner:
    """Runs prefill or decode of one model under a given mix state, returning seconds."""

    def __init__(self, model, before=None):
        self.model, self.before = model, before

    def _fwd(self, ids, mask, cache):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        return self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                          use_cache=True, logits_to_keep=1)

    def prefill(self, ids) -> float:
        from transformers.cache_utils import DynamicCache

        if self.before:
            self.before()
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        with torch.no_grad():
            self._fwd(ids, mask, DynamicCache(config=self.model.config))
        return time.perf_counter() - t0

    def decode(self, ids) -> float:
        from transformers.cache_utils import DynamicCache

        if self.before:
            self.before()
        mask = torch.ones_like(ids)
        with torch.no_grad():
            out = self._fwd(ids, mask, DynamicCache(config=self.model.config))
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t0 = time.perf_counter()
            for _ in range(DECODE_STEPS):
                mask = torch.cat([mask, torch.ones_like(nxt)], 1)
                out = self._fwd(nxt, mask, cache)
                cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return time.perf_counter() - t0


def reference_rebuild(tm: TwinModel, ref_model, mix_row: torch.Tensor) -> None:
    """The paper's way: W = W_core + Σ_n w_n B_n A_n written into a plain model, for one sample."""
    with torch.no_grad():
        for layer, target in zip(tm.mix_linears, ref_model._twin_targets):
            target.weight.copy_(layer.base.weight + layer.delta_weight(mix_row).to(layer.base.weight.dtype))


def load_static(core_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(core_dir, dtype=dtype).eval()


def bench_kernels(arts: dict, batches: list[int], dtypes: list[str], repeats: int) -> list[dict]:
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        for (n, r), art in arts.items():
            tm = TwinModel.from_artifact(art, dtype=dtype_name, verify=False)
            static = load_static(tm.artifact.core_dir, dtype)
            ref = load_static(tm.artifact.core_dir, dtype)
            mods = dict(ref.named_modules())
            names = {id(m): name for name, m in tm.model.named_modules()}
            ref._twin_targets = [mods[names[id(layer)]] for layer in tm.mix_linears]
            for b in batches:
                ids = torch.randint(100, 40000, (b, PROMPT_LEN), generator=torch.Generator().manual_seed(b))
                mix = random_mix(b, n, seed=b)
                same = mix[:1].repeat(b, 1)
                key = tm.materialize(same[0])
                plan = tm.plan(mix, tokens=b * (PROMPT_LEN + DECODE_STEPS))
                methods = {
                    "static": Runner(static),
                    "twin_factored": Runner(tm.model, lambda m=mix, t=tm: t.state.set(m)),
                    "twin_materialized": Runner(tm.model, lambda s=same, k=key, t=tm: t.state.set(s, k)),
                }
                top1 = top1_mix(b, n)
                top1_plan = tm.plan(top1, tokens=b * (PROMPT_LEN + DECODE_STEPS))
                if b > 1:  # top-1 rows: all experts' GEMMs on every row, or each row's own expert only
                    methods["twin_top1_concat"] = Runner(tm.model, lambda m=top1, t=tm: t.state.set(m))
                    for k in ("rowwise", "gathered"):
                        methods[f"twin_top1_{k}"] = Runner(tm.model, lambda m=top1, t=tm, k=k: t.state.set(m, kernel=k))
                for phase in ("prefill", "decode"):
                    times = {k: [] for k in (*methods, "reference")}
                    for _ in range(repeats):  # round-robin: every method sees the same machine noise
                        for name, runner in methods.items():
                            times[name].append(getattr(runner, phase)(ids))
                        tm.state.set(None)
                        # reference: rebuild + batch-1 run for each sample; time 2 samples, scale to the batch
                        k = min(b, 2)
                        t = 0.0
                        for i in range(k):
                            t0 = time.perf_counter()
                            reference_rebuild(tm, ref, mix[i])
                            t += time.perf_counter() - t0 + getattr(Runner(ref), phase)(ids[i : i + 1])
                        times["reference"].append(t * b / k)
                    tokens = b * (PROMPT_LEN if phase == "prefill" else DECODE_STEPS)
                    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
                    row = {"dtype": dtype_name, "n": n, "rank": r, "batch": b, "phase": phase,
                           "tok_s": {k: round(v, 1) for k, v in tps.items()},
                           "ratio_to_static": {k: round(v / tps["static"], 3) for k, v in tps.items()},
                           "flop_limit": round(plan.flop_limit_ratio, 3),
                           "top1_plan": top1_plan.path, "top1_flop_limit": round(top1_plan.flop_limit_ratio, 3)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del tm, static, ref
    return rows


CHAT = ["What is 17 plus 25?", "Write a Python function that reverses a string.", "Hi! How are you today?",
        "What is the capital of Italy?", "Convert March 3, 2021 to ISO format.", "Summarize: the cat sat on the mat.",
        "Is 91 a prime number?", "Translate 'good morning' to French."]


def bench_end_to_end(art: Path, n_requests: int = 32, new_tokens: int = 16, repeats: int = 2) -> dict:
    """The anchor setting of BENCHMARKS.md, fp32, greedy, 16 new tokens per request."""
    tm = TwinModel.from_artifact(art, verify=False)
    tok = tm.tokenizer
    prompts = [[{"role": "user", "content": CHAT[i % len(CHAT)]}] for i in range(n_requests)]
    mix = random_mix(n_requests, len(tm.experts), seed=0)
    static = load_static(tm.artifact.core_dir, torch.float32)
    ref = load_static(tm.artifact.core_dir, torch.float32)
    mods, names = dict(ref.named_modules()), {id(m): nm for nm, m in tm.model.named_modules()}
    ref._twin_targets = [mods[names[id(layer)]] for layer in tm.mix_linears]
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def hf_static():
        with torch.no_grad():
            out = static.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=tok.pad_token_id)
        return out.shape[0] * new_tokens

    def twin():
        from twinrt.runtime import Engine, SamplingParams

        eng = Engine(tm, max_batch=n_requests, materialize=False)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)  # same work as min_new_tokens above
        reqs = [eng.add(p, mix[i], params) for i, p in enumerate(prompts)]
        eng.run_until_done()
        return sum(r.completion_tokens for r in reqs)

    def twin_core_engine():
        from twinrt.runtime import Engine, SamplingParams

        eng = Engine(tm, max_batch=n_requests)
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        reqs = [eng.add(p, None, params) for p in prompts]
        eng.run_until_done()
        return sum(r.completion_tokens for r in reqs)

    def reference(k: int = 4):
        total = 0
        for i in range(k):
            reference_rebuild(tm, ref, mix[i])
            one = tok(texts[i], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = ref.generate(**one, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
            total += out.shape[1] - one["input_ids"].shape[1]
        return total

    fns = {"static_hf_generate": hf_static, "twin_per_row_mixes": twin, "twinrt_engine_core_only": twin_core_engine,
           "reference_rebuild_batch1": reference}
    results: dict[str, list[float]] = {k: [] for k in fns}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            ntok = fn()
            results[name].append(ntok / (time.perf_counter() - t0))
            tokens[name] = ntok
    tps = {k: round(statistics.median(v), 1) for k, v in results.items()}
    plan = tm.plan(mix, tokens=n_requests * new_tokens)
    bound = tps["static_hf_generate"] / tps["reference_rebuild_batch1"]
    return {"requests": n_requests, "new_tokens": new_tokens, "n": len(tm.experts), "tok_s": tps,
            "tokens_per_run": tokens,
            "ratio_to_static": {k: round(v / tps["static_hf_generate"], 3) for k, v in tps.items()},
            "twin_over_reference": round(tps["twin_per_row_mixes"] / tps["reference_rebuild_batch1"], 2),
            "static_over_reference_bound": round(bound, 2), "flop_limit": round(plan.flop_limit_ratio, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/twinrt-bench"))
    ap.add_argument("--ns", type=int, nargs="+", help="experts (default 2 4 8; with --random-weights 4 16 64)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--batches", type=int, nargs="+", help="default 1 8 32; with --random-weights 1 8 64 256")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/fusion.json; with "
                    "--random-weights benchmarks/results/fusion-<shape>-<device>.json)")
    rw = ap.add_argument_group("random weights (no model files: fusion_random.py)")
    rw.add_argument("--random-weights", action="store_true", help="a random Llama of --shape built on --device")
    rw.add_argument("--shape", default="smollm2-135m", choices=sorted(fusion_random.SHAPES))
    rw.add_argument("--layers", type=int, default=None, help="fewer decoder layers than the shape's")
    rw.add_argument("--device", default="cpu")
    rw.add_argument("--dtype", default="bfloat16", help="the random model's dtype")
    rw.add_argument("--routings", nargs="+", default=["dense", "top1", "top2"], choices=sorted(fusion_random.ROUTINGS))
    rw.add_argument("--phases", nargs="+", default=["prefill", "decode"], choices=["prefill", "decode"])
    rw.add_argument("--max-launches", type=int, default=20_000, help="leave rowwise out above this many GEMMs")
    rw.add_argument("--max-bag-elements", type=int, default=1 << 27,
                    help="leave the embedding-bag kernel out above this many index elements per layer")
    rw.add_argument("--reference-batches", type=int, nargs="*", default=[64],
                    help="batches whose dense cells also time the reference way")
    rw.add_argument("--e2e", action="store_true", help="also the engine end to end")
    rw.add_argument("--e2e-requests", type=int, default=64)
    rw.add_argument("--e2e-tokens", type=int, default=128)
    rw.add_argument("--e2e-repeats", type=int, default=2)
    args = ap.parse_args()
    if args.random_weights:
        args.ns = args.ns or [4, 16, 64]
        args.batches = args.batches or [1, 8, 64, 256]
        args.out = args.out or ROOT / "benchmarks" / "results" / f"fusion-{args.shape}-{args.device}.json"
        fusion_random.main(args)
        return
    args.ns = args.ns or [2, 4, 8]
    args.batches = args.batches or [1, 8, 32]
    args.out = args.out or ROOT / "benchmarks" / "results" / "fusion.json"
    torch.manual_seed(0)
    arts = build_artifacts(args.workdir, sorted(set(args.ns) | {4}), sorted(set(args.ranks) | {16}))
    kernel_arts = {k: v for k, v in arts.items() if k[0] in args.ns and k[1] in args.ranks}
    rows = [] if args.skip_kernels else bench_kernels(kernel_arts, args.batches, args.dtypes, args.repeats)
    e2e = bench_end_to_end(arts[(4, 16)])
    print(json.dumps(e2e), flush=True)
    write_json(args.out, {"benchmark": "fusion", "model": "SmolLM2-135M-Instruct", "prompt_len": PROMPT_LEN,
                          "decode_steps": DECODE_STEPS, "machine": machine(), "kernels": rows, "end_to_end": e2e})
    if rows:
        print("\n| dtype | N | rank | batch | phase | static tok/s | factored | materialized | reference | FLOP limit "
              "| top-1 concat | top-1 rowwise | top-1 gathered | top-1 limit |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            q = r["ratio_to_static"]
            t1 = (f"{q['twin_top1_concat']:.2f}x | {q['twin_top1_rowwise']:.2f}x | {q['twin_top1_gathered']:.2f}x | "
                  f"{r['top1_flop_limit']:.2f}x" if "twin_top1_rowwise" in q else "– | – | – | –")
            print(f"| {r['dtype']} | {r['n']} | {r['rank']} | {r['batch']} | {r['phase']} | {r['tok_s']['static']} | "
                  f"{q['twin_factored']:.2f}x | {q['twin_materialized']:.2f}x | {q['reference']:.2f}x | "
                  f"{r['flop_limit']:.2f}x | {t1} |")
    print("\nend to end (32 chat requests, 16 new tokens, fp32, N=4, rank 16):")
    for k, v in e2e["tok_s"].items():
        print(f"  {k}: {v} tok/s ({e2e['ratio_to_static'][k]:.2f}x static)")
    print(f"  twin / reference = {e2e['twin_over_reference']}x (bound static/reference = "
          f"{e2e['static_over_reference_bound']}x); FLOP limit {e2e['flop_limit']}x")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
