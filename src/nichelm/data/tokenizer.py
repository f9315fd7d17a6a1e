"""Task tokenizer: byte-level BPE trained with HF tokenizers on the task's own examples.

Byte-level means every byte is a base symbol, so any text encodes (no unknown
token: the byte fallback). The prompt markers and the end marker are special
tokens, so each costs one position and never merges with text.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nichelm.io import atomic_write_text


def template_markers(prompt_template: str) -> tuple[str, str]:
    """'### Text ###\\n{input}\\n### Correction ###\\n' -> ('### Text ###', '### Correction ###')."""
    before, _, after = prompt_template.partition("{input}")
    input_marker, output_marker = before.strip(), after.strip()
    if not input_marker or not output_marker:
        raise ValueError("prompt_template needs a marker before and after {input}, e.g. "
                         "'### Text ###\\n{input}\\n### Correction ###\\n'")
    return input_marker, output_marker


def special_tokens(prompt_template: str, end_marker: str) -> list[str]:
    return [end_marker, *template_markers(prompt_template)]


def train_tokenizer(texts: Iterable[str], vocab_size: int, specials: list[str], min_frequency: int = 2) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    atomic_write_text(path, tok.to_str(pretty=True))


def load_tokenizer(path: Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))
