"""The scores `nichelm evaluate` reports, checked exactly on outputs that differ from the inputs.

The model's answers are scripted (a backend that answers each window with a fixed text), so the
whole path runs as it does for a real model: windows, decoding, the do-no-harm guard, stitching,
scoring and the saved report. Every expected figure is counted by hand in the comments (edit
distances with unit costs), never with the scoring code itself.
"""

import json

import pytest

from nichelm.evaluate import evaluate_external, evaluate_project
from nichelm.generate import Generation
from tests.test_evaluate_external import tiny_run


def scripted_backend(answers: dict[str, tuple[str, bool]]):
    """A backend class that answers window text w with answers[w] = (output text, ended)."""

    class Scripted:
        name = "scripted"

        def __init__(self, corrector):
            self.corrector = corrector

        def generate(self, prompts, max_new, sources=None, score=False):
            tok = self.corrector.tokenizer
            out = []
            for source in sources:
                text, ended = answers[tok.decode(source)]
                out.append(Generation(tokens=tok.encode(text).ids, hit_limit=not ended))
            return out

    return Scripted


# ------------------------------------------------------------------ evaluate_project (one window per example)

# (input, reference, source, the model's output, ended)
PROJECT = [
    # 17 reference chars, 4 words. Output accepted (1 edit to the input <= 0.15 x 17): 1 error -> 0.
    ("Tho cat sat down.", "The cat sat down.", "a", "The cat sat down.", True),
    # 15 chars, 4 words. Output accepted (2 edits, o->i and the lost '.', <= 0.15 x 15): 0 errors -> 2
    # ("dig" and "home" are 2 wrong words).
    ("A dog ran home.", "A dog ran home.", "a", "A dig ran home", True),
    # 13 chars, 4 words. Never ended: the guard keeps the input (2 errors: b->h, c->e), though the
    # unfinished output itself has 0.
    ("tbe cnd of it", "the end of it", "b", "the end of it", False),
    # 9 chars, 2 words. Output 5 edits from the input (n->u, '.'->'!', 3 '!' inserted) > 0.15 x 9: the
    # guard keeps the input (1 error); the output itself has 4 ('.'->'!' and 3 '!' inserted), 1 wrong word.
    ("Qnite so.", "Quite so.", "b", "Quite so!!!!", True),
]


def test_project_scores_are_those_of_the_guarded_outputs(tmp_path, monkeypatch):
    from nichelm.config import Project
    monkeypatch.setattr("nichelm.inference.TorchBackend",
                        scripted_backend({inp: (out, ended) for inp, _, _, out, ended in PROJECT}))
    run = tiny_run(tmp_path / "run", [ref for _, ref, _, _, _ in PROJECT])
    (run / "data").mkdir()
    (run / "data" / "examples.test.jsonl").write_text("".join(
        json.dumps({"input": inp, "output": ref, "source": src}) + "\n" for inp, ref, src, _, _ in PROJECT))
    report = evaluate_project(Project(run_dir=str(run)))
    assert report == json.loads((run / "eval" / "report.json").read_text())
    assert [e["output"] for e in report["examples"]] == ["The cat sat down.", "A dig ran home", "tbe cnd of it",
                                                         "Qnite so."]
    assert [e["kept_input"] for e in report["examples"]] == ["", "", "hit_limit", "too_different"]
    assert report["guard"]["kept_hit_limit"] == 1 and report["guard"]["kept_too_different"] == 1
    # 54 reference characters, 14 words
    assert report["gold_chars"] == 54 and report["n_examples"] == 4
    assert report["cer_before"] == 4 / 54                  # 1 + 0 + 2 + 1
    assert report["cer_after"] == 5 / 54                   # 0 + 2 + 2 + 1
    assert report["cer_after_unguarded"] == 6 / 54         # 0 + 2 + 0 + 4
    assert report["wer_before"] == 4 / 14                  # 1 + 0 + 2 + 1
    assert report["wer_after"] == 5 / 14                   # 0 + 2 + 2 + 1
    assert report["wer_after_unguarded"] == 3 / 14         # 0 + 2 + 0 + 1
    assert report["cer_ratio"] == pytest.approx(5 / 4) and report["relative_improvement"] == pytest.approx(-1 / 4)
    assert report["worse_fraction"] == 1 / 4 and report["better_fraction"] == 1 / 4
    assert report["worse_fraction_unguarded"] == 2 / 4
    assert report["per_source"] == {
        "a": {"n_examples": 2, "cer_before": 1 / 32, "cer_after": 2 / 32, "wer_before": 1 / 8, "wer_after": 2 / 8,
              "worse_fraction": 1 / 2},
        "b": {"n_examples": 2, "cer_before": 3 / 22, "cer_after": 3 / 22, "wer_before": 3 / 6, "wer_after": 3 / 6,
              "worse_fraction": 0.0}}
    assert [(r["errors_before"], r["errors_after"], r["chars"]) for r in report["per_example"]] == \
        [(1, 0, 17), (0, 2, 15), (2, 2, 13), (1, 1, 9)]
    assert report["per_example"][1]["cer_after"] == 2 / 15


