"""The generation benchmark on a 2-layer model: every contender generates the same number of tokens from the
same prompts, the static engine's rows equal the hf engine's, and the table sets each beside the baseline."""

from benchmarks import generation


def test_every_contender_does_the_same_work_and_the_table_compares_it_with_generate(tmp_path):
    out = tmp_path / "generation.md"
    generation.main(["--model", "tiny", "--batches", "3", "--new-tokens", "5", "--prompt-lengths", "2,9",
                     "--profile", "--work", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| 3 ")]
    assert [r[3] for r in rows] == ["model.generate", "hf", "static"]
    assert rows[0][6] == "1.00x"
    assert all(float(r[5]) > 0 for r in rows)
    assert rows[1][7] == "3/3" and rows[2][7] == "3/3"  # same seeds, same tokens as the hf engine
    assert "Where the static engine's time goes" in text and "aten::" in text


def test_prompts_are_left_padded_within_the_asked_lengths():
    ids, mask = generation.make_prompts(50, (4, 11), 100, 0)
    lengths = mask.sum(1)
    assert 4 <= lengths.min() and lengths.max() <= 11 and ids.shape[1] == lengths.max()
    assert (mask.cumsum(1) > 0).eq(mask.bool()).all()  # padding on the left only
    assert (ids[mask == 0] == 0).all() and (ids[mask == 1] >= 3).all()
