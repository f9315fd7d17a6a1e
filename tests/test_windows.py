"""Window overlap: context around each window, and keeping only the window's own part of the output."""

import random
import re
from functools import lru_cache

import pytest
import torch

from nichelm.inference import Correction, Corrector, context_span, core_output, cut_windows

PROMPT, END = "### Text ###\n{input}\n### Correction ###\n", "<|endoftext|>"
WORDS = ["tlie", "the", "rn", "modern", "c0rn", "tliere", "a", "I", "tl", "ie", "Mr", "house,", "end.", "Yes!",
         "what?", "x;"]
SEPS = [" ", " ", " ", " ", "  ", "\n", "\n\n", " \t"]


@lru_cache(maxsize=None)
def tokenizer():
    from nichelm.data.tokenizer import special_tokens, train_tokenizer
    return train_tokenizer([" ".join(WORDS)] * 20 + ["The cat sat on the mat. A dog ran."] * 20, 300,
                           special_tokens(PROMPT, END))


def tiny_model(block: int):
    from nichelm.model import GPT, ModelConfig
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tokenizer().get_vocab_size(), block_size=block, n_layer=1, n_head=2, n_embd=32))


class FakeModel(Corrector):
    """A Corrector whose 'model' applies fn to each window; the guard and counts as in correct_windows."""

    def __init__(self, fn, block: int = 2048, window_chars: int = 40, hit_limit=lambda w: False, **kwargs):
        super().__init__(tiny_model(block), tokenizer(), {"prompt_template": PROMPT, "end_marker": END,
                                                          "window_chars": window_chars}, **kwargs)
        self.fn, self.hit_limit, self.seen = fn, hit_limit, []

    def correct_windows(self, windows):
        self.seen += windows
        self.stats.windows += len(windows)
        return [Correction(w, w) if not w.strip() else self._guard(w, self.fn(w).strip(), self.hit_limit(w))
                for w in windows]


def old_correct(corrector, texts, guard=True):
    """Corrector.correct as it was before window overlap."""
    cut = [cut_windows(t, corrector.window_chars) for t in texts]
    fixed = iter(corrector.correct_windows([chunk for pieces in cut for chunk, _ in pieces]))
    out = []
    for pieces in cut:
        done = [(next(fixed), sep) for _, sep in pieces]
        out.append("".join((c.text if guard else c.raw) + sep for c, sep in done))
    return out


def random_text(rng, words: int, long_words: bool = False) -> str:
    parts = [rng.choice(["", "", " ", "\n"])]
    for _ in range(words):
        parts.append("tlie" * rng.randint(4, 12) if long_words and rng.random() < 0.05 else rng.choice(WORDS))
        parts.append(rng.choice(SEPS))
    return "".join(parts)[: None if rng.random() < 0.5 else -1]      # with and without trailing whitespace


def by_word(fn):
    return lambda text: re.sub(r"\S+", lambda m: fn(m.group()), text)


def fix_word(w: str) -> str:
    """Substitutions, insertions and deletions, including at the first and last character of a word."""
    w = w.replace("tlie", "the").replace("rn", "m").replace("0", "o")
    return {"Mr": "Mr.", "ie": "Lie", "tl": "l", "x;": "x", "Yes!": "Yes!!", "a": "an"}.get(w, w)


# ---------------------------------------------------------------- overlap 0 is what there was


def test_overlap_zero_is_unchanged_with_a_real_model():
    rng = random.Random(3)
    texts = [random_text(rng, 15) for _ in range(2)] + ["Short one.", "", "  \n"]
    for guard in (True, False):
        corrector = Corrector(tiny_model(96), tokenizer(), {"prompt_template": PROMPT, "end_marker": END,
                                                            "window_chars": 30}, guard_max_change=0.15)
        assert corrector.window_overlap == 0
        assert corrector.correct(texts, guard) == old_correct(corrector, texts, guard)


def test_overlap_zero_sends_the_same_windows():
    rng = random.Random(4)
    texts = [random_text(rng, 40, long_words=True) for _ in range(5)]
    a, b = FakeModel(by_word(fix_word), window_overlap=0), FakeModel(by_word(fix_word))
    assert a.correct(texts) == old_correct(b, texts)
    assert a.seen == b.seen == [chunk for t in texts for chunk, _ in cut_windows(t, 40)]
    assert vars(a.stats) == vars(b.stats)


# ---------------------------------------------------------------- overlap > 0


