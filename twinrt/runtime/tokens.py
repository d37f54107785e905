"""What each row takes next and what its text becomes: the engine's last stage of every forward.

    tokens = Tokens(tokenizer, eos, context, vocab, pad)
    nxt = tokens.advance(rows, logits)      # logits: [B, V] raw float32 -> [B] the tokens the rows feed next

Per row, on its own (a row's failure never reaches another): non-finite logits fail it; a cancelled row ends;
a score-only row (max_new_tokens 0) ends without a token; the others pick a token, the batched argmax of their
raw logits or a draw from them when their parameters leave them as they are, else from the processed logits
(`logits.process`: bias, min_tokens, the constraint's mask, penalties). A taken token is EOS or a stop token
(the row ends, the token stays out of the output but keeps its logprob entry, as vLLM reports it) or joins the
output: the constraint advances, the text is decoded, a stop string ends it, and the text that can no longer
change is streamed through the row's callback. `fail`, `fail_not_finite` and `final_callback` end a row from
anywhere in the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch

from twinrt.runtime import logits as processing
from twinrt.runtime.constraint import fit
from twinrt.runtime.request import Request, RowFailure, TokenLogprob
from twinrt.runtime.sampling import is_greedy, sample_row
from twinrt.runtime.transfer import to_device, to_host

log = logging.getLogger(__name__)

NOT_FINITE = ("the model's output for this request is not finite (are the routing weights or sampling "
              "parameters extreme?)")


class _NoTokenAllowed(Exception):
    """The row's constraint and min_tokens leave no token it may take."""


class _ConstraintFailed(Exception):
    """The row's constraint raised (the cause is chained)."""


def final_callback(r: Request) -> None:
    """The empty delta that tells a streaming caller the row is done (it may raise: the row is done anyway)."""
    if r.on_token is None:
        return
    try:
        r.on_token(r, "")
    except Exception:
        log.exception("the final callback of request %d raised", r.id)


def fail(r: Request, failure: RowFailure) -> None:
    r.finish_reason = "error"
    r.error = failure
    final_callback(r)


def fail_not_finite(r: Request) -> None:
    log.warning("request %d: logits are not finite; failing the row", r.id)
    fail(r, RowFailure(NOT_FINITE, client=True))


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters might begin a stop string (or an unfinished UTF-8 sequence)."""
    n = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n


def _find_stop(text: str, stops: tuple[str, ...], emitted: int, floor: int) -> tuple[int, str] | None:
    """The earliest stop string in `text` not searched before -> (where it starts, which). A stop string must end
    past character `floor` (vLLM's min_tokens rule); one ending within the `emitted` text was found before (the
    search still starts a character early, in case decoding changed the last one)."""
    best: tuple[int, str] | None = None
    for s in stops:
        at = text.find(s, max(0, emitted - len(s), floor - len(s) + 1))
        if at >= 0 and (best is None or at < best[0]):
            best = (at, s)
    return best


def _constrained(call: Callable[..., Any], *args: object) -> Any:
    """A call into a row's constraint; what it raises becomes _ConstraintFailed (the row fails alone)."""
    try:
        return call(*args)
    except Exception as e:
        raise _ConstraintFailed(type(e).__name__) from e


def _pick(r: Request, greedy: int, raw: Callable[[], torch.Tensor], processed: torch.Tensor | None) -> int:
    """The row's token: the batched argmax `greedy` of its raw logits (`raw()`, read only to sample from), or
    from its processed logits."""
    p = r.params
    if processed is None:
        if is_greedy(p.temperature):
            return greedy
        return sample_row(raw(), p.temperature, p.top_p, r.generator, p.top_k, p.min_p)
    if not bool(processed.max() > float("-inf")):
        raise _NoTokenAllowed("no token may come next: the constraint (and min_tokens) exclude every token")
    return sample_row(processed, p.temperature, p.top_p, r.generator, p.top_k, p.min_p)


def _fail_row(r: Request, e: Exception, what: str) -> None:
    log.error("request %d failed while %s", r.id, what, exc_info=e)
    if isinstance(e, _NoTokenAllowed):
        message = str(e)
    elif isinstance(e, _ConstraintFailed):
        message = f"generation failed: its constraint raised {e}"
    else:
        message = f"generation failed: {type(e).__name__}"
    fail(r, RowFailure(message, client=False))


def _reads_logits(r: Request) -> bool:
    """Whether a row's token is picked from its logits on the host (sampled, processed, or with logprobs),
    rather than from the batch's argmax alone."""
    p = r.params
    return not is_greedy(p.temperature) or p.logprobs is not None or processing.needs_processing(r)


class _HostLogits:
    """A step's logits [B, V] as the host needs them, read back from the device in one synchronisation: each
    row's argmax and finiteness, and the whole logits of the rows that read them (`_reads_logits`) only.
    Index it with a row or a list of rows, as the tensor."""

    def __init__(self, reqs: list[Request], logits: torch.Tensor) -> None:
        greedy, finite = logits.argmax(dim=-1), torch.isfinite(logits).all(dim=-1)  # [B], [B]
        if logits.device.type == "cpu":
            self._rows, self._at = logits, None
        else:
            need = [i for i, r in enumerate(reqs) if _reads_logits(r)]
            rows = logits.index_select(0, to_device(torch.tensor(need, dtype=torch.long), logits.device))
            greedy, finite, self._rows = to_host(greedy, finite, rows)
            self._at = {i: k for k, i in enumerate(need)}
        self.greedy: list[int] = greedy.tolist()
        self.finite: list[bool] = finite.tolist()

    def __getitem__(self, rows: int | list[int]) -> torch.Tensor:
        if self._at is None:
            return self._rows[rows]
        if isinstance(rows, int):
            return self._rows[self._at[rows]]
        return self._rows[[self._at[i] for i in rows]]


