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


# Values that passed validation and then crashed mid-run (ZeroDivisionError, torch's ValueError, an
# empty val split...) or meant nothing: each is one line naming the key and what to write instead.
BAD_VALUES = [
    (["train.log_every=0"], "'train.log_every' is 0", "at least 1"),
    (["train.eval_batches=0"], "'train.eval_batches' is 0", "at least 1"),
    (["train.max_steps=0"], "'train.max_steps' is 0", "at least 1"),
    (["train.batch_size=0"], "'train.batch_size' is 0", "at least 1"),
    (["train.grad_accum=-1"], "'train.grad_accum' is -1", "at least 1"),
    (["train.lr=0"], "'train.lr' is 0.0", "above 0"),
    (["train.lr=-1"], "'train.lr' is -1.0", "above 0"),
    (["train.lr=nan"], "'train.lr' is nan", "finite"),
    (["train.max_minutes=inf"], "'train.max_minutes' is inf", "finite"),
    (["train.max_minutes=-1"], "'train.max_minutes' is -1.0", "0 (no time budget)"),
    (["train.beta1=1.5"], "'train.beta1' is 1.5", "below 1"),
    (["train.beta2=-0.1"], "'train.beta2' is -0.1", "from 0"),
    (["train.warmup_steps=-3"], "'train.warmup_steps' is -3", "0 or more"),
    (["train.weight_decay=-1"], "'train.weight_decay' is -1.0", "0 or more"),
    (["train.grad_clip=-1"], "'train.grad_clip' is -1.0", "0 (no clipping)"),
    (["train.decay_fraction=0"], "'train.decay_fraction' is 0.0", "above 0"),
    (["train.min_lr_ratio=1.5"], "'train.min_lr_ratio' is 1.5", "from 0 to 1"),
    (["train.eval_every=-1"], "'train.eval_every' is -1", "0 (only at the end)"),
    (["train.checkpoint_every=-1"], "'train.checkpoint_every' is -1", "0 (only at the end)"),
    (["train.keep_checkpoints=-1"], "'train.keep_checkpoints' is -1", "0 (keep all)"),
    (["train.threads=-1"], "'train.threads' is -1", "0 (torch's default)"),
    (["train.batch_tokens=-5"], "'train.batch_tokens' is -5", "0 (use grad_accum)"),
    (["model.block_size=0"], "'model.block_size' is 0", "at least 16"),
    (["model.dropout=1.5"], "'model.dropout' is 1.5", "below 1"),
    (["model.n_head=-1"], "'model.n_head' is -1", "0 (the preset's)"),
    (["model.n_embd=66"], "'model.n_embd' (66) must be a multiple of 'model.n_head' (4)"),
    (["model.n_kv_head=3"], "'model.n_head' (4) must be a multiple of 'model.n_kv_head' (3)"),
    (["model.n_embd=72", "model.n_head=8"], "n_embd / n_head = 9 is odd", "model.n_embd"),
    (["seed=-1"], "'seed' is -1", "0 or more"),
    (["task.window_chars=0"], "'task.window_chars' is 0", "at least 1"),
    (["task.prompt_template=\"A {input} B {x}\""], "'task.prompt_template'", "no other {...} field"),
    (["task.prompt_template=\"{input} B\""], "'task.prompt_template' needs a marker before and after {input}"),
    (["task.end_marker=\"\""], "'task.end_marker' is ''", "a marker of its own"),
    (["task.end_marker=\"$\""], "'task.end_marker' uses the one-character marker '$'", "at least two characters"),
    (["task.prompt_template=\"@\\n{input}\\n### Out ###\\n\""], "'task.prompt_template' uses the one-character marker '@'"),
    (["tokenizer.vocab_size=100"], "'tokenizer.vocab_size' is 100", "at least 300"),
    (["tokenizer.min_frequency=-1"], "'tokenizer.min_frequency' is -1", "0 or more"),
    (["noise.target_cer=1.5"], "'noise.target_cer' is 1.5", "below 1"),
    (["split.val_fraction=-0.1", "split.test_fraction=0.2"], "'split.val_fraction' is -0.1", "from 0"),
    (["split.test_fraction=0.95"], "'split.val_fraction' + 'split.test_fraction' must be below 1"),
    (["split.val_fraction=0"], "'split.val_fraction' = 0 leaves no validation data", "split = \"val\""),
    (["sources.0.split=train", "sources.1.split=test"], "every source has a fixed split", "split.val_fraction"),
    (["sources.1.max_documents=-1"], "'sources[1].max_documents' is -1", "0 (all)"),
    (["eval.batch_size=0"], "'eval.batch_size' is 0", "at least 1"),
    (["eval.beams=0"], "'eval.beams' is 0", "at least 1"),
    (["eval.max_new_tokens_ratio=0"], "'eval.max_new_tokens_ratio' is 0.0", "above 0"),
    (["eval.max_examples=-1"], "'eval.max_examples' is -1", "0 (the whole test split)"),
    (["eval.window_overlap=-1"], "'eval.window_overlap' is -1", "0 or more"),
]


