"""Time to first token as three clients measure it against one `twinrt serve`, and as the server logs it.

    python benchmarks/bench_clients.py [ARTIFACT] [--arm core] [--prompts 24] [--max-tokens 16]
           [--concurrency 1 [4 ...]] [--threads 1] [--clients bench_serve vllm guidellm] [--label NAME] [--out FILE]

One server runs in a child process (bench_serve's ServerProcess: `python -m serving.cli serve ARTIFACT`, OMP
threads = --threads, a routing log in a temporary folder). The prompts are the artifact's task prompts as
bench_serve picks them (task_prompts: the first --prompts of its shuffled list; every one is a single user
message), written to a temporary JSONL as {"prompt": text, "output_tokens_count": max_tokens}, the shape both
vLLM's custom dataset and guidellm's json_file data read. At each concurrency level each client sends every
prompt once, streamed chat completions for --arm, greedy, --max-tokens tokens with ignore_eos (so every answer
has the same length), one client after the other:

    bench_serve     bench_serve.one_request itself (its httpx client, its SSE parsing and its timing), with
                    ignore_eos added to the body it builds; N workers take the prompts in order
    vllm            `vllm bench serve` through benchmarks/vllm_bench.py: --backend openai-chat, --dataset-name
                    custom --skip-chat-template (the server applies the template; vLLM would apply it as well
                    and send the templated text as the user message) --disable-shuffle, --custom-output-len,
                    --ignore-eos, --temperature 0, --max-concurrency N, per-request TTFTs from --save-detailed
    guidellm        `guidellm run` with the JSONL as json_file data (its output_tokens_count column makes
                    guidellm send max_completion_tokens with ignore_eos), profile synchronous (N = 1) or
                    concurrent with N streams, a JSON output; through the backend's extras temperature 0
                    and stream_options.continuous_usage_stats false (guidellm asks for usage in every chunk,
                    which the server honours; off, its chunks are the other clients')
    bench_serve #2  bench_serve's client again, last: the difference to the first run is the noise

and per client the server's own TTFT of the same requests (ttft_s of the routing log: arrival to first token,
the last --prompts records that client's run appended, so a check request before the run would not count).
Every client's server records must show the same sorted prompt token counts and --max-tokens completion
tokens, else the clients did not send the same work and the script fails. A client that reports fewer
requests than the server completed for it is printed and kept (`served_not_reported` in the JSON).

Each client's TTFT p50 / mean / p99 is computed here from its per-request values with one rule (linear
interpolation, serving.abreport.percentile, which numpy's default and so vLLM's summary also use); the client's
own summary (vLLM's median/mean/p99; guidellm's, whose percentiles are the lower nearest rank of the sample) is
printed next to it. The physical reference
per level: the mean prompt length the server counted, a prefill's FLOPs 2 · params · tokens (params: every
weight of ARTIFACT/core, embedding counted once) and one decode step's time (the server's TPOT p50: (latency -
ttft) / (tokens - 1)). Writes JSON (default benchmarks/results/clients_ttft.json, keyed by --label) and prints
a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import httpx  # noqa: E402

from bench_serve import ServerProcess, one_request, task_prompts  # noqa: E402
from common import machine  # noqa: E402
from serving.abreport import percentile  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "clients_ttft.json"
CLIENTS = ("bench_serve", "vllm", "guidellm")


class IgnoreEOSClient(httpx.AsyncClient):
    """An httpx client that adds ignore_eos to every JSON body it streams: bench_serve's request, fixed length."""

    def stream(self, method, url, **kw):
        kw["json"] = {**kw["json"], "ignore_eos": True}
        return super().stream(method, url, **kw)


def stats(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "mean": sum(values) / len(values) if values else None,
            "p99": percentile(values, 99)}


def run_bench_serve(url: str, arm: str, prompts: list[list[dict]], max_tokens: int, concurrency: int) -> dict:
    async def go() -> list[dict]:
        results: list[dict | None] = [None] * len(prompts)
        todo = iter(range(len(prompts)))
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        async with IgnoreEOSClient(base_url=url, timeout=600, limits=limits) as client:
            async def worker() -> None:
                for i in todo:
                    results[i] = await one_request(client, arm, prompts[i], max_tokens)

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    rows = asyncio.run(go())
    return {"ttft": [r["ttft"] for r in rows if r["ttft"] is not None],
            "tpot": [r["tpot"] for r in rows if r["tpot"] is not None],
            "output_tokens": [r["tokens"] for r in rows], "own": None}


