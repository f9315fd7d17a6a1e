"""Marker safety: user text that quotes the task's markers ("<|endoftext|>", "### Correction ###") stays
text in every path from text to ids (prepare's shards and loss mask, correct(), apply, the hf export's
documented usage), and text that quotes no marker gets exactly the ids tokenizers' own encode gave."""

import contextlib
import io
import json
import random
import re

import numpy as np
import pytest
import torch

from nichelm.backends import finish
from nichelm.data.tokenizer import (encode_text, encode_texts, load_tokenizer, prompt_ids, prompt_ids_batch,
                                    save_tokenizer, scrub_surrogates, special_tokens, train_tokenizer)
from nichelm.errors import UserError
from nichelm.inference import Corrector, cut_windows
from nichelm.model import GPT, ModelConfig
from tests.conftest import SENTENCES

TEMPLATE = "### Text ###\n{input}\n### Correction ###\n"
END = "<|endoftext|>"
MARKERS = [END, "### Text ###", "### Correction ###"]
QUOTES = ["Tho man said <|endoftext|> and went homc.", "A ### Correction ### B", "### Text ###",
          "x<|endoftext|>y", "### Text ###### Correction ###<|endoftext|>", "### Text ###\n### Correction ###",
          "<|endoftext|>", " ### Correction ### "]


def tokenizer_for(template: str, end: str = END, texts=SENTENCES, vocab: int = 400):
    return train_tokenizer([t for t in texts for _ in range(3)], vocab, special_tokens(template, end))


@pytest.fixture(scope="module")
def tok():
    return tokenizer_for(TEMPLATE)


def marker_counts(tok, ids: list[int]) -> list[int]:
    return [ids.count(tok.token_to_id(m)) for m in MARKERS]


# ---------------------------------------------------------------- the encoding itself

def test_marker_strings_in_text_stay_text(tok):
    assert tok.token_to_id(END) in tok.encode(QUOTES[0]).ids       # what tokenizers alone does: the bug
    for text in QUOTES:
        ids = encode_text(tok, text)
        assert marker_counts(tok, ids) == [0, 0, 0], text
        assert tok.decode(ids) == text
        prompt = prompt_ids(tok, TEMPLATE, text)
        assert marker_counts(tok, prompt) == [0, 1, 1], text
        assert tok.decode(prompt, skip_special_tokens=False) == TEMPLATE.format(input=text)
    assert prompt_ids_batch(tok, TEMPLATE, QUOTES) == [prompt_ids(tok, TEMPLATE, t) for t in QUOTES]
    assert encode_texts(tok, QUOTES) == [encode_text(tok, t) for t in QUOTES]


PIECES = ["The", " man", "said", "\n", "\n\n", " ", "  ", "\t", "homc.", "###", "##", "#", "### Text", "Text ###",
          "### Correction", "<|", "|>", "endoftext", "<|endoftext", "é", "ſ", "ﬁ", "שלום", "مرحبا", "中文", "😀",
          "\u200b", "\x00", "\r\n", "'s", "42", ".", ",", "<in", "out>", "<", ">", "Fix", "In ###", "\ufeff"]


@pytest.mark.parametrize("template", [TEMPLATE, "<in>{input}<out>", "Fix this.\n### In ###\n{input}\n### Out ###\n\n"])
def test_text_without_markers_gets_the_ids_tokenizers_gave(template):
    """Existing runs keep their behaviour: the prompt of marker-free text is tok.encode(template.format(...))."""
    tok = tokenizer_for(template, texts=SENTENCES + ["".join(PIECES)])
    markers = special_tokens(template, END)
    rng = random.Random(0)
    texts = ["", "plain", " lead", "trail ", "\n", "a\n\nb  c\t"]
    texts += ["".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 14))) for _ in range(400)]
    texts = [t for t in texts if not any(m in t for m in markers)]
    assert len(texts) > 300
    for t in texts:
        assert prompt_ids(tok, template, t) == tok.encode(template.format(input=t)).ids, repr(t)
        assert encode_text(tok, t) == tok.encode(t).ids, repr(t)
    assert prompt_ids_batch(tok, template, texts) == [tok.encode(template.format(input=t)).ids for t in texts]


def test_a_marker_that_bpe_can_rebuild_is_spelled_out():
    """A marker that is one word ("@@@") can come back as its own id from BPE merges of the text's
    characters; encode_text spells it out instead."""
    template = "@@@\n{input}\n%%%\n"
    tok = tokenizer_for(template, texts=["@@@", "x\n@@@", "%%% and %%%"] * 50)
    marker = tok.token_to_id("@@@")
    assert tok.encode("@@@").ids == [marker]
    for text in ("@@@", "a @@@ b", "x\n@@@%%%"):
        ids = encode_text(tok, text)
        assert marker not in ids and tok.decode(ids) == text
        prompt = prompt_ids(tok, template, text)
        assert prompt.count(marker) == 1 and prompt.count(tok.token_to_id("%%%")) == 1
    with pytest.raises(UserError, match="'@'"):
        encode_text(tokenizer_for("@\n{input}\n%%%\n", texts=["a @ b"] * 10), "a @ b")


