"""Building a server from options, and running it with uvicorn (in the foreground, or in a thread).

    opts = ServeOptions(artifact="ARTIFACT", ab="twin=50,core=50")
    run(opts)                                   # blocks; what `twinrt serve` does
    with ThreadedServer(build_server(opts)) as url:    # a live server on a free port, e.g. in tests
        OpenAI(base_url=url + "/v1", api_key="-")...

The routing log defaults to ARTIFACT/logs/routing.jsonl (the artifact's manifest does not list it, so
checksum verification ignores it); `--log PATH` moves it, `--no-log` turns it off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.app import MAX_BODY_BYTES, Server, create_app
from serving.arms import DEFAULT_AB_NAME, ArmTable, parse_ab
from serving.backends.local import LocalBackend
from serving.routelog import RouteLog
from serving.routing import RoutingService
from twinrt.errors import TwinError

log = logging.getLogger(__name__)
API_KEY_ENV = "TWINRT_API_KEY"
DEFAULT_LOG = Path("logs") / "routing.jsonl"  # under the artifact


class ServeOptions(BaseModel):
    """`twinrt serve` options, validated once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    artifact: Path
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0 = any free port
    backend: str = "local"
    api_key: str | None = None
    ab: str | None = None
    ab_name: str = DEFAULT_AB_NAME
    ab_seed: int | None = None               # seeds the random A/B picks of requests without `user`
    max_batch: int = Field(32, ge=1)
    max_queue: int = Field(256, ge=0)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"
    log: Path | None = None                  # None = ARTIFACT/logs/routing.jsonl
    no_log: bool = False
    router: bool = True                      # False: serve `twin` without the artifact's router
    materialize: bool = True                 # let the engine build W' for batches that share one mix
    max_body_bytes: int = Field(MAX_BODY_BYTES, ge=1024)
    # --backend vllm (passed to vLLM as is; see serving/backends/vllm_backend.py)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    max_loras: int = Field(4, ge=1)
    max_cpu_loras: int | None = Field(None, ge=1)
    max_lora_rank: int | None = None
    max_model_len: int | None = Field(None, ge=2)
    kv_cache_gib: float | None = Field(None, gt=0)
    mix_top_k: int = Field(2, ge=1)
    mix_step: float = Field(0.05, gt=0, le=1)
    adapter_cache: int = Field(16, ge=1)
    vllm_args: tuple[str, ...] = ()          # KEY=VALUE: any other vLLM engine argument (VALUE parsed as JSON)


def _local(opts: ServeOptions):
    return LocalBackend.from_artifact(opts.artifact, device=opts.device, dtype=opts.dtype, max_batch=opts.max_batch,
                                      max_queue=opts.max_queue, materialize=opts.materialize)


def parse_vllm_args(items: tuple[str, ...]) -> dict[str, Any]:
    """["enforce_eager=true", "block_size=32", "quantization=fp8"] -> {...}: JSON values, else strings."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_")
        if not sep or not key:
            raise TwinError(f"--vllm-arg takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _vllm(opts: ServeOptions):
    from serving.backends.vllm_backend import VLLMBackend, VLLMOptions

    if opts.device != "cpu" and not opts.device.startswith("cuda"):
        raise TwinError(f"--device {opts.device!r}: the vllm backend runs where vLLM was built for (cpu or cuda)")
    vopts = VLLMOptions(dtype=opts.dtype, tensor_parallel_size=opts.tensor_parallel_size,
                        gpu_memory_utilization=opts.gpu_memory_utilization, max_loras=opts.max_loras,
                        max_cpu_loras=opts.max_cpu_loras, max_lora_rank=opts.max_lora_rank,
                        max_model_len=opts.max_model_len, kv_cache_gib=opts.kv_cache_gib, top_k=opts.mix_top_k,
                        step=opts.mix_step, adapter_cache=opts.adapter_cache,
                        engine_args=parse_vllm_args(opts.vllm_args))
    return VLLMBackend(opts.artifact, max_batch=opts.max_batch, max_queue=opts.max_queue, options=vopts)


BACKENDS: dict[str, Callable[[ServeOptions], Any]] = {"local": _local, "vllm": _vllm}


def build_server(opts: ServeOptions) -> Server:
    """Load the artifact into a backend, its router (if any), the arms and the routing log."""
    from router import load_router
    from twinrt.artifact import Artifact

    if opts.backend not in BACKENDS:
        raise TwinError(f"backend {opts.backend!r} is not available; this twinrt has: {', '.join(BACKENDS)}")
    art = Artifact.open(opts.artifact)
    experts = art.experts
    arms = ArmTable(experts, [parse_ab(opts.ab, experts, opts.ab_name)] if opts.ab else [], seed=opts.ab_seed)
    router = None
    if opts.router and (art.router_dir / "router.json").is_file():
        router = load_router(art, device=opts.device)  # a "hidden" router loads its own copy of the core
    route_log = None if opts.no_log else RouteLog(opts.log or art.path / DEFAULT_LOG)
    backend = BACKENDS[opts.backend](opts)
    api_key = opts.api_key or os.environ.get(API_KEY_ENV) or None
    return Server(backend=backend, arms=arms, routing=RoutingService(experts, router), log=route_log,
                  api_key=api_key, max_body_bytes=opts.max_body_bytes, name=art.path.name)


def _uvicorn(server: Server, host: str, port: int, log_level: str):
    import uvicorn

    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def bound_port(uv) -> int:
    return uv.servers[0].sockets[0].getsockname()[1]


async def _serve(uv, on_ready: Callable[[int], None] | None) -> None:
    task = asyncio.create_task(uv.serve())
    while not uv.started and not task.done():
        await asyncio.sleep(0.05)
    if uv.started and on_ready is not None:
        on_ready(bound_port(uv))
    await task


def run(opts: ServeOptions, on_ready: Callable[[Server, int], None] | None = None, log_level: str = "info") -> None:
    """Build the server and serve until interrupted; `on_ready(server, port)` runs once it listens."""
    server = build_server(opts)
    uv = _uvicorn(server, opts.host, opts.port, log_level)
    asyncio.run(_serve(uv, None if on_ready is None else lambda port: on_ready(server, port)))


class ThreadedServer:
    """A live server on 127.0.0.1 in a background thread; the context value is its base URL."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.server = server
        self.uv = _uvicorn(server, host, port, log_level)
        self.host = host
        self.port: int | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="twinrt-uvicorn", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        def ready(port: int) -> None:
            self.port = port
            self._ready.set()

        try:
            asyncio.run(_serve(self.uv, ready))
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e
        finally:
            self._ready.set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60) -> str:
        self._thread.start()
        if not self._ready.wait(timeout) or self.port is None:
            raise RuntimeError(f"the server did not start: {self._error!r}")
        return self.url

    def stop(self, timeout: float = 30) -> None:
        self.uv.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
