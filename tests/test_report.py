"""report.html: self-contained (inline CSS, charts as PNG data URIs), and it really renders in a browser."""

import base64
import builtins
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nichelm.evaluate import per_example_scores, score_corrections
from nichelm.metrics import char_distance
from nichelm.report import SHOWN_LABEL_EXAMPLES, excerpt, read_metrics, render_html, write_report_html

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "screenshot_report.py"
DATA_URI = re.compile(r'<img[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?!data:)[a-z]+:""", re.I)


def make_report(model: bool = True) -> dict:
    """A report shaped like evaluate_external's, for 6 documents in 2 sources."""
    examples = [{"id": f"d{i}", "source": "EN" if i < 3 else "FR", "input": f"Tho cat sat <{i}> & c0unted.",
                 "output": f"The cat sat <{i}> & counted."} for i in range(6)]
    outputs = [e["output"] if (model and i % 2) else e["input"] for i, e in enumerate(examples)]
    if model:
        outputs[0] = "Tho cat sat <0> & c0untcd."                        # one made worse
    report = score_corrections(examples, outputs)
    report.update({"unit": "document", "model": "runs/x" if model else None, "per_example":
                   per_example_scores(examples, outputs),
                   "data": {"path": "data/x", "format": "icdar", "name": "x"},
                   "examples": [{**e, "output": o, "reference": e["output"]} for e, o in zip(examples, outputs)]})
    return report


def write_metrics(run: Path) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "train_loss": 5 - s / 10, **({"val_loss": 5.2 - s / 10} if s % 5 == 0 else {})})
             for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 21, "train_lo')   # torn last line


def test_per_source_figures_count_each_sources_documents_made_worse():
    report = make_report()
    assert report["per_source"]["EN"]["worse_fraction"] == pytest.approx(1 / 3)      # d0 made worse
    assert report["per_source"]["FR"]["worse_fraction"] == 0.0
    assert report["per_source"]["FR"]["cer_after"] < report["per_source"]["FR"]["cer_before"]


def test_html_is_self_contained_with_embedded_charts(tmp_path):
    write_metrics(tmp_path / "run")
    path = write_report_html(make_report(), tmp_path / "report.html", run_dir=tmp_path / "run")
    page = path.read_text(encoding="utf-8")
    assert not EXTERNAL.search(page), "report.html must not load anything from outside the page"
    assert "<link" not in page and "@import" not in page and "<script" not in page
    images = DATA_URI.findall(page)
    assert len(images) == 3                            # loss curve, per source, CER change histogram
    for b64 in images:
        assert base64.b64decode(b64).startswith(b"\x89PNG\r\n\x1a\n")
    assert "CER (corpus)" in page and "relative improvement" in page and "made worse" in page


def test_examples_mark_insertions_and_deletions_and_escape_text(tmp_path):
    page = render_html(make_report())
    assert "<del>o</del><ins>e</ins>" in page          # Tho -> The: the model's edit
    assert "&lt;1&gt; &amp;" in page and "<1>" not in page
    assert "Worst examples" in page and "Best examples" in page
    assert re.search(r"d0</b>.*?\+\d", page, re.S)     # the harmed document is listed first among the worst


def test_raw_ocr_report_says_so_and_draws_the_raw_cer(tmp_path):
    page = render_html(make_report(model=False))
    assert "no model: the raw OCR is scored" in page
    assert "per-example CER of the raw OCR" in page and len(DATA_URI.findall(page)) == 2   # no run: no loss curve
    assert "OCR errors" in page


def test_long_examples_are_cut_at_the_aligned_place():
    """A 60k-character document is shown as an aligned excerpt; its scores stay those of the whole text."""
    gold = " ".join(f"The committee met on day {i} at the town hall." for i in range(1200))
    ocr = gold.replace("committee", "cornmittee").replace("hall", "hal1")
    out = gold.replace("hall", "hal1")
    short = excerpt({"input": ocr, "output": out, "reference": gold, "cer_before": 0.1, "cer_after": 0.05})
    assert short["full_chars"] == len(gold) and 2000 <= len(short["reference"]) < 2100
    assert gold[len(short["reference"])] == " "                      # cut at a word boundary
    # Cut at the same place on every side: the excerpt's edits are just those of its sentences
    # (3 per sentence in the OCR: m -> rn, l -> 1; 1 in the output), none from a misaligned tail.
    n = short["reference"].count("committee")
    assert char_distance(short["input"], short["reference"]) <= 3 * n + 1
    assert char_distance(short["output"], short["reference"]) <= n + 1
    assert short["cer_before"] == 0.1
    page = render_html({**make_report(), "examples": [short]})
    assert f"the first {len(short['reference']):,} of {len(gold):,} characters" in page
    small = {"input": "a", "output": "a", "reference": "b"}
    assert excerpt(small) is small