# ------------------------------------------------------------------ evaluate_external (whole documents, windows)

DOCUMENTS = [
    # 44 reference chars, 11 words; cut (40-character windows) after "mat." into two windows.
    ("Tho cat sat down on the mat. A dog ran home.", "The cat sat down on the mat. A dog ran home."),
    ("tbe cnd of it", "the end of it"),                    # 13 chars, 4 words
    ("Qnite so.", "Quite so."),                            # 9 chars, 2 words
]
WINDOWS = {
    "Tho cat sat down on the mat.": ("The cat sat down on the mat.", True),     # accepted: 1 edit
    "A dog ran home.": ("A dig ran home", True),                                # accepted: 2 edits
    "tbe cnd of it": ("the end of it", False),                                  # unfinished: input kept
    "Qnite so.": ("Quite so!!!!", True),                                        # too different: input kept
}


def write_documents(path):
    path.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in DOCUMENTS))
    return path


def test_external_scores_are_those_of_the_stitched_guarded_documents(tmp_path, monkeypatch):
    monkeypatch.setattr("nichelm.inference.TorchBackend", scripted_backend(WINDOWS))
    data = write_documents(tmp_path / "pairs.jsonl")
    run = tiny_run(tmp_path / "run", [o for _, o in DOCUMENTS])
    report, out = evaluate_external(data, "jsonl", model=run, out=tmp_path / "out", guard_max_change=0.15)
    assert report == json.loads((out / "report.json").read_text())
    guard = report["guard"]
    assert (guard["windows"], guard["kept_too_different"], guard["kept_hit_limit"]) == (4, 1, 1)
    # 66 reference characters, 17 words. Document 1 comes back as "The cat sat down on the mat. A dig
    # ran home": 2 errors (o->i, the lost '.'), 2 wrong words.
    assert report["gold_chars"] == 66 and report["n_examples"] == 3
    assert report["cer_before"] == 4 / 66                  # 1 + 2 + 1
    assert report["cer_after"] == 5 / 66                   # 2 + 2 + 1
    assert report["cer_after_unguarded"] == 6 / 66         # 2 + 0 + 4
    assert report["wer_before"] == 4 / 17                  # 1 + 2 + 1
    assert report["wer_after"] == 5 / 17                   # 2 + 2 + 1
    assert report["wer_after_unguarded"] == 3 / 17         # 2 + 0 + 1
    assert report["worse_fraction"] == 1 / 3 and report["better_fraction"] == 0
    assert report["worse_fraction_unguarded"] == 2 / 3
    assert [(r["errors_before"], r["errors_after"]) for r in report["per_example"]] == [(1, 2), (2, 2), (1, 1)]
    by_id = {e["id"]: e for e in report["examples"]}
    assert sorted(e["output"] for e in by_id.values()) == sorted(
        ["The cat sat down on the mat. A dig ran home", "tbe cnd of it", "Qnite so."])


def test_external_scores_with_a_corrector_that_only_corrects(tmp_path, monkeypatch):
    """Any object with correct(texts) (e.g. another library's model): its outputs are scored as given,
    and there is no separate unguarded score."""
    outputs = {"Tho cat sat down on the mat. A dog ran home.": "The cat sat down on the mat. A dig ran home",
               "tbe cnd of it": "the end of it", "Qnite so.": "Quite so!!!!"}

    class OnlyCorrects:
        def correct(self, texts):
            return [outputs[t] for t in texts]

    monkeypatch.setattr("nichelm.evaluate.load_corrector", lambda *args, **kwargs: OnlyCorrects())
    data = write_documents(tmp_path / "pairs.jsonl")
    (tmp_path / "model").mkdir()
    report, _ = evaluate_external(data, "jsonl", model=tmp_path / "model", out=tmp_path / "out")
    assert report["cer_after"] == 6 / 66                   # 2 + 0 + 4
    assert report["wer_after"] == 3 / 17                   # 2 + 0 + 1
    assert report["cer_before"] == 4 / 66 and "cer_after_unguarded" not in report
    assert report["worse_fraction"] == 2 / 3 and report["better_fraction"] == 1 / 3
