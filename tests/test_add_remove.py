"""`twinrt add` / `twinrt remove`: a new expert factored against the existing core gets exactly the files a full
split with that core gives it, the other files stay byte for byte, updates are atomic under SIGKILL, and bad
input is one line and exit 2 with the artifact untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_config
from twinrt.artifact import Artifact
from twinrt.cli import main
from twinrt.config import load_config
from twinrt.sources.checkpoint import sha256_file
from twinrt.split.run import split

ROOT = Path(__file__).resolve().parents[1]
TIES = {"method": "ties", "density": 0.5}


def run_cli(args: list, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def hashes(art: Path, *, skip: tuple[str, ...] = ("twin.json", "twin.json.sha256")) -> dict[str, str]:
    return {p.relative_to(art).as_posix(): sha256_file(p) for p in sorted(art.rglob("*"))
            if p.is_file() and p.relative_to(art).as_posix() not in skip}


def expert_tensors(art: Path, name: str) -> dict[str, torch.Tensor]:
    d = art / "experts" / name
    out = {f"factors:{k}": v for k, v in load_file(d / "adapter_model.safetensors").items()}
    if (d / "dense.safetensors").is_file():
        out.update({f"dense:{k}": v for k, v in load_file(d / "dense.safetensors").items()})
    return out


def assert_same_expert(a: Path, b: Path, name: str) -> None:
    ta, tb = expert_tensors(a, name), expert_tensors(b, name)
    assert ta.keys() == tb.keys() and ta
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert (a / "experts" / name / "adapter_config.json").read_bytes() == \
        (b / "experts" / name / "adapter_config.json").read_bytes()
    ma, mb = Artifact.open(a).manifest, Artifact.open(b).manifest
    assert {t: i.experts[name] for t, i in ma.tensors.items()} == {t: i.experts[name] for t, i in mb.tensors.items()}
    assert ma.sizes.experts[name] == mb.sizes.experts[name]


def make_split(tiny_models, out: Path, experts: list[str], shared=TIES, exclusive=None) -> Path:
    cfg = write_config(out.parent / f"{out.name}.yaml", tiny_models["base"], {n: tiny_models[n] for n in experts},
                       shared, exclusive or {"rank": 4})
    split(load_config(cfg), out)
    return out


@pytest.fixture(scope="module")
def three(tiny_models, tmp_path_factory) -> Path:
    """math, code, chat split with a TIES core: the reference every add/remove test compares with."""
    return make_split(tiny_models, tmp_path_factory.mktemp("three") / "art", ["math", "code", "chat"])


def test_remove_then_add_round_trips_to_identical_files(three, tiny_models, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(three, art)
    code, out, err = run_cli(["remove", art, "code", "-q"], capsys)
    assert code == 0, err
    assert out.count("\n") == 1 and "'code' is one the core was merged from" in out  # one line says so
    assert Artifact.open(art).experts == ["math", "chat"]  # the mix order of the rest is kept
    assert not (art / "experts" / "code").exists()
    assert hashes(art) == {k: v for k, v in hashes(three).items() if not k.startswith("experts/code/")}
    code, _, err = run_cli(["add", art, f"code={tiny_models['code']}", "--base", tiny_models["base"], "-q"], capsys)
    assert code == 0, err
    assert hashes(art) == hashes(three)  # every file (core, each expert's) byte for byte the split's
    assert_same_expert(art, three, "code")
    m = Artifact.open(art).manifest
    assert m.experts[-1].name == "code" and m.expert_names == ["math", "chat", "code"]


@pytest.mark.parametrize("new,exclusive", [("chat", {"rank": 4}), ("lora_a", {"energy": 0.9})])
def test_added_expert_equals_a_full_split_with_the_same_core(new, exclusive, tiny_models, tmp_path, capsys):
    """A core that ignores the experts (every tensor excluded from the merge: core = base) is the same with and
    without the new one, so the full split of all three is the reference for adding the third."""
    shared = {"method": "task_arithmetic", "exclude": [".*"]}
    two = make_split(tiny_models, tmp_path / "two", ["math", "code"], shared, exclusive)
    before = hashes(two)
    full = make_split(tiny_models, tmp_path / "full", ["math", "code", new], shared, exclusive)
    assert hashes(full, skip=("twin.json", "twin.json.sha256", f"experts/{new}"))  # sanity: there is a core
    code, _, err = run_cli(["add", two, f"{new}={tiny_models[new]}", "-q"], capsys)
    assert code == 0, err
    assert_same_expert(two, full, new)
    after = hashes(two)
    assert {k: v for k, v in after.items() if not k.startswith(f"experts/{new}/")} == before  # nothing else moved
    assert after == hashes(full)
    m = Artifact.open(two).manifest
    assert [e.kind for e in m.experts] == ["full", "full", Artifact.open(full).manifest.experts[2].kind]


def test_manifest_records_the_history(three, tiny_models, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(three, art)
    assert run_cli(["remove", art, "math", "-q"], capsys)[0] == 0
    assert run_cli(["add", art, f"extra={tiny_models['lora_b']}", "-q"], capsys)[0] == 0
    raw = json.loads((art / "twin.json").read_text())
    assert raw["shared"]["experts"] == ["math", "code", "chat"]  # what the core is made of, kept after removal
    ops = [(e["op"], e["experts"]) for e in raw["history"]]
    assert ops == [("split", ["math", "code", "chat"]), ("remove", ["math"]), ("add", ["extra"])]
    assert "core keeps its contribution" in raw["history"][1]["note"]
    assert all(e["at"] and e["twinrt_version"] for e in raw["history"])
    m = Artifact.open(art).manifest
    assert [m.in_core(n) for n in m.expert_names] == [True, True, False]
    code, out, _ = run_cli(["inspect", art], capsys)
    assert code == 0 and "added later: extra" in out and "removed (still in the core): math" in out


def test_a_manifest_without_history_reads_as_one_split(three, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(three, art)
    raw = json.loads((art / "twin.json").read_text())
    del raw["history"], raw["shared"]["experts"]
    (art / "twin.json").write_text(json.dumps(raw))
    (art / "twin.json.sha256").unlink()
    m = Artifact.open(art).manifest
    assert m.shared.experts == ["math", "code", "chat"] and [e.op for e in m.history] == ["split"]


# the child adds `chat` to ARTIFACT and SIGKILLs itself where the patch says: mid-write, after the staged state
# is complete (just before the swap), or right after the swap (before the old tree is removed)
CHILD = textwrap.dedent("""
    import os, signal, sys
    import twinrt.split.add as add
    import twinrt.artifact.store as store
    from twinrt.cli import main

    point = sys.argv[1]
    def die(*a, **k):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "writing":
        real = add.write_exclusive
        count = [0]
        def write(*a, **k):
            count[0] += 1
            if count[0] == 5:
                die()
            return real(*a, **k)
        add.write_exclusive = write
    elif point == "before swap":
        store.replace_dir = die
    else:
        real_exchange = store.exchange
        def exchange(a, b):
            assert real_exchange(a, b)
            die()
        store.exchange = exchange
    sys.exit(main(["add", sys.argv[2], "chat=" + sys.argv[3], "-q"]))
