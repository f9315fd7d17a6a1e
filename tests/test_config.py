"""Project-file validation: each bad input is one line on stderr, exit code 2, no traceback."""

import pytest

from nichelm.config import load_project
from nichelm.errors import UserError
from tests.conftest import run_cli


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("nichelm: error:")]
    assert len(errors) == 1, proc.stderr           # progress lines may come before it, the error is one line
    assert proc.stderr.rstrip().endswith(errors[0])
    for frag in fragments:
        assert frag in errors[0], errors[0]


def test_missing_project_file(tmp_path):
    assert_user_error(run_cli("prepare", tmp_path / "nope.toml"), "nope.toml", "not found")


def test_invalid_toml(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("run_dir = \n[[[")
    assert_user_error(run_cli("prepare", p), "bad.toml", "not valid TOML")


def test_unknown_key(tiny_project):
    text = tiny_project.read_text().replace("[train]", "[train]\nmax_stepz = 3")
    tiny_project.write_text(text)
    assert_user_error(run_cli("train", tiny_project), "unknown key 'train.max_stepz'")


def test_wrong_type(tiny_project):
    assert_user_error(run_cli("prepare", tiny_project, "--set", "train.max_steps=abc"),
                      "'train.max_steps' must be int")


def test_missing_source_file(tiny_project):
    text = tiny_project.read_text().replace('path = "clean"', 'path = "missing.txt"')
    tiny_project.write_text(text)
    assert_user_error(run_cli("prepare", tiny_project), "sources[0].path", "missing.txt", "does not exist")


def test_empty_source(tiny_project):
    empty = tiny_project.parent / "empty.txt"
    empty.write_text("")
    tiny_project.write_text(tiny_project.read_text().replace('path = "clean"', 'path = "empty.txt"'))
    assert_user_error(run_cli("prepare", tiny_project), "empty.txt")


def test_jsonl_line_not_json(tiny_project):
    pairs = tiny_project.parent / "pairs.jsonl"
    lines = pairs.read_text().splitlines()
    lines[4] = "{not json"
    pairs.write_text("\n".join(lines) + "\n")
    assert_user_error(run_cli("prepare", tiny_project), "pairs.jsonl:5")


def test_csv_without_columns(tmp_path, tiny_project):
    csv_path = tiny_project.parent / "table.csv"
    csv_path.write_text("a,b\n1,2\n")
    text = tiny_project.read_text().replace('path = "pairs.jsonl"\nformat = "jsonl"', 'path = "table.csv"\nformat = "csv"')
    text = text.replace('input_field = "ocr"\noutput_field = "gold"\nid_field = "id"\n', "")
    tiny_project.write_text(text)
    assert_user_error(run_cli("prepare", tiny_project), "table.csv", "OCR Text")


def test_overrides_and_run_dir(tiny_project, tmp_path):
    p = load_project(tiny_project, ["train.max_steps=200", f"run_dir={tmp_path / 'elsewhere'}", "train.lr=1e-3"])
    assert p.train.max_steps == 200 and p.train.lr == 1e-3
    assert p.run_path == tmp_path / "elsewhere"
    p = load_project(tiny_project, ["sources.0.licence=CC0"])
    assert p.sources[0].licence == "CC0"


def test_bad_override_value_raises_user_error(tiny_project):
    with pytest.raises(UserError, match="model.arch"):
        load_project(tiny_project, ["model.arch=mamba"])
    with pytest.raises(UserError, match="eval.draft_tokens' is 40; use 0"):
        load_project(tiny_project, ["eval.draft_tokens=40"])
    assert load_project(tiny_project, ["eval.draft_tokens=0"]).eval.draft_tokens == 0


def test_python_dash_m_works():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "quickstart" in proc.stdout
