"""python -m benchmarks.kernels: its options, and a failed case making the run fail (scripts/gpu-check.sh
reads the exit status). The cases themselves are measured on a GPU, not here."""

import pytest

from benchmarks.kernels import run


def test_quick_is_a_smaller_grid_with_one_repeat():
    full, quick = run.cases(False, set(run.KINDS)), run.cases(True, set(run.KINDS))
    tokens = {c["B"] * c["T"] for c in quick if c["kind"] in ("ce", "logprobs")}
    assert tokens == {512} and max(c["V"] for c in quick if "V" in c) == 131072
    assert {c["repeats"] for c in quick if c["kind"] != "elementwise"} == {1}
    assert len(quick) < len(full)


def test_an_unknown_kind_is_named(capsys):
    with pytest.raises(SystemExit) as stop:
        run.main(["--only", "ce,lse"])
    assert stop.value.code == 2
    assert "--only: unknown kind(s) lse; choose from ce, logprobs, elementwise, train" in capsys.readouterr().err


def test_a_failed_case_is_in_the_table_and_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "run_case", lambda case: {"case": case, "error": "out of memory"})
    out = tmp_path / "kernels.md"
    with pytest.raises(SystemExit, match=r"^4 of 4 cases failed"):
        run.main(["--quick", "--only", "train", "--out", str(out)])
    assert out.read_text().count("failed: out of memory") == 4
