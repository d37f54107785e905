"""The local backend: twinrt's continuous-batching Engine, driven by one worker thread.

    event loop thread                            worker thread (owns the Engine and its tokenizer)
    submit(req) ── inbox ("add", gen, req) ──▶   encode, check the context, engine.add(...) ─▶ gen.admit
    gen.cancel() ─ inbox ("cancel", gen) ───▶    drop it from the waiting queue, or engine.cancel(row)
                                                 engine.step(): one token for every running row and the
    gen.push(delta) ◀── call_soon_threadsafe ──  on_token callbacks; finished rows ─▶ gen.finish(...)

Requests join the running batch between decode steps, each with its own mix row, whatever its arm. The
worker sleeps on an Event when the engine is idle. If a step raises (a bug or a device error), every
generation the engine holds fails with BackendFailure and the engine is rebuilt empty; requests not yet
admitted go to the new engine, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from serving.backends.base import (Admission, BackendFailure, BackendStats, Finished, Generation, GenerationRequest,
                                   PromptError, check_submit)
from twinrt.runtime import Engine, Request, SamplingParams, TwinModel

log = logging.getLogger(__name__)
SEED_MASK = 2**64 - 1


def context_error(prompt_tokens: int, max_tokens: int | None, context: int) -> PromptError | None:
    """The error for a prompt (+ completion budget) that does not fit `context` tokens, else None."""
    if prompt_tokens >= context:
        return PromptError(f"This model's maximum context length is {context} tokens, and the prompt has "
                           f"{prompt_tokens} tokens (at most {context - 1} leave room for one completion token).",
                           param="prompt", code="context_length_exceeded")
    if max_tokens is not None and prompt_tokens + max_tokens > context:
        return PromptError(f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for "
                           f"the completion). Reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded")
    return None


class LocalBackend:
    """Backend over a TwinModel in this process (see the module docstring)."""

    name = "local"

    def __init__(self, tm: TwinModel, max_batch: int = 32, max_queue: int = 256, materialize: bool = True) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.tm = tm
        self.experts = list(tm.experts)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.materialize = materialize
        self.engine = Engine(tm, max_batch=max_batch, materialize=materialize)
        self.context = self.engine.context
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._inflight = 0  # loop thread only
        self._gens: dict[int, Generation] = {}  # worker thread only: engine request id -> handle

    @classmethod
    def from_artifact(cls, path: str | Path, *, device: str = "cpu", dtype: str = "float32", max_batch: int = 32,
                      max_queue: int = 256, materialize: bool = True) -> LocalBackend:
        return cls(TwinModel.from_artifact(path, device=device, dtype=dtype), max_batch, max_queue, materialize)

    # ---- loop side -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="twinrt-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    def submit(self, request: GenerationRequest) -> Generation:
        check_submit(request, self._thread is not None and self._loop is not None and not self._stopping,
                     self._inflight, self.max_batch, self.max_queue, len(self.experts))
        gen = Generation(self._loop, on_cancel=self._request_cancel, on_done=self._done)
        self._inflight += 1
        self._inbox.put(("add", gen, request))
        self._wake.set()
        return gen

    def stats(self) -> BackendStats:
        running = len(self.engine.running)
        return BackendStats(queued=max(0, self._inflight - running), running=running, inflight=self._inflight)

    def _request_cancel(self, gen: Generation) -> None:
        self._inbox.put(("cancel", gen))
        self._wake.set()

    def _done(self, gen: Generation) -> None:
        self._inflight -= 1

    # ---- worker side -----------------------------------------------------------------------------------------

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)  # type: ignore[union-attr]
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        while True:
            self._wake.clear()
            self._drain()
            if self._stopping:
                self._fail_all(BackendFailure("the server is shutting down"))
                return
            if not self.engine.busy:
                self._wake.wait()
                continue
            try:
                finished = self.engine.step()
            except Exception as e:  # noqa: BLE001 - a failed step must not kill the server
                log.exception("engine step failed; failing its requests and resetting the engine")
                self._fail_engine(BackendFailure(f"generation failed: {type(e).__name__}: {e}"))
                self.engine = Engine(self.tm, max_batch=self.max_batch, materialize=self.materialize)
                continue
            for req in finished:
                self._finish(req)

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                self._admit(item[1], item[2])
            else:
                self._cancel(item[1])

    def _admit(self, gen: Generation, r: GenerationRequest) -> None:
        if gen.cancelled:
            self._post(gen.finish, Finished("", "cancelled", 0, 0))
            return
        try:
            ids = self.engine.encode(list(r.prompt) if isinstance(r.prompt, tuple) else r.prompt)
        except ValueError as e:
            self._post(gen.reject, PromptError(str(e), param="prompt"))
            return
        err = context_error(len(ids), r.max_tokens, self.context)
        if err is not None:
            self._post(gen.reject, err)
            return
        max_tokens = r.max_tokens if r.max_tokens is not None else self.context - len(ids)
        try:
            params = SamplingParams(max_new_tokens=max_tokens, temperature=r.temperature, top_p=r.top_p,
                                    stop=r.stop, seed=None if r.seed is None else r.seed & SEED_MASK,
                                    ignore_eos=r.ignore_eos)
        except ValueError as e:
            self._post(gen.reject, PromptError(str(e)))
            return
        mix = None if r.mix is None else torch.tensor(r.mix, dtype=torch.float32)  # [N]
        req = self.engine.add(ids, mix, params, on_token=lambda _req, delta: self._post(gen.push, delta))
        gen.handle = req
        self._gens[req.id] = gen
        self._post(gen.admit, Admission(prompt_tokens=len(ids), max_tokens=max_tokens))

    def _cancel(self, gen: Generation) -> None:
        req = gen.handle
        if not isinstance(req, Request) or req.id not in self._gens:
            return  # rejected, or already finished
        if req in self.engine.waiting:
            self.engine.waiting.remove(req)
            req.finish_reason = "cancelled"
            self._finish(req)
        else:
            self.engine.cancel(req)

    def _finish(self, req: Request) -> None:
        gen = self._gens.pop(req.id, None)
        if gen is not None:
            self._post(gen.finish, Finished(req.text, req.finish_reason or "stop", req.prompt_tokens,
                                            req.completion_tokens, tuple(req.output_ids)))

    def _fail_engine(self, error: BackendFailure) -> None:
        """Fail every request the engine holds (running or waiting); the inbox is left for the next engine."""
        for gen in self._gens.values():
            self._post(gen.fail, error)
        self._gens.clear()
        self.engine.waiting.clear()

    def _fail_all(self, error: BackendFailure) -> None:
        """Shutting down: fail the engine's requests and refuse those not yet admitted."""
        self._fail_engine(error)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                self._post(item[1].reject, error)
