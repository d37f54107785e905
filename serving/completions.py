"""One completion request, from the parsed body to the response: arm, routing, backend, stream or whole.

    arm, split = arms.resolve(body.model, body.user)           # 404 model_not_found
    decision   = await routing.decide(arm, input, override)     # 400 on a bad override
    gens       = [backend.submit(...) for each row]             # 429 when the queue is full
    await every gen.admitted()                                  # 400 when the prompt does not fit
    -> a JSONResponse, or an SSE StreamingResponse (routing extension in the first chunk, `data: [DONE]` last)

With temperature 0 (or below SAMPLING_EPS, which is greedy, as in vLLM) the n choices are equal, so one row is
generated and copied n times; with sampling each choice is its own row with seed + i (or an unseeded
generator when no seed was given). A client that goes away cancels its rows. Every routed request is logged
and counted exactly once, whatever its outcome; its response (or error) carries its id in `x-request-id`.

A request has a server-side deadline (`Server.request_timeout`, from arrival): past it, its rows are cancelled
and it ends with a 504 request_timeout (whole) or an error event and `data: [DONE]` (stream). While the
server drains, new requests get 503 server_shutting_down with Retry-After.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.arms import UnknownModel
from serving.backends.base import (
    BackendError,
    EngineUnavailable,
    Finished,
    Generation,
    GenerationRequest,
    PromptError,
    QueueFull,
    ShuttingDown,
)
from serving.errors import APIError, error_body, internal_error
from serving.responses import SSE_DONE, ChunkWriter, Shape, completion_body, new_id, sse
from serving.routelog import user_hash
from serving.routing import Decision, OverrideError
from serving.schemas import ChatCompletionRequest, CompletionRequest
from twinrt.runtime.sampling import SAMPLING_EPS

DEFAULT_TEMPERATURE = 1.0  # the OpenAI API's default
RETRY_AFTER_S = "1"
DISCONNECT_POLL_S = 0.1
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away


@dataclass
class Tracker:
    """Timing and outcome of one request, for the log and the metrics."""

    t0: float = field(default_factory=time.perf_counter)
    ts: float = field(default_factory=time.time)
    first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.t0


class Deadline(Exception):
    """The request's server-side deadline passed."""


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; retry the request (on another replica).",
                    code="server_shutting_down", headers={"Retry-After": RETRY_AFTER_S})


def timed_out(timeout: float) -> APIError:
    return APIError(504, f"The request did not finish within the server's deadline of {timeout:g} s.",
                    code="request_timeout")