def test_identity_model_gives_the_input_back_at_any_overlap():
    rng = random.Random(5)
    for trial in range(150):
        texts = [random_text(rng, rng.randint(1, 60), long_words=True) for _ in range(3)]
        size, overlap = rng.randint(4, 80), rng.choice([1, 3, 10, 25, 60, 400])
        model = FakeModel(lambda w: w, window_chars=size, window_overlap=overlap, block=rng.choice([64, 2048]))
        assert model.correct(texts) == texts, (trial, size, overlap)
        assert model.correct(texts, guard=False) == texts


@pytest.mark.parametrize("fn", [lambda t: t.replace("tlie", "the"), by_word(fix_word)], ids=["tlie", "edits"])
def test_known_corrections_are_stitched_without_loss_or_duplication(fn):
    rng = random.Random(6)
    widened = 0
    for trial in range(200):
        texts = [random_text(rng, rng.randint(1, 60)) for _ in range(3)]
        size, overlap = rng.randint(8, 100), rng.choice([1, 5, 12, 30, 80, 400])   # sizes > any word: no hard cuts
        model = FakeModel(fn, window_chars=size, window_overlap=overlap, guard_max_change=-1)
        assert model.correct(texts) == [fn(t) for t in texts], (trial, size, overlap)
        cores = [c.strip() for t in texts for c, _ in cut_windows(t, size) if c.strip()]
        assert len(model.seen) == len(cores)
        assert all(core in seen for core, seen in zip(cores, model.seen))
        widened += sum(len(seen) > len(core) for core, seen in zip(cores, model.seen))
    assert widened > 1000                              # the windows really had context


def test_apply_and_evaluate_stitch_as_correct_does():
    from nichelm.apply import correct_documents as apply_documents
    from nichelm.evaluate import correct_documents as evaluate_documents
    rng = random.Random(9)
    texts = [random_text(rng, 50, long_words=True) for _ in range(4)]
    for overlap in (0, 25):
        model = FakeModel(by_word(fix_word), window_chars=30, window_overlap=overlap, guard_max_change=0.3)
        guarded, unguarded = model.correct(texts), model.correct(texts, guard=False)
        assert evaluate_documents(model, texts) == (guarded, unguarded)
        assert [r.text for r in apply_documents(model, texts, True)] == guarded
        assert [r.text for r in apply_documents(model, texts, False)] == unguarded


def test_context_fits_the_model():
    rng = random.Random(7)
    texts = [random_text(rng, 80) for _ in range(3)]
    model = FakeModel(by_word(fix_word), block=64, window_chars=12, window_overlap=200, guard_max_change=-1)
    assert model.correct(texts) == [by_word(fix_word)(t) for t in texts]
    tok = tokenizer()
    cores = [c.strip() for t in texts for c, _ in cut_windows(t, 12) if c.strip()]
    assert len(model.seen) == len(cores)
    widened = sum(len(seen) > len(core) for seen, core in zip(model.seen, cores))
    assert widened > len(cores) // 2                   # context was added (as much as fits)
    for w in model.seen:
        n_in = len(tok.encode(w).ids)
        assert len(tok.encode(PROMPT.format(input=w)).ids) + int(n_in * 1.5) + 8 <= 64 or w in cores


def test_context_is_whole_words_within_the_text():
    text = "alpha beta  gamma\ndelta epsilon"
    start = text.index("gamma")
    assert context_span(text, start, start + 5, 0) == (start, start + 5)
    left, right = context_span(text, start, start + 5, 5)          # 5 back lands inside "beta"; 5 on inside "delta"
    assert text[left:right] == "gamma"
    left, right = context_span(text, start, start + 5, 6)
    assert text[left:right] == "beta  gamma\ndelta"
    left, right = context_span(text, start, start + 5, 12)
    assert text[left:right] == "alpha beta  gamma\ndelta"
    assert context_span(text, start, start + 5, 100) == (0, len(text))
    assert context_span(" x ", 1, 2, 5) == (1, 2)


# ---------------------------------------------------------------- the guard sees the window only


def test_guard_compares_the_window_not_its_context():
    text = "aaaaaaa bbbbbbb tlie ccccccc ddddddd"
    fn = lambda t: t.replace("tlie", "the")                           # noqa: E731
    # 2 edits on the 4-character window "tlie": too many for 0.3, though few for the whole model input
    model = FakeModel(fn, window_chars=7, window_overlap=20, guard_max_change=0.3)
    assert model.correct([text]) == [text]
    assert any("bbbbbbb tlie ccccccc" in s for s in model.seen)
    assert model.stats.kept_too_different == 1 and model.stats.windows == 5 and model.stats.kept_hit_limit == 0
    assert model.correct([text], guard=False) == [fn(text)]
    loose = FakeModel(fn, window_chars=7, window_overlap=20, guard_max_change=0.6)
    assert loose.correct([text]) == [fn(text)] and loose.stats.kept_too_different == 0


