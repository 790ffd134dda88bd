"""The benchmark harness on a minimal size: both contenders run in their own processes from the same start,
and the results table is written."""

import pytest

from benchmarks.run import main


@pytest.mark.slow
def test_pretrain_comparison_starts_both_contenders_from_the_same_weights(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"The fox number {i} sees the owl near the river." for i in range(400)))
    main(["pretrain", "--data", str(corpus), "--preset", "llama-1m", "--vocab", "300", "--seq", "32", "--batch",
          "2", "--steps", "3", "--warmup", "1", "--repeats", "1", "--work", str(tmp_path / "work"),
          "--out", str(tmp_path / "results")])
    table = (tmp_path / "results" / "pretrain.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| llmstack") or line.startswith("| hf-trainer")}
    assert set(rows) == {"llmstack", "hf-trainer"}
    # same initial weights and the same first batch: the first step's loss agrees across the two processes
    # (to the 4 decimals printed; the next batches of this corpus start 0.1 higher)
    assert rows["llmstack"][3] == rows["hf-trainer"][3]
    assert all(float(r[4]) > 0 for r in rows.values())
