"""What every generation backend shares: the interface the server drives, the loop-side handle of one
generation, and admission (the checks of `submit`, the prompt's tokens and budget, the sampling parameters).

    backend = LocalBackend(...)            # or VLLMBackend(...): the same interface
    await backend.start()
    gen = backend.submit(GenerationRequest(prompt, mix, max_tokens, temperature, top_p, stop, seed))
    admission = await gen.admitted()       # prompt tokenized and accepted, or PromptError
    async for delta in gen: ...            # text deltas as they are produced (stop strings held back)
    gen.result                             # Finished(text, finish_reason, prompt_tokens, completion_tokens)
    gen.cancel()                           # the client went away: free the row
    await backend.stop()

A backend owns tokenization (it is the only one that knows the prompt's token count) and the mixed model;
routing, arms and the HTTP protocol are not its business. `submit` raises QueueFull when the backend holds
`max_batch + max_queue` unfinished generations. Producers may live on another thread: every producer
method of `Generation` (`admit`, `reject`, `push`, `finish`, `fail`) is called on the event loop thread,
e.g. through `loop.call_soon_threadsafe`.

Admission, the same on every backend, so that a request is the same tokens and sampling everywhere:

    check_capacity(max_batch, max_queue)              # a backend's limits, when it is built
    check_submit(request, running, inflight, ...)     # first in `submit`: running, room, the mix's length
    ids, admission = encoder.admit(prompt, max_tokens)   # tokens, context checked, the completion budget
    params = engine_sampling(EngineParams, request, max_tokens=admission.max_tokens, ...)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twinrt.runtime.engine import encode_prompt

if TYPE_CHECKING:
    from twinrt.runtime.request import TokenLogprob
    from twinrt.runtime.structured import StructuredSpec

Message = Mapping[str, Any]
Prompt = str | tuple[Message, ...] | tuple[int, ...]
SEED_MASK = 2**64 - 1  # engines take a seed as an unsigned 64-bit integer; requests may give any 64-bit one
T = TypeVar("T")


class BackendError(Exception):
    """Base of the errors a backend reports for a request."""


class QueueFull(BackendError):
    """The backend holds as many unfinished generations as it may; retry later (HTTP 429)."""


class PromptError(BackendError):
    """The prompt or its token budget does not fit the model (HTTP 400). `param` names the request field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class BackendFailure(BackendError):
    """The backend failed while running a generation (a bug or a device error: HTTP 500). The message is for
    the server's log; clients get an error id, not this text."""


class ExpertGone(BackendError):
    """The request gives weight to an expert (or asks for a static merge) the backend no longer serves: it was
    removed while the request was on its way (HTTP 404, code model_not_found)."""


class ShuttingDown(BackendError):
    """The server is draining or stopping: the generation could not finish (HTTP 503 with Retry-After)."""


class EngineUnavailable(BackendError):
    """The backend's engine has stopped and cannot serve (HTTP 503); `healthy()` is False from then on."""


@dataclass(frozen=True)
class GenerationRequest:
    """One completion to produce. `prompt`: text, chat messages, or token ids (taken as they are). `mix`: one
    weight per expert in the backend's `experts` order (or in `experts`' order, the names the request was routed
    over, when the set may have changed since), or None for the shared core alone. `max_tokens`: None =
    up to the end of the context; 0 = no completion (the prompt is scored: `prompt_logprobs`).

    The sampling fields have vLLM's semantics (twinrt.runtime.request.SamplingParams states them); `logprobs`
    and `prompt_logprobs` ask for that many top alternatives per generated / prompt token (0: the token's own
    logprob only; None: none). `structured`: a decode-time constraint on the completion. `tools`: passed to
    the chat template with chat prompts (OpenAI's function format)."""

    prompt: Prompt
    mix: tuple[float, ...] | None
    max_tokens: int | None
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # an end-of-sequence token does not finish the completion (vLLM's ignore_eos)
    deadline: float | None = None  # time.perf_counter() past which the server gives up on it; a backend may
    #                                schedule by it (the local one does, for long prompts)
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    structured: StructuredSpec | None = None
    tools: tuple[dict[str, Any], ...] | None = None
    static: str | None = None  # "static:<label>": a static merge of the backend's `statics` serves it (mix None)
    experts: tuple[str, ...] | None = None  # the experts `mix` is over (None: the backend's, as they are now)


# the GenerationRequest fields every engine takes under the same name (engine_sampling passes them on)
SAMPLING_FIELDS = ("temperature", "top_p", "ignore_eos", "top_k", "min_p", "min_tokens", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "stop_token_ids", "include_stop_str_in_output",
                   "logprobs", "prompt_logprobs")


