"""The language-model task (tasks.language_model): plain text windows through prepare and train with no
task-type branch outside tasks/, the loss on every text token, and a pre-training phase on it."""

import json
import shutil

import numpy as np
import pytest
import torch

from nichelm.config import load_project
from nichelm.data.readers import Document, Segment
from nichelm.data.tokenizer import encode_examples_array, encode_texts, train_tokenizer
from nichelm.errors import UserError
from nichelm.tasks import LanguageModelTask, get_task
from tests.conftest import SENTENCES, tiny_project

LM_TASK = '[task]\ntype = "language-model"\nwindow_chars = 200\n'


def lm_project(folder):
    """The conftest tiny project (clean text + pairs) with the language-model task."""
    folder.mkdir(parents=True, exist_ok=True)
    path = getattr(tiny_project, "__wrapped__", tiny_project)(folder)
    text = path.read_text().replace("[task]\nwindow_chars = 60\n", LM_TASK)
    assert LM_TASK in text
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from nichelm.prepare import prepare
    folder = tmp_path_factory.mktemp("lm")
    path = lm_project(folder)
    run = folder / "run"
    prepare(load_project(path, [f"run_dir={run}"]))
    return {"path": path, "run": run, "folder": folder}


def test_the_task_round_trips_and_is_what_the_project_file_says(prepared):
    task = load_project(prepared["path"]).task
    assert isinstance(task, LanguageModelTask) and task.window_chars == 200
    assert get_task(task.to_json()) == task
    assert json.loads((prepared["run"] / "task.json").read_text())["type"] == "language-model"


def test_examples_are_the_gold_text_with_an_empty_input():
    task = LanguageModelTask(window_chars=40)
    doc = Document("d", [Segment("Tho cat sat on tho mat.", "The cat sat on the mat."),
                         Segment(None, "It was a fine day for it.")])
    ex = task.examples(doc)
    assert ex and all(inp == "" for inp, _ in ex)
    assert " ".join(o for _, o in ex).split() == "The cat sat on the mat. It was a fine day for it.".split()


def test_prepare_keeps_every_window_unnoised_and_deduped_on_text(prepared):
    """Examples keep their empty input (no noise, none dropped for it), and val/test are not all dropped as
    duplicates of train's empty input."""
    data = prepared["run"] / "data"
    rows = {s: [json.loads(x) for x in (data / f"examples.{s}.jsonl").read_text().splitlines()]
            for s in ("train", "val", "test")}
    assert all(rows.values()), {s: len(r) for s, r in rows.items()}
    for r in rows["train"]:
        assert r["input"] == "" and r["output"].strip()
    pairs = {s["name"]: s for s in json.loads((data / "manifest.json").read_text())["sources"]}["pairs"]
    # each pair is one short window: every one is an example (none dropped, none deduped away)
    assert sum(pairs[f"examples_{s}"] for s in ("train", "val", "test")) == pairs["documents"] == 60


def test_the_loss_mask_covers_every_text_token_and_the_end_marker():
    task = LanguageModelTask()
    tok = train_tokenizer([s for s in SENTENCES for _ in range(3)], 400, task.special_tokens())
    texts = SENTENCES[:3]
    row = encode_examples_array(tok, task.prompt_template, task.end_marker, [""] * 3, texts).astype(np.int64)
    mask = task.loss_mask(row[None, :-1], tok)[0]
    trained = row[1:][mask]                                   # the targets the loss reads
    text_ids = [i for ids in encode_texts(tok, texts) for i in [*ids, tok.token_to_id(task.end_marker)]]
    assert trained.tolist() == text_ids[:len(trained)] and len(trained) >= len(text_ids) - 1
    lm, text_marker, _ = task.marker_ids(tok)
    assert lm not in trained and text_marker not in trained   # only the two markers are prompt


def test_it_trains_three_steps(prepared, tmp_path):
    from nichelm.train import train
    torch.set_num_threads(1)
    run = tmp_path / "run"
    shutil.copytree(prepared["run"], run)
    train(load_project(prepared["path"], [f"run_dir={run}", "train.max_steps=3", "train.eval_every=3"]))
    losses = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("step") == 3 for m in losses)
    assert all(np.isfinite(m["loss"]) for m in losses if "loss" in m)
    # nichelm.perplexity scores it: the run loads (free decoding) and held-out text gets a finite perplexity
    from nichelm.perplexity import load_model, perplexity_report
    model, tok, end_id = load_model(run)
    report = perplexity_report(model, tok, {"held-out": SENTENCES[:2]}, end_id)
    assert report["tokens"] > 10 and 1 < report["macro_perplexity"] < tok.get_vocab_size()
    # it corrects nothing: nichelm.load and a plain `nichelm evaluate` refuse it in one line, pointing to perplexity
    import nichelm
    from nichelm.errors import UserError
    from nichelm.evaluate import evaluate_project
    with pytest.raises(UserError, match=r"'language-model' task .*--perplexity"):
        nichelm.load(run)
    with pytest.raises(UserError, match=r"'language-model' task .*--perplexity"):
        evaluate_project(load_project(prepared["path"], [f"run_dir={run}"]))


def test_pre_training_then_fine_tuning_as_correction(tmp_path):
    """The language-model run, prepared with the correction task's markers, is what a correction project
    starts from: tokenizer.from (the same special tokens) and train.init_from (its weights, a fresh optimizer)."""
    from safetensors.torch import load_file
    from nichelm.prepare import prepare
    from nichelm.train import train
    torch.set_num_threads(1)
    lm = lm_project(tmp_path / "lm")
    markers = 'prompt_template = "### Text ###\\n{input}\\n### Correction ###\\n"\n'      # the correction task's
    lm.write_text(lm.read_text().replace(LM_TASK, LM_TASK + markers))
    lm_run = tmp_path / "lm" / "run"
    project = load_project(lm, [f"run_dir={lm_run}", "train.max_steps=3", "train.eval_every=0"])
    assert project.task.type == "language-model"
    prepare(project)
    train(project)
    (tmp_path / "ft").mkdir()
    ft = getattr(tiny_project, "__wrapped__", tiny_project)(tmp_path / "ft")
    ft_run = tmp_path / "ft" / "run"
    sets = [f"run_dir={ft_run}", f"tokenizer.from={lm_run}", f"train.init_from={lm_run}", "train.max_steps=1",
            "train.lr=1e-30", "train.warmup_steps=0", "train.eval_every=0"]
    prepare(load_project(ft, sets))
    train(load_project(ft, sets))
    start = load_file(str(sorted((lm_run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    got = load_file(str(sorted((ft_run / "checkpoints").glob("step_*"))[-1] / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in start.items())        # lr 1e-30: the pre-trained weights


def test_its_metrics_point_to_perplexity():
    with pytest.raises(UserError, match="perplexity"):
        LanguageModelTask().metrics(["a"], ["a"])


def test_the_example_project_is_a_language_model_task_with_the_correction_markers():
    from pathlib import Path
    from nichelm.tasks import CorrectionTask
    project = load_project(Path(__file__).parent.parent / "examples" / "pretrain_lm.toml")
    assert project.task.type == "language-model"
    assert project.task.special_tokens() == CorrectionTask().special_tokens()     # tokenizer.from fits quickstart
