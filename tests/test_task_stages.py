"""Every stage through nichelm.tasks: the project file's [task] builds the Task, runs and exports carry it
(task.json with its type), `nichelm.load` gives the task's runner, a classification model only ever answers
a label of its set, and `nichelm apply` adds a label field to 1,000 jsonl records and resumes after SIGKILL
with the bytes of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nichelm
from nichelm.config import Project, load_project
from nichelm.errors import UserError
from nichelm.tasks import ClassificationTask, CorrectionTask, get_task
from tests.conftest import SENTENCES

LABELS = ["1830s", "1840s", "1850s", "1860s"]
TASK = ClassificationTask(name="dating", labels=LABELS, bands=[1840.0, 1850.0, 1860.0], label_field="Date",
                          window_chars=60)


# ---------------------------------------------------------------- the project file

def write_project(tmp_path: Path, task: str) -> Path:
    (tmp_path / "docs.jsonl").write_text(json.dumps({"input": "a", "output": "a"}) + "\n")
    path = tmp_path / "p.toml"
    path.write_text(f'run_dir = "{tmp_path / "run"}"\n[task]\n{task}\n[[sources]]\npath = "docs.jsonl"\n'
                    'format = "jsonl"\n')
    return path


def test_a_classification_task_in_a_project_file_takes_its_types_defaults(tmp_path):
    p = load_project(write_project(tmp_path, 'type = "classification"\nlabels = ["a", "b"]\nlabel_field = "kind"'))
    assert isinstance(p.task, ClassificationTask) and p.task.labels == ["a", "b"] and p.task.label_field == "kind"
    assert p.task.prompt_template == ClassificationTask().prompt_template          # not correction's template
    assert p.task.window_chars == ClassificationTask().window_chars
    assert p.to_dict()["task"]["type"] == "classification"                        # prepare's fingerprint sees it


def test_the_correction_task_keeps_its_fingerprint(tmp_path):
    """Runs prepared before task types keep their data: the fingerprint's task holds the keys it always had."""
    old = {"name": "ocr", "prompt_template": "### Text ###\n{input}\n### Correction ###\n",
           "end_marker": "<|endoftext|>", "window_chars": 100}
    assert Project().to_dict()["task"] == old
    p = load_project(write_project(tmp_path, "window_chars = 80"))
    assert isinstance(p.task, CorrectionTask) and p.to_dict()["task"] == {**old, "window_chars": 80}


@pytest.mark.parametrize("task, says", [
    ('labels = ["a"]', "'task.labels' is no setting of a 'correction' task"),
    ('type = "classification"', "'task.labels' is empty"),
    ('type = "summary"', "'task.type' is 'summary'"),
    ('type = "classification"\nlabels = ["a", "b"]\nbands = [2, 1, 0]', "'task.bands' needs 1 ascending"),
])
def test_bad_task_tables_are_one_line_errors(tmp_path, task, says):
    with pytest.raises(UserError) as e:
        load_project(write_project(tmp_path, task))
    assert says in str(e.value) and str(e.value).startswith(str(tmp_path / "p.toml")) and "\n" not in str(e.value)


def test_banded_labels_read_numbers_from_text():
    """A date string is banded by its year; text with no leading number is a one-line error."""
    assert [TASK.label_of(v) for v in ("1839-12-31", "1840-01-01", 1855, "1901")] == ["1830s", "1840s", "1850s",
                                                                                       "1860s"]
    with pytest.raises(ValueError):
        TASK.label_of("May 1841")


# ---------------------------------------------------------------- a classification run, untrained

def label_run(run: Path, task=TASK, seed: int = 0) -> Path:
    """A run directory holding a random tiny model of a classification task (loads like a trained one)."""
    from safetensors.torch import save_file

    from nichelm.checkpoint import model_state
    from nichelm.data.tokenizer import save_tokenizer, train_tokenizer
    from nichelm.model import GPT, ModelConfig
    tok = train_tokenizer([*SENTENCES, *getattr(task, "labels", [])] * 5, 300, task.special_tokens())
    save_tokenizer(tok, run / "tokenizer" / "tokenizer.json")
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), block_size=64, n_layer=1, n_head=2, n_embd=32)
    ckpt = run / "checkpoints" / "step_0000003"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model_state(GPT(cfg)).items()}, str(ckpt / "model.safetensors"))
    (ckpt / "trainer.json").write_text(json.dumps({"step": 3, "model_config": cfg.to_dict()}))
    (ckpt / "COMPLETE").write_text("step 3\n")
    (run / "task.json").write_text(json.dumps(task.to_json()))
    return run


