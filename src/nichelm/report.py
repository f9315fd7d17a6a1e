"""report.html: one self-contained page per evaluation, readable offline and attachable anywhere.

Everything is inline: the CSS, and the charts as base64 PNG data URIs drawn with
matplotlib's Agg canvas (no display, no pyplot global state). Nothing is fetched
over the network, so the page opens the same from a laptop, a CI artefact or an
e-mail. Without matplotlib the page is still written, with a note where the
charts would be, so an evaluation never fails for want of a plotting library.

Contents: the headline before/after table, the loss curves of the run (when its
metrics.jsonl is known), CER before/after per source, the distribution of the
per-example CER change, the worst and best examples with the model's edits and
the remaining errors marked, and the per-example table; the specialized perplexity when
`evaluate --perplexity` has run (that section alone when nothing else was evaluated); when the
run selected generic text (`nichelm select`), the selection section, which select also writes as
a page of its own. A label task's report (classification, nichelm.evaluate_labels) gets its own sections
instead of the CER ones: the task and its labels, the model beside the baselines, the confusion matrix
and a few classified windows.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from rapidfuzz.distance import Levenshtein

from nichelm.io import atomic_write_text
from nichelm.metrics import char_distance, mark_changes_html

SHOWN_EXAMPLES = 3       # worst and best examples shown with their diffs
EXCERPT_CHARS = 2000     # reference characters shown of a long example
TABLE_ROWS = 200         # per-example rows shown (all of them stay in report.json)
BEFORE, AFTER = "#c0504d", "#4f81bd"
HIST_CHANGE_LIMIT = 50.0  # points of CER change shown in the histogram
HIST_CER_LIMIT = 150.0    # % CER shown in the raw-OCR histogram

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
.meta { color: #666; } .note { color: #666; font-style: italic; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.8em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.headline td, .headline th { font-size: 1.1em; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
.charts figure { margin: 0; } .charts img { width: 520px; max-width: 100%; border: 1px solid #eee; }
figcaption { color: #666; font-size: 0.9em; }
.example { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em 0.8em; margin: 0.8em 0; }
.text { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; white-space: pre-wrap;
        max-height: 14em; overflow: auto; background: #fafafa; padding: 0.4em; margin: 0.3em 0 0.6em; }
del { background: #fdd; color: #a00; } ins { background: #dfd; color: #060; text-decoration: none; }
.worse { color: #a00; } .better { color: #060; }
"""


# --------------------------------------------------------------------------- entry point


def write_report_html(report: dict, path: Path, run_dir: Path | None = None) -> Path:
    """Render `report` (a report.json dict) to `path`; `run_dir` adds its loss curves."""
    path = Path(path)
    atomic_write_text(path, render_html(report, run_dir))
    return path


def render_html(report: dict, run_dir: Path | None = None) -> str:
    """The whole page as one string."""
    data = report.get("data") or {}
    title = f"nichelm evaluation: {data.get('name') or ((Path(run_dir).name + ', ') if run_dir else '') + 'test split'}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{_e(title)}</h1>", _meta_line(report, run_dir)]
    if report.get("decoding") == "labels":  # a label task (evaluate_labels): the model beside the baselines
        loss = run_dir is not None and read_metrics(Path(run_dir) / "metrics.jsonl")
        parts += [label_sections(report), "<h2>Training</h2>" + _charts(report, run_dir) if loss else "",
                  perplexity_section(report.get("perplexity")), _run_selection(run_dir)]
    elif "cer_before" in report:
        parts += ["<h2>Corpus scores</h2>", _headline_table(report),
                  "<h2>Charts</h2>", _charts(report, run_dir),
                  "<h2>Per source</h2>", _source_table(report),
                  perplexity_section(report.get("perplexity")),
                  _examples_section(report),
                  _per_example_table(report),
                  _run_selection(run_dir)]
    else:                                   # only `evaluate --perplexity` has run so far: its section alone
        parts.append(perplexity_section(report.get("perplexity")))
    parts.append("</body></html>\n")
    return "\n".join(p for p in parts if p)


def write_selection_html(selection: dict, path: Path) -> Path:
    """RUN/select/selection.html: the selection section (selection_section) as a page of its own."""
    path = Path(path)
    title = "nichelm selection"
    atomic_write_text(path, f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
                            f"<style>{CSS}</style></head><body>\n<h1>{title}</h1>\n{selection_section(selection)}\n"
                            "</body></html>\n")
    return path


