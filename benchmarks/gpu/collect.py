"""Gather benchmarks/gpu/run.sh's stages into OUT/gpu.json and write OUT/summary.md: the device tests' count, and
per shape the twin's ratio to the static model at decode next to the FLOP and byte limits, twin vs the reference
way, and the engine end to end, with the targets the GPU path is held to.

    python benchmarks/gpu/collect.py OUT
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

SPARSE = ("factored", "gathered", "gathered_bags", "rowwise")
TARGETS = [  # (what, shape, n, rank, batch, routing, kernels, at least)
    ("dense N=4 rank 16, batch 64 decode", "llama-8b", 4, 16, 64, "dense", ("factored",), 0.9),
    ("top-1 N=64 rank 16, batch 64 decode", "llama-8b", 64, 16, 64, "top1", SPARSE, 0.85),
    ("top-1 N=64 rank 16, batch 256 decode", "llama-8b", 64, 16, 256, "top1", SPARSE, 0.85),
]


def tests_line(out: Path) -> str:
    f = out / "device-tests.txt"
    if not f.is_file():
        return "not run"
    lines = [x for x in f.read_text().splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", x)]
    return lines[-1].strip("= ") if lines else "no summary line (see device-tests.txt)"


def best(row: dict, kernels: tuple[str, ...]) -> tuple[str, float] | None:
    got = {k: row["ratio_to_static"][k] for k in kernels if k in row["ratio_to_static"]}
    return max(got.items(), key=lambda kv: kv[1]) if got else None


def main(out: Path) -> None:
    parts = {}
    for p in sorted((out / "parts").glob("*.json")):
        try:
            parts[p.stem] = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            print(f"collect: skipping {p.name}: {e}", file=sys.stderr)
    doc = {"device_tests": tests_line(out), "stages": parts}
    lines = ["# twinrt on the GPU", "", f"device tests: {doc['device_tests']}", ""]
    kernels = [r for p in parts.values() for r in p.get("kernels", [])]
    device = next((p.get("device_name") for p in parts.values()), "?")
    lines.append(f"device: {device}")
    lines += ["", "| shape | N | rank | batch | routing | phase | static tok/s | factored | gathered (Triton) "
              "| gathered (bags) | rowwise | materialized | FLOP limit | byte limit | twin / reference |",
              "|" + "---|" * 15]
    for r in kernels:
        q = r["ratio_to_static"]
        cells = [f"{q[k]:.2f}x" if k in q else "–"
                 for k in ("factored", "gathered", "gathered_bags", "rowwise", "materialized")]
        lines.append(f"| {r['shape']} | {r['n']} | {r['rank']} | {r['batch']} | {r['routing']} | {r['phase']} | "
                     f"{r['tok_s']['static']} | {' | '.join(cells)} | {r['flop_limit']:.2f}x | {r['byte_limit']:.2f}x "
                     f"| {r.get('twin_over_reference', '–')} |")
    checks = []
    for what, shape, n, rank, batch, routing, ks, floor in TARGETS:
        row = next((r for r in kernels if (r["shape"], r["n"], r["rank"], r["batch"], r["routing"], r["phase"])
                    == (shape, n, rank, batch, routing, "decode")), None)
        got = best(row, ks) if row else None
        checks.append({"target": what, "shape": shape, "at_least": floor,
                       "got": None if got is None else {"kernel": got[0], "ratio": got[1]},
                       "met": None if got is None else got[1] >= floor})
    refs = [r for r in kernels if "twin_over_reference" in r and r["shape"] == "llama-8b"]
    checks.append({"target": "twin >= 10x the reference way (llama-8b)", "at_least": 10.0,
                   "got": [r["twin_over_reference"] for r in refs] or None,
                   "met": all(r["twin_over_reference"] >= 10 for r in refs) if refs else None})
    doc["targets"] = checks
    lines += ["", "| target | got | met |", "|---|---|---|"]
    for c in checks:
        lines.append(f"| {c['target']} (>= {c['at_least']}) | {c['got']} | {c['met']} |")
    for p in parts.values():
        e = p.get("end_to_end")
        if e:
            lines += ["", f"engine, {e['shape']}: {e['requests']} requests x {e['new_tokens']} new tokens, N={e['n']} "
                      f"rank {e['rank']}, {e['dtype']}"]
            for k, v in e["tok_s"].items():
                lines.append(f"- {k}: {v} tok/s ({e['ratio_to_static'][k]:.2f}x static); forwards by path "
                             f"{e['forwards_by_path'].get(k, {})}")
    (out / "gpu.json").write_text(json.dumps(doc, indent=2))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
