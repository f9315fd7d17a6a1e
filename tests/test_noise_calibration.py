"""Noise calibrated on real pairs: fit_noise, OCRNoise(confusions=...), noise.calibrate_on in prepare."""

import collections
import json

import pytest
from rapidfuzz.distance import Levenshtein

from nichelm.config import load_project
from nichelm.data.noise import ERROR_TYPES, OCRNoise, classify_span, error_spans, fit_noise
from nichelm.errors import UserError
from tests.conftest import run_cli
from tests.test_noise import english_sentences

# Known event shares for the round trip. Ligatures and long s are left out: their sites are
# rare, and a type with no site in a text gives its share to the others, so their measured
# share is below their weight by construction.
KNOWN = {"substitution": 40.0, "multi": 12.0, "deletion": 15.0, "insertion": 13.0,
         "spurious_space": 8.0, "lost_space": 6.0, "hyphenation": 6.0, "long_s": 0.0, "ligature": 0.0}

# Hand-written lines in the manner of 19th-century newspaper OCR (h->b, h->li, e->c, c->e,
# rn/m, dropped and inserted punctuation, spurious and lost spaces, line-end hyphenation).
REAL_LOOKING = [
    ("Tbe committee met at tlie town hall on Monday evening.",
     "The committee met at the town hall on Monday evening."),
    ("A large nurnber of persons assembled in tbe market place.",
     "A large number of persons assembled in the market place."),
    ("The prisoner was brouglit up on remand, and cbarged with stealing.",
     "The prisoner was brought up on remand, and charged with stealing."),
    ("It was resolved tbat the thanks of the meeting be givcn to the chairman",
     "It was resolved that the thanks of the meeting be given to the chairman."),
    ("The weather duriug the week has been unusually cold for tbe time of year.",
     "The weather during the week has been unusually cold for the time of year."),
    ("Several gentlemen addressed the assem- bly in favour of the proposed measure.",
     "Several gentlemen addressed the assembly in favour of the proposed measure."),
    ("The Mayor, who presided, said tbe ratepayers had a right to be heard .",
     "The Mayor, who presided, said the ratepayers had a right to be heard."),
    ("Mr. Smith movcd an amendment,which was seconded by Mr. Brown.",
     "Mr. Smith moved an amendment, which was seconded by Mr. Brown."),
    ("The Bench fined the defendant 5s. and costs, tbe money being paid.",
     "The Bench fined the defendant 5s. and costs, the money being paid."),
    ("Tlie fire was discovered sbortly after midnight by a police con- stable.",
     "The fire was discovered shortly after midnight by a police constable."),
    ("The meeting then separated ,' the proceedings having lasted three hours.",
     "The meeting then separated, the proceedings having lasted three hours."),
    ("The Rev. Mr. Jones eonducted the service. in the parish church",
     "The Rev. Mr. Jones conducted the service in the parish church."),
]


def test_classify_span_names_the_ocr_error_types():
    assert classify_span("h", "b") == "substitution"
    assert classify_span("h", "li") == "multi"
    assert classify_span("rn", "m") == "multi"
    assert classify_span("e", "") == "deletion"
    assert classify_span("", ".") == "insertion"
    assert classify_span("", " ") == "spurious_space"
    assert classify_span(" ", "") == "lost_space"
    assert classify_span("", "- ") == "hyphenation"
    assert classify_span("s", "\u017f") == classify_span("s", "f") == "long_s"
    assert classify_span("fi", "\ufb01") == "ligature"
    assert error_spans("the town", "tlie town.") == [("h", "li"), ("", ".")]


def test_fit_recovers_known_weights_cer_and_confusions():
    texts = list(english_sentences())[:1500]
    noise = OCRNoise(0.06, seed=11, weights=KNOWN)
    fit = fit_noise([(noise.corrupt(t, i), t) for i, t in enumerate(texts)])
    assert set(fit["weights"]) == set(ERROR_TYPES)
    assert sum(fit["weights"].values()) == pytest.approx(100, abs=0.05)
    total = sum(KNOWN.values())
    for name, weight in KNOWN.items():
        want = 100 * weight / total
        assert fit["weights"][name] == pytest.approx(want, abs=max(1.0, 0.15 * want)), (name, fit["weights"])
    assert fit["target_cer"] == pytest.approx(0.06, rel=0.15)
    assert len(fit["confusions"]) == 60
    assert json.loads(json.dumps(fit)) == fit                 # JSON-able as it is
    top = {(g, o) for g, o, _ in fit["confusions"][:25]}
    # The built-in English table's frequent pairs come back near the top.
    assert {("e", "o"), ("h", "b"), ("", "."), ("", "-")} <= top, fit["confusions"][:25]
    assert fit["source_counts"]["e"] == sum(t.count("e") for t in texts)


