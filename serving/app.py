"""The FastAPI app: OpenAI-compatible endpoints over one Server (backend, arms, routing, log, metrics).

    POST /v1/chat/completions   POST /v1/completions   (stream: true -> SSE ending in `data: [DONE]`)
    GET  /v1/models             GET  /v1/models/{model}
    GET  /health                GET  /metrics (Prometheus text format)

docs/SERVING.md describes the API; serving.completions the request flow.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving import errors
from serving.arms import ArmTable, parse_arm
from serving.backends.base import Backend
from serving.completions import complete
from serving.errors import APIError
from serving.metrics import Metrics
from serving.middleware import ApiKeyAuth, BodyLimit, StatusCounter
from serving.responses import CHAT, COMPLETIONS
from serving.routelog import RouteLog
from serving.routing import RoutingService
from serving.schemas import ChatCompletionRequest, CompletionRequest

MAX_BODY_BYTES = 1 << 20


@dataclass
class Server:
    """Everything a running server holds. `record` logs and counts one routed request."""

    backend: Backend
    arms: ArmTable
    routing: RoutingService
    log: RouteLog | None = None
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES
    name: str = "twinrt"
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = Metrics(queued=lambda: self.backend.stats().queued,
                               running=lambda: self.backend.stats().running)

    @property
    def experts(self) -> list[str]:
        return list(self.backend.experts)

    def record(self, rec: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(rec)
        self.metrics.observe(rec["endpoint"], rec["arm"], rec["status"], rec["weights"], rec["prompt_tokens"],
                             rec["completion_tokens"], rec["latency_s"], rec["ttft_s"])

    async def close(self) -> None:
        await self.backend.stop()
        self.routing.close()
        if self.log is not None:
            self.log.close()


def model_card(server: Server, model_id: str) -> dict[str, Any]:
    """A /v1/models entry; the `twinrt` extension says what the name denotes."""
    split = server.arms.splits.get(model_id)
    if split is not None:
        info: dict[str, Any] = {"kind": "ab", "arms": {a.name: w for a, w in zip(split.arms, split.weights)}}
    else:
        arm = parse_arm(model_id, server.experts)
        info = {"kind": arm.kind} | ({"expert": arm.expert} if arm.expert else {})
    return {"id": model_id, "object": "model", "created": server.created, "owned_by": "twinrt", "root": server.name,
            "parent": None, "twinrt": info}


def create_app(server: Server) -> FastAPI:
    """The app; its lifespan starts the backend and closes everything on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.backend.start()
        try:
            yield
        finally:
            await server.close()

    app = FastAPI(title="twinrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=server.max_body_bytes)
    if server.api_key:
        app.add_middleware(ApiKeyAuth, api_key=server.api_key)
    app.add_middleware(StatusCounter, count=lambda status: server.metrics.errors.labels(str(status)).inc())


    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await complete(server, CHAT, body, request)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        return await complete(server, COMPLETIONS, body, request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(server, m) for m in server.arms.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in server.arms.model_ids():
            raise APIError(404, f"The model {model_id!r} does not exist.", param="model", code="model_not_found")
        return model_card(server, model_id)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = server.backend.stats()
        return {"status": "ok", "backend": server.backend.name, "model": server.name, "experts": server.experts,
                "router": server.routing.kind, "queued": stats.queued, "running": stats.running}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
