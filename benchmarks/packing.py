"""Packing and tokenising single huge documents: seconds and peak memory, before and now.

    python -m benchmarks.packing [--sizes 200000,400000,800000,1600000] [--corpus-mb 50] [--block 256]
                                 [--repeats 2] [--work DIR] [--out FILE]

Each document is the built-in synthetic corpus (`llmstack.data.synthetic.corpus`) joined into one text,
paragraphs apart, long enough for about the given number of tokens; the corpus case is one such .txt file
of `--corpus-mb` MB. Nothing is downloaded and the texts stay under `--work`. One byte-level BPE tokenizer
(`--vocab` tokens), trained by llmstack on the same generator, serves every case.

Cases, each in a fresh process so that each memory number is its own (the same `Memory` as the kernel
benchmarks: the resident-set high-water mark over the measured call minus the resident set before it):
- pack: packing alone, from one document's token ids already in memory, every block built and dropped: the
  re-slicing packer that `text.pack_blocks` replaced (before) against `text.pack_blocks` (now).
- tokenize: one document's ids: one tokenizer call on the whole text (before) against
  `text.tokenize_documents`, which cuts it into pieces (now).
- pack_corpus: end to end from the .txt file: read, tokenise, pack, split off 1% held out (now only).
- streamed: `text.packed_blocks` over the same file, the stream `StreamingBatches` and the streamed held-out
  set read, every block built and dropped (now only).
Results go to benchmarks/results/packing.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "packing.md"
HELD_OUT = 0.01


def reslicing_pack(token_docs, block_size: int, eos_id: int, pad_id: int):
    """The packer `text.pack_blocks` replaced, kept as the baseline: every block re-slices the whole rest of
    the buffer, so one document of n tokens costs n^2 / block_size copies."""
    buffer: list[int] = []
    for doc in token_docs:
        buffer.extend(doc)
        buffer.append(eos_id)
        while len(buffer) >= block_size:
            block, buffer = buffer[:block_size], buffer[block_size:]
            yield block, list(block)
    if buffer:
        pad = block_size - len(buffer)
        yield buffer + [pad_id] * pad, buffer + [-100] * pad


def run_case(case: dict) -> dict:
    """Measure one case in this process: the fastest of its repeats, and the memory of the first."""
    from transformers import AutoTokenizer

    from benchmarks.kernels.worker import Memory
    from llmstack.data import text

    tokenizer = AutoTokenizer.from_pretrained(case["tokenizer"])
    document = Path(case["file"]).read_text() if case["kind"] in ("pack", "tokenize") else None
    ids = next(text.tokenize_documents(tokenizer, [document])) if case["kind"] == "pack" else None
    memory = Memory(_cpu())
    memory.start()
    seconds = []
    for repeat in range(case["repeats"]):
        start = time.perf_counter()
        tokens = _measured(case, tokenizer, document, ids)
        seconds.append(time.perf_counter() - start)
        if repeat == 0:
            peak = memory.peak_mib()
    return {"case": case, "seconds": min(seconds), "tokens": tokens, "peak_mib": peak,
            "peak_rss_mib": memory.base + peak, "load": os.getloadavg()[0]}


def _measured(case: dict, tokenizer, document: str | None, ids: list[int] | None) -> int:
    """The case's work; returns the number of document tokens it handled."""
    from llmstack.data import text

    path, block, kind = case["file"], case["block"], case["kind"]
    if kind == "pack":
        pack = reslicing_pack if case["path"] == "before" else text.pack_blocks
        collections.deque(pack([ids], block, tokenizer.eos_token_id, tokenizer.pad_token_id), maxlen=0)
        return len(ids)
    if kind == "tokenize" and case["path"] == "before":
        return len(tokenizer(document, add_special_tokens=False)["input_ids"])
    if kind == "tokenize":
        return len(next(text.tokenize_documents(tokenizer, [document])))
    if kind == "pack_corpus":
        train, held_out = text.pack_corpus(path, tokenizer, block, HELD_OUT, seed=0)
        return int((train.labels != -100).sum() + (held_out.labels != -100).sum()) - 1  # less the EOS
    n_blocks, labels = 0, []
    for _, labels in text.packed_blocks(path, tokenizer, block, "text"):
        n_blocks += 1
    return (n_blocks - 1) * block + sum(label != -100 for label in labels) - 1  # less the EOS


def _cpu():
    import torch

    return torch.device("cpu")


