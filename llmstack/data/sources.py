"""Where documents come from: local files and directories, `datasets` names and `save_to_disk` directories,
records given in Python (`memory:` names, `llmstack.config.objects`), or the built-in corpus.

Every reader streams: a corpus is never loaded whole. A .txt file is one document, and it also arrives in
parts (`iter_document_parts`) so that a file of any size is read with bounded memory; `iter_documents`
joins the parts for callers that want whole strings. Bad records raise `DataError` naming the file, the
record and the field.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator

from llmstack.config import objects
from llmstack.config.paths import looks_local
from llmstack.tracking.record import file_sha256

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".txt.gz", ".jsonl.gz", ".json.gz")
# record files up to this size also get a fingerprint of their records (the same as for the same records
# given in Python); larger corpora keep the file hashes alone, so the record costs one extra read at most
RECORDS_HASH_BYTES = 256 << 20
PART_CHARS = 1 << 20  # characters read from a .txt file at a time: a few MiB of memory, few Python calls


class DataError(ValueError):
    """A data record is malformed; the message names file, record and field."""


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _open_text(path: Path):
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    # utf-8-sig drops a byte-order mark; newline=None turns CRLF into LF
    return opener(path, "rt", encoding="utf-8-sig", newline=None)


def _text_of(record, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        raise DataError(f"{where}: missing field '{field}' (the record has: {', '.join(record) or 'nothing'}); "
                        "set data.text_field to the field holding the text")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{field}' must be a string, got {type(value).__name__}")
    return value


def _readable(read):
    """A file reader whose failures to read (bytes that are not UTF-8, a cut-off gzip, a damaged Parquet file,
    a file it may not open) become a DataError naming the file."""
    def reader(path: Path, *args):
        try:
            yield from read(path, *args)
        except DataError:
            raise
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text (byte {err.start} of a read block: {err.reason}); convert "
                            "it to UTF-8") from err
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            raise DataError(f"{path}: not a whole gzip file ({err}); re-create or re-download it") from err
        except OSError as err:
            raise DataError(f"{path}: cannot be read ({err.strerror or err})") from err
        except ValueError as err:  # pyarrow's ArrowInvalid and its kin
            raise DataError(f"{path}: not a readable {_kind(path)} file ({' '.join(str(err).split())})") from err
    return reader


@_readable
def _file_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) pairs of a JSONL, JSON or Parquet file; `where` names the file and the record."""
    kind = _kind(path)
    if kind.startswith(".jsonl"):
        with _open_text(path) as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}, line {number}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {number}: invalid JSON ({err.msg})") from err
    elif kind.startswith(".json"):
        with _open_text(path) as fh:
            try:
                records = json.load(fh)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records, got {type(records).__name__}")
        for index, record in enumerate(records):
            yield f"{path}, record {index}", record
    else:
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{path}, row {index}", record
                index += 1


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
    return looks_local(spec) or _kind(Path(spec)) is not None


def _parse_dataset(spec: str) -> tuple[str, str | None, str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    return name, config or None, split or "train"


def synthetic_count(spec: str) -> int | None:
    if spec == "synthetic":
        return 2000
    if spec.startswith("synthetic:") and spec[len("synthetic:"):].isdigit():
        return int(spec[len("synthetic:"):])
    return None


def saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def _saved_records(path: Path) -> Iterator[tuple[str, object]]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(f"{path}: a saved DatasetDict without a 'train' split (it has: {', '.join(loaded)}); "
                            f"point the key at one split's directory, e.g. {path / next(iter(loaded))}")
        loaded = loaded["train"]
    for index, record in enumerate(loaded):
        yield f"{path}, record {index}", record


def iter_records(spec: str) -> Iterator[tuple[str, object]]:
    """(where, record) pairs from JSONL/JSON/Parquet files, a directory of them, a `save_to_disk` directory,
    records given in Python, or a `datasets` name."""
    if objects.is_memory(spec):
        for index, record in enumerate(objects.lookup(spec)):
            yield f"{spec}, record {index}", record
    elif saved_dataset(Path(spec)):
        yield from _saved_records(Path(spec))
    elif Path(spec).exists():
        for path in local_files(spec):
            if _kind(path).startswith(".txt"):
                raise DataError(f"{path}: a plain-text file holds no records; records come from "
                                ".jsonl, .json or .parquet files")
            yield from _file_records(path)
    elif _looks_like_path(spec):
        raise DataError(f"{spec}: no such data file or directory; check the path")
    else:
        yield from _dataset_records(spec)


def _dataset_records(spec: str) -> Iterator[tuple[str, object]]:
    import datasets

    name, config, split = _parse_dataset(spec)
    try:
        for index, record in enumerate(datasets.load_dataset(name, config, split=split, streaming=True)):
            yield f"{spec}, record {index}", record
    except Exception as err:  # noqa: BLE001 - the Hub, the network and the loading script fail in many ways
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{spec}: not a local file or directory, and `datasets` could not load it as a dataset "
                        f"name ({first}); check the name, or give a path (./{spec})") from err