def texts(n: int) -> list[str]:
    return [" ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 4)) + f" No. {i}." for i in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_classification_model_never_answers_outside_its_labels(tmp_path, seed):
    """Random weights, texts of one to many windows (and a blank one): every answer is a label of the set."""
    from nichelm.classifier import Classifier
    classifier = nichelm.load(label_run(tmp_path / "run", seed=seed))
    assert isinstance(classifier, Classifier)
    given = [*texts(12), "", "<|endoftext|> ### Decade ###"]
    got = classifier.classify(given)
    assert len(got) == len(given) and set(got) <= set(LABELS)
    scores = classifier.scores(given[:3])
    assert scores.shape == (3, len(LABELS)) and torch.isfinite(scores).all() and (scores < 0).all()
    assert got[:3] == [LABELS[i] for i in scores.argmax(1).tolist()]


def test_an_old_correction_run_still_loads_a_corrector(tmp_path):
    from nichelm.inference import Corrector
    task = CorrectionTask(window_chars=60)
    run = label_run(tmp_path / "run", task)
    old = {k: v for k, v in task.to_json().items() if k != "type"}        # a task.json from before task types
    (run / "task.json").write_text(json.dumps(old))
    corrector = nichelm.load(run)
    assert isinstance(corrector, Corrector) and corrector.task == task and corrector.window_chars == 60


def test_the_export_carries_the_task_and_loads_the_same_classifier(tmp_path):
    pytest.importorskip("transformers")
    from nichelm.export import export_hf, load_run
    run = label_run(tmp_path / "run")
    out = export_hf(load_run(run), tmp_path / "hf")
    saved = json.loads((out / "task.json").read_text())
    assert saved["type"] == "classification" and saved["labels"] == LABELS
    assert get_task(saved) == get_task(TASK.to_json() | {"user_text_encoding": "split_special_tokens"})
    card = (out / "README.md").read_text()
    assert "Classification" in card and all(f"`{x}`" in card for x in LABELS)
    given = texts(8)
    assert nichelm.load(out).classify(given) == nichelm.load(run).classify(given)


# ---------------------------------------------------------------- apply: a label field, resumable

def records(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts(n))))
    return path


def ledger_lines(out: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(out.glob(".nichelm-ledger.*")) for line in p.read_text().splitlines()
            if line.endswith("}")]


def test_apply_labels_1000_records_and_resumes_after_sigkill_identically(tmp_path):
    from nichelm.apply import apply
    run = label_run(tmp_path / "run")
    corpus = records(tmp_path / "in" / "records.jsonl", 1000)
    apply(run, [corpus], tmp_path / "ref", batch_size=64, threads=1)
    ref = (tmp_path / "ref" / "records.jsonl").read_bytes()
    rows = [json.loads(line) for line in ref.decode().splitlines()]
    assert [r["id"] for r in rows] == list(range(1000)) and all(r["label"] in LABELS for r in rows)
    assert [r["label"] for r in rows[:20]] == nichelm.load(run).classify(texts(20))

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nichelm", "apply", "--model", str(run), "--input", str(corpus), "--output",
           str(out), "--batch-size", "64", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(ledger_lines(out)) >= 2:                     # the first progress record after "start"
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (out / "records.jsonl").exists(), "the kill came too late to test resuming"
    report = apply(run, [corpus], out, batch_size=64, threads=1)
    assert (out / "records.jsonl").read_bytes() == ref
    assert report.documents == 1000 and not report.failed


def test_apply_refuses_txt_for_a_classification_model(tmp_path):
    from nichelm.apply import apply
    run = label_run(tmp_path / "run")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("Some text.\n")
    with pytest.raises(UserError, match="a.txt: a classification model labels records"):
        apply(run, [tmp_path / "in"], tmp_path / "out", threads=1)


# ---------------------------------------------------------------- evaluate: the model beside the baselines

