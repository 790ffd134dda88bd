import hashlib
import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmstack.data import sources
from llmstack.data.sources import DataError, describe_source, iter_documents
from llmstack.data.synthetic import corpus
from llmstack.tracking.record import file_sha256


def test_jsonl_records_in_order_and_blank_documents_skipped(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "  "}\n{"text": "two", "id": 3}\n')
    assert list(iter_documents(str(path))) == ["one", "two"]


def test_text_file_is_one_document_without_bom_or_crlf(tmp_path):
    path = tmp_path / "book.txt"
    path.write_bytes("\ufeffFirst line\r\nSecond line\r\n".encode("utf-8"))
    assert list(iter_documents(str(path))) == ["First line\nSecond line\n"]


def test_text_file_parts_join_to_the_file_and_stay_small(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "PART_CHARS", 4)
    body = "  \n \r\nFirst line\r\nSecond\r\n\r\nthird 東京 \r\n"
    (tmp_path / "a.txt").write_bytes(("\ufeff" + body).encode())
    (tmp_path / "b.txt").write_text(" \n\t " * 5)  # blank: skipped, like an empty record
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"x y"))
    parts = list(sources.iter_document_parts(str(tmp_path)))
    assert all(0 < len(part) <= 4 for part, _ in parts)
    assert [last for _, last in parts].count(True) == 2 and parts[-1] == ("x y", True)
    assert list(sources.iter_documents(str(tmp_path))) == [body.replace("\r\n", "\n"), "x y"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"body": "x", "id": 1}\n', r"b\.jsonl, line 2: missing field 'text' \(the record has: body, id\)"),
    ('{"text": "ok"}\n{"text": 5}\n', r"b\.jsonl, line 2: field 'text' must be a string, got int"),
    ('{"text": "ok"}\n{"text": "unterminated\n', r"b\.jsonl, line 2: invalid JSON"),
    ('["text"]\n', r"b\.jsonl, line 1: expected a JSON object, got list"),
])
def test_bad_records_name_file_line_and_field(tmp_path, content, message):
    path = tmp_path / "b.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        list(iter_documents(str(path)))


def test_json_array_parquet_and_gzip_with_custom_field(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"body": "from json"}]))
    pq.write_table(pa.table({"body": ["from parquet 1", "from parquet 2"]}), tmp_path / "b.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as fh:
        fh.write('{"body": "from gzip"}\n')
    (tmp_path / "notes.md").write_text("ignored: not a data file")
    assert list(iter_documents(str(tmp_path), text_field="body")) == \
        ["from json", "from parquet 1", "from parquet 2", "from gzip"]


def test_parquet_without_the_column_lists_columns(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet, row 0: missing field 'text' \(the record has: content\)"):
        list(iter_documents(str(tmp_path / "d.parquet")))


def test_missing_local_path_is_not_sent_to_the_hub(tmp_path):
    with pytest.raises(DataError, match="./nope/corpus.jsonl: no such data file or directory"):
        iter_documents("./nope/corpus.jsonl")


def test_synthetic_corpus_is_deterministic_and_seeded():
    assert corpus(50, seed=0) == corpus(50, seed=0)
    assert corpus(50, seed=0) != corpus(50, seed=1)
    assert list(iter_documents("synthetic:7")) == corpus(7)


def test_describe_source_fingerprints_local_files(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    described = describe_source(str(path))
    assert described["files"] == [{"path": str(path), "bytes": 5,
                                   "sha256": "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"}]
    assert file_sha256(path) == described["files"][0]["sha256"]
    assert describe_source("org/corpus:en@validation") == {"spec": "org/corpus:en@validation", "dataset": "org/corpus",
                                                           "config": "en", "split": "validation"}


SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "gutenberg").is_dir(), reason="shared/data is not present")
def test_real_gutenberg_directory_reads_without_bom_or_crlf(tokenizer):
    docs = list(iter_documents(str(SHARED / "gutenberg")))
    assert len(docs) == 3
    assert all(not d.startswith("\ufeff") and "\r" not in d for d in docs)
    assert "Pride and Prejudice" in docs[0]  # 1342-0.txt sorts first
    sample = docs[1][100_000:110_000]
    assert tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False)) == sample


def test_changing_one_byte_changes_the_fingerprint(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"The fox sees the owl.\n" * 100)
    before = describe_source(str(tmp_path))["files"][0]
    data = bytearray(path.read_bytes())
    data[1000] ^= 1
    path.write_bytes(bytes(data))
    after = describe_source(str(tmp_path))["files"][0]
    assert before["bytes"] == after["bytes"] and before["sha256"] != after["sha256"]
    assert after["sha256"] == hashlib.sha256(bytes(data)).hexdigest()
