"""The curation stage end to end: audit counts against what was planted or worked out by hand, the order
semantics of the audit, outputs, the run record, workers and shards."""

import json
import runpy
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from llmstack import cli
from llmstack.config import load_config
from llmstack.config.curate import CurateConfig
from llmstack.data.curate import curate
from llmstack.data.sources import DataError
from llmstack.data.synthetic_noise import noisy_corpus
from llmstack.tracking.record import file_sha256

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs/tiny/curate.yaml"
BLOCKLIST = REPO / "llmstack/data/blocklist.txt"
# what C4 does with each planted boilerplate line (worked out from the line rules, not from a run)
LINE_REASON = {"Click here to subscribe": "line:no_terminal_punctuation",
               "Javascript must be enabled to view this page.": "line:boilerplate:javascript",
               "By using this site you agree to our terms of use.": "line:boilerplate:terms of use"}


def tiny(tmp_path, *overrides, name="run"):
    return load_config(CurateConfig, TINY, [f"output_dir={tmp_path / name}", f"rules.wordlist.path={BLOCKLIST}",
                                            *overrides])


def rows(files) -> list[dict]:
    out = []
    for path in files:
        if path.suffix == ".parquet":
            out += pq.read_table(path).to_pylist()
        else:
            out += [json.loads(line) for line in path.read_text().splitlines()]
    return out


def by_name(audit: dict) -> dict:
    return {rule["name"]: rule for rule in audit["rules"]}


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("noisy")
    docs, truth = noisy_corpus(500, seed=0)
    return docs, truth, curate(tiny(tmp))


def test_noisy_corpus_audit_counts_match_what_was_planted(noisy_run):
    docs, truth, result = noisy_run
    rules = by_name(result.audit)
    removed = {name: rule["removed"]["documents"] for name, rule in rules.items()}
    assert removed == {"language": len(truth["foreign"]), "c4": len(truth["code"]), "gopher_quality": 0,
                       "gopher_repetition": len(truth["repetition"]), "wordlist": len(truth["blocklisted"]),
                       "exact_dedup": len(truth["exact_duplicate"]), "near_dedup": len(truth["near_duplicate"]),
                       "pii": 0}
    assert rules["language"]["reasons"] == {"language:de": len(truth["foreign"])}
    assert rules["c4"]["reasons"] == {"curly_bracket": len(truth["code"])}
    planted_lines = [line for lines in truth["boilerplate"].values() for line in lines]
    assert rules["c4"]["changed"] == {"documents": len(truth["boilerplate"]),
                                      "words_removed": sum(len(line.split()) for line in planted_lines)}
    assert rules["c4"]["counts"] == dict(Counter(LINE_REASON[line] for line in planted_lines))
    assert rules["gopher_repetition"]["reasons"] == {"duplicate_lines": len(truth["repetition"])}
    assert rules["wordlist"]["by_word"] == dict(Counter(truth["blocklisted"].values()))
    masks = Counter()
    for kinds in truth["pii"].values():
        masks.update(kinds)
    assert rules["pii"]["changed"]["documents"] == len(truth["pii"]) and rules["pii"]["counts"] == dict(masks)
    # an exact copy is also a near-duplicate, so exact dedup removes nothing the near rule would not
    assert rules["exact_dedup"]["only"]["documents"] == 0
    assert rules["near_dedup"]["flagged"]["documents"] == len(truth["exact_duplicate"]) + len(truth["near_duplicate"])
    assert rules["near_dedup"]["only"]["documents"] == len(truth["near_duplicate"])


def test_noisy_corpus_output_is_the_clean_and_repaired_documents(noisy_run):
    docs, truth, result = noisy_run
    kept = {int(row["id"].split(":")[1]): row["text"] for row in rows(result.files)}
    expected = set(truth["clean"]) | set(truth["boilerplate"]) | set(truth["pii"])
    assert set(kept) == expected
    for i, lines in truth["boilerplate"].items():
        assert kept[i] == docs[i].split("\n")[0]  # the story is one line; the planted lines went
    for i, kinds in truth["pii"].items():
        (kind,) = kinds
        assert kept[i].count({"email": "[EMAIL]", "phone": "[PHONE]", "ipv4": "[IP]"}[kind]) == 1
    assert all(kept[i] == docs[i] for i in truth["clean"])
    words_out = sum(len(text.split()) for text in kept.values())
    audit = result.audit
    assert audit["output"] == {"documents": len(expected), "words": words_out}
    # every input word is kept, in a removed document, or cut from a kept one
    gone = sum(r["removed"]["words"] + r["changed"]["words_removed"] for r in audit["rules"])
    assert audit["input"]["words"] == sum(len(d.split()) for d in docs) == words_out + gone