# --------------------------------------------------------------------------- tables


def _meta_line(report: dict, run_dir: Path | None) -> str:
    data = report.get("data") or {}
    bits = []
    if data:
        bits.append(f"data <code>{_e(data.get('path'))}</code> ({_e(data.get('format'))})")
    model = report.get("model", str(run_dir) if run_dir else None)
    bits.append(f"model <code>{_e(model)}</code>" if model else "no model: the raw OCR is scored")
    bits.append(f"unit: {_e(report.get('unit', 'example'))}")
    return f"<p class=\"meta\">{' &middot; '.join(bits)}</p>"


def _headline_table(report: dict) -> str:
    """CER and WER before/after, then the one-number summaries."""
    rows = [("CER (corpus)", report["cer_before"], report["cer_after"]),
            ("WER (corpus)", report["wer_before"], report["wer_after"])]
    body = "".join(f"<tr><td>{name}</td><td>{_pct(b)}</td><td>{_pct(a)}</td><td>{_points(a - b)}</td></tr>"
                   for name, b, a in rows)
    table = f"<table class=\"headline\"><tr><th></th><th>before</th><th>after</th><th>change</th></tr>{body}</table>"
    facts = [("relative improvement (before − after) / before", _pct(report.get("relative_improvement"))),
             ("examples made worse", _pct(report.get("worse_fraction"))),
             ("examples made better", _pct(report.get("better_fraction"))),
             (f"examples ({_e(report.get('unit', 'example'))}s)", f"{report['n_examples']:,}"),
             ("gold characters", f"{report.get('gold_chars', 0):,}")]
    if report.get("chars_per_s"):
        docs = f", {report['docs_per_s']:.2f} docs/s" if report.get("docs_per_s") else ""
        facts.append(("throughput", f"{report['chars_per_s']:,.0f} chars/s{docs} ({report['seconds']:.1f} s)"))
    guard = report.get("guard")
    if guard:
        facts.append(("do-no-harm guard kept the input", f"{guard.get('kept_too_different', 0)} too different, "
                                                         f"{guard.get('kept_hit_limit', 0)} unfinished"))
    if report.get("cer_after_unguarded") is not None:
        facts.append(("CER after without the guard", _pct(report["cer_after_unguarded"])))
    rows_html = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in facts)
    return table + f"<table>{rows_html}</table>"


def _source_table(report: dict) -> str:
    rows = "".join(f"<tr><td>{_e(src)}</td><td>{s['n_examples']:,}</td><td>{_pct(s['cer_before'])}</td>"
                   f"<td>{_pct(s['cer_after'])}</td><td>{_pct(s['wer_before'])}</td><td>{_pct(s['wer_after'])}</td>"
                   f"</tr>" for src, s in report.get("per_source", {}).items())
    return ("<table><tr><th>source</th><th>n</th><th>CER before</th><th>CER after</th><th>WER before</th>"
            f"<th>WER after</th></tr>{rows}</table>")


def _per_example_table(report: dict) -> str:
    """Every example's CER before/after, most harmed first (capped; report.json has all)."""
    rows = sorted(report.get("per_example") or [], key=lambda r: (r["cer_after"] - r["cer_before"], r["cer_after"]),
                  reverse=True)
    if not rows:
        return ""
    body = "".join(f"<tr><td>{_e(r['id'])}</td><td>{_e(r['source'])}</td><td>{r['chars']:,}</td>"
                   f"<td>{_pct(r['cer_before'])}</td><td>{_pct(r['cer_after'])}</td>"
                   f"<td>{_points(r['cer_after'] - r['cer_before'])}</td></tr>" for r in rows[:TABLE_ROWS])
    note = (f"<p class=\"note\">the {TABLE_ROWS} most harmed of {len(rows):,}; report.json has them all</p>"
            if len(rows) > TABLE_ROWS else "")
    unit = _e(report.get("unit", "example"))
    return (f"<h2>Per {unit}</h2>{note}<table><tr><th>{unit}</th><th>source</th><th>gold chars</th>"
            f"<th>CER before</th><th>CER after</th><th>change</th></tr>{body}</table>")


# --------------------------------------------------------------------------- perplexity (evaluate --perplexity)


