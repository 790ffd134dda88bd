"""Where documents come from: local files and directories, `datasets` names, or the built-in corpus.

Every reader streams: a corpus is never loaded whole (a single .txt file is one document and is read whole).
Bad records raise `DataError` naming the file, the record and the field.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator

from llmstack.tracking.record import file_sha256

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")


class DataError(ValueError):
    """A data record is malformed; the message names file, record and field."""


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    # utf-8-sig drops a byte-order mark; newline=None turns CRLF into LF
    return opener(path, "rt", encoding="utf-8-sig", newline=None)


def _text_of(record, field: str, path: Path, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{path}, {where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{path}, {where}: missing field '{field}' (the record has: {', '.join(record) or 'nothing'}); "
                        "set data.text_field to the field holding the text")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{path}, {where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _read_file(path: Path, field: str) -> Iterator[str]:
    kind = _kind(path)
    if kind.startswith(".txt"):
        with _open_text(path) as fh:
            yield fh.read()
    elif kind.startswith(".jsonl"):
        with _open_text(path) as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {number}: invalid JSON ({err.msg})") from err
                yield _text_of(record, field, path, f"line {number}")
    elif kind.startswith(".json"):
        with _open_text(path) as fh:
            try:
                records = json.load(fh)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
        for index, record in enumerate(records):
            yield _text_of(record, field, path, f"record {index}")
    else:
        yield from _read_parquet(path, field)


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    if field not in table.schema_arrow.names:
        raise DataError(f"{path}: missing column '{field}' (columns: {', '.join(table.schema_arrow.names)}); "
                        "set data.text_field to the column holding the text")
    index = 0
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                raise DataError(f"{path}, row {index}: column '{field}' must be a string, got {type(value).__name__}")
            index += 1
            yield value


def local_files(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_file():
        if _kind(path) is None:
            raise DataError(f"{path}: unsupported file type; supported: {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) is not None)
    if not files:
        raise DataError(f"{path}: the directory holds no {', '.join(SUFFIXES)} files")
    return files


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or _kind(Path(spec)) is not None


def _parse_dataset(spec: str) -> tuple[str, str | None, str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return name, config or None, split or "train"


def _synthetic_count(spec: str) -> int | None:
    if spec == "synthetic":
        return 2000
    if spec.startswith("synthetic:") and spec[len("synthetic:"):].isdigit():
        return int(spec[len("synthetic:"):])
    return None


def iter_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """Documents of `spec` in a fixed order; empty and whitespace-only documents are skipped."""
    n_synthetic = _synthetic_count(spec)
    if n_synthetic is not None:
        from llmstack.data.synthetic import corpus

        docs = iter(corpus(n_synthetic))
    elif Path(spec).exists():
        docs = (doc for path in local_files(spec) for doc in _read_file(path, text_field))
    elif _looks_like_path(spec):
        raise FileNotFoundError(f"data file or directory not found: {spec}")
    else:
        docs = _iter_dataset(spec, text_field)
    return (doc for doc in docs if doc.strip())


def _iter_dataset(spec: str, text_field: str) -> Iterator[str]:
    import datasets

    name, config, split = _parse_dataset(spec)
    for index, record in enumerate(datasets.load_dataset(name, config, split=split, streaming=True)):
        yield _text_of(record, text_field, Path(spec), f"record {index}")


def describe_source(spec: str) -> dict:
    """What the run record keeps about an input: content fingerprints for local files."""
    n_synthetic = _synthetic_count(spec)
    if n_synthetic is not None:
        return {"spec": spec, "generator": "llmstack.data.synthetic", "documents": n_synthetic}
    if Path(spec).exists():
        files = [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in local_files(spec)]
        return {"spec": spec, "files": files}
    name, config, split = _parse_dataset(spec)
    return {"spec": spec, "dataset": name, "config": config, "split": split}
