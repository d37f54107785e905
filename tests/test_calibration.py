"""The calibration statistics pass on tiny real models: each statistic equals its definition computed here by hand
(Grams over attention-masked tokens only, whatever the padding; the empirical Fisher of the reference answers;
K-FAC's output-gradient Gram), a LoRA expert's statistics equal those of the same expert merged into a full
checkpoint, and the split with each data method records its cost and the solver's report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import EXPERTS
from twinrt.artifact import Artifact
from twinrt.config import parse_config
from twinrt.merge import KINDS
from twinrt.sources import open_base, open_expert
from twinrt.sources.model import expert_tensors, load_model
from twinrt.split.calibration import load_calibration
from twinrt.split.run import STATISTICS_FILE, split
from twinrt.split.statistics import StatisticsFiles, StatisticsPlan, collect_statistics, log_likelihood

Q0 = "model.layers.0.self_attn.q_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
LINEAR = tuple(f"model.layers.{i}.{m}.weight" for i in range(2) for m in
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"))


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    words = ["cat", "dog", "paris", "hello", "world", "python", "sum", "fox", "lazy", "quick"]
    return [{"task": "t", "answer": f"{words[(3 * i + seed) % 10]} {i}",
             "messages": [{"role": "user", "content": f"translate {words[(i + seed) % 10]} " * (1 + i % 3)}]}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    rows = chat_rows(5) + [{"text": "the quick brown fox jumps over the lazy dog"}]
    return write_jsonl(tmp_path_factory.mktemp("calib") / "calib.jsonl", rows)


def calibration(tiny_models, path: Path, batch_size: int = 8):
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    return load_calibration(path, tok, samples=64, max_tokens=None, context=128, expert="e", batch_size=batch_size)


def statistics(tiny_models, calib_file: Path, tmp: Path, expert: str, kinds=KINDS,
               batch_size: int = 8) -> dict[str, dict]:
    """{kind: {tensor: statistic}} of one expert over the module's calibration file."""
    base = open_base(tiny_models["base"])
    e = open_expert(tiny_models[expert], expert, base)
    model = load_model(base, None)
    calib = calibration(tiny_models, calib_file, batch_size)
    work = tmp / expert
    work.mkdir(parents=True)
    costs = collect_statistics(model, {expert: calib}, StatisticsPlan(frozenset(kinds), LINEAR), work,
                               lambda _: expert_tensors(base, e))
    assert costs[0].examples == 6 and costs[0].bytes == (work / f"{expert}.safetensors").stat().st_size
    read = StatisticsFiles([work / f"{expert}.safetensors"])
    names = list(base.names())
    return {k: {n: getattr(read(n), k)[0] for n in names if getattr(read(n), k) is not None} for k in kinds}


@pytest.fixture(scope="module")
def expert_model(tiny_models):
    return AutoModelForCausalLM.from_pretrained(tiny_models["math"], dtype=torch.float32).eval()


