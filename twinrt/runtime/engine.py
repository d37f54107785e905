"""Batched generation with continuous batching: requests join and leave a running batch between decode steps.

One `Engine.step()` runs, with `max_step_tokens` (in token-equivalents, see `prefill_cost`) deciding which
prompts go whole:

    1. one decode token for every running row (each row with its own mix), in one forward;
    2. waiting prompts that fit the rest of the budget whole, prefilled together (left-padded) and joined to
       the running batch;
    3. the next chunk of one long prompt, prefilled into its own cache, inside the decode pass of step 1 when
       the model allows (`packed`), else as a pass of its own; when its last chunk is in, it samples its first
       token and joins the running batch. How large a chunk is and how often one runs: see `Engine`.

Finished rows (EOS, a stop token or string, max_new_tokens, the context length, a finished constraint, a cancel,
or an error) leave the batch at once. A row fails alone (finish_reason "error", `Request.error` says why): its
logits are not finite, its constraint, sampling, decoding or callback raised, or a batched forward raised and
bisection pinned it on that row; the others go on as if it had never been there. The engine is single-threaded;
a server drives `step()` from one worker thread.

How a row picks its token (`SamplingParams`, vLLM's rules): rows whose parameters leave the logits as they are
take one batched argmax, or sample from their raw logits; the others go through `logits.process` (logit_bias,
min_tokens, the constraint's mask, penalties) together first. Every sampled row draws from its own generator,
so its tokens do not depend on its batch-mates. Logprobs (`logprobs`, `prompt_logprobs`) are log_softmax of the
raw float32 logits of the row's own mix.

The engine owns its queue and batch: callers `add`, `cancel` and `abort` requests and read `waiting`,
`running`, `prefilling` and `counts()`. What it needs from the model it drives is `runner.Runner`; its cost
rule is in `token_cost`, what a request is in `request`, how a row picks its tokens and what its text
becomes in `tokens`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from twinrt.runtime import cache_ops
from twinrt.runtime import logits as processing
from twinrt.runtime import packed as packing
from twinrt.runtime.constraint import TokenConstraint
from twinrt.runtime.request import (
    Prompt,
    Request,
    RowFailure,
    SamplingParams,
    TokenCallback,
    TokenLogprob,
    encode_prompt,
    end_ids,
)
from twinrt.runtime.runner import Runner
from twinrt.runtime.sampling import is_greedy
from twinrt.runtime.token_cost import attention_share, chunk_tokens, prefill_cost
from twinrt.runtime.tokens import Tokens, fail, fail_not_finite, final_callback
from twinrt.runtime.transfer import to_device

log = logging.getLogger(__name__)

DEFAULT_STEP_TOKENS = 64  # see Engine and README (serving benchmarks): what it costs, what it buys
DEFAULT_IDLE_GROWTH = 16
DEFAULT_CHUNK_SHARE = 0.5
DEFAULT_CHUNK_SPAN = 1.0
DEADLINE_MARGIN = 1.5  # a long prompt is behind when, at its pace so far, it would need this x the time left
MAX_SHARE = 100.0  # the most a long prompt behind its deadline takes: chunks nearly all the time
BOOST_STEP = 1.25  # its share's factor grows by this each step it is behind, and shrinks so while it is not
SCORE_BLOCK = 2**25  # prompt_logprobs: the most logits kept at once (floats: 128 MiB in float32, and about as
#                      much again while they are scored)


@dataclass(frozen=True)
class Counts:
    """A snapshot of an engine's requests: queued, the long prompt being prefilled (0 or 1), decoding."""

    waiting: int
    prefilling: int
    running: int


@dataclass(eq=False)
class _Partial:
    """A long prompt being prefilled chunk by chunk: prompt_ids[:done] are in `cache` ([1, H, done, D])."""

    req: Request
    cache: DynamicCache
    done: int = 0
    s_per_cost: float | None = None  # wall seconds per token-equivalent of its last chunk (separate passes), or
    #                                  of its recent chunks beyond the decode pass (packed: decayed sums below)
    packed_s: float = 0.0
    packed_cost: float = 0.0
    started: float = 0.0  # time.perf_counter() when it became the long prompt
    boost: float = 1.0  # its share's factor while it is behind its deadline


def _prompt_entries(r: Request, logits: torch.Tensor, first: int) -> list[TokenLogprob] | None:
    """logits: [m, V], those after prompt_ids[first - 1], prompt_ids[first], ... -> the TokenLogprobs of
    prompt_ids[first:first + m] (logits past the prompt's end are left out); None if one is not finite."""
    m = min(logits.shape[0], r.prompt_tokens - first)
    if m <= 0:
        return []
    rows = logits[:m]
    if not bool(torch.isfinite(rows).all()):
        return None
    return processing.entries(rows, torch.tensor(r.prompt_ids[first:first + m]), [r.params.prompt_logprobs] * m)