class Tokens:
    """Token selection and detokenization for one engine (see the module docstring). `eos`: the ids that end a
    row; `context`: the most tokens a row may hold; `vocab`: the logits' width V; `pad`: what a row that took
    no token feeds next."""

    def __init__(self, tokenizer: Any, eos: Iterable[int], context: int, vocab: int, pad: int) -> None:
        self.tokenizer = tokenizer
        self.eos = set(eos)
        self.context = context
        self.vocab = vocab
        self.pad = pad

    def advance(self, reqs: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Pick each row's next token, update its text, and finish rows that are done. -> [B] next inputs.

        logits: [B, V] float32, raw. Rows whose parameters leave them as they are take the batched argmax (or
        sample from them); the rest are processed together first (`_process`). Each row on its own: non-finite
        logits, or a raise in its constraint, sampling, decoding or callback, fail it alone."""
        logits = _HostLogits(reqs, logits)  # the one read-back of the step
        finite, greedy = logits.finite, logits.greedy
        live = []
        for i, r in enumerate(reqs):
            if r.done:  # failed before its first token (its prompt's scores)
                continue
            if r.cancelled:
                r.finish_reason = "cancelled"
                final_callback(r)
            elif not finite[i]:
                fail_not_finite(r)
            elif r.params.max_new_tokens == 0:  # score only: no token
                r.finish_reason = "length"
                final_callback(r)
            else:
                live.append(i)
        processed = self._process(reqs, logits, live)
        picked: dict[int, int] = {}
        for i in live:
            r = reqs[i]
            if r.done:
                continue
            try:
                picked[i] = _pick(r, greedy[i], lambda i=i: logits[i], processed.get(i))
            except Exception as e:
                _fail_row(r, e, "picking its next token")
        scored = [i for i in picked if reqs[i].params.logprobs is not None]
        entries = dict(zip(scored, processing.entries(
            logits[scored], torch.tensor([picked[i] for i in scored], dtype=torch.long),
            [reqs[i].params.logprobs for i in scored]))) if scored else {}
        nxt = [self.pad] * len(reqs)
        for i, t in picked.items():
            nxt[i] = t
            try:
                self._accept(reqs[i], t, entries.get(i))
            except Exception as e:
                _fail_row(reqs[i], e, "taking its next token")
        return torch.tensor(nxt, dtype=torch.long)

    def _process(self, reqs: list[Request], logits: _HostLogits, rows: list[int]) -> dict[int, torch.Tensor]:
        """The processed logits ([V] float32, `logits.process`) of the rows that need processing, by row. A row
        whose constraint is finished ends here ("stop"); one whose constraint raises fails."""
        need, allowed = [], []
        for i in rows:
            r = reqs[i]
            if not processing.needs_processing(r):
                continue
            try:
                mask = None
                if r.constraint is not None:
                    if _constrained(r.constraint.finished):
                        r.finish_reason = "stop"
                        self._emit(r)
                        continue
                    got = _constrained(r.constraint.allowed)
                    mask = None if got is None else fit(got, self.vocab)
            except Exception as e:
                _fail_row(r, e, "constraining its next token")
                continue
            need.append(i)
            allowed.append(mask)
        if not need:
            return {}
        x = processing.process(logits[need], [reqs[i] for i in need], allowed, self.eos)  # [b, V]
        return {i: x[j] for j, i in enumerate(need)}

    def _accept(self, r: Request, t: int, entry: TokenLogprob | None) -> None:
        """Row r took token t (with its TokenLogprob when asked): EOS and stop_token_ids end it, out of the output
        and the text but with their logprob entry last (as vLLM reports the token that ended a sequence); any
        other token joins the output (its constraint advances past it); then the row's end and its text."""
        p = r.params
        if (t in self.eos and not p.ignore_eos) or t in p.stop_token_ids:
            r.finish_reason = "stop"
            if entry is not None:
                r.logprobs.append(entry)
        else:
            r.output_ids.append(t)
            if entry is not None:
                r.logprobs.append(entry)
            if r.constraint is not None:
                _constrained(r.constraint.advance, t)
            self._update_text(r)
            if r.constraint is not None and not r.done and _constrained(r.constraint.finished):
                r.finish_reason = "stop"  # a complete output, even at max_new_tokens
        if r.finish_reason is None and (r.completion_tokens >= p.max_new_tokens
                                        or r.prompt_tokens + r.completion_tokens >= self.context):
            r.finish_reason = "length"
        self._emit(r)

    def _update_text(self, r: Request) -> None:
        """Decode the output; a stop string ends the row, the text cut before it (or after it, with
        include_stop_str_in_output). As vLLM: none may end within the text of the first min_tokens tokens."""
        text = self.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        p = r.params
        if p.stop and r.completion_tokens <= p.min_tokens:
            r.stop_after = len(text)
        elif p.stop:
            hit = _find_stop(text, p.stop, r.emitted, r.stop_after)
            if hit is not None:
                at, s = hit
                text = text[:at + len(s)] if p.include_stop_str_in_output else text[:at]
                r.finish_reason = "stop"
        r.text = text

    @staticmethod
    def _emit(r: Request) -> None:
        held = () if r.params.include_stop_str_in_output else r.params.stop  # kept stop strings need no holdback
        end = len(r.text) if r.done else len(r.text) - _holdback(r.text, held)
        if end > r.emitted:
            delta = r.text[r.emitted:end]
            r.emitted = end
            if r.on_token is not None:
                r.on_token(r, delta)
        elif r.done and r.on_token is not None:
            r.on_token(r, "")