def reference_tokens(tok, row: dict) -> tuple[list[int], list[bool]]:
    """The tokens of an example and which are reference tokens, by the training rule (chat template prompt,
    then answer + eos; plain text: every token after the first)."""
    if "text" in row:
        ids = tok(row["text"])["input_ids"]
        return ids, [False] + [True] * (len(ids) - 1)
    text = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    answer = tok(row["answer"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    return prompt + answer, [False] * len(prompt) + [True] * len(answer)


def test_reference_tokens_are_the_answer_and_eos(tiny_models, calib_file):
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    rows = [json.loads(line) for line in calib_file.read_text().splitlines()]
    calib = calibration(tiny_models, calib_file)
    assert [(list(s.ids), list(s.scored)) for s in calib.samples] == [reference_tokens(tok, r) for r in rows]
    assert calib.tokens == sum(len(s.ids) for s in calib.samples) and 0 < calib.scored < calib.tokens


def test_gram_is_over_attention_masked_tokens_whatever_the_padding(tiny_models, calib_file, expert_model, tmp_path):
    calib = calibration(tiny_models, calib_file)
    # layer 0's q_proj sees input_layernorm(embed(ids)): its Gram by hand, one example at a time (no padding)
    layer = expert_model.model.layers[0]
    total, tokens = torch.zeros(32, 32), 0
    with torch.no_grad():
        for s in calib.samples:
            x = layer.input_layernorm(expert_model.model.embed_tokens(torch.tensor([s.ids])))[0]  # [T, in]
            total += x.T @ x
            tokens += len(s.ids)
    for batch_size in (1, 4):  # 4: right-padded batches, whose pad tokens must not count
        stats = statistics(tiny_models, calib_file, tmp_path / f"b{batch_size}", "math", [KINDS[1]], batch_size)
        assert torch.allclose(stats["gram_in"][Q0], total / tokens, atol=1e-6), batch_size
    assert set(stats["gram_in"]) == set(LINEAR)
    # q, k and v read one tensor, as do gate and up: one Gram each, stored once (4 distinct inputs a layer)
    for layer in range(2):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        assert all(torch.equal(stats["gram_in"][f"{attn}.{m}.weight"], stats["gram_in"][f"{attn}.q_proj.weight"])
                   for m in ("k_proj", "v_proj"))
        assert torch.equal(stats["gram_in"][f"{mlp}.up_proj.weight"], stats["gram_in"][f"{mlp}.gate_proj.weight"])
        assert not torch.equal(stats["gram_in"][f"{attn}.o_proj.weight"], stats["gram_in"][f"{attn}.q_proj.weight"])
    with safe_open(str(tmp_path / "b4" / "math" / "math.safetensors"), framework="pt") as f:
        assert sum(k.startswith("gram_in/") for k in f.keys()) == 8


def test_fisher_is_the_mean_squared_gradient_of_the_reference_log_likelihood(tiny_models, calib_file, expert_model,
                                                                             tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    rows = [json.loads(line) for line in calib_file.read_text().splitlines()]
    params = dict(expert_model.named_parameters())
    by_hand = {n: torch.zeros_like(params[n]) for n in (DOWN1, "model.embed_tokens.weight", "model.norm.weight")}
    for row in rows:
        tokens, scored = reference_tokens(tok, row)
        ids = torch.tensor([tokens])
        logits = expert_model(input_ids=ids).logits[0, :-1]  # [T-1, V]
        answer = torch.tensor(scored[1:])  # chat: the answer (+ eos) only; text: every token after the first
        ll = torch.log_softmax(logits, -1)[answer].gather(1, ids[0, 1:][answer][:, None]).sum()
        grads = torch.autograd.grad(ll, [params[n] for n in by_hand])
        for n, g in zip(by_hand, grads):
            by_hand[n] += g.square()
    stats = statistics(tiny_models, calib_file, tmp_path, "math", [KINDS[0]])
    for n, f in by_hand.items():
        assert torch.allclose(stats["fisher"][n], f / len(rows), rtol=1e-4, atol=1e-10), n
    assert "lm_head.weight" not in stats["fisher"]  # tied: its gradient is the embedding's


def test_output_gradient_gram_is_over_masked_tokens(tiny_models, calib_file, expert_model, tmp_path):
    calib = calibration(tiny_models, calib_file)
    module = expert_model.model.layers[1].mlp.down_proj
    total = torch.zeros(32, 32)
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _a, out: seen.append(out))
    for s in calib.samples:
        seen.clear()
        ids = torch.tensor([s.ids])
        ll = log_likelihood(expert_model(input_ids=ids).logits, ids, torch.tensor([s.scored]))
        (g,) = torch.autograd.grad(ll, seen)  # [1, T, out]
        total += g[0].T @ g[0]
    handle.remove()
    stats = statistics(tiny_models, calib_file, tmp_path, "math", [KINDS[2]], batch_size=4)
    assert torch.allclose(stats["gram_out"][DOWN1], total / len(calib.samples), rtol=1e-4, atol=1e-9)


def test_lora_expert_statistics_equal_its_merged_checkpoint(tiny_models, calib_file, tmp_path):
    lora = statistics(tiny_models, calib_file, tmp_path / "lora", "lora_a")
    merged = statistics(tiny_models, calib_file, tmp_path / "merged", "lora_a_merged")
    base = statistics(tiny_models, calib_file, tmp_path / "base", "math")  # another expert: the statistics do differ
    for kind in KINDS:
        assert set(lora[kind]) == set(merged[kind]) and lora[kind]
        for name, t in lora[kind].items():
            scale = float(merged[kind][name].abs().max()) or 1.0
            assert torch.allclose(t, merged[kind][name], rtol=1e-4, atol=1e-5 * scale), (kind, name)
        assert any(not torch.allclose(t, base[kind][n], rtol=1e-2) for n, t in lora[kind].items()), kind


def data_config(tiny_models, tmp_path: Path, method: dict, experts=EXPERTS) -> dict:
    files = {n: write_jsonl(tmp_path / f"{n}.jsonl", chat_rows(4, seed=i)) for i, n in enumerate(experts)}
    return {"base": str(tiny_models["base"]), "shared": method, "exclusive": {"rank": 4},
            "experts": [{"name": n, "path": str(tiny_models[n]),
                         "calibration": {"data": str(files[n]), "batch_size": 2}} for n in experts]}


@pytest.mark.parametrize("method", [{"method": "fisher"}, {"method": "regmean", "alpha": 0.9},
                                    {"method": "mats", "objective": "kfac", "iterations": 30},
                                    {"method": "mats", "objective": "regmean"}])
def test_split_with_a_data_method_records_cost_and_solves(tiny_models, tmp_path, method, capsys):
    ticks = []
    cfg = parse_config(data_config(tiny_models, tmp_path, method))
    m = split(cfg, tmp_path / "art", progress=lambda total: (ticks.append([total, 0]),
                                                             lambda _: ticks[-1].__setitem__(1, ticks[-1][1] + 1))[1])
    art = Artifact.open(tmp_path / "art")  # verifies every file's sha256, statistics.json's included
    assert STATISTICS_FILE in m.files and not list((tmp_path / "art").rglob("*.statistics*"))
    record = json.loads((tmp_path / "art" / STATISTICS_FILE).read_text())
    assert [e["expert"] for e in record["experts"]] == list(EXPERTS) == art.experts
    assert all(e["examples"] == 4 and e["seconds"] > 0 and e["bytes"] > 0 and e["tokens"] > e["scored_tokens"] > 0
               for e in record["experts"])
    assert record["total"]["bytes"] == sum(e["bytes"] for e in record["experts"])
    assert ticks[:3] == [[4, 4]] * 3  # a bar per expert, then the merge's
    assert ticks[3][0] == ticks[3][1] == len(m.tensors)
    if method["method"] == "mats":
        assert set(record["tensors"]) == set(LINEAR)  # a CG solve per linear weight, nothing else
        assert all(0 < r["iterations"] <= method.get("iterations", 100) and r["residual"] >= 0
                   for r in record["tensors"].values())
    else:
        assert record["tensors"] == {}
    from twinrt.cli import main

    assert main(["inspect", str(tmp_path / "art")]) == 0
    out = capsys.readouterr().out
    assert "calibration statistics" in out and f"for {m.shared.method}): 3 experts" in out


def test_regmean_core_solves_linear_layers_and_averages_the_rest(tiny_models, tmp_path):
    from safetensors.torch import load_file

    split(parse_config(data_config(tiny_models, tmp_path, {"method": "regmean", "alpha": 1.0})), tmp_path / "art")
    core = load_file(tmp_path / "art" / "core" / "model.safetensors")
    experts = [load_file(tiny_models[n] / "model.safetensors") for n in EXPERTS]
    mean = {k: torch.stack([e[k] for e in experts]).mean(0) for k in core}
    assert torch.allclose(core["model.norm.weight"], mean["model.norm.weight"], atol=1e-6)
    assert not torch.allclose(core[Q0], mean[Q0], atol=1e-4)