def test_noisy_corpus_samples_name_the_evidence(noisy_run):
    docs, truth, result = noisy_run
    rules = by_name(result.audit)
    for sample in rules["exact_dedup"]["samples"] + rules["near_dedup"]["samples"]:
        index = int(sample["id"].split(":")[1])
        kind = "exact_duplicate" if index in truth["exact_duplicate"] else "near_duplicate"
        assert sample["reason"] == "duplicate"
        assert sample["evidence"].startswith(f"of noisy:{truth[kind][index]} (similarity ")
        assert sample["text"] == docs[index][:300]
    for sample in rules["wordlist"]["samples"]:
        assert sample["evidence"] == truth["blocklisted"][int(sample["id"].split(":")[1])]
    for sample in rules["c4"]["change_samples"]:
        assert sample["evidence"] in truth["boilerplate"][int(sample["id"].split(":")[1])]
        assert f"line:{sample['reason']}" == LINE_REASON[sample["evidence"]]
    assert all(len(rule["samples"]) == min(3, rule["removed"]["documents"]) for rule in rules.values())
    markdown = (result.output_dir / "CURATION.md").read_text()
    assert "| 5 | `wordlist` | filter | 470 | 10 (2.1%) |" in markdown
    assert "| casino | 5 |" in markdown and "| jackpot | 5 |" in markdown


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def run_docs(tmp_path, texts, order, *overrides, name="run"):
    source = write_jsonl(tmp_path / f"{name}.jsonl", texts)
    cfg = load_config(CurateConfig, None, [f"output_dir={tmp_path / name}", f"data.train={source}",
                                           f"rules.order=[{','.join(order)}]", f"rules.wordlist.path={BLOCKLIST}",
                                           *overrides])
    return curate(cfg)


LONG = "The old mill stood by the river for many years and the people of the village came to it with grain. "
ORDER_DOCS = ["A casino opened.",  # short and blocklisted: both rules
              LONG + "A casino opened near it.",  # blocklisted only
              "A short note.",  # short only
              LONG,  # kept
              LONG + "\nVisit our casino"]  # blocklisted only in a line C4 drops
SHORT = ["rules.gopher_quality.min_words=10", "rules.c4.min_sentences=0"]


def counts(result, key):
    return {r["name"]: r[key]["documents"] for r in result.audit["rules"]}


def test_removed_counts_follow_the_order_and_only_counts_follow_the_rewrites(tmp_path):
    first = run_docs(tmp_path, ORDER_DOCS, ["wordlist", "gopher_quality"], *SHORT, name="a")
    second = run_docs(tmp_path, ORDER_DOCS, ["gopher_quality", "wordlist"], *SHORT, name="b")
    assert counts(first, "removed") == {"wordlist": 3, "gopher_quality": 1}
    assert counts(second, "removed") == {"gopher_quality": 2, "wordlist": 2}
    # judged on every document, flags and sole removals do not depend on the order of pure filters
    assert counts(first, "flagged") == counts(second, "flagged") == {"wordlist": 3, "gopher_quality": 2}
    assert counts(first, "only") == counts(second, "only") == {"wordlist": 2, "gopher_quality": 1}
    # C4 before the word list drops the 'Visit our casino' line, so the word list no longer sees it
    cleaned = run_docs(tmp_path, ORDER_DOCS, ["c4", "wordlist", "gopher_quality"], *SHORT, name="c")
    assert counts(cleaned, "only") == {"c4": 0, "wordlist": 1, "gopher_quality": 1}
    assert counts(cleaned, "removed") == {"c4": 0, "wordlist": 2, "gopher_quality": 1}
    assert [row["id"] for row in rows(cleaned.files)] == ["d3", "d4"]


def test_duplicates_are_judged_against_kept_documents_only(tmp_path):
    texts = [LONG, LONG.upper(), "Too short to keep.", "too   SHORT to keep."]
    for order in (["gopher_quality", "exact_dedup"], ["exact_dedup", "gopher_quality"]):
        result = run_docs(tmp_path, texts, order, *SHORT, name="-".join(order))
        rules = by_name(result.audit)
        # the short note never enters the index, so its copy is not a duplicate of anything kept
        assert (rules["exact_dedup"]["flagged"]["documents"], rules["exact_dedup"]["only"]["documents"]) == (1, 1)
        assert rules["gopher_quality"]["removed"]["documents"] == 2
        assert rules["exact_dedup"]["samples"][0]["evidence"] == "of d0 (similarity 1.00)"
        assert [row["id"] for row in rows(result.files)] == ["d0"]


