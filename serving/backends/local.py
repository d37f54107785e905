"""The local backend: twinrt's continuous-batching Engine, driven by one worker thread.

    event loop thread          tokenizer thread                      worker thread (owns the Engine)
    submit(req) ──────────▶    encode, check the context ─ inbox ─▶  engine.add(...) ─▶ gen.admit
    gen.cancel() ─ inbox ("cancel", gen) ─────────────────────────▶  engine.cancel: a waiting one ends now
                                                                     engine.step(): one token for every
    gen.push(delta) ◀── call_soon_threadsafe ───────────────────────  running row; finished ─▶ gen.finish

Requests join the running batch between decode steps, each with its own mix row, whatever its arm.
Tokenization runs on its own thread, so a huge prompt never stalls the rows being decoded. The worker sleeps
on an Event when the engine is idle.

Faults stay with the request that caused them:
- a prompt that cannot be tokenized, or does not fit, is refused (PromptError) before it reaches the engine;
- a row the engine fails alone (non-finite output, a per-row error: `Request.error`) fails only that request;
- a step that raises for reasons no row explains fails the rows of that engine and the engine is rebuilt
  empty (requests not yet admitted go to the new one);
- if steps keep failing (MAX_STEP_FAILURES within STEP_FAILURE_WINDOW_S) or the worker thread dies, the
  backend turns unhealthy for good: every waiting request fails with EngineUnavailable and `healthy()` is
  False, so /health answers 503 and `twinrt serve` exits non-zero for its supervisor to restart it.

Expert updates (`reload`): the artifact's new expert set is loaded on the same core (`TwinModel.reloaded`:
the core's weights are shared, only factors are read) beside the running one, with its own engine, and
becomes current: requests admitted from then on run on it, each request's mix mapped onto its experts by
name (one that gives weight to an expert it no longer has fails with ExpertGone). Requests already in the
previous engine finish there, on the experts they started with; the worker steps both engines until the old
one is empty, then lets it go.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from serving.backends.base import (
    Admission,
    BackendError,
    BackendFailure,
    BackendStats,
    Delta,
    EngineUnavailable,
    ExpertGone,
    Finished,
    Generation,
    GenerationRequest,
    PromptEncoder,
    PromptError,
    ShuttingDown,
    check_capacity,
    check_submit,
    engine_sampling,
)
from twinrt.runtime import Engine, Request, SamplingParams, TwinModel
from twinrt.runtime.structured import StructuredCompiler

log = logging.getLogger(__name__)
MAX_STEP_FAILURES = 3          # unexplained step failures within the window before the engine is given up
STEP_FAILURE_WINDOW_S = 60.0


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    """Resolve an expert update's future on the loop (unless its waiter is gone)."""
    if not fut.done():
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def row_error(failure: Any) -> BackendError:
    """The error a request gets for a row the engine failed alone: its own input (400) or a fault (500)."""
    if failure.client:
        return PromptError(failure.message, code="invalid_output")
    return BackendFailure(failure.message)


@dataclass
class _Epoch:
    """One expert set being served: its TwinModel, its engine, and the handles of the requests in that engine."""

    tm: TwinModel
    engine: Engine
    gens: dict[int, Generation] = field(default_factory=dict)  # id(engine Request) -> handle


