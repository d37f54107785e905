"""Bad calibration input to `twinrt split` is one line on stderr and exit 2, before anything is written: a missing or
empty file, a malformed line, an example longer than the model's context, a data method with an expert that has
no data; the calibration config is validated (and resolved against the config's directory) like the rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from twinrt.cli import main
from twinrt.config import load_config, parse_config
from twinrt.errors import TwinError

LONG = "the quick brown fox jumps over the lazy dog " * 40  # > 128 tokens, the tiny model's context
GOOD = {"messages": [{"role": "user", "content": "hello world"}], "answer": "bonjour le monde"}


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def config(tiny_models, tmp_path: Path, calib: dict | str | None, method: str = "regmean", **other) -> Path:
    good = write(tmp_path / "good.jsonl", [json.dumps(GOOD)] * 3)
    experts = [{"name": "math", "path": str(tiny_models["math"]), **({} if calib is None else {"calibration": calib})},
               {"name": "code", "path": str(tiny_models["code"]), "calibration": str(good)}]
    cfg = {"base": str(tiny_models["base"]), "experts": experts, "shared": {"method": method, **other},
           "exclusive": {"rank": 4}}
    (tmp_path / "split.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return tmp_path / "split.yaml"


def lines_file(name: str, lines: list[str]):
    return lambda tmp: str(write(tmp / name, lines))


BAD = {
    "missing file": (lambda tmp: str(tmp / "nope.jsonl"), "expert 'math': calibration data", "does not exist"),
    "empty file": (lines_file("empty.jsonl", ["", "  "]), "expert 'math': calibration data", "has no examples"),
    "a directory": (lambda tmp: str(tmp), "expert 'math': calibration data", "is not a file"),
    "not JSON": (lines_file("bad.jsonl", [json.dumps(GOOD), "{nope"]), "bad.jsonl:2: not valid JSON", ""),
    "neither format": (lines_file("odd.jsonl", [json.dumps({"prompt": "x"})]), "odd.jsonl:1: expected", "(chat)"),
    "chat without answer": (lines_file("noanswer.jsonl", [json.dumps({"messages": GOOD["messages"]})]),
                            "noanswer.jsonl:1: a chat example needs a non-empty string 'answer'", ""),
    "bad messages": (lines_file("msg.jsonl", [json.dumps({"messages": [{"role": 1}], "answer": "a"})]),
                     "msg.jsonl:1: message 0 must have a string 'role'", ""),
    "longer than the context": (lines_file("long.jsonl", [json.dumps(GOOD), json.dumps({"text": LONG})]),
                                "long.jsonl:2: the example is", "tokens, longer than the model's context of 128"),
    "first over max_tokens": (lambda tmp: {"data": lines_file("few.jsonl", [json.dumps(GOOD)])(tmp), "max_tokens": 3},
                              "few.jsonl:1: the first example is", "more than max_tokens 3"),
    "bad samples": (lambda tmp: {"data": "x.jsonl", "samples": 0}, "experts.0.calibration.samples:", "greater than"),
    "unknown key": (lambda tmp: {"data": "x.jsonl", "tokens": 5}, "experts.0.calibration.tokens: unknown key", ""),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_calibration_is_one_line_exit_2(case, tiny_models, tmp_path, capsys):
    make, first, second = BAD[case]
    cfg = config(tiny_models, tmp_path, make(tmp_path))
    code = main(["split", str(cfg), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("twinrt: error: ") and err.count("\n") == 1, err
    assert first in err and second in err, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_a_data_method_refuses_an_expert_without_data(tiny_models, tmp_path, capsys):
    cfg = config(tiny_models, tmp_path, None, method="mats")
    assert main(["split", str(cfg), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == ("twinrt: error: shared.method 'mats' needs calibration data for every expert; 'math' has none "
                   "(add `calibration: FILE.jsonl` to the expert)\n")
    data_free = load_config(config(tiny_models, tmp_path, None, method="ties"))  # data-free: none needed
    assert data_free.experts[0].calibration is None


def test_calibration_paths_resolve_against_the_config_and_take_defaults(tiny_models, tmp_path):
    (tmp_path / "sub").mkdir()
    cfg = load_config(config(tiny_models, tmp_path, "sub/math.jsonl"))
    c = cfg.experts[0].calibration
    assert (c.data, c.samples, c.max_tokens, c.batch_size) == (tmp_path / "sub" / "math.jsonl", 128, None, 8)
    with pytest.raises(TwinError, match="needs calibration data for every expert; 'a', 'b' have none"):
        parse_config({"base": "b", "experts": [{"name": "a", "path": "a"}, {"name": "b", "path": "b"}],
                      "shared": {"method": "fisher"}, "exclusive": {"rank": 1}})
