"""The SVD paths (full, randomized, driver fallbacks), the streaming safetensors writer, and the PEFT adapter
format the experts are written in."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from twinrt import adapter
from twinrt.artifact.stwriter import SafetensorsWriter
from twinrt.sources.checkpoint import SafetensorsDir
from twinrt.split import svd as S


def low_rank_plus_noise(m: int, n: int, r: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    decay = torch.logspace(0, -2, r)
    return ((torch.randn(m, r, generator=g) * decay) @ torch.randn(r, n, generator=g)
            + 1e-3 * torch.randn(m, n, generator=g))


def test_full_svd_is_eckart_young():
    m = low_rank_plus_noise(40, 30, 12)
    f = S.truncated_svd(m, rank=5, method="full")
    s = torch.linalg.svdvals(m.double())
    assert f.path == "full" and f.rank == 5
    err = (m.double() - f.b.double() @ f.a.double()).norm()
    assert abs(err - s[5:].pow(2).sum().sqrt()) < 1e-4 * err
    # B = U√S, A = √S Vᵀ: both factors carry the same singular values
    assert torch.allclose(f.b.norm(dim=0), f.a.norm(dim=1), rtol=1e-4)


def test_randomized_path_is_close_and_its_energy_exact():
    m = low_rank_plus_noise(600, 700, 20)
    assert S.use_randomized((600, 700), 16, "auto") and not S.use_randomized((64, 64), 4, "auto")
    f = S.truncated_svd(m, rank=16, method="auto", seed=1)
    assert f.path == "randomized" and f.rank == 16
    full = S.truncated_svd(m, rank=16, method="full")
    err_r = (m - f.b @ f.a).norm()
    err_f = (m - full.b @ full.a).norm()
    assert err_f <= err_r * (1 + 1e-4) and err_r < 1.01 * err_f
    assert abs(f.energy - (1 - err_r**2 / m.norm() ** 2)) < 1e-4  # the stored energy matches the real error
    again = S.truncated_svd(m, rank=16, method="auto", seed=1)
    assert torch.equal(again.a, f.a)  # seeded: the same artifact twice


def test_driver_failure_falls_back(monkeypatch):
    m = low_rank_plus_noise(30, 20, 6)
    want = S.truncated_svd(m, rank=4, method="full")
    real = torch.linalg.svd

    def flaky(x, *a, **kw):
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, *a, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    got = S.truncated_svd(m, rank=4, method="full")
    assert got.path == "full:fallback-float64"
    torch.testing.assert_close(got.b @ got.a, want.b @ want.a, rtol=0, atol=1e-5)

    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no convergence")))
    got = S.truncated_svd(m, rank=4, method="full")
    assert got.path == "full:fallback-gram-eigh"
    torch.testing.assert_close(got.b @ got.a, want.b @ want.a, rtol=0, atol=1e-4)
    wide = S.truncated_svd(m.T.contiguous(), rank=4, method="full")
    torch.testing.assert_close(wide.b @ wide.a, (want.b @ want.a).T, rtol=0, atol=1e-4)


def test_zero_delta_has_rank_zero():
    f = S.truncated_svd(torch.zeros(8, 6), rank=3)
    assert f.rank == 0 and f.a.shape == (0, 6) and f.b.shape == (8, 0) and f.energy == 1.0


def test_rank_for_energy():
    s = torch.tensor([3.0, 2.0, 1.0])  # squares 9, 4, 1 of 14
    assert S.rank_for_energy(s, 14.0, 9 / 14) == 1
    assert S.rank_for_energy(s, 14.0, 0.65) == 2
    assert S.rank_for_energy(s, 14.0, 1.0) == 3


@pytest.mark.parametrize("shard", [1 << 40, 300])
def test_streaming_writer_roundtrips(tmp_path, shard):
    tensors = {"w": torch.randn(10, 12), "b16": torch.randn(5).bfloat16(), "h": torch.randn(3, 3).half(),
               "i": torch.arange(6), "empty": torch.zeros(0, 4),
               "rank1": torch.randn(7).as_strided((7, 1), (1, 7))}  # [7, 1], last-dim stride 7: a rank-1 SVD factor
    w = SafetensorsWriter(tmp_path, "model", max_shard_bytes=shard, metadata={"who": "test"})
    for k, v in tensors.items():
        w.add(k, v)
    files = w.close()
    assert (len(files) == 1) == (shard > 1 << 20)
    (tmp_path / "config.json").write_text("{}")
    src = SafetensorsDir(tmp_path)
    for k, v in tensors.items():
        assert torch.equal(src.get(k), v) and src.meta(k).dtype == v.dtype
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["who"] == "test"
    w2 = SafetensorsWriter(tmp_path, "y")
    w2.add("a", torch.ones(1))
    with pytest.raises(ValueError, match="written twice"):
        w2.add("a", torch.ones(1))


def test_adapter_config_has_scaling_one_for_every_module(tmp_path):
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.0.mlp.down_proj": 2,
             "model.layers.1.self_attn.q_proj": 4}
    path = adapter.write_config(tmp_path, ranks)
    written = json.loads(path.read_text())
    assert written["r"] == written["lora_alpha"] == 4
    assert written["rank_pattern"] == written["alpha_pattern"] == {"model.layers.0.mlp.down_proj": 2}
    assert written["target_modules"] == sorted(ranks)  # a set in LoraConfig, written as a sorted list
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    for module, r in ranks.items():
        assert adapter.module_rank(written, module) == r
        assert adapter.module_scaling(written, module) == 1.0
    loaded = LoraConfig.from_pretrained(str(tmp_path))  # PEFT reads it back as the same config
    assert loaded.r == 4 and loaded.rank_pattern == {"model.layers.0.mlp.down_proj": 2}
    assert set(loaded.target_modules) == set(ranks)


def test_adapter_keys_round_trip():
    a_key, b_key = adapter.lora_keys("model.layers.3.mlp.up_proj")
    assert (a_key, b_key) == ("base_model.model.model.layers.3.mlp.up_proj.lora_A.weight",
                              "base_model.model.model.layers.3.mlp.up_proj.lora_B.weight")
    for key, kind in ((a_key, "lora_A"), (b_key, "lora_B")):
        m = adapter.KEY.match(key)
        assert m and m["module"] == "model.layers.3.mlp.up_proj" and m["kind"] == kind
    assert adapter.KEY.match("base_model.model.model.embed_tokens.lora_embedding_A")["kind"] == "lora_embedding_A"
    assert adapter.KEY.match("model.layers.0.mlp.up_proj.weight") is None


def test_adapter_patterns_follow_peft():
    cfg = {"r": 8, "lora_alpha": 16, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"down_proj": 8}}
    assert adapter.module_rank(cfg, "model.layers.0.mlp.down_proj") == 2
    assert adapter.module_scaling(cfg, "model.layers.0.mlp.down_proj") == 4.0
    assert adapter.module_rank(cfg, "model.layers.0.mlp.xdown_proj") == 8  # a pattern matches after a dot only
    assert adapter.module_scaling(cfg, "model.layers.0.self_attn.q_proj") == 2.0
    assert adapter.module_scaling({**cfg, "use_rslora": True}, "model.layers.0.self_attn.q_proj") == 16 / 8 ** 0.5