def run_vllm(url: str, arm: str, artifact: Path, data: Path, n: int, max_tokens: int, concurrency: int,
             work: Path) -> dict:
    out = work / f"vllm-c{concurrency}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_bench.py"), "serve", "--backend", "openai-chat",
           "--endpoint", "/v1/chat/completions", "--base-url", url, "--model", arm,
           "--tokenizer", str(artifact / "core"), "--dataset-name", "custom", "--dataset-path", str(data),
           "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(n),
           "--custom-output-len", str(max_tokens), "--ignore-eos", "--temperature", "0",
           "--max-concurrency", str(concurrency), "--percentile-metrics", "ttft,tpot,itl,e2el",
           "--metric-percentiles", "50,99", "--save-result", "--save-detailed", "--result-dir", str(work),
           "--result-filename", out.name, "--disable-tqdm"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"vllm bench serve failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    res = json.loads(out.read_text())
    ttft = [t for t in res["ttfts"] if t is not None]
    tpot = [sum(itl) / (k - 1) for itl, k in zip(res["itls"], res["output_lens"]) if k and k > 1]
    own = {"p50": res["median_ttft_ms"] / 1e3, "mean": res["mean_ttft_ms"] / 1e3, "p99": res["p99_ttft_ms"] / 1e3,
           "tpot_p50": res["median_tpot_ms"] / 1e3, "completed": res["completed"], "failed": res.get("failed")}
    return {"ttft": ttft, "tpot": tpot, "output_tokens": res["output_lens"], "own": own}


def guidellm_stat(metric: dict) -> dict:
    """A guidellm metric's distribution over successful requests, in seconds (guidellm reports ms)."""
    s = metric["successful"]
    pct = s.get("percentiles") or {}
    return {"p50": s["median"] / 1e3, "mean": s["mean"] / 1e3, "p99": pct["p99"] / 1e3 if "p99" in pct else None}


