"""The curation stage: stream a corpus through an ordered list of rules, write the kept documents and an audit.

    llmstack curate --config configs/tiny/curate.yaml [key=value ...]

`output_dir` receives data/part-NNNNN.jsonl|parquet ({"id", "text"} rows), curation.json (the audit: per rule,
documents and words removed in rule order and by that rule alone, reasons, samples), CURATION.md (the same
to read), config.yaml and record.json (inputs and outputs with sha256, throughput), so a pretraining run on
data/ can name this run as its parent. A finished run is not redone; an unfinished one starts over.

Decisions:
- Rules written here, not datatrove's. datatrove 0.10.1 was tried first, offline. GopherRepetitionFilter and
  PIIFormatter ran. C4QualityFilter's sentence count, GopherQualityFilter and the MinHash stages need a spaCy
  English tokenizer (not installed; with spaCy added they ran offline, for ~190 MB more). LanguageFilter
  downloads a fastText model at first use, which cannot work offline. The filters also stop at the first
  failed check and return a reason name only (not the line or word that matched; C4's dropped lines are
  global counters), PIIFormatter handles e-mails and public IPv4s but no phone numbers and fills in fake
  addresses from a per-process counter (so output depends on the worker split), and MinhashDedup is four
  disk-based stages with no per-document verdict naming the original. The audit needs every rule's verdict on
  every document with its evidence, so each rule is a small function here, with py3langid for language ID
  (its model ships in the 4.5 MB wheel) and datasketch for MinHash.
- Scale: documents stream from the input to the output; worker processes evaluate batches and the main
  process consumes results in input order (dedup index, audit, writing), so any `workers` gives the same
  result and memory stays bounded except for the dedup indexes (2.5 KB per kept document measured with both
  dedup rules at their defaults; see curation/dedup.py). A worker evaluates about 1,400 short documents
  (0.7 MB) per second with every rule on; the main process's share is about 100 us per document.
- Cluster: `data.shard_index=i data.num_shards=N` on node i deals the input files round-robin (records, for
  a `datasets` name); each node writes its own output_dir. Dedup then covers one shard: follow with a
  dedup-only run (`rules.order=[exact_dedup,near_dedup]`) over the nodes' data/ directories on one machine,
  or beyond one machine's memory, datatrove's disk-based MinhashDedup stages over the shards' outputs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from llmstack.config import save_config, to_dict
from llmstack.config.curate import CurateConfig, CurateDataConfig
from llmstack.data import sources
from llmstack.data.curation import Audit, Pipeline, evaluate
from llmstack.data.curation.report import render
from llmstack.tracking.energy import EnergyMeter
from llmstack.tracking.record import RunRecord, file_sha256, write_json_atomic
from llmstack.tracking.run_dir import RunDirError, owns_output_dir, read_run_record

log = logging.getLogger("llmstack")
NOISY = "synthetic-noisy"


@dataclass
class CurateResult:
    status: str  # "finished"
    output_dir: Path
    files: list[Path]  # the kept documents
    audit: dict  # the content of curation.json

    @property
    def documents_out(self) -> int:
        return self.audit["output"]["documents"]

    @property
    def completed(self) -> bool:
        """Always true: curation runs to the end or raises (as a training stage's result says)."""
        return self.status == "finished"


def noisy_count(spec: str) -> int | None:
    if spec == NOISY:
        return 500
    if spec.startswith(f"{NOISY}:") and spec[len(NOISY) + 1:].isdigit():
        return int(spec[len(NOISY) + 1:])
    return None


def read_documents(data: CurateDataConfig, seed: int = 0) -> Iterator[tuple[str, str]]:
    """(id, text) of this shard's documents, in a fixed order."""
    shard, shards = data.shard_index, data.num_shards
    n_noisy, n_clean = noisy_count(data.train), sources.synthetic_count(data.train)
    if n_noisy is not None or n_clean is not None:
        if n_noisy is not None:
            from llmstack.data.synthetic_noise import noisy_corpus

            docs, prefix = noisy_corpus(n_noisy, seed)[0], "noisy"
        else:
            from llmstack.data.synthetic import corpus

            docs, prefix = corpus(n_clean), "synthetic"
        return ((f"{prefix}:{i}", doc) for i, doc in enumerate(docs) if i % shards == shard)
    if Path(data.train).exists():
        files = sources.local_files(data.train)
        if shards > len(files):
            raise sources.DataError(f"{data.train}: data.num_shards={shards} but the input has {len(files)} "
                                    "file(s); shards are whole files")
        return (doc for path in files[shard::shards] for doc in _file_documents(path, data))
    records = sources.iter_records(data.train)
    return (_document(where, record, data) for i, (where, record) in enumerate(records) if i % shards == shard)


def _file_documents(path: Path, data: CurateDataConfig) -> Iterator[tuple[str, str]]:
    if path.name.lower().endswith((".txt", ".txt.gz")):
        text = next(iter(sources.iter_documents(str(path))), "")  # a text file is one document
        yield str(path), text
        return
    for where, record in sources.iter_records(str(path)):
        yield _document(where, record, data)


def _document(where: str, record, data: CurateDataConfig) -> tuple[str, str]:
    text = sources._text_of(record, data.text_field, where)
    doc_id = record.get(data.id_field)
    return (where if doc_id is None else str(doc_id)), text


def describe_input(data: CurateDataConfig, seed: int) -> dict:
    n_noisy = noisy_count(data.train)
    if n_noisy is not None:
        described = {"spec": data.train, "generator": "llmstack.data.synthetic_noise", "documents": n_noisy,
                     "seed": seed}
    else:
        described = sources.describe_source(data.train)
    if data.num_shards > 1:
        described.update(shard_index=data.shard_index, num_shards=data.num_shards)
    return described


class ShardWriter:
    """{"id", "text"} rows into data/[prefix]part-NNNNN.jsonl or .parquet, `shard_size` documents per file;
    the prefix names the input shard, so the outputs of all shards can be gathered in one directory."""

    ROW_GROUP = 2048  # Parquet rows buffered before a row group is written

    def __init__(self, directory: Path, fmt: str, shard_size: int, prefix: str = "", before_open=None):
        self.directory, self.fmt, self.shard_size, self.prefix = directory, fmt, shard_size, prefix
        self.before_open = before_open  # called with each file's path before it is created
        self.files: list[Path] = []
        self._in_file = 0
        self._handle = None
        self._rows: list[dict] = []

    def _open(self) -> None:
        path = self.directory / f"{self.prefix}part-{len(self.files):05d}.{self.fmt}"
        if self.before_open is not None:
            self.before_open(path)
        self.files.append(path)
        if self.fmt == "jsonl":
            self._handle = open(path, "w", encoding="utf-8")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self._handle = pq.ParquetWriter(path, pa.schema([("id", pa.string()), ("text", pa.string())]))

    def write(self, doc_id: str, text: str) -> None:
        if self._handle is None:
            self._open()
        if self.fmt == "jsonl":
            self._handle.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
        else:
            self._rows.append({"id": doc_id, "text": text})
            if len(self._rows) >= self.ROW_GROUP:
                self._flush()
        self._in_file += 1
        if self._in_file >= self.shard_size:
            self._close_file()

    def _flush(self) -> None:
        if self._rows:
            import pyarrow as pa

            self._handle.write_table(pa.Table.from_pylist(self._rows, schema=self._handle.schema))
            self._rows = []

    def _close_file(self) -> None:
        if self._handle is not None:
            if self.fmt == "parquet":
                self._flush()
            self._handle.close()
        self._handle, self._in_file = None, 0

    def close(self) -> list[Path]:
        self._close_file()
        return self.files


def _previous_record(out: Path) -> dict:
    return read_run_record(out, "curate") or {}


def _written_before(out: Path, record: dict) -> list[Path]:
    """The shards an unfinished earlier attempt wrote, as its record lists them: the only files a new attempt
    removes (never anything else in data/)."""
    data_dir = (out / "data").resolve()
    listed = record.get("outputs", {}).get("data", {}).get("files", [])
    paths = [Path(f["path"]) for f in listed if isinstance(f, dict) and "path" in f]
    return [p for p in paths if p.resolve().parent == data_dir and p.is_file()]


@owns_output_dir
def curate(cfg: CurateConfig) -> CurateResult:
    """Run the curation stage described by `cfg`; returns the kept files and the audit."""
    out = Path(cfg.output_dir)
    previous = _previous_record(out)
    if previous.get("status") == "finished" and (out / "curation.json").is_file():
        log.info(f"curate: {out} holds a finished run (record.json status 'finished'); nothing to do. "
                 "Use another output_dir to curate again.")
        return CurateResult("finished", out, sorted((out / "data").glob(f"*.{cfg.format}")),
                            json.loads((out / "curation.json").read_text()))
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for stale in _written_before(out, previous):  # an unfinished run starts over
        stale.unlink()
    save_config(cfg, out / "config.yaml")
    record = RunRecord(out, "curate", to_dict(cfg), inputs={"train": describe_input(cfg.data, cfg.seed)},
                       parent=None)
    record.save()

    def claim_file(path: Path) -> None:
        """Listed in the record before it is created, so a later attempt knows it as its own."""
        if path.exists() and not cfg.overwrite_output_dir:
            raise RunDirError(f"{path} exists and was not written by this run; move it away, or set "
                              "overwrite_output_dir=true to replace it")
        written.append({"path": str(path)})
        record.update(outputs={"data": {"dir": str(data_dir), "format": cfg.format, "files": written}})
        record.save()

    written: list[dict] = []
    meter = EnergyMeter(cores=max(cfg.workers, 1))
    meter.start()
    try:
        audit, files = _run(cfg, data_dir, claim_file)
    except BaseException as err:
        record.finish("interrupted" if isinstance(err, KeyboardInterrupt) else f"failed: {err}")
        raise
    write_json_atomic(out / "curation.json", audit)
    (out / "CURATION.md").write_text(render(audit))
    record.update(data={"documents_in": audit["input"]["documents"], "documents_out": audit["output"]["documents"],
                        "words_in": audit["input"]["words"], "words_out": audit["output"]["words"],
                        "removed_by_rule": {r["name"]: r["removed"]["documents"] for r in audit["rules"]}},
                  metrics=audit["run"],
                  outputs={"data": {"dir": str(data_dir), "format": cfg.format,
                                    "files": [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)}
                                              for p in files]}})
    record.set_compute(1, device="cpu", workers=cfg.workers)
    record.add_energy(meter.stop())
    record.finish("finished")
    total = audit["input"].get("passages", audit["input"]["documents"])
    log.info(f"curate: kept {audit['output']['documents']:,} of {total:,} documents in "
             f"{audit['run']['wall_time_s']:.1f} s; audit in {out / 'CURATION.md'}")
    return CurateResult("finished", out, files, audit)


