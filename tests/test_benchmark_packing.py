"""The packing benchmark's baseline does the same work as the packer it is compared with, and its table
puts each case's numbers beside its baseline's."""

import random

from benchmarks import packing
from llmstack.data import text


def test_the_reslicing_baseline_packs_exactly_like_pack_blocks():
    rng = random.Random(0)
    docs = [[rng.randrange(1000) for _ in range(rng.randint(0, 300))] for _ in range(30)]
    for block_size in (1, 7, 64):
        assert list(packing.reslicing_pack(docs, block_size, 1, 2)) == list(text.pack_blocks(docs, block_size, 1, 2))


def result(document, kind, path, seconds, peak):
    case = {"document": document, "kind": kind, "path": path}
    return {"case": case, "seconds": seconds, "tokens": 1000, "peak_mib": peak, "peak_rss_mib": 400 + peak,
            "load": 1.5}


def test_the_table_sets_each_case_beside_its_baseline():
    results = [result("doc", "pack", "before", 8.0, 20.0), result("doc", "pack", "now", 0.5, 1.0),
               result("doc", "streamed", "now", 2.0, 50.0),
               {"case": {"document": "doc", "kind": "tokenize", "path": "before"}, "error": "MemoryError"},
               result("doc", "tokenize", "now", 1.0, 40.0)]
    lines = packing.table(results)
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines[2:5]]
    assert rows == [
        ["doc", "1,000", "packing alone", "8.000", "0.500", "16.0x", "420", "401", "20", "1", "1.5"],
        ["doc", "1,000", "streamed (`packed_blocks`), end to end", "—", "2.000", "—", "—", "450", "—", "50", "1.5"],
        ["doc", "1,000", "tokenising", "failed", "1.000", "—", "failed", "440", "failed", "40", "1.5"],
    ]
    assert lines[5:] == ["", "- doc, tokenising, before: MemoryError"]
