"""Many experts at the cost of few: the mixing kernels (factored, rowwise, gathered) on SmolLM2-135M with N
synthetic LoRA experts, side by side with the static model (a plain transformers model of the core) in one run.

Grid: N experts (4, 16, 64; one artifact each, split from N synthetic rank-16 LoRA adapters, split time and peak
RSS recorded), routing (top-1: row b to expert b mod N; top-2: b mod N and (b + 1) mod N at 0.7 / 0.3; dense
Dirichlet(1) over all N; Zipf top-1: experts drawn with p(e) ∝ 1/(e + 1)^1.1, as skewed real traffic is),
batch (8, 32), phase (prefill: 64 prompt tokens; decode: 16 steps on a 64-token cache), dtype (float32,
bfloat16). Every arm runs round-robin with the static model; each ratio to it stands next to the physical
limits of the routing: the FLOP limit 1 / (1 + each row's own experts' FLOPs / base FLOPs) and the byte limit
base_bytes / (base_bytes + the active experts' factor bytes), and the ratio to the tighter of the two. `plan` is
the kernel `tm.plan` picks for the cell (its ratio is that arm's). An arm whose cost-model estimate exceeds
`--max-arm-seconds` is not run and is marked as skipped with its estimate.

    python benchmarks/bench_experts.py [--ns 4 16 64] [--routings top1 top2 dirichlet zipf] [--batches 8 32]
        [--phases prefill decode] [--dtypes float32 bfloat16] [--repeats 2] [--threads 1]
    python benchmarks/bench_experts.py --calibrate      # fit planning.KernelCosts on this machine, per dtype
    python benchmarks/bench_experts.py --split-only     # split each N again: seconds and peak RSS per N

Before timing it waits (up to `--quiet-wait` seconds, polling every 30 s) for the 1-minute load average to drop
below `--quiet-load`, and records the load average of every cell.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch
import yaml

from common import ROOT, machine, run_child, smollm2_base, write_json
from twinrt import adapter
from twinrt.artifact.stwriter import SafetensorsWriter
from twinrt.runtime import TwinModel
from twinrt.runtime.planning import KernelCosts
from twinrt.runtime.sparse import LayerRoutes, Pairs, gathered_delta, rowwise_delta_
from twinrt.sources.checkpoint import SafetensorsDir

PROMPT_LEN, DECODE_STEPS, RANK = 64, 16, 16
KERNEL_ARMS = ("factored", "rowwise", "gathered")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- synthetic experts and artifacts ---------------------------------------------------------------------------

def lora_expert(base: Path, out: Path, seed: int, rank: int = RANK, rel_norm: float = 0.05) -> Path:
    """A PEFT LoRA adapter over `base` with random rank-`rank` factors on every decoder linear, each delta
    ‖B A‖_F = rel_norm · ‖W‖_F (a few MiB per expert)."""
    if (out / adapter.CONFIG_FILE).is_file():
        return out
    src = SafetensorsDir(base)
    tmp = out.parent / f".{out.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    w = SafetensorsWriter(tmp, "adapter_model", max_shard_bytes=1 << 62)
    ranks = {}
    for name in src.names():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or module.rsplit(".", 1)[-1] not in LORA_TARGETS:
            continue
        theta = src.get(name).float()  # [out, in]
        a = torch.randn(rank, theta.shape[1], generator=gen)
        b = torch.randn(theta.shape[0], rank, generator=gen)
        b *= rel_norm * theta.norm() / (b @ a).norm()
        key_a, key_b = adapter.lora_keys(module)
        w.add(key_a, a)
        w.add(key_b, b)
        ranks[module] = rank
    w.close()
    adapter.write_config(tmp, ranks)
    tmp.rename(out)
    return out


def build_artifacts(workdir: Path, ns: list[int], force: bool = False) -> tuple[dict[int, Path], list[dict]]:
    """One artifact per N (average core, rank-16 factors; `force`: split again even where one exists); the
    split's wall time and peak RSS per N split."""
    base = smollm2_base(workdir)
    experts = [lora_expert(base, workdir / f"lora-expert{i}", seed=200 + i) for i in range(max(ns))]
    arts, splits = {}, []
    for n in ns:
        out = workdir / f"experts-n{n}"
        if force or not (out / "twin.json").is_file():
            cfg = {"base": str(base), "experts": [{"name": f"e{i}", "path": str(p)} for i, p in enumerate(experts[:n])],
                   "shared": {"method": "average"}, "exclusive": {"rank": RANK}}
            cfg_path = workdir / f"experts-n{n}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            run = run_child([sys.executable, "-m", "twinrt.cli", "split", str(cfg_path), "-o", str(out), "-q",
                             "--force"],
                            env={"PYTHONPATH": str(ROOT)})
            if run.returncode:
                raise SystemExit(run.stderr)
            splits.append({"n": n, "seconds": round(run.seconds, 1), "max_rss_mib": round(run.max_rss_mib)})
            print(json.dumps({"split": splits[-1]}), flush=True)
        arts[n] = out
    return arts, splits