def test_unfinished_generation_keeps_the_window_input():
    text = "tlie one tlie two LIMIT tlie three tlie four tlie"
    model = FakeModel(lambda t: t.replace("tlie", "the"), window_chars=9, window_overlap=6, guard_max_change=-1,
                      hit_limit=lambda w: "LIMIT" in w)
    out = model.correct([text])[0]
    limited = sum("LIMIT" in s for s in model.seen)
    assert 1 < limited < len(model.seen) and model.stats.kept_hit_limit == limited
    assert out == "the one tlie two LIMIT tlie three the four the"


def test_real_model_with_overlap_keeps_the_layout():
    rng = random.Random(8)
    texts = [random_text(rng, 20, long_words=True) for _ in range(2)]
    corrector = Corrector(tiny_model(96), tokenizer(), {"prompt_template": PROMPT, "end_marker": END,
                                                        "window_chars": 30}, window_overlap=15)
    out = corrector.correct(texts)
    n_chunks = sum(len(cut_windows(t, 30)) for t in texts)
    assert corrector.stats.windows == n_chunks
    assert corrector.guard_max_change == 0.15                 # restored after the unguarded decode
    assert out == texts                                        # an untrained model's output never passes the guard


# ---------------------------------------------------------------- boundary mapping


@pytest.mark.parametrize("src, out, start, end, expected", [
    ("aa Mr bb", "aa Mr. bb", 3, 5, "Mr."),             # insertion at the window's end: the window's
    ("aa Mr bb", "aa Mr bb.", 3, 5, "Mr"),              # ... at the context's end: not
    ("aa ie bb", "aa Lie bb", 3, 5, "Lie"),             # insertion at the window's start: the window's
    ("aa ie bb", "aa Lie bb", 0, 2, "aa"),              # ... seen from the window before: not its
    ("aa ie bb", "aa. ie bb", 0, 2, "aa."),
    ("aa ie bb", "aa. ie bb", 3, 5, "ie"),
    ("aa  bb", "aa X bb", 0, 2, "aa"),                  # insertion inside the separator: nobody's
    ("aa  bb", "aa X bb", 4, 6, "bb"),
    ("aa xy bb", "aa y bb", 3, 5, "y"),                 # deletion at the window's first character
    ("aa xy bb", "aa x bb", 3, 5, "x"),                 # ... at its last
    ("aa xy bb", "aa x", 3, 5, "x"),                    # deletion across the window's end
    ("aa xy bb", "bb", 3, 5, ""),                       # all of it deleted
    ("aa bb", "aabb", 3, 5, "bb"),                      # the separator deleted
    ("aa bb", "aabb", 0, 2, "aa"),
    ("aa bb", "!aa bb", 0, 2, "!aa"),                   # insertions before / after the model input
    ("aa bb", "!aa bb", 3, 5, "bb"),
    ("aa bb", "aa bb!", 3, 5, "bb!"),
    ("aa bb", "aa bb!", 0, 2, "aa"),
    ("aa bb", "xx yy", 3, 5, "yy"),                     # substitutions
    ("abc", "XYZ", 0, 3, "XYZ"),                        # no context: the whole output
])
def test_boundary_mapping(src, out, start, end, expected):
    assert core_output(src, out, start, end) == expected


def test_a_hard_cut_gives_an_insertion_to_the_right_hand_window_only():
    src, out = "abcdef", "abcXdef"
    assert core_output(src, out, 0, 3, end_takes_inserts=False) == "abc"
    assert core_output(src, out, 3, 6) == "Xdef"
    assert core_output(src, out, 0, 3) == "abcX"       # where a separator follows, the insertion would be the left's


def test_cli_and_config_take_window_overlap(tmp_path):
    from nichelm.cli import build_parser
    from nichelm.config import EvalConfig
    assert EvalConfig().window_overlap == 0
    for cmd in (["correct", "--run", "r"], ["apply", "--model", "m", "--input", "i", "--output", "o"],
                ["evaluate", "--data", "d"]):
        assert build_parser().parse_args(cmd + ["--window-overlap", "20"]).window_overlap == 20
        assert build_parser().parse_args(cmd).window_overlap is None