def test_fit_on_hand_written_real_looking_pairs():
    fit = fit_noise(REAL_LOOKING)
    assert fit["confusions"] == [["h", "b", 8], ["h", "li", 3], [".", "", 2], ["e", "c", 2], ["", "'", 1],
                                 ["", ".", 1], ["c", "e", 1], ["m", "rn", 1], ["n", "u", 1]]
    assert fit["weights"] == {"substitution": 48.0, "multi": 16.0, "deletion": 8.0, "insertion": 8.0,
                              "spurious_space": 8.0, "lost_space": 4.0, "hyphenation": 8.0, "long_s": 0.0,
                              "ligature": 0.0}
    assert fit["pairs"] == len(REAL_LOOKING) and fit["error_events"] == 25
    gold = "".join(g for _, g in REAL_LOOKING)
    assert fit["gold_chars"] == len(gold) and fit["source_counts"]["h"] == gold.count("h")
    edits = sum(Levenshtein.distance(o, g) for o, g in REAL_LOOKING)
    assert fit["target_cer"] == pytest.approx(edits / len(gold), abs=1e-6)


def test_noise_from_a_fit_reproduces_the_measured_noise():
    texts = list(english_sentences())[:1200]
    fit = fit_noise(REAL_LOOKING)
    noise = OCRNoise.from_fit(fit, seed=3)
    again = fit_noise([(noise.corrupt(t, i), t) for i, t in enumerate(texts)], top=200)
    assert again["target_cer"] == pytest.approx(fit["target_cer"], rel=0.15)
    for name in ("substitution", "deletion", "insertion", "spurious_space", "lost_space", "hyphenation"):
        assert again["weights"][name] == pytest.approx(fit["weights"][name], abs=4), (name, again["weights"])
    for name in ("long_s", "ligature"):                       # never seen in the pairs: never made
        assert again["weights"][name] == 0
    made = {(g, o): n for g, o, n in again["confusions"]}
    # Measured confusions lead; sources the table does not cover fall back to the built-in table, faintly.
    assert made[("h", "b")] > made[("h", "li")] > 0
    assert made[("c", "e")] > made.get(("c", "o"), 0)
    assert made[("h", "b")] > 5 * max(made.get(("o", "c"), 0), made.get(("l", "i"), 0))
    # The measured insertions only; an inserted "i" or "n" is the aligner's reading of h -> li in
    # "hi" -> "lii" or m -> rn in "mn" -> "rnn" (a substitution plus an insertion).
    inserted = collections.Counter({o: n for g, o, n in again["confusions"] if g == "" and o.strip("- ")})
    assert inserted["'"] + inserted["."] > 3 * (inserted.total() - inserted["'"] - inserted["."]), inserted


def test_confusions_argument_is_checked_and_optional():
    with pytest.raises(ValueError, match="gold, ocr, count"):
        OCRNoise(confusions=[["a", "b"]])
    with pytest.raises(ValueError, match="source_counts"):
        OCRNoise(confusions=[["a", "b", 3]], source_counts={"c": 10})
    # Without source_counts the counts are per-occurrence weights; fixed-form types are ignored.
    noise = OCRNoise(0.2, seed=1, weights={t: 0.0 for t in ERROR_TYPES} | {"substitution": 1.0},
                     confusions=[["a", "4", 1000], ["", " ", 50]])
    out = "".join(noise.corrupt("a cat sat on a mat at a farm " * 4, i) for i in range(40))
    assert out.count("4") > 20


def test_measured_deletions_and_insertions_are_used():
    only = {t: 0.0 for t in ERROR_TYPES}
    # Per occurrence a comma is lost 500 times as often as an "e"; characters the table does
    # not cover fall back to the rarest measured rate (the "e"'s).
    deleting = OCRNoise(0.01, seed=2, weights=only | {"deletion": 1.0}, confusions=[[",", "", 50], ["e", "", 1]],
                        source_counts={",": 100, "e": 1000})
    spans = collections.Counter()
    texts = english_sentences()[:300]
    for i, t in enumerate(texts):
        spans.update(error_spans(t, deleting.corrupt(t, i)))
    commas, es = sum(t.count(",") for t in texts), sum(t.count("e") for t in texts)
    assert spans[(",", "")] / commas > 50 * spans[("e", "")] / es, spans.most_common(5)
    assert spans[(",", "")] / spans.total() > 0.5
    inserting = OCRNoise(0.1, seed=2, weights=only | {"insertion": 1.0}, confusions=[["", "~", 5]])
    spans = collections.Counter()
    for i, t in enumerate(english_sentences()[:100]):
        spans.update(error_spans(t, inserting.corrupt(t, i)))
    assert set(spans) == {("", "~")}


# -- prepare: noise.calibrate_on ------------------------------------------------