def perplexity_section(ppl: dict | None) -> str:
    """The "perplexity" key of report.json (nichelm.perplexity.perplexity_report): per domain or source,
    then the macro average (exp of the mean of the groups' mean NLLs: the paper's metric) and the micro one."""
    if not ppl or not ppl.get("groups"):
        return ""

    def row(name: str, g: dict, value: float) -> str:
        return (f"<tr><td>{name}</td><td>{g['documents']:,}</td><td>{g['tokens']:,}</td>"
                f"<td>{value:,.3f}</td><td>{g['bits_per_byte']:.4f}</td></tr>")
    body = "".join(row(_e(name), g, g["perplexity"]) for name, g in ppl["groups"].items())
    body += row("<b>macro</b> (exp of the mean of the groups' NLLs)", ppl, ppl["macro_perplexity"])
    body += row("micro (all tokens pooled)", ppl, ppl["micro_perplexity"])
    meta = " &middot; ".join(f"{k} <code>{_e(ppl[k])}</code>" for k in ("data", "model") if ppl.get(k))
    note = f"<p class=\"note\">{_e(ppl['context'])}</p>" if ppl.get("context") else ""
    return ("<h2>Specialized perplexity</h2>" + (f"<p class=\"meta\">{meta}</p>" if meta else "") +
            "<table><tr><th>domain / source</th><th>documents</th><th>tokens</th><th>perplexity</th>"
            f"<th>bits/byte</th></tr>{body}</table>{note}")


# --------------------------------------------------------------------------- label tasks (evaluate_labels)

SHOWN_LABEL_EXAMPLES = 3  # misclassified windows shown, and as many correct ones


def label_sections(report: dict) -> str:
    """A label task's report.json (nichelm.evaluate_labels): the task, the scores of the model and the
    baselines on the same windows (and documents, when each document has one label), the model's
    confusion matrices and a few windows with their true and predicted labels."""
    task = report.get("task") or {}
    labels = task.get("labels") or (report.get("metrics") or {}).get("labels") or []
    sample = report.get("sample") or {}
    facts = [("task", f"{_e(task.get('name'))} ({_e(task.get('type'))}), label from "
                      f"<code>{_e(task.get('label_field'))}</code>, reading the {_e(task.get('text', 'input'))} text"),
             ("test windows scored", f"{report.get('n_examples', 0):,} of {sample.get('windows_in_split', 0):,} "
                                     f"in the split ({report.get('n_documents', 0):,} documents)")]
    if report.get("windows_per_s"):
        facts.append(("throughput", f"{report['windows_per_s']:,.1f} windows/s ({report['seconds']:.1f} s)"))
    parts = ["<h2>Task</h2>", "<table>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in facts)
             + "</table>", _label_table(labels, task.get("bands"), report.get("metrics") or {}),
             "<h2>Scores per window</h2>", _label_scores(report)]
    docs = report.get("by_document")
    if docs:
        parts += ["<h2>Scores per document</h2>", "<p class=\"note\">every window of a document has its label: "
                  "the model sums its windows' label scores, TF-IDF + LR takes a vote of its windows</p>",
                  _label_scores(docs)]
    parts += ["<h2>Confusion matrix of the model, per window</h2>", _confusion_table(report.get("metrics") or {})]
    if docs:
        parts += ["<h2>Confusion matrix of the model, per document</h2>", _confusion_table(docs.get("metrics") or {})]
    parts.append(_label_examples(report.get("examples") or []))
    return "\n".join(p for p in parts if p)


def _label_table(labels: list, bands: list | None, metrics: dict) -> str:
    """Each label, the values it stands for (banded labels), and how many test windows have it / got it."""
    confusion = metrics.get("confusion") or []
    true = [sum(row) for row in confusion] if len(confusion) == len(labels) else None
    predicted = [sum(col) for col in zip(*confusion)] if true else None
    edges = [None, *bands, None] if bands and len(bands) == len(labels) - 1 else None

    def band(i: int) -> str:
        lo, hi = edges[i], edges[i + 1]
        return f"&lt; {hi:g}" if lo is None else f"&ge; {lo:g}" if hi is None else f"{lo:g} to &lt; {hi:g}"
    rows = "".join(f"<tr><td>{_e(label)}</td>" + (f"<td>{band(i)}</td>" if edges else "")
                   + (f"<td>{true[i]:,}</td><td>{predicted[i]:,}</td>" if true else "") + "</tr>"
                   for i, label in enumerate(labels))
    head = ("<tr><th>label</th>" + ("<th>values</th>" if edges else "")
            + ("<th>test windows</th><th>predicted by the model</th>" if true else "") + "</tr>")
    return f"<table>{head}{rows}</table>"


