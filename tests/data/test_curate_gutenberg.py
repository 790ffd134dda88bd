"""Curation of a real Project Gutenberg book from shared/data (skipped where the data is absent)."""

import json
from pathlib import Path

import pytest

from llmstack.config import load_config
from llmstack.config.curate import CurateConfig
from llmstack.data.curate import curate

BOOK = Path(__file__).resolve().parents[3] / "shared/data/gutenberg/1342-0.txt"
if not BOOK.is_file():
    BOOK = Path("/work/shared/data/gutenberg/1342-0.txt")

pytestmark = pytest.mark.skipif(not BOOK.is_file(), reason="shared/data/gutenberg is not on this machine")


def test_pride_and_prejudice_loses_its_licence_and_keeps_its_story(tmp_path):
    cfg = load_config(CurateConfig, None, [
        f"output_dir={tmp_path}", f"data.train={BOOK}",
        "rules.order=[gutenberg,paragraphs,language,c4,gopher_quality,gopher_repetition,exact_dedup,near_dedup]"])
    result = curate(cfg)
    raw = BOOK.read_text(encoding="utf-8-sig")
    kept = [json.loads(line)["text"] for path in result.files for line in path.read_text().splitlines()]
    text = "\n".join(kept)
    assert "Gutenberg" not in text and "START OF THIS" not in text
    assert kept[0].startswith("It is a truth universally acknowledged, that a single man in possession of a good "
                              "fortune, must be in want of a wife.")  # title, author and chapter lines dropped
    assert "a wife" in kept[0] and "Elizabeth" in text
    rules = {r["name"]: r for r in result.audit["rules"]}
    strip = rules["gutenberg"]
    # the licence: the words before the START line and from the 'End of the Project Gutenberg' line on
    start = raw.index("*** START OF THIS PROJECT GUTENBERG EBOOK")
    start = raw.index("\n", start)
    footer = raw.index("End of the Project Gutenberg EBook of Pride and Prejudice")
    assert strip["counts"]["header_words"] == len(raw[:start].split())
    assert strip["counts"]["footer_words"] == len(raw[footer:].split())
    passages = rules["paragraphs"]["passages"]
    # every passage holds at least 200 of the body's words
    assert result.audit["input"]["passages"] == passages and 300 < passages <= len(raw[start:footer].split()) // 200
    assert result.audit["output"]["documents"] > 0.9 * passages