""")


@pytest.mark.parametrize("point,expect", [("writing", "old"), ("before swap", "old"), ("after swap", "new")])
def test_sigkill_during_add_leaves_a_verified_loadable_artifact(point, expect, three, tiny_models, tmp_path):
    from twinrt import TwinModel

    two = make_split(tiny_models, tmp_path / "art", ["math", "code"])
    before = hashes(two, skip=())
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.run([sys.executable, "-c", CHILD, point, str(two), str(tiny_models["chat"])], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(tmp_path.glob(".art.tmp-*")), "the kill left no staged dir: it did not happen midway"
    art = Artifact.open(two, verify=True)
    if expect == "old":
        assert hashes(two, skip=()) == before and art.experts == ["math", "code"]
    else:
        assert art.experts == ["math", "code", "chat"]
    tm = TwinModel.from_artifact(two, device="cpu", dtype="float32")
    assert tm.experts == art.experts
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.isfinite(tm.forward(ids, mix=torch.eye(len(tm.experts))[:1])).all()
    if expect == "old":  # the next add finishes the job and removes what the crash left
        assert main(["add", str(two), f"chat={tiny_models['chat']}", "-q"]) == 0
    else:
        assert main(["remove", str(two), "chat", "-q"]) == 0
    assert not list(tmp_path.glob(".art.tmp-*"))
    Artifact.open(two, verify=True)


def _with_config(src: Path, dst: Path, **edits) -> Path:
    """A copy of the model dir `src` whose config.json has `edits` (another fingerprint, or another shape)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **edits}))
    return dst