def test_control_characters_and_right_to_left_text_round_trip(tok):
    for text in ("\x00\x01\x07\x1b\x7f tab\tvt\x0bff\x0c", "\u200b\u200d\u2028\u2029\ufeff\u0301",
                 "שלום <|endoftext|> עולם", "مرحبا ### Correction ### بالعالم", "\u202eevil\u202c ok"):
        ids = encode_text(tok, text)
        assert marker_counts(tok, ids) == [0, 0, 0] and tok.decode(ids) == text


def test_lone_surrogates_become_replacement_characters(tok):
    """A lone surrogate (a JSON "\\ud800" escape) is not Unicode text and has no UTF-8 form: it is
    encoded, and corrected, as U+FFFD, one character for one."""
    assert scrub_surrogates("a\ud800b\udfff") == "a\ufffdb\ufffd"
    assert encode_text(tok, "a\ud800b") == encode_text(tok, "a\ufffdb")
    assert prompt_ids_batch(tok, TEMPLATE, ["ok", "a\ud800b"])[1] == prompt_ids(tok, TEMPLATE, "a\ufffdb")
    with pytest.raises(TypeError):
        tok.encode("a\ud800b")                         # what tokenizers alone does


def test_bad_tokenizer_files_are_one_line_user_errors(tok, tmp_path):
    good = tmp_path / "tokenizer.json"
    save_tokenizer(tok, good)
    assert load_tokenizer(good).encode("The man").ids == tok.encode("The man").ids
    text = good.read_text()
    cases = {"missing.json": None, "empty.json": "", "truncated.json": text[: len(text) // 2],
             "other.json": '{"hello": 1}', "binary.json": "\x00\x01garbage"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(UserError) as e:
            load_tokenizer(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "nichelm prepare --force" in msg, msg


# ---------------------------------------------------------------- correct(), with an engine that copies its input

class Echo:
    """A backend that writes back its input: what correct() returns must then be exactly its input."""
    name = "echo"

    def __init__(self, end_id: int):
        self.end_id, self.prompts = end_id, []

    def generate(self, prompts, max_new, sources=None, score=False):
        self.prompts += prompts
        return [finish(list(s) + [self.end_id], b, self.end_id) for s, b in zip(sources, max_new)]


def echo_corrector(tok, **kwargs) -> Corrector:
    model = GPT(ModelConfig(vocab_size=tok.get_vocab_size(), block_size=128, n_layer=1, n_head=2, n_embd=16))
    c = Corrector(model, tok, {"prompt_template": TEMPLATE, "end_marker": END, "window_chars": 100}, **kwargs)
    c.backend = Echo(c.end_id)
    return c


@pytest.mark.parametrize("overlap", [0, 30])
def test_correct_loses_nothing_around_marker_strings(tok, overlap):
    c = echo_corrector(tok, window_overlap=overlap)
    long = " ".join(f"{SENTENCES[i % 6]} {QUOTES[i % len(QUOTES)]}" for i in range(8))     # many windows
    texts = QUOTES + [long, "a file's last line <|endoftext|>\n"]
    for guard in (True, False):
        assert c.correct(texts, guard=guard) == texts
    assert c.backend.prompts and all(marker_counts(tok, p) == [0, 1, 1] for p in c.backend.prompts)


def test_a_one_megabyte_line_is_cut_into_windows(tok):
    words = [w for s in SENTENCES for w in s.split()] + QUOTES[:2]
    rng = random.Random(1)
    text = " ".join(rng.choice(words) for _ in range(200_000))[:1_000_000]
    assert "\n" not in text and len(text) == 1_000_000
    c = echo_corrector(tok)
    assert c.correct([text]) == [text]
    n = len(cut_windows(text, c.window_chars))
    assert len(c.backend.prompts) == n > 10_000 - 1
    assert max(map(len, c.backend.prompts)) < c.model.cfg.block_size
    assert all(marker_counts(tok, p) == [0, 1, 1] for p in c.backend.prompts)


def test_lone_surrogates_through_correct(tok):
    c = echo_corrector(tok)
    out = c.correct(["a\ud800b and <|endoftext|>", "x " * 80 + "\udfff"], guard=True)
    assert out == ["a\ufffdb and <|endoftext|>", "x " * 80 + "\ufffd"]
    for text in out:
        text.encode("utf-8")                                          # writable


# ---------------------------------------------------------------- prepare -> train -> correct -> apply

PAIRS = [("Tho man said <|endoftext|> and went homc.", "The man said <|endoftext|> and went home."),
         ("A ### Correction ### B", "A ### Correction ### B"),
         ("Quotc: ### Text ### then ### Correction ###.", "Quote: ### Text ### then ### Correction ###."),
         ("Thc end <|endoftext|><|endoftext|> twicc.", "The end <|endoftext|><|endoftext|> twice."),
         ("Plain linc with no markers at all.", "Plain line with no markers at all."),
         ("### Text ###\n### Correction ###", "### Text ###\n### Correction ###")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained (~200 steps, seconds) until it knows PAIRS by heart: its outputs then show
    whether the text around and inside marker strings survives every stage."""
    from nichelm.config import load_project
    from nichelm.prepare import prepare
    from nichelm.train import train
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("markers")
    with (root / "train.jsonl").open("w") as f:
        for copy in range(4):                 # 4 copies: every example starts some training row
            for i, (a, b) in enumerate(PAIRS):
                f.write(json.dumps({"id": f"t{copy}.{i}", "input": a, "output": b}) + "\n")
    (root / "val.jsonl").write_text("".join(
        json.dumps({"id": f"v{i}", "input": f"Val linc {i} <|endoftext|> ###", "output": f"Val line {i} <|endoftext|> ###"})
        + "\n" for i in range(4)))
    sources = "".join(f"""
[[sources]]
name = "{name}"
path = "{name}.jsonl"
format = "jsonl"
id_field = "id"
split = "{name}"
licence = "test"
""" for name in ("train", "val"))
    (root / "project.toml").write_text(f"""
run_dir = "{root / 'run'}"
seed = 5
[task]
window_chars = 60
{sources}
[tokenizer]
vocab_size = 320
[model]
preset = "nano"
n_layer = 2
n_embd = 64
block_size = 96
[train]
max_steps = 200
batch_size = 8
eval_every = 1000
warmup_steps = 5
threads = 1
""")
    project = load_project(root / "project.toml", [])
    prepare(project)
    train(project)
    return project


def test_shards_hold_one_set_of_markers_per_example(trained):
    """The loss mask is read off the markers: a marker quoted in the data must not move it."""
    from nichelm.data.loader import loss_mask
    from nichelm.data.shards import read_shard
    data = trained.run_path / "data"
    tok = load_tokenizer(trained.run_path / "tokenizer" / "tokenizer.json")
    in_id, out_id, end_id = (tok.token_to_id(m) for m in ("### Text ###", "### Correction ###", END))
    for split in ("train", "val"):
        examples = [json.loads(line) for line in (data / f"examples.{split}.jsonl").read_text().splitlines()]
        assert any(END in e["input"] and END in e["output"] for e in examples)
        tokens = np.concatenate([np.asarray(read_shard(p)) for p in sorted((data / "shards").glob(f"{split}_*.bin"))])
        n = len(examples)
        assert [(tokens == i).sum() for i in (in_id, out_id, end_id)] == [n, n, n]
        trained_targets = tokens[1:][loss_mask(tokens[None, :-1].astype(np.int64), in_id, out_id, end_id)[0]]
        after_marker = prompt_ids(tok, TEMPLATE, "")[-1:]          # the template's "\n" after the output marker
        expected = [i for e in examples for i in after_marker + encode_text(tok, e["output"]) + [end_id]]
        assert trained_targets.tolist() == expected


def test_a_model_trained_on_marker_strings_writes_them_back(trained, tmp_path):
    import nichelm
    from nichelm.apply import apply
    corrector = nichelm.load(trained.run_path)
    inputs, golds = [a for a, _ in PAIRS], [b for _, b in PAIRS]
    assert corrector.correct(inputs, guard=False) == golds
    assert corrector.correct(inputs[:2]) == golds[:2]         # the two examples, guard on
    corpus = tmp_path / "in"
    corpus.mkdir()
    (corpus / "a.txt").write_text(inputs[0] + "\n")
    with (corpus / "b.jsonl").open("w") as f:
        for text in inputs[1:4] + ["bad \ud800 surrogate"]:
            f.write(json.dumps({"text": text}) + "\n")           # ensure_ascii: the surrogate stays an escape
    report = apply(trained.run_path, [corpus], tmp_path / "out", threads=1)
    assert not report.failed
    assert (tmp_path / "out" / "a.txt").read_text() == golds[0] + "\n"
    rows = [json.loads(line) for line in (tmp_path / "out" / "b.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["corrected"] for r in rows[:3]] == golds[1:4]
    assert rows[3]["corrected"] == "bad \ufffd surrogate"         # the guard kept the input, as U+FFFD


def test_the_model_cards_transformers_usage_keeps_markers_as_text(trained, tmp_path):
    """The documented snippet, run as written with transformers: the same prompt ids as nichelm, one
    marker of each kind, and the same output."""
    pytest.importorskip("transformers")
    from nichelm.export import export
    out = export(trained.run_path, "hf", tmp_path / "hf")
    assert json.loads((out / "task.json").read_text())["user_text_encoding"] == "split_special_tokens"
    card = (out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    tok = load_tokenizer(out / "tokenizer.json")
    for text, gold in PAIRS[:3]:
        scope = {"PATH": str(out), "text": text}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(snippet, scope)
        assert scope["ids"] == prompt_ids(tok, TEMPLATE, text)
        assert marker_counts(tok, scope["ids"]) == [0, 1, 1]
        assert printed.getvalue().strip() == gold