def _skip_blank(docs: Iterator[tuple[str, str]], audit: Audit) -> Iterator[tuple[str, str]]:
    for doc in docs:
        if doc[1].strip():
            yield doc
        else:
            audit.blank()


def _run(cfg: CurateConfig, data_dir: Path, claim_file) -> tuple[dict, list[Path]]:
    rules = cfg.rules.as_list()
    pipeline = Pipeline(rules, cfg.seed)  # built here too: bad parameters fail before workers start
    indexes = {i: rule.index() for i, rule in enumerate(pipeline.rules) if rule.kind == "dedup"}
    audit = Audit(pipeline.names, pipeline.kinds, [p for _, p in rules], indexes, cfg.audit_samples, cfg.seed)
    shards = cfg.data.num_shards
    writer = ShardWriter(data_dir, cfg.format, cfg.shard_size,
                         f"shard-{cfg.data.shard_index:05d}-of-{shards:05d}-" if shards > 1 else "", claim_file)
    docs = _skip_blank(read_documents(cfg.data, cfg.seed), audit)
    start = last_log = time.perf_counter()
    try:
        for result in evaluate(rules, docs, cfg.workers, cfg.seed):
            for doc_id, text in audit.add(result):
                writer.write(doc_id, text)
            if time.perf_counter() - last_log > 30:
                last_log = time.perf_counter()
                log.info(f"curate: {audit.input['documents']:,} documents read, {audit.output['documents']:,} kept")
    finally:
        files = writer.close()
    wall = time.perf_counter() - start
    report = audit.to_json()
    report["spec"] = cfg.data.train
    report["run"] = {"wall_time_s": round(wall, 3), "workers": cfg.workers,
                     "documents_per_s": round(report["input"]["documents"] / wall, 2),
                     "mb_per_s": round(report["input"]["bytes"] / 1e6 / wall, 3)}
    if "passages" in report["input"]:
        report["run"]["passages_per_s"] = round(report["input"]["passages"] / wall, 2)
    return report, files