def run_guidellm(url: str, arm: str, artifact: Path, data: Path, n: int, max_tokens: int, concurrency: int,
                 work: Path) -> dict:
    out = work / f"guidellm-c{concurrency}.json"
    backend = {"kind": "openai_http", "target": url, "model": arm, "request_format": "/v1/chat/completions",
               "extras": {"body": {"temperature": 0, "stream_options": {"continuous_usage_stats": False}}}}
    profile = "kind=synchronous" if concurrency == 1 else f"kind=concurrent,streams={concurrency}"
    cmd = [str(Path(sys.executable).parent / "guidellm"), "run", "--backend", json.dumps(backend),
           "--profile", profile, "--constraint", f"kind=max_requests,count={n}",
           "--data", f"kind=json_file,path={data}", "--tokenizer", f"kind=hf_auto,model={artifact / 'core'}",
           "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"guidellm run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    bench = json.loads(out.read_text())["benchmarks"][0]
    done = bench["requests"]["successful"]
    ttft = [r["time_to_first_token_ms"] / 1e3 for r in done if r.get("time_to_first_token_ms") is not None]
    tpot = [r["inter_token_latency_ms"] / 1e3 for r in done if r.get("inter_token_latency_ms") is not None]
    m = bench["metrics"]
    own = {**guidellm_stat(m["time_to_first_token_ms"]), "itl_p50": guidellm_stat(m["inter_token_latency_ms"])["p50"]}
    return {"ttft": ttft, "tpot": tpot, "output_tokens": [r.get("output_tokens") for r in done], "own": own}


def read_new(log: Path, start: int, want: int, wait_s: float = 10.0) -> tuple[list[dict], int]:
    """The records appended after line `start`, waiting up to wait_s for `want` of them with status ok (the
    server writes a stream's record as it closes, which can be just after the client has its last chunk)."""
    deadline = time.perf_counter() + wait_s
    while True:
        lines = log.read_text().splitlines()
        recs = [json.loads(x) for x in lines[start:] if x.strip()]
        if sum(r.get("status") == "ok" for r in recs) >= want or time.perf_counter() > deadline:
            return recs, len(lines)
        time.sleep(0.2)


def core_params(artifact: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted((artifact / "core").glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def level(server: ServerProcess, log: Path, args, prompts: list[list[dict]], data: Path, concurrency: int,
          work: Path) -> list[dict]:
    n = len(prompts)
    runs = {"bench_serve": lambda: run_bench_serve(server.url, args.arm, prompts, args.max_tokens, concurrency),
            "vllm": lambda: run_vllm(server.url, args.arm, args.artifact, data, n, args.max_tokens, concurrency,
                                     work),
            "guidellm": lambda: run_guidellm(server.url, args.arm, args.artifact, data, n, args.max_tokens,
                                             concurrency, work)}
    order = list(args.clients) + (["bench_serve"] if "bench_serve" in args.clients else [])
    rows = []
    _, seen = read_new(log, 0, 0)
    for i, name in enumerate(order):
        label = name if name not in order[:i] else f"{name} #2"
        t0 = time.perf_counter()
        load = os.getloadavg()[0]
        got = runs[name]()
        wall = time.perf_counter() - t0
        new, seen = read_new(log, seen, n)
        recs = [r for r in new if r.get("status") == "ok"][-n:]  # a client's checks before its run come first
        if len(recs) != n:
            raise RuntimeError(f"{label}: the server logged {len(recs)} completed requests for {n} prompts")
        if not 0 < len(got["ttft"]) <= n:
            raise RuntimeError(f"{label}: {len(got['ttft'])} TTFTs for {n} prompts")
        lost = n - len(got["ttft"])
        if lost:
            print(f"  {label}: the server completed {n} requests, the client reports {len(got['ttft'])}", flush=True)
        bad = [r["completion_tokens"] for r in recs if r["completion_tokens"] != args.max_tokens]
        if bad:
            raise RuntimeError(f"{label}: answers of {bad} tokens, not {args.max_tokens} (ignore_eos not sent?)")
        srv_ttft = [r["ttft_s"] for r in recs]
        srv_tpot = [(r["latency_s"] - r["ttft_s"]) / (r["completion_tokens"] - 1) for r in recs
                    if r["completion_tokens"] > 1]
        rows.append({"client": label, "concurrency": concurrency, "requests": len(got["ttft"]),
                     "served_not_reported": lost,
                     "ttft": stats(got["ttft"]), "tpot_p50": percentile(got["tpot"], 50), "own": got["own"],
                     "server_ttft": stats(srv_ttft), "server_tpot_p50": percentile(srv_tpot, 50),
                     "prompt_tokens": sorted(r["prompt_tokens"] for r in recs),
                     "output_tokens": got["output_tokens"], "wall_s": round(wall, 1),
                     "load_average_before": round(load, 2), "ttft_s": got["ttft"], "server_ttft_s": srv_ttft})
        print(f"  x{concurrency} {label:<14} ttft p50 {rows[-1]['ttft']['p50']:.4f} s (server "
              f"{rows[-1]['server_ttft']['p50']:.4f} s), {wall:.0f} s", flush=True)
    first = rows[0]["prompt_tokens"]
    for r in rows[1:]:
        if r["prompt_tokens"] != first:
            raise RuntimeError(f"{r['client']} sent prompts of other lengths than {rows[0]['client']}: "
                               f"{r['prompt_tokens']} vs {first}")
    base = next((r["ttft"]["p50"] for r in rows if r["client"] == "bench_serve"), None)
    for r in rows:
        r["p50_over_bench_serve"] = round(r["ttft"]["p50"] / base, 3) if base else None
    return rows


def reference(rows: list[dict], params: int) -> dict:
    """The physical scale of a TTFT at this level: the prefill's FLOPs and one decode step (server TPOT)."""
    tokens = [t for r in rows for t in r["prompt_tokens"]]
    mean_tokens = sum(tokens) / len(tokens)
    step = percentile([r["server_tpot_p50"] for r in rows if r["server_tpot_p50"] is not None], 50)
    return {"concurrency": rows[0]["concurrency"], "prompt_tokens_mean": round(mean_tokens, 1),
            "prompt_tokens_min": min(tokens), "prompt_tokens_max": max(tokens), "params": params,
            "prefill_gflop": round(2 * params * mean_tokens / 1e9, 2), "decode_step_s": step}


def markdown(rows: list[dict], refs: list[dict]) -> str:
    f = lambda x, k=3: "-" if x is None else f"{x:.{k}f}"  # noqa: E731
    lines = ["| N | client | requests | TTFT p50 s | mean s | p99 s | p50 / bench_serve p50 | the client's own p50 / "
             "mean / p99 s | server TTFT p50 s (same requests) | client − server ms, p50 / mean | TPOT p50 s |",
             "|---:|---|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in rows:
        t, s, own = r["ttft"], r["server_ttft"], r["own"]
        mine = "-" if own is None else f"{f(own['p50'])} / {f(own['mean'])} / {f(own['p99'])}"
        lines.append(f"| {r['concurrency']} | {r['client']} | {r['requests']} | {f(t['p50'])} | {f(t['mean'])} "
                     f"| {f(t['p99'])} | {f(r['p50_over_bench_serve'], 2)} | {mine} | {f(s['p50'])} "
                     f"| {f((t['p50'] - s['p50']) * 1e3, 1)} / {f((t['mean'] - s['mean']) * 1e3, 1)} "
                     f"| {f(r['tpot_p50'])} |")
    lines += ["", "| N | prompt tokens mean (min–max) | params | prefill FLOPs 2 · params · tokens | one decode step "
              "(server TPOT p50) s | bench_serve TTFT p50 / decode step | FLOPs / server TTFT p50 (bench_serve's "
              "requests) |", "|---:|---|---:|---:|---:|---:|---:|"]
    for ref in refs:
        first = next((r for r in rows if r["client"] == "bench_serve" and r["concurrency"] == ref["concurrency"]),
                     None)
        base = first["ttft"]["p50"] if first else None
        srv = first["server_ttft"]["p50"] if first else None
        step = ref["decode_step_s"]
        lines.append(f"| {ref['concurrency']} | {ref['prompt_tokens_mean']:.1f} ({ref['prompt_tokens_min']}–"
                     f"{ref['prompt_tokens_max']}) | {ref['params'] / 1e6:.1f} M | {ref['prefill_gflop']:.2f} GFLOP "
                     f"| {f(step)} | {f(base / step if base and step else None, 1)} "
                     f"| {f(ref['prefill_gflop'] / srv if srv else None, 1)} GFLOP/s |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path, nargs="?", default=ROOT / "artifacts" / "demo")
    p.add_argument("--arm", default="core")
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--concurrency", nargs="+", type=int, default=[1])
    p.add_argument("--threads", type=int, default=1, help="the server's OMP/torch threads")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--clients", nargs="+", choices=CLIENTS, default=list(CLIENTS))
    p.add_argument("--label", default=None, help="key of this run in the JSON file (default: artifact dir name)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--table", action="store_true", help="only print the table of the --label run stored in --out")
    args = p.parse_args()
    args.artifact = args.artifact.resolve()
    if args.table:
        run = json.loads(args.out.read_text())[args.label or args.artifact.name]
        print(markdown(run["rows"], run["reference"]))
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench_clients_"))
    log = work / "routing.jsonl"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    server = ServerProcess(args.artifact, args.threads, args.max_batch, log)
    try:
        health = server.wait_ready()
        print(f"server ready in {time.perf_counter() - t0:.1f} s; work folder {work}", flush=True)
        prompts = task_prompts(health["experts"])[:args.prompts]
        if any(len(m) != 1 or m[0]["role"] != "user" for m in prompts):
            raise RuntimeError("every prompt must be one user message (what vLLM's custom dataset sends)")
        data = work / "prompts.jsonl"
        data.write_text("".join(json.dumps({"prompt": m[0]["content"], "output_tokens_count": args.max_tokens})
                                + "\n" for m in prompts))
        run_bench_serve(server.url, args.arm, prompts[:4], 4, 2)  # warm-up, not counted
        rows, refs = [], []
        params = core_params(args.artifact)
        for c in args.concurrency:
            mine = level(server, log, args, prompts, data, c, work)
            rows += mine
            refs.append(reference(mine, params))
    finally:
        server.stop()
    result = {"artifact": str(args.artifact), "arm": args.arm, "prompts": len(prompts), "max_tokens": args.max_tokens,
              "ignore_eos": True, "temperature": 0, "concurrency": args.concurrency, "server_threads": args.threads,
              "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
              "machine": machine(), "rows": rows, "reference": refs}
    data_out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data_out[args.label or args.artifact.name] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data_out, indent=1))
    print()
    print(markdown(rows, refs))
    print(f"\nwrote {args.out} [{args.label or args.artifact.name}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
