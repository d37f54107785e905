"""The error that serving a mix as a cached adapter introduces (the vLLM backend's quantised mix key).

For a set of mixes, each is quantised (top-k, rescale to the mix's total, round to a grid of `step`;
serving/backends/mixadapter.py) and compared with the exact mix, on the exact local runtime:

    weight L1            Σ_i |w_i − ŵ_i|                                            mean and max over mixes
    delta error          ‖Σ_i (ŵ_i − w_i) B_i A_i‖_F / ‖Σ_i w_i B_i A_i‖_F, per factored weight, mean
    logit error          max |logits(ŵ) − logits(w)| over the prompt's positions, mean and max over mixes
    next-token agree     share of prompt positions whose argmax is the same under ŵ and w

Two sets of mixes: the artifact's router on the task suite's test prompts (what the demo serves), and
Dirichlet(1) random mixes over all experts (a stress case: every expert active).

    python benchmarks/mix_quantisation.py artifacts/demo [--tasks examples/tasks] [--per-task 10]
           [--steps 0.01 0.05 0.1] [--top-ks 1 2 3] [--out benchmarks/results/mix_quantisation.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

import torch  # noqa: E402

from common import machine, write_json  # noqa: E402
from serving.backends.mixadapter import MixQuantizer  # noqa: E402
from twinrt.runtime import TwinModel  # noqa: E402


def prompts_and_router_mixes(tm: TwinModel, tasks: Path, per_task: int) -> tuple[list, torch.Tensor]:
    from router import load_router

    msgs = []
    for e in tm.experts:
        f = tasks / e / "test.jsonl"
        if f.is_file():
            lines = [ln for ln in f.read_text().splitlines() if ln.strip()][:per_task]
            msgs += [[m for m in json.loads(ln)["messages"] if m["role"] != "assistant"] for ln in lines]
    router = load_router(tm.artifact)
    return msgs, torch.tensor(router.route(msgs).weights, dtype=torch.float32)


def gram_matrices(tm: TwinModel) -> list[torch.Tensor]:
    """Per factored layer, G[i, j] = <B_i A_i, B_j A_j>_F, so that ‖Σ_i c_i B_i A_i‖_F² = cᵀ G c."""
    out = []
    for layer in tm.mix_linears:
        n = len(tm.experts)
        g = torch.zeros(n, n, dtype=torch.float64)
        a, b = layer.a_cat.double(), layer.b_t.double().T  # [R, in], [out, R]
        for i, (si, ri) in layer.slots.items():
            for j, (sj, rj) in layer.slots.items():
                ai, bi, aj, bj = a[si:si + ri], b[:, si:si + ri], a[sj:sj + rj], b[:, sj:sj + rj]
                g[i, j] = ((bi.T @ bj) * (ai @ aj.T)).sum()  # tr(A_iᵀ B_iᵀ B_j A_j)
        out.append(g)
    return out


def delta_error(grams: list[torch.Tensor], w: torch.Tensor, q: torch.Tensor) -> float:
    """Mean over factored layers of ‖Σ_i (ŵ−w)_i B_i A_i‖_F / ‖Σ_i w_i B_i A_i‖_F."""
    d, w = (q - w).double(), w.double()
    errs = [float((d @ g @ d).clamp(min=0).sqrt() / (w @ g @ w).sqrt()) for g in grams if float(w @ g @ w) > 0]
    return sum(errs) / max(len(errs), 1)


def measure(tm: TwinModel, grams: list, prompts: list, mixes: torch.Tensor, quant: MixQuantizer,
            exact_cache: dict) -> dict:
    n = len(tm.experts)
    l1, derr, lerr, agree = [], [], [], []
    for i, (p, w) in enumerate(zip(prompts, mixes)):
        qw = torch.tensor(quant.weights(quant.key(w.tolist()), n), dtype=torch.float32)
        l1.append(float((w - qw).abs().sum()))
        derr.append(delta_error(grams, w, qw))
        ids = torch.tensor([tm.tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                                             return_dict=False)])
        key = (i, tuple(w.tolist()))
        if key not in exact_cache:
            exact_cache[key] = tm.forward(ids, mix=w[None])[0]
        exact = exact_cache[key]
        served = tm.forward(ids, mix=qw[None])[0]
        lerr.append(float((served - exact).abs().max()))
        agree.append(float((served.argmax(-1) == exact.argmax(-1)).float().mean()))
    k = len(l1)
    return {"top_k": quant.top_k, "step": quant.step, "mixes": k,
            "weight_l1_mean": round(sum(l1) / k, 5), "weight_l1_max": round(max(l1), 5),
            "delta_rel_error_mean": round(sum(derr) / k, 5), "logit_abs_error_mean": round(sum(lerr) / k, 5),
            "logit_abs_error_max": round(max(lerr), 5), "next_token_agreement": round(sum(agree) / k, 5)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--tasks", type=Path, default=ROOT / "examples" / "tasks")
    ap.add_argument("--per-task", type=int, default=10)
    ap.add_argument("--steps", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    ap.add_argument("--top-ks", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "mix_quantisation.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    tm = TwinModel.from_artifact(args.artifact)
    prompts, routed = prompts_and_router_mixes(tm, args.tasks, args.per_task)
    g = torch.Generator().manual_seed(0)
    e = -torch.log(torch.rand(len(prompts), len(tm.experts), generator=g))
    sets = {"router": routed, "dirichlet": e / e.sum(1, keepdim=True)}
    grams = gram_matrices(tm)
    exact_cache: dict = {}
    rows = []
    for name, mixes in sets.items():
        for k in args.top_ks:
            for step in args.steps:
                row = {"mixes_from": name, **measure(tm, grams, prompts, mixes, MixQuantizer(k, step), exact_cache)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_json(args.out, {"benchmark": "mix_quantisation", "artifact": str(args.artifact), "machine": machine(),
                          "experts": tm.experts, "rows": rows})
    print("\n| mixes | top-k | step | weight L1 mean / max | ΔW rel. error | max abs Δlogit mean / max "
          "| next-token agree |")
    print("|---|---:|---:|---|---:|---|---:|")
    for r in rows:
        print(f"| {r['mixes_from']} | {r['top_k']} | {r['step']} "
              f"| {r['weight_l1_mean']:.4f} / {r['weight_l1_max']:.4f} "
              f"| {r['delta_rel_error_mean']:.4f} | {r['logit_abs_error_mean']:.4f} / {r['logit_abs_error_max']:.4f} "
              f"| {r['next_token_agreement']:.4f} |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
