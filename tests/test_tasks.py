"""nichelm.tasks: the task interface, correction as today's task, classification with label-constrained
decoding, its metrics and baselines, and the two BLN600 metadata tasks (skipped without ../shared)."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from nichelm.config import TaskConfig
from nichelm.data.readers import Document, Segment, pair_segments_to_windows
from nichelm.data.tokenizer import (encode_examples_array, encode_texts, prompt_ids, special_tokens,
                                    train_tokenizer)
from nichelm.errors import UserError
from nichelm.metrics import score_pairs
from nichelm.model import GPT, ModelConfig
from nichelm.tasks import ClassificationTask, CorrectionTask, get_task
from nichelm.tasks import baselines
from nichelm.tasks.classification import WINDOW_CER, by_document, spearman
from nichelm.tasks.constrained import best_labels, label_scores
from tests.conftest import SENTENCES, needs_shared

TEMPLATE = "### Text ###\n{input}\n### Correction ###\n"
END = "<|endoftext|>"
QUOTES = ["Tho man said <|endoftext|> and went homc.", "A ### Correction ### B", "### Text ###",
          "x<|endoftext|>y", "### Text ###### Correction ###<|endoftext|>", "<|endoftext|>", " ### Correction ### "]
OLD_TASK_JSON = {"name": "ocr", "prompt_template": TEMPLATE, "end_marker": END, "window_chars": 100,
                 "guard": {"margin": 0.25, "checkpoint": "step_0000100"}, "user_text_encoding": "split_special_tokens"}


def tokenizer_for(task, extra=()):
    texts = [t for t in [*SENTENCES, *extra] for _ in range(3)]
    return train_tokenizer(texts, 400, task.special_tokens())


# ---------------------------------------------------------------- task.json and the registry

def test_an_old_task_json_is_the_correction_task_and_round_trips():
    task = get_task(OLD_TASK_JSON)
    assert isinstance(task, CorrectionTask)
    assert task.guard == OLD_TASK_JSON["guard"] and task.window_chars == 100
    assert task.to_json() == {**OLD_TASK_JSON, "type": "correction"}       # unknown keys kept, nothing lost
    assert get_task(task.to_json()) == task


def test_the_project_files_task_is_the_correction_task_prepare_writes_today():
    task = get_task(TaskConfig())
    assert isinstance(task, CorrectionTask)
    # what prepare writes into RUN/task.json today (data/pipeline.py), plus the type
    today = {"name": "ocr", "prompt_template": TEMPLATE, "end_marker": END, "window_chars": 100}
    assert task.to_json() == {**today, "type": "correction"}
    assert task.special_tokens() == special_tokens(TEMPLATE, END)


def test_a_classification_task_round_trips():
    task = get_task({"type": "classification", "name": "q", "labels": ["low", "mid", "high"], "bands": [0.1, 0.5],
                     "label_field": WINDOW_CER})
    assert isinstance(task, ClassificationTask) and task.ordered and task.decoding == "labels"
    assert get_task(task.to_json()) == task


@pytest.mark.parametrize("bad, says", [
    ({"type": "summary"}, "'type' is 'summary'"),
    ({"type": "classification"}, "'labels' is empty"),
    ({"type": "classification", "labels": ["a", "b", "a"]}, "label 'a' appears twice"),
    ({"type": "classification", "labels": ["a", " "]}, "non-blank strings"),
    ({"type": "classification", "labels": ["a", "b"], "bands": [1, 2]}, "'bands' needs 1 ascending"),
    ({"type": "classification", "labels": ["a", "b", "c"], "bands": [2, 1]}, "'bands' needs 2 ascending"),
    ({"type": "classification", "labels": ["a", "b"], "bands": ["x"]}, "must be numbers"),
    ({"type": "classification", "labels": ["a"], "text": "gold"}, "'text' is 'gold'"),
    ({"window_chars": "100"}, "'window_chars' is '100'"),
    ({"window_chars": 0}, "'window_chars' is 0"),
    ({"prompt_template": "{input}\n### Correction ###\n"}, "marker before and after {input}"),
    ({"prompt_template": "### A ###{input}### B ###{input}"}, "exactly once"),
    ({"end_marker": "### Correction ###"}, "must be distinct"),
])
def test_bad_task_settings_are_one_line_user_errors(bad, says):
    with pytest.raises(UserError) as e:
        get_task(bad, "p.toml: [task]")
    msg = str(e.value)
    assert says in msg and msg.startswith("p.toml: [task]: ") and "\n" not in msg


def test_tasks_import_no_torch():
    """prepare's worker processes hold a task: importing tasks must not import torch."""
    code = "import sys, nichelm.tasks; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---------------------------------------------------------------- correction: today's task, unchanged

