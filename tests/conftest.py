import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_OCR = ROOT.parent / "shared" / "data" / "ocr"


def run_cli(*args, cwd=None, timeout=600):
    """Run `python -m nichelm ...` as a user would; returns CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "nichelm", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def needs_shared():
    if not SHARED_OCR.is_dir():
        pytest.skip("../shared/data/ocr not present (fresh clone): real-data checks need it")
    return SHARED_OCR


SENTENCES = [
    "The committee met at the town hall on Monday evening to consider the new road.",
    "A large number of persons assembled in the market place before the meeting began.",
    "The prisoner was brought up on remand and charged with stealing a silver watch.",
    "It was resolved that the thanks of the meeting be given to the chairman.",
    "The weather during the week has been unusually cold for the time of year.",
    "Several gentlemen addressed the assembly in favour of the proposed measure.",
]


@pytest.fixture
def tiny_project(tmp_path):
    """A tiny project: clean text plus real-looking pairs, sized for seconds of CPU."""
    clean = tmp_path / "clean"          # a folder of text files: one document per file
    clean.mkdir()
    for doc in range(12):
        lines = [SENTENCES[i % len(SENTENCES)].replace("the", ["the", "a", "this"][i % 3], 1) + f" Item {doc}.{i}."
                 for i in range(25)]
        (clean / f"doc{doc:02d}.txt").write_text("\n".join(lines) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(60):
            gold = SENTENCES[i % len(SENTENCES)] + f" No. {i}."
            f.write(json.dumps({"id": f"d{i}", "ocr": gold.replace("e", "c", 1), "gold": gold}) + "\n")
    proj = tmp_path / "project.toml"
    proj.write_text(f"""
run_dir = "{tmp_path / 'run'}"
seed = 7
[task]
window_chars = 60
[[sources]]
name = "clean"
path = "{clean.name}"
format = "text"
role = "clean"
licence = "test text"
[[sources]]
name = "pairs"
path = "{pairs.name}"
format = "jsonl"
input_field = "ocr"
output_field = "gold"
id_field = "id"
licence = "test pairs"
[noise]
target_cer = 0.05
[split]
val_fraction = 0.1
test_fraction = 0.1
[tokenizer]
vocab_size = 320
[model]
preset = "nano"
n_layer = 2
n_embd = 64
block_size = 96
[train]
max_steps = 12
batch_size = 8
eval_every = 6
eval_batches = 2
warmup_steps = 2
threads = 1
[eval]
max_examples = 20
""")
    return proj