@dataclass(frozen=True)
class Admission:
    prompt_tokens: int
    max_tokens: int  # the budget the backend will honour (the request's, or what the context leaves)
    prompt_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Delta:
    """What one step of a generation adds: text, and the logprobs of the tokens it covers (when asked for). A
    generation's first delta also carries the prompt's logprobs, when asked for."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    tokens: int = 0  # the completion's tokens so far (vLLM's continuous usage stats)


@dataclass(frozen=True)
class Finished:
    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...] = ()  # the completion's tokens (what backends are compared on)
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of token_ids, when asked for
    prompt_logprobs: tuple[TokenLogprob | None, ...] = ()  # one per prompt token ([0] None), when asked for
    prompt_ids: tuple[int, ...] = ()


_END = object()


class Generation:
    """Loop-side handle of one generation: an admission future, a queue of text deltas, a final result."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[Generation], None],
                 on_done: Callable[[Generation], None] | None = None) -> None:
        self._loop = loop
        self._admission: asyncio.Future[Admission] = loop.create_future()
        self._deltas: asyncio.Queue[object] = asyncio.Queue()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._on_cancel = on_cancel
        self._on_done = on_done
        self.result: Finished | None = None
        self.error: BackendError | None = None
        self.cancelled = False
        self.handle: object = None  # the backend's own request object

    # ---- producer side (event loop thread) -------------------------------------------------------------------

    def admit(self, admission: Admission) -> None:
        if not self._admission.done():
            self._admission.set_result(admission)

    def reject(self, error: BackendError) -> None:
        """Refuse before any token: `admitted()` raises `error`."""
        self.error = error
        if not self._admission.done():
            self._admission.set_exception(error)
        self._close()

    def push(self, delta: Delta) -> None:
        if delta.text or delta.logprobs or delta.prompt_logprobs is not None:
            self._deltas.put_nowait(delta)

    def finish(self, result: Finished) -> None:
        self.result = result
        self._close()

    def fail(self, error: BackendError) -> None:
        """A failure after admission: iteration raises `error`."""
        self.error = error
        if not self._admission.done():
            self._admission.set_exception(error)
        self._close()

    def _close(self) -> None:
        self._deltas.put_nowait(_END)
        if not self._closed.done():
            self._closed.set_result(None)
        if self._on_done is not None:
            done, self._on_done = self._on_done, None
            done(self)

    # ---- consumer side ---------------------------------------------------------------------------------------

    async def admitted(self) -> Admission:
        return await asyncio.shield(self._admission)

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Delta:
        item = await self._deltas.get()
        if item is _END:
            self._deltas.put_nowait(_END)  # later iterations end too
            if self.error is not None and self.result is None:
                raise self.error
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def wait(self) -> Finished:
        """All deltas consumed; the final result (raises the backend's error)."""
        async for _ in self:
            pass
        assert self.result is not None
        return self.result

    async def closed(self) -> None:
        """Wait until the generation finished, failed or was rejected (without consuming its deltas)."""
        await asyncio.shield(self._closed)

    def cancel(self) -> None:
        """Free the row (idempotent; no effect once finished)."""
        if not self.cancelled and self.result is None and self.error is None:
            self.cancelled = True
            self._on_cancel(self)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


def check_capacity(max_batch: int, max_queue: int) -> None:
    """What every backend's constructor checks: room for one running row, and a queue that is not negative."""
    if max_batch < 1 or max_queue < 0:
        raise ValueError("max_batch must be >= 1 and max_queue >= 0")


def check_submit(request: GenerationRequest, running: bool, inflight: int, max_batch: int, max_queue: int,
                 experts: Sequence[str]) -> None:
    """What every backend's `submit` checks first: it runs, it has room, the mix fits the experts it names (the
    backend's, unless the request names them)."""
    if not running:
        raise ShuttingDown("the server is not accepting requests (stopping or stopped); retry later")
    if inflight >= max_batch + max_queue:
        raise QueueFull(f"the server is at capacity ({max_batch} running + {max_queue} queued requests); retry later")
    n_experts = len(request.experts if request.experts is not None else experts)
    if request.mix is not None and len(request.mix) != n_experts:
        raise ValueError(f"mix has {len(request.mix)} weights for {n_experts} experts")
    if request.static is not None and request.mix is not None:
        raise ValueError("a static merge serves a request without a mix")


def mix_over(request: GenerationRequest, experts: Sequence[str]) -> tuple[float, ...] | None:
    """The request's mix laid out over `experts` (the backend's now), by name: the request was routed over
    `request.experts`, which an expert update may have changed since. ExpertGone if it gives weight to an
    expert `experts` lacks."""
    if request.mix is None or request.experts is None or tuple(request.experts) == tuple(experts):
        return request.mix
    weights = {e: w for e, w in zip(request.experts, request.mix) if w != 0}
    gone = [e for e in weights if e not in experts]
    if gone:
        raise ExpertGone(f"the expert {gone[0]!r} is no longer served (removed from the artifact); served: "
                         f"{', '.join(experts)}")
    return tuple(weights.get(e, 0.0) for e in experts)


def engine_sampling(make: Callable[..., T], request: GenerationRequest, **engine_fields: Any) -> T:
    """An engine's sampling parameters for a request, every backend the same way:

        make(**{f: getattr(request, f) for f in SAMPLING_FIELDS},
             seed=None if request.seed is None else request.seed & SEED_MASK, **engine_fields)

    `engine_fields`: what each engine names or shapes its own way (the token budget, the stop strings, the
    logit bias). A value the engine refuses (ValueError) is the request's PromptError."""
    seed = None if request.seed is None else request.seed & SEED_MASK
    try:
        return make(**{f: getattr(request, f) for f in SAMPLING_FIELDS}, seed=seed, **engine_fields)
    except ValueError as e:
        raise PromptError(str(e)) from None


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


