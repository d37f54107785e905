"""Engine vs HF `generate` on the same core, side by side, then both under cProfile.

Separates the cost of the twinrt engine (continuous batching, sampling, detokenizing, stop handling) from the
cost of mixing: the same 32 chat requests, 16 greedy tokens, through HF `generate` on a plain model of the
core, the engine with no mix, and the engine with per-row mixes.

    python benchmarks/profile_engine.py ARTIFACT [--requests 32] [--threads 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from bench_fusion import CHAT, load_static, random_mix
from twinrt.runtime import Engine, SamplingParams, TwinModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tm = TwinModel.from_artifact(args.artifact, verify=False)
    tok, n = tm.tokenizer, args.requests
    prompts = [[{"role": "user", "content": CHAT[i % len(CHAT)]}] for i in range(n)]
    enc = tok([tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts],
              return_tensors="pt", padding=True, add_special_tokens=False)
    static = load_static(tm.artifact.core_dir, torch.float32)
    mix = random_mix(n, len(tm.experts), 0)

    def hf() -> int:
        with torch.no_grad():
            static.generate(**enc, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
        return n * 16

    def engine(m: torch.Tensor | None) -> int:
        eng = Engine(tm, max_batch=n, materialize=False)
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)  # the same 16 tokens per row as min_new_tokens
        reqs = [eng.add(p, None if m is None else m[i], params) for i, p in enumerate(prompts)]
        eng.run_until_done()
        return sum(r.completion_tokens for r in reqs)

    runs = {"hf_generate": hf, "engine_core": lambda: engine(None), "engine_mix": lambda: engine(mix)}
    for rep in range(args.repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            tokens = fn()
            print(f"repeat {rep} {name}: {tokens / (time.perf_counter() - t0):.1f} tok/s", flush=True)
    for name in ("hf_generate", "engine_core"):
        prof = cProfile.Profile()
        prof.enable()
        runs[name]()
        prof.disable()
        print(f"===== {name}")
        pstats.Stats(prof).sort_stats("tottime").print_stats(8)


if __name__ == "__main__":
    main()
