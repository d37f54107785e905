"""Serving benchmark: N concurrent clients for a fixed time against a live `twinrt serve`, per arm.

    python benchmarks/bench_serve.py ARTIFACT [--arms twin core expert:NAME] [--concurrency 1 8 32]
           [--seconds 10] [--max-tokens 32] [--threads 1] [--max-batch 32] [--label NAME] [--out FILE]
           [--backend local|vllm] [--compare-local] [--prompts FILE.jsonl] [--ignore-eos]
    python benchmarks/bench_serve.py ARTIFACT --long-prompt N [--concurrency 2] [--max-tokens 2] [--seconds 15]
           [--max-step-tokens T] [--long-prefill-share F]

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
`--long-prompt N` measures fairness instead (one arm, `core` unless --arms names one, one concurrency level):
short streamed requests back to back for --seconds undisturbed, then the same clients while one completion
of exactly N prompt tokens (repeated text, counted by the artifact's tokenizer as the server counts it) is
prefilled, until it finishes. It prints both p50/p99 latencies, the disturbed/undisturbed p99 ratio next to
the ideal 1x (the long prompt costs the short ones nothing) and the 2x target, the long request's latency, and
the server's resident memory (VmRSS peak sampled while it runs, and VmHWM) before and during the long prompt.

Clients are plain httpx (light SSE parsing) in this process; on a small shared CPU they take cycles from the
server, so compare arms within a run, not across machines. Writes JSON (default benchmarks/results/serve.json,
keyed by --label) and prints a
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
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

from common import machine  # noqa: E402
from serving.abreport import percentile  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "serve.json"
EXTRA_BODY: dict = {}  # request fields every client sends besides its own (--ignore-eos)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def task_prompts(experts: list[str], per_task: int = 40, path: Path | None = None) -> list[list[dict]]:
    """Chat prompts for the artifact's experts: `path`'s (JSONL of {"messages"}), else the task suite's test
    prompts, else synthetic ones."""
    tasks = ROOT / "examples" / "tasks"
    if path is not None:
        out = [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]
    elif all((tasks / e / "test.jsonl").is_file() for e in experts):
        out = []
        for e in experts:
            lines = (tasks / e / "test.jsonl").read_text().splitlines()[:per_task]
            out += [json.loads(line)["messages"] for line in lines if line.strip()]
    else:
        from router.synthetic import make_prompts

        out = [[{"role": "user", "content": t}] for t, _ in make_prompts(per_task, seed=3)]
    random.Random(0).shuffle(out)
    return out


class ServerProcess:
    def __init__(self, artifact: Path, threads: int, max_batch: int, log: Path, backend: str = "local",
                 extra: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
               "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}" if threads > 1 else "0"}
        cmd = [sys.executable, "-m", "serving.cli", "serve", str(artifact), "--port", str(self.port),
               "--max-batch", str(max_batch), "--max-queue", "1024", "--log", str(log), "--backend", backend, *extra]
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

    def memory_mib(self) -> dict[str, float]:
        """The server's VmRSS (now) and VmHWM (peak since start), MiB."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
        return out

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, arm: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": arm, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **EXTRA_BODY}
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


