"""Logit processing that can change a row's argmax, and the log-probabilities reported to clients.

The order is vLLM V1's; everything here comes before temperature (which `sampling` applies, with min_p, top_k
and top_p). For the rows of a batch that need any of it (`needs_processing`), `process` computes, on a float32
copy `x: [b, V]` of their raw logits:

    x[b, t] += bias                                   for (t, bias) in logit_bias            (clamped to ±100)
    x[b, t]  = -inf                                   for t in ends, while len(output) < min_tokens
    x[b, ~allowed] = -inf                             the row's constraint, where it has one
    seen = t in prompt or output;  n = count of t in output
    x[b, t]  = x / rep if x > 0 else x * rep          for seen t   (repetition_penalty)
    x[b, t] -= frequency_penalty · n + presence_penalty · (n > 0)

`ends` are the end-of-sequence ids and the row's stop_token_ids. Log-probabilities (`entries`) are of the raw
logits, before all of this, as vLLM's default `logprobs_mode` ("raw_logprobs").
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from twinrt.runtime.request import Request, SamplingParams, TokenLogprob


def has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def needs_processing(r: Request) -> bool:
    """Whether this step's logits of `r` change before temperature (else the raw logits are used as they are)."""
    p = r.params
    return (bool(p.logit_bias) or r.completion_tokens < p.min_tokens or has_penalties(p)
            or r.constraint is not None)


def _pad_ids(seqs: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    """Token id lists -> [b, L] long, right-padded with `pad` (L >= 1)."""
    width = max([len(s) for s in seqs] + [1])
    out = torch.full((len(seqs), width), pad, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out


def apply_penalties(x: torch.Tensor, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """x: [b, V] float32; per-row penalties [b] -> penalised logits [b, V] (vLLM's apply_penalties rule).
    Token ids >= V are ignored."""
    b, v = x.shape
    out = _pad_ids([[t for t in s if 0 <= t < v] for s in outputs], v)  # [b, L]; column v: padding
    counts = torch.zeros(b, v + 1).scatter_add_(1, out, torch.ones(out.shape))[:, :v]  # [b, V]
    prompt = _pad_ids([[t for t in s if 0 <= t < v] for s in prompts], v)
    seen = torch.zeros(b, v + 1, dtype=torch.bool).scatter_(1, prompt, True)[:, :v] | (counts > 0)
    rep = repetition[:, None]  # [b, 1]
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    return x - frequency[:, None] * counts - presence[:, None] * (counts > 0).float()


def process(logits: torch.Tensor, reqs: Sequence[Request], allowed: Sequence[torch.Tensor | None],
            ends: Collection[int]) -> torch.Tensor:
    """logits: [b, V] raw (finite) for `reqs`; `allowed[i]`: the row's constraint mask ([V] bool, see
    `constraint.fit`) or None;
    `ends`: the end-of-sequence ids -> processed float32 logits [b, V] (see the module)."""
    x = logits.detach().to("cpu", torch.float32).clone()  # [b, V]
    v = x.shape[1]
    rows, cols, vals = [], [], []
    for i, r in enumerate(reqs):
        for t, bias in r.params.logit_bias:
            if t < v:
                rows.append(i)
                cols.append(t)
                vals.append(bias)
    if rows:
        x.index_put_((torch.tensor(rows), torch.tensor(cols)), torch.tensor(vals), accumulate=True)
    for i, r in enumerate(reqs):
        if r.completion_tokens < r.params.min_tokens:
            masked = [t for t in set(ends) | set(r.params.stop_token_ids) if 0 <= t < v]
            x[i, masked] = float("-inf")
        if allowed[i] is not None:
            x[i].masked_fill_(~allowed[i], float("-inf"))
    pen = [i for i, r in enumerate(reqs) if has_penalties(r.params)]
    if pen:
        ps = [reqs[i].params for i in pen]
        sel = torch.tensor(pen)
        x[sel] = apply_penalties(x[sel], [reqs[i].prompt_ids for i in pen], [reqs[i].output_ids for i in pen],
                                 torch.tensor([p.repetition_penalty for p in ps]),
                                 torch.tensor([p.presence_penalty for p in ps]),
                                 torch.tensor([p.frequency_penalty for p in ps]))
    return x


def entries(logits: torch.Tensor, tokens: torch.Tensor, tops: Sequence[int]) -> list[TokenLogprob]:
    """logits: [n, V] raw; tokens: [n] -> the TokenLogprob of tokens[i] under log_softmax(logits[i].float()),
    with the tops[i] most likely (id, logprob) of that row."""
    lp = torch.log_softmax(logits.detach().to("cpu", torch.float32), dim=-1)  # [n, V]
    tok = lp.gather(1, tokens.to("cpu", torch.long)[:, None])  # [n, 1]
    ranks = (lp >= tok).sum(dim=-1).tolist()  # [n]: 1-based, ties ranked above
    k = min(max(tops, default=0), lp.shape[1])
    top_lp, top_id = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())  # [n, k]
    top_lp, top_id = top_lp.tolist(), top_id.tolist()
    return [TokenLogprob(int(t), float(tl[0]), int(rank), tuple(zip(ids[:n], lps[:n])))
            for t, tl, rank, ids, lps, n in zip(tokens.tolist(), tok.tolist(), ranks, top_id, top_lp, tops)]
