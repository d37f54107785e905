"""A simulated A/B test a user can copy: replay a task split against a served A/B alias as real users would,
score every answer against the task's reference, and post each score as feedback.

    twinrt static add artifacts/demo ties --method ties --set density=0.5        # the merge you would ship
    twinrt serve artifacts/demo --ab twin=34,core=33,static:ties=33 --port 8000   # one endpoint, three arms
    python examples/ab_replay.py http://127.0.0.1:8000 --split test --concurrency 8
    twinrt ab report artifacts/demo/logs/routing.jsonl --control static:ties      # the verdict

Each example of examples/tasks/<task>/<split>.jsonl is one user (`user: "<task>-<line>"`, so the alias's sticky
pick sends each to one arm) asking its question once through the OpenAI client (greedy, --max-tokens, like
`twinrt eval`); the answer gets the task's metric (suite.json: exact, numeric, json; 1.0 or 0.0 here) against
the reference, and `POST /v1/feedback {"id", "score"}` records it beside the routing log. Prints how many
requests went to each arm and the mean score per arm as the client saw it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
from openai import AsyncOpenAI

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twinrt.eval.metrics import get_metric  # noqa: E402

TASKS = ROOT / "examples" / "tasks"


def load(split: str, limit: int | None) -> list[dict]:
    suite = json.loads((TASKS / "suite.json").read_text())
    rows = []
    for task in suite["tasks"]:
        lines = (TASKS / task["name"] / f"{split}.jsonl").read_text().splitlines()[:limit]
        for i, line in enumerate(lines, start=1):
            ex = json.loads(line)
            rows.append({"user": f"{task['name']}-{i}", "metric": task["metric"], **ex})
    return rows


async def replay(url: str, model: str, rows: list[dict], concurrency: int, max_tokens: int, key: str) -> list[dict]:
    client = AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key=key, max_retries=0)
    http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    queue: asyncio.Queue = asyncio.Queue()
    for r in rows:
        queue.put_nowait(r)
    out: list[dict] = []

    async def worker() -> None:
        while not queue.empty():
            r = queue.get_nowait()
            res = await client.chat.completions.create(model=model, messages=r["messages"], max_tokens=max_tokens,
                                                       temperature=0, user=r["user"])
            answer = res.choices[0].message.content or ""
            score = get_metric(r["metric"])(answer, r["answer"])
            fb = await http.post("/v1/feedback", json={"id": res.id, "score": score,
                                                       "metadata": {"task": r["task"], "user": r["user"]}})
            fb.raise_for_status()
            out.append({"arm": res.model_extra["routing"]["arm"], "task": r["task"], "score": score})

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    await http.aclose()
    await client.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--model", default="ab", help="the A/B alias (default %(default)s)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=None, help="examples per task (default: all)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24, help="as `twinrt eval` (default %(default)s)")
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    rows = load(args.split, args.limit)
    t0 = time.perf_counter()
    results = asyncio.run(replay(args.url, args.model, rows, args.concurrency, args.max_tokens, args.api_key))
    by_arm: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by_arm[r["arm"]].append(r["score"])
    print(f"{len(results)} requests in {time.perf_counter() - t0:.0f} s, every one scored and posted as feedback")
    for arm, scores in sorted(by_arm.items()):
        print(f"  {arm:>14}: {len(scores):4d} requests, mean score {sum(scores) / len(scores):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
