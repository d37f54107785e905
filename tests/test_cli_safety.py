"""A hostile or careless user against the command line and the artifact: what --force may replace, one-line
errors instead of tracebacks, SIGTERM cleanup, expert names and paths, the manifest digest, a crash during
a router swap, and pickle-only encoders."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import prompts_jsonl, write_config
from twinrt.artifact import Artifact, store
from twinrt.artifact.manifest import check_expert_name
from twinrt.cli import main
from twinrt.errors import TwinError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_EXPERTS = ("date_us", "date_iso", "price_us", "price_de", "number_words", "capital")


def one_line_error(argv: list, capsys) -> str:
    """Run the CLI in-process; assert Contract 2's user error (exit 2, one line, no traceback); the line."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("twinrt: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def copy_art(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(art: Path, edit, *, digest: str = "refresh") -> None:
    """Change twin.json; digest "refresh" rewrites twin.json.sha256 to match, "drop" deletes it, "keep" keeps it."""
    m = json.loads((art / "twin.json").read_text())
    edit(m)
    data = json.dumps(m, indent=1).encode()
    (art / "twin.json").write_bytes(data)
    if digest == "refresh":
        (art / "twin.json.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  twin.json\n")
    elif digest == "drop":
        (art / "twin.json.sha256").unlink()


@pytest.fixture
def cfg(tiny_models, tmp_path) -> Path:
    return write_config(tmp_path / "split.yaml", tiny_models["base"], {"math": tiny_models["math"]},
                        {"method": "task_arithmetic"}, {"rank": 2})


# ---- --force replaces only an artifact ------------------------------------------------------------------