def write_split(path: Path, n_docs: int, offset: int) -> None:
    """Documents of 3 windows each; a document's label is its number's decade slot, the word "slot k" gives it."""
    rows = []
    for d in range(offset, offset + n_docs):
        label = LABELS[d % len(LABELS)]
        for w in range(3):
            rows.append({"input": f"{SENTENCES[(d + w) % len(SENTENCES)]} slot{d % len(LABELS)}", "output": label,
                         "source": "s", "doc_id": f"d{d}", "value": 1835.0 + 10 * (d % len(LABELS))})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_scores_the_model_and_the_baselines_on_the_same_windows(tmp_path):
    from nichelm.evaluate import evaluate_project, print_summary
    from nichelm.export import model_card
    from nichelm.artifacts import load_run
    run = label_run(tmp_path / "run")
    for split, n, offset in (("train", 24, 0), ("val", 8, 100), ("test", 8, 200)):
        write_split(run / "data" / f"examples.{split}.jsonl", n, offset)
    project = Project(run_dir=str(run))
    project.eval.max_examples = 0
    report = evaluate_project(project)
    assert report["decoding"] == "labels" and report["n_examples"] == 24 and report["n_documents"] == 8
    m = report["metrics"]
    assert m["n"] == 24 and sum(map(sum, m["confusion"])) == 24 and "spearman" in m
    assert set(report["baselines"]) == {"majority", "tfidf_logreg"}
    assert report["baselines"]["tfidf_logreg"]["accuracy"] == 1.0       # "slotK" gives the label away
    assert report["by_document"]["metrics"]["n"] == 8                    # one label per document
    assert all(e["output"] in LABELS for e in report["examples"])
    assert json.loads((run / "eval" / "report.json").read_text())["metrics"] == m
    import io
    text = io.StringIO()
    print_summary(report, file=text)
    assert "baseline tfidf_logreg" in text.getvalue()
    card = model_card(load_run(run))
    assert "| baseline: tfidf_logreg | 100.0% | 1.000 |" in card


# ---------------------------------------------------------------- both BLN600 tasks, end to end, tiny budgets

TINY = ["sources.0.max_documents=90", "tokenizer.vocab_size=400", "model.preset=nano", "model.n_layer=1",
        "model.n_embd=64", "model.block_size=192", "train.max_steps=8", "train.batch_size=4", "train.eval_every=100",
        "train.warmup_steps=2", "train.threads=1", "eval.max_examples=40", "task.window_chars=200"]


@pytest.mark.parametrize("example", ["bln600_dating", "bln600_quality"])
def test_bln600_classification_runs_end_to_end(tmp_path, example):
    """prepare -> train -> evaluate (model and baselines on the same held-out windows) -> export -> apply, on
    the first 90 BLN600 documents at a tiny budget: every stage runs through the task, labels come from
    the metadata (the Date column) or the measured window CER, and every answer is a label of the set."""
    from tests.conftest import needs_shared
    needs_shared()
    from nichelm.apply import apply
    from nichelm.evaluate import evaluate_project
    from nichelm.export import export_hf, load_run
    from nichelm.prepare import prepare
    from nichelm.train import train
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1]
    project = load_project(root / "examples" / f"{example}.toml", [f"run_dir={tmp_path / 'run'}", *TINY])
    task = project.task
    assert isinstance(task, ClassificationTask)
    prepare(project)
    run = project.run_path
    assert get_task(json.loads((run / "task.json").read_text())) == task
    rows = [json.loads(line) for line in (run / "data" / "examples.test.jsonl").read_text().splitlines()]
    assert rows and {r["output"] for r in rows} <= set(task.labels)
    assert all(isinstance(r["value"], float) for r in rows)          # the number behind each band (Spearman)
    if example == "bln600_dating":                                   # a year from the Date column, per article
        assert {r["value"] for r in rows} <= set(map(float, range(1800, 1900)))
    train(project)
    report = evaluate_project(project)
    assert report["metrics"]["n"] == report["n_examples"] > 0 and "spearman" in report["metrics"]
    assert set(report["baselines"]) == {"majority", "tfidf_logreg"}
    assert ("by_document" in report) == (example == "bln600_dating")  # a date labels a whole article
    assert all(e["output"] in task.labels for e in report["examples"])
    hf = export_hf(load_run(run), tmp_path / "hf")
    assert json.loads((hf / "task.json").read_text())["labels"] == task.labels
    corpus = tmp_path / "in" / "articles.jsonl"
    corpus.parent.mkdir()
    corpus.write_text("".join(json.dumps({"text": r["input"]}) + "\n" for r in rows[:12]))
    apply(hf, [corpus], tmp_path / "out", threads=1)
    labelled = [json.loads(line) for line in (tmp_path / "out" / "articles.jsonl").read_text().splitlines()]
    assert len(labelled) == 12 and all(r["label"] in task.labels for r in labelled)