def _label_scores(part: dict) -> str:
    """The model and each baseline: accuracy, macro-F1, Spearman (a column only where some row has it)."""
    rows = [("this model", part.get("metrics") or {})]
    for name, m in (part.get("baselines") or {}).items():
        how = (f" (always {_e(m['label'])})" if "label" in m else f" (C = {m['C']:g})" if "C" in m else "")
        rows.append((f"baseline {_e(name)}{how}", m))
    with_rho = any("spearman" in m for _, m in rows)
    body = "".join(f"<tr><td>{name}</td><td>{_pct(m.get('accuracy'))}</td><td>{_num(m.get('macro_f1'))}</td>"
                   + (f"<td>{_num(m.get('spearman'))}</td>" if with_rho else "") + "</tr>" for name, m in rows)
    n = (part.get("metrics") or {}).get("n", 0)
    return (f"<table class=\"headline\"><tr><th>{n:,} scored</th><th>accuracy</th><th>macro-F1</th>"
            + ("<th>Spearman</th>" if with_rho else "") + f"</tr>{body}</table>")


def _confusion_table(metrics: dict) -> str:
    """Rows: the true label; columns: the predicted one; the diagonal (correct answers) in bold."""
    labels, confusion = metrics.get("labels") or [], metrics.get("confusion") or []
    if not labels or len(confusion) != len(labels):
        return "<p class=\"note\">no confusion matrix in report.json</p>"
    head = "<tr><th>true &darr; predicted &rarr;</th>" + "".join(f"<th>{_e(x)}</th>" for x in labels) + "</tr>"
    body = "".join(f"<tr><td>{_e(label)}</td>" + "".join(f"<td><b>{n:,}</b></td>" if i == j else f"<td>{n:,}</td>"
                                                          for j, n in enumerate(row)) + "</tr>"
                   for i, (label, row) in enumerate(zip(labels, confusion)))
    return f"<table>{head}{body}</table>"


def _label_examples(examples: list[dict]) -> str:
    """The first few stored windows the model got wrong, then as many it got right."""
    stored = [e for e in examples if {"input", "output", "reference"} <= e.keys()]
    if not stored:
        return ""
    wrong = [e for e in stored if e["output"] != e["reference"]][:SHOWN_LABEL_EXAMPLES]
    right = [e for e in stored if e["output"] == e["reference"]][:SHOWN_LABEL_EXAMPLES]

    def one(e: dict) -> str:
        verdict = "better\">right" if e["output"] == e["reference"] else "worse\">wrong"
        return (f"<div class=\"example\"><b>{_e(e.get('id', ''))}</b> &middot; true <b>{_e(e['reference'])}</b>"
                f" &middot; predicted <b>{_e(e['output'])}</b> <span class=\"{verdict}</span>"
                f"<div class=\"text\">{_e(e['input'])}</div></div>")
    return "\n".join(["<h2>Example windows</h2>", f"<p class=\"note\">{len(wrong)} misclassified and "
                      f"{len(right)} correct of the {len(stored):,} windows stored in report.json</p>",
                      *map(one, wrong + right)])


# --------------------------------------------------------------------------- selection (nichelm select)