def culprits(n: int, probe: Callable[[list[int]], object]) -> list[tuple[int, Exception]]:
    """The rows of an n-row forward that raise on their own, by bisection: `probe(rows)` runs the forward on
    just those rows. A group that runs clean holds no culprit; a failing group is split until single rows."""
    found: list[tuple[int, Exception]] = []

    def visit(rows: list[int]) -> None:
        try:
            probe(rows)
        except Exception as e:  # noqa: BLE001 - any failure of a row is that row's
            if len(rows) == 1:
                found.append((rows[0], e))
            else:
                visit(rows[: len(rows) // 2])
                visit(rows[len(rows) // 2:])

    visit(list(range(n)))
    return found


class Engine:
    """Continuous-batching generation over a TwinModel (or any `Runner`).

    `max_step_tokens`: what one step may spend, in token-equivalents (`prefill_cost`: a token at context p
    costs 1 + a·p, `a` from `attention_share`): decode tokens first, then whole waiting prompts (a padded
    group of k prompts of width W costs k · prefill_cost(0, W)). A prompt that does not fit becomes the long
    prompt: it is prefilled in chunks (sized by `chunk_tokens`) into its own cache, so its attention scores
    stay [heads, chunk, L], never [heads, L, L], and joins the batch when it is all in.

    Where its chunks run. With `packed` (the default, where the model allows: `packed.supported`) a chunk
    rides in the running rows' decode pass, every token a row of its own (see `packed`), so it costs its own
    tokens and no extra pass over the weights; otherwise it is a pass of its own, which on a CPU costs about
    a decode step whatever its length.

    When they run. While other rows run beside it (`chunk_share` set), the long prompt earns `chunk_share` ×
    the wall time of the other work as credit, and a chunk runs once the credit covers `chunk_span` × a
    typical other step (a moving average of their times), sized to take that long: from the seconds per
    token-equivalent its recent chunks took (in the decode pass: what they added to the rows' decode pass
    alone, timed per batch size), between `max_step_tokens / 8` and `idle_growth` × `max_step_tokens`.
    Credit left over is kept up to one chunk's worth. So the others lose at most about `chunk_share` of their
    time, any one of them about `chunk_span` steps per chunk, and the long prompt always advances; a larger
    span makes fewer, longer chunks (which a chunk in a pass of its own needs, to amortise the pass). With
    `chunk_share=None` a chunk runs every step on the budget the others left (at least `max_step_tokens / 8`).

    A long prompt with a `deadline` that its chunks would miss at `chunk_share` (its remaining
    token-equivalents at its measured rate, × DEADLINE_MARGIN, against the time left) takes what it needs
    instead, up to MAX_SHARE, its chunks as much longer: past fairness, a prompt the server will give up on is
    work lost for everyone.

    With nothing else to run the long prompt needs no fairness: each step it runs alone doubles its chunk's
    budget, up to `idle_growth` × `max_step_tokens`, and the first step with other work brings it back, so an
    arrival waits for at most one such chunk (large only after the engine has had nothing else to do for
    several steps). The defaults favour short requests' latency while a long prompt prefills, at the long
    prompt's expense (the README's serving benchmark measures both); a deployment that favours long prompts
    wants a larger share.

    Scoring (`prompt_logprobs`, with `max_new_tokens=0` to score only). The logits after every prompt position
    come from the same passes that fill the cache, so prompt logprobs are there on every path: a whole-prompt
    group (left-padded) runs in blocks of columns, a long prompt's chunk in a pass of its own or packed in the
    rows' decode pass keeps the logits of all its tokens. Memory stays bounded: at most SCORE_BLOCK logits exist
    at once (a group's block of columns is as narrow as that needs, down to one column, and a group has at most
    SCORE_BLOCK // V rows; a scored long prompt's chunks have at most SCORE_BLOCK // V tokens, beside the [B, V]
    of the decode pass they may ride in). Scoring requests batch in one prefill as any prompts do; with the
    default budget a group's block is all its columns, one pass.
    """

    def __init__(self, tm: Runner, max_batch: int = 64, materialize: bool = True,
                 max_step_tokens: int = DEFAULT_STEP_TOKENS, idle_growth: int = DEFAULT_IDLE_GROWTH,
                 chunk_share: float | None = DEFAULT_CHUNK_SHARE, chunk_span: float = DEFAULT_CHUNK_SPAN,
                 packed: bool = True) -> None:
        if not isinstance(max_step_tokens, int) or max_step_tokens < 1:
            raise ValueError(f"max_step_tokens must be an integer >= 1, got {max_step_tokens!r}")
        if not isinstance(idle_growth, int) or idle_growth < 1:
            raise ValueError(f"idle_growth must be an integer >= 1, got {idle_growth!r}")
        self.tm = tm
        self.max_batch = max_batch
        self.materialize = materialize
        self.max_step_tokens = max_step_tokens
        self.min_chunk_cost = max_step_tokens / 8
        self.idle_growth = idle_growth
        if chunk_share is not None and not chunk_share > 0:
            raise ValueError(f"chunk_share must be > 0 or None, got {chunk_share!r}")
        if not chunk_span > 0:
            raise ValueError(f"chunk_span must be > 0, got {chunk_span!r}")
        self.chunk_share = chunk_share
        self.chunk_span = chunk_span
        self._credit = 0.0  # seconds of chunks the long prompt may take: its share of the others' time, less chunks
        self._other_step_s: float | None = None  # moving average of a step's other work, while a prompt chunks
        self._alone = 1  # the chunk budget's factor while the long prompt runs alone (doubles per step)
        self._decode_s: dict[int, float] = {}  # batch size -> moving average of the rows' decode pass, seconds
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._partial: _Partial | None = None
        self._cache = None
        self._mask: torch.Tensor | None = None  # [B, L] attention mask of the running rows
        self._next: torch.Tensor | None = None  # [B] the token each running row feeds next
        self._ids = itertools.count()
        self.context = int(getattr(tm.config, "max_position_embeddings", 2048))
        self.attn = attention_share(tm.model, tm.config)
        self._joinable = cache_ops.joinable(DynamicCache(config=tm.config))
        self._pad = tm.tokenizer.pad_token_id or 0
        text = tm.config.get_text_config(decoder=True) if hasattr(tm.config, "get_text_config") else tm.config
        self.vocab = int(text.vocab_size)  # V: the width of the model's logits (may exceed the tokenizer's)
        self._score_rows = max(1, SCORE_BLOCK // self.vocab)  # scored rows (or chunk tokens) whose logits fit
        self.tokens = Tokens(tm.tokenizer, end_ids(tm.model.generation_config.eos_token_id, tm.tokenizer),
                             self.context, self.vocab, self._pad)
        self.packed = packed and packing.supported(tm.model, DynamicCache(config=tm.config))
        if self.packed:
            packing.enable(tm.model)

    @property
    def eos(self) -> set[int]:
        """The token ids that end a row (the generation config's and the tokenizer's end-of-sequence)."""
        return self.tokens.eos

    @eos.setter
    def eos(self, ids: set[int]) -> None:
        self.tokens.eos = set(ids)

    # ---- requests --------------------------------------------------------------------------------------------

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat messages go through the chat template with a generation prompt."""
        return encode_prompt(self.tm.tokenizer, prompt)

    def add(self, prompt: Prompt | list[int] | tuple[int, ...], mix: torch.Tensor | None, params: SamplingParams,
            on_token: TokenCallback | None = None, deadline: float | None = None,
            constraint: TokenConstraint | None = None) -> Request:
        """Queue a request; `prompt` is text, chat messages, or token ids (a list or tuple of ints); `mix` is a
        validated [N] row over the experts or [N + S] over every column (None or all zeros = core).
        `deadline`: the time.perf_counter() past which its caller
        gives up on it; a long prompt's chunks get more than `chunk_share` when they would otherwise miss it (see
        the class). `constraint`: what may come next at each step (see `constraint`). Raises ValueError for a
        prompt or token ids the model cannot take."""
        token_ids = isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt)
        ids = list(prompt) if token_ids else self.encode(prompt)
        if token_ids and not ids:
            raise ValueError("prompt is empty (no tokens)")
        if token_ids and not all(0 <= t < self.vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab}), got {min(ids)}..{max(ids)}")
        if len(ids) >= self.context:
            raise ValueError(f"prompt has {len(ids)} tokens; the context length is {self.context}")
        if any(t >= self.vocab for t, _ in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be < {self.vocab} (the model's vocabulary)")
        gen = None
        if not is_greedy(params.temperature):
            gen = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        if mix is not None and mix.shape[0] < len(self.tm.columns):  # a row over the experts: no static merge
            mix = torch.cat([mix, mix.new_zeros(len(self.tm.columns) - mix.shape[0])])
        req = Request(next(self._ids), ids, None if mix is None or not bool(mix.any()) else mix, params, on_token,
                      generator=gen, deadline=deadline, constraint=constraint)
        self._waiting.append(req)
        return req

    def cancel(self, req: Request) -> bool:
        """Stop a request (a client went away).

        Still waiting: it leaves the queue now (finish_reason "cancelled", its final callback called) -> True;
        no step returns it. Prefilling or running: it leaves at the next step, which returns it -> False.
        """
        req.cancelled = True
        if req.done or req not in self._waiting:
            return False
        self._waiting.remove(req)
        req.finish_reason = "cancelled"
        final_callback(req)
        return True

    def abort(self, reason: str) -> list[Request]:
        """Drop every request the engine holds (waiting, prefilling, running), e.g. to shut down or to replace an
        engine whose step failed. Each not yet done finishes with finish_reason "error" and an internal
        `RowFailure(reason)`. -> those requests; no callback is called (the caller is tearing down)."""
        held = list(self._waiting) + ([] if self._partial is None else [self._partial.req]) + self._running
        failure = RowFailure(reason, client=False)
        for r in held:
            if not r.done:
                r.finish_reason, r.error = "error", failure
        self._waiting.clear()
        self._partial = None
        self._running = []
        self._cache = self._mask = self._next = None
        self._credit = 0.0
        self._other_step_s = None
        self._alone = 1
        return [r for r in held if r.error is failure]

    @property
    def waiting(self) -> tuple[Request, ...]:
        """The requests queued for a prefill, in arrival order."""
        return tuple(self._waiting)

    @property
    def running(self) -> tuple[Request, ...]:
        """The rows of the decode batch, in batch order."""
        return tuple(self._running)

    @property
    def prefilling(self) -> Request | None:
        """The long prompt being prefilled in chunks, if any (neither waiting nor running)."""
        return None if self._partial is None else self._partial.req

    def counts(self) -> Counts:
        """How many requests wait, prefill in chunks, and decode (for metrics; safe to read from another
        thread: each count is one read of a container the engine replaces or mutates atomically)."""
        return Counts(waiting=len(self._waiting), prefilling=int(self._partial is not None),
                      running=len(self._running))

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running or self._partial is not None)

    def run_until_done(self) -> None:
        while self.busy:
            self.step()

    # ---- the loop --------------------------------------------------------------------------------------------

    def step(self) -> list[Request]:
        """Decode one token for the running rows, then prefill within the step's budget (see the class).
        Returns the requests that finished, failed rows among them (finish_reason "error", `error` set).
        Raises only when a forward fails in a way no row can be blamed for."""
        finished: list[Request] = []
        t0 = time.perf_counter()
        budget = float(self.max_step_tokens)
        packs = self.packed and self._partial is not None and bool(self._running)
        if self._partial is not None:
            self._pace()
        chunk_s = 0.0  # what a chunk in the decode pass added to it
        if self._running:
            budget -= len(self._running) * prefill_cost(self._mask.shape[1], 1, self.attn)
            rows = len(self._running)
            chunk_budget = self._packed_budget(budget, rows) if packs else None
            if chunk_budget is not None:
                chunk_s = self._packed_decode(chunk_budget, finished)
            else:
                t = time.perf_counter()
                self._decode(finished)
                if packs:
                    old = self._decode_s.get(rows)
                    dt = time.perf_counter() - t
                    self._decode_s[rows] = dt if old is None else 0.8 * old + 0.2 * dt
        whole, budget = self._schedule(budget, finished)
        if whole:
            self._admit(whole, finished)
        if self._partial is not None and self._partial.req.cancelled:
            self._continue_prefill(0.0, finished)  # ends it
        if self._partial is not None:
            if packs:  # the chunk, if any, was in the decode pass; the rest of the step was other work
                self._account_chunk(time.perf_counter() - t0 - chunk_s, chunk_s)
            elif not (self.packed and self._running):
                self._chunk_step(budget, bool(self._running), time.perf_counter() - t0, finished)
        if self._partial is None:
            self._credit = 0.0
            self._other_step_s = None
            self._decode_s = {}
        done = [r for r in self._running if r.done]
        if done:
            self._remove_running(done)
        return finished + done

    def _chunk_step(self, budget: float, others: bool, other_s: float, finished: list[Request]) -> None:
        """Run the long prompt's chunk of this step, if its turn has come (see the class). `others`: rows ran
        beside it this step, taking `other_s` seconds; `budget`: what they left of `max_step_tokens`."""
        if not others:  # the long prompt is all there is to run (waiting prompts, if any, wait for it)
            chunk_budget = float(self.max_step_tokens * self._alone)
            self._alone = min(2 * self._alone, self.idle_growth)
        elif self.chunk_share is None:
            self._alone = 1
            chunk_budget = max(budget, self.min_chunk_cost)
        else:
            self._alone = 1
            due = self._credit_due(other_s)
            if due is None:
                return
            rate = self._partial.s_per_cost
            most = float(self.max_step_tokens * self.idle_growth)
            chunk_budget = (float(self.max_step_tokens) if rate is None
                            else min(max(due / rate, self.min_chunk_cost), most))
        p = self._partial
        t = time.perf_counter()
        cost = self._continue_prefill(chunk_budget, finished)
        spent = time.perf_counter() - t
        if cost > 0:
            p.s_per_cost = spent / cost
        if others:
            self._spend(spent)

    def _credit_due(self, other_s: float) -> float | None:
        """Count `other_s` seconds of other work; -> the time a chunk may take now, or None if its credit
        (its share of the other work's time, less its chunks) does not cover `_due()` yet."""
        self._account_chunk(other_s, 0.0)
        due = self._due()
        return due if self._credit >= due else None

    def _due(self) -> float:
        """How long a chunk takes: `chunk_span` typical other steps, as much longer as its share is boosted."""
        return self.chunk_span * self._other_step_s * max(1.0, self._share() / self.chunk_share)

    def _share(self) -> float:
        """The long prompt's share: `chunk_share`, times its boost while it is behind its deadline."""
        p = self._partial
        return self.chunk_share if p is None else self.chunk_share * p.boost

    def _pace(self) -> None:
        """Once a step: is the long prompt behind its deadline? At its pace so far (wall seconds per
        token-equivalent since it began) the rest would take `eta`; behind = DEADLINE_MARGIN × eta > the time
        left. Behind, its share's factor grows by BOOST_STEP (up to MAX_SHARE); ahead, it shrinks back to 1."""
        p = self._partial
        if self.chunk_share is None or p.req.deadline is None or p.done == 0:
            return
        now = time.perf_counter()
        eta = (now - p.started) / prefill_cost(0, p.done, self.attn) * prefill_cost(
            p.done, p.req.prompt_tokens - p.done, self.attn)
        if DEADLINE_MARGIN * eta > p.req.deadline - now:
            p.boost = min(p.boost * BOOST_STEP, MAX_SHARE / self.chunk_share)
        else:
            p.boost = max(1.0, p.boost / BOOST_STEP)

    def _spend(self, chunk_s: float) -> None:
        """A chunk took `chunk_s` of the others' time. Credit it left over is kept up to one chunk's worth (a
        chunk that took less than its due lets the next come sooner, not two at once)."""
        self._credit -= chunk_s
        if self.chunk_share is not None and self._other_step_s is not None:
            self._credit = min(self._credit, self._due())

    def _account_chunk(self, other_s: float, chunk_s: float) -> None:
        """After a step whose decode pass may have carried a chunk: its other work, and the chunk's time."""
        if self.chunk_share is not None:
            self._credit += self._share() * other_s
        ema = self._other_step_s
        self._other_step_s = other_s if ema is None else 0.8 * ema + 0.2 * other_s
        if chunk_s:
            self._spend(chunk_s)

    def _packed_budget(self, budget: float, rows: int) -> float | None:
        """The token-equivalents of the chunk this step's decode pass carries, or None for none (see the class)."""
        p = self._partial
        if p.req.cancelled:
            return None  # the chunk step ends it
        if self.chunk_share is None:
            return max(budget, self.min_chunk_cost)
        if rows not in self._decode_s or self._other_step_s is None:
            return None  # time the decode pass alone first
        due = self._due()
        if self._credit < due:
            return None
        most = float(self.max_step_tokens * self.idle_growth)
        return float(self.max_step_tokens) if p.s_per_cost is None else min(
            max(due / p.s_per_cost, self.min_chunk_cost), most)

    def _packed_decode(self, chunk_budget: float, finished: list[Request]) -> float:
        """The running rows' decode pass with the long prompt's next chunk (`chunk_budget` token-equivalents) in
        it. -> the seconds the chunk added to the pass."""
        p = self._partial
        r = p.req
        n = chunk_tokens(p.done, r.prompt_tokens - p.done, chunk_budget, self.attn)
        if r.params.prompt_logprobs is not None:
            n = min(n, self._score_rows)
        rows = self._running
        snaps = cache_ops.snapshot(self._cache), cache_ops.snapshot(p.cache)
        t = time.perf_counter()
        try:
            mixes = self._mix_matrix(rows + [r] * n)
            tokens = self._remaining(rows) + r.prompt_tokens - p.done + r.params.max_new_tokens
            self.tm.set_mix(mixes, tokens=tokens, allow_materialize=self.materialize, step_tokens=len(rows) + n)
            try:
                dev = self.tm.device
                logits = packing.packed_forward(self.tm.model, to_device(self._next, dev), self._cache,
                                                to_device(self._mask, dev),
                                                to_device(torch.tensor(r.prompt_ids[p.done:p.done + n]), dev),
                                                p.cache, p.done)
            finally:
                self.tm.clear_mix()
        except Exception as e:  # noqa: BLE001 - undo; the separate passes find the rows (or the chunk) that fail
            if isinstance(e, NotImplementedError):  # this model's attention needs what packed passes lack
                log.warning("packed passes are off for this model: %s", e)
                self.packed = False
            else:
                log.warning("a packed pass failed; running its rows and chunk separately", exc_info=True)
            cache_ops.restore(self._cache, snaps[0])
            cache_ops.restore(p.cache, snaps[1])
            self._decode(finished)
            t1 = time.perf_counter()
            self._continue_prefill(chunk_budget, finished)
            return time.perf_counter() - t1
        spent = time.perf_counter() - t
        decode_s = self._decode_s.get(len(rows))
        added = max(spent - decode_s, 0.05 * spent) if decode_s is not None else spent / 2
        cost = prefill_cost(p.done, n, self.attn)
        p.packed_s = 0.8 * p.packed_s + added  # a ratio of decayed sums: one noisy pass moves it little
        p.packed_cost = 0.8 * p.packed_cost + cost
        p.s_per_cost = p.packed_s / p.packed_cost
        self._mask = torch.cat([self._mask, torch.ones(len(rows), 1, dtype=torch.long)], dim=1)
        self._next = self.tokens.advance(rows, logits[:len(rows)].float())
        self._chunk_done(logits[len(rows):], n, finished)
        return added

    def _schedule(self, budget: float, finished: list[Request]) -> tuple[list[Request], float]:
        """Pick waiting prompts that fit `budget` whole (in arrival order; one that does not fit becomes the long
        prompt, or waits if there is one). -> (prompts to prefill now, budget left)."""
        room = self.max_batch - len(self._running) - (self._partial is not None)
        if not self._joinable and (self._running or self._partial is not None):
            room = 0  # rows of a cache that cannot be joined wait for the batch to empty
        take: list[Request] = []
        width = 0
        kept: list[Request] = []
        while self._waiting:
            r = self._waiting.popleft()
            if r.cancelled:
                r.finish_reason = "cancelled"
                final_callback(r)
                finished.append(r)
                continue
            if room <= 0:
                kept.append(r)
                continue
            cost = (len(take) + 1) * prefill_cost(0, max(width, r.prompt_tokens), self.attn)
            spent = len(take) * prefill_cost(0, width, self.attn)
            if cost - spent <= budget:
                take.append(r)
                budget -= cost - spent
                width = max(width, r.prompt_tokens)
                room -= 1
            elif self._partial is None and not (take and not self._joinable):
                self._partial = _Partial(r, cache_ops.reserved(self.tm.config, r.prompt_tokens),
                                         started=time.perf_counter())
                room -= 1
                if not self._joinable:
                    room = 0
            else:
                kept.append(r)
        self._waiting.extend(kept)
        return take, budget

    def _mix_matrix(self, reqs: list[Request]) -> torch.Tensor | None:
        if all(r.mix is None for r in reqs):
            return None
        n = len(self.tm.columns)
        return torch.stack([r.mix if r.mix is not None else torch.zeros(n) for r in reqs])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, cache, reqs: list[Request], tokens: int,
                 every: bool = False) -> torch.Tensor:
        """ids: [B, T] after the cache's columns; mask: [B, L + T] -> last-position logits [B, V] float32, or
        with `every` the logits after every position, [B, T, V] in the model's dtype. Appends T columns to
        `cache` in place."""
        dev = self.tm.device
        mask = to_device(mask, dev)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # [B, T]
        try:
            self.tm.set_mix(self._mix_matrix(reqs), tokens=tokens, allow_materialize=self.materialize,
                            step_tokens=ids.numel())
            with torch.no_grad():
                out = self.tm.model(input_ids=to_device(ids, dev), attention_mask=mask, position_ids=positions,
                                    past_key_values=cache, use_cache=True, logits_to_keep=0 if every else 1)
        finally:
            self.tm.clear_mix()
        return out.logits if every else out.logits[:, -1, :].float()  # [B, T, V] or [B, V]

    @staticmethod
    def _remaining(reqs: list[Request]) -> int:
        return sum(r.params.max_new_tokens - r.completion_tokens for r in reqs)

    def _decode(self, finished: list[Request]) -> None:
        """One token for every running row. A forward that raises is undone and bisected (see `_blame`)."""
        def run(rows: list[int] | None) -> torch.Tensor:
            reqs = self._running if rows is None else [self._running[i] for i in rows]
            sel = None if rows is None else torch.tensor(rows)
            cache = self._cache if sel is None else cache_ops.select_copy(self._cache, sel)
            nxt = self._next if sel is None else self._next.index_select(0, sel)
            mask = self._mask if sel is None else self._mask.index_select(0, sel)
            mask = torch.cat([mask, torch.ones(len(reqs), 1, dtype=torch.long)], dim=1)  # [B, L + 1]
            return self._forward(nxt[:, None], mask, cache, reqs, self._remaining(reqs))

        snap = cache_ops.snapshot(self._cache)
        try:
            logits = run(None)
        except Exception as e:  # noqa: BLE001 - undo, then find the rows that cause it
            cache_ops.restore(self._cache, snap)
            bad = self._blame(self._running, e, run, "decode")
            finished += bad
            self._remove_running(bad)
            if not self._running:
                return
            logits = run(None)
        self._mask = torch.cat([self._mask, torch.ones(len(self._running), 1, dtype=torch.long)], dim=1)
        self._next = self.tokens.advance(self._running, logits)

    def _prefill(self, reqs: list[Request]
                 ) -> tuple[torch.Tensor, DynamicCache, torch.Tensor, dict[int, list[TokenLogprob] | None]]:
        """Whole prompts, left-padded into a new cache -> (logits [B, V], cache, mask [B, W], scores), where
        scores[i] are row i's prompt TokenLogprobs after the first token (rows with prompt_logprobs; None where a
        logit is not finite). With scored rows the prompts go in blocks of columns, each keeping the logits
        after all its positions, at most SCORE_BLOCK of them (see the class)."""
        width = max(r.prompt_tokens for r in reqs)
        ids = torch.full((len(reqs), width), self._pad, dtype=torch.long)  # [B, W]
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - r.prompt_tokens:] = torch.tensor(r.prompt_ids)
            mask[i, width - r.prompt_tokens:] = 1
        tokens = sum(r.prompt_tokens + r.params.max_new_tokens for r in reqs)
        cache = DynamicCache(config=self.tm.config)
        scoring = [i for i, r in enumerate(reqs) if r.params.prompt_logprobs is not None]
        if not scoring:
            return self._forward(ids, mask, cache, reqs, tokens), cache, mask, {}
        scores: dict[int, list[TokenLogprob] | None] = {i: [] for i in scoring}
        cols = max(1, SCORE_BLOCK // (len(reqs) * self.vocab))
        for c0 in range(0, width, cols):
            c1 = min(width, c0 + cols)
            block = self._forward(ids[:, c0:c1], mask[:, :c1], cache, reqs, tokens, every=True)  # [B, c, V]
            for i in scoring:
                pad = width - reqs[i].prompt_tokens  # column j's logits score prompt token j + 1 - pad
                lo = max(c0, pad)
                if lo < c1 and scores[i] is not None:
                    got = _prompt_entries(reqs[i], block[i, lo - c0:], lo + 1 - pad)
                    scores[i] = None if got is None else scores[i] + got
        return block[:, -1].float(), cache, mask, scores

    def _admit(self, new: list[Request], finished: list[Request]) -> None:
        """Prefill whole prompts, pick their first tokens, and join them to the running batch (in groups of at
        most SCORE_BLOCK // V rows when some are scored, so that a block of columns is within SCORE_BLOCK)."""
        size = self._score_rows if any(r.params.prompt_logprobs is not None for r in new) else len(new)
        for g in range(0, len(new), size):
            self._admit_group(new[g:g + size], finished)

    def _admit_group(self, new: list[Request], finished: list[Request]) -> None:
        try:
            logits, cache, mask, scores = self._prefill(new)
        except Exception as e:  # noqa: BLE001
            bad = self._blame(new, e, lambda rows: self._prefill([new[i] for i in rows]), "prefill")
            finished += bad
            new = [r for r in new if r not in bad]
            if not new:
                return
            logits, cache, mask, scores = self._prefill(new)
        for i, got in scores.items():
            if got is None:
                fail_not_finite(new[i])  # done: _join leaves it out
            else:
                new[i].prompt_logprobs = [None, *got]
        self._join(new, logits, cache, mask, finished)

    def _continue_prefill(self, budget: float, finished: list[Request]) -> float:
        """The next chunk of the long prompt into its own cache; when it is all in, the row joins the batch.
        -> the chunk's cost in token-equivalents (0 when none ran)."""
        p = self._partial
        r = p.req
        if r.cancelled:
            r.finish_reason = "cancelled"
            final_callback(r)
            self._partial = None
            finished.append(r)
            return 0.0
        n = chunk_tokens(p.done, r.prompt_tokens - p.done, budget, self.attn)
        scoring = r.params.prompt_logprobs is not None
        if scoring:
            n = min(n, self._score_rows)
        ids = torch.tensor([r.prompt_ids[p.done:p.done + n]])  # [1, n]
        mask = torch.ones(1, p.done + n, dtype=torch.long)  # [1, done + n]: positions continue the prompt
        tokens = r.prompt_tokens - p.done + r.params.max_new_tokens
        try:
            logits = self._forward(ids, mask, p.cache, [r], tokens, every=scoring)  # [1, V] or [1, n, V]
        except Exception as e:
            log.exception("prefill chunk of request %d failed", r.id)
            fail(r, RowFailure(f"generation failed: {type(e).__name__}", client=False))
            self._partial = None
            finished.append(r)
            return 0.0
        self._chunk_done(logits[0] if scoring else logits, n, finished)
        return prefill_cost(p.done - n, n, self.attn)

    def _chunk_done(self, logits: torch.Tensor, n: int, finished: list[Request]) -> None:
        """The long prompt's chunk of `n` tokens is in; logits: [n, V] after each of them (or [1, V] after the
        last, when it is not scored). Scores its prompt tokens, and joins the row to the batch when it is all in."""
        p = self._partial
        r = p.req
        scored: list[TokenLogprob] | None = []
        if r.params.prompt_logprobs is not None:
            if p.done == 0:
                r.prompt_logprobs = [None]
            scored = _prompt_entries(r, logits, p.done + 1)
        p.done += n
        last = logits[-1:].float()  # [1, V]
        if scored is None or not bool(torch.isfinite(last).all()):
            fail_not_finite(r)
            self._partial = None
            finished.append(r)
            return
        r.prompt_logprobs += scored
        if p.done == r.prompt_tokens:
            self._partial = None
            self._join([r], last, cache_ops.released(p.cache), torch.ones(1, p.done, dtype=torch.long), finished)

    def _join(self, new: list[Request], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor,
              finished: list[Request]) -> None:
        """Pick the first tokens of prefilled rows (cache [B, H, W, D], mask [B, W]) and join those not done then
        to the running batch; the others go to `finished`."""
        nxt = self.tokens.advance(new, logits)
        keep = [i for i, r in enumerate(new) if not r.done]
        finished += [r for r in new if r.done]
        if not keep:
            return
        if len(keep) < len(new):
            rows = torch.tensor(keep)
            mask = cache_ops.keep_rows(cache, mask, rows)
            nxt = nxt.index_select(0, rows)
            new = [new[i] for i in keep]
        if self._cache is None:
            self._cache, self._mask, self._next = cache, mask, nxt
        else:
            self._cache, self._mask = cache_ops.join(self._cache, self._mask, cache, mask)
            self._next = torch.cat([self._next, nxt])
        self._running = self._running + new

    def _remove_running(self, gone: list[Request]) -> None:
        keep = [i for i, r in enumerate(self._running) if r not in gone]
        if not keep:
            self._cache = self._mask = self._next = None
            self._running = []
            return
        rows = torch.tensor(keep)
        self._mask = cache_ops.keep_rows(self._cache, self._mask, rows)
        self._next = self._next.index_select(0, rows)
        self._running = [self._running[i] for i in keep]

    # ---- failures --------------------------------------------------------------------------------------------

    def _blame(self, reqs: list[Request], error: Exception, run: Callable[[list[int]], object], what: str
               ) -> list[Request]:
        """A batched forward over `reqs` raised `error`: fail the rows that raise on their own and return them.
        Raises `error` when no row does (not reproducible per row) or every row of several does (not a row's
        fault); a batch of one is that row's."""
        log.exception("%s forward of %d rows failed; looking for the rows that cause it", what, len(reqs))
        found = [(0, error)] if len(reqs) == 1 else culprits(len(reqs), run)
        if not found or (len(found) == len(reqs) > 1):
            raise error
        bad = []
        for i, e in found:
            log.error("request %d fails the %s forward on its own: %s", reqs[i].id, what, type(e).__name__,
                      exc_info=e)
            fail(reqs[i], RowFailure(f"generation failed: {type(e).__name__}", client=False))
            bad.append(reqs[i])
        return bad
