"""A packed pass (the running rows' next tokens and a long prompt's chunk in one forward) computes what the two
separate passes compute: the same logits, the same caches, with every row's own mix."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicCache

from helpers import FLOAT32_CASES
from twinrt.runtime import TwinModel, packed

MIXES = [torch.tensor([1.0, 0.0, 0.0]), None, torch.tensor([0.2, 0.5, 0.3])]


@pytest.fixture(scope="module", params=FLOAT32_CASES)
def tm(request, tiny_artifact) -> TwinModel:
    tm = TwinModel.from_artifact(tiny_artifact, device=request.param.device)
    packed.enable(tm.model)
    return tm


def _forward(tm, ids, mask, cache, positions, mix, keep=1):
    """-> the logits after the last `keep` positions, [B, keep, V] float32 ([B, V] for keep=1)."""
    tm.set_mix(mix, tokens=ids.numel(), allow_materialize=False)
    dev = tm.device
    try:
        with torch.no_grad():
            out = tm.model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev),
                           past_key_values=cache, use_cache=True, logits_to_keep=keep)
    finally:
        tm.clear_mix()
    return out.logits[:, -1].float() if keep == 1 else out.logits.float()


def _batch(tm, lengths, gen):
    """A left-padded batch of random prompts in a cache -> (cache, mask [B, W])."""
    width = max(lengths)
    ids = torch.randint(3, tm.config.vocab_size, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, width - n:] = 1
    cache = DynamicCache(config=tm.config)
    _forward(tm, ids, mask, cache, (mask.cumsum(-1) - 1).clamp(min=0), _stack(MIXES[:len(lengths)]))
    return cache, mask


def _stack(mixes):
    if all(m is None for m in mixes):
        return None
    return torch.stack([torch.zeros(3) if m is None else m for m in mixes])


@pytest.mark.parametrize("done, n, chunk_mix", [(0, 7, MIXES[2]), (40, 1, None), (40, 25, MIXES[0])])
def test_a_packed_pass_equals_the_two_passes_it_replaces(tm, done, n, chunk_mix):
    gen = torch.Generator().manual_seed(done + n)
    rows, mask = _batch(tm, [5, 12, 9], gen)
    prompt = torch.randint(3, tm.config.vocab_size, (done + n,), generator=gen)
    chunk = DynamicCache(config=tm.config)
    if done:
        _forward(tm, prompt[None, :done], torch.ones(1, done, dtype=torch.long), chunk, torch.arange(done)[None],
                 None if chunk_mix is None else chunk_mix[None])
    nxt = torch.randint(3, tm.config.vocab_size, (3,), generator=gen)
    rows2, chunk2 = copy.deepcopy(rows), copy.deepcopy(chunk)

    # the two separate passes
    mask2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], dim=1)
    want_rows = _forward(tm, nxt[:, None], mask2, rows2, (mask2.cumsum(-1) - 1)[:, -1:], _stack(MIXES))
    want_chunk = _forward(tm, prompt[None, done:], torch.ones(1, done + n, dtype=torch.long), chunk2,
                          torch.arange(done, done + n)[None], None if chunk_mix is None else chunk_mix[None], keep=n)

    # one packed pass: one mix per token, the chunk's tokens after the rows
    tm.set_mix(_stack(MIXES + [chunk_mix] * n), tokens=3 + n, allow_materialize=False)
    try:
        dev = tm.device
        got = packed.packed_forward(tm.model, nxt.to(dev), rows, mask.to(dev), prompt[done:].to(dev), chunk, done)
    finally:
        tm.clear_mix()

    assert got.shape == (3 + n, tm.config.vocab_size)
    torch.testing.assert_close(got[:3].float(), want_rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[3:].float(), want_chunk.reshape(n, -1), atol=1e-5, rtol=1e-5)  # every token
    for a, b in zip(rows.layers + chunk.layers, rows2.layers + chunk2.layers):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_outside_a_packed_pass_the_attention_is_transformers_sdpa(tiny_artifact):
    plain = TwinModel.from_artifact(tiny_artifact)
    routed = TwinModel.from_artifact(tiny_artifact)
    packed.enable(routed.model)
    assert routed.model.config._attn_implementation == packed.ATTENTION
    ids = torch.tensor([[5, 9, 11, 4, 7], [0, 0, 3, 8, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        a = plain.model(input_ids=ids, attention_mask=mask).logits
        b = routed.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a[mask.bool()], b[mask.bool()])
    assert packed.supported(routed.model, DynamicCache(config=routed.config))


@pytest.mark.parametrize("kwarg", ["softcap", "sliding_window", "s_aux"])
def test_attention_a_packed_pass_does_not_do_is_refused(tm, kwarg):
    layer = tm.model.model.layers[0].self_attn
    q, kv = torch.zeros(3, 4, 1, 8), torch.zeros(1, 2, 5, 8)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    rows_kv = kv.expand(2, -1, -1, -1)
    pack = packed._Pack(None, mask.expand(2, -1, -1, -1), None, mask, 2,
                        kv={layer.layer_idx: (rows_kv, rows_kv, kv, kv)})
    with packed._packing(pack), pytest.raises(NotImplementedError, match="softcapping, sliding windows or sinks"):
        packed._attention(layer, q, q, q, None, scaling=1.0, **{kwarg: 4})
    assert packed._current.get() is None