def _run_selection(run_dir: Path | None) -> str:
    """The selection section of a run's page, from RUN/select/selection.json, when the run has one.
    Its selected.jsonl is the one the run's data was prepared from when the manifest's sha256 of it is the
    report's; otherwise the page says so (the selection was made again after prepare)."""
    if run_dir is None:
        return ""
    selection = _read_json(Path(run_dir) / "select" / "selection.json")
    if not selection:
        return ""
    manifest = _read_json(Path(run_dir) / "data" / "manifest.json") or {}
    used = [s.get("sha256") for s in manifest.get("sources", []) if s.get("name") == "selected"]
    note = ""
    if used and selection.get("output_sha256") and used[0] != selection["output_sha256"]:
        note = ("<p class=\"note\">this selection is not the one the run's data was prepared from "
                "(selected.jsonl changed since: run <code>nichelm prepare</code> again)</p>")
    return selection_section(selection, note)


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def selection_section(sel: dict, note: str = "") -> str:
    """What `nichelm select` chose (its selection.json): sizes and DSIR's KL measure, the cluster histogram
    of target vs generic vs selected, per-source and per-domain shares with licences, and sample documents
    of the most-weighted clusters (dsir: the most-weighted documents)."""
    settings = sel.get("settings") or {}
    bits = [f"method <b>{_e(sel.get('method'))}</b>"]
    bits += [f"{_e(k)} {_e(v)}" for k, v in settings.items() if k != "size"]
    bits += [f"size {_e(k)} {v:,}" for k, v in (settings.get("size") or {}).items()]
    if "k" in sel:
        bits.append(f"k {sel['k']} (embedding {_e(sel.get('embedding'))})")
    gen, chosen, target, kl_ = sel.get("generic", {}), sel.get("selected", {}), sel.get("target", {}), sel.get("kl", {})
    facts = [("generic documents (eligible)", f"{gen.get('documents', 0):,} ({gen.get('eligible_documents', 0):,})"),
             ("selected documents (distinct)",
              f"{chosen.get('documents', 0):,} ({chosen.get('distinct_documents', 0):,})"),
             ("selected tokens (wordpunct)", f"{chosen.get('tokens', 0):,}"),
             ("target documents, tokens", f"{target.get('documents', 0):,}, {target.get('tokens', 0):,}"),
             ("KL(target ‖ generic), hashed n-grams", _num(kl_.get("target_vs_generic"))),
             ("KL(target ‖ selected)", _num(kl_.get("target_vs_selected"))),
             ("KL reduction (higher: closer to the target)", _num(kl_.get("reduction")))]
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in facts)
    return "\n".join(p for p in [
        "<h2>Selection of generic text (nichelm select)</h2>", note,
        f"<p class=\"meta\">{' &middot; '.join(bits)}</p>", f"<table>{rows}</table>",
        _selection_charts(sel), "<h3>Per source</h3>", _selection_sources(sel),
        _selection_domains(sel), _selection_samples(sel)] if p)


def _selection_charts(sel: dict) -> str:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "<p class=\"note\">charts need matplotlib: pip install matplotlib (or nichelm[report])</p>"
    figures = []
    if sel.get("clusters"):
        figures.append(cluster_histogram_png(sel["clusters"]))
    if sel.get("per_domain"):
        figures.append((domain_shares_png(sel["per_domain"], (sel.get("target") or {}).get("per_domain", {})),
                        "documents per domain: generic corpus, selection (and target when its records name one)"))
    return "<div class=\"charts\">" + "".join(
        f"<figure><img alt=\"{_e(caption)}\" src=\"{png_data_uri(png)}\"><figcaption>{_e(caption)}</figcaption>"
        f"</figure>" for png, caption in figures) + "</div>" if figures else ""


def _selection_sources(sel: dict) -> str:
    rows = "".join(
        f"<tr><td>{_e(name)}</td><td>{s.get('documents', 0):,}</td><td>{_pct(s.get('share'))}</td>"
        f"<td>{s.get('distinct_documents', 0):,}</td><td>{s.get('tokens', 0):,}</td>"
        f"<td>{s.get('seen_documents', 0):,}</td>"
        f"<td>{'; '.join(f'{_e(lic)} ({n:,})' for lic, n in (s.get('licences') or {}).items())}</td></tr>"
        for name, s in (sel.get("per_source") or {}).items())
    return ("<table><tr><th>generic source</th><th>selected</th><th>share</th><th>distinct</th><th>tokens</th>"
            f"<th>documents read</th><th>licences (selected documents)</th></tr>{rows}</table>")


def _selection_domains(sel: dict) -> str:
    domains = sel.get("per_domain") or {}
    if not domains:
        return ""
    target = (sel.get("target") or {}).get("per_domain", {})
    rows = "".join(f"<tr><td>{_e(d)}</td><td>{_pct(s.get('generic_share'))}</td><td>{s.get('documents', 0):,}</td>"
                   f"<td>{_pct(s.get('share'))}</td><td>{_pct(target[d]['share']) if d in target else ''}</td></tr>"
                   for d, s in domains.items())
    return ("<h3>Per domain</h3><table><tr><th>domain</th><th>generic share</th><th>selected</th>"
            f"<th>selected share</th><th>target share</th></tr>{rows}</table>")


