"""One completion request, from the parsed body to the response: arm, routing, backend, stream or whole.

    arm, split = arms.resolve(body.model, body.user)           # 404 model_not_found
    decisions  = await routing.decide(arm, input, override)     # per prompt; 400 on a bad override
    gens       = [backend.submit(...) for each prompt, row]     # 429 when the queue is full
    await every gen.admitted()                                  # 400 when a prompt does not fit
    -> a JSONResponse, or an SSE StreamingResponse (`data: [DONE]` last)

/v1/completions takes a list of prompts (strings or token ids) in one request, as OpenAI and vLLM do: prompt p's
choice j has index p·n + j, and every prompt is routed on its own (with several prompts each choice carries
its own `routing`; the top-level one is the first prompt's). With temperature 0 (or below SAMPLING_EPS, which
is greedy, as in vLLM) the n choices of a prompt are equal, so one row is generated and copied n times; with
sampling each choice is its own row with seed + i (or an unseeded generator when no seed was given). A client
that goes away cancels its rows. Every routed request is logged and counted exactly once, whatever its
outcome; its response (or error) carries its id in `x-request-id`.

Logprobs (chat `logprobs`/`top_logprobs`, completions `logprobs`, `echo`, vLLM's `prompt_logprobs`) are those
of the mix that generated the text, from the model's raw logits (serving.logprobs writes them). A stream's
first chunk of each choice carries its first text (the role, and on the first chunk of all the routing
extension, ride on it), so a client's time to first token is the time to the first token.

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
    Delta,
    EngineUnavailable,
    ExpertGone,
    Finished,
    Generation,
    GenerationRequest,
    PromptError,
    QueueFull,
    ShuttingDown,
)
from serving.errors import APIError, error_body, internal_error
from serving.logprobs import TokenText, chat_logprobs, completion_logprobs, prompt_logprobs
from serving.responses import SSE_DONE, ChunkWriter, Shape, completion_body, new_id, sse, usage
from serving.routelog import user_hash
from serving.routing import Decision, OverrideError
from serving.schemas import ChatCompletionRequest, CompletionRequest
from serving.tools import (
    ToolPlan,
    ToolStream,
    constraint_spec,
    parse_output,
    prompt_messages,
    stream_tool_calls,
    tool_finish_reason,
    tool_plan,
)
from twinrt.runtime.sampling import SAMPLING_EPS
from twinrt.runtime.structured import StructuredSpec

DEFAULT_TEMPERATURE = 1.0  # the OpenAI API's default
RETRY_AFTER_S = "1"
DISCONNECT_POLL_S = 0.1
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away

Body = ChatCompletionRequest | CompletionRequest


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
    if isinstance(err, ExpertGone):
        return APIError(404, str(err), param="model", code="model_not_found")
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


@dataclass(frozen=True)
class Plan:
    """What a request generates and what its response shows, read once from the body.

    prompts[p] is generated `rows` times (1 when greedy: its n choices are copies); choice p·n + j reads row
    `row(p, j)`. `top`: logprobs alternatives per generated token (None: no logprobs); `prompt_top`: the same for
    prompt tokens (echo with logprobs, or vLLM's prompt_logprobs). `tools`: a chat's tool plan (serving.tools)
    and `template_tools` what its chat template gets."""

    chat: bool
    prompts: tuple[Any, ...]
    n: int
    rows: int
    top: int | None
    prompt_top: int | None
    echo: bool
    structured: StructuredSpec | None
    tools: ToolPlan = ToolPlan()
    template_tools: tuple[dict[str, Any], ...] | None = None

    @property
    def calls(self) -> bool:
        """The output may hold tool calls (parsed from the text, not sent as it comes)."""
        return self.tools.mode != "none"

    def row(self, p: int, j: int) -> int:
        return p * self.rows + (j if self.rows > 1 else 0)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


def _temperature(body: Body) -> float:
    t = DEFAULT_TEMPERATURE if body.temperature is None else body.temperature
    return 0.0 if t < SAMPLING_EPS else t  # vLLM's rule: greedy


def _spec(kind: str, value: Any, param: str | None) -> StructuredSpec:
    try:
        return StructuredSpec(kind, value)  # type: ignore[arg-type]
    except ValueError as e:
        raise APIError(400, str(e), param=param, code="invalid_structured_output") from None


def plan(body: Body, tokenizer: Any) -> Plan:
    """The request's Plan; a 400 for tools or a structured output that cannot be honoured."""
    chat = isinstance(body, ChatCompletionRequest)
    top = body.top_logprobs_k()
    echo = bool(getattr(body, "echo", False))
    asked = [k for k in (body.prompt_logprobs, top if echo else None) if k is not None]
    structured = body.structured()
    spec = _spec(*structured[0], "response_format" if body.response_format else None) if structured else None
    tools, prompts, template_tools = ToolPlan(), tuple(getattr(body, "prompt", ())), None
    if isinstance(body, ChatCompletionRequest):
        try:
            tools = tool_plan(body.tools, body.tool_choice, body.parallel_tool_calls)
            call_spec = constraint_spec(tools)
        except ValueError as e:
            raise APIError(400, str(e), param="tools") from None
        if call_spec is not None and spec is not None:
            raise APIError(400, "a required or named tool_choice constrains the output itself; it cannot be "
                           "combined with response_format or structured_outputs", param="tool_choice")
        spec = spec or call_spec
        messages, listed = prompt_messages(tokenizer, body.chat(), tools)
        prompts, template_tools = (tuple(messages),), tuple(listed) if listed else None
    return Plan(chat=chat, prompts=prompts, n=body.n, rows=1 if _temperature(body) == 0 else body.n, top=top,
                prompt_top=max(asked) if asked else None, echo=echo, structured=spec, tools=tools,
                template_tools=template_tools)


def _rows(body: Body, pl: Plan, decisions: Sequence[Decision], deadline: float | None,
          experts: Sequence[str]) -> list[GenerationRequest]:
    common: dict[str, Any] = dict(
        max_tokens=body.max_completion(), temperature=_temperature(body),
        top_p=1.0 if body.top_p is None else body.top_p, stop=body.stops(), ignore_eos=body.ignore_eos,
        deadline=deadline, top_k=body.top_k or 0, min_p=body.min_p or 0.0, min_tokens=body.min_tokens,
        repetition_penalty=body.repetition_penalty or 1.0, presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0, logit_bias=body.bias(),
        stop_token_ids=tuple(body.stop_token_ids or ()), include_stop_str_in_output=body.include_stop_str_in_output,
        logprobs=pl.top, prompt_logprobs=pl.prompt_top, structured=pl.structured, tools=pl.template_tools)
    return [GenerationRequest(prompt=p, mix=d.mix, static=d.static, seed=None if body.seed is None else body.seed + i,
                              experts=tuple(experts), **common)
            for p, d in zip(pl.prompts, decisions) for i in range(pl.rows)]


async def _submit(server: Any, rows: Sequence[GenerationRequest], chat: bool,
                  track: Tracker, reroute: bool = False) -> tuple[list[Generation], list[Any]]:
    """(the admitted generations, their admissions). `reroute`: ExpertGone is raised as it is (the caller routes
    the request again), not turned into its 404."""
    backend = server.backend
    if len(rows) > backend.max_batch + backend.max_queue:
        raise APIError(400, f"this request needs {len(rows)} rows (prompts x sampled choices), more than this "
                       f"server ever holds ({backend.max_batch} running + {backend.max_queue} queued); send "
                       f"fewer prompts or a lower n", param="n")
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
        if reroute and isinstance(e, ExpertGone):
            raise
        raise _backend_error(e, chat) from None
    return gens, list(admissions)


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


def _router_input(server: Any, prompt: Any) -> Any:
    """What the router reads: chat messages, the prompt text, or the text of token ids."""
    if isinstance(prompt, tuple) and prompt and isinstance(prompt[0], int):
        return server.backend.encoder.tokenizer.decode(list(prompt))
    return list(prompt) if isinstance(prompt, tuple) else prompt


def _mean_weights(experts: Sequence[str], decisions: Sequence[Decision]) -> dict[str, float]:
    rows = [d.weights(experts) for d in decisions]
    return {e: round(sum(r[e] for r in rows) / len(rows), 6) for e in experts}


async def complete(server: Any, shape: Shape, body: Body, request: Request) -> JSONResponse | StreamingResponse:
    """Serve one /v1/chat/completions or /v1/completions request (see the module docstring)."""
    track = Tracker()
    pl = plan(body, server.backend.encoder.tokenizer)
    if server.draining:
        raise shutting_down()
    try:
        arm, split = server.arms.resolve(body.model, body.user)  # once: a retry below keeps the A/B pick
    except UnknownModel as e:
        raise APIError(404, str(e), param="model", code="model_not_found") from None
    for attempt in range(2):
        routing = server.routing  # one expert set for the request, whatever an expert update swaps meanwhile
        experts = routing.experts
        try:
            decisions = await asyncio.gather(*(routing.decide(arm, _router_input(server, p), body.routing, split)
                                               for p in pl.prompts))
        except OverrideError as e:
            raise APIError(400, str(e), param=e.param, code="unknown_expert") from None
        except Exception as e:  # noqa: BLE001 - the router failed on this input (its batch-mates are routed alone)
            raise internal_error("routing", e) from None
        rows = _rows(body, pl, decisions, None if server.request_timeout is None else track.t0 + server.request_timeout,
                     experts)
        # the router's mix gave weight to an expert removed meanwhile: the twin is routed again, over the new set
        reroute = attempt == 0 and arm.kind == "twin" and body.routing is None
        try:
            gens, admissions = await _submit(server, rows, pl.chat, track, reroute=reroute)
            break
        except ExpertGone:
            continue
    rid = shape.id_prefix + body.request_id if body.request_id else new_id(shape)
    first = decisions[0]
    record = {"ts": round(track.ts, 3), "id": rid, "endpoint": shape.endpoint, "model": body.model,
              "arm": first.arm, "ab": first.ab, "user": user_hash(body.user), "router": first.router,
              "rule": first.rule, "confidence": None if first.confidence is None else round(first.confidence, 6),
              "overridden": first.overridden, "weights": _mean_weights(experts, decisions),
              "n": body.n, "stream": body.stream}
    if len(pl.prompts) > 1:
        record["prompts"] = len(pl.prompts)
    record["prompt_tokens"] = sum(admissions[pl.row(p, 0)].prompt_tokens for p in range(len(pl.prompts)))
    headers = {"x-request-id": rid}
    view = View(server, body, pl, decisions, admissions, experts)
    if body.stream:
        events = _stream(server, shape, body, view, gens, rid, track, record)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    try:
        return await _whole(server, shape, body, view, gens, rid, track, record, request)
    except APIError as e:
        e.headers = {**(e.headers or {}), **headers}
        raise


class View:
    """How a request's results read in its response: texts, logprobs, echo, vLLM's token-id extensions."""

    def __init__(self, server: Any, body: Body, pl: Plan, decisions: Sequence[Decision],
                 admissions: Sequence[Any], experts: Sequence[str]) -> None:
        self.body, self.pl, self.decisions = body, pl, decisions
        self.experts = list(experts)
        self.tt = TokenText(server.backend.encoder.tokenizer, as_ids=bool(body.return_tokens_as_token_ids))
        self.prompt_ids = [admissions[pl.row(p, 0)].prompt_ids for p in range(len(pl.prompts))]
        self.prompt_tokens = sum(len(ids) for ids in self.prompt_ids)
        self.token_ids = bool(body.return_token_ids)

    def prompt_of(self, index: int) -> int:
        return index // self.pl.n

    def echo_text(self, p: int) -> str:
        prompt = self.pl.prompts[p]
        return prompt if isinstance(prompt, str) else self.tt.tokenizer.decode(list(self.prompt_ids[p]))

    def routing(self) -> dict[str, Any]:
        return self.decisions[0].extension(self.experts)

    def choice_fields(self, index: int) -> dict[str, Any]:
        """Fields a choice carries beyond its text: its prompt's routing when there are several prompts."""
        p = self.prompt_of(index)
        return {"routing": self.decisions[p].extension(self.experts)} if len(self.pl.prompts) > 1 else {}

    def logprobs(self, index: int, entries: Sequence[Any], prompt_entries: Sequence[Any] | None,
                 offset: int) -> tuple[dict[str, Any] | None, int]:
        """A choice's (or chunk's) logprobs for generated `entries`, with the prompt's first under echo."""
        top = self.pl.top
        if top is None:
            return None, offset
        if self.pl.chat:
            return chat_logprobs(entries, self.tt, top), offset
        tokens = [e.token for e in entries]
        lps = list(entries)
        if prompt_entries is not None:
            ids = list(self.prompt_ids[self.prompt_of(index)])
            tokens, lps = ids + tokens, list(prompt_entries) + lps
        return completion_logprobs(lps, tokens, self.tt, top, offset)

    def prompt_extension(self, res: Finished, p: int) -> dict[str, Any]:
        """vLLM's prompt_logprobs and prompt_token_ids, when asked for."""
        out: dict[str, Any] = {}
        if self.body.prompt_logprobs is not None:
            out["prompt_logprobs"] = prompt_logprobs(res.prompt_logprobs, self.tt)
        if self.token_ids:
            out["prompt_token_ids"] = list(self.prompt_ids[p])
        return out

    def whole_choice(self, shape: Shape, index: int, res: Finished) -> dict[str, Any]:
        p = self.prompt_of(index)
        echo = self.pl.echo
        text = (self.echo_text(p) + res.text) if echo else res.text
        fields: dict[str, Any] = {}
        finish = res.finish_reason
        if self.pl.calls:
            out = parse_output(res.text, self.pl.tools)
            text, finish = out.content or "", tool_finish_reason(finish, out.tool_calls)
            if out.tool_calls:
                message = {"content": out.content, "tool_calls": out.tool_calls}
        choice = shape.choice(index, text, finish)
        if self.pl.calls and out.tool_calls:
            shape.extend(choice, message)
        choice["logprobs"], _ = self.logprobs(index, res.logprobs, res.prompt_logprobs if echo else None, 0)
        if self.token_ids:
            fields["token_ids"] = list(res.token_ids)
        if not self.pl.chat:
            fields.update(self.prompt_extension(res, p))
        return choice | fields | self.choice_fields(index)


RECORD_WAIT_S = 10.0


def _finish_record(server: Any, record: dict[str, Any], track: Tracker, status: str, gens: Sequence[Generation],
                   pl: Plan) -> None:
    """Log and count the request once its rows have ended (a cancelled row ends at the engine's next step)."""
    latency = time.perf_counter() - track.t0

    def write() -> None:
        copies = pl.n // pl.rows  # greedy: one row stands for n equal choices
        done = [g.result for g in gens if g.result is not None]
        record.update(status=status, finish_reasons=[r.finish_reason for r in done for _ in range(copies)],
                      completion_tokens=sum(r.completion_tokens for r in done) * copies,
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


async def _whole(server: Any, shape: Shape, body: Body, view: View, gens: list[Generation], rid: str,
                 track: Tracker, record: dict[str, Any], request: Request) -> JSONResponse:
    pl = view.pl
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
            raise _backend_error(e, pl.chat) from None
        status = "ok"
    finally:
        watch.cancel()
        if status != "ok":
            collect.cancel()
            for g in gens:
                g.cancel()
        _finish_record(server, record, track, status, gens, pl)
    choices = [view.whole_choice(shape, i, results[pl.row(i // pl.n, i % pl.n)]) for i in range(pl.choices)]
    completion_tokens = sum(results[pl.row(i // pl.n, i % pl.n)].completion_tokens for i in range(pl.choices))
    extra = view.prompt_extension(results[0], 0) if pl.chat else {}
    out = completion_body(shape, rid, int(track.ts), body.model, choices, view.prompt_tokens, completion_tokens,
                          view.routing(), **extra)
    return JSONResponse(out, headers={"x-request-id": rid})


@dataclass
class _Choice:
    """A streamed choice's state: opened (its first chunk sent), its logprobs' text offset, and what holds back
    text that may be tool calls."""

    opened: bool = False
    offset: int = 0
    tools: ToolStream | None = None


async def _stream(server: Any, shape: Shape, body: Body, view: View, gens: list[Generation], rid: str,
                  track: Tracker, record: dict[str, Any]) -> AsyncIterator[str]:
    """SSE events; choices interleave in production order. With one greedy row per prompt, each delta goes to
    all n of its choices. A choice's first chunk waits for its first text (or its end), and carries it.
    Whatever happens, a stream that is not cut by its client ends with `data: [DONE]` (an error event first
    if it failed)."""
    pl = view.pl
    writer = ChunkWriter(shape, rid, body.model, view.routing(), body.include_usage(), created=int(track.ts))
    copies = pl.n // pl.rows
    produced = [0] * len(gens)  # each row's completion tokens so far (continuous usage stats)
    state = [_Choice(tools=ToolStream(pl.tools) if pl.calls else None) for _ in range(pl.choices)]
    queue: asyncio.Queue[tuple[int, Delta | None]] = asyncio.Queue()

    async def forward(i: int, gen: Generation) -> None:
        try:
            async for delta in gen:
                await queue.put((i, delta))
        except BackendError:
            pass  # reported from gen.error below
        finally:
            await queue.put((i, None))

    def choices_of(row: int) -> list[int]:
        p, r = divmod(row, pl.rows)
        return [p * pl.n + r + c * pl.rows for c in range(copies)]

    def chunk(index: int, delta: Delta, prompt_entries: Any, finish: str | None = None,
              fields: dict[str, Any] | None = None) -> str | None:
        st = state[index]
        first = not st.opened
        text = delta.text if st.tools is None else st.tools.feed(delta.text)
        if st.tools is not None and finish is not None:
            out = st.tools.close()
            text += out.content or ""
            if out.tool_calls:
                fields = {**(fields or {}), "tool_calls": stream_tool_calls(out.tool_calls)}
                finish = tool_finish_reason(finish, out.tool_calls)
        echo = first and pl.echo
        if echo:
            text = view.echo_text(view.prompt_of(index)) + text
        if not text and not delta.logprobs and finish is None:
            return None  # nothing to send yet (text held back): a choice opens with its first text
        logprobs = None
        if delta.logprobs or echo or (first and finish is None):
            logprobs, st.offset = view.logprobs(index, delta.logprobs, prompt_entries if echo else None, st.offset)
        st.opened = True
        so_far = usage(view.prompt_tokens, sum(produced) * copies) if body.continuous_usage() else None
        return writer.delta(index, text, first=first, finish=finish, logprobs=logprobs,
                            fields={**(fields or {}), **(view.choice_fields(index) if first else {})},
                            so_far=so_far)

    tasks = [asyncio.ensure_future(forward(i, g)) for i, g in enumerate(gens)]
    status = "cancelled"
    try:
        try:
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
                produced[i] = max(produced[i], delta.tokens)
                for index in choices_of(i):
                    event = chunk(index, delta, delta.prompt_logprobs)
                    if event is not None:
                        yield event
            failed = next((g.error for g in gens if g.result is None), None)
            if failed is not None:
                status = "error"
                err = _backend_error(failed, pl.chat)
                yield sse(error_body(err.status, err.message, err.param, err.code))
            else:
                for i, g in enumerate(gens):
                    res: Finished = g.result  # type: ignore[assignment]
                    produced[i] = res.completion_tokens
                    for index in choices_of(i):
                        fields = {"token_ids": list(res.token_ids)} if view.token_ids else {}
                        if not pl.chat:
                            fields.update(view.prompt_extension(res, view.prompt_of(index)))
                        yield chunk(index, Delta(""), res.prompt_logprobs, finish=res.finish_reason,  # type: ignore[misc]
                                    fields=fields)
                if body.include_usage():
                    yield writer.usage(view.prompt_tokens, sum(g.result.completion_tokens  # type: ignore[union-attr]
                                                               for g in gens) * copies)
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
        _finish_record(server, record, track, status, gens, pl)
