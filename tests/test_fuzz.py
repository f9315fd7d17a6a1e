"""Fuzzing the readers and the project-file parser: any input gives documents or a one-line UserError.

The generators and the property live in tests/fuzz_strategies.py; bench/fuzz_readers.py runs the
same property at 10,000+ inputs per reader. Here each reader gets CI_EXAMPLES derandomized inputs
(the same ones every run), then the crashes the fuzzer found are pinned as plain regression tests.
"""

import gzip
import json

import pytest

from nichelm.config import load_project
from nichelm.data.readers import Document, Segment, read_documents
from nichelm.errors import UserError
from tests.fuzz_strategies import STRATEGIES, check_documents, check_message, run_property

CI_EXAMPLES = 500


@pytest.mark.parametrize("reader", list(STRATEGIES))
def test_any_input_gives_documents_or_a_one_line_user_error(reader):
    stats = run_property(reader, CI_EXAMPLES)
    assert stats.inputs >= CI_EXAMPLES
    # Both sides of the property are reached: the inputs are not all rejected at the first check.
    assert stats.documents >= CI_EXAMPLES // 20, stats
    assert stats.user_errors >= CI_EXAMPLES // 20, stats


# --------------------------------------------------------------------------- the checker can fail


def test_checker_refuses_multi_line_unnamed_or_unlined_messages(tmp_path):
    f = tmp_path / "d.jsonl"
    check_message(f"{f}:2: not valid JSON (x); fix it", [f], {f: 3})
    for bad in (f"{f}: one\ntwo", "no file named here", f"{f}: not valid JSON (x)", f"{f}:9: not valid JSON"):
        with pytest.raises(AssertionError):
            check_message(bad, [f], {f: 3})


def test_checker_refuses_unwritable_text_duplicate_ids_and_lost_text():
    check_documents([Document("a", [Segment(None, "some text")])], window=20)
    for docs in ([Document("a", [Segment(None, "lone \ud800 surrogate")])],
                 [Document("a", [Segment(None, "x")]), Document("a", [Segment(None, "y")])]):
        with pytest.raises((AssertionError, UnicodeEncodeError)):
            check_documents(docs, window=20)
    with pytest.raises(AssertionError):     # the text format must give the file back
        check_documents([Document("a", [Segment(None, "abc")])], window=20, expected_text="abd")


# --------------------------------------------------------------------------- readers: what the fuzzer found


def one_line_error(call, *fragments):
    with pytest.raises(UserError) as e:
        call()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


@pytest.mark.parametrize("line, fragment", [
    ('{"output": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply"),   # was RecursionError
    ('{"output": "x", "n": ' + "1" * 5000 + "}", "JSON number too long"),              # was ValueError
    ('{"output": "a\\ud800b"}', "lone surrogate"),                                     # later UTF-8 writes failed
    ('{"output": "ok", "id": "x\\udc00"}', "lone surrogate"),
    ('{"a\\nb": 1}', "no field 'output' (fields: 'a\\nb')"),                            # key printed raw: 2 lines
])
def test_jsonl_bad_line_is_named(tmp_path, line, fragment):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(('{"output": "fine", "id": "a"}\n' + line + "\n").encode()))
    one_line_error(lambda: read_documents(path, "jsonl", id_field="id" if '"id"' in line else None),
                   f"{path}:2: ", fragment)


def test_jsonl_surrogate_pair_escape_is_text(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"output": "smile \U0001f600"}) + "\n")    # written as "\ud83d\ude00"
    [doc] = read_documents(path, "jsonl")
    assert doc.segments[0].output == "smile \U0001f600"


def test_csv_column_setting_that_isdigit_but_is_no_number(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,text\n1,hello\n")
    one_line_error(lambda: read_documents(path, "csv", input_field="", text_field="\u00b2"),   # '²': was ValueError
                   str(path), "no column '\u00b2'")


# --------------------------------------------------------------------------- project file: what the fuzzer found


@pytest.fixture
def project(tmp_path):
    (tmp_path / "data.txt").write_text("hello world\n")
    p = tmp_path / "p.toml"
    p.write_text('seed = 3\nrun_dir = "r"\n[[sources]]\npath = "data.txt"\n')
    return p


@pytest.mark.parametrize("toml, fragments", [
    ("x = " + "[" * 2000 + "]" * 2000, ["nested too deeply"]),             # was RecursionError
    ("x = " + "1" * 5000, ["integer too long"]),                              # was ValueError
    ("[train]\nlr = 1" + "0" * 400, ["'train.lr' must be float", "(401 characters)"]),  # was OverflowError
    ('"a\\nb" = 1', ["unknown key 'a\\nb'"]),                                 # the newline was printed raw
    ("x = 1\ny = \n", [":2: not valid TOML (Invalid value at column 5)"]),
])
def test_project_file_errors_are_one_line(project, toml, fragments):
    project.write_text(toml + "\n" + project.read_text())
    one_line_error(lambda: load_project(project), str(project), *fragments)


def test_project_file_bom_is_accepted_and_bad_utf8_names_the_line(project):
    project.write_bytes(b"\xef\xbb\xbf" + project.read_bytes())
    assert load_project(project).sources[0].path == "data.txt"
    project.write_bytes(b'seed = 1\nrun_dir = "\xff"\n' + project.read_bytes())
    one_line_error(lambda: load_project(project), f"{project}:2: not UTF-8 text (byte 0xff)")


@pytest.mark.parametrize("override, fragments", [
    ("seed.x=1", ["--set seed.x: 'seed' holds 3, not a table"]),                  # was TypeError
    ("run_dir.x.y=1", ["'run_dir' holds 'r', not a table"]),                     # was TypeError
    ("sources.1.path=x", ["no list item '1' (the list has 1)"]),
    ("sources.\u00b2.path=x", ["no list item '\u00b2'"]),
    ("sources.-1.path=x", ["no list item '-1'"]),                                 # was: silently the last item
    ("seed=" + "1" * 5000, ["'seed' must be int", "(5002 characters)"]),         # was ValueError
    ("a\nb=1", ["unknown key 'a\\nb'"]),
])
def test_bad_override_is_one_line(project, override, fragments):
    one_line_error(lambda: load_project(project, [override]), *fragments)


def test_override_of_a_list_item_still_works(project):
    assert load_project(project, ["sources.0.licence=CC0"]).sources[0].licence == "CC0"


# validate() is another module's to fix (see fuzz_strategies._path_ok): these source paths still
# crash it or give a two-line message. strict: once validate() handles one, its test XPASSes and
# fails, so the mark and the matching part of _path_ok are removed together.
@pytest.mark.parametrize("path", ["~nosuchuser_nichelm/x", "package:nope_nichelm.sub/x", "package:.x/y",
                                  "a" * 300, "x\\ny"])
def test_validate_known_issues(project, path):
    project.write_text(f'[[sources]]\npath = "{path}"\n')
    one_line_error(lambda: load_project(project), str(project))


# The same for run_dir: load_project accepts it, then Project.run_path (which every stage calls) raises
# ValueError (NUL) or RuntimeError (unknown user). Not fuzzed until validate() checks run_dir.
@pytest.mark.parametrize("run_dir", ["a\\u0000b", "~nosuchuser_nichelm/run"])
def test_run_dir_known_issues(project, run_dir):
    project.write_text(f'run_dir = "{run_dir}"\n[[sources]]\npath = "data.txt"\n')
    try:
        load_project(project).run_path
    except UserError as e:
        assert len(str(e).splitlines()) == 1