def exact_prompt(artifact: Path, n: int) -> str:
    """Repeated plain text that the artifact's tokenizer encodes (as the server does) to exactly n tokens."""
    from transformers import AutoTokenizer

    from twinrt.runtime.engine import encode_prompt

    tok = AutoTokenizer.from_pretrained(artifact / "core")
    para = ("The committee met on Tuesday to review the quarterly figures, the hiring plan and the schedule for "
            "the new warehouse. Each department presented its numbers, and the discussion ran long. ")
    ids = tok(para * (n // 20 + 10), add_special_tokens=False)["input_ids"]
    cut = n
    while True:
        text = tok.decode(ids[:cut])
        got = len(encode_prompt(tok, text))
        if got == n:
            return text
        cut += n - got


async def short_requests(client: httpx.AsyncClient, arm: str, clients: int, prompts: list, max_tokens: int,
                         keep_going) -> list[dict]:
    """`clients` loops of short requests while keep_going() holds; the results of those that completed."""
    results: list[dict] = []
    counter = iter(range(10**9))

    async def loop() -> None:
        while keep_going():
            results.append(await one_request(client, arm, prompts[next(counter) % len(prompts)], max_tokens))

    await asyncio.gather(*(loop() for _ in range(clients)))
    return results


def latency_stats(results: list[dict]) -> dict:
    lat = [r["latency"] for r in results]
    return {"requests": len(results), "latency_p50": percentile(lat, 50), "latency_p99": percentile(lat, 99),
            "latency_max": max(lat) if lat else None}


async def long_prompt_run(server: ServerProcess, arm: str, clients: int, seconds: float, prompts: list,
                          max_tokens: int, text: str, n: int) -> dict:
    """Short requests undisturbed for `seconds`, then the same while one n-token prompt is prefilled."""
    peak = {"rss": 0.0}
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=1800, limits=limits) as client:
        t0 = time.perf_counter()  # the long prompt with nothing else to run
        alone = await client.post("/v1/completions", json={"model": arm, "prompt": text, "max_tokens": 1,
                                                            "temperature": 0})
        alone_s = time.perf_counter() - t0
        if alone.status_code != 200:
            raise RuntimeError(f"long prompt alone: {alone.status_code}: {alone.text[:300]}")
        deadline = time.perf_counter() + seconds
        quiet = await short_requests(client, arm, clients, prompts, max_tokens,
                                     lambda: time.perf_counter() < deadline)
        before = server.memory_mib()

        async def long_request() -> dict:
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={"model": arm, "prompt": text, "max_tokens": 1,
                                                            "temperature": 0})
            if r.status_code != 200:  # e.g. 504: it did not finish within the server's deadline; say so, keep the rest
                return {"latency": time.perf_counter() - t0, "prompt_tokens": n, "error": r.text[:300]}
            return {"latency": time.perf_counter() - t0, "prompt_tokens": r.json()["usage"]["prompt_tokens"]}

        async def sample_memory() -> None:
            while not long.done():
                peak["rss"] = max(peak["rss"], server.memory_mib()["VmRSS"])
                await asyncio.sleep(0.2)

        long = asyncio.create_task(long_request())
        sampler = asyncio.create_task(sample_memory())
        busy = await short_requests(client, arm, clients, prompts, max_tokens, lambda: not long.done())
        long_result = await long
        await sampler
        during = server.memory_mib()
    q, b = latency_stats(quiet), latency_stats(busy)
    if long_result["prompt_tokens"] != n:
        raise RuntimeError(f"the long prompt has {long_result['prompt_tokens']} tokens on the server, not {n}")
    return {"arm": arm, "clients": clients, "long_prompt_tokens": n, "short_max_tokens": max_tokens,
            "undisturbed": q, "with_long_prompt": b,
            "p99_ratio": round(b["latency_p99"] / q["latency_p99"], 2) if b["requests"] and q["requests"] else None,
            "p50_ratio": round(b["latency_p50"] / q["latency_p50"], 2) if b["requests"] and q["requests"] else None,
            "long_latency_s": round(long_result["latency"], 2), "long_alone_s": round(alone_s, 2),
            "long_error": long_result.get("error"),
            "memory_mib": {"before": before, "peak_rss_during": peak["rss"], "after": during,
                           "peak_rss_over_before": round(peak["rss"] - before["VmRSS"], 1)}}