def test_metrics_reader_skips_torn_lines(tmp_path):
    write_metrics(tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_without_matplotlib_the_page_is_still_written(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    page = render_html(make_report())
    assert "charts need matplotlib" in page and "<img" not in page and "CER (corpus)" in page


def test_screenshot_shows_the_charts(tmp_path):
    """Headless Chromium renders the demo report; the PNG is a real page, not a blank or error screen."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import screenshot_report
    finally:
        sys.path.remove(str(SCRIPT.parent))
    if screenshot_report.find_browser() is None:
        pytest.skip("no Chromium (set $CHROMIUM or apt-get install -y chromium): the screenshot check needs one")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--demo", str(tmp_path / "demo"), "--height", "1400"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    shot = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(shot["png"]).is_file() and (shot["width"], shot["height"]) == (1200, 1400)
    # A blank page is one colour; text alone gives a few hundred anti-aliased greys. The charts add the
    # red/blue bars and lines, so require many colours and those two hues in quantity.
    assert shot["colours"] > 500 and shot["top_colour_share"] < 0.95
    from matplotlib.image import imread
    img = imread(shot["png"])[..., :3]
    red = ((img[..., 0] > 0.65) & (img[..., 1] < 0.4) & (img[..., 2] < 0.4)).sum()     # before bars, val loss
    blue = ((img[..., 2] > 0.65) & (img[..., 0] < 0.45) & (img[..., 1] < 0.6)).sum()   # after bars, histogram
    assert red > 2000 and blue > 2000, (red, blue)


# --------------------------------------------------------------------------- the selection section


def make_selection(method: str) -> dict:
    """selection.json of a real selection: 'med' documents chosen from a pool of three domains."""
    import random

    from nichelm.config import SelectConfig
    from nichelm.selection import list_corpus, select_corpus, write_selection
    from tests.test_select import make_doc, make_pool
    pool = make_pool({"law": 40, "med": 20, "code": 40})
    pool[0].text = "<script>alert(1)</script> " + pool[0].text           # sample text must come out escaped
    rng = random.Random(4)
    target = [make_doc("med", rng) for _ in range(20)]
    cfg = SelectConfig(method=method, documents=20, k=4, min_tokens=0, fit_chars=10**9)
    selection = select_corpus(list_corpus(pool), target, cfg, seed=0, log=lambda m: None)
    report = write_selection(list_corpus(pool), selection, None, cfg)
    report["target"]["per_domain"] = {"med": {"documents": 20, "share": 1.0}}
    return report


@pytest.mark.parametrize("method", ["clusters", "dsir"])
def test_selection_page_shows_histograms_kl_shares_and_samples(tmp_path, method):
    from nichelm.report import write_selection_html
    sel = make_selection(method)
    page = write_selection_html(sel, tmp_path / "selection.html").read_text()
    images = DATA_URI.findall(page)
    assert len(images) == (2 if method == "clusters" else 1)      # cluster histogram (clusters only), domains
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images) and not EXTERNAL.search(page)
    assert f"<td>{sel['kl']['reduction']:.4f}</td>" in page and sel["kl"]["reduction"] > 0.3
    # per source: selected documents, share and the chosen documents' licences; per domain: generic vs selected
    assert "<td>pool</td><td>20</td><td>100.00%</td>" in page and "lic (20)" in page
    assert "<tr><td>med</td><td>20.00%</td><td>20</td><td>100.00%</td><td>100.00%</td></tr>" in page
    assert "<tr><td>law</td><td>40.00%</td><td>0</td><td>0.00%</td><td></td></tr>" in page
    samples = page.split("Samples of the most-weighted")[1]
    assert samples.count('class="text"') >= 3 and "<script>" not in page
    if method == "clusters":
        top = sel["top_clusters"][0]
        assert f"<b>cluster {top['cluster']}</b>" in samples and top["samples"][0]["text"][:40] in samples


def test_run_report_includes_the_selection_and_flags_a_newer_one(tmp_path):
    run = tmp_path / "run"
    (run / "select").mkdir(parents=True)
    (run / "data").mkdir()
    sel = {**make_selection("clusters"), "output_sha256": "a" * 64}
    (run / "select" / "selection.json").write_text(json.dumps(sel))
    (run / "data" / "manifest.json").write_text(json.dumps({"sources": [{"name": "selected", "sha256": "a" * 64}]}))
    page = render_html(make_report(), run)
    assert "Selection of generic text" in page and "selected documents (tokens with select.tokens) per cluster" in page
    assert "not the one" not in page
    (run / "data" / "manifest.json").write_text(json.dumps({"sources": [{"name": "selected", "sha256": "b" * 64}]}))
    assert "not the one the run's data was prepared from" in render_html(make_report(), run)
    assert "Selection of generic text" not in render_html(make_report(), tmp_path / "other-run")


def _perplexity(groups: dict[str, float]) -> dict:
    """A "perplexity" key shaped like nichelm.perplexity.perplexity_report's, mean NLL per group given."""
    import math
    per = {name: {"documents": 2, "tokens": 100, "bytes": 400, "nll": nll, "perplexity": math.exp(nll),
                  "bits_per_byte": nll * 100 / math.log(2) / 400} for name, nll in groups.items()}
    mean = sum(groups.values()) / len(groups)
    return {"groups": per, "documents": 2 * len(per), "tokens": 100 * len(per), "macro_perplexity": math.exp(mean),
            "micro_perplexity": math.exp(mean), "bits_per_byte": 1.0, "context": "sliding windows",
            "data": "held/out.jsonl", "model": "runs/x"}


def test_perplexity_section_shows_each_group_and_the_macro_average():
    report = make_report()
    assert "Specialized perplexity" not in render_html(report)        # no --perplexity run: no section
    report["perplexity"] = _perplexity({"law <court>": 2.0, "health": 3.0})
    page = render_html(report)
    section = page[page.index("<h2>Specialized perplexity</h2>"):]
    assert "law &lt;court&gt;" in section and "<court>" not in section    # group names escaped
    assert "7.389" in section and "20.086" in section                  # exp(2), exp(3) per group
    assert re.search(r"macro</b>[^<]*</td><td>4</td><td>200</td><td>12\.182</td>", section)   # exp(2.5)
    assert "held/out.jsonl" in section and "CER (corpus)" in page


def test_perplexity_only_report_renders_its_section_alone(tmp_path):
    """evaluate --perplexity before any evaluation: report.json holds the perplexity only."""
    path = write_report_html({"perplexity": _perplexity({"news": 1.0})}, tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    assert "Specialized perplexity" in page and "2.718" in page and "CER (corpus)" not in page


# --------------------------------------------------------------------------- label tasks (evaluate_labels)

QUALITY = ["<1%", "1–3%", "3–10%", "≥10% & worse"]      # label text that must come out escaped


def make_label_report() -> dict:
    """A report shaped like evaluate_labels', its figures computed by the task's own metrics and baselines."""
    from nichelm.tasks import ClassificationTask
    from nichelm.tasks.baselines import majority
    task = ClassificationTask(name="quality", labels=QUALITY, bands=[0.01, 0.03, 0.1], label_field="window_cer")
    refs = [QUALITY[i] for i in (0, 0, 0, 1, 1, 1, 2, 2, 3, 3)]
    preds = [QUALITY[i] for i in (0, 1, 0, 1, 2, 1, 2, 3, 3, 0)]
    values = [0.001, 0.005, 0.008, 0.012, 0.02, 0.025, 0.05, 0.08, 0.2, 0.4]
    tfidf = [QUALITY[i] for i in (0, 0, 1, 1, 1, 1, 1, 2, 3, 3)]
    docs = [f"d{i // 2}" for i in range(10)]
    doc_refs, doc_preds = refs[::2], [QUALITY[i] for i in (0, 1, 1, 2, 0)]
    return {"task": task.to_json(), "decoding": "labels", "unit": "window", "n_examples": 10, "n_documents": 5,
            "sample": {"split": "test", "windows_in_split": 14, "windows": 10, "max_windows": 10, "seed": 0},
            "metrics": task.metrics(preds, refs, values=values),
            "baselines": {"majority": majority(task, refs[:6], refs, values),
                          "tfidf_logreg": {**task.metrics(tfidf, refs, values=values), "C": 4.0}},
            "by_document": {"metrics": task.metrics(doc_preds, doc_refs, values=values[::2]),
                            "baselines": {"majority": majority(task, refs[:6], doc_refs, values[::2]),
                                          "tfidf_logreg": task.metrics(tfidf[::2], doc_refs, values=values[::2])}},
            "seconds": 2.0, "windows_per_s": 5.0,
            "examples": [{"id": d, "input": f"window {i} <script>x</script> & more", "reference": r, "output": p}
                         for i, (d, r, p) in enumerate(zip(docs, refs, preds))]}


def score_row(name: str, m: dict) -> str:
    rho = "n/a" if m["spearman"] is None else f"{m['spearman']:.4f}"      # a constant answer has no rank correlation
    return f"<tr><td>{name}</td><td>{100 * m['accuracy']:.2f}%</td><td>{m['macro_f1']:.4f}</td><td>{rho}</td></tr>"


def test_label_report_shows_the_scores_confusion_and_examples_escaped(tmp_path):
    report = make_label_report()
    page = write_report_html(report, tmp_path / "report.html").read_text(encoding="utf-8")
    assert not EXTERNAL.search(page) and "<script" not in page and "CER (corpus)" not in page
    # the label text, escaped everywhere (task table, confusion headers, examples), never raw
    assert "<1%" not in page and "&lt;1%" in page and "≥10% &amp; worse" in page and "& worse" not in page
    assert "<td>&lt;1%</td><td>&lt; 0.01</td><td>3</td><td>3</td>" in page      # band, true and predicted counts
    assert "<td>≥10% &amp; worse</td><td>&ge; 0.1</td><td>2</td><td>2</td>" in page
    # the figures of report.json: model and baselines per window, then per document
    windows, documents = page.split("Scores per document")
    m, b = report["metrics"], report["baselines"]
    assert score_row("this model", m) in windows
    assert score_row("baseline majority (always &lt;1%)", b["majority"]) in windows
    assert score_row("baseline tfidf_logreg (C = 4)", b["tfidf_logreg"]) in windows
    d = report["by_document"]
    assert score_row("this model", d["metrics"]) in documents
    assert score_row("baseline tfidf_logreg", d["baselines"]["tfidf_logreg"]) in documents
    # confusion matrices: rows true, columns predicted, per window then per document
    assert m["confusion"][0] == [2, 1, 0, 0] and m["confusion"][3] == [1, 0, 0, 1]
    confusion_w = page.split("Confusion matrix of the model, per window")[1].split("Confusion matrix")[0]
    assert "<th>true &darr; predicted &rarr;</th><th>&lt;1%</th><th>1–3%</th>" in confusion_w
    assert "<tr><td>&lt;1%</td><td><b>2</b></td><td>1</td><td>0</td><td>0</td></tr>" in confusion_w
    assert "<tr><td>≥10% &amp; worse</td><td>1</td><td>0</td><td>0</td><td><b>1</b></td></tr>" in confusion_w
    confusion_d = page.split("Confusion matrix of the model, per document")[1]
    assert "<tr><td>&lt;1%</td><td><b>1</b></td><td>1</td><td>0</td><td>0</td></tr>" in confusion_d
    assert "<tr><td>≥10% &amp; worse</td><td>1</td><td>0</td><td>0</td><td><b>0</b></td></tr>" in confusion_d
    # example windows: the misclassified first, with their true and predicted labels, the text escaped
    shown = page.split("Example windows")[1]
    assert shown.count('class="example"') == 2 * SHOWN_LABEL_EXAMPLES
    assert re.search(r"d0</b> &middot; true <b>&lt;1%</b> &middot; predicted <b>1–3%</b>.*?wrong", shown)
    assert shown.index(">wrong<") < shown.index(">right<")
    assert "window 1 &lt;script&gt;x&lt;/script&gt; &amp; more" in shown


def test_label_report_without_documents_spearman_or_examples(tmp_path):
    """Windows of mixed labels (no per-document scores), unordered labels (no Spearman), no stored examples."""
    from nichelm.tasks import ClassificationTask
    task = ClassificationTask(labels=["yes", "no"])
    m = task.metrics(["yes", "no", "no"], ["yes", "yes", "no"])
    page = render_html({"task": task.to_json(), "decoding": "labels", "metrics": m, "n_examples": 3,
                        "baselines": {"majority": {**task.metrics(["yes"] * 3, ["yes", "yes", "no"]), "label": "yes"}}})
    assert "Scores per document" not in page and "Spearman" not in page and "Example windows" not in page
    assert f"<tr><td>this model</td><td>66.67%</td><td>{m['macro_f1']:.4f}</td></tr>" in page


def test_evaluate_labels_writes_the_page_of_its_report(tmp_path):
    """`nichelm evaluate` on a classification run writes report.html beside report.json, with its figures."""
    from nichelm.config import Project
    from nichelm.evaluate import evaluate_project
    from tests.test_task_stages import label_run, write_split
    run = label_run(tmp_path / "run")
    write_metrics(run)                                   # the run's loss curve goes on the page
    for split, n, offset in (("train", 12, 0), ("val", 4, 100), ("test", 4, 200)):
        write_split(run / "data" / f"examples.{split}.jsonl", n, offset)
    project = Project(run_dir=str(run))
    project.eval.max_examples = 0
    report = evaluate_project(project)
    page = (run / "eval" / "report.html").read_text(encoding="utf-8")
    assert report == json.loads((run / "eval" / "report.json").read_text())
    assert score_row("this model", report["metrics"]) in page
    assert score_row("this model", report["by_document"]["metrics"]) in page.split("Scores per document")[1]
    assert f"(C = {report['baselines']['tfidf_logreg']['C']:g})" in page
    assert "<th>true &darr; predicted &rarr;</th><th>1830s</th><th>1840s</th>" in page
    assert "Training" in page and len(DATA_URI.findall(page)) == 1          # the loss curve
    assert "Example windows" in page and not EXTERNAL.search(page)