def in_fresh_process(case: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.packing", "--case", json.dumps(case)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"case": case, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic_text(chars: int) -> str:
    """`chars` characters of the synthetic corpus, one paragraph per generated document."""
    from llmstack.data.synthetic import corpus

    docs, total, seed = [], 0, 0
    while total < chars:
        for doc in corpus(5000, seed=seed):
            docs.append(doc)
            total += len(doc) + 2
        seed += 1
    return "\n\n".join(docs)[:chars]


def prepare(work: Path, sizes: list[int], corpus_mb: float, vocab: int) -> tuple[Path, dict[str, Path]]:
    """The tokenizer and one .txt file per document, under `work`."""
    from llmstack.data import text
    from llmstack.data.synthetic import corpus

    work.mkdir(parents=True, exist_ok=True)
    tokenizer = text.train_tokenizer(corpus(4000, seed=99), vocab)
    tokenizer.save_pretrained(work / "tokenizer")
    sample = synthetic_text(1_000_000)
    chars_per_token = len(sample) / len(tokenizer(sample, add_special_tokens=False)["input_ids"])
    lengths = {f"{size:,} tokens": (f"doc-{size}.txt", int(size * chars_per_token)) for size in sizes}
    if corpus_mb:  # the generator writes ASCII: one character per byte
        lengths[f"{corpus_mb:g} MB .txt corpus"] = (f"corpus-{corpus_mb:g}mb.txt", int(corpus_mb * 1e6))
    files = {}
    for name, (file_name, chars) in lengths.items():
        files[name] = work / file_name
        files[name].write_text(synthetic_text(chars))
    return work / "tokenizer", files


def cases(tokenizer: Path, files: dict[str, Path], block: int, repeats: int, corpus_name: str | None) -> list[dict]:
    out = []
    for name, path in files.items():
        common = {"document": name, "file": str(path), "tokenizer": str(tokenizer), "block": block,
                  "repeats": repeats}
        kinds = [("pack_corpus", "now"), ("streamed", "now")]
        if name != corpus_name:
            kinds = [("pack", "before"), ("pack", "now"), ("tokenize", "before"), ("tokenize", "now"), *kinds]
        out += [{**common, "kind": kind, "path": path_name} for kind, path_name in kinds]
    return out


STEPS = {"pack": "packing alone", "tokenize": "tokenising", "pack_corpus": "`pack_corpus`, end to end",
         "streamed": "streamed (`packed_blocks`), end to end"}


def _number(result: dict | None, key: str, digits: int) -> str:
    if result is None:
        return "—"
    return "failed" if "error" in result else f"{result[key]:,.{digits}f}"


def table(results: list[dict]) -> list[str]:
    lines = ["| document | tokens | step | before (s) | now (s) | speed-up | before: peak RSS (MiB) "
             "| now: peak RSS (MiB) | before: added (MiB) | now: added (MiB) | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    by_key = {(r["case"]["document"], r["case"]["kind"], r["case"]["path"]): r for r in results}
    for (document, kind, path_name), now in by_key.items():
        if path_name != "now":
            continue
        before = by_key.get((document, kind, "before"))
        ok = before and "error" not in before and "error" not in now
        speed_up = f"{before['seconds'] / now['seconds']:,.1f}x" if ok else "—"
        lines.append(f"| {document} | {now.get('tokens', 0):,} | {STEPS[kind]} | {_number(before, 'seconds', 3)} "
                     f"| {_number(now, 'seconds', 3)} | {speed_up} | {_number(before, 'peak_rss_mib', 0)} "
                     f"| {_number(now, 'peak_rss_mib', 0)} | {_number(before, 'peak_mib', 0)} "
                     f"| {_number(now, 'peak_mib', 0)} | {_number(now, 'load', 1)} |")
    failures = [f"- {r['case']['document']}, {STEPS[r['case']['kind']]}, {r['case']['path']}: {r['error']}"
                for r in results if "error" in r]
    return lines + ([""] + failures if failures else [])


def write(results: list[dict], command: str, out: Path, seconds: float, block: int, vocab: int,
          repeats: int) -> None:
    from benchmarks.kernels.run import machine

    runs = "once" if repeats == 1 else f"{repeats} times"
    lines = ["# Packing and tokenising single huge documents", "", f"Machine: {machine()}", "",
             f"Command: `{command}` (took {seconds / 60:.1f} min, {time.strftime('%Y-%m-%d')})", "",
             f"Each document is the synthetic corpus joined into one text; one {vocab:,}-token byte-level BPE "
             f"trained by llmstack; blocks of {block} tokens. Each case runs in a fresh process, {runs}; "
             "seconds are the fastest run's, memory the first run's. Peak RSS: the resident-set high-water "
             "mark over the measured call; added: that minus the resident set just before it (the document's "
             "text, and for packing alone its token ids, are in memory before; imports and the tokenizer take "
             "about 400 MiB). Before: the re-slicing packer and one tokenizer call on the whole document, which "
             "`pack_blocks` and the pieces replaced; end to end, before is not run (it is the two before rows, "
             "plus every block kept as Python lists). Load: the machine's 1-minute load average when the now "
             "case finished; other work on the 2 cores slows whichever case it overlaps.",
             "",
             *table(results), ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.packing", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="200000,400000,800000,1600000", help="tokens per single document")
    parser.add_argument("--corpus-mb", type=float, default=50, help="size of the single-document .txt corpus")
    parser.add_argument("--block", type=int, default=256, help="tokens per block (data.block_size's default)")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the table keeps the fastest")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "benchmarks" / "packing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in this process (used internally)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return
    command = "python -m benchmarks.packing " + shlex.join(argv if argv is not None else sys.argv[1:])
    start = time.time()
    sizes = [int(size) for size in args.sizes.split(",") if size]
    tokenizer, files = prepare(args.work, sizes, args.corpus_mb, args.vocab)
    corpus_name = next((name for name in files if name.endswith("corpus")), None)
    results = []
    for case in cases(tokenizer, files, args.block, args.repeats, corpus_name):
        result = in_fresh_process(case)
        results.append(result)
        summary = result.get("error") or f"{result['seconds']:.2f} s, peak added {result['peak_mib']:,.0f} MiB"
        print(f"{case['document']} {case['kind']} {case['path']} -> {summary}", flush=True)
    write(results, command.strip(), args.out, time.time() - start, args.block, args.vocab, args.repeats)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
