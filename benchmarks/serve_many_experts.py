"""Many experts served end to end: a 64-expert artifact with a trained router under 32 concurrent clients,
twin tokens/s as a ratio of core in the same run, next to the same ratio for the 6-expert demo.

    python benchmarks/serve_many_experts.py [--n 64] [--demo artifacts/demo] [--concurrency 32] [--seconds 20]
        [--max-tokens 32] [--workdir /tmp/twinrt-bench]

The N-expert artifact is bench_experts.py's (SmolLM2-135M, N synthetic rank-16 LoRA experts over every decoder
linear, average core). Its experts stand for N product lines: expert i is asked about topic TOPICS[i] in
templated questions, and a router (kind "trained", MiniLM) is fitted on 24 such prompts per expert with a 20%
hold-out (its held-out top-1 accuracy is printed). Above 8 experts the router's default keeps each row's 2
largest weights and drops those below 0.05 (router/options.py), so the sparse kernels charge a row for one or
two experts; the script reports how many experts the served prompts' mixes use. Both artifacts are then run
by bench_serve.py (one server at a time, arms twin and core, --ignore-eos so every answer is --max-tokens long
and the arms do the same work), and the ratios are printed side by side. JSON:
benchmarks/results/serve_many_experts.json (bench_serve's rows under labels many-<N> and demo, and a summary).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

from bench_experts import build_artifacts
from common import ROOT, machine, write_json

TOPICS = ("astronomy", "baking bread", "chess openings", "tax returns", "car engines", "gardening", "jazz",
          "knitting", "mortgages", "volcanoes", "football tactics", "wine", "hiking boots", "python packaging",
          "dog training", "medieval history", "photography", "skin care", "electric bikes", "sushi",
          "stock options", "bird watching", "yoga", "home insurance", "3d printing", "opera", "coffee roasting",
          "surfing", "tropical fish", "poetry", "solar panels", "video editing", "wedding planning", "beekeeping",
          "chemistry homework", "marathon training", "ceramics", "cloud billing", "tea", "violin lessons",
          "kitchen knives", "bonsai", "crypto wallets", "sailing", "board games", "vegan recipes", "watch repair",
          "rock climbing", "interior paint", "job interviews", "houseplants", "origami", "airline miles",
          "cheese making", "guitar pedals", "spanish grammar", "ski resorts", "cat health", "printer drivers",
          "woodworking", "perfume", "tennis rackets", "quantum physics", "pizza dough")
TEMPLATES = ("I have a question about {t}: where should a beginner start?",
             "What are the most common mistakes people make with {t}?",
             "Can you explain how {t} works in simple terms?",
             "Give me three tips for getting better at {t}.",
             "What should I buy first if I'm getting into {t}?",
             "My friend keeps talking about {t}. What is it all about?",
             "What's a good weekly routine for {t}?",
             "How much does {t} usually cost per month?",
             "Which books or videos about {t} would you recommend?",
             "Is {t} hard to learn at {age}?",
             "Help me plan a {days}-day project around {t}.",
             "What do experts in {t} disagree about?")


def topic_prompts(n: int, per_expert: int, seed: int) -> list[tuple[str, str]]:
    """`per_expert` (prompt, expert name) pairs for each of experts e0..e{n-1}, expert i asked about TOPICS[i]."""
    if n > len(TOPICS):
        raise SystemExit(f"--n is at most {len(TOPICS)} (topics)")
    r = random.Random(seed)
    out = []
    for i in range(n):
        for _ in range(per_expert):
            text = r.choice(TEMPLATES).format(t=TOPICS[i], age=r.randint(12, 70), days=r.randint(2, 30))
            out.append((text, f"e{i}"))
    r.shuffle(out)
    return out


def install_router(art_dir: Path, n: int) -> dict:
    """Fit and install the router (unless one is there); -> its held-out metrics."""
    from router import TrainConfig, save_router, train_router
    from router.data import Example
    from twinrt.artifact import Artifact

    art = Artifact.open(art_dir, verify=False)
    if art.router_dir.is_dir():
        cfg = json.loads((art.router_dir / "router.json").read_text())
        return cfg.get("training", {}).get("heldout", {})
    examples = [Example(t, e, i) for i, (t, e) in enumerate(topic_prompts(n, 24, seed=0), start=1)]
    cfg = TrainConfig(kind="trained")
    out = train_router(art, examples, cfg)
    training = out.training_record(cfg, "serve_many_experts.topic_prompts", "label")
    save_router(out.router, art, training)
    return training.get("heldout", {})


def experts_per_row(art_dir: Path, prompts: list[str]) -> dict:
    """How many experts the router's default mixes of `prompts` use, and how often its top-1 is right."""
    from router.store import load_router

    router = load_router(art_dir)
    res = router.route([[{"role": "user", "content": p}] for p in prompts])
    used = (res.weights > 0).sum(1).float()
    return {"mean": round(float(used.mean()), 2), "max": int(used.max()),
            "one_expert_share": round(float((used == 1).float().mean()), 3)}


def bench(artifact: Path, label: str, args, prompts: Path | None) -> dict:
    out = ROOT / "benchmarks" / "results" / "serve_many_experts_runs.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), str(artifact), "--arms", "twin", "core",
           "--concurrency", *map(str, args.concurrency), "--seconds", str(args.seconds), "--max-tokens",
           str(args.max_tokens), "--ignore-eos", "--label", label, "--out", str(out)]
    if prompts is not None:
        cmd += ["--prompts", str(prompts)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())[label]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--demo", type=Path, default=ROOT / "artifacts" / "demo")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[32])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/twinrt-bench"))
    args = ap.parse_args()
    arts, _ = build_artifacts(args.workdir, [args.n])
    many = arts[args.n]
    heldout = install_router(many, args.n)
    print(f"router held-out: {json.dumps(heldout)}", flush=True)
    served = [t for t, _ in topic_prompts(args.n, 4, seed=1)]
    prompts_file = args.workdir / f"serve-prompts-n{args.n}.jsonl"
    prompts_file.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n"
                                    for t in served))
    use = experts_per_row(many, served)
    print(f"experts per served mix: {json.dumps(use)}", flush=True)
    runs = {f"many-{args.n}": bench(many, f"many-{args.n}", args, prompts_file)}
    if args.demo.is_dir():
        runs["demo"] = bench(args.demo, "demo", args, None)
    summary = []
    for label, run in runs.items():
        for c, ratio in run["twin_over_core_tokens_per_s"]["local"].items():
            tok = {r["arm"]: r["output_tokens_per_s"] for r in run["rows"] if str(r["clients"]) == str(c)}
            summary.append({"artifact": label, "experts": len(run["experts"]), "clients": int(c),
                            "twin_tok_s": tok.get("twin"), "core_tok_s": tok.get("core"), "twin_over_core": ratio})
    write_json(ROOT / "benchmarks" / "results" / "serve_many_experts.json",
               {"benchmark": "serve-many-experts", "machine": machine(), "command": " ".join(sys.argv),
                "router_heldout": heldout, "experts_per_served_mix": use, "max_tokens": args.max_tokens,
                "seconds": args.seconds, "summary": summary, "runs": runs})
    print("\n| artifact | experts | clients | twin tok/s | core tok/s | twin / core |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['artifact']} | {s['experts']} | {s['clients']} | {s['twin_tok_s']:.1f} | {s['core_tok_s']:.1f} "
              f"| {s['twin_over_core']:.2f}x |")


if __name__ == "__main__":
    main()
