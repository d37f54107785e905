"""Serving benchmark: N concurrent clients for a fixed time against a live `twinrt serve`, per arm.

    python benchmarks/bench_serve.py ARTIFACT [--arms twin core expert:NAME] [--concurrency 1 8 32]
           [--seconds 10] [--max-tokens 32] [--threads 1] [--max-batch 32] [--label NAME] [--out FILE]
           [--backend local|vllm] [--compare-local]

The server runs in a child process (`python -m serving.cli serve ARTIFACT --port P`, OMP threads = --threads).
`--backend vllm` serves with vLLM; `--compare-local` then also runs the local backend on the same arms and
levels in the same run (one server at a time, so they never share the CPU) and prints vllm/local per arm.
Each of N clients sends streamed, greedy chat requests back to back until the time is up (requests in flight
then finish and count); prompts cycle through the artifact's task prompts (examples/tasks/<expert>/test.jsonl
when the experts are those tasks, else synthetic math/code/chat prompts). Measured per (arm, N):

    requests/s, output tokens/s          completed requests (usage from the stream) / wall time of the run
    latency p50 / p99                    request sent -> last event
    ttft p50 / p99                       request sent -> first chunk with content
    tpot p50                             (latency - ttft) / (tokens - 1): time per output token after the first

and twin's output tokens/s as a ratio of core's at the same N in the same run. Arms stop at different lengths
(EOS), so tokens/s also reflects answer lengths; core/twin of TPOT compares the cost per decoded token.
Clients are plain httpx (light SSE parsing) in this process; on a small shared CPU they take cycles from the
server, so compare arms within a run, not across machines. Writes JSON (default benchmarks/results/serve.json, keyed by --label) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from common import machine  # noqa: E402
from serving.abreport import percentile  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_prompts(experts: list[str], per_task: int = 40) -> list[list[dict]]:
    """Chat prompts for the artifact's experts: the task suite's test prompts, else synthetic ones."""
    tasks = ROOT / "examples" / "tasks"
    if all((tasks / e / "test.jsonl").is_file() for e in experts):
        out = []
        for e in experts:
            lines = (tasks / e / "test.jsonl").read_text().splitlines()[:per_task]
            out += [json.loads(line)["messages"] for line in lines if line.strip()]
    else:
        from test_router_synth import make_prompts

        out = [[{"role": "user", "content": t}] for t, _ in make_prompts(per_task, seed=3)]
    random.Random(0).shuffle(out)
    return out


class ServerProcess:
    def __init__(self, artifact: Path, threads: int, max_batch: int, log: Path, backend: str = "local") -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0"}
        cmd = [sys.executable, "-m", "serving.cli", "serve", str(artifact), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", "1024", "--log", str(log), "--backend", backend]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                return httpx.get(self.url + "/health", timeout=1).json()
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not start in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, arm: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": arm, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    latency = time.perf_counter() - t0
    tpot = (latency - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
    return {"latency": latency, "ttft": ttft, "tokens": tokens, "tpot": tpot}


async def run_level(url: str, arm: str, clients: int, seconds: float, prompts: list, max_tokens: int) -> dict:
    """`clients` loops sending requests until `seconds` pass; returns the aggregate of completed requests."""
    results: list[dict] = []
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                results.append(await one_request(client, arm, prompts[next(counter) % len(prompts)], max_tokens))

        await asyncio.gather(*(loop() for _ in range(clients)))
        wall = time.perf_counter() - t0
    lat = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results if r["ttft"] is not None]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {"arm": arm, "clients": clients, "requests": len(results), "seconds": round(wall, 3),
            "requests_per_s": round(len(results) / wall, 3), "output_tokens_per_s": round(tokens / wall, 2),
            "mean_output_tokens": round(tokens / max(len(results), 1), 2),
            "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99), "tpot_p50": percentile(tpot, 50)}


def ratios(rows: list[dict], key: str = "output_tokens_per_s") -> dict[str, float]:
    """twin's `key` over core's, per concurrency level (rows of one backend)."""
    by = {(r["arm"], r["clients"]): r for r in rows}
    return {str(c): round(by[("twin", c)][key] / by[("core", c)][key], 3)
            for (arm, c) in by if arm == "twin" and ("core", c) in by and by[("core", c)].get(key)
            and by[("twin", c)].get(key) is not None}


def backend_ratios(rows: list[dict], key: str = "output_tokens_per_s") -> dict[str, float]:
    """vllm's `key` over local's, per arm and concurrency level ("arm@clients")."""
    by = {(r.get("backend", "local"), r["arm"], r["clients"]): r for r in rows}
    return {f"{arm}@{c}": round(r[key] / by[("local", arm, c)][key], 3)
            for (b, arm, c), r in by.items() if b == "vllm" and ("local", arm, c) in by
            and by[("local", arm, c)].get(key) and r.get(key) is not None}


def markdown(rows: list[dict]) -> str:
    f = lambda x, k=3: "-" if x is None else f"{x:.{k}f}"  # noqa: E731
    backends = list(dict.fromkeys(r.get("backend", "local") for r in rows))
    cross = backend_ratios(rows)
    lines = ["| backend | arm | clients | req/s | out tok/s | tok/req | p50 s | p99 s | ttft p50 s | ttft p99 s "
             "| tpot p50 s | twin/core tok/s | core/twin tpot | vllm/local tok/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in backends:
        mine = [r for r in rows if r.get("backend", "local") == b]
        tok, tpot = ratios(mine), ratios(mine, "tpot_p50")
        for r in mine:
            twin = r["arm"] == "twin"
            inv = tpot.get(str(r["clients"])) if twin else None
            x = cross.get(f"{r['arm']}@{r['clients']}") if b == "vllm" else None
            lines.append(f"| {b} | {r['arm']} | {r['clients']} | {f(r['requests_per_s'], 2)} "
                         f"| {f(r['output_tokens_per_s'], 1)} | {f(r['mean_output_tokens'], 1)} | {f(r['latency_p50'])} "
                         f"| {f(r['latency_p99'])} | {f(r['ttft_p50'])} | {f(r['ttft_p99'])} | {f(r.get('tpot_p50'))} "
                         f"| {f(tok.get(str(r['clients'])) if twin else None, 2)} | {f(1 / inv if inv else None, 2)} "
                         f"| {f(x, 2)} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--arms", nargs="+", default=None, help="default: twin core expert:<first expert>")
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=10.0, help="per level; at least one request round at the "
                   "highest concurrency (wall time of a level is this plus the requests in flight at the end)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="the server's OMP/torch threads")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--label", default=None, help="key of this run in the JSON file (default: artifact dir name)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--backend", choices=["local", "vllm"], default="local")
    p.add_argument("--compare-local", action="store_true", help="with --backend vllm: also run the local backend")
    p.add_argument("--table", action="store_true", help="only print the table of the --label run stored in --out")
    args = p.parse_args()
    if args.table:
        run = json.loads(args.out.read_text())[args.label or args.artifact.name]
        print(markdown(run["rows"]))
        return 0

    backends = [args.backend] + (["local"] if args.compare_local and args.backend != "local" else [])
    rows: list[dict] = []
    health: dict = {}
    load_before = os.getloadavg()[0]
    for backend in backends:
        log = Path(tempfile.mkdtemp(prefix="bench_serve_")) / "routing.jsonl"
        t0 = time.perf_counter()
        server = ServerProcess(args.artifact, args.threads, args.max_batch, log, backend)
        try:
            health = server.wait_ready()
            print(f"{backend} server ready in {time.perf_counter() - t0:.1f} s", flush=True)
            experts = health["experts"]
            arms = args.arms or ["twin", "core", f"expert:{experts[0]}"]
            prompts = task_prompts(experts)
            for arm in arms:  # warm-up: first-call costs (a vLLM adapter's first load, W' builds)
                asyncio.run(run_level(server.url, arm, 2, 0.5, prompts, 4))
            for clients in args.concurrency:
                for arm in arms:
                    row = {"backend": backend,
                           **asyncio.run(run_level(server.url, arm, clients, args.seconds, prompts, args.max_tokens))}
                    rows.append(row)
                    print(f"{backend:>6} {arm:>16} x{clients:<3} {row['requests_per_s']:7.2f} req/s "
                          f"{row['output_tokens_per_s']:8.1f} tok/s  p50 {row['latency_p50']:.3f} s  "
                          f"ttft p50 {row['ttft_p50'] or 0:.3f} s", flush=True)
        finally:
            server.stop()
    per_backend = {b: [r for r in rows if r["backend"] == b] for b in backends}
    result = {"artifact": str(args.artifact), "experts": health.get("experts"), "router": health.get("router"),
              "backends": backends, "seconds_per_level": args.seconds, "max_tokens": args.max_tokens,
              "server_threads": args.threads, "max_batch": args.max_batch,
              "load_average_before": round(load_before, 2), "machine": machine(), "rows": rows,
              "twin_over_core_tokens_per_s": {b: ratios(v) for b, v in per_backend.items()},
              "core_over_twin_tpot": {b: {c: round(1 / x, 3) for c, x in ratios(v, "tpot_p50").items() if x}
                                      for b, v in per_backend.items()},
              "vllm_over_local_tokens_per_s": backend_ratios(rows)}
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[args.label or args.artifact.name] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    print()
    print(markdown(rows))
    print(f"\nwrote {args.out} [{args.label or args.artifact.name}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