def test_correction_prompt_ids_are_todays_for_plain_and_marker_laden_text():
    task = get_task(TaskConfig())
    tok = tokenizer_for(task)
    texts = [*QUOTES, *SENTENCES, "", "a\n\nb  c\t", "ſome ﬁne text"]
    for text in texts:
        ids = task.prompt(tok, text)
        assert ids == prompt_ids(tok, TEMPLATE, text), text
        assert [ids.count(tok.token_to_id(m)) for m in (END, "### Text ###", "### Correction ###")] == [0, 1, 1]
        if not any(m in text for m in task.special_tokens()):      # plain text: what tokenizers alone gives
            assert ids == tok.encode(TEMPLATE.format(input=text)).ids
    assert task.prompts(tok, texts) == [prompt_ids(tok, TEMPLATE, t) for t in texts]
    outputs = [t.upper() for t in texts]
    want = encode_examples_array(tok, TEMPLATE, END, texts, outputs)
    assert np.array_equal(task.encode_examples(tok, texts, outputs), want)


def test_correction_examples_are_prepares_windows():
    doc = Document("d", [Segment("Tbe man " * 9, "The man " * 9), Segment("wcnt homc. " * 12, "went home. " * 12)])
    task = CorrectionTask(window_chars=60)
    assert task.examples(doc) == [(w.input, w.output) for w in pair_segments_to_windows(doc, 60)]
    assert len(task.examples(doc)) > 1


def test_correction_metrics_are_corpus_cer_and_wer():
    task = CorrectionTask()
    preds, refs, inputs = ["the cat", "a dog sat"], ["the cat", "a dog sat down"], ["tbe cat", "a d0g sat"]
    m = task.metrics(preds, refs, inputs=inputs)
    want = score_pairs(zip(preds, refs))
    assert (m["cer"], m["wer"], m["chars"]) == (want.cer, want.wer, 21)
    assert m["cer"] == pytest.approx(5 / 21) and m["cer_before"] == pytest.approx(7 / 21)


# ---------------------------------------------------------------- classification: labels and examples

QUALITY = ClassificationTask(labels=["<1%", "1-3%", "3-10%", ">=10%"], bands=[0.01, 0.03, 0.10],
                             label_field=WINDOW_CER, window_chars=60)


def test_values_fall_into_their_bands_at_the_edges():
    assert [QUALITY.label_of(v) for v in (0.0, 0.0099, 0.01, 0.0299, 0.03, 0.0999, 0.1, 3.0)] == \
        ["<1%", "<1%", "1-3%", "1-3%", "3-10%", "3-10%", ">=10%", ">=10%"]
    dating = ClassificationTask(labels=["1830s", "1840s", "1850s"], bands=[1840, 1850])
    assert [dating.label_of(y) for y in (1834, 1839, 1840, 1849, 1850, 1899)] == \
        ["1830s", "1830s", "1840s", "1840s", "1850s", "1850s"]
    with pytest.raises(ValueError):
        ClassificationTask(labels=["yes", "no"]).label_of("maybe")


