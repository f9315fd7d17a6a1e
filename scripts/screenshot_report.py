#!/usr/bin/env python3
"""Screenshot a report.html in headless Chromium, to check that the page and its charts render.

Why: report.html must open offline in a plain browser. A PNG of what Chromium
actually draws catches what string checks cannot (a broken data URI, a chart
that draws empty, CSS hiding a section). The browser runs with networking
features off and a fresh, empty profile, so nothing outside the page can load.

Usage:
    python scripts/screenshot_report.py REPORT.html [--out shot.png] [--width 1200] [--height 2400]
    python scripts/screenshot_report.py --demo DIR   # build a demo report (fake model, loss curve) and shoot it

Chromium is looked up as $CHROMIUM, then chromium, chromium-browser, google-chrome.
On Debian: apt-get install -y chromium. Exit status 3 when no browser is found.
Prints the PNG path and a one-line summary of its pixels (distinct colours, share
of the most common colour), which the tests use to tell a real page from a blank one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--mute-audio"]


def find_browser() -> str | None:
    """The Chromium binary to use, or None."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).is_file() else None
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 2400, browser: str | None = None,
               timeout: float = 90) -> Path:
    """Render `html` to `png`; raises RuntimeError with Chromium's output when no PNG appears."""
    browser = browser or find_browser()
    if browser is None:
        raise FileNotFoundError("no Chromium found (set $CHROMIUM or apt-get install -y chromium)")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="nichelm-chromium-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}",
               f"--window-size={width},{height}", Path(html).resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not png.is_file() or png.stat().st_size == 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {' | '.join(tail)}")
    return png


def pixel_summary(png: Path) -> dict:
    """Distinct colours and the share of the most common one: a blank page is ~100% one colour."""
    import numpy as np
    from matplotlib.image import imread
    img = imread(str(png))[..., :3]
    flat = (img.reshape(-1, 3) * 255).round().astype(np.uint32)
    keys = flat[:, 0] << 16 | flat[:, 1] << 8 | flat[:, 2]
    _, counts = np.unique(keys, return_counts=True)
    return {"width": img.shape[1], "height": img.shape[0], "colours": int(len(counts)),
            "top_colour_share": float(counts.max() / counts.sum())}


def build_demo(folder: Path) -> Path:
    """A demo report: small ICDAR-like pairs, a fake corrector that fixes some errors, a loss curve."""
    from nichelm import evaluate

    folder = Path(folder)
    data, run = folder / "data", folder / "run"
    gold = "The committee met at the town hall on Monday evening to consider the new road. "
    for lang in ("EN", "FR"):
        for k in range(12):
            ocr = gold.replace("e", "c", k % 5 + 1).replace("o", "0", k % 3)
            aligned = f"[OCR_toInput] {ocr}\n[OCR_aligned] {ocr}\n[ GS_aligned] {gold}\n"
            path = data / lang / f"{k}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(aligned, encoding="utf-8")
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train_loss": 4.0 / (1 + s / 20), **({"val_loss": 4.2 / (1 + s / 25)}
                                                                    if s % 10 == 0 else {})}) + "\n"
        for s in range(1, 101)), encoding="utf-8")

    class FakeCorrector:
        """Fixes 'Thc' and '0' in every other document and breaks a word in every fifth: mixed results."""

        def correct(self, texts):
            out = []
            for i, t in enumerate(texts):
                t = t.replace("Thc ", "The ").replace("0", "o") if i % 2 else t
                out.append(t.replace("road", "r0ad") if i % 5 == 0 else t)
            return out

    evaluate.load_corrector = lambda *a, **k: FakeCorrector()
    _, out = evaluate.evaluate_external(data, "icdar", model=run, out=folder / "report")
    return out / "report.html"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", help="the report.html to shoot")
    ap.add_argument("--demo", metavar="DIR", help="build a demo report in DIR and shoot that")
    ap.add_argument("--out", help="PNG path (default: beside the html, report.png)")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=2400)
    args = ap.parse_args(argv)
    if bool(args.html) == bool(args.demo):
        ap.error("give REPORT.html or --demo DIR")
    if find_browser() is None:
        print("screenshot_report: no Chromium found (set $CHROMIUM or apt-get install -y chromium)", file=sys.stderr)
        return 3
    html = build_demo(Path(args.demo)) if args.demo else Path(args.html)
    if not html.is_file():
        print(f"screenshot_report: {html}: no such file", file=sys.stderr)
        return 2
    png = screenshot(html, Path(args.out) if args.out else html.with_suffix(".png"), args.width, args.height)
    print(json.dumps({"png": str(png), **pixel_summary(png)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