BAD = {
    "name taken": (lambda m, t: ["add", "{art}", f"code={m['chat']}"], "expert 'code' is already in"),
    "no =": (lambda m, t: ["add", "{art}", str(m["chat"])], "expected NAME=PATH"),
    "empty name": (lambda m, t: ["add", "{art}", f"={m['chat']}"], "expected NAME=PATH"),
    "empty path": (lambda m, t: ["add", "{art}", "extra="], "expected NAME=PATH"),
    "unsafe name": (lambda m, t: ["add", "{art}", f"../x={m['chat']}"], "expert name '../x' must be"),
    "reserved name": (lambda m, t: ["add", "{art}", f"core={m['chat']}"], "is reserved"),
    "missing path": (lambda m, t: ["add", "{art}", f"extra={t / 'nope'}"], "does not exist"),
    "other base": (lambda m, t: ["add", "{art}", f"extra={m['chat']}", "--base",
                                  _with_config(m["base"], t / "other", rope_theta=12345.0)],
                   "is not the base this artifact was split from"),
    "expert of another architecture": (
        lambda m, t: ["add", "{art}", f"extra={_with_config(m['chat'], t / 'arch', intermediate_size=128)}"],
        "intermediate_size is 128, the base has 64"),
    "remove unknown": (lambda m, t: ["remove", "{art}", "nope"], "unknown expert 'nope'"),
    "add to no artifact": (lambda m, t: ["add", t / "none", f"extra={m['chat']}"], "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, three, tiny_models, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(three, art)
    before = hashes(art, skip=())
    make, message = BAD[case]
    args = [str(a).replace("{art}", str(art)) for a in make(tiny_models, tmp_path)]
    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    assert err.startswith("twinrt: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert hashes(art, skip=()) == before
    assert not list(tmp_path.glob(".art.tmp-*"))


def test_a_router_is_refused_unless_dropped(three, tiny_models, tmp_path, capsys):
    art = tmp_path / "art"
    shutil.copytree(three, art)
    build = art / ".router.build-x"
    build.mkdir()
    (build / "router.json").write_text("{}")
    Artifact.open(art).install_part("router", build)
    before = hashes(art, skip=())
    for args in (["add", art, f"extra={tiny_models['lora_a']}"], ["remove", art, "chat"]):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and err.count("\n") == 1 and "pass --drop-router" in err, err
        assert hashes(art, skip=()) == before
    code, out, err = run_cli(["remove", art, "chat", "--drop-router", "-q"], capsys)
    assert code == 0, err
    assert "router" in out and not (art / "router").exists()
    m = Artifact.open(art).manifest
    assert m.sizes.router == 0 and not any(k.startswith("router/") for k in m.files)
    assert "dropped" in m.history[-1].note


def test_the_last_expert_cannot_be_removed(tiny_models, tmp_path, capsys):
    one = make_split(tiny_models, tmp_path / "one", ["math"])
    code, _, err = run_cli(["remove", one, "math"], capsys)
    assert code == 2 and "the only expert" in err and err.count("\n") == 1