def test_window_cer_labels_each_window_by_its_own_errors():
    doc = Document("d", [Segment("The man went home. ", "The man went home. "),
                         Segment("Tbe m4n wcnt h0me.", "The man went home.")])
    task = ClassificationTask(labels=QUALITY.labels, bands=QUALITY.bands, label_field=WINDOW_CER, window_chars=20)
    got = task.labelled(doc)
    assert [(x.text, x.label) for x in got] == [("The man went home.", "<1%"), ("Tbe m4n wcnt h0me.", ">=10%")]
    assert got[1].value == pytest.approx(4 / 18)
    assert task.examples(doc) == [(x.text, x.label) for x in got]


def test_metadata_labels_and_their_errors():
    task = ClassificationTask(labels=["news", "ads"], window_chars=40, text="output")
    doc = Document("d7", [Segment("Tbe news of tbe day.", "The news of the day.")], {"label": "news"})
    assert task.examples(doc) == [("The news of the day.", "news")]
    with pytest.raises(UserError, match="'d7'.*'category'"):
        ClassificationTask(labels=["news"], label_field="category").labelled(doc)
    with pytest.raises(UserError, match="'d7'.*'weather'"):
        task.labelled(Document("d7", doc.segments, {"label": "weather"}))
    with pytest.raises(UserError, match="paired data"):
        QUALITY.labelled(Document("c", [Segment(None, "clean text")]))


def test_the_loss_mask_trains_the_label_and_end_marker_only():
    """Today's rule (data.loader.loss_mask): targets after the output marker up to its end marker."""
    task = ClassificationTask(labels=["yes", "no"])
    tok = tokenizer_for(task)
    row = task.encode_examples(tok, ["The committee met.", "A large number"], ["yes", "no"]).astype(np.int64)[None]
    mask = task.loss_mask(row, tok)[0]
    in_id, out_id, end_id = task.marker_ids(tok)
    trained = [int(row[0, t + 1]) for t in range(row.shape[1] - 1) if mask[t]]   # mask at t: target t+1 trained
    prompt = task.prompt(tok, "x")
    after = prompt[prompt.index(out_id) + 1:]           # the template's text after the output marker ("\n")
    yes, no = encode_texts(tok, ["yes", "no"])
    assert after and trained == [*after, *yes, end_id, *after, *no, end_id]


# ---------------------------------------------------------------- label-constrained decoding

