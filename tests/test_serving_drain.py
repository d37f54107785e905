"""SIGTERM under load drains `twinrt serve`: every admitted request ends with a complete response or a
well-formed error, requests after the signal get 503 with Retry-After, the routing log holds exactly one
complete record per admitted request, and the process exits 0. Also the command line's refusals that come
before any model is loaded (a busy port, an empty API key, a device this machine lacks)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving.cli import main as serving_main
from serving.routelog import LOG_FIELDS

CLIENTS = 24


def start_server(artifact: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "serve", str(artifact), "--port", "0",
                             "--log", str(log), "--no-router", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read()}")


async def one(h: httpx.AsyncClient, i: int) -> dict:
    """A request, read to its end: what the client saw."""
    payload = {"model": "core" if i % 2 else "twin", "max_tokens": 100, "ignore_eos": True, "temperature": 0,
               "stream": i % 3 == 0, "messages": [{"role": "user", "content": f"hello world {i}"}]}
    if not payload["stream"]:
        r = await h.post("/v1/chat/completions", json=payload)
        return {"status": r.status_code, "id": r.headers.get("x-request-id"), "body": r.json(), "stream": False}
    async with h.stream("POST", "/v1/chat/completions", json=payload) as r:
        events = [line.removeprefix("data: ") async for line in r.aiter_lines() if line.startswith("data: ")]
        return {"status": r.status_code, "id": r.headers.get("x-request-id"), "events": events, "stream": True,
                "body": None if r.status_code == 200 else json.loads(events[0] if events else "{}")}


def check_well_formed(res: dict) -> str:
    """'ok' for a complete answer, 'error' for a well-formed error; fails on anything else."""
    if res["stream"] and res["status"] == 200:
        events = res["events"]
        assert events[-1] == "[DONE]", events[-3:]
        last = json.loads(events[-2])
        if "error" in last:
            assert set(last["error"]) == {"message", "type", "param", "code"}
            return "error"
        assert last["choices"][0]["finish_reason"] == "length"
        assert json.loads(events[0])["id"] == res["id"]
        return "ok"
    if res["status"] == 200:
        assert res["body"]["choices"][0]["finish_reason"] == "length" and res["body"]["id"] == res["id"]
        return "ok"
    err = res["body"]["error"]
    assert set(err) == {"message", "type", "param", "code"} and res["status"] in (503, 429), res
    return "error"


def test_sigterm_under_load_drains_and_logs_every_admitted_request(tiny_artifact, tmp_path):
    log = tmp_path / "routing.jsonl"
    proc, url = start_server(tiny_artifact, log, "--max-batch", "2", "--max-queue", "32", "--drain-timeout", "3")
    try:
        async def main():
            async with httpx.AsyncClient(base_url=url, timeout=60) as h:
                tasks = [asyncio.ensure_future(one(h, i)) for i in range(CLIENTS)]
                while True:  # signal once every request is admitted or running
                    metrics = (await h.get("/metrics")).text
                    queued = float(re.search(r"^twinrt_queued (\S+)", metrics, re.M).group(1))
                    running = float(re.search(r"^twinrt_running (\S+)", metrics, re.M).group(1))
                    if queued + running >= CLIENTS - 2:
                        break
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.1)
                late = await h.post("/v1/completions", json={"model": "core", "prompt": "hi", "max_tokens": 2})
                health = await h.get("/health")
                return await asyncio.gather(*tasks), late, health

        results, late, health = asyncio.run(main())
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    outcomes = [check_well_formed(r) for r in results]
    assert "ok" in outcomes and "error" in outcomes  # some finished in the drain time, the rest were ended
    assert late.status_code == 503 and late.json()["error"]["code"] == "server_shutting_down"
    assert late.headers["retry-after"] == "1"
    assert health.status_code == 503 and health.json()["status"] == "draining"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    admitted = {r["id"] for r in results if r["id"] is not None}
    assert len(records) == len(admitted) and {rec["id"] for rec in records} == admitted
    for rec in records:
        assert set(rec) == set(LOG_FIELDS) and rec["status"] in ("ok", "error")
    by_id = {rec["id"]: rec for rec in records}
    for r, outcome in zip(results, outcomes):
        if r["id"] is not None:
            assert by_id[r["id"]]["status"] == outcome


def test_serve_refuses_before_loading_anything(tiny_artifact, tmp_path, capsys, monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert serving_main(["serve", str(tiny_artifact), "--port", str(port), "--no-log"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err and "in use" in err
    assert serving_main(["serve", str(tiny_artifact), "--api-key", "", "--no-log"]) == 2
    assert "empty API key" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    assert serving_main(["serve", str(tiny_artifact), "--api-key-file", str(tmp_path / "empty"), "--no-log"]) == 2
    assert "is empty" in capsys.readouterr().err
    monkeypatch.setenv("TWINRT_API_KEY", " ")
    assert serving_main(["serve", str(tiny_artifact), "--no-log"]) == 2
    assert "TWINRT_API_KEY is set but empty" in capsys.readouterr().err
    monkeypatch.delenv("TWINRT_API_KEY")
    for device, why in [("bogus", "is not a torch device"), ("cuda:7", "CUDA")]:
        assert serving_main(["serve", str(tiny_artifact), "--device", device, "--no-log", "--port", "0"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and why in err and "Traceback" not in err


def test_the_api_key_can_come_from_a_file(tiny_artifact, tmp_path):
    from serving.server import ServeOptions, build_server

    (tmp_path / "key").write_text("sk-from-file\n")
    srv = build_server(ServeOptions(artifact=tiny_artifact, api_key_file=tmp_path / "key", no_log=True))
    assert srv.api_key == "sk-from-file"


@pytest.mark.skipif(not hasattr(signal, "SIGTERM"), reason="POSIX signals")
def test_sigterm_when_idle_exits_zero(tiny_artifact, tmp_path):
    proc, url = start_server(tiny_artifact, tmp_path / "log.jsonl")
    try:
        assert httpx.get(url + "/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
