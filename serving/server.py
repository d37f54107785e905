"""Building a server from options, and running it with uvicorn (in the foreground, or in a thread).

    opts = ServeOptions(artifact="ARTIFACT", ab="twin=50,core=50")
    run(opts)                                   # blocks; what `twinrt serve` does
    with ThreadedServer(build_server(opts)) as url:    # a live server on a free port, e.g. in tests
        OpenAI(base_url=url + "/v1", api_key="-")...

The routing log defaults to ARTIFACT/logs/routing.jsonl (the artifact's manifest does not list it, so
checksum verification ignores it); `--log PATH` moves it, `--no-log` turns it off. The feedback store
(serving.feedback) lives beside it, feedback.sqlite unless `--feedback PATH`; it needs the log (the ids it
accepts are the log's), so `--no-log` turns it off too.

Shutdown: the first SIGTERM or SIGINT drains. New requests get 503 server_shutting_down (Retry-After) and
/health 503 "draining"; running and queued requests may finish for `drain_timeout` seconds; what is still
unfinished then ends with a well-formed error (an error event and `data: [DONE]` on a stream, a 503 otherwise);
the routing log gets every admitted request's record; then the process exits 0. A second signal stops at once.
If the backend's engine stops for good, `run` returns EXIT_ENGINE_DEAD so that a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving.app import Server, create_app
from serving.arms import ArmTable, parse_ab
from serving.backends.local import LocalBackend
from serving.experts import ExpertUpdates
from serving.feedback import DEFAULT_STORE, FeedbackStore
from serving.options import ServeOptions
from serving.routelog import RouteLog
from serving.routing import RoutingService
from twinrt.config import check_device
from twinrt.errors import TwinError

log = logging.getLogger(__name__)
API_KEY_ENV = "TWINRT_API_KEY"
DEFAULT_LOG = Path("logs") / "routing.jsonl"  # under the artifact
EXIT_ENGINE_DEAD = 3
DRAIN_POLL_S = 0.05
ANSWER_GRACE_S = 5.0  # after the drain, for the handlers to write the errors of what it ended


def resolve_api_key(opts: ServeOptions) -> str | None:
    """The key from --api-key, else --api-key-file (first line), else $TWINRT_API_KEY; None = no auth."""
    if opts.api_key is not None and opts.api_key_file is not None:
        raise TwinError("give --api-key or --api-key-file, not both")
    key = opts.api_key
    if opts.api_key_file is not None:
        try:
            key = opts.api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeError) as e:
            raise TwinError(f"--api-key-file {opts.api_key_file}: cannot read it ({e})") from None
        if not key:
            raise TwinError(f"--api-key-file {opts.api_key_file} is empty")
    if key is None:
        env = os.environ.get(API_KEY_ENV)
        if env is not None and not env.strip():
            raise TwinError(f"${API_KEY_ENV} is set but empty; unset it to serve without authentication")
        key = env
    return key


def _local(opts: ServeOptions):
    return LocalBackend.from_artifact(opts.artifact, device=opts.device, dtype=opts.dtype, max_batch=opts.max_batch,
                                      max_queue=opts.max_queue, materialize=opts.materialize,
                                      max_step_tokens=opts.max_step_tokens,
                                      long_prefill_share=opts.long_prefill_share)


def _vllm(opts: ServeOptions):
    from serving.backends.vllm_backend import VLLMBackend

    if opts.device != "cpu" and not opts.device.startswith("cuda"):
        raise TwinError(f"--device {opts.device!r}: the vllm backend runs where vLLM was built for (cpu or cuda)")
    return VLLMBackend(opts.artifact, max_batch=opts.max_batch, max_queue=opts.max_queue, dtype=opts.dtype,
                       options=opts)


BACKENDS: dict[str, Callable[[ServeOptions], Any]] = {"local": _local, "vllm": _vllm}


def build_server(opts: ServeOptions) -> Server:
    """Load the artifact into a backend, its router (if any), the arms and the routing log."""
    from router import load_router
    from twinrt.artifact import Artifact

    if opts.backend not in BACKENDS:
        raise TwinError(f"backend {opts.backend!r} is not available; this twinrt has: {', '.join(BACKENDS)}")
    check_device(opts.device)
    if opts.device.startswith("mps") or not (opts.device == "cpu" or opts.device.startswith("cuda")):
        raise TwinError(f"--device {opts.device!r}: twinrt serves on cpu or cuda")
    api_key = resolve_api_key(opts)
    if opts.no_log and opts.feedback is not None:
        raise TwinError("--feedback needs the routing log (feedback is for the ids it records): drop --no-log")
    art = Artifact.open(opts.artifact)
    experts, statics = art.experts, art.statics
    arms = ArmTable(experts, [parse_ab(opts.ab, experts, opts.ab_name, statics)] if opts.ab else [],
                    seed=opts.ab_seed, statics=statics)
    router = None
    if opts.router and (art.router_dir / "router.json").is_file():
        router = load_router(art, device=opts.device)  # a "hidden" router loads its own copy of the core
    log_path = opts.log or art.path / DEFAULT_LOG
    route_log = None if opts.no_log else RouteLog(log_path)
    feedback = None if opts.no_log else FeedbackStore(opts.feedback or log_path.parent / DEFAULT_STORE)
    backend = BACKENDS[opts.backend](opts)
    unservable = getattr(backend, "unservable", {})  # static arms this backend cannot serve, and why
    for split in arms.splits.values():
        for arm in split.arms:
            if arm.name in unservable:
                raise TwinError(f"--ab: {unservable[arm.name]}")
    updates = ExpertUpdates(art.path, enabled=True, router=opts.router, device=opts.device) \
        if opts.allow_expert_updates else None
    return Server(backend=backend, arms=arms, routing=RoutingService(experts, router), log=route_log,
                  feedback=feedback, api_key=api_key, max_body_bytes=opts.max_body_bytes, name=art.path.name,
                  request_timeout=opts.request_timeout, updates=updates,
                  static_info={f"static:{st.label}": {"method": st.method, "params": st.params}
                               for st in art.manifest.statics})


async def drain(server: Server, timeout: float) -> None:
    """Stop admitting, let unfinished requests run for `timeout` s, end the rest, flush the routing log."""
    loop = asyncio.get_running_loop()
    server.draining = True
    log.warning("draining: refusing new requests; %d unfinished get up to %.0f s",
                server.backend.stats().inflight, timeout)
    deadline = loop.time() + timeout
    while server.backend.stats().inflight and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL_S)
    left = server.backend.stats().inflight
    if left:
        log.warning("drain time is up: ending %d unfinished requests with an error", left)
    await server.backend.stop()  # whatever is left fails with ShuttingDown: a 503, or an error event + [DONE]
    grace = loop.time() + ANSWER_GRACE_S
    while server.active and loop.time() < grace:
        await asyncio.sleep(DRAIN_POLL_S)
    await server.flush_records()


def _uvicorn(server: Server, host: str, port: int, log_level: str, drain_timeout: float = 0.0):
    """A uvicorn.Server whose first SIGTERM/SIGINT drains (see the module docstring)."""
    import uvicorn

    class Uvicorn(uvicorn.Server):
        exit_code = 0
        _loop: asyncio.AbstractEventLoop | None = None
        _drain: asyncio.Task | None = None

        async def startup(self, sockets=None) -> None:
            self._loop = asyncio.get_running_loop()
            await super().startup(sockets=sockets)

        def handle_exit(self, sig, frame) -> None:  # runs in a signal handler: hand over to the loop
            if self._drain is None and not self.should_exit and self._loop is not None and self.started:
                self._loop.call_soon_threadsafe(self.begin_drain)
                return
            super().handle_exit(sig, frame)

        def begin_drain(self) -> None:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_task(self._drained())

        async def _drained(self) -> None:
            try:
                await drain(server, drain_timeout)
            finally:
                self.should_exit = True

        def fatal(self) -> None:
            self.exit_code = EXIT_ENGINE_DEAD
            self.should_exit = True

    config = uvicorn.Config(create_app(server), host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=ANSWER_GRACE_S)
    return Uvicorn(config)


def bound_port(uv) -> int:
    return uv.servers[0].sockets[0].getsockname()[1]


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a busy port is one line, not a crash later."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise TwinError(f"--host {host!r}: cannot resolve it ({e.strerror})") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "it is in use (another server?)" if e.errno == errno.EADDRINUSE else e.strerror
        raise TwinError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


async def _serve(uv, on_ready: Callable[[int], None] | None, sockets: list[socket.socket] | None = None) -> None:
    task = asyncio.create_task(uv.serve(sockets=sockets))
    while not uv.started and not task.done():
        await asyncio.sleep(0.05)
    if uv.started and on_ready is not None:
        on_ready(bound_port(uv))
    await task


def run(opts: ServeOptions, on_ready: Callable[[Server, int], None] | None = None, log_level: str = "info") -> int:
    """Build the server and serve until a signal drains it; `on_ready(server, port)` runs once it listens.
    Returns the process exit code: 0 after a drain, EXIT_ENGINE_DEAD if the engine stopped for good."""
    sock = bind(opts.host, opts.port)
    try:
        server = build_server(opts)
        uv = _uvicorn(server, opts.host, opts.port, log_level, opts.drain_timeout)
        server.on_fatal = uv.fatal
        asyncio.run(_serve(uv, None if on_ready is None else lambda port: on_ready(server, port), [sock]))
    finally:
        sock.close()
    return uv.exit_code


class ThreadedServer:
    """A live server on 127.0.0.1 in a background thread; the context value is its base URL."""

    def __init__(self, server: Server, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 drain_timeout: float = 0.0) -> None:
        self.server = server
        self.uv = _uvicorn(server, host, port, log_level, drain_timeout)
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

    def drain(self) -> None:
        """What SIGTERM does to `twinrt serve` (signals reach only the main thread): drain, then stop."""
        self.uv._loop.call_soon_threadsafe(self.uv.begin_drain)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