def _backend_error(err: BackendError, chat: bool) -> APIError:
    if isinstance(err, QueueFull):
        return APIError(429, str(err), code="queue_full", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(err, PromptError):
        param = "messages" if chat and err.param == "prompt" else err.param
        return APIError(400, str(err), param=param, code=err.code)
    if isinstance(err, ShuttingDown):
        return shutting_down()
    if isinstance(err, EngineUnavailable):
        return APIError(503, str(err), code="engine_unavailable")
    return internal_error("generation", err)  # a bug or a device error: logged with an id, never shown


def _rows(body: ChatCompletionRequest | CompletionRequest, decision: Decision, deadline: float | None
          ) -> list[GenerationRequest]:
    temperature = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    if temperature < SAMPLING_EPS:
        temperature = 0.0  # vLLM's rule: greedy
    prompt = body.chat() if isinstance(body, ChatCompletionRequest) else body.prompt
    rows = 1 if temperature == 0 else body.n
    return [GenerationRequest(prompt=prompt, mix=decision.mix, max_tokens=body.max_completion(),
                              temperature=temperature, top_p=1.0 if body.top_p is None else body.top_p,
                              stop=body.stops(), seed=None if body.seed is None else body.seed + i,
                              ignore_eos=body.ignore_eos, deadline=deadline)
            for i in range(rows)]


async def _submit(server: Any, rows: Sequence[GenerationRequest], chat: bool,
                  track: Tracker) -> tuple[list[Generation], int]:
    """(the admitted generations, the prompt's token count)."""
    backend = server.backend
    if len(rows) > backend.max_batch + backend.max_queue:
        raise APIError(400, f"n={len(rows)} sampled choices need {len(rows)} rows, more than this server ever "
                       f"holds ({backend.max_batch} running + {backend.max_queue} queued); lower n", param="n")
    gens: list[Generation] = []
    try:
        for r in rows:
            gens.append(backend.submit(r))
        admissions = await _before_deadline(server, track, asyncio.gather(*(g.admitted() for g in gens)))
    except (BackendError, Deadline) as e:
        for g in gens:
            g.cancel()
        if isinstance(e, Deadline):
            raise timed_out(server.request_timeout) from None
        raise _backend_error(e, chat) from None
    return gens, admissions[0].prompt_tokens


def _left(server: Any, track: Tracker) -> float | None:
    """Seconds left before the request's deadline (None: no deadline)."""
    if server.request_timeout is None:
        return None
    return max(0.0, server.request_timeout - (time.perf_counter() - track.t0))


async def _before_deadline(server: Any, track: Tracker, awaitable: Any) -> Any:
    try:
        return await asyncio.wait_for(awaitable, _left(server, track))
    except TimeoutError:
        raise Deadline() from None


async def complete(server: Any, shape: Shape, body: ChatCompletionRequest | CompletionRequest,
                   request: Request) -> JSONResponse | StreamingResponse:
    """Serve one /v1/chat/completions or /v1/completions request (see the module docstring)."""
    track = Tracker()
    chat = isinstance(body, ChatCompletionRequest)
    if server.draining:
        raise shutting_down()
    try:
        arm, split = server.arms.resolve(body.model, body.user)
    except UnknownModel as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    router_input = list(body.chat()) if chat else body.prompt
    try:
        decision = await server.routing.decide(arm, router_input, body.routing, split)
    except OverrideError as e:
        raise APIError(400, str(e), param=e.param, code="unknown_expert") from None
    except Exception as e:  # noqa: BLE001 - the router failed on this input (its batch-mates are routed alone)
        raise internal_error("routing", e) from None
    rid = new_id(shape)
    record = {"ts": round(track.ts, 3), "id": rid, "endpoint": shape.endpoint, "model": body.model,
              "arm": decision.arm, "ab": decision.ab, "user": user_hash(body.user), "router": decision.router,
              "rule": decision.rule, "overridden": decision.overridden, "weights": decision.weights(server.experts),
              "n": body.n, "stream": body.stream}
    rows = _rows(body, decision, None if server.request_timeout is None else track.t0 + server.request_timeout)
    gens, prompt_tokens = await _submit(server, rows, chat, track)
    record["prompt_tokens"] = prompt_tokens  # admitted: from here on the request is logged exactly once
    headers = {"x-request-id": rid}
    if body.stream:
        events = _stream(server, shape, body, decision, gens, rid, track, record)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    try:
        return await _whole(server, shape, body, decision, gens, rid, track, record, request)
    except APIError as e:
        e.headers = {**(e.headers or {}), **headers}
        raise


RECORD_WAIT_S = 10.0


def _finish_record(server: Any, record: dict[str, Any], track: Tracker, status: str, gens: Sequence[Generation],
                   n: int, prompt_tokens: int) -> None:
    """Log and count the request once its rows have ended (a cancelled row ends at the engine's next step)."""
    latency = time.perf_counter() - track.t0

    def write() -> None:
        done = [g.result for g in gens if g.result is not None]
        copies = n // max(len(gens), 1)  # greedy: one row stands for n equal choices
        record.update(status=status, finish_reasons=[r.finish_reason for r in done] * copies,
                      prompt_tokens=prompt_tokens, completion_tokens=sum(r.completion_tokens for r in done) * copies,
                      latency_s=round(latency, 4), ttft_s=None if track.ttft is None else round(track.ttft, 4))
        server.record(record)

    if all(g.done for g in gens):
        write()
        return

    async def later() -> None:
        try:
            await asyncio.wait_for(asyncio.gather(*(g.closed() for g in gens)), RECORD_WAIT_S)
        except TimeoutError:
            pass
        write()

    task = asyncio.get_running_loop().create_task(later())
    server.pending_records.add(task)  # a strong reference; the server waits for these before closing the log
    task.add_done_callback(server.pending_records.discard)


async def _consume(gen: Generation, track: Tracker) -> Finished:
    async for _ in gen:
        track.token()
    assert gen.result is not None
    return gen.result


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _whole(server: Any, shape: Shape, body: ChatCompletionRequest | CompletionRequest, decision: Decision,
                 gens: list[Generation], rid: str, track: Tracker, record: dict[str, Any],
                 request: Request) -> JSONResponse:
    collect = asyncio.ensure_future(asyncio.gather(*(_consume(g, track) for g in gens)))
    watch = asyncio.ensure_future(_until_disconnected(request))
    status = "cancelled"
    try:
        await asyncio.wait({collect, watch}, timeout=_left(server, track), return_when=asyncio.FIRST_COMPLETED)
        if watch.done() and not collect.done():  # the client went away: nobody reads this answer
            return JSONResponse(error_body(499, "client closed the request"), status_code=CLIENT_CLOSED)
        if not collect.done():
            status = "error"
            raise timed_out(server.request_timeout)
        try:
            results: list[Finished] = collect.result()
        except BackendError as e:
            status = "error"
            raise _backend_error(e, isinstance(body, ChatCompletionRequest)) from None
        status = "ok"
    finally:
        watch.cancel()
        if status != "ok":
            collect.cancel()
            for g in gens:
                g.cancel()
        _finish_record(server, record, track, status, gens, body.n, record["prompt_tokens"])
    copies = body.n // len(results)
    texts = [r.text for r in results] * copies
    finishes = [r.finish_reason for r in results] * copies
    out = completion_body(shape, rid, int(track.ts), body.model, texts, finishes, results[0].prompt_tokens,
                          sum(r.completion_tokens for r in results) * copies, decision.extension(server.experts))
    return JSONResponse(out, headers={"x-request-id": rid})


async def _stream(server: Any, shape: Shape, body: ChatCompletionRequest | CompletionRequest, decision: Decision,
                  gens: list[Generation], rid: str, track: Tracker, record: dict[str, Any]) -> AsyncIterator[str]:
    """SSE events; choices interleave in production order. With one greedy row, each delta goes to all n.
    Whatever happens, a stream that is not cut by its client ends with `data: [DONE]` (an error event first
    if it failed)."""
    chat = isinstance(body, ChatCompletionRequest)
    writer = ChunkWriter(shape, rid, body.model, decision.extension(server.experts), body.include_usage(),
                         created=int(track.ts))
    copies = body.n // len(gens)
    queue: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    async def forward(i: int, gen: Generation) -> None:
        try:
            async for delta in gen:
                await queue.put((i, delta))
        except BackendError:
            pass  # reported from gen.error below
        finally:
            await queue.put((i, None))

    tasks = [asyncio.ensure_future(forward(i, g)) for i, g in enumerate(gens)]
    status = "cancelled"
    try:
        try:
            for k in range(body.n):  # the role chunk of every choice opens the stream
                yield writer.delta(k, "", first=True)
            open_rows = len(gens)
            while open_rows:
                try:
                    i, delta = await asyncio.wait_for(queue.get(), _left(server, track))
                except TimeoutError:
                    raise Deadline() from None
                if delta is None:
                    open_rows -= 1
                    continue
                track.token()
                for c in range(copies):
                    yield writer.delta(i + c * len(gens), delta)
            failed = next((g.error for g in gens if g.result is None), None)
            if failed is not None:
                status = "error"
                err = _backend_error(failed, chat)
                yield sse(error_body(err.status, err.message, err.param, err.code))
            else:
                for c in range(copies):
                    for i, g in enumerate(gens):
                        yield writer.delta(i + c * len(gens), "", finish=g.result.finish_reason)  # type: ignore[union-attr]
                if body.include_usage():
                    yield writer.usage(gens[0].result.prompt_tokens,  # type: ignore[union-attr]
                                       sum(g.result.completion_tokens for g in gens) * copies)  # type: ignore[union-attr]
                status = "ok"
        except Deadline:
            status = "error"
            err = timed_out(server.request_timeout)
            yield sse(error_body(err.status, err.message, err.param, err.code))
        except Exception:  # noqa: BLE001 - a bug while streaming still ends the stream well-formed
            status = "error"
            err = internal_error("a stream")
            yield sse(error_body(err.status, err.message, err.param, err.code))
        yield SSE_DONE
    finally:
        for t in tasks:
            t.cancel()
        if status != "ok":
            for g in gens:
                g.cancel()
        _finish_record(server, record, track, status, gens, body.n, record["prompt_tokens"])
