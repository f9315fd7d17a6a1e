"""OCRNoise.corrupt gives the same output for a given (seed, key) as before its speed-ups.

The digests below were computed with the implementation that built every site list in full and
drew with random.choices; the faster one counts sites and draws the same numbers. A change here
changes every prepared corpus with synthetic noise, so it must be deliberate.
"""

import hashlib
import random

import pytest

from nichelm.data.noise import OCRNoise

_WORDS = ("In the beginning God created the heavens and the earth. Now the earth was formless and empty, "
          "darkness was on the surface of the deep; first office, difficult affluence, sufficient "
          "mill, corn, clinic, winning, dimly. ÉCOLE naïve straße façade ſoft ﬁne vvhere ½ Ⅻ² stufff illl vvvv").split(" ")
_ODD = "ſéèàç ﬁ\t\n\x1c½²Ⅻ ff ffi fl rn  s sf ss, ; : \u00a0 ΣΑΣ ﬀ vv w"


def _texts() -> list[str]:
    rng = random.Random(11)
    texts = []
    for k in range(400):
        t = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 60)))[: rng.choice([1, 2, 5, 50, 200, 800])]
        if k % 3 == 0:
            t = "".join(rng.choice(_ODD) if rng.random() < 0.1 else c for c in t)
        texts.append(t)
    return texts + ["a", "ab", " a ", "s", "ss", "\t\tx", "abcdefghij", "ſſſs"]


_FIT = {"target_cer": 0.07, "profile": "english",
        "weights": {"substitution": 50.0, "multi": 15.0, "deletion": 12.0, "insertion": 10.0,
                    "spurious_space": 6.0, "lost_space": 3.0, "hyphenation": 2.0, "long_s": 0.5, "ligature": 1.5},
        "confusions": [["e", "c", 30], ["h", "b", 7], ["rn", "m", 3], ["l", "", 4], ["", ".", 9], ["in", "m", 2]],
        "source_counts": {"e": 997, "h": 301, "rn": 41, "l": 333, "in": 150}}

CASES = {
    "english": (lambda: OCRNoise(target_cer=0.06, seed=1),
                "c75445c62c15f06c7ce02247ae14606f880c9a024e3ec49332f0a2c66389bc07"),
    "french": (lambda: OCRNoise(target_cer=0.2, seed=2, profile="french"),
                "c1a845d8114fecb5127359d383481bb7afe075aedd649f3a94f802a9c657ae51"),
    "early_modern_bursty": (lambda: OCRNoise(target_cer=0.1, seed=3, profile="early-modern", burstiness=0.9),
                "6d39a7e69216f647da815fffb401928c99191bcad7f1c8446d5c327abc68e48f"),
    "weights": (lambda: OCRNoise(target_cer=0.3, seed=9, weights={"substitution": 0, "long_s": 50, "ligature": 20,
                                                                   "lost_space": 10, "hyphenation": 7}),
                "5aeeac85e770b916cbbf8f1d85f5c51fbb61f1982af2480895d399a1ffc982fa"),
    "measured_table": (lambda: OCRNoise.from_fit(_FIT, seed=7),
                "de4138547924916d938b40cb8af78e631dd9c2102e8aa64739193b0c2ef4c29b"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_corrupt_output_is_pinned(case):
    make, expected = CASES[case]
    noise = make()
    out = "\x00".join(noise.corrupt(t, f"{case}/{i}") for i, t in enumerate(_texts()))
    assert hashlib.sha256(out.encode("utf-8", "surrogatepass")).hexdigest() == expected


def test_counted_costs_match_built_sites():
    """The per-type mean costs counted with whole-string operations equal those of the full site lists."""
    for make, _ in CASES.values():
        noise = make()
        for t in _texts():
            counted = noise._type_costs(t, {})
            built = {}
            for name in counted:
                typed = noise._build_sites(name, t)
                assert typed is not None, (name, t)
                built[name] = typed.mean_cost()
            assert counted == built, t