@pytest.mark.parametrize("sets,fragments", [(b[0], b[1:]) for b in BAD_VALUES], ids=[" ".join(b[0]) for b in BAD_VALUES])
def test_values_that_would_crash_later_are_refused_up_front(tiny_project, sets, fragments):
    with pytest.raises(UserError) as e:
        load_project(tiny_project, sets)
    message = str(e.value)
    assert "\n" not in message and str(tiny_project) in message
    for frag in fragments:
        assert frag in message, message


def test_zeros_that_mean_off_or_all_stay_allowed(tiny_project):
    p = load_project(tiny_project, ["train.eval_every=0", "train.checkpoint_every=0", "train.keep_checkpoints=0",
                                    "train.warmup_steps=0", "train.grad_clip=0", "train.min_lr_ratio=0",
                                    "train.threads=0", "train.batch_tokens=0", "train.max_minutes=0",
                                    "train.weight_decay=0", "model.dropout=0", "seed=0", "split.test_fraction=0",
                                    "eval.max_examples=0", "eval.window_overlap=0", "noise.target_cer=0"])
    assert p.train.eval_every == 0 and p.seed == 0
    # a source pinned to val gives validation data without split.val_fraction
    assert load_project(tiny_project, ["split.val_fraction=0", "sources.1.split=val"]).split.val_fraction == 0


def test_a_zero_period_is_refused_by_the_cli(tiny_project):
    assert_user_error(run_cli("train", tiny_project, "--set", "train.log_every=0"), "'train.log_every' is 0")


def test_a_split_smaller_than_one_row_is_one_line_at_train_start(tiny_project):
    """block_size larger than the whole val split: named, with the fix, before any training."""
    assert run_cli("prepare", tiny_project).returncode == 0
    proc = run_cli("train", tiny_project, "--set", "model.block_size=4000")
    assert_user_error(proc, "val", "block_size")


def test_tokenizer_from_names_a_tokenizer_json_a_run_or_an_export(tiny_project, tmp_path):
    """[tokenizer] from = PATH: the TOML key is `from`; a file, a folder holding tokenizer.json (an export) or
    tokenizer/tokenizer.json (a run); anything else is one line naming the key. Whether vocab_size was
    written is kept (prepare refuses a size other than the reused tokenizer's)."""
    from nichelm.config import tokenizer_from_path
    run, export = tmp_path / "old_run", tmp_path / "export"
    (run / "tokenizer").mkdir(parents=True)
    export.mkdir()
    for f in (run / "tokenizer" / "tokenizer.json", export / "tokenizer.json", tmp_path / "tok.json"):
        f.write_text("{}")
    for given, found in ((run, run / "tokenizer" / "tokenizer.json"), (export, export / "tokenizer.json"),
                         ("tok.json", tmp_path / "tok.json")):
        p = load_project(tiny_project, [f"tokenizer.from={given}"])
        assert p.tokenizer.from_ == str(given) and tokenizer_from_path(p) == found
        assert p.to_dict()["tokenizer"]["from"] == str(given) and "from_" not in p.to_dict()["tokenizer"]
    assert load_project(tiny_project).tokenizer.vocab_size_given is True           # the file sets it
    tiny_project.write_text(tiny_project.read_text().replace("vocab_size = 320\n", 'from = "tok.json"\n'))
    p = load_project(tiny_project)
    assert p.tokenizer.from_ == "tok.json" and p.tokenizer.vocab_size_given is False
    assert "vocab_size_given" not in p.to_dict()["tokenizer"]
    for given, fragment in ((tmp_path / "nope", "does not exist"), (tmp_path / "clean", "holds no tokenizer.json")):
        with pytest.raises(UserError) as e:
            load_project(tiny_project, [f"tokenizer.from={given}"])
        assert f"'tokenizer.from' = '{given}'" in str(e.value) and fragment in str(e.value)
        assert "\n" not in str(e.value) and str(tiny_project) in str(e.value)
    with pytest.raises(UserError, match="known keys here: from, min_frequency, sample_chars, vocab_size"):
        load_project(tiny_project, ["tokenizer.form=x"])
