"""The FastAPI app: OpenAI-compatible endpoints over one Server (backend, arms, routing, log, metrics).

    POST /v1/chat/completions   POST /v1/completions   (stream: true -> SSE ending in `data: [DONE]`)
    POST /v1/feedback           (an answered request's outcome; serving.feedback)
    GET  /v1/models             GET  /v1/models/{model}
    POST /tokenize              POST /detokenize       (vLLM's; serving.tokenize)
    GET  /v1/experts            POST /v1/experts   DELETE /v1/experts/{name}   POST /v1/experts/reload
                                (expert updates, off unless --allow-expert-updates; serving.experts)
    GET  /health                GET  /metrics (Prometheus text format)

/health answers 200 {"status": "ok"} while requests can be served, and 503 {"status": "draining" |
"unhealthy"} once the server drains for shutdown or its backend's engine has stopped. A watchdog checks the
backend every WATCHDOG_S; when it turns unhealthy, `Server.on_fatal` runs (`twinrt serve` then exits
non-zero, for its supervisor to restart it).

docs/SERVING.md describes the API; serving.completions the request flow.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving import errors
from serving.arms import ArmTable, parse_arm
from serving.backends.base import Backend
from serving.completions import complete
from serving.errors import APIError, CatchAll
from serving.experts import AddExpertBody, ExpertUpdates
from serving.feedback import FeedbackBody, FeedbackStore, post_feedback
from serving.metrics import Metrics
from serving.middleware import ApiKeyAuth, BodyLimit, StatusCounter
from serving.options import MAX_BODY_BYTES
from serving.responses import CHAT, COMPLETIONS
from serving.routelog import RouteLog
from serving.routing import RoutingService
from serving.schemas import ChatCompletionRequest, CompletionRequest
from serving.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize

WATCHDOG_S = 0.5
RECORD_FLUSH_S = 15.0
log = logging.getLogger(__name__)


@dataclass
class Server:
    """Everything a running server holds. `record` logs and counts one routed request."""

    backend: Backend
    arms: ArmTable
    routing: RoutingService
    log: RouteLog | None = None
    feedback: FeedbackStore | None = None
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    name: str = "twinrt"
    request_timeout: float | None = None      # seconds from arrival; None = no deadline
    on_fatal: Callable[[], None] | None = None  # the backend stopped for good (e.g. exit for a restart)
    static_info: dict[str, dict[str, Any]] = field(default_factory=dict)  # static:<label> -> method, params
    updates: ExpertUpdates | None = None  # expert updates of the running server (None: refused)
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)
    draining: bool = field(init=False, default=False)
    active: int = field(init=False, default=0)  # HTTP requests being answered
    pending_records: set[asyncio.Task] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        self.metrics = Metrics(queued=lambda: self.backend.stats().queued,
                               running=lambda: self.backend.stats().running)

    @property
    def experts(self) -> list[str]:
        """The experts requests are routed over now (the routing service's: an expert update swaps it)."""
        return list(self.routing.experts)

    def record(self, rec: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(rec)
        self.metrics.observe(rec["endpoint"], rec["arm"], rec["status"], rec["weights"], rec["prompt_tokens"],
                             rec["completion_tokens"], rec["latency_s"], rec["ttft_s"])

    async def flush_records(self, timeout: float = RECORD_FLUSH_S) -> None:
        """Wait for the records of requests whose rows are still ending, so each is logged before close."""
        if self.pending_records:
            await asyncio.wait(set(self.pending_records), timeout=timeout)

    async def close(self) -> None:
        await self.backend.stop()
        await self.flush_records()
        self.routing.close()
        if self.log is not None:
            self.log.close()
        if self.feedback is not None:
            self.feedback.close()


def model_card(server: Server, model_id: str) -> dict[str, Any]:
    """A /v1/models entry; the `twinrt` extension says what the name denotes."""
    split = server.arms.splits.get(model_id)
    if split is not None:
        info: dict[str, Any] = {"kind": "ab", "arms": {a.name: w for a, w in zip(split.arms, split.weights)}}
    else:
        arm = parse_arm(model_id, server.experts, server.arms.statics)
        info = {"kind": arm.kind} | ({"expert": arm.expert} if arm.expert else {})
        if arm.kind == "static":
            st = server.static_info.get(arm.name, {})
            info |= {"method": st.get("method"), "params": st.get("params")}
    return {"id": model_id, "object": "model", "created": server.created, "owned_by": "twinrt", "root": server.name,
            "parent": None, "twinrt": info}


def _no_query(request: Request, known: tuple[str, ...]) -> None:
    """A query parameter the endpoint does not take is refused, not ignored."""
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        raise APIError(400, f"unknown query parameter {unknown[0]!r}" + (f"; this endpoint takes {', '.join(known)}"
                                                                        if known else ""), param=unknown[0])


async def _no_body(request: Request) -> None:
    """An endpoint that takes no body refuses one, rather than ignoring what it says."""
    if (await request.body()).strip():
        raise APIError(400, "this endpoint takes no request body", param="body")


def create_app(server: Server) -> FastAPI:
    """The app; its lifespan starts the backend and closes everything on shutdown."""

    async def watchdog() -> None:
        while server.backend.healthy() or server.draining:
            await asyncio.sleep(WATCHDOG_S)
        log.critical("the backend can no longer serve; /health answers 503")
        if server.on_fatal is not None:
            server.on_fatal()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.backend.start()
        dog = asyncio.create_task(watchdog())
        try:
            yield
        finally:
            dog.cancel()
            await server.close()

    app = FastAPI(title="twinrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    errors.install(app)
    app.add_middleware(CatchAll)  # innermost of ours: a bug's 500 still passes the counter below
    app.add_middleware(BodyLimit, max_bytes=server.max_body_bytes)
    if server.api_key:
        app.add_middleware(ApiKeyAuth, api_key=server.api_key)
    def active(step: int) -> None:
        server.active += step

    app.add_middleware(StatusCounter, count=lambda status: server.metrics.errors.labels(str(status)).inc(),
                       active=active)


    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await complete(server, CHAT, body, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await complete(server, COMPLETIONS, body, request)

    @app.post("/v1/feedback")
    async def feedback(body: FeedbackBody) -> dict[str, Any]:
        return await post_feedback(server, body)

    @app.post("/tokenize")
    async def tokenize_(body: TokenizeRequest) -> dict[str, Any]:
        return await tokenize(server, body)

    @app.post("/detokenize")
    async def detokenize_(body: DetokenizeRequest) -> dict[str, Any]:
        return await detokenize(server, body)

    def updates() -> ExpertUpdates:
        if server.updates is None:
            raise APIError(403, "expert updates are off: start the server with --allow-expert-updates",
                           code="expert_updates_off")
        return server.updates

    @app.get("/v1/experts")
    async def experts_list(request: Request) -> dict[str, Any]:
        _no_query(request, ())
        if server.updates is None:
            return {"object": "list", "experts": server.experts, "statics": list(server.arms.statics),
                    "router": server.routing.kind, "allowed": False}
        return server.updates.listing(server)

    @app.post("/v1/experts")
    async def experts_add(body: AddExpertBody, request: Request) -> dict[str, Any]:
        _no_query(request, ())
        return await updates().add(server, body)

    @app.post("/v1/experts/reload")
    async def experts_reload(request: Request) -> dict[str, Any]:
        _no_query(request, ())
        await _no_body(request)
        return await updates().reload(server)

    @app.delete("/v1/experts/{name}")
    async def experts_remove(name: str, request: Request, drop_router: bool = False) -> dict[str, Any]:
        _no_query(request, ("drop_router",))
        await _no_body(request)
        return await updates().remove(server, name, drop_router)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(server, m) for m in server.arms.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in server.arms.model_ids():
            raise APIError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
        return model_card(server, model_id)

    @app.get("/health")
    async def health() -> JSONResponse:
        stats = server.backend.stats()
        status = "draining" if server.draining else "ok" if server.backend.healthy() else "unhealthy"
        body = {"status": status, "backend": server.backend.name, "model": server.name, "experts": server.experts,
                "router": server.routing.kind, "queued": stats.queued, "running": stats.running}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