def test_two_workers_give_the_same_result_as_one(tmp_path):
    one = curate(tiny(tmp_path, "data.train=synthetic-noisy:200", name="one"))
    two = curate(tiny(tmp_path, "data.train=synthetic-noisy:200", "workers=2", name="two"))
    assert [p.read_bytes() for p in one.files] == [p.read_bytes() for p in two.files]
    assert {k: v for k, v in one.audit.items() if k != "run"} == {k: v for k, v in two.audit.items() if k != "run"}


def test_parquet_shards_record_and_no_redo(tmp_path):
    result = curate(tiny(tmp_path, "format=parquet", "shard_size=150"))
    assert [len(pq.read_table(p)) for p in result.files] == [150, 150, 140]
    assert [p.name for p in result.files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    record = json.loads((result.output_dir / "record.json").read_text())
    assert record["stage"] == "curate" and record["status"] == "finished"
    assert record["inputs"]["train"] == {"spec": "synthetic-noisy:500", "generator": "llmstack.data.synthetic_noise",
                                         "documents": 500, "seed": 0}
    assert [f["sha256"] for f in record["outputs"]["data"]["files"]] == [file_sha256(p) for p in result.files]
    assert record["data"]["documents_out"] == 440 and (result.output_dir / "config.yaml").is_file()
    stamp = (result.output_dir / "curation.json").stat().st_mtime_ns
    again = curate(tiny(tmp_path, "format=parquet", "shard_size=150"))
    assert again.audit == result.audit and (result.output_dir / "curation.json").stat().st_mtime_ns == stamp


def test_file_inputs_are_fingerprinted_and_sharded_by_file(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    texts = [LONG + f"Story number {i} ends here." for i in range(6)]
    for k in range(3):
        write_jsonl(folder / f"part{k}.jsonl", texts[2 * k:2 * k + 2])
    order = ["data.train=" + str(folder), "rules.order=[c4]", "rules.c4.min_sentences=1"]
    whole = curate(load_config(CurateConfig, None, [f"output_dir={tmp_path / 'all'}", *order]))
    shards = [curate(load_config(CurateConfig, None, [f"output_dir={tmp_path / f's{i}'}", *order,
                                                      f"data.shard_index={i}", "data.num_shards=2"]))
              for i in range(2)]
    ids = [[row["id"] for row in rows(result.files)] for result in (whole, *shards)]
    assert ids[1] == ["d0", "d1", "d0", "d1"] and ids[2] == ["d0", "d1"]  # files 0 and 2 | file 1
    assert sorted(ids[1] + ids[2]) == sorted(ids[0])
    assert shards[1].files[0].name == "shard-00001-of-00002-part-00000.jsonl"
    record = json.loads((tmp_path / "all/record.json").read_text())
    assert [f["sha256"] for f in record["inputs"]["train"]["files"]] == \
        [file_sha256(folder / f"part{k}.jsonl") for k in range(3)]
    with pytest.raises(DataError, match="data.num_shards=4 but the input has 3 file"):
        curate(load_config(CurateConfig, None, [f"output_dir={tmp_path / 'x'}", *order, "data.num_shards=4"]))


def test_bad_record_names_file_line_and_field(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    cfg = load_config(CurateConfig, None, [f"output_dir={tmp_path / 'out'}", f"data.train={source}"])
    with pytest.raises(DataError, match=r"bad\.jsonl, line 2: missing field 'text'"):
        curate(cfg)
    assert json.loads((tmp_path / "out/record.json").read_text())["status"].startswith("failed: ")


def test_recipe_runs_the_stage_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(cli.STAGES, "curate", (CurateConfig, "llmstack.data.curate:curate"))
    main = runpy.run_path(str(REPO / "recipes/curate.py"))["main"]
    out = tmp_path / "recipe"
    assert main(["--config", str(TINY), f"output_dir={out}", f"rules.wordlist.path={BLOCKLIST}",
                 "data.train=synthetic-noisy:100"]) == 0
    assert json.loads((out / "curation.json").read_text())["input"]["documents"] == 100
    assert main(["--config", str(TINY), "rules.order=[c5]"]) == 2
    assert "config key 'rules.order[0]': 'c5' is not allowed" in capsys.readouterr().err