def test_prepare_calibrates_noise_on_train_pairs(tiny_project):
    from nichelm.prepare import prepare
    project = load_project(tiny_project, ["noise.calibrate_on=['pairs']"])
    manifest = prepare(project)
    data = project.run_path / "data"
    noise = manifest["noise"]
    assert noise["calibrated_on"] == ["pairs"]
    fit = noise["fit"]
    pairs_record = next(s for s in manifest["sources"] if s["name"] == "pairs")
    # Train-split pairs only (one row per document here), never val/test.
    assert fit["pairs"] == pairs_record["documents_train"] < pairs_record["documents"]
    # The fixture's OCR changes the first 'e' of each line to 'c': one substitution per row.
    assert fit["top_confusions"][0][:2] == ["e", "c"]
    assert fit["weights"]["substitution"] == 100.0 and fit["error_events"] == fit["pairs"]
    assert noise["target_cer"] == fit["cer"] != project.noise.target_cer
    assert json.loads((data / "noise_fit.json").read_text())["confusions"][0][:2] == ["e", "c"]
    synthetic = [json.loads(line) for line in (data / "examples.train.jsonl").read_text().splitlines()]
    synthetic = [e for e in synthetic if e["synthetic_input"]]
    kinds = collections.Counter(classify_span(g, o) for e in synthetic for g, o in error_spans(e["output"], e["input"]))
    assert kinds and set(kinds) == {"substitution"}, kinds
    assert noise["measured_cer_train"] == pytest.approx(fit["cer"], rel=0.35)
    # Without calibrate_on: the configured target CER and no fit, as before.
    plain = load_project(tiny_project, [f"run_dir={project.run_path}-plain"])
    manifest = prepare(plain)
    assert manifest["noise"]["target_cer"] == 0.05 and "fit" not in manifest["noise"]
    assert not (plain.run_path / "data" / "noise_fit.json").exists()


def test_calibrate_on_names_are_checked(tiny_project):
    with pytest.raises(UserError, match=r"noise\.calibrate_on.*'nope'.*clean, pairs"):
        load_project(tiny_project, ["noise.calibrate_on=['nope']"])
    with pytest.raises(UserError, match=r"noise\.calibrate_on.*'clean'.*role = 'pairs'"):
        load_project(tiny_project, ["noise.calibrate_on=['clean']"])
    proc = run_cli("prepare", tiny_project, "--set", "noise.calibrate_on=['nope']")
    assert proc.returncode == 2 and "noise.calibrate_on" in proc.stderr and "Traceback" not in proc.stderr


def test_calibrate_on_a_source_without_train_documents(tiny_project):
    from nichelm.prepare import prepare
    project = load_project(tiny_project, ["noise.calibrate_on=['pairs']", "sources.1.split=test"])
    with pytest.raises(UserError, match="no train-split pairs"):
        prepare(project)


# -- the real data (skipped on a fresh clone without ../shared) -------------------


@pytest.mark.shared
def test_historical_en_recipe_loads_and_bln600_fit_is_sensible():
    import csv

    from tests.conftest import ROOT, needs_shared
    shared = needs_shared()
    project = load_project(ROOT / "examples" / "historical_en.toml")
    assert project.noise.calibrate_on == ["bln600"]
    assert [s.split for s in project.sources] == ["auto", "train", "train", "train"]   # BLN600 alone held out
    with open(shared / "bln600" / "train.csv", encoding="utf-8", newline="") as f:
        rows = [(r["OCR Text"].strip(), r["Ground Truth"].strip()) for r in csv.DictReader(f)]
    fit = fit_noise(rows)
    assert fit["target_cer"] == pytest.approx(0.0622, abs=0.0005)               # the published corpus CER
    top = {(g, o) for g, o, _ in fit["confusions"][:20]}
    assert {("h", "b"), ("e", "o"), ("", ".")} <= top
    assert fit["weights"]["substitution"] > 25 and fit["weights"]["hyphenation"] > 1


@pytest.mark.shared
def test_historical_en_cpu_recipe_phase_two_reads_the_same_split_and_tokenizer(monkeypatch):
    """examples/historical_en_cpu: phase 2 trains on pairs.toml's run, which must hold the same real pairs under
    the same names and seed (so the same documents are val/test), with project.toml's tokenizer; the generic
    text only trains."""
    from tests.conftest import ROOT, needs_shared
    needs_shared()
    monkeypatch.chdir(ROOT)                               # the recipe runs from the repository root
    folder = ROOT / "examples" / "historical_en_cpu"
    import tomllib
    given_from = tomllib.loads((folder / "pairs.toml").read_text())["tokenizer"]["from"]
    # loaded without tokenizer.from: load_project checks that its folder exists (it does once project.toml is prepared)
    main, pairs = load_project(folder / "project.toml"), load_project(folder / "pairs.toml", ["tokenizer.from="])
    real = [(s.name, s.path, s.gold_path, s.split) for s in main.sources if s.role == "pairs"]
    assert real == [(s.name, s.path, s.gold_path, s.split) for s in pairs.sources] and len(real) == 3
    assert main.seed == pairs.seed and main.split == pairs.split
    assert all(s.split == "train" for s in main.sources if s.role == "generic")
    assert main.noise.calibrate_on == ["bln600"] and main.train.precision == "bf16"
    assert [p.name for p in main.train.phases] == ["pretrain", "real-pairs"]
    assert main.resolve(main.train.phases[1].data).resolve() == pairs.run_path
    assert pairs.resolve(given_from).resolve() == main.run_path
    assert main.task == pairs.task and main.model == pairs.model
