"""Split benchmark on SmolLM2-135M-Instruct with N = 2, 4, 8 synthetic experts.

For each N and each SVD path (full, and the fast randomized path that `svd: auto` picks for rank ≪ width)
it runs `twinrt split` in a child process and reports wall time, the child's peak RSS, the artifact size,
bytes per expert, and the mean kept energy. One more run splits the GGUF file directly (N = 2).

    python benchmarks/bench_split.py [--workdir /tmp/twinrt-bench] [--ns 2 4 8] [--rank 16] [--full-max-n 8]

Writes benchmarks/results/split.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from common import ROOT, dir_bytes, machine, run_child, smollm2_base, synthetic_expert, write_json
from twinrt.artifact import Artifact
from twinrt.artifact.report import expert_stats
from twinrt.models import smollm2_gguf


def split_once(base: Path, experts: list[Path], out: Path, rank: int, svd: str, method: str) -> dict:
    cfg = {"base": str(base), "experts": [{"name": p.name, "path": str(p)} for p in experts],
           "shared": {"method": method}, "exclusive": {"rank": rank, "svd": svd}, "dtype": "float32"}
    cfg_file = out.parent / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run = run_child([sys.executable, "-m", "twinrt.cli", "split", str(cfg_file), "-o", str(out), "--force", "-q"],
                    env={"PYTHONPATH": str(ROOT)})
    if run.returncode != 0:
        raise SystemExit(f"split failed: {run.stderr}")
    m = Artifact.open(out, verify=False).manifest
    stats = expert_stats(m)
    paths = sorted({f.path for t in m.tensors.values() for f in t.experts.values() if hasattr(f, "path")})
    per_expert = sum(s.factor_bytes + s.dense_bytes for s in stats) / len(stats)
    return {"n": len(experts), "svd": svd, "svd_paths": paths, "seconds": round(run.seconds, 2),
            "peak_rss_mib": round(run.max_rss_mib), "artifact_mib": round(dir_bytes(out) / 2**20, 1),
            "core_mib": round(m.sizes.core / 2**20, 1), "per_expert_mib": round(per_expert / 2**20, 2),
            "per_expert_pct_of_full": round(100 * per_expert / m.sizes.full_expert, 2),
            "mean_energy": round(sum(s.mean_energy for s in stats) / len(stats), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/twinrt-bench"))
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--full-max-n", type=int, default=8, help="run the full-SVD comparison only up to this N")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "split.json")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    base = smollm2_base(args.workdir)
    experts = [synthetic_expert(base, args.workdir / f"expert{i}", seed=i) for i in range(max(args.ns))]
    rows = []
    for n in args.ns:
        for svd in ("full", "randomized") if n <= args.full_max_n else ("randomized",):
            row = split_once(base, experts[:n], args.workdir / f"art-n{n}-{svd}", args.rank, svd, args.method)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write_json(args.out, {"benchmark": "split", "model": "SmolLM2-135M-Instruct", "rank": args.rank,
                                  "method": args.method, "machine": machine(), "rows": rows, "complete": False})
    gguf = split_once(smollm2_gguf(), experts[:2], args.workdir / "art-gguf", args.rank, "auto", args.method)
    gguf["base"] = "gguf"
    print(json.dumps(gguf), flush=True)
    write_json(args.out, {"benchmark": "split", "model": "SmolLM2-135M-Instruct", "rank": args.rank,
                          "method": args.method, "machine": machine(), "rows": rows, "gguf_base": gguf,
                          "complete": True})
    print("\n| N | SVD | time (s) | peak RSS (MiB) | artifact (MiB) | per expert (MiB, % of full) | mean energy |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['svd']} | {r['seconds']} | {r['peak_rss_mib']} | {r['artifact_mib']} | "
              f"{r['per_expert_mib']} ({r['per_expert_pct_of_full']}%) | {r['mean_energy']} |")
    print(f"| 2 | auto, GGUF base | {gguf['seconds']} | {gguf['peak_rss_mib']} | {gguf['artifact_mib']} | "
          f"{gguf['per_expert_mib']} ({gguf['per_expert_pct_of_full']}%) | {gguf['mean_energy']} |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