def _selection_samples(sel: dict) -> str:
    parts = []
    for c in sel.get("top_clusters") or []:
        row = next((r for r in sel.get("clusters") or [] if r.get("cluster") == c["cluster"]), {})
        head = (f"<b>cluster {c['cluster']}</b> &middot; log weight {_num(c.get('log_weight'))} &middot; target "
                f"{_pct(row.get('target_share'))}, generic {_pct(row.get('generic_share'))}, selected "
                f"{_pct(row.get('selected_share'))}")
        texts = "".join(f"<div class=\"meta\">{_e(d['id'])}</div><div class=\"text\">{_e(d['text'])}</div>"
                        for d in c.get("samples", []))
        parts.append(f"<div class=\"example\">{head}{texts}</div>")
    for d in sel.get("top_documents") or []:
        parts.append(f"<div class=\"example\"><b>{_e(d['id'])}</b> &middot; log weight {_num(d.get('log_weight'))}"
                     f"<div class=\"text\">{_e(d['text'])}</div></div>")
    if not parts:
        return ""
    what = "the most-weighted clusters" if sel.get("top_clusters") else "the most-weighted documents"
    return f"<h3>Samples of {what}</h3>" + "\n".join(parts)


# --------------------------------------------------------------------------- examples


def _examples_section(report: dict) -> str:
    """Worst and best of the examples stored with their text, with changes marked.

    With a model: its edits (input -> output) and the errors left (output -> gold).
    Raw OCR only: the OCR errors (input -> gold) of the worst and cleanest documents.
    """
    stored = [e for e in report.get("examples") or [] if {"input", "output", "reference"} <= e.keys()]
    if not stored:
        return ""
    order = sorted(range(len(stored)), key=lambda i: _change(stored[i]), reverse=True)
    worst = [stored[i] for i in order[:SHOWN_EXAMPLES]]
    best = [stored[i] for i in order[::-1][:SHOWN_EXAMPLES] if i not in order[:SHOWN_EXAMPLES]]
    model_ran = _model_ran(report)
    label = ("highest CER change", "lowest CER change") if model_ran else ("highest OCR CER", "lowest OCR CER")
    parts = [f"<h2>Worst examples ({label[0]})</h2>", *(_example_html(e, model_ran) for e in worst)]
    if best:
        parts += [f"<h2>Best examples ({label[1]})</h2>", *(_example_html(e, model_ran) for e in best)]
    return "\n".join(parts)


def _change(example: dict) -> tuple[float, float]:
    """(CER after - CER before, CER after) of one stored example; the sort key for worst/best."""
    if "cer_before" in example and "cer_after" in example:      # already scored (long documents are slow to redo)
        return example["cer_after"] - example["cer_before"], example["cer_after"]
    ref = example["reference"]
    n = max(len(ref), 1)
    before = char_distance(example["input"], ref) / n
    after = char_distance(example["output"], ref) / n
    return after - before, after


def _example_html(e: dict, model_ran: bool) -> str:
    delta, after = _change(e)
    before = after - delta
    name = f"<b>{_e(e['id'])}</b> " if e.get("id") else ""
    head = (f"{name}<span class=\"meta\">{_e(e.get('source') or '')}</span> &middot; CER "
            f"{_pct(before)} &rarr; {_pct(after)} ({_points(delta)})")
    if e.get("full_chars"):
        head += f" <span class=\"note\">(the first {len(e['reference']):,} of {e['full_chars']:,} characters)</span>"
    if not model_ran:
        return (f"<div class=\"example\">{head}<div>OCR errors (<del>OCR</del> <ins>gold</ins>):</div>"
                f"<div class=\"text\">{mark_changes_html(e['input'], e['reference'])}</div></div>")
    return (f"<div class=\"example\">{head}"
            f"<div>model edits (<del>removed</del> <ins>inserted</ins>):</div>"
            f"<div class=\"text\">{mark_changes_html(e['input'], e['output'])}</div>"
            f"<div>errors left (<del>output</del> <ins>gold</ins>):</div>"
            f"<div class=\"text\">{mark_changes_html(e['output'], e['reference'])}</div></div>")


def excerpt(example: dict, limit: int = EXCERPT_CHARS) -> dict:
    """The example cut to about `limit` reference characters, input and output cut at the aligned place.

    Whole documents can be long (an ICDAR 2017 monograph line has 840k characters):
    a diff of all of it is slow to compute and unreadable in a page, so long
    examples keep their beginning, up to a word boundary of the reference, and
    `full_chars` records the reference's real length.
    """
    ref = example["reference"]
    if len(ref) <= limit * 1.5:
        return example
    space = ref.find(" ", limit)
    cut = space if 0 < space < limit * 1.5 else limit
    short = dict(example, reference=ref[:cut], full_chars=len(ref))
    for key in ("input", "output"):
        ops = Levenshtein.opcodes(example[key], ref, score_hint=16)
        short[key] = example[key][:_source_offset(ops, cut)]
    return short