# ---- mixes -----------------------------------------------------------------------------------------------------

def routing_mix(kind: str, batch: int, n: int, seed: int = 0) -> torch.Tensor:
    """[B, N] weights of one routing kind (see the module docstring)."""
    rows = torch.arange(batch)
    mix = torch.zeros(batch, n)
    g = torch.Generator().manual_seed(seed)
    if kind == "top1":
        mix[rows, rows % n] = 1.0
    elif kind == "top2":
        mix[rows, rows % n] = 0.7
        mix[rows, (rows + 1) % n] = 0.3
    elif kind == "dirichlet":
        e = -torch.log(torch.rand(batch, n, generator=g))
        mix = e / e.sum(1, keepdim=True)
    elif kind == "zipf":
        p = 1.0 / torch.arange(1, n + 1).float() ** 1.1
        mix[rows, torch.multinomial(p / p.sum(), batch, replacement=True, generator=g)] = 1.0
    else:
        raise ValueError(f"unknown routing {kind!r}")
    return mix


# ---- timing ----------------------------------------------------------------------------------------------------

def wait_quiet(limit: float, most_s: float) -> float:
    """Poll the 1-minute load average every 30 s until it is below `limit` or `most_s` passed; -> the last value."""
    t0 = time.time()
    while True:
        load = os.getloadavg()[0]
        if load < limit or time.time() - t0 >= most_s:
            return load
        print(f"load {load:.2f} >= {limit}: waiting", flush=True)
        time.sleep(30)


def forward(model, ids: torch.Tensor, mask: torch.Tensor, cache):
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                 logits_to_keep=1)


def time_prefill(model, ids: torch.Tensor) -> float:
    from transformers.cache_utils import DynamicCache

    t0 = time.perf_counter()
    with torch.no_grad():
        forward(model, ids, torch.ones_like(ids), DynamicCache(config=model.config))
    return time.perf_counter() - t0


def time_decode(model, prefilled: tuple) -> float:
    """DECODE_STEPS greedy steps from a copy of a prefilled cache (the same cache for every arm)."""
    cache, mask, nxt = copy.deepcopy(prefilled)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(DECODE_STEPS):
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = forward(model, nxt, mask, cache)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    return time.perf_counter() - t0


def limits(tm: TwinModel, mix: torch.Tensor) -> dict:
    """The routing's physical limits: each row's own experts' FLOPs, the active experts' factor bytes."""
    c = tm.costs
    own = float((mix != 0).float().sum(0) @ torch.tensor(c.factored_flops, dtype=torch.float32)) / mix.shape[0]
    flop = 1.0 / (1.0 + own / c.base_flops)
    active = (mix != 0).any(0).nonzero().flatten().tolist()
    factor_bytes = sum(c.factor_bytes[e] for e in active)
    byte = c.base_bytes / (c.base_bytes + factor_bytes)
    return {"flop_limit": round(flop, 3), "byte_limit": round(byte, 3), "limit": round(min(flop, byte), 3),
            "active_experts": len(active), "active_factor_mib": round(factor_bytes / 2**20, 1),
            "base_mib": round(c.base_bytes / 2**20, 1)}