def tiny_gpt(vocab: int, arch: str, seed: int, block: int = 128) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(arch=arch, vocab_size=vocab, block_size=block, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():           # sharper than init's near-uniform logits, so labels differ per model and text
        model.lm_head.weight.mul_(100)
    return model


# shared prefixes, a label quoting a marker (encoded as text), multi-token labels
LABELS = ["1-3%", "1-30%", "<1%", ">=10%", "ok", "<|endoftext|>x", "The committee"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("labels", [LABELS, ["a", "b", "c", "d"]])
def test_a_random_model_never_outputs_a_label_outside_the_set(arch, labels):
    task = ClassificationTask(labels=labels)
    tok = tokenizer_for(task, labels)
    texts = [*SENTENCES, *QUOTES, "", "x"]
    seen = set()
    for seed in range(4):
        model = tiny_gpt(tok.get_vocab_size(), arch, seed)
        got = task.classify(model, tok, texts, batch_size=5)
        assert len(got) == len(texts) and set(got) <= set(labels)
        seen |= set(got)
    if len(labels) == 4:           # one token each: the choice depends on the model and text, not a constant
        assert len(seen) >= 2


def test_label_scores_are_teacher_forced_log_probs_and_batching_does_not_change_them():
    task = ClassificationTask(labels=LABELS)
    tok = tokenizer_for(task, LABELS)
    model = tiny_gpt(tok.get_vocab_size(), "llama", 1)
    prompts = task.prompts(tok, SENTENCES[:3] + [QUOTES[0]])
    labels, end = task.label_ids(tok), task.marker_ids(tok)[2]
    assert all(end not in ids for ids in labels)        # a quoted marker stays text
    scores = label_scores(model, prompts, labels, end, batch_size=64)
    # other batch shapes round fp32 matmuls differently: equal to rounding
    assert torch.allclose(scores, label_scores(model, prompts, labels, end, batch_size=3), rtol=0, atol=1e-4)
    for n, k in [(0, 0), (2, 5), (3, 6)]:               # one pair, by hand: sum of log P(next token)
        seq = prompts[n] + labels[k] + [end]
        logp = torch.log_softmax(model(torch.tensor([seq]))[0][0].double(), -1)
        want = sum(logp[t, seq[t + 1]].item() for t in range(len(prompts[n]) - 1, len(seq) - 1))
        assert scores[n, k].item() == pytest.approx(want, abs=1e-4)
    assert best_labels(model, prompts, labels, end) == scores.argmax(1).tolist()


class FavouriteToken(torch.nn.Module):
    """A model whose next token is always `favourite` (log-prob ~0) and anything else very unlikely."""

    def __init__(self, vocab: int, favourite: int):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.full((vocab,), -20.0))
        self.logits.data[favourite] = 20.0

    def forward(self, idx):
        return self.logits.expand(*idx.shape, -1), None


def test_the_label_the_model_prefers_is_chosen():
    task = ClassificationTask(labels=["yes", "no", "maybe"])
    tok = tokenizer_for(task, ["yes no maybe"])
    end = task.marker_ids(tok)[2]
    labels = task.label_ids(tok)
    prompts = task.prompts(tok, SENTENCES)
    # a model that always writes the end marker: the label with the fewest tokens costs least
    fewest = min(range(3), key=lambda k: (len(labels[k]), k))
    assert best_labels(FavouriteToken(tok.get_vocab_size(), end), prompts, labels, end) == [fewest] * len(prompts)
    for k, ids in enumerate(labels):      # a model that writes a one-token label's token: that label
        if len(ids) == 1:
            picks = best_labels(FavouriteToken(tok.get_vocab_size(), ids[0]), prompts, labels, end)
            assert picks == [k] * len(prompts)


def test_prompts_past_the_context_are_refused():
    task = ClassificationTask(labels=["yes", "no"])
    tok = tokenizer_for(task)
    model = tiny_gpt(tok.get_vocab_size(), "llama", 0, block=16)
    with pytest.raises(ValueError, match="context of 16"):
        task.classify(model, tok, [" ".join(SENTENCES)])


# ---------------------------------------------------------------- metrics and baselines

def test_classification_metrics_by_hand():
    task = ClassificationTask(labels=["a", "b", "c"])
    refs = ["a", "a", "b", "b", "c", "c"]
    preds = ["a", "b", "b", "b", "a", "c"]
    m = task.metrics(preds, refs)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # F1: a = 2PR/(P+R) with P=1/2, R=1/2 -> 1/2; b: P=2/3, R=1 -> 0.8; c: P=1, R=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert "spearman" not in m
    with pytest.raises(ValueError, match="'d'"):
        task.metrics(["d"], ["a"])


def test_spearman_of_ordered_labels():
    task = ClassificationTask(labels=["lo", "mid", "hi"], bands=[1.0, 2.0])
    values = [0.1, 1.5, 2.5]
    assert task.metrics(["lo", "mid", "hi"], ["lo"] * 3, values=values)["spearman"] == pytest.approx(1.0)
    assert task.metrics(["hi", "mid", "lo"], ["lo"] * 3, values=values)["spearman"] == pytest.approx(-1.0)
    # with ties, by the definition: Pearson's r of the average ranks
    x, y = [0, 0, 1, 2, 2, 1], [3.0, 1.0, 2.0, 5.0, 4.0, 0.5]
    rx, ry = [1.5, 1.5, 3.5, 5.5, 5.5, 3.5], [4, 2, 3, 6, 5, 1]
    assert spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_a_document_takes_its_windows_most_frequent_label():
    votes = by_document(["d1", "d1", "d1", "d2", "d2"], ["b", "a", "b", "a", "b"], ["a", "b"])
    assert votes == {"d1": "b", "d2": "a"}         # d2: a tie goes to the earlier label


def test_baselines_on_a_task_with_an_obvious_answer():
    task = ClassificationTask(labels=["court", "weather", "market"])
    words = {"court": "prisoner remand charged magistrate", "weather": "cold frost rain wind",
             "market": "prices wheat cattle sold"}
    rng = np.random.default_rng(0)

    def make(n):
        labels = [task.labels[i] for i in rng.integers(0, 3, n)]
        texts = [" ".join(rng.permutation(words[label].split())) + " the of and" for label in labels]
        return texts, labels

    train, val, test = make(60), make(20), make(30)
    lr = baselines.tfidf_logreg(task, train, test, val=val)
    assert lr["accuracy"] == 1.0 and lr["macro_f1"] == 1.0 and lr["C"] in baselines.C_GRID
    maj = baselines.majority(task, train[1], test[1])
    top = max(task.labels, key=train[1].count)
    assert maj["label"] == top and maj["accuracy"] == pytest.approx(test[1].count(top) / 30)


# ---------------------------------------------------------------- BLN600's two metadata tasks

@pytest.fixture(scope="module")
def bln600():
    root = needs_shared()
    from nichelm.tasks import bln600
    return bln600, bln600.read_bln600(root / "bln600" / "train.csv")


def test_bln600_documents_carry_their_date_and_split_like_prepare(bln600):
    mod, docs = bln600
    from nichelm.prepare import split_of
    assert len(docs) == 480 and all(1830 <= d.meta["year"] <= 1899 for d in docs)
    splits = mod.split_documents(docs)
    ids = {s: {d.doc_id for d in ds} for s, ds in splits.items()}
    assert sum(map(len, ids.values())) == 480 and not (ids["train"] & ids["test"]) and not (ids["val"] & ids["test"])
    for s, ds in splits.items():
        assert all(split_of(1337, "bln600", d.doc_id, 0.1, 0.1) == s for d in ds)


def test_bln600_window_cer_is_the_csv_cer_for_single_rows(bln600):
    mod, docs = bln600
    import csv
    rows = list(csv.DictReader((needs_shared() / "bln600" / "train.csv").open(encoding="utf-8", newline="")))
    by_pair = {(r["OCR Text"].strip(), r["Ground Truth"].strip()): float(r["CER"]) for r in rows}
    checked = 0
    for doc in docs[:60]:
        for seg in doc.segments:       # one row alone, as a document of its own
            one = Document(doc.doc_id, [Segment(seg.input.strip(), seg.output.strip())], doc.meta)
            got = mod.QUALITY.labelled(one)
            key = (seg.input.strip(), seg.output.strip())
            if len(got) == 1 and key in by_pair and got[0].text == key[0]:
                assert got[0].value == pytest.approx(by_pair[key], abs=1e-9), key
                checked += 1
    assert checked > 500


def test_bln600_tasks_label_every_window_from_the_set(bln600):
    mod, docs = bln600
    for task in mod.TASKS.values():
        task.check("bln600")
        data = mod.dataset(task, docs[:40])
        assert data["texts"] and set(data["labels"]) <= set(task.labels)
        assert all(len(t) <= task.window_chars * 1.5 for t in data["texts"])
    years = {d.doc_id: d.meta["year"] for d in docs[:40]}
    dated = mod.dataset(mod.DATING, docs[:40])
    assert all(label == f"{years[d] // 10 * 10}s" for d, label in zip(dated["doc_ids"], dated["labels"]))
