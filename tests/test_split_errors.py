"""The split's atomic writing, tamper detection, and one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import write_config
from twinrt.artifact import Artifact
from twinrt.cli import main
from twinrt.errors import TwinError

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def copy_model(src: Path, dst: Path, edit=None, dtype: torch.dtype | None = None) -> Path:
    shutil.copytree(src, dst)
    if edit or dtype:
        tensors = load_file(dst / "model.safetensors")
        if dtype:
            tensors = {k: v.to(dtype) for k, v in tensors.items()}
        if edit:
            edit(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture
def good(tiny_models, tmp_path):
    """A valid config writer: override base/experts/shared/exclusive per test."""
    def make(base=None, experts=None, shared=None, exclusive=None, **extra) -> Path:
        return write_config(tmp_path / "split.yaml", base or tiny_models["base"],
                            experts or {"math": tiny_models["math"], "code": tiny_models["code"]},
                            shared or {"method": "ties"}, exclusive or {"rank": 4}, **extra)
    return make


def _resize(tensors):
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(63, 32)


def _nan(tensors):
    tensors["model.norm.weight"][3] = float("nan")


def _inf(tensors):
    tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")


BAD_EXPERTS = {
    "missing": (lambda m, t: t / "nope", "does not exist"),
    "pickle": (lambda m, t: _pickle_dir(m["math"], t / "pkl"), "pickle-based weights (pytorch_model.bin)"),
    "shape": (lambda m, t: copy_model(m["math"], t / "shape", _resize),
              "tensor model.layers.1.mlp.up_proj.weight has shape [63, 32], the base has [64, 32]"),
    "dtype": (lambda m, t: copy_model(m["math"], t / "bf16", dtype=torch.bfloat16),
              "has dtype torch.bfloat16, the base has torch.float32"),
    "nan": (lambda m, t: copy_model(m["math"], t / "nan", _nan), "tensor model.norm.weight contains NaN or inf"),
    "inf": (lambda m, t: copy_model(m["math"], t / "inf", _inf), "q_proj.weight contains NaN or inf"),
    "architecture": (lambda m, t: _arch_dir(m["math"], t / "arch"), "intermediate_size is 128, the base has 64"),
    "lora_other_base": (lambda m, t: _lora_other_base(m["lora_a"], t / "lora"), "(adapter for another base?)"),
}


def _pickle_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    (dst / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    return dst


def _arch_dir(src: Path, dst: Path) -> Path:
    copy_model(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _lora_other_base(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    t = load_file(dst / "adapter_model.safetensors")
    key = next(k for k in t if "q_proj.lora_A" in k)
    t[key] = torch.zeros(t[key].shape[0], 48)
    save_file(t, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case", sorted(BAD_EXPERTS))
def test_bad_expert_is_one_line_exit_2(case, tiny_models, tmp_path, good, capsys):
    make, message = BAD_EXPERTS[case]
    cfg = good(experts={"math": make(tiny_models, tmp_path), "code": tiny_models["code"]})
    code, err = run_cli(["split", cfg, "-o", tmp_path / "out"], capsys)
    assert code == 2, err
    assert err.startswith("twinrt: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written left behind


BAD_CONFIGS = {
    "unknown method": (dict(shared={"method": "tiez"}), "unknown shared.method 'tiez'"),
    "unknown key": (dict(colour="blue"), "colour: unknown key"),
    "unknown method param": (dict(shared={"method": "average", "density": 0.3}), "does not take density"),
    "rank too large": (dict(exclusive={"rank": 100}), "exclusive.rank 100 is larger than every factored matrix"),
    "rank and energy": (dict(exclusive={"rank": 4, "energy": 0.9}), "exactly one of `rank`"),
    "missing base": (dict(base=Path("/nonexistent/base")), "base /nonexistent/base does not exist"),
    "consensus k": (dict(shared={"method": "consensus", "k": 3}), "shared.k=3 needs at least that many experts"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_config_is_one_line_exit_2(case, tmp_path, good, capsys):
    kwargs, message = BAD_CONFIGS[case]
    code, err = run_cli(["split", good(**kwargs), "-o", tmp_path / "out"], capsys)
    assert code == 2 and err.count("\n") == 1 and message in err, err


def test_bad_yaml_and_missing_config(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("base: [unclosed\n")
    code, err = run_cli(["split", tmp_path / "bad.yaml", "-o", tmp_path / "o"], capsys)
    assert code == 2 and "not valid YAML" in err and err.count("\n") == 1
    code, err = run_cli(["split", tmp_path / "none.yaml", "-o", tmp_path / "o"], capsys)
    assert code == 2 and "does not exist" in err


def test_existing_output_needs_force(tiny_models, tmp_path, good, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = run_cli(["split", good(), "-o", out], capsys)
    assert code == 2 and "already exists (pass --force" in err
    assert (out / "keep.txt").read_text() == "user data"
    (out / "keep.txt").unlink()
    code, err = run_cli(["split", good(), "-o", out, "--force", "-q"], capsys)   # an empty dir may be replaced
    assert code == 0, err
    assert Artifact.open(out).experts == ["math", "code"]
    code, err = run_cli(["split", good(experts={"chat": tiny_models["chat"]}), "-o", out, "--force", "-q"], capsys)
    assert code == 0, err                                                          # and so may an artifact
    assert Artifact.open(out).experts == ["chat"]


def test_killed_split_leaves_no_target(tiny_models, tmp_path):
    """SIGKILL while the split writes: the target never appears; the next split cleans the stale temp dir."""
    experts = {f"e{i}": tiny_models[n] for i, n in enumerate(["math", "code", "chat"] * 2)}
    cfg = write_config(tmp_path / "s.yaml", tiny_models["base"], experts, {"method": "ties"}, {"energy": 0.99})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "twinrt.cli", "split", str(cfg), "-o", str(out), "-q"], env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob(".out.tmp-*/core/config.json")):
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(tmp_path.glob(".out.tmp-*")), "the split finished before it could be killed midway"
    assert not out.exists()
    result = subprocess.run([sys.executable, "-m", "twinrt.cli", "split", str(cfg), "-o", str(out), "-q"], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert Artifact.open(out).experts == list(experts)
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_tampered_file_is_refused_by_name(tiny_artifact, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    Artifact.open(art)
    target = art / "experts" / "code" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(TwinError, match="file experts/code/adapter_model.safetensors does not match its sha256"):
        Artifact.open(art)
    code, err = run_cli(["inspect", art], capsys)
    assert code == 2 and "experts/code/adapter_model.safetensors" in err
    target.unlink()
    with pytest.raises(TwinError, match="experts/code/adapter_model.safetensors listed in twin.json is missing"):
        Artifact.open(art)


def test_wrong_format_version_is_refused(tiny_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifact, art)
    m = json.loads((art / "twin.json").read_text())
    m["format"] = "twinrt/9"
    (art / "twin.json").write_text(json.dumps(m))
    with pytest.raises(TwinError, match="format 'twinrt/9' is not supported"):
        Artifact.open(art)


def test_inspect_prints_the_summary(tiny_artifact, capsys):
    code = main(["inspect", str(tiny_artifact)])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("experts (mix order): math, code, chat", "ties", "checksums verified", "rank mean/max"):
        assert text in out


def _many_experts(m, n: int, lowest: str):
    """The manifest `m` with its first expert copied to n experts x0..x{n-1}, `lowest` keeping less energy."""
    first = m.experts[0]
    names = [f"x{i}" for i in range(n)]
    experts = [first.model_copy(update={"name": name}) for name in names]
    tensors = {}
    for key, t in m.tensors.items():
        info = t.experts[first.name]
        per = {name: info for name in names}
        if hasattr(info, "energy"):
            per[lowest] = info.model_copy(update={"energy": info.energy / 2})
        tensors[key] = t.model_copy(update={"experts": per})
    sizes = m.sizes.model_copy(update={"experts": {name: m.sizes.experts[first.name] for name in names}})
    return m.model_copy(update={"experts": experts, "tensors": tensors, "sizes": sizes})


def test_summary_of_many_experts_is_one_row_per_source_kind(tiny_artifact):
    from rich.console import Console

    from twinrt.artifact.report import summary_table

    def render(table) -> str:
        console = Console(width=200, record=True)
        console.print(table)
        return console.export_text()

    m = _many_experts(Artifact.open(tiny_artifact).manifest, 40, lowest="x17")
    short = render(summary_table(m))
    assert "40 (x0 … x39)" in short and "least energy kept: x17" in short
    assert "x5 " not in short  # no row per expert
    full = render(summary_table(m, per_expert=True))
    assert all(f"x{i} " in full for i in range(40)) and "all 40" in full
    few = render(summary_table(_many_experts(m, 3, lowest="x1")))
    assert "x0 " in few and "x2 " in few and "least energy" not in few
