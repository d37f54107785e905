"""A stopped `twinrt eval` resumes from its journal (OUT/eval.partial.json): the steps it finished are read
back, not run again, and the resumed table equals the one an uninterrupted run gives."""

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

from helpers import write_word_suite
from twinrt.cli import main as twinrt_main
from twinrt.errors import TwinError
from twinrt.eval.journal import JOURNAL_NAME, Journal
from twinrt.eval.report import to_json
from twinrt.eval.run import EvalOptions, run_eval
from twinrt.eval.tasks import open_suite
from twinrt.runtime import TwinModel

OPTS = EvalOptions(limit=2, val_limit=2, max_new_tokens=2, calibration_samples=2,
                   methods=("ties", "fisher", "regmean"), twin_ranks=(2,))


class Stop(Exception):
    """Stands for the crash, reboot or Ctrl-C that ends a run midway."""


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory) -> Path:
    return write_word_suite(tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def model(tiny_artifact) -> TwinModel:
    return TwinModel.from_artifact(tiny_artifact)


@pytest.fixture(scope="module")
def uninterrupted(model, suite_dir) -> dict:
    return to_json(run_eval(model, open_suite(suite_dir), OPTS))


def _stopping_at(prefix: str, seen: list[str]):
    def progress(label: str, total: int):
        seen.append(label)
        if label.startswith(prefix):
            raise Stop(label)
        return lambda k: None

    return progress


def _recording(seen: list[str]):
    return lambda label, total: (seen.append(label), lambda k: None)[1]


def _same_table(a: dict, b: dict) -> None:
    """Everything but the wall-clock numbers."""
    assert list(a["arms"]) == list(b["arms"])
    for name in a["arms"]:
        for key in ("scores", "predictions", "params", "stored_bytes", "tokens", "mean_normalized"):
            assert a["arms"][name][key] == b["arms"][name][key], (name, key)
    assert a["selection"] == b["selection"] and a["twin_ranks"] == b["twin_ranks"] and a["router"] == b["router"]
    # the statistics pass of every data-based merge (a resume that computes them again computes all of them)
    assert [(s["expert"], s["examples"], s["tokens"], s["bytes"]) for s in a["statistics"]] == \
        [(s["expert"], s["examples"], s["tokens"], s["bytes"]) for s in b["statistics"]]


@pytest.mark.parametrize("stop_at,rerun,not_rerun", [
    # stopped in the second data-based merge: the statistics are computed again (all of them, as the
    # uninterrupted run's: fisher's too), the finished arms are not run again
    ("merge:regmean", ("statistics", "merge:regmean"), ("expert:", "merge:ties", "merge:fisher", "twin on core")),
    # stopped after every merge: no statistics pass, no merge, only the twin's arms
    ("twin:oracle", ("twin:oracle",), ("expert:", "merge:", "statistics", "twin on ", "core")),
])
def test_a_stopped_run_resumes_with_only_the_steps_it_lacks(model, suite_dir, uninterrupted, tmp_path, stop_at,
                                                             rerun, not_rerun) -> None:
    path = tmp_path / JOURNAL_NAME
    first: list[str] = []
    with pytest.raises(Stop):
        run_eval(model, open_suite(suite_dir), OPTS, journal=Journal(path), progress=_stopping_at(stop_at, first))
    recorded = json.loads(path.read_text())["steps"]
    assert "expert:math" in recorded and not any(k.startswith(stop_at) for k in recorded)

    again: list[str] = []
    journal = Journal(path, resume=True)
    res = run_eval(model, open_suite(suite_dir), OPTS, journal=journal, progress=_recording(again))
    recomputed = {"statistics"} if "statistics" in rerun else set()
    assert journal.resumed == [k for k in recorded if k not in recomputed]
    for prefix in rerun:
        assert any(label.startswith(prefix) for label in again), (prefix, again)
    for prefix in not_rerun:
        assert not any(label.startswith(prefix) for label in again), (prefix, again)
    _same_table(to_json(res), uninterrupted)


def test_without_resume_an_earlier_journal_is_started_over(model, suite_dir, tmp_path) -> None:
    path = tmp_path / JOURNAL_NAME
    with pytest.raises(Stop):
        run_eval(model, open_suite(suite_dir), OPTS, journal=Journal(path), progress=_stopping_at("core", []))
    seen: list[str] = []
    run_eval(model, open_suite(suite_dir), OPTS, journal=Journal(path), progress=_recording(seen))
    assert any(label.startswith("expert:") for label in seen)


@pytest.mark.parametrize("change,field", [
    ({"limit": 1}, "options.limit: 2 there, 1 here"),
    ({"methods": ("ties",)}, "options.methods"),
    ({"max_new_tokens": 3}, "options.max_new_tokens"),
])
def test_a_resume_with_other_settings_is_refused(model, suite_dir, tmp_path, change, field) -> None:
    path = tmp_path / JOURNAL_NAME
    with pytest.raises(Stop):
        run_eval(model, open_suite(suite_dir), OPTS, journal=Journal(path), progress=_stopping_at("merge:", []))
    before = path.read_bytes()
    opts = EvalOptions(**{**OPTS.__dict__, **change})
    with pytest.raises(TwinError, match="other settings") as e:
        run_eval(model, open_suite(suite_dir), opts, journal=Journal(path, resume=True))
    assert field in str(e.value)
    assert path.read_bytes() == before  # the refused resume loses nothing


def test_a_resume_with_another_metric_is_refused(model, suite_dir, tmp_path) -> None:
    path = tmp_path / JOURNAL_NAME
    with pytest.raises(Stop):
        run_eval(model, open_suite(suite_dir), OPTS, journal=Journal(path), progress=_stopping_at("merge:", []))
    other = tmp_path / "other"
    shutil.copytree(suite_dir, other)
    doc = json.loads((other / "suite.json").read_text())
    doc["tasks"][0]["metric"] = "numeric"
    (other / "suite.json").write_text(json.dumps(doc))
    with pytest.raises(TwinError, match=r"tasks\.math: \"exact\" there, \"numeric\" here"):
        run_eval(model, open_suite(other), OPTS, journal=Journal(path, resume=True))


def test_a_moved_artifact_resumes(tiny_artifact, suite_dir, tmp_path) -> None:
    """Where the artifact is does not count, what is in its manifest does."""
    path = tmp_path / JOURNAL_NAME
    opts = EvalOptions(limit=1, max_new_tokens=1, methods=("average",))
    with pytest.raises(Stop):
        run_eval(TwinModel.from_artifact(tiny_artifact), open_suite(suite_dir), opts, journal=Journal(path),
                 progress=_stopping_at("merge:", []))
    moved = shutil.copytree(tiny_artifact, tmp_path / "moved")
    seen: list[str] = []
    run_eval(TwinModel.from_artifact(moved), open_suite(suite_dir), opts, journal=Journal(path, resume=True),
             progress=_recording(seen))
    assert not any(label.startswith("expert:") for label in seen) and "merge:average" in seen


def test_a_resume_with_other_examples_is_refused(model, suite_dir, tmp_path) -> None:
    path = tmp_path / JOURNAL_NAME
    with pytest.raises(Stop):
        run_eval(model, open_suite(suite_dir), OPTS, journal=Journal(path), progress=_stopping_at("merge:", []))
    other = write_word_suite(tmp_path / "other", n=4)  # the first 2 test examples are the same, validation too
    (other / "math" / "test.jsonl").write_text((other / "math" / "test.jsonl").read_text().replace("cat", "cow"))
    with pytest.raises(TwinError, match="examples"):
        run_eval(model, open_suite(other), OPTS, journal=Journal(path, resume=True))


def test_cli_resume_needs_out_and_a_readable_journal(capsys, tiny_artifact, suite_dir, tmp_path) -> None:
    args = ["eval", str(tiny_artifact), "--tasks", str(suite_dir), "--limit", "1", "--methods", "none",
            "--no-router", "--max-new-tokens", "1", "-q"]
    assert twinrt_main(args + ["--resume"]) == 2
    assert "--resume continues the run recorded in --out DIR" in capsys.readouterr().err
    out = tmp_path / "out"
    out.mkdir()
    (out / JOURNAL_NAME).write_text("{not json")
    assert twinrt_main(args + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume from" in err and len(err.strip().splitlines()) == 1
    assert (out / JOURNAL_NAME).read_text() == "{not json"


def test_cli_finished_run_removes_its_journal(capsys, tiny_artifact, suite_dir, tmp_path) -> None:
    out = tmp_path / "out"
    args = ["eval", str(tiny_artifact), "--tasks", str(suite_dir), "--limit", "1", "--methods", "none",
            "--no-router", "--max-new-tokens", "1", "-q", "--out", str(out)]
    assert twinrt_main(args) == 0
    assert (out / "eval.json").is_file() and not (out / JOURNAL_NAME).exists()
    # a resume of a finished run (no journal left) runs it whole
    assert twinrt_main(args + ["--resume"]) == 0
    assert json.loads((out / "eval.json").read_text())["arms"]


def test_sigterm_during_the_statistics_pass_removes_its_temp_dir_and_keeps_the_journal(tiny_artifact, suite_dir,
                                                                                       tmp_path) -> None:
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "twinrt.cli", "eval", str(tiny_artifact), "--tasks", str(suite_dir),
                             "--limit", "2", "--val-limit", "2", "--max-new-tokens", "2", "--calibration-samples", "2",
                             "--methods", "regmean", "--no-router", "--out", str(out), "-q"],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(tmp.glob("twinrt-eval-statistics-*/*")) and proc.poll() is None:
        time.sleep(0.002)
    assert proc.poll() is None, f"the eval ended before its statistics pass: {proc.communicate()[1]}"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().endswith("twinrt: terminated") and "Traceback" not in err, err
    assert not list(tmp.iterdir()), "a temp dir was left behind"
    steps = json.loads((out / JOURNAL_NAME).read_text())["steps"]
    assert [k for k in steps if k.startswith("expert:")], steps  # the experts' arms ran before the statistics