def bench_cell(tm: TwinModel, static, mix: torch.Tensor, phase: str, ids: torch.Tensor, prefilled: tuple | None,
               repeats: int, max_arm_s: float) -> dict:
    b = ids.shape[0]
    step = b * PROMPT_LEN if phase == "prefill" else b
    plan = tm.plan(mix, tokens=b * (PROMPT_LEN + DECODE_STEPS), step_tokens=step)
    est = dict(plan.estimates)
    per_run = DECODE_STEPS if phase == "decode" else 1
    arms = {"static": None}
    skipped = {}
    for k in KERNEL_ARMS:
        if est[k] * per_run > max_arm_s:
            skipped[k] = round(est[k] * per_run, 1)
        else:
            arms[k] = k
    times: dict[str, list[float]] = {k: [] for k in arms}
    load0 = os.getloadavg()[0]
    for _ in range(repeats):  # round-robin: every arm sees the same machine noise
        for name, kernel in arms.items():
            model = static
            if kernel is not None:
                tm.state.set(mix, kernel=kernel)
                model = tm.model
            times[name].append(time_prefill(model, ids) if phase == "prefill" else time_decode(model, prefilled))
        tm.clear_mix()
    tokens = b * (PROMPT_LEN if phase == "prefill" else DECODE_STEPS)
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    lim = limits(tm, mix)
    ratio = {k: round(v / tps["static"], 3) for k, v in tps.items()}
    row = {"phase": phase, "tok_s": {k: round(v, 1) for k, v in tps.items()}, "ratio_to_static": ratio,
           **lim, "of_limit": {k: round(v / lim["limit"], 3) for k, v in ratio.items() if k != "static"},
           "plan": plan.path, "plan_reason": str(plan), "estimates_ms": {k: round(v * 1e3, 2) for k, v in est.items()},
           "skipped_est_s": skipped, "load": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    measured = {k: v for k, v in ratio.items() if k != "static"}
    row["best"] = max(measured, key=measured.get)
    return row


def bench_grid(arts: dict[int, Path], args) -> list[dict]:
    from transformers import AutoModelForCausalLM

    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for n in args.ns:
            tm = TwinModel.from_artifact(arts[n], dtype=dtype_name, verify=False)
            static = AutoModelForCausalLM.from_pretrained(tm.artifact.core_dir, dtype=dtype).eval()
            for b in args.batches:
                ids = torch.randint(100, 40000, (b, PROMPT_LEN), generator=torch.Generator().manual_seed(b))
                prefilled = None
                if "decode" in args.phases:
                    from transformers.cache_utils import DynamicCache

                    mask = torch.ones_like(ids)
                    with torch.no_grad():
                        out = forward(static, ids, mask, DynamicCache(config=static.config))
                    prefilled = (out.past_key_values, mask, out.logits[:, -1].argmax(-1, keepdim=True))
                for routing, phase in itertools.product(args.routings, args.phases):
                    mix = routing_mix(routing, b, n, seed=b)
                    row = {"dtype": dtype_name, "n": n, "batch": b, "routing": routing,
                           **bench_cell(tm, static, mix, phase, ids, prefilled, args.repeats, args.max_arm_seconds)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            del tm, static
    return rows


# ---- calibration of the cost model -----------------------------------------------------------------------------

# SmolLM2-135M's linear layers of one decoder layer: (in, out)
LAYER_SHAPES = ((576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576))


def _nnls(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Non-negative least squares by trying every subset of the columns (a has a handful)."""
    best, best_err = torch.zeros(a.shape[1], dtype=a.dtype), float("inf")
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            sol = torch.linalg.lstsq(a[:, list(cols)], y[:, None]).solution.flatten()
            if (sol < 0).any():
                continue
            x = torch.zeros(a.shape[1], dtype=a.dtype)
            x[list(cols)] = sol
            err = float((a @ x - y).norm())
            if err < best_err:
                best, best_err = x, err
    return best


def _factored(layers, cat, ys, xs, scale) -> None:
    """The factored kernel's math (mixing.MixLinear._concatenated) on every layer."""
    for (w, _, _), (a_t, b_t), y in zip(layers, cat, ys):
        u = torch.matmul(xs[w.shape[1]], a_t)
        u.mul_(scale[:, None, :])
        y.view(-1, y.shape[-1]).addmm_(u.view(-1, u.shape[-1]), b_t)


def _rowwise(layers, ys, xs, routes, n) -> None:
    for (w, a, bs), y in zip(layers, ys):
        rowwise_delta_(y, xs[w.shape[1]], a, bs, (RANK,) * n, routes)


def _gathered(layers, ys, xs, routes) -> None:
    for (w, a, bs), y in zip(layers, ys):
        y.add_(gathered_delta(xs[w.shape[1]], a, bs, routes))


def calibrate(dtype: torch.dtype, n: int = 64, copies: int = 4, repeats: int = 3,
              max_factored_flops: float = 2e10) -> tuple[KernelCosts, list]:
    """Time each kernel on `copies` decoder layers of SmolLM2's shapes (factors of n experts, so they come from
    memory as in a model) over top-1 / top-2 / dense mixes, batches 8 and 32, 1 and 64 tokens per row, and fit
    the KernelCosts terms (relative least squares, non-negative)."""
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(copies):
        for i, o in LAYER_SHAPES:
            layers.append((torch.randn(o, i, generator=gen).to(dtype), (torch.randn(n, i, RANK, generator=gen) * .01)
                           .to(dtype), (torch.randn(n, RANK, o, generator=gen) * .01).to(dtype)))
    elem = sum(RANK * (i + o) for i, o in LAYER_SHAPES) * copies  # one expert's factor elements, all layers
    tiny = torch.randn(4, 4).to(dtype)

    def run(fn, reps: int = repeats) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    launch = run(lambda: [torch.mm(tiny, tiny) for _ in range(1000)], 5) / 1000
    eqs = {k: [] for k in KERNEL_ARMS}  # kernel -> (features, seconds)
    for (kind, b, t), ne in itertools.product(itertools.product(("top1", "top2", "dirichlet"), (8, 32), (1, 64)),
                                              (4, n)):
        if kind == "dirichlet" and (ne == n or t == 64 and b == 32):
            continue  # dense mixes over many experts: the factored kernel's slowest cells, nothing new to fit
        mix = torch.zeros(b, n)
        mix[:, :ne] = routing_mix(kind, b, ne, seed=b)
        xs = {ii: torch.randn(b, t, ii, generator=gen).to(dtype) for ii in {i for i, _ in LAYER_SHAPES}}
        nz = mix != 0
        active, pairs = int(nz.any(0).sum()), int(nz.sum())
        routes = LayerRoutes.of(Pairs.of(mix), torch.arange(n))
        ys = [torch.zeros(b, t, w.shape[0], dtype=dtype) for w, _, _ in layers]
        act = nz.any(0).nonzero().flatten()
        cat = [(a.index_select(0, act).permute(1, 0, 2).reshape(a.shape[1], -1).contiguous(),
                bs.index_select(0, act).reshape(-1, bs.shape[2])) for _, a, bs in layers]
        scale = mix[:, act].repeat_interleave(RANK, 1).to(dtype)  # [B, A·r]

        n_layers = len(layers)
        sa, sp = float(active * elem), float(pairs * elem)
        feats = {"factored": [3 * n_layers * launch, sa, b * t * sa],
                 "rowwise": [2 * pairs * n_layers * launch, sa, sp, t * sp],
                 "gathered": [5 * n_layers * launch, sa, sp, t * sp]}
        fns = {"factored": partial(_factored, layers, cat, ys, xs, scale),
               "rowwise": partial(_rowwise, layers, ys, xs, routes, n),
               "gathered": partial(_gathered, layers, ys, xs, routes)}
        for k, fn in fns.items():
            if k != "factored" or 2 * b * t * sa <= max_factored_flops:  # bf16's factored GEMMs crawl on a CPU
                eqs[k].append((feats[k], run(fn)))
    fit = {}
    for k, rows in eqs.items():
        f = torch.tensor([r[0] for r in rows], dtype=torch.float64)
        y = torch.tensor([r[1] for r in rows], dtype=torch.float64)
        y_net = y - f[:, 0]  # the launches are measured, not fit
        w = 1.0 / y  # relative error
        fit[k] = _nnls(f[:, 1:] * w[:, None], y_net * w).tolist()
    costs = KernelCosts(launch=launch, f_expert=fit["factored"][0], f_token=fit["factored"][1],
                        r_expert=fit["rowwise"][0], r_pair=fit["rowwise"][1], r_token=fit["rowwise"][2],
                        g_expert=fit["gathered"][0], g_pair=fit["gathered"][1], g_token=fit["gathered"][2])
    table = [{"kernel": k, "features": r[0], "seconds": r[1]} for k, rows in eqs.items() for r in rows]
    return costs, table


# ---- main ------------------------------------------------------------------------------------------------------

def _cell(row: dict, kernel: str) -> str:
    q = row["ratio_to_static"]
    return f"{q[kernel]:.2f}x" if kernel in q else f"(est. {row['skipped_est_s'][kernel]:.0f} s)"


def print_table(rows: list[dict]) -> None:
    print("\n| dtype | N | batch | routing | phase | static tok/s | factored | rowwise | gathered | plan | FLOP limit "
          "| byte limit | plan / tighter limit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        q = r["ratio_to_static"]
        cell = partial(_cell, r)
        chosen = q.get(r["plan"], float("nan"))
        print(f"| {r['dtype']} | {r['n']} | {r['batch']} | {r['routing']} | {r['phase']} | {r['tok_s']['static']} | "
              f"{cell('factored')} | {cell('rowwise')} | {cell('gathered')} | {r['plan']} {chosen:.2f}x | "
              f"{r['flop_limit']:.2f}x | {r['byte_limit']:.2f}x | {chosen / r['limit']:.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/twinrt-bench"))
    ap.add_argument("--ns", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--routings", nargs="+", default=["top1", "top2", "dirichlet", "zipf"])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--phases", nargs="+", default=["prefill", "decode"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-arm-seconds", type=float, default=60.0)
    ap.add_argument("--quiet-load", type=float, default=1.2)
    ap.add_argument("--quiet-wait", type=float, default=1200.0)
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--split-only", action="store_true", help="split every N again (one process each) and write "
                    "its seconds and peak RSS; no timing grid")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.calibrate:
        load = wait_quiet(args.quiet_load, args.quiet_wait)
        fits = {}
        for name in args.dtypes:
            costs, table = calibrate(getattr(torch, name))
            fits[name] = {"costs": vars(costs), "measurements": table}
            print(f'    "{name}": KernelCosts(' + ", ".join(f"{k}={v:.2g}" for k, v in vars(costs).items()) + "),",
                  flush=True)
        write_json(args.out or ROOT / "benchmarks" / "results" / "experts_calibration.json",
                   {"benchmark": "experts-calibration", "machine": machine(), "load_before": load,
                    "load_after": os.getloadavg()[0], "fits": fits})
        return
    if args.split_only:
        load = wait_quiet(args.quiet_load, args.quiet_wait)
        _, splits = build_artifacts(args.workdir, sorted(set(args.ns)), force=True)
        for s in splits:
            s["seconds_per_expert"] = round(s["seconds"] / s["n"], 2)
        out = args.out or ROOT / "benchmarks" / "results" / "experts_split.json"
        write_json(out, {"benchmark": "experts-split", "rank": RANK, "machine": machine(),
                         "load_before": round(load, 2), "command": " ".join(sys.argv), "splits": splits})
        print("\n| N experts | split s | s per expert | peak RSS MiB |\n|---|---|---|---|")
        for s in splits:
            print(f"| {s['n']} | {s['seconds']} | {s['seconds_per_expert']} | {s['max_rss_mib']} |")
        return
    arts, splits = build_artifacts(args.workdir, sorted(set(args.ns)))
    load = wait_quiet(args.quiet_load, args.quiet_wait)
    t0 = time.time()
    rows = bench_grid(arts, args)
    out = args.out or ROOT / "benchmarks" / "results" / "experts.json"
    write_json(out, {"benchmark": "experts", "model": "SmolLM2-135M-Instruct", "prompt_len": PROMPT_LEN,
                     "decode_steps": DECODE_STEPS, "rank": RANK, "repeats": args.repeats, "machine": machine(),
                     "load_before": round(load, 2), "minutes": round((time.time() - t0) / 60, 1),
                     "command": " ".join(sys.argv), "splits": splits, "cells": rows})
    print_table(rows)
    agree = sum(r["plan"] == r["best"] for r in rows)
    print(f"\nplan = measured best in {agree} of {len(rows)} cells; load before {load:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