def _source_offset(ops, dest: int) -> int:
    """The offset in the first string aligned with offset `dest` of the second, from rapidfuzz opcodes."""
    for op in ops:
        if op.dest_start <= dest < op.dest_end or (dest == op.dest_end and op.tag != "insert"):
            if op.tag == "insert":
                return op.src_start
            return min(op.src_start + (dest - op.dest_start), op.src_end)
    return ops[-1].src_end if ops else 0


# --------------------------------------------------------------------------- charts


def _charts(report: dict, run_dir: Path | None) -> str:
    """All charts as <figure>s with data-URI images; a note instead when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "<p class=\"note\">charts need matplotlib: pip install matplotlib (or nichelm[report])</p>"
    figures = []
    history = read_metrics(Path(run_dir) / "metrics.jsonl") if run_dir else []
    if history:
        figures.append((loss_curve_png(history), "training and validation loss of the run"))
    if report.get("per_source"):
        figures.append((per_source_png(report["per_source"], _model_ran(report)), "corpus CER per source"))
    rows = report.get("per_example") or []
    if rows:
        figures.append(change_histogram_png(rows, _model_ran(report)))
    return "<div class=\"charts\">" + "".join(
        f"<figure><img alt=\"{_e(caption)}\" src=\"{png_data_uri(png)}\"><figcaption>{_e(caption)}</figcaption>"
        f"</figure>" for png, caption in figures) + "</div>"


def _model_ran(report: dict) -> bool:
    """Whether a model produced the outputs (else before = after and the charts show the raw OCR)."""
    return report.get("model") is not None or report.get("unit") == "window" or any(
        r["errors_after"] != r["errors_before"] for r in report.get("per_example") or [])


def read_metrics(path: Path) -> list[dict]:
    """The records of RUN/metrics.jsonl; a missing file or a torn last line (training running) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def _figure(width: float = 5.2, height: float = 3.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def loss_curve_png(history: list[dict]) -> bytes:
    """train_loss and val_loss against the step."""
    fig = _figure()
    ax = fig.add_subplot()
    for key, color in (("train_loss", AFTER), ("val_loss", BEFORE)):
        pts = [(r["step"], r[key]) for r in history if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=key.replace("_", " "), color=color, marker="o" if len(pts) < 30 else None,
                    markersize=3)
    # [[train.phases]]: a dotted line where each phase begins (after the last step logged before it), named.
    for prev, r in zip([{}] + history, history):
        if r.get("phase") is not None and r.get("phase") != prev.get("phase"):
            ax.axvline(prev.get("step", 0), color="grey", linestyle=":", linewidth=1)
            ax.text(prev.get("step", 0), 0.98, f" {r['phase']}", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=7, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def per_source_png(per_source: dict, model_ran: bool) -> bytes:
    """Corpus CER before/after per source as grouped horizontal bars (long source names stay readable)."""
    names = list(per_source)[:30]
    fig = _figure(height=max(2.4, 1.2 + 0.45 * len(names) * (2 if model_ran else 1)))
    ax = fig.add_subplot()
    ys = range(len(names))
    before = [100 * per_source[n]["cer_before"] for n in names]
    bars = [(before, BEFORE, "before (OCR)", -0.2 if model_ran else 0.0)]
    if model_ran:
        bars.append(([100 * per_source[n]["cer_after"] for n in names], AFTER, "after (model)", 0.2))
    for values, color, label, shift in bars:
        ax.barh([y + shift for y in ys], values, height=0.4 if model_ran else 0.6, color=color, label=label)
        for y, v in zip(ys, values):
            ax.annotate(f"{v:.1f}%", (v, y + shift), xytext=(3, 0), textcoords="offset points", va="center",
                        fontsize=8)
    ax.set_xlim(0, 1.18 * max((v for values, *_ in bars for v in values), default=1) or 1)
    if model_ran:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_yticks(list(ys), [n if len(n) <= 24 else n[:23] + "…" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("CER (%)")
    ax.set_title("CER per source" + ("" if model_ran else " (raw OCR)"))
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def change_histogram_png(rows: list[dict], model_ran: bool) -> tuple[bytes, str]:
    """Histogram of the per-example CER change (points); raw OCR only: of the per-example CER itself.

    Values are clipped to a readable range (±HIST_CHANGE_LIMIT points, CER up to
    HIST_CER_LIMIT %): an example with a few gold characters and a long OCR side
    (ICDAR gold that covers only a heading) can reach thousands of percent and
    would squash every other bar into one.
    """
    fig = _figure()
    ax = fig.add_subplot()
    if model_ran:
        raw = [100 * (r["cer_after"] - r["cer_before"]) for r in rows]
        lo, hi = -HIST_CHANGE_LIMIT, HIST_CHANGE_LIMIT
        ax.axvline(0, color="#444", linewidth=1)
        ax.set_xlabel("CER after − before (points; < 0 is better)")
        ax.set_title("per-example CER change")
        caption = "per-example CER change"
    else:
        raw = [100 * r["cer_before"] for r in rows]
        lo, hi = 0.0, HIST_CER_LIMIT
        ax.set_xlabel("CER of the raw OCR (%)")
        ax.set_title("per-example CER (raw OCR)")
        caption = "per-example CER of the raw OCR (no model, so no change to show)"
    values = [min(max(v, lo), hi) for v in raw]
    clipped = sum(v != w for v, w in zip(raw, values))
    if clipped:
        caption += f"; {clipped} outside [{lo:g}, {hi:g}] drawn at the edge"
    ax.hist(values, bins=min(40, max(5, len(values) // 3)), color=AFTER if model_ran else BEFORE, edgecolor="white")
    ax.set_ylabel("examples")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig), caption


SHOWN_CLUSTERS = 30      # clusters drawn in the histogram (the target's largest)


def cluster_histogram_png(clusters: list[dict]) -> tuple[bytes, str]:
    """Share of the target, the generic corpus and the selection in each cluster: the target's largest
    clusters, largest first (with k in the hundreds every bar would be a hair)."""
    ranked = sorted(clusters, key=lambda r: (-r.get("target_share", 0.0), r["cluster"]))
    shown = ranked[:SHOWN_CLUSTERS]
    fig = _figure(width=max(5.2, 0.22 * len(shown) + 1.5))
    ax = fig.add_subplot()
    xs = range(len(shown))
    for i, (key, color, label) in enumerate((("target_share", "#2e7d32", "target"),
                                             ("generic_share", BEFORE, "generic"),
                                             ("selected_share", AFTER, "selected"))):
        ax.bar([x + (i - 1) * 0.27 for x in xs], [100 * r.get(key, 0.0) for r in shown], width=0.27, color=color,
               label=label)
    ax.set_xticks(list(xs), [str(r["cluster"]) for r in shown], fontsize=7, rotation=90 if len(shown) > 12 else 0)
    ax.set_xlabel("cluster (the target's largest first)")
    ax.set_ylabel("share (%)")
    ax.set_title("cluster histogram")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    caption = "share of target, generic and selected documents (tokens with select.tokens) per cluster"
    if len(ranked) > len(shown):
        rest = sum(r.get("target_share", 0.0) for r in ranked[len(shown):])
        caption += f"; the other {len(ranked) - len(shown)} clusters hold {100 * rest:.1f}% of the target"
    return _png(fig), caption


def domain_shares_png(per_domain: dict, target: dict) -> bytes:
    """Per domain: share of the generic corpus and of the selection (and of the target when known)."""
    names = list(per_domain)[:30]
    series = [("generic_share", per_domain, BEFORE, "generic"), ("share", per_domain, AFTER, "selected")]
    if target:
        series.append(("share", target, "#2e7d32", "target"))
    height = 0.8 / len(series)
    fig = _figure(height=max(2.4, 1.2 + 0.3 * len(names) * len(series)))
    ax = fig.add_subplot()
    for i, (key, table, color, label) in enumerate(series):
        ax.barh([y + (i - (len(series) - 1) / 2) * height for y in range(len(names))],
                [100 * table.get(n, {}).get(key, 0.0) for n in names], height=height, color=color, label=label)
    ax.set_yticks(list(range(len(names))), [n if len(n) <= 24 else n[:23] + "…" for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("share of documents (%)")
    ax.set_title("domains")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    return _png(fig)


# --------------------------------------------------------------------------- formatting


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _points(delta: float) -> str:
    cls = "worse" if delta > 0 else "better" if delta < 0 else ""
    return f"<span class=\"{cls}\">{100 * delta:+.2f} pts</span>"