class LocalBackend:
    """Backend over a TwinModel in this process (see the module docstring)."""

    name = "local"

    def __init__(self, tm: TwinModel, max_batch: int = 32, max_queue: int = 256, materialize: bool = True,
                 max_step_tokens: int | None = None, long_prefill_share: float | None = None) -> None:
        check_capacity(max_batch, max_queue)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.materialize = materialize
        self._engine_kw: dict[str, Any] = {"max_batch": max_batch, "materialize": materialize}
        if max_step_tokens is not None:
            self._engine_kw["max_step_tokens"] = max_step_tokens
        if long_prefill_share is not None:
            self._engine_kw["chunk_share"] = long_prefill_share
        self._current = _Epoch(tm, Engine(tm, **self._engine_kw))
        self._epochs = [self._current]  # the current one last; earlier ones finish their requests
        self.context = self.engine.context
        try:  # the tokenizer thread's own copy: the engine thread decodes with the original meanwhile
            tokenizer = copy.deepcopy(tm.tokenizer)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied is shared (encode/decode only read)
            tokenizer = tm.tokenizer
        self.encoder = PromptEncoder(tokenizer, self.context)
        self._structured = StructuredCompiler(tokenizer, int(tm.config.vocab_size), self.engine.eos)
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._prep: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._dead = False
        self._failures: deque[float] = deque(maxlen=MAX_STEP_FAILURES)
        self.engine_rebuilds = 0
        self._inflight = 0  # loop thread only

    @property
    def tm(self) -> TwinModel:
        """The TwinModel new requests run on."""
        return self._current.tm

    @property
    def engine(self) -> Engine:
        """The engine new requests join."""
        return self._current.engine

    @property
    def experts(self) -> list[str]:
        return list(self._current.tm.experts)

    @property
    def statics(self) -> list[str]:
        return list(self._current.tm.statics)

    @classmethod
    def from_artifact(cls, path: str | Path, *, device: str = "cpu", dtype: str = "float32", max_batch: int = 32,
                      max_queue: int = 256, materialize: bool = True,
                      max_step_tokens: int | None = None, long_prefill_share: float | None = None) -> LocalBackend:
        return cls(TwinModel.from_artifact(path, device=device, dtype=dtype), max_batch, max_queue, materialize,
                   max_step_tokens, long_prefill_share)

    async def reload(self, path: str | Path | None = None) -> list[str]:
        """Serve the artifact at `path` (default: the one served, read again) from now on, on the same core (see
        the module docstring); -> its experts. Raises TwinError when its core is another."""
        if self._dead or self._stopping:
            raise EngineUnavailable("the generation engine has stopped; this server must be restarted")
        tm = await asyncio.to_thread(self.tm.reloaded, path)
        epoch = _Epoch(tm, Engine(tm, **self._engine_kw))
        if self._thread is None:
            self._install(epoch)
        else:
            done = asyncio.get_running_loop().create_future()
            self._inbox.put(("epoch", epoch, done))
            self._wake.set()
            await done  # the worker installs it, or fails it when it stops (_reject_inbox)
        return list(tm.experts)

    def _install(self, epoch: _Epoch) -> None:
        self._epochs.append(epoch)
        self._current = epoch

    # ---- loop side -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._prep = ThreadPoolExecutor(1, thread_name_prefix="twinrt-tokenize")
        self._thread = threading.Thread(target=self._run, name="twinrt-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        if self._prep is not None:
            await asyncio.to_thread(self._prep.shutdown, True, cancel_futures=True)
        self._reject_inbox(ShuttingDown("the server is shutting down"))  # put there after the worker left
        self._thread = None

    def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    def submit(self, request: GenerationRequest) -> Generation:
        if self._dead:
            raise EngineUnavailable("the generation engine has stopped; this server must be restarted")
        if request.mix is not None and request.experts is None:  # the set it is over is the one served now
            request = dataclasses.replace(request, experts=tuple(self.experts))
        check_submit(request, self._thread is not None and self._loop is not None and not self._stopping,
                     self._inflight, self.max_batch, self.max_queue, self.experts)
        gen = Generation(self._loop, on_cancel=self._request_cancel, on_done=self._done)
        self._inflight += 1
        self._prep.submit(self._prepare, gen, request)  # type: ignore[union-attr]
        return gen

    def stats(self) -> BackendStats:
        running = sum(ep.engine.counts().running for ep in list(self._epochs))
        return BackendStats(queued=max(0, self._inflight - running), running=running, inflight=self._inflight)

    def _request_cancel(self, gen: Generation) -> None:
        self._inbox.put(("cancel", gen))
        self._wake.set()

    def _done(self, gen: Generation) -> None:
        self._inflight -= 1

    # ---- tokenizer thread ------------------------------------------------------------------------------------

    def _prepare(self, gen: Generation, r: GenerationRequest) -> None:
        """Tokenize and check one request, then hand it to the worker (or refuse it)."""
        try:
            if gen.cancelled:
                self._post(gen.finish, Finished("", "cancelled", 0, 0))
                return
            ids, admission = self.encoder.admit(r.prompt, r.max_tokens, r.tools)
            params = engine_sampling(SamplingParams, r, max_new_tokens=admission.max_tokens, stop=r.stop,
                                     logit_bias=r.logit_bias)
            constraint = None
            if r.structured is not None:
                try:
                    constraint = self._structured.constraint(r.structured)
                except ValueError as e:
                    raise PromptError(f"the structured output cannot be compiled: {e}",
                                      param="response_format", code="invalid_structured_output") from None
            weights = None  # column name -> weight; the worker lays it out over the engine's columns
            if r.static is not None:  # the static merge's own column at weight 1, nothing else
                weights = {r.static: 1.0}
            elif r.mix is not None:
                mix = torch.tensor(r.mix, dtype=torch.float32)  # [N]
                if not bool(torch.isfinite(mix).all()) or not math.isfinite(float(mix.sum())):
                    raise PromptError("routing weights overflow float32", param="routing")
                weights = {e: w for e, w in zip(r.experts, mix.tolist(), strict=True) if w != 0}
        except PromptError as e:
            self._post(gen.reject, e)
            return
        except Exception:  # noqa: BLE001 - one request's failure must not reach another
            log.exception("preparing a request failed")
            self._post(gen.reject, BackendFailure("preparing the request failed"))
            return
        if self._stopping or self._dead:
            self._post(gen.reject, ShuttingDown("the server is shutting down"))
            return
        self._inbox.put(("add", gen, ids, params, weights, admission, r.deadline, constraint))
        self._wake.set()

    # ---- worker side -----------------------------------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:  # noqa: BLE001 - reported, then every waiting request is told
            log.critical("the engine thread stopped; this server can no longer generate", exc_info=True)
        finally:
            if not self._stopping:
                self._dead = True
                err = EngineUnavailable("the generation engine has stopped; this server must be restarted")
                self._fail_engine(err)
                self._reject_inbox(err)

    def _serve(self) -> None:
        while True:
            self._wake.clear()
            self._drain()
            if self._stopping:
                self._fail_all(ShuttingDown("the server is shutting down"))
                return
            self._epochs = [ep for ep in self._epochs if ep is self._current or ep.engine.busy]  # drained: let go
            busy = [ep for ep in self._epochs if ep.engine.busy]
            if not busy:
                self._wake.wait()
                continue
            for ep in busy:
                try:
                    finished = ep.engine.step()
                except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                    self._step_failed(ep, e)
                    continue
                for req in finished:
                    self._finish(ep, req)

    def _step_failed(self, ep: _Epoch, e: Exception) -> None:
        """A step raised and no row explains it: fail this engine's rows, rebuild it (an engine of an earlier
        expert set is let go instead); give up if steps keep failing."""
        log.exception("engine step failed; failing its requests and rebuilding the engine")
        self._fail_epoch(ep, BackendFailure(f"the generation step failed ({type(e).__name__})"))
        if ep is not self._current:
            return  # empty now: the loop lets it go
        now = time.monotonic()
        self._failures.append(now)
        if len(self._failures) == MAX_STEP_FAILURES and now - self._failures[0] < STEP_FAILURE_WINDOW_S:
            raise RuntimeError(f"{MAX_STEP_FAILURES} engine steps failed within {STEP_FAILURE_WINDOW_S:.0f} s")
        ep.engine = Engine(ep.tm, **self._engine_kw)
        self.engine_rebuilds += 1

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "epoch":
                self._install(item[1])
                self._post(_settle, item[2], None)
                continue
            try:
                if item[0] == "add":
                    self._admit(*item[1:])
                else:
                    self._cancel(item[1])
            except Exception:  # noqa: BLE001 - fails that request alone
                log.exception("admitting or cancelling a request failed")
                gen = item[1]
                req = gen.handle
                if isinstance(req, Request):
                    for ep in self._epochs:
                        ep.gens.pop(id(req), None)
                self._post(gen.fail, BackendFailure("admitting the request failed"))

    def _mix(self, tm: TwinModel, weights: Mapping[str, float] | None) -> torch.Tensor | None:
        """The mix row [columns] of `weights` (column name -> weight) on `tm`; ExpertGone for a column it lacks."""
        if weights is None:
            return None
        mix = torch.zeros(len(tm.columns))
        for name, w in weights.items():
            if name not in tm.columns:
                kind = "static merge" if name.startswith("static:") else "expert"
                raise ExpertGone(f"the {kind} {name!r} is no longer served (removed from the artifact); served: "
                                 f"{', '.join(tm.columns)}")
            mix[tm.columns.index(name)] = w
        return mix

    def _admit(self, gen: Generation, ids: list[int], params: SamplingParams, weights: Mapping[str, float] | None,
               admission: Admission, deadline: float | None, constraint: Any) -> None:
        if gen.cancelled:
            self._post(gen.finish, Finished("", "cancelled", 0, 0))
            return
        ep = self._current
        try:
            mix = self._mix(ep.tm, weights)
        except ExpertGone as e:
            self._post(gen.reject, e)
            return
        opened = [False]

        def on_token(req: Request, text: str) -> None:
            """A delta with the logprobs of the tokens it covers; the first also with the prompt's."""
            lps = tuple(req.take_logprobs()) if req.params.logprobs is not None else ()
            prompt = None
            if not opened[0] and req.params.prompt_logprobs is not None:
                prompt = tuple(req.prompt_logprobs)
            opened[0] = True
            self._post(gen.push, Delta(text, lps, prompt, req.completion_tokens))

        try:
            req = ep.engine.add(ids, mix, params, on_token=on_token, deadline=deadline, constraint=constraint)
        except ValueError as e:  # what the model cannot take (token ids, logit_bias ids beyond its vocabulary)
            self._post(gen.reject, PromptError(str(e)))
            return
        gen.handle = req
        ep.gens[id(req)] = gen
        self._post(gen.admit, admission)

    def _cancel(self, gen: Generation) -> None:
        req = gen.handle
        ep = next((ep for ep in self._epochs if isinstance(req, Request) and id(req) in ep.gens), None)
        if ep is None:
            return  # rejected, or already finished
        if ep.engine.cancel(req):  # it was still waiting: it left the queue now, no step will return it
            self._finish(ep, req)

    def _finish(self, ep: _Epoch, req: Request) -> None:
        gen = ep.gens.pop(id(req), None)
        if gen is None:
            return
        if req.error is not None:
            self._post(gen.fail, row_error(req.error))
            return
        self._post(gen.finish, Finished(req.text, req.finish_reason or "stop", req.prompt_tokens,
                                        req.completion_tokens, tuple(req.output_ids), tuple(req.logprobs),
                                        tuple(req.prompt_logprobs), tuple(req.prompt_ids)))

    def _fail_epoch(self, ep: _Epoch, error: BackendError) -> None:
        """Fail every request one engine holds (running or waiting); the inbox is left for the next engine.

        Every admitted handle fails, even one a failed step left outside the engine's queue and batch."""
        for gen in ep.gens.values():
            self._post(gen.fail, error)
        ep.gens.clear()
        ep.engine.abort(str(error))

    def _fail_engine(self, error: BackendError) -> None:
        """Fail every request of every engine."""
        for ep in self._epochs:
            self._fail_epoch(ep, error)

    def _reject_inbox(self, error: BackendError) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                self._post(item[1].reject, error)
            elif item[0] == "epoch":  # an expert update the worker will not install
                self._post(_settle, item[2], error)

    def _fail_all(self, error: BackendError) -> None:
        """Shutting down: fail the engine's requests and refuse those not yet admitted."""
        self._fail_engine(error)
        self._reject_inbox(error)
