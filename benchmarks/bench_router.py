"""Router benchmark: routing latency (p50) and throughput per batch size for each router kind.

Kinds: "prototype" and "trained" (all-MiniLM-L6-v2 embeddings), "hidden" (mean-pooled last hidden state of
SmolLM2-135M-Instruct, dequantized from its GGUF to float32, passed in as an already-loaded model). Each router
is fitted on synthetic prompts (math / code / chat, router/synthetic.py); a routing call is
`router.route(batch)`, end to end: tokenization, encoder, head, option rule.

    python benchmarks/bench_router.py [--batch-sizes 1 8 32] [--seconds 4] [--train-per-expert 30] [--threads N]

Throughput is batch size / p50 latency. On a CPU shared with other work, `--threads 1` avoids OpenMP
oversubscription (measured here: MiniLM batch 1 at 16 ms with 1 thread vs 88 ms with 2 under load 3.8).
Writes benchmarks/results/router.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from router import CoreEncoder, EmbeddingRouter, HiddenStateRouter, Router, SentenceEncoder  # noqa: E402
from router.heads import fit_prototypes, train_mlp  # noqa: E402
from router.metrics import accuracy  # noqa: E402
from router.synthetic import EXPERTS, make_prompts  # noqa: E402
from twinrt.models import minilm_dir, smollm2_gguf  # noqa: E402


def smollm2_core() -> CoreEncoder:
    """SmolLM2-135M-Instruct from its GGUF, float32, as an already-loaded model + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return CoreEncoder(model, tok)


def fit(kind: str, encoder, train: list[tuple[str, str]]) -> Router:
    feats = encoder.encode([t for t, _ in train])                                # [M, D]
    labels = torch.tensor([EXPERTS.index(e) for _, e in train])
    if kind == "prototype":
        return EmbeddingRouter(list(EXPERTS), encoder, fit_prototypes(feats, labels, len(EXPERTS)))
    head, _ = train_mlp(feats, labels, len(EXPERTS), hidden=0 if kind == "trained" else 64, epochs=200)
    cls = HiddenStateRouter if kind == "hidden" else EmbeddingRouter
    return cls(list(EXPERTS), encoder, head)


def time_batches(router: Router, pool: list[str], batch: int, seconds: float, min_reps: int) -> list[float]:
    """Latencies (s) of route() on consecutive batches of the pool, for ~`seconds` (≥ min_reps calls)."""
    router.route(pool[:batch])                                                   # warm-up
    times, i, t_end = [], 0, time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
        chunk = [pool[(i + j) % len(pool)] for j in range(batch)]
        i += batch
        t0 = time.perf_counter()
        router.route(chunk)
        times.append(time.perf_counter() - t0)
    return times


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "platform": platform.platform(),
            "load_avg_1m_before": round(os.getloadavg()[0], 2)}


def markdown(rows: list[dict]) -> str:
    lines = ["| router | encoder | batch | p50 latency (ms) | p90 latency (ms) | throughput (inputs/s) | calls |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['encoder']} | {r['batch']} | {r['p50_ms']:.1f} | {r['p90_ms']:.1f} | "
                     f"{r['throughput']:.1f} | {r['calls']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["prototype", "trained", "hidden"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--seconds", type=float, default=4.0, help="timing budget per (kind, batch size)")
    ap.add_argument("--min-reps", type=int, default=5)
    ap.add_argument("--train-per-expert", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "router.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()                              # the load average before this run adds its own

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    train = make_prompts(args.train_per_expert, seed=0)
    test = make_prompts(20, seed=1)
    pool = [t for t, _ in make_prompts(40, seed=2)]
    encoders: dict[str, object] = {}
    rows, fits = [], {}
    for kind in args.kinds:
        name = "smollm2-135m core (fp32)" if kind == "hidden" else "all-MiniLM-L6-v2"
        if name not in encoders:
            t0 = time.perf_counter()
            encoders[name] = smollm2_core() if kind == "hidden" else SentenceEncoder(minilm_dir())
            print(f"loaded {name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        t0 = time.perf_counter()
        router = fit(kind, encoders[name], train)
        fit_s = time.perf_counter() - t0
        res = router.route([t for t, _ in test])
        acc = accuracy(res.weights.argmax(-1), torch.tensor([EXPERTS.index(e) for _, e in test]))
        fits[kind] = {"encoder": name, "train_examples": len(train), "fit_seconds": round(fit_s, 2),
                      "test_accuracy": round(acc, 4), "test_examples": len(test)}
        print(f"{kind}: fitted in {fit_s:.1f} s, accuracy {acc:.1%} on {len(test)} fresh prompts", file=sys.stderr)
        for b in args.batch_sizes:
            times = time_batches(router, pool, b, args.seconds, args.min_reps)
            p50 = statistics.median(times)
            p90 = statistics.quantiles(times, n=10)[-1] if len(times) >= 2 else p50
            rows.append({"kind": kind, "encoder": name, "batch": b, "p50_ms": round(1e3 * p50, 2),
                         "p90_ms": round(1e3 * p90, 2), "throughput": round(b / p50, 1), "calls": len(times)})
            print(f"  batch {b}: p50 {1e3 * p50:.1f} ms, {b / p50:.1f} inputs/s", file=sys.stderr)

    out = {"benchmark": "router", "machine": info, "fits": fits, "rows": rows,
           "note": "route() end to end on CPU; throughput = batch / p50 latency; prompts 8-25 words"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(markdown(rows))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
