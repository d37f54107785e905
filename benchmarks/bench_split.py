"""Split benchmark on SmolLM2-135M-Instruct with N = 2, 4, 8 synthetic experts.

For each N and each SVD path (full, and the fast randomized path that `svd: auto` picks for rank ≪ width)
it runs `twinrt split` in a child process and reports wall time, the child's peak RSS, the artifact size,
bytes per expert, and the mean kept energy. One more run splits the GGUF file directly (N = 2).

    python benchmarks/bench_split.py [--workdir /tmp/twinrt-bench] [--ns 2 4 8] [--rank 16] [--full-max-n 8]

Writes benchmarks/results/split.json and prints a markdown table.

With `--statistics METHOD` (fisher, regmean or mats) it benchmarks the calibration statistics pass instead: for
each N a split with that data method, expert i calibrated on the train split of the demo suite's task i mod 6
(`--calib-samples` examples each), reporting per expert the pass's time, peak RSS (the kernel's high-water mark,
reset before each expert) and statistics bytes, and for the whole split its time and the child's peak RSS, so
that memory flat in N shows as equal rows. `--tiny` uses a 4-layer, 192-wide random Llama with SmolLM2's
tokenizer instead of SmolLM2 itself. Writes benchmarks/results/split_statistics.json.

    python benchmarks/bench_split.py --statistics regmean [--tiny] [--ns 2 4 8] [--calib-samples 32]
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


TASKS = ("date_us", "date_iso", "price_us", "price_de", "number_words", "capital")  # the demo suite's
MiB = 2**20
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "split.json"


def tiny_base(workdir: Path) -> Path:
    """A 4-layer, 192-wide random Llama (GQA 6/2 heads) with SmolLM2's tokenizer and chat template."""
    out = workdir / "tiny-base"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smollm = smollm2_base(workdir)
    tok = AutoTokenizer.from_pretrained(smollm)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def statistics_once(base: Path, experts: list[Path], out: Path, method: str, samples: int, rank: int) -> dict:
    """One split with a data method in a child process: the split's time and peak RSS, and each expert's pass."""
    data = [ROOT / "examples" / "tasks" / TASKS[i % len(TASKS)] / "train.jsonl" for i in range(len(experts))]
    cfg = {"base": str(base), "shared": {"method": method}, "exclusive": {"rank": rank}, "dtype": "float32",
           "experts": [{"name": p.name, "path": str(p), "calibration": {"data": str(d), "samples": samples}}
                       for p, d in zip(experts, data)]}
    cfg_file = out.parent / f"{out.name}.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    run = run_child([sys.executable, "-m", "twinrt.cli", "split", str(cfg_file), "-o", str(out), "--force", "-q"],
                    env={"PYTHONPATH": str(ROOT)})
    if run.returncode != 0:
        raise SystemExit(f"split failed: {run.stderr}")
    record = json.loads((out / "statistics.json").read_text())
    per = [{"expert": e["expert"], "seconds": e["seconds"], "examples": e["examples"], "tokens": e["tokens"],
            "peak_rss_mib": None if e["peak_rss_bytes"] is None else round(e["peak_rss_bytes"] / MiB),
            "statistics_mib": round(e["bytes"] / MiB, 2)} for e in record["experts"]]
    return {"n": len(experts), "method": method, "split_seconds": round(run.seconds, 2),
            "split_peak_rss_mib": round(run.max_rss_mib), "statistics_seconds": record["total"]["seconds"],
            "experts": per}


def statistics_main(args: argparse.Namespace) -> None:
    base = tiny_base(args.workdir) if args.tiny else smollm2_base(args.workdir)
    prefix = "tiny-expert" if args.tiny else "expert"  # the SmolLM2 experts are the SVD benchmark's
    experts = [synthetic_expert(base, args.workdir / f"{prefix}{i}", seed=i) for i in range(max(args.ns))]
    out = args.out if args.out != DEFAULT_OUT else ROOT / "benchmarks" / "results" / "split_statistics.json"
    doc = {"benchmark": "split statistics", "model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct",
           "method": args.statistics, "calib_samples": args.calib_samples, "machine": machine(), "rows": []}
    for n in args.ns:
        row = statistics_once(base, experts[:n], args.workdir / f"stats-{args.statistics}-n{n}", args.statistics,
                              args.calib_samples, args.rank)
        doc["rows"].append(row)
        print(json.dumps(row), flush=True)
        write_json(out, {**doc, "complete": False})
    write_json(out, {**doc, "complete": True})
    print("\n| N | split (s) | split peak RSS (MiB) | statistics per expert (s, mean / max) | "
          "peak RSS per expert (MiB, max) | statistics per expert (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in doc["rows"]:
        secs = [e["seconds"] for e in r["experts"]]
        rss = [e["peak_rss_mib"] for e in r["experts"] if e["peak_rss_mib"] is not None]
        print(f"| {r['n']} | {r['split_seconds']} | {r['split_peak_rss_mib']} | {sum(secs) / len(secs):.2f} / "
              f"{max(secs):.2f} | {max(rss) if rss else 'n/a'} | {r['experts'][0]['statistics_mib']} |")
    print(f"\nwrote {out}")



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/twinrt-bench"))
    ap.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--full-max-n", type=int, default=8, help="run the full-SVD comparison only up to this N")
    ap.add_argument("--statistics", choices=("fisher", "regmean", "mats"),
                    help="benchmark the calibration statistics pass of this data method instead")
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration examples per expert (--statistics)")
    ap.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (--statistics)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.statistics:
        statistics_main(args)
        return
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
