"""How a document of any length is cut into the windows a model reads (torch-free).

`nichelm apply`, `nichelm evaluate` and `nichelm.load(...)` cut alike, for every task: correction stitches
the windows' outputs back (inference.stitch), classification sums the windows' label scores.
"""

from __future__ import annotations

import re

_SPACES = re.compile(r"\s*")


def cut_windows(text: str, max_chars: int) -> list[tuple[str, str]]:
    """Cut text into (chunk, following whitespace) pairs, chunks ≤ max_chars, never inside a word.

    Prefers a sentence end near the limit. Joining chunk+sep over all pairs gives the text back.
    Chunks never start or end with whitespace (it is all in the separators, which are kept as they
    are), so a text's final newline survives a model that strips its output.
    """
    pieces = []
    pos, n = 0, len(text)
    while pos < n:
        lead = _SPACES.match(text, pos).end() - pos     # match at pos: no copy of the rest (1 MB lines)
        if lead:                                   # leading whitespace belongs to the previous separator
            if pieces:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + text[pos:pos + lead])
            else:
                pieces.append(("", text[pos:pos + lead]))
            pos += lead
            continue
        end = min(pos + max_chars, n)
        if end == n:                               # the last chunk: its trailing whitespace is a separator
            end = len(text.rstrip())                    # (> pos: text[pos] is not whitespace)
        else:
            window = text[pos:end + 1]
            cuts = [m.end() - 1 for m in re.finditer(r"[.!?;:]\s", window)]
            cuts = [c for c in cuts if c >= max_chars // 2]
            spaces = [m.start() for m in re.finditer(r"\s", window)]
            if cuts:
                end = pos + cuts[-1]          # just after the punctuation: the whitespace is the separator
            elif spaces and spaces[-1] > 0:
                end = pos + spaces[-1]
            # else: one word longer than the window; cut it hard
        chunk = text[pos:end]
        sep_len = _SPACES.match(text, end).end() - end
        pieces.append((chunk, text[end:end + sep_len]))
        pos = end + sep_len
    return pieces