def iter_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    """Documents of `spec` in a fixed order; empty and whitespace-only documents are skipped."""
    return _joined(iter_document_parts(spec, text_field))


def _joined(parts: Iterator[tuple[str, bool]]) -> Iterator[str]:
    held: list[str] = []
    for text, last in parts:
        held.append(text)
        if last:
            yield "".join(held)  # a single part comes back as is, not copied
            held = []


def iter_document_parts(spec: str, text_field: str = "text") -> Iterator[tuple[str, bool]]:
    """The documents of `iter_documents` as (text, last) pairs: a document is its consecutive parts joined,
    and `last` marks its final part. A .txt file comes `PART_CHARS` characters at a time; a record is one
    part, since it is already whole in memory. A missing path fails here, not at the first `next`."""
    n_synthetic = synthetic_count(spec)
    if n_synthetic is not None:
        from llmstack.data.synthetic import corpus

        docs = iter(corpus(n_synthetic))
    elif objects.is_memory(spec) or saved_dataset(Path(spec)):
        docs = (_text_of(record, text_field, where) for where, record in iter_records(spec))
    elif Path(spec).exists():
        files = local_files(spec)
        return (part for path in files for part in _file_parts(path, text_field))
    elif _looks_like_path(spec):
        raise DataError(f"{spec}: no such data file or directory; check the path")
    else:
        docs = (_text_of(record, text_field, where) for where, record in iter_records(spec))
    return ((doc, True) for doc in docs if doc.strip())


@_readable
def _file_parts(path: Path, text_field: str) -> Iterator[tuple[str, bool]]:
    if not _kind(path).startswith(".txt"):
        texts = (_text_of(record, text_field, where) for where, record in _file_records(path))
        yield from ((text, True) for text in texts if text.strip())
        return
    with _open_text(path) as fh:
        blank = []  # leading whitespace: it belongs to the document unless the whole file is blank
        part = fh.read(PART_CHARS)
        while part.isspace():
            blank.append(part)
            part = fh.read(PART_CHARS)
        if not part:
            return
        yield from ((text, False) for text in blank)
        while following := fh.read(PART_CHARS):
            yield part, False
            part = following
        yield part, True


def describe_source(spec: str) -> dict:
    """What the run record keeps about an input: content fingerprints for local files."""
    n_synthetic = synthetic_count(spec)
    if n_synthetic is not None:
        return {"spec": spec, "generator": "llmstack.data.synthetic", "documents": n_synthetic}
    if objects.is_memory(spec):
        return {"spec": spec, **objects.describe(spec)}
    if saved_dataset(Path(spec)):
        digest, count = objects.records_sha256(record for _, record in _saved_records(Path(spec)))
        return {"spec": spec, "saved_dataset": True, "records": count, "records_sha256": digest}
    if Path(spec).exists():
        files = [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in local_files(spec)]
        described = {"spec": spec, "files": files}
        if all(not _kind(p).startswith(".txt") for p in local_files(spec)) and \
                sum(f["bytes"] for f in files) <= RECORDS_HASH_BYTES:
            described["records"], described["records_sha256"] = _records_fingerprint(spec)
        return described
    name, config, split = _parse_dataset(spec)
    return {"spec": spec, "dataset": name, "config": config, "split": split}


def _records_fingerprint(spec: str) -> tuple[int, str]:
    digest, count = objects.records_sha256(record for _, record in iter_records(spec))
    return count, digest