def test_force_refuses_a_directory_that_is_not_an_artifact(tiny_models, tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    (out / "sub").mkdir()
    (out / "sub" / "twin.json").write_text('{"format": "twinrt/1"}')   # nested, so not this dir's manifest
    cfg = write_config(tmp_path / "split.yaml", tiny_models["base"], {"math": tiny_models["math"]},
                       {"method": "task_arithmetic"}, {"rank": 2})
    before = snapshot(out)
    err = one_line_error(["split", cfg, "-o", out, "--force", "-q"], capsys)
    assert f"output {out} is not a twinrt artifact" in err
    assert snapshot(out) == before
    (out / "twin.json").write_text('{"format": "twinrt/0"}')            # another format is not ours either
    assert "is not a twinrt artifact" in one_line_error(["split", cfg, "-o", out, "--force", "-q"], capsys)
    assert (out / "notes.txt").read_text() == "user data"
    (tmp_path / "file").write_text("x")
    err = one_line_error(["split", cfg, "-o", tmp_path / "file", "--force", "-q"], capsys)
    assert "is not a directory" in err and (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("inside", ["config file", "base", "expert 'math'"])
def test_output_may_not_contain_the_config_or_a_source(inside, tiny_models, tiny_artifact, tmp_path, capsys):
    out = copy_art(tiny_artifact, tmp_path / "out")        # an artifact, so --force alone would replace it
    base, math = tiny_models["base"], tiny_models["math"]
    if inside == "base":
        base = Path(shutil.copytree(base, out / "base"))
    if inside == "expert 'math'":
        math = Path(shutil.copytree(math, out / "math"))
    where = out if inside == "config file" else tmp_path
    cfg = write_config(where / "split.yaml", base, {"math": math}, {"method": "task_arithmetic"}, {"rank": 2})
    before = snapshot(out)
    err = one_line_error(["split", cfg, "-o", out, "--force", "-q"], capsys)
    assert f"output {out} contains the {inside}" in err
    assert snapshot(out) == before


# ---- tracebacks that are now one line --------------------------------------------------------------------


def test_output_that_cannot_be_created(cfg, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    err = one_line_error(["split", cfg, "-o", tmp_path / "a-file" / "out", "-q"], capsys)
    assert "cannot create" in err and "a-file" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_output_in_a_read_only_directory(cfg, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "Permission denied" in one_line_error(["split", cfg, "-o", ro / "out", "-q"], capsys)
    finally:
        ro.chmod(0o700)


def _device_commands(cfg: Path, art: Path, data: Path, tmp_path: Path) -> dict[str, list]:
    return {"split": ["split", cfg, "-o", tmp_path / "out", "-q"],
            "router train": ["router", "train", art, "--data", data, "--kind", "prototype"],
            "router eval": ["router", "eval", art, "--data", data],
            "eval": ["eval", art, "--tasks", tmp_path]}


@pytest.mark.parametrize("command", ["split", "router train", "router eval", "eval"])
def test_bad_or_missing_device(command, cfg, tiny_artifact, tmp_path, capsys, monkeypatch):
    data = prompts_jsonl(tmp_path / "d.jsonl", 6)
    argv = _device_commands(cfg, tiny_artifact, data, tmp_path)[command]
    err = one_line_error([*argv, "--device", "bogus"], capsys)
    assert "--device 'bogus' is not a torch device" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = one_line_error([*argv, "--device", "cuda"], capsys)
    assert "--device 'cuda': CUDA is not available" in err
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def routed(tiny_artifact, tmp_path_factory) -> Path:
    """A copy of the tiny artifact with a prototype router."""
    root = tmp_path_factory.mktemp("routed")
    art = copy_art(tiny_artifact, root / "artifact")
    assert main(["router", "train", str(art), "--data", str(prompts_jsonl(root / "t.jsonl", 6)),
                 "--kind", "prototype"]) == 0
    return art


@pytest.mark.parametrize("command", ["train", "eval"])
def test_data_with_a_lone_surrogate(command, routed, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "what is 2 + 2", "expert": "math"}\n{"text": "hi \\ud800", "expert": "chat"}\n'
                    '{"text": "def f(): pass", "expert": "code"}\n')      # enough to train on, but for line 2
    argv = ["router", command, routed, "--data", data] + (["--kind", "prototype", "--holdout", "0"]
                                                          if command == "train" else [])
    err = one_line_error(argv, capsys)
    assert f"{data}:2: the text has an unpaired UTF-16 surrogate" in err
    Artifact.open(routed)                                   # the failed train left the artifact as it was


def test_renamed_expert_is_refused_naming_the_manifest(tiny_artifact, tmp_path, capsys):
    for digest in ("refresh", "drop"):      # a digest that matches the edit, or an artifact from before digests
        art = copy_art(tiny_artifact, tmp_path / f"art-{digest}")
        edit_manifest(art, lambda m: m["experts"][1].update(name="kode"), digest=digest)
        for flags in ([], ["--no-verify"]):
            err = one_line_error(["inspect", art, *flags], capsys)
            assert f"{art / 'twin.json'} is inconsistent" in err and "renamed" in err, err
        with pytest.raises(TwinError, match="twin.json is inconsistent"):
            Artifact.open(art, verify=False)


# ---- expert names and paths ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../../outside", "a/b", "..", ".hidden", "a..b", "x" * 65, "", "core",
                                  "math\n", "a:b", "a\\b"])
def test_unsafe_expert_names_are_refused(name, tiny_models, tiny_artifact, tmp_path, capsys):
    with pytest.raises(ValueError):
        check_expert_name(name)
    cfg = write_config(tmp_path / "split.yaml", tiny_models["base"], {name: tiny_models["math"]},
                       {"method": "task_arithmetic"}, {"rank": 2})
    assert "invalid split config: experts.0.name" in one_line_error(["split", cfg, "-o", tmp_path / "o"], capsys)
    art = copy_art(tiny_artifact, tmp_path / "art")
    edit_manifest(art, lambda m: m["experts"][1].update(name=name))
    err = one_line_error(["inspect", art], capsys)
    assert f"{art / 'twin.json'} is malformed at experts.1.name" in err


def test_the_example_expert_names_stay_valid():
    for name in (*EXAMPLE_EXPERTS, "math", "v1.2-lora", "A_b.c-9", "x" * 64):
        assert check_expert_name(name) == name


def test_paths_in_files_must_stay_inside(tiny_artifact, tmp_path, capsys):
    art = copy_art(tiny_artifact, tmp_path / "art")
    outside = tmp_path / "outside.txt"
    outside.write_text("secret")
    edit_manifest(art, lambda m: m["files"].update({"../outside.txt": hashlib.sha256(b"secret").hexdigest()}))
    assert "'../outside.txt' is not a plain relative path" in one_line_error(["inspect", art], capsys)


def test_symlinks_out_of_the_artifact_are_refused(tiny_artifact, tmp_path, capsys):
    art = copy_art(tiny_artifact, tmp_path / "art")
    elsewhere = Path(shutil.copytree(art / "experts" / "code", tmp_path / "elsewhere"))
    shutil.rmtree(art / "experts" / "code")
    (art / "experts" / "code").symlink_to(elsewhere)          # same bytes, but outside the artifact
    assert "outside the artifact" in one_line_error(["inspect", art], capsys)
    unverified = Artifact.open(art, verify=False)
    with pytest.raises(TwinError, match="experts/code resolves to .* outside the artifact"):
        unverified.expert_dir("code")
    shutil.rmtree(art / "core")
    (art / "core").symlink_to(tmp_path)
    with pytest.raises(TwinError, match="core resolves to .* outside the artifact"):
        _ = unverified.core_dir


# ---- the manifest's digest -------------------------------------------------------------------------------


def test_split_writes_the_manifest_digest(tiny_artifact):
    line = (tiny_artifact / "twin.json.sha256").read_text()
    assert line == f"{hashlib.sha256((tiny_artifact / 'twin.json').read_bytes()).hexdigest()}  twin.json\n"
    assert "twin.json.sha256" not in Artifact.open(tiny_artifact).manifest.files


def test_tampered_manifest_is_refused(tiny_artifact, tmp_path, capsys, caplog):
    art = copy_art(tiny_artifact, tmp_path / "art")
    edit_manifest(art, lambda m: m["base"].update(source="/somewhere/else"), digest="keep")
    err = one_line_error(["inspect", art], capsys)
    assert "twin.json does not match its sha256 in twin.json.sha256" in err
    assert main(["inspect", str(art), "--no-verify"]) == 0      # the checks the user asked to skip
    (art / "twin.json.sha256").write_text("not a digest\n")
    assert "twin.json.sha256 is malformed" in one_line_error(["inspect", art], capsys)
    (art / "twin.json.sha256").unlink()                         # an artifact written before digests: opens
    with caplog.at_level(logging.WARNING, logger="twinrt.artifact.store"):
        assert Artifact.open(art).manifest.base.source == "/somewhere/else"
    assert "has no twin.json.sha256" in caplog.text


# ---- a crash during a router swap ------------------------------------------------------------------------


def _router_build(art: Path, text: str) -> Path:
    build = art / f".router.build-{text}"
    build.mkdir()
    (build / "router.json").write_text(text)
    return build


def _crash_during_install(art: Path, text: str, patch) -> int:
    """install_part in a forked child that dies (os._exit, no cleanup) where `patch(monkeypatch)` says."""
    pid = os.fork()
    if pid == 0:
        try:
            mp = pytest.MonkeyPatch()
            patch(mp)
            Artifact.open(art).install_part("router", _router_build(art, text))
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def _die(*args, **kwargs):
    os._exit(17)


def _exchange_then_die(real):
    def go(a, b):
        real(a, b)
        os._exit(17)
    return go


CRASH_POINTS = {
    "after the router swap, before the manifest": (lambda mp: mp.setattr(store, "write_manifest", _die), "old"),
    "right after the artifact swap": (lambda mp: mp.setattr(store, "exchange", _exchange_then_die(store.exchange)),
                                      "new"),
}


@pytest.mark.parametrize("point", sorted(CRASH_POINTS))
def test_router_swap_crash_leaves_a_verifying_artifact(point, tiny_artifact, tmp_path):
    art = copy_art(tiny_artifact, tmp_path / "art")
    Artifact.open(art).install_part("router", _router_build(art, "old"))
    patch, expect = CRASH_POINTS[point]
    status = _crash_during_install(art, "new", patch)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 17, "the injected crash did not happen"
    opened = Artifact.open(art, verify=True)                    # old router + old manifest, or new + new
    assert (opened.router_dir / "router.json").read_text() == expect
    opened.install_part("router", _router_build(art, "next"))   # the next write cleans what the crash left
    assert (Artifact.open(art).router_dir / "router.json").read_text() == "next"
    assert not list(art.glob(".router.*")) and not list(tmp_path.glob(".art.*"))


# ---- SIGTERM ---------------------------------------------------------------------------------------------


def test_sigterm_during_split_removes_the_temp_dir(tiny_models, tiny_artifact, tmp_path):
    out = copy_art(tiny_artifact, tmp_path / "out")            # the previous artifact, replaced with --force
    before = snapshot(out)
    experts = {f"e{i}": tiny_models[n] for i, n in enumerate(["math", "code", "chat"] * 2)}
    cfg = write_config(tmp_path / "s.yaml", tiny_models["base"], experts, {"method": "ties"}, {"energy": 0.99})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "twinrt.cli", "split", str(cfg), "-o", str(out), "--force", "-q"],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(tmp_path.glob(".out.tmp-*/core/config.json")):
        time.sleep(0.002)
    assert list(tmp_path.glob(".out.tmp-*")), "the split finished before it could be stopped midway"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip() == "twinrt: terminated" and "Traceback" not in err
    assert not list(tmp_path.glob(".out.*")), "a temp dir was left behind"
    assert snapshot(out) == before
    assert Artifact.open(out).experts == ["math", "code", "chat"]


# ---- the router encoder loads from safetensors only -------------------------------------------------------


def test_pickle_only_encoder_is_refused(routed, tmp_path, capsys):
    enc = tmp_path / "encoder"
    enc.mkdir()
    (enc / "config.json").write_text('{"model_type": "bert"}')
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(4, 4)}, enc / "pytorch_model.bin")
    before = snapshot(routed)
    err = one_line_error(["router", "train", routed, "--data", prompts_jsonl(tmp_path / "d.jsonl", 6),
                          "--kind", "prototype", "--encoder", enc], capsys)
    assert f"router encoder {enc} has only pickle-based weights (pytorch_model.bin)" in err
    assert snapshot(routed) == before
    (enc / "pytorch_model.bin").unlink()
    err = one_line_error(["router", "train", routed, "--data", tmp_path / "d.jsonl", "--kind", "prototype",
                          "--encoder", enc], capsys)
    assert "has no *.safetensors weights" in err
