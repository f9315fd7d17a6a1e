"""The example projects on the real OCR data in ../shared (skipped on a fresh clone without it)."""

import json

import pytest

from tests.conftest import ROOT, needs_shared, run_cli

pytestmark = pytest.mark.shared


def test_bln600_prepare_reports_the_published_raw_cer(tmp_path):
    needs_shared()
    run = tmp_path / "bln600"
    proc = run_cli("prepare", ROOT / "examples" / "bln600.toml", "--set", f"run_dir={run}")
    assert proc.returncode == 0, proc.stderr
    assert "raw OCR corpus CER 6.2" in proc.stderr
    manifest = json.loads((run / "data" / "manifest.json").read_text())
    (source,) = manifest["sources"]
    assert source["documents"] == 480
    assert abs(100 * source["raw_ocr"]["cer"] - 6.22) <= 0.05, source["raw_ocr"]
    assert 1_320_000 < source["raw_ocr"]["gold_chars"] < 1_345_000
    assert len(source["sha256"]) == 64 and "CC BY-NC" in source["licence"]
    # documents never straddle splits
    seen = {}
    for split in ("train", "val", "test"):
        for line in (run / "data" / f"examples.{split}.jsonl").read_text().splitlines():
            seen.setdefault(json.loads(line)["doc_id"], set()).add(split)
    assert all(len(s) == 1 for s in seen.values())
    assert sum(source[f"documents_{s}"] for s in ("train", "val", "test")) == 480