def main_long_prompt(args) -> int:
    from twinrt.runtime.engine import DEFAULT_CHUNK_SHARE, DEFAULT_STEP_TOKENS

    log = Path(tempfile.mkdtemp(prefix="bench_serve_")) / "routing.jsonl"
    extra = (("--max-step-tokens", str(args.max_step_tokens)) if args.max_step_tokens else ()) + \
        (("--long-prefill-share", str(args.long_prefill_share)) if args.long_prefill_share else ())
    arm = (args.arms or ["core"])[0]
    clients = args.concurrency[0]
    text = exact_prompt(args.artifact, args.long_prompt)
    load_before = os.getloadavg()[0]
    server = ServerProcess(args.artifact, args.threads, args.max_batch, log, args.backend, extra)
    try:
        health = server.wait_ready()
        prompts = task_prompts(health["experts"])
        asyncio.run(run_level(server.url, arm, 2, 0.5, prompts, 2))  # warm-up
        row = asyncio.run(long_prompt_run(server, arm, clients, args.seconds, prompts, args.max_tokens, text,
                                          args.long_prompt))
    finally:
        server.stop()
    row.update({"max_step_tokens": args.max_step_tokens or DEFAULT_STEP_TOKENS,
                "long_prefill_share": args.long_prefill_share or DEFAULT_CHUNK_SHARE, "server_threads": args.threads,
                "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2),
                "machine": machine(), "artifact": str(args.artifact)})
    q, b, m = row["undisturbed"], row["with_long_prompt"], row["memory_mib"]
    print(f"short requests ({arm}, {clients} clients, max_tokens {args.max_tokens}), long prompt "
          f"{args.long_prompt} tokens, max_step_tokens {row['max_step_tokens']}, long_prefill_share "
          f"{row['long_prefill_share']}:")
    print(f"  undisturbed       n={q['requests']:<4} p50 {q['latency_p50']:.3f} s  p99 {q['latency_p99']:.3f} s")
    print(f"  with long prompt  n={b['requests']:<4} p50 {b['latency_p50']:.3f} s  p99 {b['latency_p99']:.3f} s")
    print(f"  p99 ratio {row['p99_ratio']:.2f}x (ideal 1.00x: the long prompt costs short requests nothing; "
          f"target <= 2.00x), p50 ratio {row['p50_ratio']:.2f}x")
    print(f"  long request {row['long_latency_s']:.1f} s beside them, {row['long_alone_s']:.1f} s alone"
          + (f"; beside them it FAILED: {row['long_error']}" if row["long_error"] else ""))
    print(f"  server RSS {m['before']['VmRSS']:.0f} MiB before, peak "
          f"{m['peak_rss_during']:.0f} MiB during (+{m['peak_rss_over_before']:.0f}); load average "
          f"{row['load_average_before']} -> {row['load_average_after']}")
    label = args.label or f"{args.artifact.name}-long{args.long_prompt}"
    data = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data[label] = row
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    print(f"wrote {args.out} [{label}]")
    return 0


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
                         f"| {f(r['output_tokens_per_s'], 1)} | {f(r['mean_output_tokens'], 1)} "
                         f"| {f(r['latency_p50'])} "
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
    p.add_argument("--prompts", type=Path, default=None, help="JSONL of {\"messages\": [...]} to send instead of "
                   "the task prompts")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG", help="one more argument of `twinrt "
                   "serve` for the --backend server, e.g. --serve-arg=--max-loras=4 (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="every answer runs to --max-tokens (vLLM's ignore_eos), "
                   "so arms compare the same work")
    p.add_argument("--table", action="store_true", help="only print the table of the --label run stored in --out")
    p.add_argument("--long-prompt", type=int, default=None, metavar="N",
                   help="fairness run: short requests with and without a concurrent N-token prompt (see above)")
    p.add_argument("--max-step-tokens", type=int, default=None, help="the server's per-step token budget "
                   "(default: the engine's)")
    p.add_argument("--long-prefill-share", type=float, default=None, help="the server's time share of a long "
                   "prefill beside other work (default: the engine's)")
    args = p.parse_args()
    if args.ignore_eos:
        EXTRA_BODY["ignore_eos"] = True
    if args.long_prompt:
        if args.out == OUT:
            args.out = OUT.with_name("serve_long_prompt.json")
        return main_long_prompt(args)
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
        server = ServerProcess(args.artifact, args.threads, args.max_batch, log, backend,
                               tuple(args.serve_arg) if backend == args.backend else ())
        try:
            health = server.wait_ready()
            print(f"{backend} server ready in {time.perf_counter() - t0:.1f} s", flush=True)
            experts = health["experts"]
            arms = args.arms or ["twin", "core", f"expert:{experts[0]}"]
            prompts = task_prompts(experts, path=args.prompts)
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
              "server_threads": args.threads, "max_batch": args.max_batch, "ignore_eos": args.ignore_eos,
              "serve_args": args.serve_arg,
              "prompts": str(args.prompts) if args.prompts else None,
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