def is_token_ids(prompt: Prompt) -> bool:
    return isinstance(prompt, tuple) and all(isinstance(t, int) for t in prompt)


def prompt_bytes(prompt: Prompt) -> int:
    """UTF-8 bytes of a prompt's text (chat: the messages' contents; token ids: 0)."""
    if is_token_ids(prompt):
        return 0
    texts = [prompt] if isinstance(prompt, str) else [str(m.get("content") or "") for m in prompt]  # type: ignore[union-attr]
    return sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)


def chat_ids(tokenizer: Any, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]] | None) -> list[int]:
    """Chat messages through the chat template with a generation prompt, `tools` passed to it (OpenAI's function
    format); without tools exactly `encode_prompt`'s rule."""
    if not tools:
        return encode_prompt(tokenizer, list(messages))
    text = tokenizer.apply_chat_template(list(messages), tools=list(tools), tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class PromptEncoder:
    """A backend's admission of a prompt: its token ids, checked against the context, or a PromptError.

    Every backend encodes the same way (`twinrt.runtime.engine.encode_prompt`, `chat_ids` with tools), so the
    same request is the same tokens on each; token ids are taken as they are, each checked against the
    vocabulary. A prompt too long for the context by its byte count alone is refused without tokenizing it:
    each token covers at most `max_token_bytes` bytes of text (the longest token in the vocabulary), so a
    prompt of more than context × max_token_bytes bytes cannot fit (a tokenizer that normalizes text may
    shrink it first; for those the bound is doubled).
    """

    def __init__(self, tokenizer: Any, context: int) -> None:
        self.tokenizer = tokenizer
        self.context = context
        self.vocab = len(tokenizer)
        self._max_bytes: int | None = None

    def max_prompt_bytes(self) -> int:
        if self._max_bytes is None:
            tok = self.tokenizer
            longest = max((len(tok.convert_tokens_to_string([t]).encode("utf-8", "replace"))
                           for t in tok.get_vocab()), default=1)
            backend = getattr(tok, "backend_tokenizer", None)
            shrinks = backend is None or backend.normalizer is not None
            self._max_bytes = self.context * max(longest, 1) * (2 if shrinks else 1)
        return self._max_bytes

    def encode(self, prompt: Prompt, max_tokens: int | None,
               tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        if is_token_ids(prompt):
            ids = list(prompt)  # type: ignore[arg-type]
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if not ids or bad is not None:
                raise PromptError(f"token id {bad} is out of the vocabulary (0..{self.vocab - 1})" if ids else
                                  "prompt is empty (no tokens)", param="prompt")
        else:
            size = prompt_bytes(prompt)
            if size > self.max_prompt_bytes():
                raise PromptError(f"This model's maximum context length is {self.context} tokens, and the "
                                  f"prompt's {size} bytes of text are more tokens than that.", param="prompt",
                                  code="context_length_exceeded")
            try:
                ids = (encode_prompt(self.tokenizer, prompt) if isinstance(prompt, str)
                       else chat_ids(self.tokenizer, prompt, tools))  # type: ignore[arg-type]
            except (ValueError, TypeError, UnicodeError) as e:
                raise PromptError(f"the prompt cannot be tokenized: {e}", param="prompt") from None
        err = context_error(len(ids), max_tokens, self.context)
        if err is not None:
            raise err
        return ids

    def admit(self, prompt: Prompt, max_tokens: int | None,
              tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[int], Admission]:
        """`encode`, and the admission: the prompt's tokens and the completion budget (`max_tokens`, or None:
        what the context leaves)."""
        ids = self.encode(prompt, max_tokens, tools)
        budget = max_tokens if max_tokens is not None else self.context - len(ids)
        return ids, Admission(prompt_tokens=len(ids), max_tokens=budget, prompt_ids=tuple(ids))


@dataclass(frozen=True)
class BackendStats:
    queued: int   # accepted, waiting for a batch slot
    running: int  # rows in the running batch
    inflight: int  # all unfinished generations


class Backend(Protocol):
    """The interface the server drives (serving/backends/local.py: the twinrt Engine; vllm_backend.py: vLLM)."""

    name: str
    experts: Sequence[str]
    statics: Sequence[str]  # the static-merge arms it serves ("static:<label>"; GenerationRequest.static)
    context: int
    max_batch: int
    max_queue: int
    encoder: PromptEncoder  # its tokenizer is the one requests are encoded with (/tokenize, logprobs' text)

    async def start(self) -> None: ...

    async def stop(self) -> None:
        """Stop serving: every unfinished generation fails with ShuttingDown."""
        ...

    def healthy(self) -> bool:
        """True while the backend can serve requests (its engine is alive)."""
        ...

    def submit(self, request: GenerationRequest) -> Generation: ...

    def stats(self) -> BackendStats: ...
